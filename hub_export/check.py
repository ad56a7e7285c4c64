"""``visualglm-export check``: load a hub folder the way a user will, in a fresh interpreter.

The child runs ``python -I`` (no PYTHONPATH, no user site, no cwd on ``sys.path``) with a ``sys.meta_path``
blocker in front of every finder, so ``modeling_visualglm``, ``conversion`` and ``hub_export`` cannot be
imported even though the editable install puts them on every path: the folder's own remote code must be
enough. Before the child starts, the folder must pass the allow-list (``hub_export.allowlist``: no links,
subdirectories, pickles, stray code or unknown files). The child resolves every ``auto_map`` entry, loads
``AutoModelForCausalLM`` / ``AutoTokenizer`` / ``AutoProcessor`` with ``trust_remote_code=True`` and runs one
greedy ``chat`` about a bundled image.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BLOCKED_PACKAGES = ("modeling_visualglm",)  # the runtime and, below it, the tooling (conversion, hub_export, tools)

BLOCKER = """
import importlib.abc, sys
_BLOCKED = %r
class _BlockOurPackages(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"{name} is blocked: a hub folder must work with its own remote code only")
        return None
sys.meta_path.insert(0, _BlockOurPackages())
"""


def blocker_source() -> str:
    """Python source that makes our packages unimportable (also used by tests' fresh interpreters)."""
    return BLOCKER % (set(BLOCKED_PACKAGES),)


CHILD = r"""
import json, sys, time
folder, dtype_name, device, image, query = sys.argv[1:6]
t0 = time.perf_counter()
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer
from transformers.dynamic_module_utils import get_class_from_dynamic_module

cfg = json.load(open(f"{folder}/config.json"))
for auto_class, ref in sorted(cfg["auto_map"].items()):
    cls = get_class_from_dynamic_module(ref, folder)
    print(f"auto_map {auto_class}: {cls.__module__}.{cls.__name__}", flush=True)
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
dtype = getattr(torch, dtype_name) if dtype_name != "auto" else "auto"
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype).to(device).eval()
print(f"model: {type(model).__name__} from {type(model).__module__}, "
      f"{sum(p.numel() for p in model.parameters()):,} parameters, {next(model.parameters()).dtype}", flush=True)
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
image_id = getattr(tokenizer, "image_token_id", None)
print(f"tokenizer: {type(tokenizer).__name__}, image token id {image_id}", flush=True)
if image_id is not None and image_id != getattr(config, "image_token_id", image_id):
    raise SystemExit(f"config.image_token_id {config.image_token_id} != the tokenizer's image token id {image_id}")
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
print(f"processor: {type(processor).__name__}", flush=True)
response, history = model.chat(tokenizer, image, query, max_new_tokens=8, min_length=0, do_sample=False)
print(f"chat: {query!r} -> {response!r}", flush=True)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in _BLOCKED)
if leaked:
    raise SystemExit(f"our packages were imported: {leaked}")
print(f"check passed in {time.perf_counter() - t0:.1f}s", flush=True)
"""


def demo_image() -> Path | None:
    """The bundled demo image of the tooling package (``modeling_visualglm.tools``, never part of a hub folder)."""
    from importlib.resources import files

    path = Path(str(files("modeling_visualglm.tools") / "assets" / "demo.png"))
    return path if path.is_file() else None


def device_problem(device: str, dtype: str = "float32") -> str | None:
    """Why ``--device``/``--dtype`` cannot run here (one line), or None; checked before the child starts, so that
    a machine without CUDA gets this line instead of the child's ``AssertionError`` traceback."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        return f"--device {device!r} is not a torch device ({str(e).splitlines()[0] if str(e) else 'invalid'})"
    if dev.type == "cpu":
        return None
    backend = getattr(torch, dev.type, None)  # torch.cuda, torch.xpu, torch.mps, ...
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        return (f"--device {device}: torch {torch.__version__} sees no {dev.type} device on this machine "
                "(use --device cpu)")
    count = backend.device_count() if hasattr(backend, "device_count") else None
    if dev.index is not None and count is not None and dev.index >= count:
        return f"--device {device}: this machine has {count} {dev.type} device(s), numbered from 0"
    if dev.type == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        return f"--dtype bfloat16: {torch.cuda.get_device_name(dev)} does not support it (use --dtype float16)"
    return None


def check_folder(folder: str | Path, dtype: str = "float32", device: str = "cpu",
                 query: str = "Describe the image.", timeout: float | None = None) -> int:
    """Run the check; prints the child's output; returns its exit code (0 = the folder works)."""
    from . import INCOMPLETE_MARKER
    from .allowlist import format_problems, scan_folder

    folder = Path(folder).absolute()
    if not folder.is_dir() or not os.path.lexists(folder / "config.json"):
        print(f"check: {folder} has no config.json: not a hub folder", file=sys.stderr)
        return 1
    marker = folder / INCOMPLETE_MARKER
    if os.path.lexists(marker):
        text = marker.read_text(errors="replace") if marker.is_file() and not marker.is_symlink() else ""
        print(f"check: {folder} is INCOMPLETE ({INCOMPLETE_MARKER}):\n{text}", file=sys.stderr)
        return 1
    # the allow-list first: a folder with links, pickles, stray code or unknown files never reaches the child
    try:
        scan = scan_folder(folder)
    except OSError as e:
        print(f"check: FAILED: {folder} cannot be read ({type(e).__name__}: {e.strerror or e})", file=sys.stderr)
        return 1
    if scan.problems:
        print(f"check: FAILED: {folder} is not a clean hub folder ({len(scan.problems)} problem(s)):\n"
              f"{format_problems(scan.problems)}", file=sys.stderr)
        return 1
    image = demo_image()
    if image is None:
        print("check: the bundled demo image (tools/assets/demo.png) is missing", file=sys.stderr)
        return 1
    code = blocker_source() + CHILD
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    cmd = [sys.executable, "-I", "-c", code, str(folder), dtype, device, str(image), query]
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"check: timed out after {timeout}s", file=sys.stderr)
        return 1
    if proc.returncode != 0:
        print(f"check: FAILED for {folder} (exit {proc.returncode})", file=sys.stderr)
        return 1
    print(f"check: OK {folder}")
    return 0
