"""What every benchmark mode shares: timing, the device's floors, the device description, result records.

The device is always passed in (a ``torch.device``); nothing here keeps state between calls. Records are JSON
files in ``benchmarks/results/`` named ``<mode>-<device-slug>-<YYYY-MM-DD>[-<n>].json``: the header fields of
``Record`` (mode, date, device, command line, versions) at the top level, next to the mode's own numbers.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GiB = 2**30


# --- timing ---------------------------------------------------------------------------------------------------


def median(values) -> float:
    """The middle value of an odd number of values, the mean of the two middle ones of an even number."""
    xs = sorted(values)
    if not xs:
        raise ValueError("median of no values")
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def synchronize(device: torch.device) -> None:
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.cpu (a no-op), torch.xpu, torch.mps
    if backend is not None and hasattr(backend, "synchronize"):
        backend.synchronize()


def timed_runs(fn, device: torch.device, *, repeat: int, warmup: int = 1, warmup_fn=None) -> list[float]:
    """Seconds per call of ``fn`` over ``repeat`` calls, after ``warmup`` calls of ``warmup_fn`` (default ``fn``).

    CUDA: CUDA events around each call (the GPU's time from the first queued kernel to the last), then a
    synchronize. Elsewhere: ``perf_counter`` between two synchronizes.
    """
    for _ in range(warmup):
        (warmup_fn or fn)()
    synchronize(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - t0)
    return times


def median_time(fn, device: torch.device, *, repeat: int, warmup: int = 1, warmup_fn=None) -> float:
    return median(timed_runs(fn, device, repeat=repeat, warmup=warmup, warmup_fn=warmup_fn))


# --- floors ---------------------------------------------------------------------------------------------------


def copy_GBps(device: torch.device, nbytes: int, repeat: int) -> float:
    """Device-to-device copy bandwidth, bytes read + written."""
    src = torch.randn(nbytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_time(lambda: dst.copy_(src), device, repeat=repeat) / 1e9


def matmul_TFLOPs(device: torch.device, n: int, dtype: torch.dtype, repeat: int) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / median_time(lambda: a @ b, device, repeat=repeat) / 1e12


def floors(device: torch.device, *, copy_bytes: int = GiB, matmul_n: int = 8192, repeat: int = 11) -> dict:
    """What the device can do at best: copy bandwidth and the dense matmul rate in bf16 and in fp32 (full
    precision: no TF32), each the median of ``repeat`` runs."""
    out = {"copy_GBps": copy_GBps(device, copy_bytes, repeat), "copy_bytes": copy_bytes, "matmul_n": matmul_n}
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        out["bf16_matmul_TFLOPs"] = matmul_TFLOPs(device, matmul_n, torch.bfloat16, repeat)
        out["fp32_matmul_TFLOPs"] = matmul_TFLOPs(device, matmul_n, torch.float32, repeat)
    finally:
        torch.set_float32_matmul_precision(precision)
    empty_cache(device)
    return out


# --- the device -----------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: torch.device) -> dict:
    """``device`` (its name), ``device_count`` (of that kind on the host) and the host's CPUs and memory."""
    host = {"cpus": os.cpu_count(), "cpu": _cpu_name(), "platform": platform.platform(),
            "ram_GiB": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB, 1)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"device": props.name, "device_count": torch.cuda.device_count(), "device_memory_GiB":
                round(props.total_memory / GiB, 1), "cuda": torch.version.cuda, "host": host}
    if device.type == "cpu":
        return {"device": f"CPU {host['cpu']}", "device_count": 1, "host": host}
    return {"device": device.type, "device_count": 1, "host": host}


def device_slug(name: str, count: int = 1) -> str:
    """``NVIDIA H100 80GB HBM3`` → ``h100-80gb-hbm3``; any CPU → ``cpu``; ``-x2`` for two devices."""
    if name.lower().startswith("cpu"):
        slug = "cpu"
    else:
        slug = re.sub(r"[^a-z0-9]+", "-", re.sub(r"^nvidia\s+", "", name.lower())).strip("-")
    return slug if count <= 1 else f"{slug}-x{count}"


def memory_allocated_gib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / GiB if device.type == "cuda" else None


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def empty_cache(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# --- result records -------------------------------------------------------------------------------------------

HEADER = ("mode", "date", "device", "device_count", "command", "torch", "transformers", "commit", "note")


def _commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return head.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except OSError:
        return None


@dataclass
class Record:
    """One run of one mode: the header (``HEADER``) and the mode's numbers (``data``), saved as one JSON object.

    ``save`` picks the file name on the first call and overwrites that file on later calls, so a mode can save
    after every family and a run stopped at a time limit keeps what it measured.
    """

    mode: str
    date: str
    device: str
    device_count: int = 1
    command: str | None = None
    torch: str | None = None
    transformers: str | None = None
    commit: str | None = None
    note: str | None = None
    data: dict = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False, repr=False)

    @classmethod
    def start(cls, mode: str, device: torch.device, argv: list[str], note: str | None = None) -> Record:
        import transformers

        info = describe_device(device)
        command = shlex.join([Path(sys.executable).name, "-m", "benchmarks.bench", *argv])
        record = cls(mode=mode, date=datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
                     device=info.pop("device"), device_count=info.pop("device_count"), command=command,
                     torch=torch.__version__, transformers=transformers.__version__, commit=_commit(), note=note)
        record.data["device_info"] = info
        return record

    @property
    def slug(self) -> str:
        return device_slug(self.device, self.device_count)

    def file_name(self, n: int = 1) -> str:
        return f"{self.mode}-{self.slug}-{self.date}" + (f"-{n}" if n > 1 else "") + ".json"

    def to_json(self) -> dict:
        header = {k: getattr(self, k) for k in HEADER if getattr(self, k) is not None}
        clash = set(header) & set(self.data)
        if clash:
            raise ValueError(f"data keys {sorted(clash)} clash with the record header")
        return {**header, **self.data}

    @classmethod
    def from_json(cls, obj: dict, path: Path | None = None) -> Record:
        header = {k: obj[k] for k in HEADER if k in obj}
        return cls(**header, data={k: v for k, v in obj.items() if k not in HEADER}, path=path)

    @classmethod
    def load(cls, path: Path | str) -> Record:
        path = Path(path)
        return cls.from_json(json.loads(path.read_text()), path)

    def save(self, folder: Path | str = RESULTS) -> Path:
        if self.path is None:
            folder = Path(folder)
            folder.mkdir(parents=True, exist_ok=True)
            n = 1
            while (folder / self.file_name(n)).exists():
                n += 1
            self.path = folder / self.file_name(n)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(self.path)
        return self.path
