"""``--format fastchat-delta``: Vicuna = LLaMA base + FastChat delta, into a plain transformers Llama folder.

Tiny seeded LLaMA bases and deltas (every tensor random, norms too; float16 like the releases) are written
in the layouts the real files come in (safetensors single/sharded, ``.bin`` single/sharded + index, old
``rotary_emb.inv_freq`` buffers), then converted and compared bit for bit with

- v1.1: FastChat's own ``fastchat.model.apply_delta.apply_delta`` (``fschat`` 0.2.36 from PyPI, installed
  with ``--no-deps``; it imports and runs on transformers 5.23), called on the same folders;
- v0: the v0.1.10 algorithm (lm-sys/FastChat@f34f28ce ``fastchat/model/apply_delta.py``) re-enacted with
  transformers objects: base tokenizer + ``[PAD]``, ``resize_token_embeddings``, zero the new rows of
  ``embed_tokens`` and ``lm_head``, then ``param.data += delta`` in float16.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_llama_tokenizer import SHAPE_TEXT, TOKENIZER_SHAPES, sentencepiece_ids, write_tokenizer_shape

from helpers import assert_conversion_failed, convert_in_process, load_safetensors_folder
from modeling_visualglm.conversion.cli import main as convert_main
from test_conversion_llama import VOCAB, train_llama_spm  # the same tiny LLaMA-like tokenizer

ARCH = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-6, max_position_embeddings=2048)


def convert(base: Path, delta: Path, out: Path, capsys, *extra) -> tuple[int, str, str]:
    return convert_in_process(["--format", "fastchat-delta", "--base", base, "--delta", delta, "--out", out, *extra],
                              capsys)


def llama_state_dict(vocab: int, seed: int, scale: float, arch=ARCH) -> dict:
    """HF-named LLaMA tensors, all random float16 (shapes from LlamaForCausalLM on the meta device)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **arch)).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g) * scale).half() for k, s in shapes.items()}


def config_json(vocab: int, **extra) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "vocab_size": vocab,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16", **ARCH, **extra}


def write_weights(folder: Path, sd: dict, layout: str):
    """``layout``: st (model.safetensors), st-shards, bin (pytorch_model.bin), bin-shards (+ index, as lmsys)."""
    folder.mkdir(parents=True, exist_ok=True)
    if layout in ("st", "bin"):
        name = "model.safetensors" if layout == "st" else "pytorch_model.bin"
        save_file(sd, folder / name) if layout == "st" else torch.save(sd, folder / name)
        return
    keys = list(sd)
    parts = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    ext, index = (".safetensors", "model.safetensors.index.json") if layout == "st-shards" else (
        ".bin", "pytorch_model.bin.index.json")
    stem = "model" if ext == ".safetensors" else "pytorch_model"
    weight_map = {}
    for i, part in enumerate(parts):
        fname = f"{stem}-{i + 1:05d}-of-{len(parts):05d}{ext}"
        chunk = {k: sd[k] for k in part}
        save_file(chunk, folder / fname) if ext == ".safetensors" else torch.save(chunk, folder / fname)
        weight_map.update({k: fname for k in part})
    (folder / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory) -> Path:
    """A LLaMA-like SentencePiece BPE model plus the transformers tokenizer files made from it."""
    from modeling_visualglm.conversion.formats.llama import llama_tokenizer

    folder = tmp_path_factory.mktemp("vicuna_spm")
    train_llama_spm(folder)
    llama_tokenizer(folder / "tokenizer.model", []).save(folder)  # tokenizer.json: what transformers 5 loads
    return folder


def write_model(folder: Path, sd: dict, layout: str, spm_dir: Path, cfg: dict | None) -> Path:
    write_weights(folder, sd, layout)
    if cfg is not None:
        (folder / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(spm_dir / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def models(tmp_path_factory, spm_dir) -> dict:
    root = tmp_path_factory.mktemp("vicuna")
    base_sd = llama_state_dict(VOCAB, seed=0, scale=1.0)
    delta_sd = llama_state_dict(VOCAB, seed=1, scale=0.05)
    delta_v0_sd = llama_state_dict(VOCAB + 1, seed=2, scale=0.05)  # FastChat v0.1.10: one [PAD] row more
    m = {"base_sd": base_sd, "delta_sd": delta_sd, "delta_v0_sd": delta_v0_sd}
    for layout in ("st", "bin", "st-shards", "bin-shards"):
        m["base", layout] = write_model(root / f"base-{layout}", base_sd, layout, spm_dir, config_json(VOCAB))
        m["delta", layout] = write_model(root / f"delta-{layout}", delta_sd, layout, spm_dir, config_json(VOCAB))
    m["delta-v0"] = write_model(root / "delta-v0", delta_v0_sd, "bin-shards", spm_dir, config_json(VOCAB + 1))
    return m


def assert_bit_equal(ours: dict, ref: dict):
    assert set(ours) == set(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype == torch.float16, k
        assert torch.equal(ours[k].view(torch.int16), ref[k].view(torch.int16)), f"{k} differs"


# --- parity -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base_layout, delta_layout", [("st", "bin-shards"), ("bin", "st-shards"), ("bin-shards", "bin")])
def test_v1_1_equals_fastchat_apply_delta(base_layout, delta_layout, models, tmp_path, capsys):
    from fastchat.model.apply_delta import apply_delta
    from transformers import AutoConfig

    base, delta = models["base", base_layout], models["delta", delta_layout]
    apply_delta(str(base), str(tmp_path / "fastchat"), str(delta))  # FastChat 0.2.36's normal path
    capsys.readouterr()
    rc, out, err = convert(base, delta, tmp_path / "ours", capsys)
    assert rc == 0, err
    ref = load_safetensors_folder(tmp_path / "fastchat")
    assert_bit_equal(load_safetensors_folder(tmp_path / "ours"), ref)
    # not trivially equal: the sum moved every tensor away from the base
    assert not torch.equal(ref["model.norm.weight"], models["base_sd"]["model.norm.weight"])
    a, b = AutoConfig.from_pretrained(tmp_path / "ours"), AutoConfig.from_pretrained(tmp_path / "fastchat")
    for key in ("vocab_size", *ARCH, "bos_token_id", "eos_token_id", "tie_word_embeddings"):
        assert getattr(a, key) == getattr(b, key), key
    assert "sum computed in the delta dtype (FastChat: float16)" in out


def v0_1_10_apply_delta(base_path: Path, delta_path: Path) -> dict:
    """FastChat v0.1.10's ``apply_delta`` (lm-sys/FastChat@f34f28ce), step by step on transformers 5 objects."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float16)
    delta = AutoModelForCausalLM.from_pretrained(delta_path, dtype=torch.float16)
    base_tokenizer = AutoTokenizer.from_pretrained(base_path)
    num_new_tokens = base_tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    assert num_new_tokens == 1
    base.resize_token_embeddings(len(base_tokenizer))
    base.get_input_embeddings().weight.data[-num_new_tokens:] = 0
    base.get_output_embeddings().weight.data[-num_new_tokens:] = 0
    delta_sd = delta.state_dict()
    for name, param in base.state_dict().items():
        assert name in delta_sd
        param.data += delta_sd[name]
    return {k: v.contiguous() for k, v in base.state_dict().items()}


def test_v0_equals_fastchat_0_1_10(models, tmp_path, capsys):
    rc, out, err = convert(models["base", "st"], models["delta-v0"], tmp_path / "ours", capsys)
    assert rc == 0, err
    ours = load_safetensors_folder(tmp_path / "ours")
    ref = v0_1_10_apply_delta(models["base", "st"], models["delta-v0"])
    assert_bit_equal(ours, ref)
    assert ours["model.embed_tokens.weight"].shape[0] == ours["lm_head.weight"].shape[0] == VOCAB + 1
    # the [PAD] row is the delta's row exactly (base row zero)
    assert torch.equal(ours["lm_head.weight"][VOCAB], models["delta_v0_sd"]["lm_head.weight"][VOCAB])
    assert "base 400 rows zero-padded to the delta's 401 before the add (Vicuna v0" in out
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(tmp_path / "ours").vocab_size == VOCAB + 1
    assert len(AutoTokenizer.from_pretrained(tmp_path / "ours")) == VOCAB  # the delta's tokenizer, as v0.1.10 saved


def test_fastchat_0_2_36_cannot_apply_a_v0_delta(models, tmp_path):
    """Why the padding exists: current FastChat's plain add fails on Vicuna v0 (FastChat#486)."""
    from fastchat.model.apply_delta import apply_delta

    with pytest.raises(Exception, match="401|size"):
        apply_delta(str(models["base", "st"]), str(tmp_path / "t"), str(models["delta-v0"]))


def test_float32_sum_is_exact(models, tmp_path, capsys):
    rc, _, err = convert(models["base", "st"], models["delta", "bin"], tmp_path / "o", capsys, "--dtype", "float32")
    assert rc == 0, err
    ours = load_safetensors_folder(tmp_path / "o")
    base, delta = models["base_sd"], models["delta_sd"]
    fp16_differs = False
    for k, v in ours.items():
        assert v.dtype == torch.float32
        assert torch.equal(v, base[k].float() + delta[k].float()), k
        fp16_differs |= not torch.equal(v.half().float(), v)
    assert fp16_differs  # the float32 path really is another computation than FastChat's float16 one


# --- repairs ----------------------------------------------------------------------------------------------

def test_early_conversion_quirks_are_repaired(models, spm_dir, tmp_path, capsys):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    base = shutil.copytree(models["base", "bin"], tmp_path / "base")
    sd = dict(models["base_sd"])
    for i in range(ARCH["num_hidden_layers"]):  # transformers < 4.31 saved the rotary buffer
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    torch.save(sd, base / "pytorch_model.bin")
    cfg = config_json(VOCAB, architectures=["LLaMAForCausalLM"], bos_token_id=0, eos_token_id=1, pad_token_id=-1,
                      max_sequence_length=2048)
    cfg.pop("max_position_embeddings")
    (base / "config.json").write_text(json.dumps(cfg))
    delta = shutil.copytree(models["delta", "bin-shards"], tmp_path / "delta")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (delta / name).unlink()
    (delta / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LLaMATokenizer", "bos_token": "",
                                                             "eos_token": "", "unk_token": ""}))
    (delta / "special_tokens_map.json").write_text(json.dumps({"bos_token": "", "eos_token": "", "unk_token": ""}))
    (delta / "config.json").write_text(json.dumps(cfg))

    rc, out, err = convert(base, delta, tmp_path / "o", capsys)
    assert rc == 0, err
    for needle in ("says LLaMATokenizer (transformers#22222): written as LlamaTokenizer",
                   "bos_token was '': set to '<s>'", "eos_token was '': set to '</s>'",
                   "says LLaMAForCausalLM (early HF conversion)", "bos 0 / eos 1 / pad -1",
                   "rotary_emb.inv_freq  →  (dropped"):
        assert needle in out, needle
    folder = tmp_path / "o"
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "LlamaTokenizer"
    tok = AutoTokenizer.from_pretrained(folder)
    assert (tok.unk_token, tok.bos_token, tok.eos_token) == ("<unk>", "<s>", "</s>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok("the cat").input_ids[0] == 1
    cfg_out = AutoConfig.from_pretrained(folder)
    assert (cfg_out.bos_token_id, cfg_out.eos_token_id, cfg_out.pad_token_id) == (1, 2, None)
    assert cfg_out.architectures == ["LlamaForCausalLM"] and cfg_out.max_position_embeddings == 2048
    gen = GenerationConfig.from_pretrained(folder)
    assert (gen.bos_token_id, gen.eos_token_id) == (1, 2)
    ours = load_safetensors_folder(folder)
    assert not any("inv_freq" in k for k in ours)
    assert torch.equal(ours["model.norm.weight"], models["base_sd"]["model.norm.weight"] + models["delta_sd"]["model.norm.weight"])


@pytest.mark.parametrize("shape", TOKENIZER_SHAPES)
def test_delta_tokenizer_shapes(shape, models, spm_dir, tmp_path, capsys):
    """The delta's tokenizer folder as users have it (lmsys deltas: tokenizer.model + tokenizer_config.json only;
    tokenizer.json only; both): the converted folder's tokenizer gives SentencePiece's ids, BOS first."""
    from transformers import AutoTokenizer

    delta = shutil.copytree(models["delta", "st"], tmp_path / "delta", ignore=shutil.ignore_patterns("tokenizer*"))
    write_tokenizer_shape(spm_dir / "tokenizer.model", delta, shape)
    rc, out, err = convert(models["base", "st"], delta, tmp_path / "o", capsys)
    assert rc == 0, err
    assert f"tokenizer {delta}/" in out  # the delta's, ahead of the base's
    tok = AutoTokenizer.from_pretrained(tmp_path / "o")
    assert tok(SHAPE_TEXT).input_ids == sentencepiece_ids(spm_dir / "tokenizer.model")


# --- bad input --------------------------------------------------------------------------------------------

def test_delta_of_another_model(models, spm_dir, tmp_path, capsys):
    arch = dict(ARCH, hidden_size=80, num_attention_heads=5, num_key_value_heads=5)
    other = llama_state_dict(VOCAB, seed=3, scale=0.05, arch=arch)
    delta = write_model(tmp_path / "delta", other, "bin-shards", spm_dir, config_json(VOCAB, **arch))
    rc, _, err = convert(models["base", "st"], delta, tmp_path / "o", capsys)
    assert_conversion_failed(rc, err, tmp_path / "o", "is for a different model than the base",
                   "hidden_size: base 64, delta 80", "num_attention_heads: base 4, delta 5")
    # without a config.json the tensor shapes tell
    (delta / "config.json").unlink()
    rc, _, err = convert(models["base", "st"], delta, tmp_path / "o", capsys)
    assert_conversion_failed(rc, err, tmp_path / "o", "add_delta cannot convert ['base.model.layers.0.self_attn.q_proj.weight', "
                   "'delta.model.layers.0.self_attn.q_proj.weight'] [[64, 64], [80, 80]]", "the shapes must be equal",
                   "only the vocabulary rows of embed_tokens/lm_head may differ")


def _edited_delta(models, spm_dir, tmp_path, edit) -> Path:
    sd = dict(models["delta_sd"])
    edit(sd)
    return write_model(tmp_path / "delta", sd, "st", spm_dir, None)


@pytest.mark.parametrize("edit, needles", [
    (lambda sd: sd.update({"model.embed_tokens.weight": sd["model.embed_tokens.weight"][:-1].clone()}),
     ["the delta's embed_tokens has 399 rows, fewer than the base's 400"]),
    (lambda sd: sd.update({"lm_head.weight": sd["lm_head.weight"][:-1].clone()}),
     ["base [400, 64] vs delta [399, 64]: the delta has fewer rows than the base"]),
    (lambda sd: sd.update({"lm_head.weight": torch.zeros(401, 65, dtype=torch.float16)}),
     ["base [400, 64] vs delta [401, 65]: only the vocabulary rows of embed_tokens/lm_head may differ"]),
    (lambda sd: sd.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(173, 64, dtype=torch.float16)}),
     ["[[172, 64], [173, 64]]", "the shapes must be equal"]),
    (lambda sd: sd.pop("model.layers.1.self_attn.v_proj.weight"),
     ["needs ['delta.model.layers.1.self_attn.v_proj.weight'] together with "
      "['base.model.layers.1.self_attn.v_proj.weight']"]),
    (lambda sd: sd.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64, dtype=torch.float16)}),
     ["unexpected source tensor 'delta.model.layers.0.self_attn.q_proj.bias'"]),
])
def test_mismatched_delta_tensors(edit, needles, models, spm_dir, tmp_path, capsys):
    delta = _edited_delta(models, spm_dir, tmp_path, edit)
    rc, _, err = convert(models["base", "st"], delta, tmp_path / "o", capsys)
    assert_conversion_failed(rc, err, tmp_path / "o", *needles)


def test_not_a_llama_and_unreadable_inputs(models, spm_dir, tmp_path, capsys):
    base = shutil.copytree(models["base", "st"], tmp_path / "base")
    (base / "config.json").write_text(json.dumps({**config_json(VOCAB), "model_type": "gpt2"}))
    rc, _, err = convert(base, models["delta", "st"], tmp_path / "o", capsys)
    assert_conversion_failed(rc, err, tmp_path / "o", "base config.json: model_type 'gpt2', not 'llama'")

    delta = shutil.copytree(models["delta", "bin-shards"], tmp_path / "delta")
    shard = delta / "pytorch_model-00002-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    rc, _, err = convert(models["base", "st"], delta, tmp_path / "o", capsys)
    assert_conversion_failed(rc, err, tmp_path / "o", "pytorch_model-00002-of-00002.bin: truncated or corrupt")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(config_json(VOCAB)))
    rc, _, err = convert(models["base", "st"], empty, tmp_path / "o", capsys)
    assert_conversion_failed(rc, err, tmp_path / "o", "no transformers weights")

    rc = convert_main(["--format", "fastchat-delta", "--base", str(models["base", "st"]), "--out", str(tmp_path / "o")])
    assert rc == 2 and "needs --delta" in capsys.readouterr().err
