"""determinism: is a greedy decode repeatable? Two identical runs per attention-kernel setting.

Per family (a ragged batch of 2; the peer's prompt as long as CogVLM2's): the same greedy decode twice with
PyTorch's default SDPA backend choice, each single backend (CUDA: math, memory-efficient, cuDNN; CPU: math)
and ``torch.use_deterministic_algorithms(True)``; each row says how far the second run is from the first (token
agreement, step-0 and step-1 logits relative L2). The CLI sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` if unset.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..harness import empty_cache
from ..models import agreement, batch_inputs, build, greedy, rel_l2

DEFAULTS = dict(families="cogvlm2,peer", new_tokens=8, peer_extra=2300)
SMOKE = dict(families="cogvlm2,peer", new_tokens=4, peer_extra=16)


def add_arguments(ap):
    ap.add_argument("--peer-extra", type=int, help="text ids added to the peer's prompt (default: CogVLM2's length)")


@contextlib.contextmanager
def deterministic():
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


def kernel_settings(device) -> dict:
    backends = {"math": SDPBackend.MATH}
    if device.type == "cuda":
        backends.update(efficient=SDPBackend.EFFICIENT_ATTENTION, cudnn=SDPBackend.CUDNN_ATTENTION)
    return {"default": contextlib.nullcontext, **{k: (lambda b=b: sdpa_kernel([b])) for k, b in backends.items()},
            "deterministic": deterministic}


@torch.no_grad()
def repeat_family(name, args, device) -> list[dict]:
    empty_cache(device)
    built = build(name, device, tiny=args.smoke_cpu)
    if built.family.kind == "peer":
        short = built.prompt
        built.prompt = lambda n: short(n + args.peer_extra)
    inputs = batch_inputs(built, 2)
    rows = []
    for label, ctx in kernel_settings(device).items():
        with ctx():
            first, second = greedy(built.model, inputs, args.new_tokens), greedy(built.model, inputs, args.new_tokens)
        row = {"family": name, "prompt": list(inputs["input_ids"].shape), "setting": label,
               **agreement(second[0], first[0], second[1], first[1]),
               "step1_logits_rel_l2": rel_l2(second[1][:, 1], first[1][:, 1])}
        print(row, flush=True)
        rows.append(row)
    del built
    empty_cache(device)
    return rows


def run(args, device, record, save):
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    record.data.update(settings={k: getattr(args, k) for k in DEFAULTS}, rows=[])
    for name in args.families.split(","):
        record.data["rows"].extend(repeat_family(name, args, device))
        save()
