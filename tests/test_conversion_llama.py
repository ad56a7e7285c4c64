"""``--format llama-original``: Meta's ``consolidated.NN.pth`` shards → a plain transformers Llama folder.

Tiny seeded LLaMA checkpoints in Meta's layout are built here by an independent split of a full random
state dict (fairscale: column-parallel rows, row-parallel columns, embedding columns, replicated norms),
then converted. Checked against:

- transformers 4.45.2's ``convert_llama_weights_to_hf.py`` (the last wheel that ships it), run from a side
  install (``--no-deps --target``, cached under ``tmp/``; PyPI needed once): every tensor bit-equal in the
  script's dtype (bfloat16), config and tokenizer ids equal;
- a re-derivation of Meta's forward pass (``llama/model.py``: complex rotary on interleaved pairs,
  ``repeat_kv``) against transformers' ``LlamaForCausalLM`` on our folder: float32 logits within 1e-4;
- the 1-shard conversion of the same model (sharding invariance) and SentencePiece's own ids.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tiny_llama_tokenizer import TOKENIZER_SHAPES, sentencepiece_ids, write_tokenizer_shape

from helpers import assert_conversion_failed, convert_in_process, load_safetensors_folder
from modeling_visualglm.conversion.cli import main as convert_main
from modeling_visualglm.conversion.ops import concat_mp_shards, replicated, rope_permute

REPO = Path(__file__).resolve().parents[1]

PRESETS = {
    # LLaMA-1 style: MHA, fp16 files with rope.freqs, norm_eps 1e-6 (→ 2048 positions)
    "llama1": dict(params=dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, norm_eps=1e-6, vocab_size=-1),
                   intermediate=192,  # int(8·64/3)=170 → next multiple of 32
                   dtype=torch.float16, rope_freqs=True, version="1"),
    # Llama-2 style: GQA (2 kv heads), ffn_dim_multiplier, bf16 files, norm_eps 1e-5 (→ 4096 positions)
    "llama2": dict(params=dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=1.3,
                               norm_eps=1e-5, vocab_size=-1),
                   intermediate=224,  # int(1.3·170)=221 → next multiple of 32
                   dtype=torch.bfloat16, rope_freqs=False, version="2"),
}
VOCAB = 400
COLUMN_PARALLEL = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
ROW_PARALLEL = ("attention.wo", "feed_forward.w2")
TEXTS = ["the cat sat on the mat", "Question: what is this? Answer: a red box.", "hello  world\n  USER: hi",
         "ünïcödé 你好 [[012,345]]"]


def convert(src: Path, out: Path, capsys, *extra) -> tuple[int, str, str]:
    return convert_in_process(["--format", "llama-original", "--src", src, "--out", out, *extra], capsys)


# --- tiny Meta checkpoints ------------------------------------------------------------------------------

def meta_full(preset: dict, seed: int = 0) -> dict:
    """A full (unsplit) Meta state dict, every tensor random (norm weights too, of both signs)."""
    p = preset["params"]
    g = torch.Generator().manual_seed(seed)
    dim, nh = p["dim"], p["n_heads"]
    hd, nkv, inter = dim // nh, p.get("n_kv_heads", nh), preset["intermediate"]

    def rnd(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    sd = {"tok_embeddings.weight": rnd(VOCAB, dim, scale=1.0), "norm.weight": rnd(dim, scale=1.0),
          "output.weight": rnd(VOCAB, dim)}
    for i in range(p["n_layers"]):
        sd.update({
            f"layers.{i}.attention.wq.weight": rnd(nh * hd, dim, scale=0.3),
            f"layers.{i}.attention.wk.weight": rnd(nkv * hd, dim, scale=0.3),
            f"layers.{i}.attention.wv.weight": rnd(nkv * hd, dim),
            f"layers.{i}.attention.wo.weight": rnd(dim, nh * hd),
            f"layers.{i}.feed_forward.w1.weight": rnd(inter, dim),
            f"layers.{i}.feed_forward.w2.weight": rnd(dim, inter),
            f"layers.{i}.feed_forward.w3.weight": rnd(inter, dim),
            f"layers.{i}.attention_norm.weight": rnd(dim, scale=1.0),
            f"layers.{i}.ffn_norm.weight": rnd(dim, scale=1.0),
        })
    if preset["rope_freqs"]:
        sd["rope.freqs"] = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    return {k: v.to(preset["dtype"]) if k != "rope.freqs" else v for k, v in sd.items()}


def meta_split(full: dict, n: int) -> list[dict]:
    """fairscale's model-parallel split of ``full`` into ``n`` rank state dicts (each tensor its own storage)."""
    ranks = [{} for _ in range(n)]
    for k, v in full.items():
        if any(f".{name}." in f".{k}" for name in COLUMN_PARALLEL) or k == "output.weight":
            pieces = v.chunk(n, dim=0)
        elif any(f".{name}." in f".{k}" for name in ROW_PARALLEL) or k == "tok_embeddings.weight":
            pieces = v.chunk(n, dim=1)  # RowParallelLinear columns; ParallelEmbedding splits the embedding dim
        else:  # norms, rope.freqs: every rank holds a copy
            pieces = [v] * n
        for r in range(n):
            ranks[r][k] = pieces[r].clone()
    return ranks


def write_meta(folder: Path, preset: dict, full: dict, n: int, spm_file: Path | None, params_edit=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for r, sd in enumerate(meta_split(full, n)):
        torch.save(sd, folder / f"consolidated.{r:02d}.pth")
    params = dict(preset["params"])
    if params_edit:
        params_edit(params)
    (folder / "params.json").write_text(json.dumps(params))
    if spm_file is not None:
        shutil.copy(spm_file, folder / "tokenizer.model")
    return folder


def corpus() -> list[str]:
    """A small English corpus for a tiny SentencePiece model (ids 0-2 = <unk> <s> </s>, like LLaMA's)."""
    words = ("the a cat dog sat on mat picture of what is this there red blue box person car tree sky left right "
             "question answer short user assistant chat hello hi image describe color many how where which").split()
    out = []
    for i, (a, b, c) in enumerate(itertools.product(words[:12], words[8:20], words[16:])):
        out.append([f"Question: {a} {b} {c}? Answer: {c} {a}.", f"USER: {a} {b} ASSISTANT: {c} [[012,345]]",
                    f"{a} {b} {c}, {c} {b}!"][i % 3])
    return out


def train_llama_spm(folder: Path) -> Path:
    """A LLaMA-like SentencePiece BPE model in ``folder``: byte fallback, identity normalizer, whitespace kept,
    ids 0-2 specials (also the Vicuna tokenizer of test_conversion_fastchat)."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_prefix=str(folder / "tokenizer"), vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
    )
    return folder / "tokenizer.model"


@pytest.fixture(scope="session")
def spm_file(tmp_path_factory) -> Path:
    return train_llama_spm(tmp_path_factory.mktemp("llama_spm"))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, spm_file) -> dict:
    root = tmp_path_factory.mktemp("meta")
    out = {}
    for name, preset in PRESETS.items():
        full = meta_full(preset, seed=len(name))
        out[name] = {
            "full": full,
            2: write_meta(root / f"{name}-mp2", preset, full, 2, spm_file),
            1: write_meta(root / f"{name}-mp1", preset, full, 1, spm_file),
        }
    return out


@pytest.fixture(scope="session")
def converted(tmp_path_factory, checkpoints) -> dict:
    """Our conversion of each checkpoint (keep dtype), 2 shards and 1 shard."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name in PRESETS:
        for n in (2, 1):
            folder = root / f"{name}-mp{n}"
            rc = convert_main(["--format", "llama-original", "--src", str(checkpoints[name][n]), "--out", str(folder),
                               "--no-progress"])
            assert rc == 0
            out[name, n] = folder
    return out


# --- ops ------------------------------------------------------------------------------------------------

def test_rope_permute_against_per_row_construction():
    nh, hd, cols = 3, 6, 5
    w = torch.randn(nh * hd, cols)
    # transformers' rotate_half pairs row j with j + hd/2; Meta pairs rows 2j and 2j+1 of each head
    expected = torch.empty_like(w)
    for h in range(nh):
        for j in range(hd // 2):
            expected[h * hd + j] = w[h * hd + 2 * j]
            expected[h * hd + hd // 2 + j] = w[h * hd + 2 * j + 1]
    (out,) = rope_permute(w, num_heads=nh)
    assert torch.equal(out, expected)
    (meta,) = rope_permute(torch.empty(nh * hd, cols, device="meta"), num_heads=nh)
    assert meta.shape == w.shape
    with pytest.raises(ValueError, match="heads"):
        rope_permute(torch.zeros(10, 2), num_heads=3)


def test_concat_mp_shards_and_replicated():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.equal(concat_mp_shards(a, b, dim=1)[0], torch.cat([a, b], 1))
    assert concat_mp_shards(a, dim=0)[0] is a  # one rank: no copy
    (qk,) = concat_mp_shards(a, b, dim=0, rope_heads=2)
    assert torch.equal(qk, rope_permute(torch.cat([a, b]), num_heads=2)[0])
    with pytest.raises(ValueError, match="except along dim 0"):
        concat_mp_shards(a, torch.randn(4, 2), dim=0)
    assert replicated(a, a.clone())[0] is a
    with pytest.raises(ValueError, match="different checkpoints"):
        replicated(a, b)


# --- the reference converter (transformers 4.45.2) ------------------------------------------------------

def _protobuf_requirement() -> str:
    """transformers 4.45 reads the SentencePiece proto through sentencepiece's own generated module, which
    demands a protobuf runtime of the major version it was generated with."""
    import sentencepiece

    pb2 = Path(sentencepiece.__file__).parent / "sentencepiece_model_pb2.py"
    m = re.search(r"Protobuf Python Version: (\d+)\.(\d+)\.(\d+)", pb2.read_text()) if pb2.is_file() else None
    return f"protobuf>={m.group(1)}.{m.group(2)}.{m.group(3)},<{int(m.group(1)) + 1}" if m else "protobuf"


REF_PINS = ("transformers==4.45.2", "tokenizers==0.20.3", "huggingface_hub==0.25.2")
REF_DIR = Path(os.environ.get("LLAMA_REF_TRANSFORMERS_DIR", REPO / "tmp" / "ref-transformers-4.45.2"))


def reference_transformers() -> Path:
    """A ``--target`` folder with transformers 4.45.2 (+ its tokenizers, huggingface_hub < 1, protobuf), put
    first on PYTHONPATH of the main venv's interpreter (torch, safetensors, sentencepiece, accelerate come
    from there). Built once (about 10 s from PyPI), then reused."""
    pins = (*REF_PINS, _protobuf_requirement())
    marker = REF_DIR / ".installed"
    if marker.is_file() and marker.read_text() == "\n".join(pins):
        return REF_DIR
    REF_DIR.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ref-transformers-", dir=REF_DIR.parent))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                        "--target", str(staging), *pins], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        msg = f"cannot install the reference converter ({' '.join(pins)}): {r.stderr.strip()[-800:]}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg + " (CI unset: skipped; set CI=1 to make this a failure)")
    (staging / ".installed").write_text("\n".join(pins))
    if REF_DIR.exists():
        shutil.rmtree(REF_DIR)
    os.rename(staging, REF_DIR)
    return REF_DIR


REFERENCE_RUN = r"""
import json, runpy, sys
src, out, shards, version = sys.argv[1:5]
texts = json.loads(sys.argv[5])
sys.argv = ["convert_llama_weights_to_hf.py", "--input_dir", src, "--output_dir", out, "--num_shards", shards,
            "--llama_version", version]
runpy.run_module("transformers.models.llama.convert_llama_weights_to_hf", run_name="__main__")
import transformers
from transformers import AutoTokenizer, LlamaTokenizer
assert transformers.__version__ == "4.45.2", transformers.__version__
saved = AutoTokenizer.from_pretrained(out)
slow = LlamaTokenizer(src + "/tokenizer.model")
json.dump({"version": transformers.__version__, "saved": [saved(t).input_ids for t in texts],
           "slow": [slow(t).input_ids for t in texts]}, open(out + "/reference_ids.json", "w"))
"""


@pytest.fixture(scope="session")
def references(tmp_path_factory, checkpoints) -> dict:
    side = reference_transformers()
    root = tmp_path_factory.mktemp("reference")
    env = {**os.environ, "PYTHONPATH": str(side), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    procs = {}
    for name, preset in PRESETS.items():
        out = root / name
        procs[name] = (out, subprocess.Popen(
            [sys.executable, "-c", REFERENCE_RUN, str(checkpoints[name][2]), str(out), "2", preset["version"],
             json.dumps(TEXTS)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    result = {}
    for name, (out, proc) in procs.items():
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"transformers 4.45.2 convert_llama_weights_to_hf.py failed:\n{log[-3000:]}"
        result[name] = out
    return result


@pytest.mark.parametrize("name", list(PRESETS))
def test_equals_transformers_4_45_converter_bit_for_bit(name, checkpoints, references, tmp_path, capsys):
    ref_dir = references[name]
    ref = load_safetensors_folder(ref_dir)
    assert {v.dtype for v in ref.values()} == {torch.bfloat16}  # the script always saves bfloat16
    # compare in the reference's dtype: the fp16 preset converted with --dtype bfloat16, the bf16 one kept
    extra = ["--dtype", "bfloat16"] if PRESETS[name]["dtype"] != torch.bfloat16 else []
    rc, _, err = convert(checkpoints[name][2], tmp_path / "ours", capsys, *extra)
    assert rc == 0, err
    ours = load_safetensors_folder(tmp_path / "ours")
    assert set(ours) == set(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, k
        assert torch.equal(ours[k].view(torch.int16), ref[k].view(torch.int16)), f"{k} differs"

    from transformers import AutoConfig

    a, b = AutoConfig.from_pretrained(tmp_path / "ours"), AutoConfig.from_pretrained(ref_dir)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "bos_token_id", "eos_token_id",
                "tie_word_embeddings", "hidden_act"):
        assert getattr(a, key) == getattr(b, key), key
    assert a.rope_parameters["rope_theta"] == b.rope_parameters["rope_theta"]
    assert a.intermediate_size == PRESETS[name]["intermediate"]

    ref_ids = json.loads((ref_dir / "reference_ids.json").read_text())
    assert ref_ids["version"] == "4.45.2"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "ours")
    # the script's own tokenizer (LlamaTokenizerFast(path), legacy) loses SentencePiece's dummy prefix on the
    # first word in 4.45.2 (its slow→fast conversion gets add_prefix_space=None and skips the Prepend), so
    # ours is held to 4.45.2's slow LlamaTokenizer, which agrees with SentencePiece
    assert [tok(t).input_ids for t in TEXTS] == ref_ids["slow"]


# --- independent checks (no reference install needed) ---------------------------------------------------

def meta_forward(sd: dict, params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Meta's LLaMA forward (llama/model.py), re-derived: rotary on interleaved pairs as complex numbers."""
    sd = {k: v.float() for k, v in sd.items()}
    dim, nh = params["dim"], params["n_heads"]
    nkv, hd, eps = params.get("n_kv_heads", nh), dim // nh, params["norm_eps"]
    B, T = tokens.shape
    freqs = 1.0 / (params.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    angles = torch.outer(torch.arange(T).float(), freqs)
    cis = torch.polar(torch.ones_like(angles), angles)  # (T, hd/2)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rotary(x):  # (B, T, h, hd): pairs (x0, x1), (x2, x3), … rotated as complex numbers
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * cis[None, :, None, :]).flatten(3)

    h = sd["tok_embeddings.weight"][tokens]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = rms(h, sd[p + "attention_norm.weight"])
        q = rotary((x @ sd[p + "attention.wq.weight"].T).view(B, T, nh, hd))
        k = rotary((x @ sd[p + "attention.wk.weight"].T).view(B, T, nkv, hd))
        v = (x @ sd[p + "attention.wv.weight"].T).view(B, T, nkv, hd)
        k, v = (t.repeat_interleave(nh // nkv, dim=2) for t in (k, v))  # repeat_kv
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        scores = q @ k.transpose(2, 3) / math.sqrt(hd) + mask
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, nh * hd)
        h = h + out @ sd[p + "attention.wo.weight"].T
        x = rms(h, sd[p + "ffn_norm.weight"])
        ffn = torch.nn.functional.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T)
        h = h + ffn @ sd[p + "feed_forward.w2.weight"].T
    return rms(h, sd["norm.weight"]) @ sd["output.weight"].T


@pytest.mark.parametrize("n", [2, 1])
@pytest.mark.parametrize("name", list(PRESETS))
def test_logits_equal_metas_forward(name, n, checkpoints, converted):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(converted[name, n], dtype=torch.float32, attn_implementation="eager")
    tokens = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens).logits
    ref = meta_forward(checkpoints[name]["full"], PRESETS[name]["params"], tokens)
    assert (ours - ref).abs().max() / ref.abs().max() <= 1e-4


def test_sharding_invariance_and_source_dtype(converted):
    for name, preset in PRESETS.items():
        two, one = load_safetensors_folder(converted[name, 2]), load_safetensors_folder(converted[name, 1])
        assert set(two) == set(one)
        for k in two:
            assert two[k].dtype == preset["dtype"], k  # --dtype keep
            assert torch.equal(two[k], one[k]), k


def test_folder_contents_config_and_tokenizer(converted, spm_file, capsys, checkpoints, tmp_path):
    import sentencepiece as spm
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    rc, out, _ = convert(checkpoints["llama1"][2], tmp_path / "o", capsys)
    assert rc == 0
    assert "consolidated.00.rope.freqs" not in out and "(dropped: Meta's precomputed rotary angles" in out
    assert "[concat_mp_shards(dim=0, rope_heads=4)]" in out and "[replicated]" in out
    assert "max_position_embeddings 2048 from norm_eps 1e-6 (LLaMA-1)" in out
    folder = converted["llama2", 2]
    files = {p.name for p in folder.iterdir()}
    assert files == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "tokenizer.model", ".visualglm-convert"}  # + the converter's marker
    assert (folder / "tokenizer.model").read_bytes() == spm_file.read_bytes()
    cfg = AutoConfig.from_pretrained(folder)
    assert cfg.architectures == ["LlamaForCausalLM"] and cfg.model_type == "llama"
    assert (cfg.num_key_value_heads, cfg.max_position_embeddings, cfg.dtype) == (2, 4096, torch.bfloat16)
    gen = GenerationConfig.from_pretrained(folder)
    assert (gen.bos_token_id, gen.eos_token_id) == (1, 2)
    tok = AutoTokenizer.from_pretrained(folder)
    sp = spm.SentencePieceProcessor(model_file=str(spm_file))
    for text in TEXTS:
        assert tok(text).input_ids == [1] + sp.encode(text), text
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


@pytest.mark.parametrize("shape", TOKENIZER_SHAPES)
def test_tokenizer_folder_shapes(shape, checkpoints, spm_file, tmp_path, capsys):
    """--tokenizer with a Llama tokenizer folder as users have them (slow files only, tokenizer.json only, both):
    SentencePiece's ids, BOS first, from each; tokenizer.model is copied where there is one."""
    from transformers import AutoTokenizer

    tok_dir = write_tokenizer_shape(spm_file, tmp_path / "tok", shape)
    rc, _, err = convert(checkpoints["llama2"][1], tmp_path / "o", capsys, "--tokenizer", str(tok_dir))
    assert rc == 0, err
    tok = AutoTokenizer.from_pretrained(tmp_path / "o")
    for text in TEXTS:
        assert tok(text).input_ids == sentencepiece_ids(spm_file, text), text
    assert (tmp_path / "o" / "tokenizer.model").exists() == (shape != "json")


def test_several_output_shards_with_an_index(checkpoints, tmp_path, capsys):
    rc, _, _ = convert(checkpoints["llama2"][2], tmp_path / "o", capsys, "--max-shard-size", "40KB")
    assert rc == 0
    index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((tmp_path / "o" / s).is_file() for s in shards)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tmp_path / "o")
    ref = load_safetensors_folder(tmp_path / "o")
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


# --- bad input --------------------------------------------------------------------------------------------

def test_missing_rank(checkpoints, tmp_path, capsys):
    src = shutil.copytree(checkpoints["llama1"][2], tmp_path / "src")
    (src / "consolidated.01.pth").rename(src / "consolidated.02.pth")
    rc, _, err = convert(src, tmp_path / "o", capsys)
    assert_conversion_failed(rc, err, tmp_path / "o", "are not numbered 00..01 (a rank is missing)")


def test_ranks_from_different_checkpoints(checkpoints, spm_file, tmp_path, capsys):
    preset = PRESETS["llama2"]
    a = write_meta(tmp_path / "a", preset, meta_full(preset, seed=1), 2, spm_file)
    b = write_meta(tmp_path / "b", preset, meta_full(preset, seed=2), 2, spm_file)
    shutil.copy(b / "consolidated.01.pth", a / "consolidated.01.pth")
    rc, _, err = convert(a, tmp_path / "o", capsys)
    assert_conversion_failed(rc, err, tmp_path / "o", "replicated refused", "come from different checkpoints")


@pytest.mark.parametrize("edit, needles", [
    (lambda p: p.update(n_layers=3), ["missing: 'model.layers.2.self_attn.q_proj.weight'",
                                      "needs source tensor ['consolidated.00.layers.2.attention.wq.weight', 'consolidated.01.layers.2.attention.wq.weight']"]),
    (lambda p: p.update(multiple_of=64), ["wrong shape: 'model.layers.0.mlp.gate_proj.weight' would be [224, 64]",
                                          "expects [256, 64]"]),
    (lambda p: p.update(n_heads=3), ["dim 64 is not a multiple of n_heads 3"]),
    (lambda p: p.update(n_kv_heads=1), ["do not split evenly over 2 model-parallel files"]),
    (lambda p: p.update(vocab_size=500), ["vocab_size 500 but tok_embeddings has 400 rows"]),
    (lambda p: p.pop("norm_eps"), ["params.json has no 'norm_eps'"]),
])
def test_inconsistent_params_are_reported(edit, needles, checkpoints, tmp_path, capsys):
    src = shutil.copytree(checkpoints["llama2"][2], tmp_path / "src")
    params = json.loads((src / "params.json").read_text())
    edit(params)
    (src / "params.json").write_text(json.dumps(params))
    rc, _, err = convert(src, tmp_path / "o", capsys)
    assert_conversion_failed(rc, err, tmp_path / "o", *needles)


def test_wrong_tokenizers(checkpoints, tmp_path, capsys):
    src = shutil.copytree(checkpoints["llama1"][2], tmp_path / "src")
    (src / "tokenizer.model").write_bytes(b"IWg9PQ== 0\nIQ== 1\n")  # Llama 3's tiktoken format
    rc, _, err = convert(src, tmp_path / "o", capsys)
    assert_conversion_failed(rc, err, tmp_path / "o", "not a SentencePiece model", "tiktoken")
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_prefix=str(tmp_path / "big"),
                                   vocab_size=450, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, minloglevel=2)
    rc, _, err = convert(src, tmp_path / "o", capsys, "--tokenizer", str(tmp_path / "big.model"))
    assert_conversion_failed(rc, err, tmp_path / "o", "has 450 pieces but tok_embeddings only 400 rows")
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "tokenizer_config.json").write_text("{}")
    rc, _, err = convert(src, tmp_path / "o", capsys, "--tokenizer", str(tmp_path / "config-only"))
    assert_conversion_failed(rc, err, tmp_path / "o", "no tokenizer.model or tokenizer.json there (it has tokenizer_config.json)")


def test_no_tokenizer_still_writes_weights(checkpoints, tmp_path, capsys):
    src = shutil.copytree(checkpoints["llama1"][1], tmp_path / "deep" / "7B")
    (src / "tokenizer.model").unlink()
    rc, out, _ = convert(src, tmp_path / "o", capsys)
    assert rc == 0 and "has NO TOKENIZER" in out
    assert not (tmp_path / "o" / "tokenizer.json").exists() and (tmp_path / "o" / "model.safetensors").exists()
    # Meta's downloads keep tokenizer.model beside the size folders: found one level up
    shutil.copy(checkpoints["llama1"][1] / "tokenizer.model", tmp_path / "deep" / "tokenizer.model")
    rc, out, _ = convert(src, tmp_path / "o2", capsys)
    assert rc == 0 and (tmp_path / "o2" / "tokenizer.model").exists()


def test_usage_errors(checkpoints, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        convert_main(["--format", "llama", "--src", str(checkpoints["llama1"][2]), "--out", str(tmp_path / "o")])
    assert e.value.code == 2  # argparse: not a format name (never guessed)
    rc = convert_main(["--format", "llama-original", "--src", str(checkpoints["llama1"][2]), "--delta", "x",
                       "--out", str(tmp_path / "o")])
    assert rc == 2 and "does not take --delta" in capsys.readouterr().err
    rc = convert_main(["--format", "llama-original", "--out", str(tmp_path / "o")])
    assert rc == 2 and "needs --src" in capsys.readouterr().err
