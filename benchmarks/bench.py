"""The benchmarks' one command: a subcommand per mode; every run writes one record to ``benchmarks/results/``.

    python -m benchmarks.bench table --families visualglm,peer --caches dynamic     # on a GPU
    python -m benchmarks.bench table --smoke-cpu                                     # tiny models, CPU: plumbing
    python -m benchmarks.bench report                                                # docs/performance.md tables

Run from the repository root (``benchmarks`` is not installed); ``modeling_visualglm`` comes from the install or
``PYTHONPATH=src``. What each mode measures and how to read it: docs/performance.md.
"""

from __future__ import annotations

import argparse
import importlib
import sys

MODES = ("table", "profile", "split", "quant", "determinism", "convert", "serve_load", "finetune", "compile_cache")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    for name in MODES:
        mode = importlib.import_module(f"benchmarks.modes.{name}")
        p = sub.add_parser(name, help=mode.__doc__.split("\n")[0].split(": ", 1)[1], description=mode.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if "families" in mode.DEFAULTS:
            p.add_argument("--families", help=f"comma-separated (default {mode.DEFAULTS['families']})")
        if "new_tokens" in mode.DEFAULTS:
            p.add_argument("--new-tokens", type=int, help=f"default {mode.DEFAULTS['new_tokens']}")
        mode.add_arguments(p)
        p.add_argument("--smoke-cpu", action="store_true",
                       help="tiny presets on the CPU: runs the mode's code end to end; its times mean nothing")
        p.add_argument("--device", default="cuda", help="where the models run (default cuda; --smoke-cpu: cpu)")
        p.add_argument("--results", help="folder for the record (default benchmarks/results; --smoke-cpu: none)")
        p.add_argument("--note", help="free text kept in the record (what code state this run measures)")
    rep = sub.add_parser("report", help="regenerate the tables of docs/performance.md from the records")
    rep.add_argument("--check", action="store_true", help="fail if the docs differ from what the records give")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.mode == "report":
        from . import report

        return report.main(["--check"] if args.check else [])

    import torch

    from .families import parse_families
    from .harness import RESULTS, Record

    mode = importlib.import_module(f"benchmarks.modes.{args.mode}")
    for key, value in (mode.SMOKE if args.smoke_cpu else mode.DEFAULTS).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if getattr(args, "families", None):
        parse_families(args.families)
    device = torch.device("cpu" if args.smoke_cpu or getattr(mode, "CPU_ONLY", False) else args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU machine, or pass --smoke-cpu (or --device cpu)")
        torch.backends.cuda.matmul.allow_tf32 = True
    results = args.results or (None if args.smoke_cpu else RESULTS)
    record = Record.start(args.mode, device, argv, note=args.note)

    def save():
        if results is not None:
            first = record.path is None
            path = record.save(results)
            if first:
                print(f"[record] {path}", flush=True)

    mode.run(args, device, record, save)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
