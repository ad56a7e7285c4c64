"""``visualglm-convert``: one command for every source format (CONTRACTS §1).

    visualglm-convert --format FORMAT --out DIR [source flags] [--tokenizer PATH]
                      [--dtype keep|float32|float16|bfloat16] [--max-shard-size 5GB] [--force]
                      [--allow-nonfinite] [--lora-as-adapter [DIR]]

``--lora-as-adapter`` (sat-visualglm, sat-cogvlm): a fine-tuned checkpoint's SAT LoRA goes to a peft adapter folder
(DIR, default ``OUT-lora``) instead of being merged (conversion/lora.py); it is written and checked like ``--out``.

Exit codes: 0 success, 1 conversion error (bad or inconsistent input, a full disk), 2 usage error (including
an existing ``--out`` without ``--force``, an ``--out`` this tool did not write, and an ``--out`` that is,
contains or lies inside a source). Every error is one line (or one message listing every problem), never a
traceback. The coverage report goes to stdout, progress bars, warnings and errors to stderr.

A source is never written to. The folder is built beside ``--out`` and renamed into place only when complete:
a failed or interrupted run (SIGINT, SIGTERM, SIGHUP) leaves nothing at ``--out`` (and an existing one
untouched); the temporary folder of a run killed outright (SIGKILL) is removed by the next run.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from .apply import DTYPES, build_plan, human_bytes
from .errors import ConversionError, Interrupted, UsageError
from .formats import FORMATS, SOURCE_FLAGS
from .lora import adapter_dir

PROG = "visualglm-convert"
# the source flags that name files or folders (every one is protected from being written to)
PATH_FLAGS = ("src", "base", "delta", "ckpt", "llm", "blip2", "vit", "tokenizer")
# set to 1 to get the traceback of an unexpected error (a bug) instead of its one-line summary
TRACEBACK_ENV = "VISUALGLM_CONVERT_TRACEBACK"


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
        if flag == "lora_as_adapter":  # a bare flag writes OUT-lora (conversion.lora.adapter_dir)
            kwargs.update(nargs="?", const="", metavar="DIR")
        src.add_argument("--" + flag.replace("_", "-"), dest=flag, **kwargs)
    p.add_argument("--tokenizer", help="tokenizer file or folder (default: the source folder's, if any)")
    p.add_argument("--dtype", default="keep", choices=["keep", *DTYPES],
                   help="cast floating tensors (default keep: each tensor's source dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out once the new folder is complete (only a folder this tool wrote)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert source tensors that hold NaN/inf as they are, with a warning (default: an error)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _existing_ancestors(path: Path):
    for p in (path, *path.parents):
        if p.exists():
            yield p


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def overlap(out: Path, source: Path) -> str | None:
    """How ``out`` overlaps ``source`` ("is", "contains", "lies inside") or None, comparing the paths as given
    (absolute), with symlinks resolved, and by file identity (bind mounts, case-insensitive file systems)."""
    out_abs, src_abs = Path(os.path.abspath(out)), Path(os.path.abspath(source))
    out_res, src_res = out_abs.resolve(), src_abs.resolve()
    if out_abs == src_abs or out_res == src_res or _same(out_res, src_res):
        return "is"
    if _inside(src_abs, out_abs) or _inside(src_res, out_res) or any(
            _same(a, out_res) for a in _existing_ancestors(src_res)):
        return "contains"
    if _inside(out_abs, src_abs) or _inside(out_res, src_res) or any(
            _same(a, src_res) for a in _existing_ancestors(out_res)):
        return "lies inside"
    return None


def check_out(args, out: Path) -> None:
    """Refuse an ``--out`` that would write to a source, replace a folder this tool did not write, or follow a
    symlink (all usage errors, before anything is read)."""
    from ..hub_export.writer import refuse_reason

    clashes = []
    for flag in PATH_FLAGS:
        value = getattr(args, flag, None)
        if value is None:
            continue
        how = overlap(out, Path(value))
        if how:
            clashes.append(f"--out {out} {how} the source --{flag.replace('_', '-')} {value}")
    adapter = adapter_dir(args)
    if adapter is not None:
        clashes += [f"the adapter folder {adapter} {how} the source --{flag.replace('_', '-')} {value}"
                    for flag in PATH_FLAGS if (value := getattr(args, flag, None)) is not None
                    and (how := overlap(adapter, Path(value)))]
        if overlap(adapter, out):
            clashes.append(f"the adapter folder {adapter} {overlap(adapter, out)} --out {out}")
    if clashes:
        raise UsageError("; ".join(clashes) + ": a source is never written to (with or without --force); "
                         "choose an --out outside every source", show_usage=False)
    for folder in (out, adapter) if adapter is not None else (out,):
        reason = refuse_reason(folder, args.force)
        if reason is not None:
            raise UsageError(reason, show_usage=False)


def run(args) -> int:
    from ..hub_export.weights import parse_size
    from ..hub_export.writer import staged_output

    fmt = FORMATS[args.format]
    fmt.check_flags(args)
    try:
        max_shard = parse_size(args.max_shard_size)
    except ValueError as e:
        raise UsageError(f"--max-shard-size: {e}") from None
    out = Path(args.out)
    check_out(args, out)
    dtype = None if args.dtype == "keep" else DTYPES[args.dtype]
    start = time.perf_counter()
    # read and check everything before anything is created beside --out
    loaded = fmt.load(args)
    try:
        plan = build_plan(loaded.source, loaded.rules, loaded.config, loaded.model_class,
                          format_name=fmt.name, dtype=dtype, allow_nonfinite=args.allow_nonfinite)
        adapter_plan = _adapter_plan(loaded, fmt, dtype, args)  # checked before anything is written, too
        print(plan.coverage_report())
        for note in loaded.notes:
            print(f"  note: {note}")
        if adapter_plan is not None:
            print(adapter_plan.coverage_report())
        sys.stdout.flush()
        try:
            with _adapter_undone_on_failure(loaded), staged_output(out, force=args.force,
                                                                  marker={"format": fmt.name}) as tmp:
                if loaded.family is None:  # a model transformers itself implements: no remote code
                    result = _write_plain(tmp, loaded, plan, max_shard, args)
                else:
                    result = _write_hub(tmp, loaded, plan, max_shard, args, out, fmt)
                warnings = plan.finish_data_checks()  # raises (and the folder is dropped) on overflow / NaN
                if adapter_plan is not None:  # renamed into place just before --out: see _write_adapter
                    warnings += _write_adapter(loaded.adapter, adapter_plan, args, fmt)
        except OSError as e:
            raise ConversionError(write_error(e, out, plan)) from None
        except Exception as e:  # noqa: BLE001 - safetensors' Rust errors wrap I/O failures
            if type(e).__name__ != "SafetensorError":
                raise
            raise ConversionError(write_error(e, out, plan)) from None
    finally:
        loaded.source.close()
    for w in warnings:
        print(f"{PROG}: warning: {w}", file=sys.stderr)
    _report_written(out, result, loaded, time.perf_counter() - start)
    return 0


def _report_written(out: Path, result, loaded, took: float) -> None:
    code = f"; code: {', '.join(result.code_files)}" if hasattr(result, "code_files") else " (plain transformers folder)"
    print(f"wrote {out} in {took:.1f}s: {len(result.weight_files)} weight file(s), "
          f"{human_bytes(result.total_size)}{code}")
    if loaded.adapter is not None:
        print(f"wrote the LoRA as a peft adapter to {loaded.adapter.out}: load it with "
              f"PeftModel.from_pretrained(model, {str(loaded.adapter.out)!r}) on the model of {out}")
    if not result.complete:
        if loaded.family is None:
            print(f"WARNING: {out} has NO TOKENIZER: re-run with --tokenizer (a tokenizer.model or its folder)")
        else:
            print(f"WARNING: {out} is INCOMPLETE (no tokenizer): re-run with --tokenizer; "
                  "`visualglm-export check` fails on it until then")


def write_error(e: Exception, out: Path, plan=None) -> str:
    """One line for an I/O failure while the output was written (nothing is left at --out by then)."""
    text = str(e)
    code = getattr(e, "errno", None)
    if code is None and "(os error " in text:  # safetensors: "...: No space left on device (os error 28)"
        try:
            code = int(text.rsplit("(os error ", 1)[1].split(")")[0])
        except ValueError:
            code = None
    need = f" (the weights alone need about {human_bytes(sum(i.nbytes for i in plan.target_infos.values()))})" \
        if plan is not None else ""
    where = Path(os.path.abspath(out)).parent
    if code in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on the device" if code == errno.ENOSPC else "disk quota exceeded"
        return f"{what} holding {where} while writing{need}; nothing was written to --out {out}"
    strerror = getattr(e, "strerror", None) or (os.strerror(code) if code else text)
    name = getattr(e, "filename", None)
    return f"cannot write the output beside --out {out}{f' ({name})' if name else ''}: {strerror}; " \
           "nothing was written to --out"


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
    from ..hub_export.writer import write_hub_folder

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


def _adapter_plan(loaded, fmt, dtype, args):
    """The checked plan of the peft adapter (``--lora-as-adapter``), or None."""
    if loaded.adapter is None:
        return None
    from .lora import PeftLoraAdapter

    part = loaded.adapter
    return build_plan(part.source, part.rules, part.target, PeftLoraAdapter, format_name=f"{fmt.name} LoRA",
                      dtype=dtype, allow_nonfinite=args.allow_nonfinite)


def _write_adapter(part, plan, args, fmt) -> list[str]:
    """The adapter folder, staged like --out. It is renamed into place inside --out's staging, so a failure before
    --out's own rename leaves neither; should that last rename fail, the new adapter folder is removed again."""
    from ..hub_export.writer import staged_output
    from .lora import write_adapter_folder

    with staged_output(part.out, force=args.force, marker={"format": fmt.name, "adapter": True}) as tmp:
        write_adapter_folder(tmp, plan, part.target.lora_config)
        return plan.finish_data_checks()


@contextlib.contextmanager
def _adapter_undone_on_failure(loaded):
    """Remove an adapter folder this run created when --out then fails (only its final rename is left by then)."""
    new = loaded.adapter is not None and not loaded.adapter.out.exists()
    try:
        yield
    except BaseException as e:
        if new and loaded.adapter.out.is_dir() and not getattr(e, "output_written", False):
            shutil.rmtree(loaded.adapter.out, ignore_errors=True)
        raise


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def _install_signal_handlers() -> dict:
    """SIGTERM and SIGHUP raise ``Interrupted`` (SIGINT already raises KeyboardInterrupt), so the temporary
    folder is removed on the way out. Returns the previous handlers."""
    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        try:
            previous[sig] = signal.signal(sig, _raise_interrupted)
        except ValueError:  # not the main thread: leave the defaults
            pass
    return previous


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits with 2 on usage errors
    from ..hub_export.writer import OutputRefused

    previous = _install_signal_handlers()
    try:
        return run(args)
    except (UsageError, OutputRefused) as e:
        if getattr(e, "show_usage", False):
            parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except ConversionError as e:
        print(f"{PROG}: conversion failed: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # reading a source: a permission, an I/O error of the disk
        name = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"{PROG}: conversion failed: {name}{e.strerror or e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted) as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        sig = signal.Signals(signum).name
        if getattr(e, "output_written", False):
            print(f"{PROG}: {sig} arrived as the output was completed: {args.out} is written", file=sys.stderr)
        else:
            print(f"{PROG}: interrupted ({sig}); nothing was written to --out", file=sys.stderr)
        return 128 + signum
    except Exception as e:  # noqa: BLE001 - a bug: one line for the user, the traceback on request
        if os.environ.get(TRACEBACK_ENV):
            raise
        where = ""
        tb = e.__traceback__
        while tb is not None:
            where = f" at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"
            tb = tb.tb_next
        print(f"{PROG}: internal error (a bug; please report it): {type(e).__name__}: {str(e)[:300]}{where}; "
              f"set {TRACEBACK_ENV}=1 for the traceback", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
