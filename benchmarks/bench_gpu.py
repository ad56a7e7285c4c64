"""Real-size GPU benchmark: seeded random bf16 weights, built on the device, nothing written to disk.

Measures in one run, per family: time to first token (prefill with an image), batch-1 decode tokens/s
(256 new tokens after an image prompt), batched decode at 8 and 32 (ragged, left-padded rows), peak GPU
memory; the device's floors (device-to-device copy bandwidth, bf16 matmul rate); and transformers' own
``LlamaForCausalLM`` at Vicuna-7B size as the in-library peer. Prints a markdown table last.

    PYTHONPATH=src python3 benchmarks/bench_gpu.py --families visualglm,peer --out results.json

Families not yet implemented in the package are skipped with a note.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time

import torch


def sync():
    torch.cuda.synchronize()


def median_time(fn, repeat=5, warmup=1):
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        sync()
        times.append(start.elapsed_time(end) / 1000)
    times.sort()
    return times[len(times) // 2]


def floors():
    n = 1 << 30  # 1 GiB of bf16
    src = torch.randn(n // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), repeat=10)
    copy_gbs = 2 * n / t / 1e9  # bytes read + written
    del src, dst
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    t = median_time(lambda: a @ b, repeat=10)
    tflops = 2 * m**3 / t / 1e12
    del a, b
    torch.cuda.empty_cache()
    return {"copy_GBps": copy_gbs, "bf16_matmul_TFLOPs": tflops}


@torch.no_grad()
def randomize_on_device(model, seed=0, std=0.02):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1 and "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, device="cuda", dtype=torch.float32))
        else:
            p.copy_(std * torch.randn(p.shape, generator=gen, device="cuda", dtype=torch.float32))


def build_visualglm():
    from modeling_visualglm.configuration_visualglm import VisualGLMConfig
    from modeling_visualglm.modeling_visualglm import VisualGLMForConditionalGeneration

    cfg = VisualGLMConfig(image_token_id=130344)  # real sizes are the config defaults
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = VisualGLMForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model = model.to(torch.bfloat16).eval()
    randomize_on_device(model)
    text = cfg.text_config
    gen = torch.Generator().manual_seed(0)

    def prompt(n_text):
        body = torch.randint(5, 60000, (n_text,), generator=gen).tolist()
        ids = body[:2] + [cfg.image_token_id] * cfg.num_image_tokens + body[2:] + [text.gmask_token_id,
                                                                                   text.bos_token_id]
        return ids

    def images(n):
        return torch.randn(n, 3, 224, 224, generator=gen).to("cuda", torch.bfloat16)

    lm_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("language_model", "lm_head")))
    return model, prompt, images, lm_params, text.pad_token_id


def build_peer():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model = model.eval()
    randomize_on_device(model)
    gen = torch.Generator().manual_seed(0)

    def prompt(n_text):
        return [1] + torch.randint(5, 31000, (n_text + 32,), generator=gen).tolist()  # same length as an image prompt

    lm_params = sum(p.numel() for p in model.parameters())
    return model, prompt, None, lm_params, 0


FAMILIES = {"visualglm": build_visualglm, "peer": build_peer}


def batch_inputs(prompt, images, pad_id, batch, base_len=24):
    rows = [prompt(base_len + (i * 7) % 17) for i in range(batch)]  # ragged lengths
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device="cuda")
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device="cuda")
    kwargs = dict(input_ids=ids, attention_mask=mask)
    if images is not None:
        kwargs["pixel_values"] = images(batch)
    return kwargs


def run_generate(model, inputs, new_tokens, **extra):
    return model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          eos_token_id=None, pad_token_id=0, **extra)


def bench_family(name, new_tokens, batches, cache_impls):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, prompt, images, lm_params, pad_id = FAMILIES[name]()
    sync()
    build_s = time.perf_counter() - t0
    weights_gib = torch.cuda.memory_allocated() / 2**30
    rows = []
    for cache in cache_impls:
        extra = {} if cache == "dynamic" else {"cache_implementation": cache}
        for batch in batches:
            inputs = batch_inputs(prompt, images, pad_id, batch)
            torch.cuda.reset_peak_memory_stats()
            try:
                ttft = median_time(lambda: run_generate(model, inputs, 1, **extra), repeat=3)
                total = median_time(lambda: run_generate(model, inputs, new_tokens, **extra), repeat=2, warmup=1)
            except Exception as exc:  # report, do not hide
                rows.append({"family": name, "cache": cache, "batch": batch, "error": f"{type(exc).__name__}: {exc}"})
                print(f"[{name}] cache={cache} batch={batch} FAILED: {exc}", flush=True)
                continue
            decode_s = max(total - ttft, 1e-9)
            row = {
                "family": name, "cache": cache, "batch": batch, "prompt_len": inputs["input_ids"].shape[1],
                "ttft_ms": ttft * 1e3, "decode_tok_s_per_seq": (new_tokens - 1) / decode_s,
                "decode_tok_s_total": batch * (new_tokens - 1) / decode_s,
                "ms_per_step": decode_s / (new_tokens - 1) * 1e3,
                "peak_GiB": torch.cuda.max_memory_allocated() / 2**30,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    info = {"family": name, "build_s": build_s, "weights_GiB": weights_gib, "lm_params": lm_params}
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return info, rows


@torch.no_grad()
def check_visualglm_cache_consistency():
    """bf16 at real size: logits of cached greedy decode vs a full forward over the same sequence."""
    model, prompt, images, _, pad_id = build_visualglm()
    inputs = batch_inputs(prompt, images, pad_id, 2)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=8, min_new_tokens=8, eos_token_id=None,
                         pad_token_id=pad_id, output_logits=True, return_dict_in_generate=True)
    seq = out.sequences
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(seq[:, inputs["input_ids"].shape[1]:])], dim=1)
    full = model(input_ids=seq[:, :-1], attention_mask=mask[:, :-1], pixel_values=inputs["pixel_values"]).logits
    cached = torch.stack(out.logits, dim=1).float()  # (B, 8, V)
    ref = full[:, -8:].float()
    rel = ((cached - ref).norm() / ref.norm()).item()
    same = (cached.argmax(-1) == ref.argmax(-1)).float().mean().item()
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"bf16_cached_vs_full_rel_l2": rel, "argmax_agreement": same}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="visualglm,peer")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--caches", default="dynamic,static")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}, torch {torch.__version__}", flush=True)
    import transformers

    result = {"device": dev, "torch": torch.__version__, "transformers": transformers.__version__,
              "floors": floors(), "families": [], "rows": []}
    print(json.dumps(result["floors"]), flush=True)
    if "visualglm" in args.families:
        result["consistency"] = check_visualglm_cache_consistency()
        print(json.dumps(result["consistency"]), flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    for fam in args.families.split(","):
        if fam not in FAMILIES:
            print(f"[{fam}] not implemented in this package yet: skipped", flush=True)
            continue
        info, rows = bench_family(fam, args.new_tokens, batches, args.caches.split(","))
        result["families"].append(info)
        result["rows"].extend(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    bw = result["floors"]["copy_GBps"] * 1e9
    print("\n| family | cache | batch | prompt | TTFT ms | decode tok/s/seq | total tok/s | ms/step | "
          "floor ms/step (weights/bandwidth) | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    params = {f["family"]: f["lm_params"] for f in result["families"]}
    for r in result["rows"]:
        if "error" in r:
            print(f"| {r['family']} | {r['cache']} | {r['batch']} | error: {r['error'][:80]} |")
            continue
        floor_ms = params[r["family"]] * 2 / bw * 1e3
        print(f"| {r['family']} | {r['cache']} | {r['batch']} | {r['prompt_len']} | {r['ttft_ms']:.1f} | "
              f"{r['decode_tok_s_per_seq']:.1f} | {r['decode_tok_s_total']:.0f} | {r['ms_per_step']:.2f} | "
              f"{floor_ms:.2f} | {r['peak_GiB']:.1f} |")


if __name__ == "__main__":
    main()
