"""``--format minigpt4``: tiny original-layout files (eva_vit_g-style ViT with q_bias/v_bias, LAVIS BLIP-2
``{'model': ...}``, ``pretrained_minigpt4.pth``, a plain Llama folder) → hub folder → checks."""

from __future__ import annotations

import torch

from conversion.cli import main as convert_main

VIT_H, QF_H, TXT_H, VOCAB = 176, 64, 48, 400  # ViT head dim 88 (2 heads), Q-Former head dim 64 (1 head)


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


def test_check_passes_on_converted_folder(tmp_path, capsys):
    from hub_export.check import check_folder

    tok = _tokenizer(tmp_path)
    files = make_sources(tmp_path, "llama2", tok)
    out = tmp_path / "out"
    assert run(files, out) == 0
    capsys.readouterr()
    assert check_folder(out) == 0, capsys.readouterr()
