"""Fine-tuned SAT checkpoints: unmerged LoRA converts (merged, or as a peft adapter); P-tuning v2 is refused clearly.

The checkpoints are made in the original layout by SwissArmyTransformer 0.4.12 itself: its ``LoraMixin``
(``sat/model/finetune/lora2.py``) on SAT's own VisualGLM module tree names the tensors
(``….query_key_value.original.{weight,bias}``, ``….matrix_A.{0,1,2}``, ``….matrix_B.{0,1,2}``, partition 1 on
``dense``), and its ``LoraLinear`` makes CogVLM's (language-expert attention and ViT attention; CogVLM2's grouped-query
qkv gets SAT's [heads, kv, kv] partition). The pairs are randomised (SAT initialises B to zero), α stays 1 as in the
original fine-tune scripts.

The independent references are SAT's own LoRA forward passes, never our merge:
- VisualGLM: SAT's ChatGLM with the LoRA mixin, unmerged, on the written weights (text logits), and SAT's own
  ``merge_lora()`` (merged weights, bit for bit);
- CogVLM: our base model with SAT's ``LoraLinear`` modules put in place of the LoRA'd linears (SAT's forward
  ``W x + cat_k(B_k A_k x)/r`` on the very tensors written to the checkpoint), on image + text inputs.
Each is compared with the merged folder and with the base folder + ``PeftModel.from_pretrained(model, adapter)``;
the base folder without the adapter is the model before fine-tuning.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from pathlib import Path

import pytest
import torch
from helpers import edit_sat_copy, rel_err
from torch import nn

from modeling_visualglm.modeling_cogvlm import CogVLMForConditionalGeneration
from modeling_visualglm.modeling_visualglm import VisualGLMForConditionalGeneration
from modeling_visualglm.processing_visualglm import build_visualglm_inputs

from modeling_visualglm.conversion.cli import main as convert_main
from modeling_visualglm.conversion.ops import OPS
from test_conversion_cogvlm import cogvlm_inputs, models, tok_dir, tokenizer
from test_conversion_cogvlm import sat_config_json as cogvlm_sat_config, to_sat as cogvlm_to_sat
from test_conversion_visualglm import QUERY, assert_nothing_left, build_sat_visualglm, inputs, ours, to_sat, write_sat

RANK = 2
VGLM_LAYERS = [1]  # like the original --layer_range 0 14: LoRA on some layers, plain weights on the others
TOL = 1e-4  # CONTRACTS §5
__all__ = ["inputs", "models", "ours", "tok_dir", "tokenizer"]  # fixtures of the format tests, reused


def _randomize_pairs(module: nn.Module, seed: int):
    """SAT starts B at zero (a no-op adapter): give every matrix_A / matrix_B seeded random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".matrix_A." in name or ".matrix_B." in name or name.startswith(("matrix_A.", "matrix_B.")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.4)


def convert(src, out, *extra, fmt="sat-visualglm", tokenizer=None) -> tuple[int, str, str]:
    """The CLI entry point in this process: (exit code, stdout, stderr)."""
    args = ["--format", fmt, "--src", str(src), "--out", str(out), "--no-progress", *map(str, extra)]
    if tokenizer is not None:
        args += ["--tokenizer", str(tokenizer)]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = convert_main(args)
    return rc, stdout.getvalue(), stderr.getvalue()


def _load(cls, folder: Path):
    return cls.from_pretrained(str(folder), dtype=torch.float32).eval()


def _peft(model, adapter: Path):
    from peft import PeftModel

    with warnings.catch_warnings():  # peft reads `is_gradient_checkpointing`, deprecated by transformers 5.24
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(model, str(adapter)).eval()


# --- VisualGLM: SAT's own LoraMixin ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vglm_sat(ours):
    """SAT's VisualGLM tree with the written base weights and SAT's LoraMixin (rank 2 on VGLM_LAYERS), randomised."""
    sat_model, args = build_sat_visualglm(ours.config)  # imports SAT (with its triton stub)
    from sat.model.finetune.lora2 import LoraMixin

    sd = to_sat(ours, "blocked")
    sd["mixins.chatglm-attn.rotary_emb.inv_freq"] = sat_model.state_dict()["mixins.chatglm-attn.rotary_emb.inv_freq"]
    sat_model.load_state_dict(sd, strict=True)
    sat_model.add_mixin("lora", LoraMixin(ours.config.text_config.num_hidden_layers, RANK, layer_range=VGLM_LAYERS),
                        reinit=True)
    _randomize_pairs(sat_model, seed=7)
    return sat_model.eval(), args


def _finetune_config(folder: Path, **fields):
    """What finetune_visualglm.py / finetune_cogvlm_demo.py add to model_config.json."""
    path = folder / "model_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(fields)
    path.write_text(json.dumps(cfg, indent=2))


@pytest.fixture(scope="module")
def vglm_src(vglm_sat, tmp_path_factory):
    sat_model, args = vglm_sat
    sd = {k: v.detach().clone() for k, v in sat_model.state_dict().items()}
    assert {k for k in sd if k.startswith("transformer.layers.1.attention.query_key_value.")} == {
        f"transformer.layers.1.attention.query_key_value.{n}" for n in
        ("original.weight", "original.bias", *(f"matrix_{ab}.{k}" for ab in "AB" for k in range(3)))}
    folder = write_sat(tmp_path_factory.mktemp("vglm") / "finetune-visualglm-6b", (sat_model, args), sd)
    _finetune_config(folder, model_class="FineTuneVisualGLMModel", lora_rank=RANK, layer_range=VGLM_LAYERS,
                     use_lora=True, use_qlora=False, use_ptuning=False, pre_seq_len=4)
    return folder


@pytest.fixture(scope="module")
def vglm_converted(vglm_src, tiny_tokenizer_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("vglm_out")
    rc_m, out_m, err_m = convert(vglm_src, base / "merged", tokenizer=tiny_tokenizer_dir)
    assert rc_m == 0, err_m
    rc_a, out_a, err_a = convert(vglm_src, base / "split", "--lora-as-adapter", tokenizer=tiny_tokenizer_dir)
    assert rc_a == 0, err_a
    return {"merged": base / "merged", "base": base / "split", "adapter": base / "split-lora", "stdout": (out_m, out_a)}


def _text_ids(tokenizer):
    return torch.tensor([build_visualglm_inputs(tokenizer, QUERY, has_image=False, num_image_tokens=0)])


@torch.no_grad()
def test_visualglm_lora_merged_and_adapter_equal_sats_lora_forward(vglm_converted, vglm_sat, ours, inputs,
                                                                    tiny_tokenizer):
    sat_model, _ = vglm_sat
    ids = _text_ids(tiny_tokenizer)
    mask, pos = sat_model.get_inputs(ids)
    ref = sat_model(input_ids=ids, position_ids=pos, attention_mask=mask)[0]  # SAT, LoRA unmerged
    merged = _load(VisualGLMForConditionalGeneration, vglm_converted["merged"])
    base = _load(VisualGLMForConditionalGeneration, vglm_converted["base"])
    plain = base(**inputs).logits  # before the adapter is attached: the model before fine-tuning
    assert torch.equal(plain, ours(**inputs).logits)
    adapted = _peft(base, vglm_converted["adapter"])
    errors = {"merged vs SAT": rel_err(merged(input_ids=ids).logits, ref),
              "adapter vs SAT": rel_err(adapted(input_ids=ids).logits, ref),
              "adapter vs merged (image)": rel_err(adapted(**inputs).logits, merged(**inputs).logits)}
    print("VisualGLM LoRA relative logits errors:", errors)
    assert all(e <= TOL for e in errors.values()), errors
    # the LoRA matters: without it the logits are another model's
    assert rel_err(ours(input_ids=ids).logits, ref) > 1e-2
    with adapted.disable_adapter():
        assert torch.equal(adapted(**inputs).logits, plain)


def test_visualglm_merge_equals_sats_merge_lora_bit_for_bit(vglm_converted, vglm_sat, ours):
    from safetensors.torch import load_file

    sat_merged = copy.deepcopy(vglm_sat[0])
    sat_merged.get_mixin("lora").merge_lora()
    sat_sd = sat_merged.state_dict()
    ours_sd = load_file(str(vglm_converted["merged"] / "model.safetensors"))
    heads = ours.config.text_config.num_attention_heads
    for i in VGLM_LAYERS:
        qkv = sat_sd[f"transformer.layers.{i}.attention.query_key_value.weight"]
        assert torch.equal(ours_sd[f"language_model.layers.{i}.attention.query_key_value.weight"],
                           OPS["interleave_qkv_heads"](qkv, num_heads=heads)[0])
        assert torch.equal(ours_sd[f"language_model.layers.{i}.attention.dense.weight"],
                           sat_sd[f"transformer.layers.{i}.attention.dense.weight"])
    assert not torch.equal(ours_sd["language_model.layers.1.attention.dense.weight"],
                           ours.state_dict()["language_model.layers.1.attention.dense.weight"])


def test_visualglm_adapter_folder_is_peft_lora(vglm_converted, ours):
    from safetensors.torch import load_file

    cfg = json.loads((vglm_converted["adapter"] / "adapter_config.json").read_text())
    qkv, dense = (f"language_model.layers.1.attention.{m}" for m in ("query_key_value", "dense"))
    assert cfg["peft_type"] == "LORA" and sorted(cfg["target_modules"]) == [dense, qkv]
    assert (cfg["r"], cfg["lora_alpha"]) == (RANK, 1.0)  # dense: SAT's rank and alpha
    assert cfg["rank_pattern"] == {qkv: 3 * RANK} and cfg["alpha_pattern"] == {qkv: 3.0}  # 3 pairs, scale 1/r
    assert cfg["base_model_name_or_path"] == str(vglm_converted["base"].absolute())
    tensors = load_file(str(vglm_converted["adapter"] / "adapter_model.safetensors"))
    hidden = ours.config.text_config.hidden_size
    assert {k: list(v.shape) for k, v in tensors.items()} == {
        f"base_model.model.{qkv}.lora_A.weight": [3 * RANK, hidden],
        f"base_model.model.{qkv}.lora_B.weight": [3 * hidden, 3 * RANK],
        f"base_model.model.{dense}.lora_A.weight": [RANK, hidden],
        f"base_model.model.{dense}.lora_B.weight": [hidden, RANK]}
    merged_out, split_out = vglm_converted["stdout"]
    assert "sat_lora_merge" in merged_out and "PeftLoraAdapter" in split_out


# --- P-tuning v2 and bad LoRA: clear errors, nothing written ------------------------------------------------

def test_ptuning_prefixes_are_refused_with_what_to_do(vglm_src, vglm_sat, tiny_tokenizer_dir, tmp_path):
    from sat.model.finetune.prompt_tuning import PTuningV2Mixin

    t = vglm_sat[0].transformer
    heads, layers = t.layers[0].attention.num_attention_heads_per_partition, len(t.layers)
    mixin = PTuningV2Mixin(layers, t.hidden_size // heads, heads, 4)  # as FineTuneVisualGLMModel adds it
    prefixes = {f"mixins.ptuning.{k}": v.detach() for k, v in mixin.state_dict().items()}
    assert sorted(prefixes) == [f"mixins.ptuning.prefix.{i}" for i in range(layers)]
    src = edit_sat_copy(vglm_src, tmp_path / "ptuning", lambda sd: sd.update(prefixes))
    for extra in ((), ("--lora-as-adapter",)):
        rc, _, err = convert(src, tmp_path / "out", *extra, tokenizer=tiny_tokenizer_dir)
        assert rc == 1 and "P-tuning v2 prefixes" in err and "visualglm-finetune --method lora" in err, err
        assert_nothing_left(tmp_path / "out")
        assert not (tmp_path / "out-lora").exists()


def _drop(key):
    return lambda sd: sd.pop(key)


@pytest.mark.parametrize("edit, messages", [  # (merged, --lora-as-adapter): each says what is wrong where
    (_drop("transformer.layers.1.attention.query_key_value.matrix_B.2"),
     ("needs ['transformer.layers.1.attention.query_key_value.matrix_B.2']",) * 2),
    (lambda sd: sd.__setitem__("transformer.layers.1.attention.dense.matrix_B.0", torch.zeros(64, 3)),
     ("matrix_B.0 is [64, 3], not [rows, 2] (rank 2 from matrix_A.0)",
      "'base_model.model.language_model.layers.1.attention.dense.lora_B.weight' would be [64, 3]")),
    (lambda sd: sd.__setitem__("transformer.layers.1.attention.dense.matrix_A.1", torch.zeros(2, 64)),
     ("needs ['transformer.layers.1.attention.dense.matrix_B.1']",) * 2),
], ids=["missing-pair", "rank-mismatch", "extra-partition"])
def test_broken_lora_is_listed_and_nothing_is_written(edit, messages, vglm_src, tiny_tokenizer_dir, tmp_path):
    src = edit_sat_copy(vglm_src, tmp_path / "broken", edit)
    for extra, message in zip(((), ("--lora-as-adapter",)), messages):
        rc, _, err = convert(src, tmp_path / "out", *extra, tokenizer=tiny_tokenizer_dir)
        assert rc == 1 and message in err, err
        assert_nothing_left(tmp_path / "out")
        assert not (tmp_path / "out-lora").exists()


def _without_lora(sd):
    """The same weights as a plain (merged-layout) SAT checkpoint: original.* back to the linear's names, no pairs."""
    for key in [k for k in sd if ".matrix_" in k]:
        del sd[key]
    for key in [k for k in sd if ".original." in k]:
        sd[key.replace(".original.", ".")] = sd.pop(key)


def test_adapter_flag_misuse(vglm_src, tiny_tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    rank = edit_sat_copy(vglm_src, tmp_path / "rank", lambda sd: None)
    _finetune_config(rank, lora_rank=RANK + 1)
    rc, _, err = convert(rank, out, tokenizer=tiny_tokenizer_dir)
    assert rc == 1 and f"has rank {RANK} but model_config.json says lora_rank {RANK + 1}" in err, err
    plain = edit_sat_copy(vglm_src, tmp_path / "plain", _without_lora)
    rc, _, err = convert(plain, out, "--lora-as-adapter", tokenizer=tiny_tokenizer_dir)
    assert rc == 1 and "has no LoRA" in err and "convert it without the flag" in err, err
    foreign = tmp_path / "mine"  # an existing folder this tool did not write
    foreign.mkdir()
    rc, _, err = convert(vglm_src, out, "--lora-as-adapter", foreign, "--force", tokenizer=tiny_tokenizer_dir)
    assert rc == 2 and str(foreign) in err, err
    rc, _, err = convert(vglm_src, out, "--lora-as-adapter", vglm_src / "x", tokenizer=tiny_tokenizer_dir)
    assert rc == 2 and "never written to" in err, err
    rc, _, err = convert(vglm_src, out, "--lora-as-adapter", fmt="hf-visualglm")
    assert rc == 2 and "does not take --lora-as-adapter" in err, err
    assert_nothing_left(out)
    assert not (tmp_path / "out-lora").exists() and list(foreign.iterdir()) == []


# --- CogVLM: SAT's LoraLinear on the language-expert attention and the ViT attention ------------------------

VIT_LAYERS = [1]


@pytest.fixture(scope="module")
def cog_inputs(models, tokenizer):
    return cogvlm_inputs(models, tokenizer)


def _lora_sites(model):
    """(SAT module name, our parent module, attribute, SAT partition) of every linear CogVLM's fine-tune wraps:
    LoraMixin's ``transformer.layers[i].attention.{query_key_value,dense}`` on the LM (the language expert) and on
    the ViT (``mixins.eva.vit_model``); the qkv partition is the attention's ``stride`` (3, or [heads, kv, kv])."""
    t = model.config.text_config
    qkv_parts = 3 if t.num_key_value_heads == t.num_attention_heads else [
        t.num_attention_heads, t.num_key_value_heads, t.num_key_value_heads]
    for i, layer in enumerate(model.language_model.layers):
        yield f"transformer.layers.{i}.attention.query_key_value", layer.self_attn, "language_expert_query_key_value", \
            qkv_parts
        yield f"transformer.layers.{i}.attention.dense", layer.self_attn, "language_expert_dense", 1
    for i in VIT_LAYERS:
        attention = model.vision_model.layers[i].attention
        yield f"mixins.eva.vit_model.transformer.layers.{i}.attention.query_key_value", attention, "query_key_value", 3
        yield f"mixins.eva.vit_model.transformer.layers.{i}.attention.dense", attention, "dense", 1


@pytest.fixture(scope="module")
def cog_lora(models, tmp_path_factory):
    """Per version: a SAT checkpoint whose LoRA'd linears are SAT ``LoraLinear`` state dicts, and the reference: our
    base model with those very ``LoraLinear`` modules in place of the linears (SAT's LoRA forward)."""
    from sat_reference import import_sat

    import_sat()
    from sat.model.finetune.lora2 import LoraLinear

    out = {}
    for seed, (version, model) in enumerate(models.items()):
        sd, reference = cogvlm_to_sat(model), copy.deepcopy(model)
        for n, (sat_name, parent, attr, parts) in enumerate(_lora_sites(reference)):
            linear = getattr(parent, attr)
            lora = LoraLinear(nn.Linear, parts, linear.in_features, linear.out_features, RANK, 1.0, 0.0,
                              original_obj=linear)
            _randomize_pairs(lora, seed=100 * seed + n)
            for wb in ("weight", "bias"):
                sd.pop(f"{sat_name}.{wb}", None)
            sd.update({f"{sat_name}.{k}": v.detach().clone() for k, v in lora.state_dict().items()})
            setattr(parent, attr, lora.eval())
        folder = tmp_path_factory.mktemp(version) / "finetune-cogvlm"
        (folder / "1").mkdir(parents=True)
        (folder / "latest").write_text("1")
        torch.save({"module": sd}, folder / "1" / "mp_rank_00_model_states.pt")
        cfg = cogvlm_sat_config(model.config) | {"model_class": "FineTuneTrainCogVLMModel", "lora_rank": RANK,
                                                 "use_lora": True}
        (folder / "model_config.json").write_text(json.dumps(cfg, indent=2))
        out[version] = (folder, reference.eval())
    return out


@pytest.mark.parametrize("version", ["cogvlm", "cogvlm2"])
@torch.no_grad()
def test_cogvlm_lora_merged_and_adapter_equal_sats_lora_forward(version, cog_lora, models, cog_inputs, tok_dir,
                                                                 tmp_path):
    src, reference = cog_lora[version]
    inputs = cog_inputs[version]
    rc, stdout, err = convert(src, tmp_path / "merged", fmt="sat-cogvlm", tokenizer=tok_dir)
    assert rc == 0 and "sat_lora_merge" in stdout, err
    rc, stdout, err = convert(src, tmp_path / "split", "--lora-as-adapter", fmt="sat-cogvlm", tokenizer=tok_dir)
    assert rc == 0 and "PeftLoraAdapter" in stdout, err
    ref = reference(**inputs).logits
    merged = _load(CogVLMForConditionalGeneration, tmp_path / "merged")
    base = _load(CogVLMForConditionalGeneration, tmp_path / "split")
    plain = base(**inputs).logits
    assert torch.equal(plain, models[version](**inputs).logits)  # the base folder is the model before fine-tuning
    adapted = _peft(base, tmp_path / "split-lora")
    errors = {"merged vs SAT": rel_err(merged(**inputs).logits, ref),
              "adapter vs SAT": rel_err(adapted(**inputs).logits, ref)}
    print(f"{version} LoRA relative logits errors:", errors)
    assert all(e <= TOL for e in errors.values()), errors
    assert rel_err(plain, ref) > 1e-2  # the LoRA matters
    cfg = json.loads((tmp_path / "split-lora" / "adapter_config.json").read_text())
    assert len(cfg["target_modules"]) == 2 * len(models[version].language_model.layers) + 2 * len(VIT_LAYERS)
