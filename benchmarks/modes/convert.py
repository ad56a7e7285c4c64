"""convert: ``visualglm-convert --format llama-original`` on a synthetic Meta checkpoint (CPU, disk, memory).

In one run on one disk: the disk's sequential write (fsync) and cold-cache read speed on a scratch file; a
synthetic LLaMA checkpoint (default 7B shapes: dim 4096, 32 layers, vocab 32000, fp16, in 2 model-parallel files
like Meta's 13B layout); its conversion with cold caches in a child process, polled every 20 ms: wall time (to
the exit, and with a final ``sync``), peak anonymous and total RSS; and the result against the goals: peak
anonymous RSS <= the largest output shard + 1 GiB, throughput against the disk's floor.

Caches are dropped with ``echo 3 > /proc/sys/vm/drop_caches`` where permitted, else per file with
``posix_fadvise(POSIX_FADV_DONTNEED)`` after an fsync; the record says which. Needs about 2 x 13.5 GB +
``--disk-test-gb`` of free disk at the default size; everything is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from ..harness import ROOT, GiB

CPU_ONLY = True
DEFAULTS = dict(workdir=str(ROOT / "tmp" / "bench-llama"), dim=4096, layers=32, vocab=32000, shards=2,
                max_shard_size="5GB", disk_test_gb=4.0)
SMOKE = dict(DEFAULTS, workdir=str(ROOT / "tmp" / "bench-llama-smoke"), dim=256, layers=2, vocab=512,
             disk_test_gb=0.01)


def add_arguments(ap):
    ap.add_argument("--workdir", help="scratch folder on the disk to measure (created; deleted unless --keep)")
    for name in ("dim", "layers", "vocab", "shards"):
        ap.add_argument(f"--{name}", type=int)
    ap.add_argument("--max-shard-size")
    ap.add_argument("--disk-test-gb", type=float)
    ap.add_argument("--keep", action="store_true")


def drop_caches(files: list[Path]) -> str:
    """Evict the page cache: globally if permitted, else per file. Returns the method used."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for path in files:
            for p in [path] if path.is_file() else sorted(path.rglob("*")):
                if p.is_file():
                    fd = os.open(p, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)
        return "posix_fadvise(DONTNEED)"


def disk_speed(folder: Path, size_gb: float, block_mb: int = 8) -> dict:
    path, block = folder / "disk-speed.bin", os.urandom(block_mb * 2**20)
    n = max(1, int(size_gb * GiB) // len(block))
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(n):
            f.write(block)
        os.fsync(f.fileno())
    write_s = time.perf_counter() - t0
    method = drop_caches([path])
    buf = bytearray(len(block))
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    read_s = time.perf_counter() - t0
    path.unlink()
    nbytes = n * len(block)
    return {"bytes": nbytes, "write_MBps": nbytes / write_s / 1e6, "read_cold_MBps": nbytes / read_s / 1e6,
            "cache_drop": method}


def intermediate(dim: int, multiple_of: int = 256) -> int:
    return multiple_of * ((int(8 * dim / 3) + multiple_of - 1) // multiple_of)


def shard_shapes(dim: int, layers: int, vocab: int, n: int) -> dict:
    """One model-parallel rank's tensor shapes (fairscale split of Meta's LLaMA)."""
    inter = intermediate(dim)
    shapes = {"tok_embeddings.weight": (vocab, dim // n), "norm.weight": (dim,), "output.weight": (vocab // n, dim)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update({p + "attention.wq.weight": (dim // n, dim), p + "attention.wk.weight": (dim // n, dim),
                       p + "attention.wv.weight": (dim // n, dim), p + "attention.wo.weight": (dim, dim // n),
                       p + "feed_forward.w1.weight": (inter // n, dim), p + "feed_forward.w2.weight": (dim, inter // n),
                       p + "feed_forward.w3.weight": (inter // n, dim), p + "attention_norm.weight": (dim,),
                       p + "ffn_norm.weight": (dim,)})
    return shapes


def write_shard(path: str, dim: int, layers: int, vocab: int, n: int, seed: int):
    """Random-looking fp16 data, cheaply: tensors filled from a 64 MB random pool at varying offsets. Norm weights
    are ones in every rank: the converter checks that replicated copies are bit-equal."""
    pool = torch.randn(32 * 2**20, generator=torch.Generator().manual_seed(seed)).half()
    sd, offset = {}, 0
    for k, shape in shard_shapes(dim, layers, vocab, n).items():
        if k.endswith("norm.weight"):
            sd[k] = torch.ones(shape, dtype=torch.float16)
            continue
        flat, pos = torch.empty(shape, dtype=torch.float16).view(-1), 0
        while pos < flat.numel():
            start = offset % (pool.numel() // 2)
            step = min(flat.numel() - pos, pool.numel() - start)
            flat[pos:pos + step] = pool[start:start + step]
            pos += step
            offset += 7919
        sd[k] = flat.view(shape)
    torch.save(sd, path)


def make_checkpoint(folder: Path, dim: int, layers: int, vocab: int, n: int):
    folder.mkdir(parents=True, exist_ok=True)
    for r in range(n):  # one process per rank: its memory is returned to the system before the conversion
        code = (f"from benchmarks.modes.convert import write_shard; "
                f"write_shard({str(folder / f'consolidated.{r:02d}.pth')!r}, {dim}, {layers}, {vocab}, {n}, {r + 1})")
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    (folder / "params.json").write_text(json.dumps({"dim": dim, "multiple_of": 256, "n_heads": dim // 128,
                                                    "n_layers": layers, "norm_eps": 1e-5, "vocab_size": -1}))


def _status(pid: int) -> dict:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmRSS", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def run_conversion(src: Path, out: Path, max_shard: str) -> dict:
    cmd = [sys.executable, "-m", "modeling_visualglm.conversion.cli", "--format", "llama-original", "--src", str(src),
           "--out", str(out), "--no-progress", "--max-shard-size", max_shard]
    peaks = {"RssAnon": 0, "VmRSS": 0, "RssFile": 0}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = threading.Event()

    def poll():
        while not done.is_set():
            for k, v in _status(proc.pid).items():
                peaks[k] = max(peaks[k], v)
            time.sleep(0.02)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    log, _ = proc.communicate()
    exited = time.perf_counter() - t0
    done.set()
    thread.join()
    os.sync()
    synced = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"conversion failed ({proc.returncode}):\n{log[-4000:]}")
    return {"command": " ".join(cmd), "seconds_to_exit": exited, "seconds_incl_sync": synced,
            "peak_rss_anon": peaks["RssAnon"], "peak_rss": peaks["VmRSS"], "peak_rss_file": peaks["RssFile"],
            "log_tail": log[-1500:]}


def against_goals(conv: dict, in_bytes: int, disk: dict) -> dict:
    out_bytes, largest = conv["output_bytes"], conv["largest_output_shard"]
    floor = in_bytes / (disk["read_cold_MBps"] * 1e6) + out_bytes / (disk["write_MBps"] * 1e6)
    return {"goal_rss_anon_max": largest + GiB, "goal_met": conv["peak_rss_anon"] <= largest + GiB,
            "MBps_read_plus_write_incl_sync": (in_bytes + out_bytes) / conv["seconds_incl_sync"] / 1e6,
            "MBps_input_incl_sync": in_bytes / conv["seconds_incl_sync"] / 1e6,
            "disk_floor_seconds": floor, "fraction_of_disk_floor": floor / conv["seconds_incl_sync"]}


def run(args, device, record, save):
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    shapes = shard_shapes(args.dim, args.layers, args.vocab, args.shards)
    in_bytes = args.shards * sum(2 * int(torch.Size(s).numel()) for s in shapes.values())
    need, free = 2 * in_bytes + args.disk_test_gb * GiB + 2 * GiB, shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, need {need / 1e9:.1f} GB (use fewer --layers)")
    record.data.update(shape={"dim": args.dim, "layers": args.layers, "vocab": args.vocab, "shards": args.shards,
                              "dtype": "float16", "input_bytes": in_bytes})
    try:
        record.data["disk"] = disk = disk_speed(work, args.disk_test_gb)
        print(disk, flush=True)
        src, out = work / "meta", work / "hf"
        t0 = time.perf_counter()
        make_checkpoint(src, args.dim, args.layers, args.vocab, args.shards)
        record.data["generate_seconds"] = time.perf_counter() - t0
        record.data["cache_drop"] = drop_caches([src])
        conv = run_conversion(src, out, args.max_shard_size)
        shards = sorted(out.glob("*.safetensors"))
        conv.update(output_bytes=sum(p.stat().st_size for p in shards), output_files=len(shards),
                    largest_output_shard=max(p.stat().st_size for p in shards))
        conv.update(against_goals(conv, in_bytes, disk))
        record.data["conversion"] = conv
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    c = record.data["conversion"]
    print(f"peak anonymous RSS {c['peak_rss_anon'] / GiB:.2f} GiB (goal <= largest shard "
          f"{c['largest_output_shard'] / GiB:.2f} GiB + 1 GiB: {'met' if c['goal_met'] else 'NOT met'}); "
          f"{c['seconds_incl_sync']:.1f} s incl. sync = {c['MBps_read_plus_write_incl_sync']:.0f} MB/s read+write; "
          f"disk floor {c['disk_floor_seconds']:.1f} s ({100 * c['fraction_of_disk_floor']:.0f}% of it)", flush=True)
