"""finetune: LoRA / QLoRA training steps at real size: step time, samples/s and peak memory.

Per family and method: the real-size model with seeded random bf16 weights built on the device (as every mode);
``qlora`` then swaps every linear layer of the language model for a bitsandbytes NF4 one (double quantization,
bf16 compute; the image path stays bf16, as ``visualglm-finetune --method qlora`` loads it); peft LoRA with the
family's default targets and rank (``modeling_visualglm.tools.finetune.model.lora_defaults``, the originals'
recipes); gradient checkpointing; AdamW on the adapter. One sample is the original's sequence: VisualGLM 32 image
slots + 64 source + 256 target tokens (finetune_visualglm.sh), CogVLM2 its 2,306 image tokens + 2,048 text tokens
(the "2K text" of THUDM's figures). Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps (weights
included), which is below what ``nvidia-smi`` shows by the allocator's cache and the CUDA context.
"""

from __future__ import annotations

import time
import warnings

import torch

from ..harness import GiB, empty_cache, median, synchronize
from ..models import build

DEFAULTS = dict(families="visualglm,cogvlm2", methods="qlora,lora", batch=1, steps=3)
SMOKE = dict(families="visualglm,cogvlm2", methods="lora", batch=1, steps=1)
# text tokens per sample besides the image placeholders (the originals' lengths, see the docstring)
TEXT_TOKENS = {"visualglm": 64 + 256, "cogvlm": 2048, "minigpt4": 160 + 32}


def add_arguments(ap):
    ap.add_argument("--methods", help="lora,qlora (qlora needs CUDA and bitsandbytes)")
    ap.add_argument("--batch", type=int, help="samples per step")
    ap.add_argument("--steps", type=int, help="timed steps (after one warm-up step)")


def quantize_language_model(model) -> int:
    """Every nn.Linear inside ``model.language_model`` → bitsandbytes NF4 (in place); returns how many."""
    import bitsandbytes as bnb

    count = 0
    for parent in list(model.language_model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4").to(child.weight.device)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, q)
            count += 1
    return count


def sample(built, batch: int, device):
    text = TEXT_TOKENS[built.family.kind]
    rows = [built.prompt(text) for _ in range(batch)]
    ids = torch.tensor(rows, device=device)
    return dict(input_ids=ids, labels=ids.clone(), pixel_values=built.images(batch))


def train_steps(model, inputs, steps: int, device) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step()  # warm-up: optimizer state, kernels
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None
    return {"step_s": median(times), "step_runs_s": times, "peak_GiB": peak, "loss": loss.item(),
            "trainable_params": sum(p.numel() for p in params)}


def bench(name, method, args, device) -> dict:
    from peft import LoraConfig, get_peft_model

    from modeling_visualglm.tools.finetune.model import lora_defaults

    empty_cache(device)
    built = build(name, device, tiny=args.smoke_cpu)
    model = built.model
    row = {"family": name, "method": method, "batch": args.batch}
    if method == "qlora":
        row["quantized_linears"] = quantize_language_model(model)
        empty_cache(device)
    row["weights_GiB"] = torch.cuda.memory_allocated(device) / GiB if device.type == "cuda" else None
    lora = lora_defaults(model.config)
    model.config.use_cache = False
    model.requires_grad_(False)
    # transformers 5.25 renames gradient_checkpointing_enable (the older name warns there)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.enable_input_require_grads()
    with warnings.catch_warnings():  # peft reads is_gradient_checkpointing, deprecated by transformers 5.24
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=lora.targets, bias="none"))
    model.train()
    inputs = sample(built, args.batch, device)
    row.update(seq_len=inputs["input_ids"].shape[1], lora=f"r={lora.r} {lora.note}")
    row.update(train_steps(model, inputs, args.steps, device))
    row["samples_per_s"] = args.batch / row["step_s"]
    del model, built, inputs
    empty_cache(device)
    return row


def run(args, device, record, save):
    record.data.update(settings={k: getattr(args, k) for k in DEFAULTS}, rows=[])
    for name in args.families.split(","):
        for method in args.methods.split(","):
            try:
                row = bench(name, method, args, device)
            except Exception as exc:  # report, do not hide
                row = {"family": name, "method": method, "error": f"{type(exc).__name__}: {exc}"}
            print(row, flush=True)
            record.data["rows"].append(row)
            save()
