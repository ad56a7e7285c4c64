"""The benchmark harness on the CPU: the median, result records and their names, a ``--smoke-cpu`` run of the
table mode end to end on tiny models, and docs/performance.md's tables equal to what the committed records
give (benchmarks/report.py), so the docs cannot drift from the JSON.

Runs from the repository root (``python -m pytest``, as scripts/test.sh does): ``benchmarks`` is not installed.
"""

from __future__ import annotations

import datetime
import math
import json

import pytest

from benchmarks import bench, report
from benchmarks.harness import RESULTS, Record, device_slug, median


def test_median_of_odd_and_even_counts():
    assert median([3.0]) == 3.0
    assert median([5.0, 1.0, 3.0]) == 3.0
    assert median([4.0, 1.0]) == 2.5  # the mean of the two middle runs, not the slower one
    assert median([1.0, 9.0, 2.0, 4.0]) == 3.0
    with pytest.raises(ValueError):
        median([])


def test_device_slug():
    assert device_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert device_slug("NVIDIA H200", 2) == "h200-x2"
    assert device_slug("CPU Intel(R) Xeon(R) Processor") == "cpu"


def test_record_round_trips_with_its_file_name(tmp_path):
    record = Record(mode="table", date="2026-11-23", device="NVIDIA H100 80GB HBM3",
                    command="python -m benchmarks.bench table", torch="2.11.0", transformers="5.17.0",
                    data={"rows": [{"family": "peer", "ms_per_step": 1.5}]})
    first = record.save(tmp_path)
    assert first.name == "table-h100-80gb-hbm3-2026-11-23.json"
    assert record.save(tmp_path) == first  # later saves of one run overwrite its file
    again = Record.load(first)
    assert again == record and again.path == first
    assert json.loads(first.read_text())["rows"] == [{"family": "peer", "ms_per_step": 1.5}]
    second = Record.from_json(record.to_json()).save(tmp_path)  # another run on the same day
    assert second.name == "table-h100-80gb-hbm3-2026-11-23-2.json"
    with pytest.raises(ValueError, match="clash"):
        Record(mode="table", date="d", device="cpu", data={"device": "x"}).to_json()


def test_committed_records_are_named_by_their_content():
    paths = sorted(RESULTS.glob("*.json"))
    assert paths
    for path in paths:
        record = Record.load(path)
        assert record.date and record.torch and record.transformers, path.name
        assert path.name in {record.file_name(n) for n in range(1, 100)}, path.name


def test_every_mode_parses_with_smoke_defaults():
    import importlib

    for mode in bench.MODES:
        module = importlib.import_module(f"benchmarks.modes.{mode}")
        assert set(module.SMOKE) <= set(module.DEFAULTS), mode
        args = bench.parser().parse_args([mode, "--smoke-cpu"])
        assert args.mode == mode and args.smoke_cpu


def test_table_smoke_cpu_end_to_end(tmp_path):
    """The table mode's own code on tiny models: floors, two families, both caches, one record."""
    argv = ["table", "--smoke-cpu", "--families", "visualglm,peer", "--batches", "2", "--new-tokens", "3",
            "--results", str(tmp_path)]
    assert bench.main(argv) == 0
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    (path,) = tmp_path.iterdir()
    assert path.name == f"table-cpu-{today}.json"
    record = Record.load(path)
    assert record.mode == "table" and record.command.endswith("-m benchmarks.bench " + " ".join(argv))
    assert set(record.data["floors"]) >= {"copy_GBps", "bf16_matmul_TFLOPs", "fp32_matmul_TFLOPs"}
    rows = record.data["rows"]
    # our fast path ("graphs") does not apply to the peer, transformers' own Llama
    assert [(r["family"], r["cache"], r["batch"]) for r in rows] == [
        ("visualglm", "dynamic", 2), ("visualglm", "static", 2), ("visualglm", "graphs", 2), ("peer", "dynamic", 2),
        ("peer", "static", 2)]
    assert all("error" not in r and len(r["total_runs_s"]) == 1 for r in rows)
    assert all(r["same_tokens_as_dynamic"] for r in rows if r["cache"] != "dynamic")
    (visualglm,) = [f for f in record.data["families"] if f["family"] == "visualglm"]
    assert visualglm["consistency"]["cached_vs_full_rel_l2"] < 1e-4  # fp32 on tiny models
    table = report.render_table([record]).splitlines()
    assert table[0].startswith("| model | batch | cache | prompt |") and len(table) == 2 + len(rows)


def test_finetune_smoke_cpu_end_to_end(tmp_path):
    """The finetune mode's own code on tiny models: LoRA with the family defaults, real steps, finite losses."""
    argv = ["finetune", "--smoke-cpu", "--families", "visualglm,cogvlm2", "--results", str(tmp_path)]
    assert bench.main(argv) == 0
    (path,) = tmp_path.iterdir()
    rows = Record.load(path).data["rows"]
    assert [(r["family"], r["method"]) for r in rows] == [("visualglm", "lora"), ("cogvlm2", "lora")]
    for r in rows:
        assert "error" not in r and r["trainable_params"] > 0 and math.isfinite(r["loss"]) and r["step_s"] > 0
    assert report.render_finetune([Record.load(path)]).count("\n") == 3


def test_compile_cache_smoke_cpu_end_to_end(tmp_path):
    """The compile_cache mode's own code: two child processes per family sharing one new inductor cache folder,
    each reporting its first (compiling) and its warm generate (no timing is asserted: the record is the
    measurement)."""
    argv = ["compile_cache", "--smoke-cpu", "--families", "minigpt4-7b", "--new-tokens", "2", "--results",
            str(tmp_path)]
    assert bench.main(argv) == 0
    (path,) = tmp_path.iterdir()
    (row,) = Record.load(path).data["rows"]
    for label in ("first_process", "second_process"):
        assert "error" not in row[label], row[label]
        assert row[label]["first_generate_s"] > 0 and row[label]["warm_generate_s"] > 0
    assert report.render_compile_cache([Record.load(path)]).count("\n") == 2


def test_performance_md_tables_are_generated_from_the_records():
    text = report.DOC.read_text()
    assert len(report.BLOCK.findall(text)) >= 6
    assert report.render_doc(text) == text, "docs/performance.md is out of date: run python -m benchmarks.report"


def test_floor_weights_are_those_a_text_token_reads():
    """The decode floor's parameter count, re-derived by hand for the LLaMA-7B shape (32 layers, hidden 4096, MLP
    11008, vocab 32000): every layer's attention (4 H²) and SwiGLU (3 H I) weights and two norms, the final norm,
    the LM head and one row of the untied input embedding. CogVLM's language expert has exactly that shape: its
    vision experts are not counted."""
    from benchmarks.models import text_step_params

    hidden, mlp, layers, vocab = 4096, 11008, 32, 32000
    expected = layers * (4 * hidden**2 + 3 * hidden * mlp + 2 * hidden) + hidden + vocab * hidden + hidden
    assert text_step_params("peer") == expected
    assert text_step_params("cogvlm") == expected


def test_prefill_floor_is_the_larger_of_bytes_and_flops():
    from benchmarks.models import _meta_model, prefill_floor_ms

    params = sum(p.numel() for p in _meta_model("minigpt4-7b").parameters())
    bytes_bound = {"copy_GBps": 1.0, "bf16_matmul_TFLOPs": 1e9}  # reading dominates: 2 bytes per parameter
    assert prefill_floor_ms("minigpt4-7b", 60, 1, bytes_bound) == pytest.approx(2 * params / 1e9 * 1e3)
    flops_bound = {"copy_GBps": 1e12, "bf16_matmul_TFLOPs": 1.0}  # compute dominates: grows with batch and length
    one = prefill_floor_ms("minigpt4-7b", 60, 1, flops_bound)
    assert prefill_floor_ms("minigpt4-7b", 60, 4, flops_bound) == pytest.approx(4 * one)
    assert prefill_floor_ms("minigpt4-7b", 120, 1, flops_bound) > one
    # at least the vision tower's 2 FLOPs per parameter per patch (16 × 16 + 1 at 224 px, patch 14)
    vision = sum(p.numel() for p in _meta_model("minigpt4-7b").vision_model.parameters())
    assert one >= 2 * vision * 257 / 1e12 * 1e3
