"""Hostile input to ``visualglm-convert`` (issue #13, "Nothing lost, nothing leaked"): every case ends in one
clear line (or one message listing every problem), exit 1 or 2, no traceback, nothing at ``--out`` and the
sources untouched.

- a source is never written to: ``--out`` equal to, containing or inside any source path of any format (also
  through symlinks), with or without ``--force``; ``--force`` replaces only a folder this tool wrote;
- the dtype policy: integer / bool / complex / float8 tensors refused by name, casts that overflow, NaN/inf in
  the source (``--allow-nonfinite``), every safetensors dtype read or named; property-based over random dtypes
  and values;
- corrupt files: flipped bytes (CRC-32), a deflate-compressed zip, a numpy object array (refused code);
- mistyped configs (``num_layers: "2"``, ``eva_args: null``, ``n_heads: 0``, a binary ``latest``, an index
  entry that is an int or a path) and random mutations of ``model_config.json`` / ``params.json``;
- interruptions: SIGTERM in-process and in a real subprocess mid-write, SIGKILL then a rerun that removes the
  leftover, a leftover of a live process kept, an interrupted ``--force`` swap restored; a full disk (tmpfs
  when root can mount one, ENOSPC injected otherwise); a dangling ``--out`` symlink.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from modeling_visualglm.conversion.apply import FLOAT_DTYPES, build_plan
from modeling_visualglm.conversion.cli import main as convert_main
from modeling_visualglm.conversion.errors import ConversionError
from modeling_visualglm.conversion.rules import rename
from modeling_visualglm.conversion.sources import SafetensorsSource, StateDictSource, _ST_DTYPES
from modeling_visualglm.hub_export.writer import OUTPUT_MARKER, _owner_tag, remove_leftovers, staged_output

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]


# --- fixtures: a tiny SAT VisualGLM checkpoint and a tiny Meta LLaMA one -----------------------------------

@pytest.fixture(scope="module")
def sat(tiny_tokenizer, tmp_path_factory):
    """A SwissArmyTransformer VisualGLM folder (``latest``, ``1/mp_rank_00_model_states.pt``, model_config.json),
    written with the converter's rules run backwards; its parity is the business of test_conversion_visualglm."""
    from modeling_visualglm.conversion.apply import to_original
    from modeling_visualglm.conversion.formats.visualglm import sat_model_config
    from modeling_visualglm.modeling_visualglm import VisualGLMForConditionalGeneration
    from modeling_visualglm.tools.tiny_models import randomize_, tiny_visualglm_config

    torch.manual_seed(0)
    model = randomize_(VisualGLMForConditionalGeneration(tiny_visualglm_config(tiny_tokenizer)).eval(), seed=3)
    folder = tmp_path_factory.mktemp("hostile") / "sat"
    (folder / "1").mkdir(parents=True)
    sd = to_original(dict(model.state_dict()), "sat-visualglm", model.config, qkv_layout="blocked")
    torch.save({"module": sd}, folder / "1" / "mp_rank_00_model_states.pt")
    (folder / "latest").write_text("1")
    (folder / "model_config.json").write_text(json.dumps(sat_model_config(model.config), indent=4))
    return folder


LLAMA_PARAMS = {"dim": 32, "n_layers": 1, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": -1}


@pytest.fixture(scope="module")
def meta_llama(tmp_path_factory):
    """Meta's layout, one rank: consolidated.00.pth + params.json (no tokenizer: a plain folder without one)."""
    src = tmp_path_factory.mktemp("hostile_llama") / "7B"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    d, inter, vocab = 32, 96, 64
    shapes = {"tok_embeddings.weight": (vocab, d), "norm.weight": (d,), "output.weight": (vocab, d),
              "layers.0.attention_norm.weight": (d,), "layers.0.ffn_norm.weight": (d,),
              "layers.0.feed_forward.w1.weight": (inter, d), "layers.0.feed_forward.w3.weight": (inter, d),
              "layers.0.feed_forward.w2.weight": (d, inter)}
    shapes.update({f"layers.0.attention.{w}.weight": (d, d) for w in ("wq", "wk", "wv", "wo")})
    torch.save({k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}, src / "consolidated.00.pth")
    (src / "params.json").write_text(json.dumps(LLAMA_PARAMS))
    return src


def convert(*argv: str) -> tuple[int, str, str]:
    """``visualglm-convert`` in process; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = convert_main([*map(str, argv), "--no-progress"])
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def sat_args(src, out, tokenizer, *extra):
    return ("--format", "sat-visualglm", "--src", src, "--tokenizer", tokenizer, "--out", out, *extra)


def assert_one_clean_error(rc, err, code=1):
    assert rc == code, err
    assert "Traceback" not in err and "internal error" not in err, err


def assert_nothing_left(out: Path):
    assert not out.exists() and not out.is_symlink()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_sat(sat: Path, dst: Path, edit=None) -> Path:
    shutil.copytree(sat, dst)
    ckpt = dst / "1" / "mp_rank_00_model_states.pt"
    if edit is not None:
        state = torch.load(ckpt, weights_only=True)
        edit(state)
        torch.save(state, ckpt)
    return dst


# --- 1. a source is never written to -----------------------------------------------------------------------

def test_out_equal_to_parent_of_or_inside_the_source_is_refused(sat, tiny_tokenizer_dir, tmp_path):
    """The issue's reproduction (--out = --src with --force deleted the checkpoint), and its variants."""
    ck = shutil.copytree(sat, tmp_path / "ck")
    (tmp_path / "other.txt").write_text("a file of the user's, beside the checkpoint")
    before, other = tree_digest(ck), (tmp_path / "other.txt").read_text()
    os.symlink(ck, tmp_path / "link")
    cases = {
        "equal": (ck, ck, "is the source --src"),
        "parent": (ck, tmp_path, "contains the source --src"),
        "inside": (ck, ck / "converted", "lies inside the source --src"),
        "src via a symlink": (tmp_path / "link", ck, "is the source --src"),
        "out inside through a symlink": (ck, tmp_path / "link" / "converted", "lies inside the source --src"),
        "the tokenizer folder": (ck, tiny_tokenizer_dir, "is the source --tokenizer"),
    }
    for name, (src, out, message) in cases.items():
        for force in ((), ("--force",)):
            rc, _, err = convert(*sat_args(src, out, tiny_tokenizer_dir, *force))
            assert_one_clean_error(rc, err, 2)
            assert message in err and "a source is never written to" in err, (name, err)
            assert len(err.strip().splitlines()) == 1, err  # one line, no usage dump
    assert tree_digest(ck) == before and (tmp_path / "other.txt").read_text() == other
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "link", "other.txt"]


FORMAT_PATHS = {  # format → {flag: "dir" | "file"} (every path flag it takes)
    "sat-visualglm": {"src": "dir", "tokenizer": "dir"},
    "hf-visualglm": {"src": "dir", "tokenizer": "dir"},
    "sat-cogvlm": {"src": "dir", "tokenizer": "dir"},
    "hf-cogvlm": {"src": "dir", "tokenizer": "dir"},
    "llama-original": {"src": "dir", "tokenizer": "file"},
    "fastchat-delta": {"base": "dir", "delta": "dir", "tokenizer": "dir"},
    "minigpt4": {"ckpt": "file", "llm": "dir", "blip2": "file", "vit": "file", "tokenizer": "dir"},
}


@pytest.mark.parametrize("fmt", list(FORMAT_PATHS))
def test_every_source_flag_of_every_format_is_protected(fmt, tmp_path):
    """Checked before anything is read, so stand-in paths suffice: for each path flag, an --out equal to it,
    containing it, or (folders) inside it is a usage error and nothing is created or changed."""
    paths = {}
    for flag, kind in FORMAT_PATHS[fmt].items():
        folder = tmp_path / f"s_{flag}"
        folder.mkdir()
        (folder / "keep").write_text(flag)
        paths[flag] = folder / "x.pth" if kind == "file" else folder
        if kind == "file":
            paths[flag].write_text("weights")
    before = tree_digest(tmp_path)
    for flag, path in paths.items():
        outs = [path, path.parent] + ([path / "out"] if path.is_dir() else [])
        for out in outs:
            argv = ["--format", fmt, "--out", out, "--force"]
            for f, p in paths.items():
                argv += [f"--{f}", p]
            rc, _, err = convert(*argv)
            assert_one_clean_error(rc, err, 2)
            assert f"the source --{flag} {path}" in err and "a source is never written to" in err, err
    assert tree_digest(tmp_path) == before


def test_force_replaces_only_a_folder_this_tool_wrote(sat, tiny_tokenizer_dir, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.txt").write_text("not ours")
    rc, _, err = convert(*sat_args(sat, foreign, tiny_tokenizer_dir, "--force"))
    assert_one_clean_error(rc, err, 2)
    assert "visualglm-convert did not write" in err and OUTPUT_MARKER in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in foreign.iterdir()] == ["data.txt"]
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    rc, _, err = convert(*sat_args(sat, a_file, tiny_tokenizer_dir, "--force"))
    assert_one_clean_error(rc, err, 2)
    assert "is a file that visualglm-convert did not write" in err and a_file.read_text() == "x"
    # a folder it wrote carries the marker (JSON, no local paths) and is replaced with --force
    out = tmp_path / "ours"
    assert convert(*sat_args(sat, out, tiny_tokenizer_dir))[0] == 0
    marker = json.loads((out / OUTPUT_MARKER).read_text())
    assert marker["written_by"] == "visualglm-convert" and marker["format"] == "sat-visualglm"
    assert str(tmp_path) not in (out / OUTPUT_MARKER).read_text()
    rc, _, err = convert(*sat_args(sat, out, tiny_tokenizer_dir, "--force"))
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "foreign", "ours"]


def test_symlinked_out_is_refused(sat, tiny_tokenizer_dir, tmp_path):
    dangling = tmp_path / "dangling"
    os.symlink(tmp_path / "nowhere", dangling)
    rc, _, err = convert(*sat_args(sat, dangling, tiny_tokenizer_dir))
    assert_one_clean_error(rc, err, 2)
    assert "is a symbolic link to" in err and "dangling" in err
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()
    target = tmp_path / "real"
    target.mkdir()
    os.symlink(target, tmp_path / "link")
    rc, _, err = convert(*sat_args(sat, tmp_path / "link", tiny_tokenizer_dir, "--force"))
    assert_one_clean_error(rc, err, 2)
    assert "is a symbolic link to" in err and not any(target.iterdir())


# --- 2. dtype policy ---------------------------------------------------------------------------------------

W = "transformer.layers.0.mlp.dense_h_to_4h.weight"
W2 = "transformer.layers.1.mlp.dense_4h_to_h.weight"


def _set(key, fn):
    def edit(state):
        state["module"][key] = fn(state["module"][key])
    return edit


def test_non_float_tensors_are_listed(sat, tiny_tokenizer_dir, tmp_path):
    def edit(state):
        sd = state["module"]
        sd[W] = sd[W].to(torch.int64)
        sd[W2] = sd[W2] > 0
        sd["transformer.layers.0.mlp.dense_4h_to_h.weight"] = sd["transformer.layers.0.mlp.dense_4h_to_h.weight"].to(
            torch.complex64)
        sd["transformer.layers.1.mlp.dense_h_to_4h.weight"] = sd["transformer.layers.1.mlp.dense_h_to_4h.weight"].to(
            torch.float8_e4m3fn)

    src = copy_sat(sat, tmp_path / "src", edit)
    rc, _, err = convert(*sat_args(src, tmp_path / "out", tiny_tokenizer_dir))
    assert_one_clean_error(rc, err)
    assert "(4 problems)" in err
    for dt, key in (("int64", W), ("bool", W2), ("complex64", "transformer.layers.0.mlp.dense_4h_to_h.weight"),
                    ("float8_e4m3fn", "transformer.layers.1.mlp.dense_h_to_4h.weight")):
        line = next(ln for ln in err.splitlines() if f"are {dt}:" in ln)
        assert repr(key) in line
    assert_nothing_left(tmp_path / "out")


def test_float16_overflow_is_an_error_with_the_range(sat, tiny_tokenizer_dir, tmp_path):
    src = copy_sat(sat, tmp_path / "src", _set(W, lambda t: t.index_put_((torch.tensor([0]), torch.tensor([0])),
                                                                           torch.tensor(1e6))))
    rc, _, err = convert(*sat_args(src, tmp_path / "out", tiny_tokenizer_dir, "--dtype", "float16"))
    assert_one_clean_error(rc, err)
    assert "overflow: 'language_model.layers.0.mlp.dense_h_to_4h.weight': casting to float16 turns 1 finite" in err
    assert "1e+06]" in err and "65504" in err
    assert_nothing_left(tmp_path / "out")
    rc, _, err = convert(*sat_args(src, tmp_path / "out", tiny_tokenizer_dir, "--dtype", "bfloat16"))
    assert rc == 0, err  # bfloat16 holds 1e6


def test_nonfinite_source_needs_allow_nonfinite(sat, tiny_tokenizer_dir, tmp_path):
    def edit(state):
        state["module"][W][0, :2] = torch.tensor([float("nan"), float("inf")])
        state["module"][W2][1, 1] = float("-inf")

    src = copy_sat(sat, tmp_path / "src", edit)
    rc, _, err = convert(*sat_args(src, tmp_path / "out", tiny_tokenizer_dir))
    assert_one_clean_error(rc, err)
    assert f"{W!r} (float32: 1 NaN, 1 inf)" in err and f"{W2!r} (float32: 0 NaN, 1 inf)" in err
    assert "--allow-nonfinite" in err
    assert_nothing_left(tmp_path / "out")
    rc, _, err = convert(*sat_args(src, tmp_path / "out", tiny_tokenizer_dir, "--allow-nonfinite"))
    assert rc == 0 and "warning: 2 source tensor(s) hold NaN/inf" in err, err
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "out" / "model.safetensors"))["language_model.layers.0.mlp.dense_h_to_4h.weight"]
    assert torch.isnan(w[0, 0]) and torch.isinf(w[0, 1])  # as they were
    # a cast on top that overflows another value is still an error
    edit2 = _set(W, lambda t: t.index_put_((torch.tensor([3]), torch.tensor([3])), torch.tensor(-1e9)))
    src2 = copy_sat(src, tmp_path / "src2", edit2)
    rc, _, err = convert(*sat_args(src2, tmp_path / "o2", tiny_tokenizer_dir, "--allow-nonfinite",
                                   "--dtype", "float16"))
    assert_one_clean_error(rc, err)
    assert "turns 1 finite value(s) into inf/NaN" in err and "(and 2 NaN/inf)" in err


class OneWeight(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(config.n))
        self.all_tied_weights_keys = {}


class OneWeightConfig:
    def __init__(self, n):
        self.n, self.sub_configs, self.tie_word_embeddings = n, {}, False


def test_every_safetensors_dtype_is_read_or_named(tmp_path):
    """F8_E4M3, F8_E5M2, U16, U32 … used to crash with KeyError: each is read, and the plan names it."""
    from safetensors.torch import _TYPES, save_file

    for name, dtype in _TYPES.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({"w": torch.zeros(4).to(dtype)}, str(path))
        src = SafetensorsSource([path], name)
        assert src.info("w").dtype == dtype and _ST_DTYPES[name] == dtype
        if dtype in FLOAT_DTYPES:
            build_plan(src, [rename("w", "w")], OneWeightConfig(4), OneWeight, format_name="t")
        else:
            with pytest.raises(ConversionError, match=f"are {str(dtype).replace('torch.', '')}:"):
                build_plan(src, [rename("w", "w")], OneWeightConfig(4), OneWeight, format_name="t")
    # a dtype name this torch cannot hold (safetensors' F4 / F6 formats) is named, not a KeyError
    path = tmp_path / "f4.safetensors"
    header = json.dumps({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0")
    with pytest.raises(ConversionError, match="F4|not a readable safetensors"):
        SafetensorsSource([path], "f4")


ALL_DTYPES = [d for d in _ST_DTYPES.values() if d is not None]
VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64),
                   st.sampled_from([1e6, -1e6, 65504.0, 65520.0, 3.4e38, 1e300, -1e300, 0.0, -0.0, 1e-8]))


@settings(max_examples=150, deadline=None)
@given(dtype=st.sampled_from(ALL_DTYPES), values=st.lists(VALUES, min_size=1, max_size=6),
       cast=st.sampled_from([None, torch.float32, torch.float16, torch.bfloat16]), allow=st.booleans())
def test_dtype_policy_property(dtype, values, cast, allow):
    """Random dtypes and values through plan + stream checks: exactly the documented outcomes, never another
    exception."""
    t = torch.tensor(values, dtype=torch.float64)
    with torch.no_grad(), warnings_ignored():
        src_t = t.to(dtype) if dtype.is_floating_point else t.nan_to_num().clamp(-100, 100).to(dtype)
    sd = StateDictSource("random")
    sd.add("random", {"w": src_t}, [])
    try:
        plan = build_plan(sd, [rename("w", "w")], OneWeightConfig(len(values)), OneWeight, format_name="t",
                          dtype=cast, allow_nonfinite=allow)
    except ConversionError as e:
        assert dtype not in FLOAT_DTYPES and f"are {str(dtype).replace('torch.', '')}:" in str(e)
        return
    assert dtype in FLOAT_DTYPES
    (out,) = plan.compute(plan.tasks[0]).values()
    src_bad = int((~torch.isfinite(src_t)).sum())
    new_bad = int((~torch.isfinite(out)).sum()) - src_bad
    try:
        warnings = plan.finish_data_checks()
    except ConversionError as e:
        assert new_bad > 0 or (src_bad and not allow), str(e)
        if new_bad > 0:
            assert "overflow: 'w'" in str(e)
        if src_bad and not allow:
            assert "--allow-nonfinite" in str(e)
        return
    assert new_bad <= 0 and (not src_bad or allow) and bool(warnings) == bool(src_bad)
    expected = src_t if cast is None else src_t.to(cast)
    assert out.dtype == expected.dtype and torch.equal(out.nan_to_num(), expected.nan_to_num())


@contextlib.contextmanager
def warnings_ignored():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --- 3. corrupt and unsafe files ---------------------------------------------------------------------------

def _member_data_offset(path: Path, suffix: str) -> int:
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    data = path.read_bytes()
    n, e = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + n + e


def test_flipped_bytes_compressed_zip_and_numpy_object_arrays(sat, tiny_tokenizer_dir, tmp_path):
    # 64 flipped bytes inside a tensor's data: torch.load(mmap=True) returns a different weight; the CRC says no
    src = copy_sat(sat, tmp_path / "flipped")
    ckpt = src / "1" / "mp_rank_00_model_states.pt"
    data = bytearray(ckpt.read_bytes())
    start = _member_data_offset(ckpt, "data/3")
    for k in range(64):
        data[start + k] ^= 0xA5
    ckpt.write_bytes(bytes(data))
    rc, _, err = convert(*sat_args(src, tmp_path / "out", tiny_tokenizer_dir))
    assert_one_clean_error(rc, err)
    assert "corrupt: Bad CRC-32 for file" in err and "data/3" in err
    # re-zipped with deflate: a memory-mapped load would read compressed bytes as weights
    src = copy_sat(sat, tmp_path / "deflated")
    ckpt = src / "1" / "mp_rank_00_model_states.pt"
    with zipfile.ZipFile(sat / "1" / "mp_rank_00_model_states.pt") as zi, \
            zipfile.ZipFile(ckpt, "w", compression=zipfile.ZIP_DEFLATED) as zo:
        for info in zi.infolist():
            zo.writestr(info.filename, zi.read(info))
    rc, _, err = convert(*sat_args(src, tmp_path / "out", tiny_tokenizer_dir))
    assert_one_clean_error(rc, err)
    assert "is compressed" in err
    # a numpy object array: refused code, not "truncated or corrupt"
    import numpy as np

    src = copy_sat(sat, tmp_path / "objects", lambda s: s.__setitem__("rng", np.array([{"a": 1}, None], dtype=object)))
    rc, _, err = convert(*sat_args(src, tmp_path / "out", tiny_tokenizer_dir))
    assert_one_clean_error(rc, err)
    assert "contains pickled code/objects that weights_only loading refuses" in err and "truncated" not in err
    assert_nothing_left(tmp_path / "out")


def test_crc_zero_files_still_load(sat, tiny_tokenizer_dir, tmp_path):
    """torch.save with compute_crc32=False records CRC 0: nothing to check, the file converts."""
    from torch.utils.serialization import config

    src = shutil.copytree(sat, tmp_path / "nocrc")
    ckpt = src / "1" / "mp_rank_00_model_states.pt"
    state = torch.load(ckpt, weights_only=True)
    config.save.compute_crc32 = False
    try:
        torch.save(state, ckpt)
    finally:
        config.save.compute_crc32 = True
    assert {i.CRC for i in zipfile.ZipFile(ckpt).infolist()} == {0}
    rc, _, err = convert(*sat_args(src, tmp_path / "out", tiny_tokenizer_dir))
    assert rc == 0, err


# --- 4. configs --------------------------------------------------------------------------------------------

def _sat_with_config(sat: Path, dst: Path, config=None, latest: bytes | None = None) -> Path:
    """A SAT folder sharing ``sat``'s weights (symlinked) with its own model_config.json / latest."""
    dst.mkdir()
    os.symlink(sat / "1", dst / "1")
    (dst / "latest").write_bytes(latest if latest is not None else b"1")
    cfg = json.loads((sat / "model_config.json").read_text()) if config is None else config
    (dst / "model_config.json").write_text(json.dumps(cfg))
    return dst


def test_mistyped_configs_from_the_issue(sat, tiny_tokenizer_dir, meta_llama, tmp_path):
    base = json.loads((sat / "model_config.json").read_text())
    cases = {
        "num_layers string": ({**base, "num_layers": "2"}, "'num_layers' must be an integer >= 1", None),
        "eva_args null": ({**base, "eva_args": None}, "has no 'eva_args' (an object)", None),
        "heads 0": ({**base, "num_attention_heads": 0}, "'num_attention_heads' must be an integer >= 1", None),
        "binary latest": (base, "latest: not text", b"\xff\xfe\x00\x9c"),
        "eva_args a list": ({**base, "eva_args": [1, 2]}, "'eva_args' must be an object, got [1, 2] (a list)", None),
    }
    for i, (name, (cfg, message, latest)) in enumerate(cases.items()):
        src = _sat_with_config(sat, tmp_path / f"s{i}", cfg, latest)
        rc, _, err = convert(*sat_args(src, tmp_path / "out", tiny_tokenizer_dir))
        assert_one_clean_error(rc, err)
        assert message in err, (name, err)
    # several problems at once, in one message
    bad = {**base, "hidden_size": 66, "vocab_size": -1, "layernorm_epsilon": "x",
           "eva_args": {**base["eva_args"], "patch_size": 5},
           "qformer_args": {**base["qformer_args"], "is_decoder": "yes"}}
    rc, _, err = convert(*sat_args(_sat_with_config(sat, tmp_path / "many", bad), tmp_path / "out", tiny_tokenizer_dir))
    assert_one_clean_error(rc, err)
    assert "(5 problems)" in err and "hidden_size 66 is not a multiple of num_attention_heads 4" in err
    assert "image_size 56 is not a multiple of patch_size 5" in err and "'is_decoder' must be true, false" in err
    # params.json with n_heads 0 (ZeroDivisionError before) and a string
    llama = shutil.copytree(meta_llama, tmp_path / "llama")
    (llama / "params.json").write_text(json.dumps({**LLAMA_PARAMS, "n_heads": 0, "norm_eps": "1e-5"}))
    rc, _, err = convert("--format", "llama-original", "--src", llama, "--out", tmp_path / "out")
    assert_one_clean_error(rc, err)
    assert "'n_heads' must be an integer >= 1" in err and "'norm_eps' must be a number > 0" in err
    assert_nothing_left(tmp_path / "out")


def test_hostile_shard_index(sat, tiny_tokenizer_dir, tmp_path):
    """An index entry that is an int, or a path out of the folder, is named (TypeError / path traversal before)."""
    from modeling_visualglm.conversion.sources import read_index

    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": {"a": 3, "b": "../../etc/passwd", "c": "/abs.bin", "d": "ok.bin"}}))
    with pytest.raises(ConversionError) as info:
        read_index(index)
    text = str(info.value)
    assert "(3 problems)" in text and "weight_map['a'] must be a file name (a string), got 3" in text
    assert "'../../etc/passwd' is not a file name" in text and "'/abs.bin' is not a file name" in text
    index.write_text(json.dumps({"weight_map": [1]}))
    with pytest.raises(ConversionError, match="'weight_map' must be an object, got a list"):
        read_index(index)
    index.write_bytes(b"\xff\x00binary")
    with pytest.raises(ConversionError, match="not UTF-8"):
        read_index(index)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.sampled_from([0, -1, 1, 2, 3, 7, 10**9])
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=5)


def _paths(cfg, prefix=()):
    for k, v in cfg.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))


def _mutate(cfg: dict, draw) -> dict:
    cfg = json.loads(json.dumps(cfg))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(sorted(_paths(cfg))))
        node = cfg
        for k in path[:-1]:
            node = node[k]
        if draw(st.booleans()) and len(path) > 0:
            node[path[-1]] = draw(JSON_VALUES)
        else:
            node.pop(path[-1], None)
    return cfg


def _run_mutated(argv, out_parent: Path):
    rc, _, err = convert(*argv)
    assert rc in (0, 1), err
    assert "Traceback" not in err and "internal error" not in err, err
    if rc == 1:
        assert err.startswith("visualglm-convert: conversion failed: ") and err.count("conversion failed") == 1
        assert not [p for p in out_parent.iterdir() if p.name.startswith(".out.")]


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_sat_config_mutations_give_a_listed_error(sat, tiny_tokenizer_dir, data):
    base = json.loads((sat / "model_config.json").read_text())
    cfg = _mutate(base, data.draw)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = _sat_with_config(sat, tmp / "src", cfg)
        _run_mutated(sat_args(src, tmp / "out", tiny_tokenizer_dir), tmp)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_params_json_mutations_give_a_listed_error(meta_llama, data):
    cfg = _mutate(LLAMA_PARAMS, data.draw)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        os.symlink(meta_llama / "consolidated.00.pth", tmp / "src" / "consolidated.00.pth")
        (tmp / "src" / "params.json").write_text(json.dumps(cfg))
        _run_mutated(["--format", "llama-original", "--src", tmp / "src", "--out", tmp / "out"], tmp)


# --- 5. interruptions, a full disk ---------------------------------------------------------------------------

def test_sigterm_during_the_write_removes_the_temporary_folder(sat, tiny_tokenizer_dir, tmp_path, monkeypatch):
    """Deterministic: the signal arrives while the first shard is being written (in process)."""
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = []

    def save_then_signal(*args, **kwargs):
        calls.append(args[1])
        real(*args, **kwargs)
        assert any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler raises before this returns
        raise AssertionError("SIGTERM was not turned into an exception")

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    rc, _, err = convert(*sat_args(sat, tmp_path / "out", tiny_tokenizer_dir, "--max-shard-size", "100KB"))
    assert rc == 128 + signal.SIGTERM and "interrupted (SIGTERM); nothing was written to --out" in err, err
    assert len(calls) == 1 and "Traceback" not in err
    assert_nothing_left(tmp_path / "out")
    assert signal.getsignal(signal.SIGTERM) is before  # the CLI restored the handler


def test_disk_full_is_one_line_and_leaves_nothing(sat, tiny_tokenizer_dir, tmp_path, monkeypatch):
    import safetensors.torch

    def no_space(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    rc, _, err = convert(*sat_args(sat, tmp_path / "out", tiny_tokenizer_dir))
    assert_one_clean_error(rc, err)
    assert "no space left on the device holding" in err and "nothing was written to --out" in err
    assert len(err.strip().splitlines()) == 1
    assert_nothing_left(tmp_path / "out")


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root (the ENOSPC case is covered by the injected test)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_real_full_disk_on_a_small_tmpfs(sat, tiny_tokenizer_dir, small_tmpfs):
    rc, _, err = convert(*sat_args(sat, small_tmpfs / "out", tiny_tokenizer_dir))
    assert_one_clean_error(rc, err)
    assert "no space left on the device holding" in err and len(err.strip().splitlines()) == 1
    assert list(small_tmpfs.iterdir()) == []


def test_leftovers_of_dead_processes_are_removed_live_ones_kept(tmp_path, capsys):
    dead = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = _owner_tag().rsplit("-", 1)[1]
    gone = tmp_path / f".out.tmp-{dead_pid}-12345-{host}-abcd1234"
    alive = tmp_path / f".out.tmp-{_owner_tag()}-zzzz0000"  # this process: running
    foreign_host = tmp_path / f".out.tmp-{dead_pid}-12345-0000beef-abcd1234"
    lookalike = tmp_path / ".out.tmp-notours"
    for d in (gone, alive, foreign_host, lookalike):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
    # an interrupted --force swap: the previous folder was moved aside and the new one never arrived
    swap = tmp_path / f".prev.old-{dead_pid}-12345-{host}-abcd1234"
    (swap / "prev").mkdir(parents=True)
    (swap / "prev" / "config.json").write_text("{}")
    notes = remove_leftovers(tmp_path)
    assert not gone.exists() and alive.exists() and foreign_host.exists() and lookalike.exists()
    assert (tmp_path / "prev" / "config.json").read_text() == "{}" and not swap.exists()
    assert any("restored" in n for n in notes) and any(str(gone) in n for n in notes)
    # staged_output runs it, and prints what it removed
    (gone).mkdir()
    with staged_output(tmp_path / "new") as tmp:
        (tmp / "a").write_text("a")
    assert not gone.exists() and "removed" in capsys.readouterr().err


# a conversion that takes a few seconds: a SAT VisualGLM whose text vocabulary is 150k rows x 256 (two 150 MB
# tables, the head untied), converted to bfloat16 in 20 MB shards
BIG = dict(vocab_size=150_000, hidden_size=256, intermediate_size=512, num_attention_heads=4)


@pytest.fixture(scope="module")
def big_sat(tiny_tokenizer, tmp_path_factory):
    from modeling_visualglm.conversion.apply import to_original
    from modeling_visualglm.conversion.formats.visualglm import sat_model_config
    from modeling_visualglm.modeling_visualglm import VisualGLMForConditionalGeneration
    from modeling_visualglm.tools.tiny_models import tiny_visualglm_config

    cfg = tiny_visualglm_config(tiny_tokenizer, text_config=dict(BIG))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in VisualGLMForConditionalGeneration(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    sd["lm_head.weight"] = torch.randn(shapes["lm_head.weight"], generator=g) * 0.02
    folder = tmp_path_factory.mktemp("big") / "sat"
    (folder / "1").mkdir(parents=True)
    sat = to_original(sd, "sat-visualglm", cfg)
    # SAT's ChatGLM also saves an unused absolute-position table (the converter drops it)
    sat["transformer.position_embeddings.weight"] = torch.zeros(cfg.text_config.max_position_embeddings,
                                                                cfg.text_config.hidden_size)
    torch.save({"module": sat}, folder / "1" / "mp_rank_00_model_states.pt")
    (folder / "latest").write_text("1")
    (folder / "model_config.json").write_text(json.dumps(sat_model_config(cfg)))
    return folder


def _start(src, tokenizer, out):
    cmd = [PY, "-m", "modeling_visualglm.conversion.cli", *map(str, sat_args(src, out, tokenizer)), "--dtype", "bfloat16",
           "--max-shard-size", "20MB", "--no-progress"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_temp(procs_outs, timeout=120):
    """Poll until each process has its temporary folder beside its --out; returns {out: proc}."""
    pending, deadline = dict(procs_outs), time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for out, proc in list(pending.items()):
            if any(p.name.startswith(f".{out.name}.tmp-") for p in out.parent.iterdir()):
                yield out, proc
                del pending[out]
            elif proc.poll() is not None:
                raise AssertionError(f"the conversion ended before writing: {proc.communicate()}")
        time.sleep(0.002)
    assert not pending, "no temporary folder appeared"


def test_sigterm_and_sigkill_of_a_real_conversion(big_sat, tiny_tokenizer_dir, tmp_path):
    """Two real conversions of a 300 MB checkpoint: SIGTERM mid-write leaves nothing; SIGKILL leaves the
    temporary folder, which the next run (its process gone) removes before succeeding."""
    term_out, kill_out = tmp_path / "term" / "out", tmp_path / "kill" / "out"
    term_out.parent.mkdir()
    kill_out.parent.mkdir()
    procs = {out: _start(big_sat, tiny_tokenizer_dir, out) for out in (term_out, kill_out)}
    try:
        for out, proc in _wait_for_temp(procs):
            proc.send_signal(signal.SIGTERM if out is term_out else signal.SIGKILL)
        _, err = procs[term_out].communicate(timeout=60)
        assert procs[term_out].returncode == 128 + signal.SIGTERM, err
        assert "interrupted (SIGTERM)" in err and "Traceback" not in err
        assert_nothing_left(term_out)
        procs[kill_out].wait(timeout=60)
        assert procs[kill_out].returncode == -signal.SIGKILL
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    leftover = [p for p in kill_out.parent.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(leftover) == 1 and not kill_out.exists()
    rc, _, err = convert(*sat_args(big_sat, kill_out, tiny_tokenizer_dir, "--dtype", "bfloat16"))
    assert rc == 0, err
    assert f"removed {leftover[0]}, left by an interrupted run" in err
    assert sorted(p.name for p in kill_out.parent.iterdir()) == ["out"]
