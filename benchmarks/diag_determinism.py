"""Is a greedy decode repeatable on this GPU? Two identical runs per SDPA backend setting (GPU only).

    PYTHONPATH=src python benchmarks/diag_determinism.py --families cogvlm2,peer

For each family (real size, seeded random bf16 weights, a ragged batch of 2; the peer gets a prompt as long as
CogVLM2's) it runs the same 8-token greedy decode twice with: PyTorch's default SDPA backend choice, the math
backend only, the memory-efficient backend only, the cuDNN backend only, and ``torch.use_deterministic_algorithms(True)``, and prints
how far the second run is from the first (token agreement, step-0 and step-1 logits relative L2). Set
``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in the environment for the deterministic row.
"""

import argparse
import contextlib
import json
import os
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_gpu as B  # noqa: E402


def compare(label, run, ref):
    row = B._agreement(run[0], ref[0], run[1], ref[1])
    row["step1_logits_rel_l2"] = ((run[1][:, 1] - ref[1][:, 1]).norm() / ref[1][:, 1].norm()).item()
    print(label, json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default="cogvlm2,peer")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for fam in args.families.split(","):
        model, prompt, images, _, pad = B.FAMILIES[fam]()
        if fam == "peer":
            short = prompt
            prompt = lambda n, short=short: short(n + 2300)  # noqa: E731 (as long as a CogVLM2 prompt)
        inputs = B.batch_inputs(prompt, images, pad, 2)
        settings = {
            "default": contextlib.nullcontext,
            "math": lambda: sdpa_kernel([SDPBackend.MATH]),
            "efficient": lambda: sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]),
            "cudnn": lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION]),
        }
        for label, ctx in settings.items():
            with ctx():
                first, second = B._greedy(model, inputs, 8), B._greedy(model, inputs, 8)
            row = compare(f"{fam} {label}", second, first)
            results["rows"].append({"family": fam, "prompt": list(inputs["input_ids"].shape), "setting": label, **row})
        torch.use_deterministic_algorithms(True)
        first, second = B._greedy(model, inputs, 8), B._greedy(model, inputs, 8)
        torch.use_deterministic_algorithms(False)
        row = compare(f"{fam} deterministic", second, first)
        results["rows"].append({"family": fam, "prompt": list(inputs["input_ids"].shape), "setting": "deterministic",
                                **row})
        del model
        B._free()
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    with torch.no_grad():
        main()
