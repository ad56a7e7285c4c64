"""Benchmark ``visualglm-convert --format llama-original`` on a synthetic 7B-shaped Meta checkpoint.

What it measures, in one run on one disk:

1. the disk's sequential write and cold-cache read speed (a scratch file of ``--disk-test-gb``, written with
   fsync, caches dropped, read back);
2. the conversion of a synthetic LLaMA checkpoint (default: 7B shapes — dim 4096, 32 layers, 32 heads,
   vocab 32000, fp16 — split into 2 model-parallel files like Meta's 13B layout) with cold caches, in a
   child process: wall time (to the process exit, and including a final ``sync``), peak anonymous RSS
   (``RssAnon`` of /proc/PID/status, polled every 20 ms) and peak total RSS;
3. the result against the goals: peak anonymous RSS ≤ the largest output shard + 1 GiB, and throughput
   (bytes read + written per second) against the disk's floor.

Caches are dropped with ``echo 3 > /proc/sys/vm/drop_caches`` when permitted (root); otherwise every file
is evicted with ``posix_fadvise(POSIX_FADV_DONTNEED)`` after an fsync, and the report says which one ran.
Needs about 2 × 13.5 GB + ``--disk-test-gb`` of free disk at default size; everything is deleted at the end
unless ``--keep``.

    python benchmarks/bench_convert_llama.py --workdir /work/bench-llama [--layers 32] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30


# --- cache control ----------------------------------------------------------------------------------------

def drop_caches(files: list[Path]) -> str:
    """Evict the page cache: globally if permitted, else per file. Returns the method used."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for path in files:
            for p in ([path] if path.is_file() else sorted(path.rglob("*"))):
                if p.is_file():
                    fd = os.open(p, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)
        return "posix_fadvise(DONTNEED)"


# --- disk speed -------------------------------------------------------------------------------------------

def disk_speed(folder: Path, size_gb: float, block_mb: int = 8) -> dict:
    path = folder / "disk-speed.bin"
    block = os.urandom(block_mb * 2**20)
    n = int(size_gb * GiB) // len(block)
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


# --- synthetic checkpoint ---------------------------------------------------------------------------------

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


def write_shard(path: Path, shapes: dict, seed: int):
    """Random-looking fp16 data, cheaply: tensors are filled from a 64 MB random pool at varying offsets.

    Norm weights are ones in every rank: the converter checks that replicated copies are bit-equal.
    """
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(32 * 2**20, generator=g).half()
    sd = {}
    offset = 0
    for k, shape in shapes.items():
        if k.endswith("norm.weight"):
            sd[k] = torch.ones(shape, dtype=torch.float16)
            continue
        flat = torch.empty(shape, dtype=torch.float16).view(-1)
        pos = 0
        while pos < flat.numel():
            start = offset % (pool.numel() // 2)
            n = min(flat.numel() - pos, pool.numel() - start)
            flat[pos:pos + n] = pool[start:start + n]
            pos += n
            offset += 7919
        sd[k] = flat.view(shape)
    torch.save(sd, path)


def make_checkpoint(folder: Path, dim: int, layers: int, vocab: int, n: int):
    folder.mkdir(parents=True, exist_ok=True)
    shapes = shard_shapes(dim, layers, vocab, n)
    for r in range(n):
        code = ("import sys; sys.path.insert(0, %r); from bench_convert_llama import write_shard, shard_shapes; "
                "from pathlib import Path; write_shard(Path(%r), shard_shapes(%d, %d, %d, %d), %d)"
                % (str(Path(__file__).parent), str(folder / f"consolidated.{r:02d}.pth"), dim, layers, vocab, n, r + 1))
        subprocess.run([sys.executable, "-c", code], check=True)  # one process per rank: its RAM is returned
    (folder / "params.json").write_text(json.dumps({"dim": dim, "multiple_of": 256, "n_heads": dim // 128,
                                                    "n_layers": layers, "norm_eps": 1e-5, "vocab_size": -1}))


# --- the measured conversion ------------------------------------------------------------------------------

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
    cmd = [sys.executable, "-m", "conversion.cli", "--format", "llama-original", "--src", str(src),
           "--out", str(out), "--no-progress", "--max-shard-size", max_shard]
    peaks = {"RssAnon": 0, "VmRSS": 0, "RssFile": 0}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=str(REPO / "tmp" / "bench-llama"),
                    help="scratch folder on the disk to measure (created, and deleted unless --keep)")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--max-shard-size", default="5GB")
    ap.add_argument("--disk-test-gb", type=float, default=4.0)
    ap.add_argument("--out", help="write the result as JSON here")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    shapes = shard_shapes(args.dim, args.layers, args.vocab, args.shards)
    in_bytes = args.shards * sum(2 * int(torch.Size(s).numel()) for s in shapes.values())
    need = 2 * in_bytes + args.disk_test_gb * GiB + 2 * GiB
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, need {need / 1e9:.1f} GB (use fewer --layers)")
    result = {"shape": {"dim": args.dim, "layers": args.layers, "vocab": args.vocab, "shards": args.shards,
                        "dtype": "float16", "input_bytes": in_bytes},
              "machine": {"cpus": os.cpu_count(), "ram_GiB": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB,
                          "torch": torch.__version__}}
    try:
        print(f"disk speed ({args.disk_test_gb} GiB scratch file) ...", flush=True)
        result["disk"] = disk_speed(work, args.disk_test_gb)
        print(json.dumps(result["disk"]), flush=True)
        src, out = work / "meta", work / "hf"
        print(f"writing the synthetic checkpoint ({in_bytes / 1e9:.2f} GB) ...", flush=True)
        t0 = time.perf_counter()
        make_checkpoint(src, args.dim, args.layers, args.vocab, args.shards)
        result["generate_seconds"] = time.perf_counter() - t0
        result["cache_drop"] = drop_caches([src])
        print(f"converting (cold cache via {result['cache_drop']}) ...", flush=True)
        conv = run_conversion(src, out, args.max_shard_size)
        shards = sorted(out.glob("*.safetensors"))
        out_bytes = sum(p.stat().st_size for p in shards)
        largest = max(p.stat().st_size for p in shards)
        conv.update(output_bytes=out_bytes, output_files=len(shards), largest_output_shard=largest)
        conv["goal_rss_anon_max"] = largest + GiB
        conv["goal_met"] = conv["peak_rss_anon"] <= largest + GiB
        moved = in_bytes + out_bytes
        disk = result["disk"]
        floor = in_bytes / (disk["read_cold_MBps"] * 1e6) + out_bytes / (disk["write_MBps"] * 1e6)
        conv["MBps_read_plus_write_incl_sync"] = moved / conv["seconds_incl_sync"] / 1e6
        conv["MBps_input_incl_sync"] = in_bytes / conv["seconds_incl_sync"] / 1e6
        conv["disk_floor_seconds"] = floor
        conv["fraction_of_disk_floor"] = floor / conv["seconds_incl_sync"]
        result["conversion"] = conv
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    c = result["conversion"]
    print(f"\npeak anonymous RSS {c['peak_rss_anon'] / GiB:.2f} GiB (goal ≤ largest shard "
          f"{c['largest_output_shard'] / GiB:.2f} GiB + 1 GiB: {'met' if c['goal_met'] else 'NOT met'}); "
          f"{c['seconds_incl_sync']:.1f} s incl. sync = {c['MBps_read_plus_write_incl_sync']:.0f} MB/s read+write; "
          f"disk floor {c['disk_floor_seconds']:.1f} s ({100 * c['fraction_of_disk_floor']:.0f}% of it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
