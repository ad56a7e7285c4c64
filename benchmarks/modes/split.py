"""split: the same greedy run on one device and split across devices (``device_map``), one row per placement.

The model is saved to ``--workdir`` and placed again:
- two or more GPUs: ``from_pretrained(device_map="auto")`` with a per-GPU ``max_memory`` that spreads the layers
  over every GPU (the user path; same kernels on every GPU, so identical tokens are expected);
- one GPU, ``offload``: ``from_pretrained(device_map="auto", max_memory={0: 55 % of the weights, "cpu": ...})``,
  the path of a user whose GPU is too small: the rest stays in CPU memory and accelerate streams it to the GPU
  per module, so everything executes on the GPU (identical tokens expected);
- one GPU, ``gpu+cpu``: ``accelerate.dispatch_model(..., main_device="cpu")`` keeps ~55 % of the modules on the
  GPU and executes the rest on the CPU: real cross-device hand-offs of hidden states, masks, rotary tables,
  expert routing and the KV cache. The CPU computes with other kernels, so tokens may part where random-weight
  logits nearly tie; the first step's logits difference is the number to read;
- no GPU (``--smoke-cpu``): ``offload`` with the CPU holding 55 % and the rest on disk.

Identical tokens are only a fair test with deterministic kernels: at ~2k-token padded contexts the default SDPA
decode step is not repeatable on the H100 (``determinism`` mode), so the CLI sets
``torch.use_deterministic_algorithms(True)`` for this mode.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from ..harness import GiB, empty_cache, memory_allocated_gib, synchronize
from ..models import agreement, batch_inputs, build, greedy

DEFAULTS = dict(families="visualglm,cogvlm,cogvlm2,minigpt4-7b,minigpt4-13b", new_tokens=32, workdir="/tmp/bench")
SMOKE = dict(families="visualglm,cogvlm", new_tokens=4, workdir="/tmp/bench-smoke")


def add_arguments(ap):
    ap.add_argument("--workdir", help="where the model is saved to be placed again (deleted after each family)")


def placements(cls, dtype, path: Path, n_gpu: int, weight_bytes: int):
    """(label, place, in_memory) for this machine, in the order they run: ``place(model)`` places the model held
    in memory when ``in_memory``, else ``place()`` loads the saved one."""
    from accelerate import dispatch_model, infer_auto_device_map

    part = int(weight_bytes * 0.55)

    def auto(max_memory, **kw):
        return lambda: cls.from_pretrained(path, dtype=dtype, device_map="auto", max_memory=max_memory, **kw).eval()

    def gpu_cpu(model):
        device_map = infer_auto_device_map(model, max_memory={0: part, "cpu": 2 * weight_bytes},
                                           no_split_module_classes=list(model._no_split_modules))
        return dispatch_model(model, device_map, main_device="cpu")

    if n_gpu >= 2:
        budget = int(weight_bytes / n_gpu * 1.15)
        return [(f"from_pretrained(device_map='auto', max_memory={budget / GiB:.1f} GiB per GPU)",
                 auto({i: budget for i in range(n_gpu)}), False)]
    if n_gpu == 1:
        return [("gpu+cpu: accelerate.dispatch_model(infer_auto_device_map(GPU 55 % / CPU), main_device='cpu')",
                 gpu_cpu, True),
                (f"offload: from_pretrained(device_map='auto', max_memory={{0: {part / GiB:.1f} GiB, 'cpu': ...}})",
                 auto({0: part, "cpu": 2 * weight_bytes}), False)]
    return [(f"offload: from_pretrained(device_map='auto', max_memory={{'cpu': {part / GiB:.3f} GiB}}, disk)",
             auto({"cpu": part}, offload_folder=str(path) + "-offload"), False)]


@torch.no_grad()
def split_family(name, args, device) -> list[dict]:
    empty_cache(device)
    built = build(name, device, tiny=args.smoke_cpu)
    model, probe = built.model, batch_inputs(built, 2)
    built.model = None  # held by ``model`` alone, so that it can be dropped before the saved copy loads
    ref_tokens, ref_logits = greedy(model, probe, args.new_tokens)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    path = Path(args.workdir) / name
    t0 = time.perf_counter()
    model.save_pretrained(path, max_shard_size="5GB")
    common = {"family": name, "gpus": torch.cuda.device_count(), "save_s": time.perf_counter() - t0,
              "num_hidden_layers": built.family.text_config(model.config).num_hidden_layers}
    rows = []
    for how, place, in_memory in placements(type(model), model.dtype, path, common["gpus"], weight_bytes):
        if not in_memory:
            model = None
            empty_cache(device)
        t0 = time.perf_counter()
        placed = place(model) if in_memory else place()
        synchronize(device)
        row = {**common, "how": how, "place_s": time.perf_counter() - t0}
        by_device = {}
        for module, where in placed.hf_device_map.items():
            by_device.setdefault(str(where), []).append(module)
        row["placement"] = {d: f"{len(m)} modules, first {m[0]}, last {m[-1]}" for d, m in by_device.items()}
        row["device_modules"] = by_device
        row["gpu_weights_GiB"] = memory_allocated_gib(device)
        t1 = time.perf_counter()
        tokens, logits = greedy(placed, probe, args.new_tokens)
        row.update(greedy_s=time.perf_counter() - t1, **agreement(tokens, ref_tokens, logits, ref_logits),
                   identical_tokens=bool(torch.equal(tokens, ref_tokens)))
        print({k: v for k, v in row.items() if k != "device_modules"}, flush=True)
        rows.append(row)
        del placed
        empty_cache(device)
    shutil.rmtree(path)
    shutil.rmtree(str(path) + "-offload", ignore_errors=True)
    return rows


def run(args, device, record, save):
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts: deterministic matmuls
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    record.data.update(settings={k: getattr(args, k) for k in DEFAULTS}, deterministic_algorithms=True, rows=[])
    try:
        for name in args.families.split(","):
            record.data["rows"].extend(split_family(name, args, device))
            save()
    finally:
        torch.use_deterministic_algorithms(was)
