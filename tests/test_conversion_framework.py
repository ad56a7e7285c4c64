"""The conversion framework on stand-in models: rule templates, named ops, the checking applier, safe
memory-mapped loading, sharded safetensors writing and the staged output folder."""

import json
import os
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch
from torch import nn

from modeling_visualglm.conversion.apply import build_plan
from modeling_visualglm.conversion.errors import ConversionError
from modeling_visualglm.conversion.ops import OPS, block_qkv_heads, interleave_qkv_heads
from modeling_visualglm.conversion.rules import convert, drop, rename
from modeling_visualglm.conversion.sources import SafetensorsSource, load_torch_file, sharded_torch_source, torch_file_source
from modeling_visualglm.hub_export.code import import_closure
from modeling_visualglm.hub_export.weights import parse_size, write_safetensors_shards
from modeling_visualglm.hub_export.writer import OUTPUT_MARKER, OutputRefused, staged_output


# --- rule templates ------------------------------------------------------------------------------------

def test_template_slots_alternatives_and_literal_dots():
    r = rename("enc.layers.{i}.{ln:norm1|norm2}.{wb}", "model.blocks.{i}.{ln}.{wb}")
    assert r.match("enc.layers.12.norm2.bias") == (0, {"i": "12", "ln": "norm2", "wb": "bias"})
    assert r.target_names({"i": "12", "ln": "norm2", "wb": "bias"}) == ("model.blocks.12.norm2.bias",)
    assert r.match("enc.layers.x.norm1.weight") is None  # {i} is digits only
    assert r.match("enc.layers.1.norm3.weight") is None  # not an alternative
    assert r.match("encXlayers.1.norm1.weight") is None  # dots are literal
    assert r.match("enc.layers.1.norm1.weight.extra") is None  # full match
    assert r.invert("model.blocks.3.norm1.weight") == ("enc.layers.3.norm1.weight",)


def test_repeated_slot_must_agree_and_bad_tables_are_refused():
    r = rename("a.{i}.b.{i}", "x.{i}")
    assert r.match("a.3.b.3") is not None and r.match("a.3.b.4") is None
    with pytest.raises(ValueError, match="slots"):
        rename("a.{i}", "b.{j}")  # target slot the source lacks
    with pytest.raises(ValueError, match="default pattern"):
        rename("a.{mystery}", "b")
    with pytest.raises(ValueError, match="reason"):
        drop("a", "")


# --- ops -----------------------------------------------------------------------------------------------

def test_interleave_qkv_heads_against_per_head_construction():
    nh, hd, hin = 3, 2, 5
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(nh, hd, hin, generator=g) for _ in range(3))
    blocked = torch.cat([q.reshape(nh * hd, hin), k.reshape(nh * hd, hin), v.reshape(nh * hd, hin)])
    # interleaved = for each head h: q_h, k_h, v_h (THUDM-HF ChatGLM layout), built row by row
    rows = []
    for h in range(nh):
        rows += [q[h], k[h], v[h]]
    interleaved = torch.cat(rows)
    (out,) = interleave_qkv_heads(blocked, num_heads=nh)
    assert torch.equal(out, interleaved)
    (back,) = block_qkv_heads(out, num_heads=nh)
    assert torch.equal(back, blocked)
    # biases and meta tensors go through the same path
    (b,) = interleave_qkv_heads(blocked[:, 0].contiguous(), num_heads=nh)
    assert torch.equal(b, interleaved[:, 0])
    (m,) = interleave_qkv_heads(torch.empty(3 * nh * hd, hin, device="meta"), num_heads=nh)
    assert m.shape == (3 * nh * hd, hin)
    with pytest.raises(ValueError, match="heads"):
        interleave_qkv_heads(torch.zeros(10, 2), num_heads=3)


def test_fuse_qkv_stacks_blocked():
    t = torch.arange(12.0).reshape(6, 2)
    (fused,) = OPS["fuse_qkv"](t[:2], t[2:4], t[4:])
    assert torch.equal(fused, t)


# --- applier on a stand-in model -----------------------------------------------------------------------

class StandInConfig:
    def __init__(self, vocab=11, hidden=4, layers=2, tie=True):
        self.vocab, self.hidden, self.layers, self.tie_word_embeddings = vocab, hidden, layers, tie
        self.sub_configs = {}


class StandInModel(nn.Module):
    """Embedding → layers of fused qkv (3 heads) + norm → tied head, like a tiny decoder."""

    def __init__(self, config):
        super().__init__()
        self.embed = nn.Embedding(config.vocab, config.hidden)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"qkv": nn.Linear(config.hidden, 3 * config.hidden), "norm": nn.LayerNorm(config.hidden)})
            for _ in range(config.layers)
        )
        self.head = nn.Linear(config.hidden, config.vocab, bias=False)
        self.register_buffer("scratch", torch.zeros(2), persistent=False)
        self.all_tied_weights_keys = {"head.weight": "embed.weight"} if config.tie_word_embeddings else {}
        if config.tie_word_embeddings:
            self.head.weight = self.embed.weight


RULES = [
    rename("tok.weight", "embed.weight"),
    convert("blk.{i}.attn.{wb}", "layers.{i}.qkv.{wb}", "interleave_qkv_heads", num_heads=2),
    rename("blk.{i}.ln.{wb}", "layers.{i}.norm.{wb}"),
    rename("out.weight", "head.weight"),
    drop("pos.weight", "unused absolute positions"),
]


def original_sd(seed=0, vocab=11, hidden=4, layers=2, head_equal=True):
    g = torch.Generator().manual_seed(seed)
    sd = {"tok.weight": torch.randn(vocab, hidden, generator=g), "pos.weight": torch.randn(7, hidden, generator=g)}
    for i in range(layers):
        sd[f"blk.{i}.attn.weight"] = torch.randn(3 * hidden, hidden, generator=g)
        sd[f"blk.{i}.attn.bias"] = torch.randn(3 * hidden, generator=g)
        sd[f"blk.{i}.ln.weight"] = torch.randn(hidden, generator=g)
        sd[f"blk.{i}.ln.bias"] = torch.randn(hidden, generator=g)
    sd["out.weight"] = sd["tok.weight"].clone() if head_equal else torch.randn(vocab, hidden, generator=g)
    return sd


def source_of(tmp_path, sd, name="ckpt.pt"):
    path = tmp_path / name
    torch.save({"module": sd}, path)
    return torch_file_source(path, subkey="module")


def test_plan_converts_ties_and_reports(tmp_path):
    sd = original_sd()
    plan = build_plan(source_of(tmp_path, sd), RULES, StandInConfig(), StandInModel, format_name="toy")
    assert plan.tied == {"head.weight": "embed.weight"}
    assert plan.config.tie_word_embeddings is True
    out = {}
    for names, nbytes, producer in plan.weight_entries():
        tensors = producer()
        assert set(tensors) == set(names) and nbytes == sum(t.nbytes for t in tensors.values())
        out.update(tensors)
    model = StandInModel(StandInConfig())
    assert set(out) == set(model.state_dict()) - {"head.weight"}
    assert torch.equal(out["layers.1.qkv.weight"], interleave_qkv_heads(sd["blk.1.attn.weight"], num_heads=2)[0])
    assert torch.equal(out["layers.0.norm.bias"], sd["blk.0.ln.bias"])
    report = plan.coverage_report()
    assert "dropped: unused absolute positions" in report and "head.weight = embed.weight" in report
    assert "interleave_qkv_heads(num_heads=2)" in report


def test_untied_head_is_kept_and_config_untied(tmp_path):
    plan = build_plan(source_of(tmp_path, original_sd(head_equal=False)), RULES, StandInConfig(), StandInModel,
                      format_name="toy")
    assert plan.tied == {} and plan.config.tie_word_embeddings is False
    assert "head.weight" in plan.target_infos and "kept separate" in plan.tie_note


def test_dtype_cast_only_touches_floating_tensors(tmp_path):
    sd = original_sd()
    plan = build_plan(source_of(tmp_path, sd), RULES, StandInConfig(), StandInModel, format_name="toy",
                      dtype=torch.bfloat16)
    assert {i.dtype for i in plan.target_infos.values()} == {torch.bfloat16}
    assert plan.main_dtype() == torch.bfloat16


def test_every_problem_is_reported_at_once(tmp_path):
    sd = original_sd()
    del sd["blk.1.ln.weight"]  # missing
    sd["blk.0.extra.weight"] = torch.zeros(2)  # extra
    sd["blk.0.ln.bias"] = torch.zeros(5)  # wrong shape
    sd["blk.1.attn.bias"] = torch.zeros(10)  # an op refusing a shape (10 rows ≠ 3 x 2 heads x hd)
    with pytest.raises(ConversionError) as info:
        build_plan(source_of(tmp_path, sd), RULES, StandInConfig(), StandInModel, format_name="toy")
    msg = str(info.value)
    assert "(4 problems)" in msg
    assert "missing: 'layers.1.norm.weight' [4] needs source tensor 'blk.1.ln.weight'" in msg
    assert "unexpected source tensor 'blk.0.extra.weight'" in msg
    assert "wrong shape: 'layers.0.norm.bias' would be [5]" in msg and "expects [4]" in msg
    assert "interleave_qkv_heads cannot convert ['blk.1.attn.bias'] [[10]]" in msg


def test_ambiguous_table_and_target_not_in_model(tmp_path):
    rules = RULES + [rename("blk.{i}.ln.weight", "layers.{i}.norm.weight"), rename("pos.weight", "nowhere")]
    sd = original_sd()
    with pytest.raises(ConversionError) as info:
        build_plan(source_of(tmp_path, sd), rules, StandInConfig(), StandInModel, format_name="toy")
    msg = str(info.value)
    assert "'blk.0.ln.weight' matches 2 rules" in msg and "'pos.weight' matches 2 rules" in msg


def test_multi_source_rule_needs_all_members(tmp_path):
    rules = [rename("tok.weight", "embed.weight"), rename("out.weight", "head.weight"),
             convert(("blk.{i}.q", "blk.{i}.k", "blk.{i}.v"), "layers.{i}.qkv.weight", "fuse_qkv"),
             rename("blk.{i}.qkv_bias", "layers.{i}.qkv.bias"), rename("blk.{i}.ln.{wb}", "layers.{i}.norm.{wb}")]
    sd = {k: v for k, v in original_sd(layers=1).items() if k.startswith(("tok", "out", "blk.0.ln"))}
    w = torch.randn(12, 4)
    sd.update({"blk.0.q": w[:4], "blk.0.k": w[4:8].clone(), "blk.0.qkv_bias": torch.zeros(12)})
    sd["blk.0.q"] = sd["blk.0.q"].clone()
    with pytest.raises(ConversionError, match=r"needs \['blk.0.v'\]"):
        build_plan(source_of(tmp_path, sd), rules, StandInConfig(layers=1), StandInModel, format_name="toy")
    sd["blk.0.v"] = w[8:].clone()
    plan = build_plan(source_of(tmp_path, sd, "ok.pt"), rules, StandInConfig(layers=1), StandInModel,
                      format_name="toy")
    (entry,) = [e for e in plan.weight_entries() if e[0] == ("layers.0.qkv.weight",)]
    assert torch.equal(entry[2]()["layers.0.qkv.weight"], w)


# --- safe, memory-mapped loading -----------------------------------------------------------------------

class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"module": {"w": torch.zeros(2)}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(ConversionError, match=r"refusing to load.*GLOBAL|refusing to load.*global (posix|os)\.system"):
        load_torch_file(path)
    assert not marker.exists()
    # the same pickle really runs code without weights_only: the test can fail
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(path)!r}, weights_only=False)"], check=True)
    assert marker.exists()


def test_truncated_and_foreign_files(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"module": {"w": torch.randn(100, 100)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated or corrupt"):
        load_torch_file(path)
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ConversionError, match="not a PyTorch checkpoint"):
        load_torch_file(tmp_path / "text.pt")
    with pytest.raises(ConversionError, match="file not found"):
        load_torch_file(tmp_path / "absent.pt")


def test_reads_are_memory_mapped_and_deepspeed_client_state_loads(tmp_path):
    import random

    import numpy as np

    path = tmp_path / "ds.pt"
    sd = {"w": torch.randn(8, 8)}
    torch.save({"module": sd, "iteration": 3, "random_rng_state": random.getstate(),
                "np_rng_state": np.random.get_state(), "torch_rng_state": torch.get_rng_state(),
                "param_shapes": [{"w": torch.Size([8, 8])}], "ds_version": "0.9.5",
                "sparse_tensor_module_names": set()}, path)
    assert zipfile.is_zipfile(path)
    src = torch_file_source(path, subkey="module")
    t = src.get("w")
    assert torch.equal(t, sd["w"])
    # memory-mapped: the tensor's bytes lie inside a mapping of the checkpoint file itself
    assert _mapped_from(t, path)


def _mapped_from(t, path) -> bool:
    ptr = t.untyped_storage().data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == str(path):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= ptr < hi:
                    return True
    return False


def test_legacy_format_without_mmap_still_loads(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"module": {"w": torch.ones(3)}}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(torch_file_source(path, subkey="module").get("w"), torch.ones(3))


def test_sharded_torch_source_checks_the_index(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "p-1.bin")
    torch.save({"b": torch.zeros(3)}, tmp_path / "p-2.bin")
    index = {"metadata": {}, "weight_map": {"a": "p-1.bin", "b": "p-2.bin"}}
    (tmp_path / "index.json").write_text(json.dumps(index))
    src = sharded_torch_source(tmp_path, "index.json", "single.bin")
    assert sorted(src.keys()) == ["a", "b"] and src.info("b").shape == (3,)
    index["weight_map"]["b"] = "p-1.bin"
    index["weight_map"]["c"] = "p-2.bin"
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError) as info:
        sharded_torch_source(tmp_path, "index.json", "single.bin")
    assert "maps 'b' to p-1.bin, but it is in p-2.bin" in str(info.value)
    assert "maps 'c' to p-2.bin, which does not contain it" in str(info.value)


def test_safetensors_source(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.arange(6.0).reshape(2, 3)}, str(tmp_path / "a.safetensors"))
    src = SafetensorsSource([tmp_path / "a.safetensors"], "a")
    assert src.info("x").shape == (2, 3) and src.info("x").dtype == torch.float32
    assert torch.equal(src.get("x"), torch.arange(6.0).reshape(2, 3))
    (tmp_path / "b.safetensors").write_bytes((tmp_path / "a.safetensors").read_bytes()[:-5])
    with pytest.raises(ConversionError, match="truncated or corrupt"):
        SafetensorsSource([tmp_path / "b.safetensors"], "b")


# --- writing -------------------------------------------------------------------------------------------

def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size("1234") == 1234
    with pytest.raises(ValueError):
        parse_size("five gigs")


def test_shards_respect_max_size_and_index(tmp_path):
    from safetensors import safe_open

    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(7)}  # 400 bytes each
    entries = [((k,), v.nbytes, lambda k=k, v=v: {k: v}) for k, v in tensors.items()]
    info = write_safetensors_shards(entries, tmp_path, max_shard_size=1000, progress=False)
    assert info["files"] == [f"model-0000{k}-of-00004.safetensors" for k in range(1, 5)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 2800, "total_parameters": 700}
    assert set(index["weight_map"]) == set(tensors)
    for fname in info["files"]:
        assert (tmp_path / fname).stat().st_size < 1000 + 512  # two tensors + header per shard
        with safe_open(str(tmp_path / fname), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for k in f.keys():
                assert index["weight_map"][k] == fname and torch.equal(f.get_tensor(k), tensors[k])
    one = tmp_path / "one"
    one.mkdir()
    assert write_safetensors_shards(entries, one, max_shard_size="1GB", progress=False)["files"] == ["model.safetensors"]
    assert not (one / "model.safetensors.index.json").exists()


def test_only_one_shard_of_tensors_is_alive_at_a_time(tmp_path):
    """Peak memory ~ one shard: a shard's tensors are released before the next shard is produced."""
    import gc
    import weakref

    alive = weakref.WeakSet()
    peak = []

    def producer(k):
        def make():
            gc.collect()
            peak.append(len(alive))
            t = torch.full((250,), float(k))  # 1000 bytes
            alive.add(t)
            return {f"t{k}": t}
        return make

    entries = [((f"t{k}",), 1000, producer(k)) for k in range(12)]
    write_safetensors_shards(entries, tmp_path, max_shard_size=3000, progress=False)
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    # while producing tensor k, only the earlier tensors of the same 3-tensor shard are alive
    assert peak == [k % 3 for k in range(12)]


def test_staged_output_success_failure_and_force(tmp_path):
    out = tmp_path / "out"
    with staged_output(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out
        (tmp / "a").write_text("new")
    assert (out / "a").read_text() == "new"
    with pytest.raises(FileExistsError):
        with staged_output(out):
            pass
    with pytest.raises(RuntimeError):
        with staged_output(out, force=True) as tmp:
            (tmp / "a").write_text("newer")
            raise RuntimeError("boom")
    assert (out / "a").read_text() == "new"  # untouched by the failed forced run
    with staged_output(out, force=True) as tmp:
        (tmp / "b").write_text("replaced")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "b"]  # the marker --force looks for
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with pytest.raises(OutputRefused, match="did not write"):
        with staged_output(foreign, force=True):
            pass


def test_import_closure_follows_relative_imports_only(tmp_path):
    (tmp_path / "modeling_a.py").write_text("import torch\nfrom .blocks import X\nfrom . import helpers\n")
    (tmp_path / "blocks.py").write_text("from .attention import f\n")
    (tmp_path / "attention.py").write_text("import math\n")
    (tmp_path / "helpers.py").write_text("")
    (tmp_path / "modeling_other_family.py").write_text("from .blocks import X\n")
    names = [p.name for p in import_closure(tmp_path, ["modeling_a"])]
    assert names == ["attention.py", "blocks.py", "helpers.py", "modeling_a.py"]
    (tmp_path / "bad.py").write_text("from .missing import y\n")
    with pytest.raises(FileNotFoundError, match="missing"):
        import_closure(tmp_path, ["bad"])


def test_pickle_payload_helper_is_a_real_exploit(tmp_path):
    """Guards the malicious-pickle test: the payload class must reduce to os.system."""
    marker = tmp_path / "m"
    func, args = _RunsCode(marker).__reduce__()
    assert func is os.system and str(marker) in args[0]
    assert pickle.dumps(_RunsCode(marker))
