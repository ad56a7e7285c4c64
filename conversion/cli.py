"""``visualglm-convert``: one command for every source format (CONTRACTS §1).

    visualglm-convert --format FORMAT --out DIR [source flags] [--tokenizer PATH]
                      [--dtype keep|float32|float16|bfloat16] [--max-shard-size 5GB] [--force]

Exit codes: 0 success, 1 conversion error (bad or inconsistent input), 2 usage error (including an existing
``--out`` without ``--force``). The coverage report goes to stdout, progress bars and errors to stderr.
The folder is built beside ``--out`` and renamed into place only when complete: a failed run leaves
nothing at ``--out`` (and an existing one untouched).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .apply import DTYPES, build_plan, human_bytes
from .errors import ConversionError, UsageError
from .formats import FORMATS, SOURCE_FLAGS

PROG = "visualglm-convert"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Convert an original VisualGLM / CogVLM / MiniGPT-4 checkpoint into a hub folder "
                    "(safetensors + remote code + tokenizer + processor + model card), or an original LLaMA / "
                    "FastChat delta into a plain transformers Llama folder.",
        epilog="Formats: " + "; ".join(f"{n}: {f.help}" for n, f in FORMATS.items()),
    )
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="source format (never guessed)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    src = p.add_argument_group("source flags (which ones depends on --format)")
    for flag, help_text in SOURCE_FLAGS.items():
        kwargs = {"help": help_text}
        if flag == "qkv_layout":
            kwargs["choices"] = ["blocked", "interleaved"]
            kwargs["help"] += "; default blocked (SAT releases since July 2023)"
        src.add_argument("--" + flag.replace("_", "-"), dest=flag, **kwargs)
    p.add_argument("--tokenizer", help="tokenizer file or folder (default: the source folder's, if any)")
    p.add_argument("--dtype", default="keep", choices=["keep", *DTYPES],
                   help="cast floating tensors (default keep: each tensor's source dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace an existing --out once the new folder is complete")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args) -> int:
    from hub_export.weights import parse_size
    from hub_export.writer import staged_output

    fmt = FORMATS[args.format]
    fmt.check_flags(args)
    try:
        max_shard = parse_size(args.max_shard_size)
    except ValueError as e:
        raise UsageError(f"--max-shard-size: {e}") from None
    out = Path(args.out)
    if out.exists() and not args.force:
        raise UsageError(f"--out {out} already exists; pass --force to replace it (it is left untouched)")
    dtype = None if args.dtype == "keep" else DTYPES[args.dtype]
    start = time.perf_counter()
    with staged_output(out, force=args.force) as tmp:
        loaded = fmt.load(args)
        try:
            plan = build_plan(loaded.source, loaded.rules, loaded.config, loaded.model_class,
                              format_name=fmt.name, dtype=dtype)
            print(plan.coverage_report())
            for note in loaded.notes:
                print(f"  note: {note}")
            sys.stdout.flush()
            if loaded.family is None:  # a model transformers itself implements: no remote code
                result = _write_plain(tmp, loaded, plan, max_shard, args)
            else:
                result = _write_hub(tmp, loaded, plan, max_shard, args, out, fmt)
        finally:
            loaded.source.close()
    took = time.perf_counter() - start
    code = f"; code: {', '.join(result.code_files)}" if hasattr(result, "code_files") else " (plain transformers folder)"
    print(f"wrote {out} in {took:.1f}s: {len(result.weight_files)} weight file(s), "
          f"{human_bytes(result.total_size)}{code}")
    if not result.complete:
        if loaded.family is None:
            print(f"WARNING: {out} has NO TOKENIZER: re-run with --tokenizer (a tokenizer.model or its folder)")
        else:
            print(f"WARNING: {out} is INCOMPLETE (no tokenizer): re-run with --tokenizer; "
                  "`visualglm-export check` fails on it until then")
    return 0


def _write_plain(tmp, loaded, plan, max_shard, args):
    from .plain import ids_generation_config, write_plain_folder

    return write_plain_folder(
        tmp,
        config=plan.config,
        architecture=loaded.model_class.__name__,
        weight_entries=plan.weight_entries(),
        dtype=plan.main_dtype(),
        tokenizer=loaded.tokenizer,
        generation_config=ids_generation_config(plan.config),
        max_shard_size=max_shard,
        progress=not args.no_progress,
    )


def _write_hub(tmp, loaded, plan, max_shard, args, out, fmt):
    from hub_export.writer import write_hub_folder

    source_note = (
        f"Converted with `{PROG} --format {fmt.name}` (modeling_visualglm) from the original "
        f"checkpoint: " + "; ".join(loaded.notes) + f". Tied weights: {plan.tie_note or 'none'}."
    )
    return write_hub_folder(
        tmp,
        family=loaded.family,
        config=plan.config,
        weight_entries=plan.weight_entries(),
        dtype=plan.main_dtype(),
        tokenizer=loaded.tokenizer,
        max_shard_size=max_shard,
        model_id=str(out.absolute()),
        source_note=source_note,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits with 2 on usage errors
    try:
        return run(args)
    except UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except ConversionError as e:
        print(f"{PROG}: conversion failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written to --out", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
