"""quant: 4-bit (nf4) and 8-bit (LLM.int8) bitsandbytes loads, and torchao's weight-only int4, against the bf16 model
(CUDA only; bitsandbytes for 4bit/8bit, torchao for int4).

Per family: the bf16 model's greedy tokens and logits and its batch-1 decode timing, then save to ``--workdir``
and ``from_pretrained(folder, quantization_config=BitsAndBytesConfig(..., llm_int8_skip_modules=
cls.quantization_skip_modules))`` per mode, which keeps the vision tower, Q-Former/adapter, projection and
``lm_head`` in bf16. ``int4`` loads the folder in bf16 and quantizes the language model's linears in place with
torchao (``Int4WeightOnlyConfig``, group size 128, tinygemm's ``tile_packed_to_4d`` layout): a speed path, decoded
by the default fast path (CUDA graphs), where bitsandbytes' layers keep the plain loop. Each mode's row: load time,
weights, which linears were quantized, agreement with bf16 (32 greedy tokens, first-step logits) and decode timing
per batch.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from ..harness import empty_cache, memory_allocated_gib, peak_memory_gib, reset_peak_memory, synchronize
from ..models import agreement, batch_inputs, build, decode_timing, greedy

DEFAULTS = dict(families="visualglm,cogvlm2,minigpt4-7b", new_tokens=64, modes="4bit,8bit,int4", batches="1,8",
                fast_decode="auto", workdir="/tmp/bench")
SMOKE = DEFAULTS  # no CPU run: bitsandbytes' 4/8-bit linears need CUDA


def add_arguments(ap):
    ap.add_argument("--modes", help="4bit,8bit,int4 (int4: torchao weight-only)")
    ap.add_argument("--batches", help="batch sizes of the quantized models' timing, comma-separated")
    ap.add_argument("--fast-decode", choices=("auto", "compile"),
                    help="decode path of the timed runs, bf16 and quantized alike (default auto: CUDA graphs)")
    ap.add_argument("--workdir", help="where the bf16 model is saved to be reloaded (deleted after each family)")


def quant_config(mode: str, skip: list[str]):
    from transformers import BitsAndBytesConfig

    if mode == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                                  llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


INT4_GROUP = 128


def torchao_int4(model) -> list[str]:
    """The language model's linears → torchao weight-only int4 (in place); returns their names."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    names = []

    def language_linears(module, fqn):
        take = isinstance(module, torch.nn.Linear) and module.in_features % INT4_GROUP == 0
        if take:
            names.append(fqn)
        return take

    quantize_(model.language_model, Int4WeightOnlyConfig(group_size=INT4_GROUP, int4_packing_format="tile_packed_to_4d"),
              filter_fn=language_linears)
    return names


def load_quantized(cls, path, mode, skip, device):
    """(model, names of the quantized linears)."""
    if mode == "int4":
        model = cls.from_pretrained(path, dtype=torch.bfloat16, device_map={"": device.index or 0}).eval()
        return model, ["language_model." + n for n in torchao_int4(model)]
    import bitsandbytes as bnb

    model = cls.from_pretrained(path, quantization_config=quant_config(mode, skip), dtype=torch.bfloat16,
                                device_map={"": device.index or 0}).eval()
    return model, [n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


@torch.no_grad()
def quant_family(name, args, device) -> list[dict]:
    empty_cache(device)
    built = build(name, device)
    cls, skip = type(built.model), type(built.model).quantization_skip_modules
    probe = batch_inputs(built, 2)
    ref_tokens, ref_logits = greedy(built.model, probe, 32)
    bf16 = {"family": name, "mode": "bf16", "weights_GiB": memory_allocated_gib(device)}
    bf16.update(decode_timing(built.model, batch_inputs(built, 1), args.new_tokens, device,
                              fast_decode=args.fast_decode)[0])
    path = Path(args.workdir) / name
    built.model.save_pretrained(path, max_shard_size="5GB")
    prompts = {int(b): {k: v.cpu() for k, v in batch_inputs(built, int(b)).items()} for b in args.batches.split(",")}
    del built
    empty_cache(device)
    rows = [bf16]
    for mode in args.modes.split(","):
        t0 = time.perf_counter()
        qm, quantized = load_quantized(cls, path, mode, skip, device)
        synchronize(device)
        row = {"family": name, "mode": mode, "load_s": time.perf_counter() - t0,
               "weights_GiB": memory_allocated_gib(device)}
        row["quantized_linears"] = len(quantized)
        row["quantized_outside_language_model"] = [n for n in quantized if not n.startswith("language_model.")]
        row["kept_dtypes"] = sorted({str(p.dtype) for n, p in qm.named_parameters() if n.split(".")[0] in skip})
        tokens, logits = greedy(qm, probe, 32)
        row.update(agreement(tokens, ref_tokens, logits, ref_logits))
        for batch, host_in in prompts.items():
            inputs = {k: v.to(device) for k, v in host_in.items()}
            reset_peak_memory(device)
            try:
                timing = decode_timing(qm, inputs, args.new_tokens, device, fast_decode=args.fast_decode)[0]
            except Exception as exc:  # report, do not hide
                row[f"b{batch}"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                continue
            row[f"b{batch}"] = {**timing, "peak_GiB": peak_memory_gib(device)}
        if row.get("b1", {}).get("ms_per_step") and bf16.get("ms_per_step"):
            row["b1_speedup_vs_bf16"] = bf16["ms_per_step"] / row["b1"]["ms_per_step"]
        rows.append(row)
        print(row, flush=True)
        del qm
        empty_cache(device)
    shutil.rmtree(path)
    return rows


def run(args, device, record, save):
    if device.type != "cuda":
        raise SystemExit("quant needs CUDA (bitsandbytes' layers, torchao's int4 kernel): it has no CPU run (--smoke-cpu)")
    import importlib.metadata

    versions = {}
    for mode, package in (("4bit", "bitsandbytes"), ("8bit", "bitsandbytes"), ("int4", "torchao")):
        if mode in args.modes.split(","):
            versions[package] = importlib.metadata.version(package)  # fails early when the package is missing
    record.data.update(settings={k: getattr(args, k) for k in DEFAULTS}, **versions, rows=[])
    for name in args.families.split(","):
        record.data["rows"].extend(quant_family(name, args, device))
        save()
