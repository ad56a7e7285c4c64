"""profile: where a batch-1 decode step's wall time goes, dynamic cache vs the static cache generate compiles.

Per family and cache: wall ms/step from timed runs (a full generate minus a 1-token one), then one more run under
``torch.profiler`` giving the device's busy time per step (the sum of its kernels' self time) and how the work
was launched (CUDA-graph replays vs single kernel launches). Busy << wall means the device waits on the host.
Under graph replay the summed device time can exceed the wall time: it is not a busy time there.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from ..harness import empty_cache, median_time, synchronize
from ..models import CACHES, batch_inputs, build, cache_options, generate

DEFAULTS = dict(families="visualglm,cogvlm,minigpt4-7b,peer", new_tokens=64, repeat=3, warmup=2,
                caches="dynamic,static")
SMOKE = dict(families="visualglm,peer", new_tokens=4, repeat=1, warmup=1, caches="dynamic,static,graphs")


def add_arguments(ap):
    ap.add_argument("--repeat", type=int, help="timed full generates per cache")
    ap.add_argument("--warmup", type=int, help="untimed full generates first (the static cache compiles here)")
    ap.add_argument("--caches", help=f"decode paths, comma-separated: {', '.join(CACHES)} (see the table mode)")


def launches(events, steps: int) -> dict:
    counts = {e.key: e.count for e in events}
    return {"gpu_busy_ms_per_step": sum(e.self_device_time_total for e in events) / 1e3 / steps,
            "graph_launches_per_step": counts.get("cudaGraphLaunch", 0) / steps,
            "kernel_launches_per_step": (counts.get("cudaLaunchKernel", 0) + counts.get("cuLaunchKernel", 0)) / steps}


def wall_ms_per_step(model, inputs, device, args, **extra) -> float:
    ttft = median_time(lambda: generate(model, inputs, 1, **extra), device, repeat=3)
    total = median_time(lambda: generate(model, inputs, args.new_tokens, **extra), device, repeat=args.repeat,
                        warmup=args.warmup)
    return (total - ttft) / (args.new_tokens - 1) * 1e3


@torch.no_grad()
def profile_family(name, args, device) -> dict:
    built = build(name, device, tiny=args.smoke_cpu)
    inputs = batch_inputs(built, 1)
    out = {"family": name, "steps": args.new_tokens}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for cache in args.caches.split(","):
        extra = cache_options(built, cache)
        if extra is None:
            continue
        wall = wall_ms_per_step(built.model, inputs, device, args, **extra)
        with profile(activities=activities) as prof:
            generate(built.model, inputs, args.new_tokens, **extra)
            synchronize(device)
        events = prof.key_averages()
        out[cache] = {"wall_ms_per_step": wall, **launches(events, args.new_tokens)}
        print({"family": name, "cache": cache, **out[cache]}, flush=True)
        print(events.table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
    return out


def run(args, device, record, save):
    record.data.update(settings={k: getattr(args, k) for k in DEFAULTS}, rows=[])
    for name in args.families.split(","):
        empty_cache(device)
        record.data["rows"].append(profile_family(name, args, device))
        empty_cache(device)  # the model is gone with profile_family's frame
        save()
