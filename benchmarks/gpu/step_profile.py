"""Where a fast-decode step's time goes on the GPU, at real size (random bf16 weights, batch 1).

Per family and decode path (``graphs`` | ``compile``), after a warm generate (capture, compile):

1. the captured step's kernels: the step function run eagerly (graphs: the eager modules; compile: inductor's
   kernels) under ``torch.profiler``, summed per kernel name over 8 runs: what one replay of the graph runs;
2. a whole 48-token ``generate``: its kernels per step, launches per step, and the device's busy time per step
   against the wall time (busy < wall: the device waits for the host). Kernels that run outside the graph are those
   of (2) beyond the graph's own (1).

Prints tables; writes nothing. Run on a GPU machine:

    PYTHONPATH=src python -m benchmarks.gpu.step_profile cogvlm2:graphs,visualglm:compile
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from ..harness import empty_cache, synchronize
from ..models import batch_inputs, build, generate


def kernel_table(prof, runs: int, limit: int = 22) -> float:
    """Print the kernels (device time per run, calls per run); return the total device ms per run (on the CPU:
    the operators' own CPU time)."""
    events = prof.key_averages()
    cuda = any(e.self_device_time_total > 0 for e in events)
    rows = [((e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / runs, e.count / runs, e.key)
            for e in events if (e.self_device_time_total if cuda else e.self_cpu_time_total) > 0]
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    for ms, calls, name in rows[:limit]:
        print(f"  {ms:8.4f} ms {calls:7.1f}x  {name[:110]}")
    print(f"  total device {total:.3f} ms per run, {sum(r[1] for r in rows):.0f} kernels per run", flush=True)
    return total


def ttft_host(model, inputs, device, runs: int = 5) -> None:
    """Where a one-token generate's (time to first token's) wall time goes on the host: cProfile over ``runs``."""
    generate(model, inputs, 1, fast_decode="graphs")
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(runs):
        generate(model, inputs, 1, fast_decode="graphs")
    synchronize(device)
    print(f"-- one-token generate: {(time.perf_counter() - t0) / runs * 1e3:.2f} ms (unprofiled)")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(runs):
        generate(model, inputs, 1, fast_decode="graphs")
    synchronize(device)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(18)
    stats.sort_stats("cumulative").print_stats(30)


@torch.no_grad()
def profile_case(name: str, mode: str, device, tiny: bool = False) -> None:
    built = build(name, device, tiny=tiny)
    model, inputs = built.model, batch_inputs(built, 1)
    t0 = time.perf_counter()
    generate(model, inputs, 64, fast_decode=mode)
    synchronize(device)
    print(f"== {name} {mode}: warm generate {time.perf_counter() - t0:.1f} s", flush=True)
    graph = model._fast_decoder.current
    runs, lengths = 8, graph._lengths()
    # CUDA activity alone: the CPU one installs a dispatch mode that makes dynamo recompile the compiled step
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    model._fast_decoder.active = graph  # as inside generate (the compiled step's guards read it)
    try:
        graph._run(graph.others)  # outside the profiler: whatever a first eager call does (workspaces)
        graph._restore(lengths)
        with profile(activities=activities) as prof:
            for _ in range(runs):
                graph._run(graph.others)
                graph._restore(lengths)
            synchronize(device)
    finally:
        model._fast_decoder.active = None
    print(f"-- the step's kernels (eager run of the captured function, {runs} runs):")
    kernel_table(prof, runs)
    steps = 48
    wall = {}
    for n in (1, steps, 1, steps):
        synchronize(device)
        t0 = time.perf_counter()
        generate(model, inputs, n, fast_decode=mode)
        synchronize(device)
        wall[n] = time.perf_counter() - t0
    wall = (wall[steps] - wall[1]) / (steps - 1) * 1e3  # the decode steps alone
    with profile(activities=activities) as prof:
        generate(model, inputs, steps, fast_decode=mode)
        synchronize(device)
    counts = {e.key: e.count for e in prof.key_averages()}
    print(f"-- whole generate, per step ({steps} steps, wall {wall:.3f} ms/step unprofiled): graph launches "
          f"{counts.get('cudaGraphLaunch', 0) / steps:.2f}, kernel launches "
          f"{(counts.get('cudaLaunchKernel', 0) + counts.get('cuLaunchKernel', 0)) / steps:.1f}, memcpy "
          f"{counts.get('cudaMemcpyAsync', 0) / steps:.1f}")
    busy = kernel_table(prof, steps, limit=30)
    print(f"  busy {busy:.3f} of {wall:.3f} ms per step ({100 * busy / wall:.0f} %)", flush=True)
    if mode == "graphs":
        ttft_host(model, inputs, device)
    del model, built, graph
    empty_cache(device)


def main(argv):
    tiny = "--smoke-cpu" in argv  # the tiny presets on the CPU (the same code, no graph)
    argv = [a for a in argv if a != "--smoke-cpu"]
    device = torch.device("cpu" if tiny else "cuda")
    for case in (argv[0] if argv else "cogvlm2:graphs").split(","):
        name, mode = case.split(":")
        profile_case(name, mode, device, tiny)


if __name__ == "__main__":
    main(sys.argv[1:])
