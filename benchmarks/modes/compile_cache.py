"""compile_cache: the compiled decode path's first ``generate`` in a fresh process, then in a second process.

``fast_decode="compile"`` compiles the decode step with inductor on the first call of a process; inductor keeps
its compiled graphs and kernels on disk (``TORCHINDUCTOR_CACHE_DIR``, default ``/tmp/torchinductor_$USER``), so a
second process should start much faster. Per family this mode points inductor at a new empty cache folder and
runs the same child process twice (same seeded model, same prompt), each timing its first ``generate`` (build
excluded; compile, capture and decode included) and a second ``generate`` in the same process (the warm cost).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from ..harness import ROOT, synchronize

DEFAULTS = dict(families="visualglm,minigpt4-7b", new_tokens=32)
SMOKE = dict(families="visualglm,minigpt4-7b", new_tokens=8)


def add_arguments(ap):
    pass


def child(name: str, device: torch.device, tiny: bool, new_tokens: int) -> dict:
    """One process's numbers (run by ``run`` through ``python -m benchmarks.modes.compile_cache``)."""
    from ..models import batch_inputs, build, generate

    built = build(name, device, tiny=tiny)
    inputs = batch_inputs(built, 1)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        generate(built.model, inputs, new_tokens, fast_decode="compile")
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"first_generate_s": times[0], "warm_generate_s": times[1]}


def run(args, device, record, save):
    record.data.update(settings={k: getattr(args, k) for k in DEFAULTS}, rows=[])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    for name in args.families.split(","):
        with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
            row = {"family": name}
            for label in ("first_process", "second_process"):
                cmd = [sys.executable, "-m", "benchmarks.modes.compile_cache", "--child", name, str(device),
                       str(int(bool(args.smoke_cpu))), str(args.new_tokens)]
                out = subprocess.run(cmd, cwd=ROOT, env={**env, "TORCHINDUCTOR_CACHE_DIR": cache},
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    row[label] = {"error": out.stderr[-2000:]}
                    break
                row[label] = json.loads(out.stdout.strip().splitlines()[-1])
        print(row, flush=True)
        record.data["rows"].append(row)
        save()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=4, metavar=("FAMILY", "DEVICE", "TINY", "NEW_TOKENS"), required=True)
    family, dev, tiny, new = ap.parse_args().child
    device = torch.device(dev)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    print(json.dumps(child(family, device, tiny == "1", int(new))), flush=True)
