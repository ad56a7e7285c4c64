"""Seeded random models built directly on the device, their prompts, and the generate calls every mode times.

Real size: bf16 weights constructed on the device (no fp32 copy on the host), every parameter seeded. Tiny
(``--smoke-cpu``): the presets of ``modeling_visualglm.tools.tiny_models`` in fp32 on the CPU.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .families import FAMILIES, Family
from .harness import median, synchronize, timed_runs


@dataclass
class Built:
    """A model with what it takes to prompt it: ``prompt(n_text)`` → ids, ``images(n)`` → pixels (or None)."""

    name: str
    family: Family
    model: torch.nn.Module
    prompt: Callable[[int], list[int]]
    images: Callable[[int], torch.Tensor] | None
    pad_id: int
    lm_params: int  # parameters of the language model (and lm_head): what one decode step reads

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@torch.no_grad()
def randomize_on_device(model, device, seed=0, std=0.02):
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32)
        p.copy_(1.0 + 0.1 * noise if p.ndim == 1 and "norm" in name and name.endswith("weight") else std * noise)


def build(name: str, device: torch.device, *, tiny: bool = False) -> Built:
    family = FAMILIES[name]
    cfg = family.config(tiny)
    dtype, was = (torch.float32 if tiny else torch.bfloat16), torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # constructed in ``dtype`` on the device: no fp32 copy on the host
    try:
        with device:
            model = family.model_class()(cfg)
    finally:
        torch.set_default_dtype(was)
    model = model.to(dtype).eval()
    randomize_on_device(model, device)

    text = family.text_config(cfg)
    gen = torch.Generator().manual_seed(0)
    # random text ids stay below every special id (the tiny presets put theirs among the first 200 ids)
    special = [getattr(text, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "mask", "gmask")]
    high = min([text.vocab_size, 60000] + [i for i in [*special, getattr(cfg, "image_token_id", None)]
                                           if isinstance(i, int) and i > 5]) - 1
    image = [] if family.kind == "peer" else [cfg.image_token_id] * cfg.num_image_tokens

    def prompt(n_text):
        return family.layout(cfg, torch.randint(5, high, (n_text + family.text_extra,), generator=gen).tolist(), image)

    def images(n):
        size = cfg.vision_config.image_size
        return torch.randn(n, 3, size, size, generator=gen).to(device, dtype)

    lm = [p.numel() for n, p in model.named_parameters() if family.kind == "peer" or
          n.startswith(("language_model", "lm_head"))]
    return Built(name, family, model, prompt, None if family.kind == "peer" else images,
                 family.pad_token_id(cfg), sum(lm))


def batch_inputs(built: Built, batch: int, base_len: int = 24) -> dict:
    """A ragged, left-padded batch of image prompts with ``base_len`` to ``base_len + 16`` text ids."""
    rows = [built.prompt(base_len + (i * 7) % 17) for i in range(batch)]
    width = max(map(len, rows))
    ids = torch.tensor([[built.pad_id] * (width - len(r)) + r for r in rows], device=built.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=built.device)
    inputs = dict(input_ids=ids, attention_mask=mask)
    if built.images is not None:
        inputs["pixel_values"] = built.images(batch)
    return inputs


# generate()'s decode paths by name: the plain loop with transformers' dynamic cache, transformers' compiled static
# cache, and ours (decode_graphs.py: the step replayed from a CUDA graph, eager or compiled kernels inside)
CACHES = {"dynamic": {"fast_decode": "off"}, "static": {"cache_implementation": "static"},
          "graphs": {"fast_decode": "graphs"}, "compile": {"fast_decode": "compile"}}


def cache_options(built: Built, cache: str) -> dict | None:
    """generate() keywords of the decode path ``cache``, or None where it does not apply (ours on the peer)."""
    extra = dict(CACHES[cache])
    if built.family.kind == "peer" and "fast_decode" in extra:
        if cache != "dynamic":
            return None
        extra.pop("fast_decode")
    return extra


def generate(model, inputs: dict, new_tokens: int, **extra):
    """Exactly ``new_tokens`` greedy tokens (no early stop)."""
    return model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          eos_token_id=None, pad_token_id=0, **extra)


def greedy(model, inputs: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` new tokens (B, n) and their logits (B, n, V) in fp32, on the CPU."""
    out = generate(model, inputs, n, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:].cpu(), torch.stack(out.logits, 1).float().cpu()


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).norm() / ref.norm()).item()


def agreement(tokens, ref_tokens, logits, ref_logits) -> dict:
    """Share of greedy tokens equal to the reference, the steps before the first difference in any row, and the
    first step's relative L2 logits difference (both runs see the same prompt at step 0)."""
    same = tokens == ref_tokens
    return {"token_agreement": same.float().mean().item(),
            "identical_prefix_steps": int(same.all(0).long().cumprod(0).sum()),
            "steps": tokens.shape[1], "first_step_logits_rel_l2": rel_l2(logits[:, 0], ref_logits[:, 0])}


def decode_timing(model, inputs: dict, new_tokens: int, device: torch.device, *, repeat: int = 2,
                  ttft_repeat: int = 3, warmup: int = 1, **extra) -> tuple[dict, torch.Tensor]:
    """Time to first token (a 1-token generate) and the decode rate of a full generate minus it (medians); and
    the sequences the last full generate produced."""
    ttft_runs = timed_runs(lambda: generate(model, inputs, 1, **extra), device, repeat=ttft_repeat, warmup=warmup)
    # a dynamic cache warms up on a short run; a static one must compile (or capture) at the timed length, and that
    # first run is timed too: what a user waits for on the first answer
    first = []

    def first_run():
        t0 = time.perf_counter()
        generate(model, inputs, new_tokens, **extra)
        synchronize(device)
        first.append(time.perf_counter() - t0)

    short = (lambda: generate(model, inputs, 16, **extra)) if extra.get("fast_decode") == "off" else first_run
    last = {}
    total_runs = timed_runs(lambda: last.update(seq=generate(model, inputs, new_tokens, **extra)), device,
                            repeat=repeat, warmup=warmup, warmup_fn=short)
    ttft, total = median(ttft_runs), median(total_runs)
    decode_s, batch = total - ttft, inputs["input_ids"].shape[0]
    rates = {"decode_tok_s_per_seq": (new_tokens - 1) / decode_s,
             "decode_tok_s_total": batch * (new_tokens - 1) / decode_s,
             "ms_per_step": decode_s / (new_tokens - 1) * 1e3} if decode_s > 0 else {}  # noise beat the decode
    return {"ttft_ms": ttft * 1e3, **rates, "ttft_runs_s": ttft_runs, "total_runs_s": total_runs,
            **({"first_generate_s": first[0]} if first else {})}, last["seq"]


def host_syncs(model, inputs: dict, new_tokens: int, device: torch.device, **extra) -> int | None:
    """How many synchronizing CUDA calls torch flags (``torch.cuda.set_sync_debug_mode``) in one generate; None off
    CUDA. Two lengths' difference is the count per decode step."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            generate(model, inputs, new_tokens, **extra)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        synchronize(device)
    return sum("synchroniz" in str(w.message) for w in caught)


def graph_replay_ms(model, device: torch.device, new_tokens: int, replays: int = 24) -> float | None:
    """The captured decode step's own time: ``replays`` back-to-back replays of the graph the last generate (of
    ``new_tokens`` tokens) kept (decode_graphs.py), no host work between them, three times; None where no graph was
    captured or that generate made too few tokens. The cache's lengths are moved back first so that the replays
    rewrite positions already used (past its end they would fail on the device), then restored."""
    decoder = getattr(model, "_fast_decoder", None)
    graph = decoder.current if decoder is not None else None
    repeat = 3
    if device.type != "cuda" or graph is None or graph.graph is None or new_tokens <= replays * repeat:
        return None
    lengths = graph._lengths()  # every replay moves them on by one: back by all the replays to come
    graph._restore([length - replays * repeat for length in lengths])
    try:
        times = timed_runs(lambda: [graph.graph.replay() for _ in range(replays)], device, repeat=repeat, warmup=0)
    finally:
        graph._restore(lengths)
    return median(times) / replays * 1e3


@functools.cache
def _meta_model(name: str):
    family = FAMILIES[name]
    with torch.device("meta"):
        return family.model_class()(family.config(False))


@functools.cache
def text_step_params(name: str) -> int:
    """Parameters a decode step of text tokens must read, at the real size (counted on the meta device): the
    language model and the LM head, without CogVLM's vision experts (a text token runs the language expert only)
    and without an input embedding table that is not the LM head's (a step reads one row of it)."""
    family, model = FAMILIES[name], _meta_model(name)
    embedding = model.get_input_embeddings().weight
    untied = embedding is not model.get_output_embeddings().weight
    total = 0
    for n, p in model.named_parameters():
        if family.kind != "peer" and not n.startswith(("language_model", "lm_head")):
            continue
        if "vision_expert" in n or "vision_mlp" in n or (untied and p is embedding):
            continue
        total += p.numel()
    return total + (embedding.shape[1] if untied else 0)


def prefill_floor_ms(name: str, prompt_len: int, batch: int, floors: dict) -> float:
    """A lower bound on the time to first token of ``batch`` image prompts of ``prompt_len`` tokens (one image
    each), at the real size: the larger of reading every weight once (bf16, at the measured copy bandwidth) and the
    matmul work at the measured bf16 matmul rate. Counted: 2 FLOPs per parameter per token for the vision tower
    (its patches + class token), the adapter (per image token) and the language model (per prompt token; the LM head
    once per row), and attention's 4·T²·H per layer (half of it for the causal language model). Not counted: norms,
    softmax, rotary, anything else outside a matmul; so the bound is below what any implementation can reach."""
    family, model = FAMILIES[name], _meta_model(name)
    config, text = model.config, family.text_config(model.config)
    vision, adapter, language = 0, 0, 0
    for n, p in model.named_parameters():
        group = n.split(".")[0]
        if group in ("language_model", "lm_head"):
            language += p.numel()
        elif group == "vision_model":
            vision += p.numel()
        else:
            adapter += p.numel()
    head = model.get_output_embeddings().weight.numel()
    v = config.vision_config
    patches = (v.image_size // v.patch_size) ** 2 + 1
    per_token = text_step_params(name) - head  # the LM head runs once per row, below
    flops = batch * (2 * vision * patches + 4 * v.num_hidden_layers * patches**2 * v.hidden_size
                     + 2 * adapter * config.num_image_tokens
                     + 2 * per_token * prompt_len + 2 * head
                     + 2 * text.num_hidden_layers * prompt_len**2 * text.hidden_size)
    seconds = max(2 * (vision + adapter + language) / (floors["copy_GBps"] * 1e9),
                  flops / (floors["bf16_matmul_TFLOPs"] * 1e12))
    return seconds * 1e3
