"""The hub-folder writer every converter uses (CONTRACTS §2).

``write_hub_folder`` fills an (empty, usually temporary) folder with:

- safetensors weights, shard by shard, from the converter's stream (``hub_export.weights``);
- ``config.json`` with ``architectures`` and an ``auto_map`` for AutoConfig, AutoModel,
  AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor and AutoImageProcessor;
- the remote-code files: the relative-import closure of the model, config, tokenizer and processor
  modules (``hub_export.code``), nothing else;
- tokenizer files (``ice_text.model``, ``tokenizer_config.json`` with its own ``auto_map``),
  ``processor_config.json`` (nested image processor with its ``auto_map``), ``chat_template.jinja``;
- ``generation_config.json`` with the stop/pad/bos ids and neutral defaults (``NEUTRAL_GENERATION``);
- ``README.md``, the model card.

Without a tokenizer it still writes weights, config and code, plus :data:`INCOMPLETE_MARKER`, which makes
``visualglm-export check`` (and ``push``) fail until the conversion is re-run with a tokenizer.

``staged_output`` builds a folder next to its final place and renames it there only when complete. Every
folder it builds carries :data:`OUTPUT_MARKER`, which is what lets ``--force`` replace a folder: one without it
was not written by this tool and is never replaced. Its temporary folders are named after the process that made
them (pid, process start time, a hash of the host name), so a later run can remove the ones whose process is
gone (killed with SIGKILL, a power cut) without touching those of a run still in progress.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .card import render_card
from .code import copy_code
from .families import NEUTRAL_GENERATION, Family, package_dir
from .weights import write_safetensors_shards

from . import INCOMPLETE_MARKER


@dataclass
class FolderResult:
    folder: Path
    complete: bool
    weight_files: list[str]
    code_files: list[str]
    other_files: list[str] = field(default_factory=list)
    total_size: int = 0
    total_parameters: int = 0


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def write_config(folder: Path, family: Family, config, dtype: torch.dtype) -> None:
    config.architectures = [family.model.name]
    config.auto_map = family.config_auto_map()
    config.dtype = _dtype_name(dtype)
    config.to_json_file(str(folder / "config.json"), use_diff=False)


def _patch_json(path: Path, update) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    update(data)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def write_tokenizer_and_processor(folder: Path, family: Family, tokenizer, config) -> list[str]:
    """Save tokenizer (+ processor) data files; code files come from the closure, not from save_pretrained."""
    written = []
    with tempfile.TemporaryDirectory(prefix="hub-export-") as scratch:
        scratch = Path(scratch)
        if family.processor is not None:
            image_processor = family.image_processor.load()(**family.image_processor_kwargs(config))
            processor = family.processor.load()(
                image_processor=image_processor, tokenizer=tokenizer, **family.processor_kwargs(config)
            )
            processor.save_pretrained(str(scratch))
        else:
            tokenizer.save_pretrained(str(scratch))
        if family.image_processor is not None:
            # preprocessor_config.json too: transformers 4.57.x reads the image processor only from there (5.x
            # nests it in processor_config.json and still reads the old file)
            image_processor = family.image_processor.load()(**family.image_processor_kwargs(config))
            image_processor.save_pretrained(str(scratch))
        for path in sorted(scratch.iterdir()):
            if path.is_file() and path.suffix != ".py":
                shutil.copy2(path, folder / path.name)
                written.append(path.name)

    tok_cfg = folder / "tokenizer_config.json"

    def tok_update(data):
        auto = data.setdefault("auto_map", {})
        if family.tokenizer is not None:  # None: a tokenizer class transformers ships (no remote code)
            auto["AutoTokenizer"] = [family.tokenizer.auto_map_value, None]
        if family.processor is not None:
            auto["AutoProcessor"] = family.processor.auto_map_value
        data.pop("name_or_path", None)  # the scratch folder's path means nothing in the hub folder

    _patch_json(tok_cfg, tok_update)
    proc_cfg = folder / "processor_config.json"
    if proc_cfg.exists():
        def proc_update(data):
            data.setdefault("auto_map", {})["AutoProcessor"] = family.processor.auto_map_value
            image = data.get("image_processor")
            if isinstance(image, dict):
                image.setdefault("auto_map", {})["AutoImageProcessor"] = family.image_processor.auto_map_value

        _patch_json(proc_cfg, proc_update)
    image_cfg = folder / "preprocessor_config.json"
    if image_cfg.exists():
        _patch_json(image_cfg, lambda data: data.setdefault("auto_map", {}).__setitem__(
            "AutoImageProcessor", family.image_processor.auto_map_value))
    return written


def write_generation_config(folder: Path, family: Family, config, tokenizer) -> None:
    from transformers import GenerationConfig

    text = getattr(config, "text_config", config)
    eos = tokenizer.eos_token_id if tokenizer is not None else text.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer is not None else text.pad_token_id
    if pad is None:
        pad = text.pad_token_id if text.pad_token_id is not None else eos
    GenerationConfig(**NEUTRAL_GENERATION, bos_token_id=text.bos_token_id, eos_token_id=eos,
                     pad_token_id=pad).save_pretrained(str(folder))


def write_hub_folder(
    folder: str | Path,
    *,
    family: Family,
    config,
    weight_entries: list,
    dtype: torch.dtype,
    tokenizer=None,
    max_shard_size: int | str = "5GB",
    model_id: str | None = None,
    source_note: str = "",
    progress: bool = True,
) -> FolderResult:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # stock transformers tokenizers (CogVLM's Llama ones) have no image token: the config alone defines it
    if tokenizer is not None and getattr(config, "image_token_id", None) != getattr(
        tokenizer, "image_token_id", getattr(config, "image_token_id", None)
    ):
        raise ValueError(
            f"config.image_token_id={config.image_token_id} but the tokenizer's <image> id is {tokenizer.image_token_id}"
        )
    weights = write_safetensors_shards(weight_entries, folder, max_shard_size=max_shard_size, progress=progress)
    write_config(folder, family, config, dtype)
    code_files = copy_code(package_dir(), family.code_modules(), folder)
    other = ["config.json"]
    complete = tokenizer is not None
    if complete:
        other += write_tokenizer_and_processor(folder, family, tokenizer, config)
    write_generation_config(folder, family, config, tokenizer)
    other.append("generation_config.json")
    if not complete:
        (folder / INCOMPLETE_MARKER).write_text(
            "This folder is incomplete: it has weights, config.json and the model code but no tokenizer\n"
            "files and no processor files. Re-run visualglm-convert with --tokenizer PATH\n"
            f"({family.tokenizer_hint}). `visualglm-export check` and `push` refuse this folder until then.\n"
        )
        other.append(INCOMPLETE_MARKER)
    files_note = (
        f"Files: {len(weights['files'])} safetensors file(s), {weights['total_parameters']:,} parameters "
        f"({_dtype_name(dtype)}); remote code: {', '.join(code_files)}."
    )
    card = render_card(family, model_id=model_id or str(folder.resolve()), source_note=source_note,
                       files_note=files_note, complete=complete, config=config)
    (folder / "README.md").write_text(card, encoding="utf-8")
    other.append("README.md")
    return FolderResult(folder, complete, weights["files"], code_files, sorted(set(other)),
                        weights["total_size"], weights["total_parameters"])


# --- staged output ------------------------------------------------------------------------------------------

# written into every folder ``staged_output`` builds (``visualglm-convert``'s output): only a folder that holds it
# may be replaced with --force. A dot-file: ``push`` skips it, so it never reaches the Hub.
OUTPUT_MARKER = ".visualglm-convert"  # JSON content
MARKER_TOOL = "visualglm-convert"


class OutputRefused(Exception):
    """``out`` may not be written or replaced (a symlink, or an existing folder this tool did not write)."""


def is_tool_folder(path: str | Path) -> bool:
    """True for a real folder (not a symlink) holding this tool's :data:`OUTPUT_MARKER`."""
    path = Path(path)
    marker = path / OUTPUT_MARKER
    if path.is_symlink() or not path.is_dir() or marker.is_symlink() or not marker.is_file():
        return False
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("written_by") == MARKER_TOOL


def refuse_reason(out: str | Path, force: bool) -> str | None:
    """Why ``out`` may not be (re)placed, or None. Symlinks are refused whether they dangle or not: the final
    rename would replace the link, not the folder it points to."""
    out = Path(out)
    if out.is_symlink():
        target = os.readlink(out)
        state = "which does not exist (a dangling link)" if not out.exists() else "not a folder of its own"
        return (f"--out {out} is a symbolic link to {target}, {state}: give a real path (remove the link, or "
                "pass the folder it should point to)")
    if not out.exists():
        return None
    if not force:
        return f"--out {out} already exists; pass --force to replace it (it is left untouched)"
    if not is_tool_folder(out):
        what = "a folder" if out.is_dir() else "a file"
        return (f"--out {out} is {what} that visualglm-convert did not write (it has no {OUTPUT_MARKER}); --force "
                "replaces only folders this tool wrote. Choose another --out, or remove it yourself if you mean to")
    return None


def _process_start(pid: int) -> int:
    """The start time of process ``pid`` in clock ticks since boot (Linux), 0 where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _owner_tag() -> str:
    pid = os.getpid()
    return f"{pid}-{_process_start(pid)}-{_host_tag()}"


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<start>\d+)-(?P<host>[0-9a-f]{8})-\w+$")


def _owner_gone(pid: int, start: int, host: str) -> bool:
    """True only when the process that made a leftover certainly no longer runs (same host; pid dead, or reused
    by a process that started at another time)."""
    if host != _host_tag():
        return False  # another machine's (a shared file system): its process cannot be checked from here
    if pid == os.getpid():
        return start != _process_start(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    except OSError:
        return False
    now = _process_start(pid)
    return bool(start and now and now != start)


def remove_leftovers(parent: Path) -> list[str]:
    """Remove the temporary folders of interrupted runs in ``parent`` whose process is gone; returns notes.

    A ``.NAME.old-*`` folder holds the previous ``NAME`` moved aside during a ``--force`` swap: if the run died
    between the two renames (``NAME`` missing), it is moved back instead of deleted.
    """
    notes = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return notes
    for path in entries:
        m = _LEFTOVER.match(path.name)
        if not m or path.is_symlink() or not path.is_dir():
            continue
        if not _owner_gone(int(m["pid"]), int(m["start"]), m["host"]):
            continue
        final, kept = parent / m["name"], path / m["name"]
        try:
            if m["kind"] == "old" and not final.exists() and not final.is_symlink() and kept.is_dir():
                os.rename(kept, final)
                notes.append(f"restored {final} from {path.name}, which an interrupted --force run (pid {m['pid']}) "
                             "had moved aside")
            shutil.rmtree(path)
            notes.append(f"removed {path}, left by an interrupted run (pid {m['pid']}, no longer running)")
        except OSError as e:
            notes.append(f"could not remove {path}, left by an interrupted run: {e.strerror or e}")
    return notes


@contextlib.contextmanager
def _signals_blocked():
    """Hold SIGINT/SIGTERM/SIGHUP while the block runs (cleanup and the final swap must not be cut in half);
    they are delivered when it ends. A no-op outside the main thread or where the platform lacks sigmask."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    sigs = {signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def write_marker(folder: Path, extra: dict | None = None) -> None:
    """:data:`OUTPUT_MARKER`: the tool, its version, the time; no local paths or host names."""
    data = {"written_by": MARKER_TOOL,
            "note": "a folder visualglm-convert wrote: `visualglm-convert --force` may replace it",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        from importlib.metadata import version

        data["version"] = version("modeling_visualglm")
    except Exception:  # noqa: BLE001 - not installed as a distribution (a source checkout)
        pass
    data.update(extra or {})
    (folder / OUTPUT_MARKER).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextlib.contextmanager
def staged_output(out: str | Path, force: bool = False, marker: dict | None = None):
    """Yield a fresh temporary folder beside ``out``; on success rename it to ``out``.

    The folder lives in ``out``'s parent (same file system, so the final ``rename`` is atomic) and gets
    :data:`OUTPUT_MARKER` (with ``marker``'s fields) first. An existing ``out`` must be explicitly allowed with
    ``force`` and must be a folder this tool wrote; it is moved aside only after the new folder is complete and
    deleted after the swap. On any error, KeyboardInterrupt or signal-raised exception the temporary folder is
    removed and ``out`` is untouched. Leftovers of killed runs in the same parent are removed first
    (:func:`remove_leftovers`).
    """
    out = Path(out).absolute()
    reason = refuse_reason(out, force)
    if reason is not None:
        if out.exists() and not force and not out.is_symlink():
            raise FileExistsError(reason)
        raise OutputRefused(reason)
    out.parent.mkdir(parents=True, exist_ok=True)
    for note in remove_leftovers(out.parent):
        print(f"note: {note}", file=sys.stderr)
    owner = _owner_tag()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{owner}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    swapped = False
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the final folder gets normal permissions
        write_marker(tmp, marker)
        yield tmp
        with _signals_blocked():  # a signal held here is delivered at its end, after the swap
            if out.exists() or out.is_symlink():
                reason = refuse_reason(out, True)  # re-checked: it may have changed while the folder was built
                if reason is not None:
                    raise OutputRefused(reason)
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{owner}-", dir=out.parent))
                os.rename(out, old / out.name)
                try:
                    os.rename(tmp, out)
                except BaseException:
                    os.rename(old / out.name, out)
                    raise
                swapped = True
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out)
                swapped = True
    except BaseException as e:
        if swapped:  # a signal that waited for the swap: ``out`` is complete; tell the caller
            e.output_written = True
            raise
        with _signals_blocked():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
