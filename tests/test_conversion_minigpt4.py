"""``--format minigpt4``: tiny original-layout files (eva_vit_g-style ViT with q_bias/v_bias, LAVIS BLIP-2
``{'model': ...}``, ``pretrained_minigpt4.pth``, a plain Llama folder) → hub folder → checks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from tiny_llama_tokenizer import SHAPE_TEXT, TOKENIZER_SHAPES, sentencepiece_ids, write_tokenizer_shape

from modeling_visualglm.conversion.cli import main as convert_main

VIT_H, QF_H, TXT_H, VOCAB = 176, 64, 48, 400  # ViT head dim 88 (2 heads), Q-Former head dim 64 (1 head)
LORA_R, LORA_ALPHA = 64, 16  # MiniGPT-v2's peft LoraConfig (spec minigpt4.md)


def rnd(*shape, g):
    return torch.randn(*shape, generator=g) * 0.2


def eva_vit(g, blocks=3, grid=4, patch=14, inter=96, prefix=""):
    sd = {"cls_token": rnd(1, 1, VIT_H, g=g), "pos_embed": rnd(1, grid * grid + 1, VIT_H, g=g),
          "patch_embed.proj.weight": rnd(VIT_H, 3, patch, patch, g=g), "patch_embed.proj.bias": rnd(VIT_H, g=g)}
    for i in range(blocks):
        b = f"blocks.{i}."
        for n in ("norm1", "norm2"):
            sd[b + n + ".weight"], sd[b + n + ".bias"] = rnd(VIT_H, g=g), rnd(VIT_H, g=g)
        sd[b + "attn.qkv.weight"] = rnd(3 * VIT_H, VIT_H, g=g)
        sd[b + "attn.q_bias"], sd[b + "attn.v_bias"] = rnd(VIT_H, g=g), rnd(VIT_H, g=g)
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = rnd(VIT_H, VIT_H, g=g), rnd(VIT_H, g=g)
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = rnd(inter, VIT_H, g=g), rnd(inter, g=g)
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = rnd(VIT_H, inter, g=g), rnd(VIT_H, g=g)
    return {prefix + k: v for k, v in sd.items()}


def blip2(g, layers=2, queries=8, inter=96):
    sd = {"query_tokens": rnd(1, queries, QF_H, g=g), "ln_vision.weight": rnd(VIT_H, g=g),
          "ln_vision.bias": rnd(VIT_H, g=g), "Qformer.bert.embeddings.LayerNorm.weight": rnd(QF_H, g=g),
          "Qformer.bert.embeddings.LayerNorm.bias": rnd(QF_H, g=g),
          "Qformer.bert.embeddings.position_ids": torch.arange(512)[None], "t5_proj.weight": rnd(32, QF_H, g=g),
          "t5_proj.bias": rnd(32, g=g)}
    for i in range(layers):
        p = f"Qformer.bert.encoder.layer.{i}."
        lin = {"attention.self.query": (QF_H, QF_H), "attention.self.key": (QF_H, QF_H),
               "attention.self.value": (QF_H, QF_H), "attention.output.dense": (QF_H, QF_H),
               "intermediate_query.dense": (inter, QF_H), "output_query.dense": (QF_H, inter)}
        if i % 2 == 0:
            lin.update({"crossattention.self.query": (QF_H, QF_H), "crossattention.self.key": (QF_H, VIT_H),
                        "crossattention.self.value": (QF_H, VIT_H), "crossattention.output.dense": (QF_H, QF_H)})
        for n, (o, i_) in lin.items():
            sd[p + n + ".weight"], sd[p + n + ".bias"] = rnd(o, i_, g=g), rnd(o, g=g)
        lns = ["attention.output.LayerNorm", "output_query.LayerNorm"] + (
            ["crossattention.output.LayerNorm"] if i % 2 == 0 else [])
        for n in lns:
            sd[p + n + ".weight"], sd[p + n + ".bias"] = rnd(QF_H, g=g), rnd(QF_H, g=g)
    return {"model": sd}


def llama_folder(path, tokenizer, seed=0, hidden=TXT_H, vocab=VOCAB):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=4, rms_norm_eps=1e-6,
                                         max_position_embeddings=512, tie_word_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return model


def make_sources(tmp_path, variant, tokenizer, out_f=TXT_H):
    g = torch.Generator().manual_seed(0)
    files = {}
    torch.save(eva_vit(g), tmp_path / "eva_vit_g.pth")
    files["vit"] = tmp_path / "eva_vit_g.pth"
    if variant == "vicuna0":
        torch.save(blip2(g), tmp_path / "blip2.pth")
        files["blip2"] = tmp_path / "blip2.pth"
        in_f = QF_H
    else:
        in_f = 4 * VIT_H
    ck = {"llama_proj.weight": rnd(out_f, in_f, g=g), "llama_proj.bias": rnd(out_f, g=g)}
    if variant == "minigptv2":  # peft names as saved by MiniGPT-v2 (r 64, targets q_proj / v_proj)
        for i in range(2):
            for p in ("q", "v"):
                k = f"llama_model.base_model.model.model.layers.{i}.self_attn.{p}_proj.lora_"
                ck[k + "A.default.weight"] = rnd(LORA_R, TXT_H, g=g)
                ck[k + "B.default.weight"] = rnd(TXT_H, LORA_R, g=g)
    torch.save({"model": ck, "epoch": 3}, tmp_path / "pretrained_minigpt4.pth")
    files["ckpt"] = tmp_path / "pretrained_minigpt4.pth"
    llama_folder(tmp_path / "llm", tokenizer)
    files["llm"] = tmp_path / "llm"
    return files


def run(files, out, *extra):
    argv = ["--format", "minigpt4", "--out", str(out), "--no-progress"]
    for k, v in files.items():
        argv += [f"--{k}", str(v)]
    return convert_main(argv + list(extra))


def _tokenizer(tmp_path):
    from tiny_llama_tokenizer import make_tiny_llama_tokenizer

    return make_tiny_llama_tokenizer(tmp_path)


def test_vicuna0_converts_and_maps_tensors(tmp_path, capsys):
    from safetensors.torch import load_file

    tok = _tokenizer(tmp_path)
    files = make_sources(tmp_path, "vicuna0", tok)
    out = tmp_path / "out"
    assert run(files, out) == 0, capsys.readouterr()
    sd = load_file(out / "model.safetensors")
    vit = torch.load(files["vit"])
    b2 = torch.load(files["blip2"])["model"]
    q, v = vit["blocks.0.attn.q_bias"], vit["blocks.0.attn.v_bias"]
    assert torch.equal(sd["vision_model.layers.0.attention.query_key_value.bias"], torch.cat([q, torch.zeros_like(q), v]))
    assert "vision_model.layers.2.input_layernorm.weight" not in sd  # the 3rd (last) EVA block is dropped
    assert torch.equal(sd["vision_model.post_layernorm.weight"], b2["ln_vision.weight"])
    assert torch.equal(sd["qformer.layers.1.input_layernorm.weight"],
                       b2["Qformer.bert.encoder.layer.0.output_query.LayerNorm.weight"])
    assert sd["language_model.embed_tokens.weight"].shape[0] == VOCAB + 1
    import json

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["variant"] == "vicuna0" and cfg["image_token_id"] == VOCAB


def test_llama2_fresh_ln_vision_and_inferred_variant(tmp_path, capsys):
    from safetensors.torch import load_file

    tok = _tokenizer(tmp_path)
    files = make_sources(tmp_path, "llama2", tok)
    out = tmp_path / "out"
    assert run(files, out) == 0, capsys.readouterr()
    sd = load_file(out / "model.safetensors")
    assert torch.equal(sd["vision_model.post_layernorm.weight"], torch.ones(VIT_H))
    assert torch.equal(sd["vision_model.post_layernorm.bias"], torch.zeros(VIT_H))
    from modeling_visualglm.modeling_minigpt4 import MiniGPT4ForConditionalGeneration

    model = MiniGPT4ForConditionalGeneration.from_pretrained(out)
    assert model.config.variant == "llama2" and model.config.num_image_tokens == 4


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    from tiny_llama_tokenizer import make_tiny_llama_tokenizer

    folder = tmp_path_factory.mktemp("llm_spm")
    make_tiny_llama_tokenizer(folder)
    return folder / "spm.model"


@pytest.mark.parametrize("shape", TOKENIZER_SHAPES)
def test_llm_folder_tokenizer_shapes(shape, spm_model, tmp_path, capsys):
    """--llm folders as users have them (FastChat's: tokenizer.model + tokenizer_config.json only; tokenizer.json
    only; both) give the same tokenizer: SentencePiece's ids, BOS first, the image id past the pieces."""
    from transformers import AutoTokenizer

    files = make_sources(tmp_path, "llama2", None)
    write_tokenizer_shape(spm_model, files["llm"], shape)
    assert run(files, tmp_path / "out") == 0, capsys.readouterr()
    tok = AutoTokenizer.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert tok.encode(SHAPE_TEXT) == sentencepiece_ids(spm_model)
    assert tok.image_token_id == VOCAB


def test_unloadable_tokenizer_folder_says_what_it_needs(spm_model, tmp_path, capsys):
    """Without protobuf (hidden here) transformers cannot read a folder with only tokenizer.model and says
    "tiktoken is required"; the converter names the files it found and the missing package instead."""
    files = make_sources(tmp_path, "llama2", None)
    write_tokenizer_shape(spm_model, files["llm"], "slow")
    argv = ["--format", "minigpt4", "--out", str(tmp_path / "out"), "--no-progress"]
    argv += [a for k, v in files.items() for a in (f"--{k}", str(v))]
    code = ("import sys; sys.modules['google.protobuf'] = None; from modeling_visualglm.conversion.cli import main; "
            f"sys.exit(main({argv!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr
    assert f"cannot load the tokenizer in {files['llm']}: it has tokenizer.model, tokenizer_config.json but no " \
           "tokenizer.json" in err and "pip install protobuf" in err, err
    assert "Traceback" not in err and "tiktoken" not in err.split("conversion failed")[-1]
    assert not (tmp_path / "out").exists()
    # a folder with no tokenizer at all
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (files["llm"] / name).unlink()
    assert run(files, tmp_path / "out") == 1
    assert f"{files['llm']} holds no tokenizer (it has no tokenizer files" in capsys.readouterr().err


def test_7b_13b_mixup_and_unfit_projector(tmp_path, capsys):
    tok = _tokenizer(tmp_path)
    files = make_sources(tmp_path, "vicuna0", tok, out_f=TXT_H + 16)
    assert run(files, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "7B/13B mix-up" in err
    assert not (tmp_path / "out").exists()
    g = torch.Generator().manual_seed(1)
    torch.save({"model": {"llama_proj.weight": rnd(TXT_H, 100, g=g), "llama_proj.bias": rnd(TXT_H, g=g)}},
               files["ckpt"])
    assert run(files, tmp_path / "out") == 1
    assert "fits no variant" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_extra_key_and_missing_key(tmp_path, capsys):
    tok = _tokenizer(tmp_path)
    files = make_sources(tmp_path, "vicuna0", tok)
    ck = torch.load(files["blip2"])
    ck["model"]["surprise.weight"] = torch.zeros(2)
    del ck["model"]["ln_vision.bias"]
    torch.save(ck, files["blip2"])
    assert run(files, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "surprise.weight" in err and "post_layernorm.bias" in err
    assert not (tmp_path / "out").exists()


# --- logits parity against a reference built straight from the original files ------------------------------


def interpolated_pos(pos_embed, grid):
    """MiniGPT-v2's interpolate_pos_embed, recomputed here: CLS kept, the g×g grid resized bicubically in fp32."""
    cls, pos = pos_embed[:, :1], pos_embed[:, 1:]
    g = int(round(pos.shape[1] ** 0.5))
    pos = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    pos = torch.nn.functional.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, pos.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def ref_vision(vit_sd: dict, depth: int, ln_w, ln_b):
    """transformers' Blip2VisionModel on the first ``depth`` eva_vit_g blocks (EVA names → HF names), then
    ln_vision (nn.LayerNorm, eps 1e-5) as BLIP-2's ``ln_vision(visual_encoder(image))``."""
    from transformers import Blip2VisionConfig, Blip2VisionModel

    grid = int(round((vit_sd["pos_embed"].shape[1] - 1) ** 0.5))
    patch = vit_sd["patch_embed.proj.weight"].shape[-1]
    hf = Blip2VisionModel(Blip2VisionConfig(
        hidden_size=VIT_H, intermediate_size=vit_sd["blocks.0.mlp.fc1.weight"].shape[0], num_hidden_layers=depth,
        num_attention_heads=VIT_H // 88, image_size=grid * patch, patch_size=patch, layer_norm_eps=1e-6,
        qkv_bias=True, attention_dropout=0.0)).eval()
    m = {"embeddings.class_embedding": vit_sd["cls_token"], "embeddings.position_embedding": vit_sd["pos_embed"],
         "embeddings.patch_embedding.weight": vit_sd["patch_embed.proj.weight"],
         "embeddings.patch_embedding.bias": vit_sd["patch_embed.proj.bias"],
         "post_layernorm.weight": torch.ones(VIT_H), "post_layernorm.bias": torch.zeros(VIT_H)}
    for i in range(depth):
        b, t = f"blocks.{i}.", f"encoder.layers.{i}."
        q, v = vit_sd[b + "attn.q_bias"], vit_sd[b + "attn.v_bias"]
        m[t + "self_attn.qkv.weight"] = vit_sd[b + "attn.qkv.weight"]
        m[t + "self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])  # how HF's Blip2Attention builds it
        for wb in ("weight", "bias"):
            m[t + f"layer_norm1.{wb}"] = vit_sd[b + f"norm1.{wb}"]
            m[t + f"layer_norm2.{wb}"] = vit_sd[b + f"norm2.{wb}"]
            m[t + f"self_attn.projection.{wb}"] = vit_sd[b + f"attn.proj.{wb}"]
            m[t + f"mlp.fc1.{wb}"], m[t + f"mlp.fc2.{wb}"] = vit_sd[b + f"mlp.fc1.{wb}"], vit_sd[b + f"mlp.fc2.{wb}"]
    hf.load_state_dict(m, strict=True)
    hf.post_layernorm = torch.nn.Identity()  # EVA has no final norm; ln_vision follows with its own eps
    return lambda pix: torch.nn.functional.layer_norm(hf(pixel_values=pix).last_hidden_state, (VIT_H,), ln_w, ln_b,
                                                      eps=1e-5)


def ref_qformer(b2: dict):
    """transformers' Blip2QFormerModel loaded from LAVIS names (``Qformer.bert.*``)."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    n = 1 + max(int(k.split(".")[4]) for k in b2 if k.startswith("Qformer.bert.encoder.layer."))
    hf = Blip2QFormerModel(Blip2QFormerConfig(
        hidden_size=QF_H, num_hidden_layers=n, num_attention_heads=QF_H // 64,
        intermediate_size=b2["Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12, cross_attention_frequency=2,
        encoder_hidden_size=VIT_H, use_qformer_text_input=False)).eval()
    m = {}
    for k, v in b2.items():
        if not k.startswith("Qformer.bert.") or k.endswith("position_ids"):
            continue
        k = k[len("Qformer.bert."):].replace("embeddings.LayerNorm", "layernorm")
        m[k.replace("attention.self.", "attention.attention.")] = v  # also crossattention.self.
    missing, unexpected = hf.load_state_dict(m, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return lambda vis: hf(query_embeds=b2["query_tokens"].expand(vis.shape[0], -1, -1),
                          encoder_hidden_states=vis).last_hidden_state


def peft_merged(llama, ck):
    """peft's own merge of the checkpoint's LoRA (as MiniGPT-v2's LoraConfig) into the Llama."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    cfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(llama, cfg)
    lora = {k[len("llama_model."):]: v for k, v in ck.items() if ".lora_" in k}
    result = set_peft_model_state_dict(model, lora)
    assert not result.unexpected_keys, result.unexpected_keys
    return model.merge_and_unload().eval()


def reference_logits_from_files(files, segments, pix, variant):
    """The original forward: encode_img (ln_vision(ViT) → Q-Former or merge-4 → llama_proj), then the image
    embeddings spliced between the separately embedded text segments of ``get_context_emb``."""
    from transformers import LlamaForCausalLM

    vit_sd = torch.load(files["vit"])
    ck = torch.load(files["ckpt"])["model"]
    depth = 1 + max(int(k.split(".")[1]) for k in vit_sd if k.startswith("blocks.")) - 1  # eva_vit_g: last dropped
    with torch.no_grad():
        if variant == "vicuna0":
            b2 = torch.load(files["blip2"])["model"]
            vis = ref_vision(vit_sd, depth, b2["ln_vision.weight"], b2["ln_vision.bias"])(pix)
            feats = ref_qformer(b2)(vis)
        else:
            if variant == "minigptv2":  # 448 px: positions interpolated to twice the grid side
                grid = int(round((vit_sd["pos_embed"].shape[1] - 1) ** 0.5))
                vit_sd = {**vit_sd, "pos_embed": interpolated_pos(vit_sd["pos_embed"], 2 * grid)}
            vis = ref_vision(vit_sd, depth, torch.ones(VIT_H), torch.zeros(VIT_H))(pix)
            patches = vis[:, 1:]
            feats = patches.reshape(patches.shape[0], patches.shape[1] // 4, VIT_H * 4)
        img = torch.nn.functional.linear(feats, ck["llama_proj.weight"], ck["llama_proj.bias"])
        llama = LlamaForCausalLM.from_pretrained(files["llm"]).eval()
        if variant == "minigptv2":
            llama = peft_merged(llama, ck)
        embs = [llama.model.embed_tokens(torch.tensor([segments[0]])), img,
                llama.model.embed_tokens(torch.tensor([segments[1]]))]
        return llama(inputs_embeds=torch.cat(embs, dim=1)).logits


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # raised inside peft
@pytest.mark.parametrize("variant", ["vicuna0", "llama2", "minigptv2"])
def test_converted_folder_logits_match_original_files(variant, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    tok = _tokenizer(tmp_path)
    files = make_sources(tmp_path, variant, tok)
    out = tmp_path / "out"
    assert run(files, out) == 0, capsys.readouterr()
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(model).__name__ == "MiniGPT4ForConditionalGeneration"
    # separately tokenized segments around <ImageHere>, BOS only on the first (the original get_context_emb)
    segments = [[tok.bos_token_id] + tok.encode("###Human: <Img>", add_special_tokens=False),
                tok.encode("</Img> what is this###Assistant: ", add_special_tokens=False)]
    n_img = model.config.num_image_tokens
    assert n_img == {"vicuna0": 8, "llama2": 4, "minigptv2": 16}[variant]  # v2: 8x8 patches at twice the side
    size = 112 if variant == "minigptv2" else 56
    pix = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(5))
    ids = torch.tensor([segments[0] + [model.config.image_token_id] * n_img + segments[1]])
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=pix).logits
    ref = reference_logits_from_files(files, segments, pix, variant)
    assert ours.shape[:2] == ref.shape[:2] and ours.shape[-1] == VOCAB + 1  # + the placeholder row
    assert (ours[..., :VOCAB] - ref).abs().max() / ref.abs().max() <= 1e-4
    if variant in ("vicuna0", "llama2"):  # the hub check (fresh interpreter, trust_remote_code, one chat turn)
        from modeling_visualglm.hub_export.cli import main as export_main

        capsys.readouterr()
        assert export_main(["check", "--folder", str(out)]) == 0, capsys.readouterr()


def test_minigptv2_lora_merge_and_position_interpolation(tmp_path, capsys):
    """The variant is inferred from the LoRA keys; q/v get W + (α/r)·B·A, k and o stay; the 4x4 grid becomes
    8x8 by a bicubic resize computed here independently."""
    import json

    from safetensors.torch import load_file

    tok = _tokenizer(tmp_path)
    files = make_sources(tmp_path, "minigptv2", tok)
    out = tmp_path / "out"
    assert run(files, out) == 0, capsys.readouterr()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["variant"] == "minigptv2" and cfg["vision_config"]["image_size"] == 112
    sd = load_file(out / "model.safetensors")
    vit, ck = torch.load(files["vit"]), torch.load(files["ckpt"])["model"]
    pos = sd["vision_model.embeddings.position_embedding"]
    assert pos.shape == (1 + 64, VIT_H)
    assert torch.allclose(pos, interpolated_pos(vit["pos_embed"], 8)[0], atol=1e-6, rtol=0)
    base = load_file(files["llm"] / "model.safetensors")
    qkv = sd["language_model.layers.1.self_attn.language_expert_query_key_value.weight"]
    q, k, v = qkv.split(TXT_H)
    lp = "llama_model.base_model.model.model.layers.1.self_attn."
    for name, got in (("q", q), ("v", v)):
        delta = ck[lp + f"{name}_proj.lora_B.default.weight"] @ ck[lp + f"{name}_proj.lora_A.default.weight"]
        want = base[f"model.layers.1.self_attn.{name}_proj.weight"] + LORA_ALPHA / LORA_R * delta
        assert torch.allclose(got, want, atol=1e-6, rtol=0)
        assert not torch.allclose(got, base[f"model.layers.1.self_attn.{name}_proj.weight"], atol=1e-3)
    assert torch.equal(k, base["model.layers.1.self_attn.k_proj.weight"])
    # LoRA keys contradict --variant llama2
    assert run(files, tmp_path / "out2", "--variant", "llama2") == 1
    assert "LoRA keys" in capsys.readouterr().err
