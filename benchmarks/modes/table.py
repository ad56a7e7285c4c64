"""table: every family vs the device's floors vs transformers' Llama (TTFT, decode tok/s, ms/step, peak memory).

Per family: ragged, left-padded image prompts at each batch size and cache, ``--new-tokens`` greedy tokens with
no early stop; the static-cache rows say whether their tokens equal the dynamic cache's; ``consistency``
compares cached greedy decode with a full forward over the generated sequence (relative L2 of the logits).
"""

from __future__ import annotations

import time

import torch

from modeling_visualglm import decode_graphs
from modeling_visualglm.decode_graphs import CACHE_BUCKET, bucketed

from ..harness import empty_cache, floors, memory_allocated_gib, peak_memory_gib, reset_peak_memory, synchronize
from ..models import (CACHES, batch_inputs, build, cache_options, decode_timing, generate, graph_replay_ms, host_syncs,
                      rel_l2)

DEFAULTS = dict(families="visualglm,cogvlm,cogvlm2,minigpt4-7b,minigpt4-13b,peer", new_tokens=256, batches="1,8,32",
                caches="dynamic,static,graphs,compile", compile_batches="1", repeat=2, ttft_repeat=3, floor_copy_bytes=2**30, floor_matmul_n=8192)
SMOKE = dict(families="visualglm,cogvlm,cogvlm2,minigpt4-7b,peer", new_tokens=4, batches="1,3",
             caches="dynamic,static,graphs", compile_batches="1", repeat=1, ttft_repeat=1, floor_copy_bytes=2**23, floor_matmul_n=256)


def add_arguments(ap):
    ap.add_argument("--batches", help="batch sizes, comma-separated")
    ap.add_argument("--caches", help=f"generate's decode paths, comma-separated: {', '.join(CACHES)} (dynamic: the "
                    "plain loop; static: transformers' compiled static cache; graphs/compile: ours, decode_graphs.py)")
    ap.add_argument("--compile-batches", help="batch sizes of the compile path (default: all; it compiles per size)")
    ap.add_argument("--repeat", type=int, help="timed full generates per row")
    ap.add_argument("--ttft-repeat", type=int, help="timed one-token generates per row")
    ap.add_argument("--compile-gemm-backends", default=None,
                    help="inductor's matrix-product backends for the compile path (default: decode_graphs."
                    "COMPILE_OPTIONS's, cuBLAS alone: ATEN; e.g. ATEN,TRITON lets the autotuner pick Triton templates)")
    ap.add_argument("--floor-copy-bytes", type=int)
    ap.add_argument("--floor-matmul-n", type=int)


@torch.no_grad()
def cached_vs_full(built) -> dict:
    inputs = batch_inputs(built, 2)
    out = generate(built.model, inputs, 8, output_logits=True, return_dict_in_generate=True,
                   **cache_options(built, "dynamic"))
    seq = out.sequences
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(seq[:, inputs["input_ids"].shape[1]:])], dim=1)
    full = built.model(input_ids=seq[:, :-1], attention_mask=mask[:, :-1], pixel_values=inputs["pixel_values"]).logits
    cached, ref = torch.stack(out.logits, 1).float(), full[:, -8:].float()  # (B, 8, V)
    return {"cached_vs_full_rel_l2": rel_l2(cached, ref),
            "argmax_agreement": (cached.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def sync_lengths(prompt_len: int, new_tokens: int) -> tuple[int, int] | None:
    """Two generate lengths whose static caches fall in the timed run's bucket (another bucket would capture, and
    under "compile" compile, a new step), as far apart as that allows; None if no two do."""
    bucket = bucketed(prompt_len + new_tokens)
    shortest = max(2, bucket - CACHE_BUCKET + 1 - prompt_len, new_tokens - 32)
    return (shortest, new_tokens) if shortest < new_tokens else None


@torch.no_grad()
def bench_family(name, args, device) -> tuple[dict, list[dict]]:
    empty_cache(device)
    t0 = time.perf_counter()
    built = build(name, device, tiny=args.smoke_cpu)
    synchronize(device)
    text = built.family.text_config(built.model.config)
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    info = {"family": name, "build_s": time.perf_counter() - t0, "weights_GiB": memory_allocated_gib(device),
            "lm_params": built.lm_params,  # bf16 K and V of every layer: what one cached token adds to a step's reads
            "kv_bytes_per_token": 2 * 2 * text.num_hidden_layers * kv_heads * head_dim}
    if built.images is not None:  # the peer is transformers' own model
        info["consistency"] = cached_vs_full(built)
    # the same prompts for every cache, kept on the host so that a row's peak memory holds its own batch only
    prompts = {int(b): {k: v.cpu() for k, v in batch_inputs(built, int(b)).items()} for b in args.batches.split(",")}
    rows, last = [], {}
    compile_batches = {int(b) for b in (args.compile_batches or args.batches).split(",")}
    for cache in args.caches.split(","):
        extra = cache_options(built, cache)
        if extra is None:
            continue
        for batch, host_in in prompts.items():
            if cache == "compile" and batch not in compile_batches:
                continue
            batch_in = {k: v.to(device) for k, v in host_in.items()}
            reset_peak_memory(device)
            try:
                timing, seq = decode_timing(built.model, batch_in, args.new_tokens, device, repeat=args.repeat,
                                            ttft_repeat=args.ttft_repeat, **extra)
            except Exception as exc:  # report, do not hide
                rows.append({"family": name, "cache": cache, "batch": batch,
                             "error": f"{type(exc).__name__}: {exc}"})
                print(f"[{name}] cache={cache} batch={batch} FAILED: {exc}", flush=True)
                continue
            row = {"family": name, "cache": cache, "batch": batch, "prompt_len": batch_in["input_ids"].shape[1],
                   **timing, "peak_GiB": peak_memory_gib(device)}
            if "fast_decode" in extra and device.type == "cuda":
                # where a step's time goes: the captured step alone, and the host syncs per decode step
                row["replay_ms"] = graph_replay_ms(built.model, device, args.new_tokens)
                lengths = sync_lengths(batch_in["input_ids"].shape[1], args.new_tokens)
                if lengths is not None:
                    syncs = [host_syncs(built.model, batch_in, n, device, **extra) for n in lengths]
                    row["host_syncs_per_step"] = (syncs[1] - syncs[0]) / (lengths[1] - lengths[0])
            if cache != "dynamic" and batch in last:
                row["same_tokens_as_dynamic"] = bool(torch.equal(seq, last[batch]))
                if args.smoke_cpu and not row["same_tokens_as_dynamic"]:
                    raise SystemExit(f"{name}: {cache} and dynamic caches disagree at batch {batch}")
            if cache == "dynamic":
                last[batch] = seq
            rows.append(row)
            print({k: v for k, v in row.items() if not k.endswith("_runs_s")}, flush=True)
    del built
    empty_cache(device)
    return info, rows


def run(args, device, record, save):
    record.data.update(settings={k: getattr(args, k) for k in DEFAULTS}, families=[], rows=[])
    if args.compile_gemm_backends:  # an A/B of the compile path's products, recorded with the run
        decode_graphs.COMPILE_OPTIONS["max_autotune_gemm_backends"] = args.compile_gemm_backends
    record.data["settings"]["compile_options"] = dict(decode_graphs.COMPILE_OPTIONS)
    record.data["floors"] = floors(device, copy_bytes=args.floor_copy_bytes, matmul_n=args.floor_matmul_n)
    print(record.data["floors"], flush=True)
    save()
    for name in args.families.split(","):
        info, rows = bench_family(name, args, device)
        record.data["families"].append(info)
        record.data["rows"].extend(rows)
        save()  # after every family: a run stopped at its time limit keeps what it measured
