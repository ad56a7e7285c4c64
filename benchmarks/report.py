"""docs/performance.md's tables, generated from the records in ``benchmarks/results/``.

Each table sits between two markers that name its kind (the renderer) and its records, in order (a later
record's rows replace an earlier one's for the same family):

    <!-- bench:table:start table-h100-80gb-hbm3-2026-11-23-4.json table-h100-80gb-hbm3-2026-11-23-5.json -->
    ... generated, do not edit ...
    <!-- bench:table:end -->

Everything outside the markers is prose and stays as written. ``python -m benchmarks.report`` rewrites the
tables; ``--check`` only fails when they differ from what the records give (tests/test_benchmarks.py runs it).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .families import FAMILIES
from .harness import RESULTS, ROOT, Record
from .models import prefill_floor_ms, text_step_params

DOC = ROOT / "docs" / "performance.md"
BLOCK = re.compile(r"<!-- bench:(?P<kind>[\w-]+):start (?P<files>[^>]*?) -->\n(?P<body>.*?)"
                   r"<!-- bench:(?P=kind):end -->", re.DOTALL)
ORDER = list(FAMILIES)


def _f(x, digits=1) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _by_family(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: ORDER.index(r["family"]))


def _merged(records, key="family") -> dict:
    """family → that family's rows, from the last record that has the family."""
    out = {}
    for record in records:
        fresh = {}
        for row in record.data["rows"]:
            fresh.setdefault(row[key], []).append(row)
        out.update(fresh)
    return {f: out[f] for f in ORDER if f in out}


def render_table(records: list[Record]) -> str:
    latest = {}  # family → (record, rows): a later record's rows replace an earlier one's
    for record in records:
        for family, rows in _merged([record]).items():
            latest[family] = (record, [r for r in rows if "error" not in r])
    caches = {r["cache"] for _, rows in latest.values() for r in rows}
    header = ["model", "batch"] + (["cache"] if len(caches) > 1 else []) + [
        "prompt", "TTFT ms", "decode tok/s per sequence", "tok/s total", "ms/step", "floor ms/step", "peak GiB"]
    out = []
    for family in ORDER:
        if family not in latest:
            continue
        record, rows = latest[family]
        lm_params = {f["family"]: f["lm_params"] for f in record.data["families"]}
        floor = lm_params[family] * 2 / (record.data["floors"]["copy_GBps"] * 1e9) * 1e3  # bf16 weights once a step
        for r in rows:
            out.append([FAMILIES[family].label, r["batch"]] + ([r["cache"]] if len(caches) > 1 else []) + [
                f"{r['prompt_len']:,}", _f(r["ttft_ms"]), _f(r.get("decode_tok_s_per_seq")),
                _f(r.get("decode_tok_s_total"), 0), _f(r.get("ms_per_step"), 2), _f(floor, 2), _f(r["peak_GiB"])])
    return _table(header, out)


def render_profile(records: list[Record]) -> str:
    header = ["model", "dynamic cache: wall ms/step", "GPU busy ms/step", "kernel launches/step",
              "static cache (`generate` compiles it): wall ms/step", "CUDA-graph replays/step", "kernel launches/step"]
    rows = []
    for r in _by_family([r for record in records for r in record.data["rows"]]):
        d, s = r["dynamic"], r["static"]
        rows.append([FAMILIES[r["family"]].label, _f(d["wall_ms_per_step"]), _f(d["gpu_busy_ms_per_step"]),
                     _f(d["kernel_launches_per_step"], 0), f"**{_f(s['wall_ms_per_step'], 2)}**",
                     _f(s["graph_launches_per_step"], 0), _f(s["kernel_launches_per_step"], 0)])
    return _table(header, rows)


def render_history(records: list[Record]) -> str:
    """VisualGLM's static-cache ms/step at batch 1 and 8, one row per record (its ``note`` names the code)."""
    rows = []
    for record in records:
        if record.mode == "profile":
            r = next(r for r in record.data["rows"] if r["family"] == "visualglm")
            b1, b8 = _f(r["static"]["wall_ms_per_step"], 2), "—"
        else:
            steps = {r["batch"]: r for r in record.data["rows"]
                     if r["family"] == "visualglm" and r["cache"] == "static"}
            b1, b8 = _f(steps[1]["ms_per_step"]), _f(steps[8]["ms_per_step"])
        rows.append([record.note, b1, b8, f"`{record.path.name}`"])
    return _table(["version", "static ms/step b=1", "static b=8", "record"], rows)


def render_split(records: list[Record]) -> str:
    rows, steps = [], None
    for family, runs in _merged(records).items():
        how = {r["how"].split(":")[0]: r for r in runs}
        if set(how) != {"gpu+cpu", "offload"}:
            raise SystemExit(f"split: no renderer for placements {sorted(how)} yet (benchmarks/report.py)")
        mixed, off = how["gpu+cpu"], how["offload"]
        steps = mixed["steps"]
        last = int(re.search(r"last language_model\.layers\.(\d+)", mixed["placement"]["0"]).group(1))
        layers = mixed.get("num_hidden_layers") or FAMILIES[family].config(False).text_config.num_hidden_layers
        same = f"yes ({steps}/{steps})" if off["identical_tokens"] else f"no ({off['identical_prefix_steps']}/{steps})"
        rows.append([FAMILIES[family].label, f"{FAMILIES[family].image_path}, layers 0–{last} of {layers}",
                     _f(mixed["gpu_weights_GiB"]), _f(off["greedy_s"]), same, _f(mixed["greedy_s"]),
                     _f(mixed["first_step_logits_rel_l2"], 4),
                     f"{mixed['identical_prefix_steps']}/{steps}, {mixed['token_agreement']:.2f}"])
    header = ["model", "GPU holds", "weights on GPU GiB", f"offload: {steps} tokens s", "offload: identical tokens",
              f"gpu+cpu: {steps} tokens s", "gpu+cpu: step-0 logits rel L2", "gpu+cpu: identical steps / agreement"]
    return _table(header, rows)


def render_determinism(records: list[Record]) -> str:
    families = _merged(records)
    settings = list(dict.fromkeys(r["setting"] for runs in families.values() for r in runs))
    header = ["setting"] + [f"{FAMILIES[f].label}: {runs[0]['prompt'][0]} × {runs[0]['prompt'][1]:,} tokens"
                            for f, runs in families.items()]
    rows = []
    for setting in settings:
        cells = []
        for runs in families.values():
            value = next((r["step1_logits_rel_l2"] for r in runs if r["setting"] == setting), None)
            cells.append("—" if value is None else f"{100 * value:.2f} %" if value else "0")
        rows.append([setting] + cells)
    return _table(header, rows)


def render_quant(records: list[Record]) -> str:
    header = ["model", "mode", "load s", "weights GiB", "quantized linears (outside the LM)", "b=1 ms/step",
              "b=8 ms/step", "peak GiB b=1 / b=8", "32 greedy tokens equal to bf16", "step-0 logits rel L2"]
    names, rows = {"bf16": "bf16", "4bit": "nf4", "8bit": "int8"}, []
    for family, runs in _merged(records).items():
        for r in runs:
            label = [FAMILIES[family].label, names[r["mode"]]]
            if r["mode"] == "bf16":
                rows.append(label + ["—", f"{r['weights_GiB']:.3g}", "—", _f(r["ms_per_step"])] + ["—"] * 4)
                continue
            agree, n = r["token_agreement"], r["steps"]
            same = (f"{n}/{n}" if agree == 1 else f"0/{n}" if agree == 0 else
                    f"first {r['identical_prefix_steps']}, {100 * agree:.0f} % overall")
            rows.append(label + [_f(r["load_s"]), f"{r['weights_GiB']:.3g}",
                                 f"{r['quantized_linears']} ({len(r['quantized_outside_language_model'])})",
                                 _f(r["b1"]["ms_per_step"]), _f(r["b8"]["ms_per_step"]),
                                 f"{_f(r['b1']['peak_GiB'])} / {_f(r['b8']['peak_GiB'])}", same,
                                 f"{r['first_step_logits_rel_l2']:.3f}"])
    return _table(header, rows)


def render_int4(records: list[Record]) -> str:
    """torchao's weight-only int4 against bf16 on the same decode path, one row per record and model."""
    header = ["model", "decode path", "bf16 ms/step", "int4 ms/step", "int4 speedup", "int4 weights GiB",
              "int4 peak GiB", "int4 first generate s", "step-0 logits rel L2 vs bf16", "32 greedy tokens equal"]
    paths = {"auto": "default: CUDA graph", "compile": "compiled + CUDA graph"}
    rows = []
    for record in records:
        path = paths[record.data["settings"].get("fast_decode") or "auto"]
        bf16 = {r["family"]: r for r in record.data["rows"] if r["mode"] == "bf16"}
        for r in record.data["rows"]:
            if r["mode"] != "int4":
                continue
            b1, base = r.get("b1", {}), bf16.get(r["family"], {})
            if "error" in b1:
                rows.append([FAMILIES[r["family"]].label, path, _f(base.get("ms_per_step"), 2), "failed"] + ["—"] * 6)
                continue
            n = r["steps"]
            rows.append([FAMILIES[r["family"]].label, path, _f(base.get("ms_per_step"), 2), _f(b1["ms_per_step"], 2),
                         f"{base['ms_per_step'] / b1['ms_per_step']:.2f}×", _f(r["weights_GiB"]),
                         _f(b1["peak_GiB"]), _f(b1.get("first_generate_s"), 1), f"{r['first_step_logits_rel_l2']:.3f}",
                         f"{round(r['token_agreement'] * n)}/{n}"])
    return _table(header, rows)


def render_fast(records: list[Record]) -> str:
    """Our decode paths against the floor: the bf16 weight bytes a text token's step reads (``text_step_params``:
    language model + LM head, no vision experts, one row of an untied input embedding) plus the KV bytes
    (batch × mean context × bytes per cached token), over the copy bandwidth measured in the same run.
    "graph alone": the captured step replayed back to back (no host work between); "syncs/step": synchronizing
    CUDA calls per decode step in generate (torch's sync debug mode); both only in records since they exist.
    "TTFT floor": ``prefill_floor_ms``, a roofline lower bound of the prefill (weights once, or matmul FLOPs)."""
    header = ["model", "path", "batch", "ms/step", "graph alone ms", "syncs/step", "floor ms/step", "% of floor",
              "TTFT ms", "TTFT floor ms", "first generate s", "peak GiB"]
    names = {"dynamic": "plain loop (dynamic cache)", "static": "transformers static + compile",
             "graphs": "**default**: CUDA graph", "compile": "compiled + CUDA graph"}
    rows = []
    for record in records:
        info = {f["family"]: f for f in record.data["families"]}
        for r in _by_family([r for r in record.data["rows"] if "error" not in r and "ms_per_step" in r]):
            f = info[r["family"]]
            context = r["prompt_len"] + record.data["settings"]["new_tokens"] / 2
            nbytes = text_step_params(r["family"]) * 2 + r["batch"] * context * f.get("kv_bytes_per_token", 0)
            floor = nbytes / (record.data["floors"]["copy_GBps"] * 1e9) * 1e3
            syncs = r.get("host_syncs_per_step")
            rows.append([FAMILIES[r["family"]].label, names[r["cache"]], r["batch"], _f(r["ms_per_step"], 2),
                         _f(r.get("replay_ms"), 2), "—" if syncs is None else f"{abs(syncs):.1f}", _f(floor, 2),
                         f"{100 * floor / r['ms_per_step']:.0f} %", _f(r["ttft_ms"]),
                         "—" if FAMILIES[r["family"]].kind == "peer" else
                         _f(prefill_floor_ms(r["family"], r["prompt_len"], r["batch"], record.data["floors"])),
                         _f(r.get("first_generate_s"), 1), _f(r["peak_GiB"])])
    return _table(header, rows)


def render_finetune(records: list[Record]) -> str:
    header = ["model", "method", "LoRA", "batch × tokens", "step s", "samples/s", "trainable params", "peak GiB"]
    rows = []
    for record in records:
        for r in record.data["rows"]:
            label = FAMILIES[r["family"]].label
            if "error" in r:
                rows.append([label, r["method"], "—", "—", "—", "—", "—", f"failed: {r['error'][:80]}"])
                continue
            rows.append([label, r["method"], r["lora"], f"{r['batch']} × {r['seq_len']:,}", _f(r["step_s"], 2),
                         _f(r["samples_per_s"], 2), f"{r['trainable_params']:,}", _f(r["peak_GiB"])])
    return _table(header, rows)


def render_compile_cache(records: list[Record]) -> str:
    header = ["model", "device", "1st process: first generate s", "2nd process (cache on disk): first generate s",
              "warm generate s"]
    rows = []
    for record in records:
        tiny = " (tiny preset)" if "--smoke-cpu" in (record.command or "") else ""
        for r in record.data["rows"]:
            label = FAMILIES[r["family"]].label + tiny
            first, second = r.get("first_process", {}), r.get("second_process", {})
            if "error" in first or "error" in second:
                rows.append([label, record.device, "failed", "failed", "—"])
                continue
            rows.append([label, record.device, _f(first["first_generate_s"], 1),
                         _f(second["first_generate_s"], 1), _f(second["warm_generate_s"], 2)])
    return _table(header, rows)


RENDERERS = {"compile_cache": render_compile_cache, "int4": render_int4, "fast": render_fast, "finetune": render_finetune, "table": render_table, "profile": render_profile, "history": render_history, "split": render_split,
             "determinism": render_determinism, "quant": render_quant}


def render_doc(text: str, results: Path = RESULTS) -> str:
    def block(m):
        names = m["files"].split()
        records = [Record.load(results / name) for name in names]
        sources = ", ".join(f"[`{name}`](../benchmarks/results/{name})" for name in names)
        body = f"Records: {sources}.\n\n{RENDERERS[m['kind']](records)}\n\n"
        return f"<!-- bench:{m['kind']}:start {m['files']} -->\n{body}<!-- bench:{m['kind']}:end -->"

    return BLOCK.sub(block, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail if the docs differ from what the records give")
    args = ap.parse_args(argv)
    text = DOC.read_text()
    new = render_doc(text)
    if args.check:
        if new != text:
            print(f"{DOC.relative_to(ROOT)} is out of date: run python -m benchmarks.report", file=sys.stderr)
            return 1
        return 0
    if new != text:
        DOC.write_text(new)
    print(f"{DOC.relative_to(ROOT)}: {len(BLOCK.findall(new))} tables {'rewritten' if new != text else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
