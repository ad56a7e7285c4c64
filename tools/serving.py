"""What ``visualglm-chat``, ``visualglm-serve`` and ``visualglm-web`` share: loading a hub folder, a family's chat
sampling defaults and the flags that change them, and images from paths, URLs and ``data:`` URLs through the
folder's own bounded loader (``VisualGLMImageProcessor.load_image``: pixel limit, byte limit, timeout).

The sampling defaults are not copied here: they are the model's ``chat_defaults_for(config)`` (each family's
``CHAT_DEFAULTS`` table); the flags only override them.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import os

import sys

import torch

DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True, help="a hub folder (visualglm-convert's output) or a Hub repo id")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                    help="weights' dtype (default: float32 on CPU, bfloat16 on CUDA)")


def add_sampling_arguments(ap: argparse.ArgumentParser) -> None:
    """Flags over the family's chat defaults; a flag left out keeps the family's value."""
    g = ap.add_argument_group("sampling (default: the family's chat defaults, printed at start)")
    g.add_argument("--greedy", action="store_true", help="greedy decoding (do_sample=False)")
    g.add_argument("--temperature", type=float, help="sampling temperature (0 means greedy)")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--min-new-tokens", type=int)


def sampling_overrides(args) -> dict:
    """The ``chat``/``generate`` keywords the sampling flags set (only those given)."""
    out: dict = {}
    if args.temperature is not None:
        if args.temperature <= 0:
            out["do_sample"] = False
        else:
            out.update(do_sample=True, temperature=args.temperature)
    if args.greedy:
        out["do_sample"] = False
    for flag, key in (("top_p", "top_p"), ("top_k", "top_k"), ("repetition_penalty", "repetition_penalty"),
                      ("max_new_tokens", "max_new_tokens"), ("min_new_tokens", "min_new_tokens")):
        value = getattr(args, flag)
        if value is not None:
            out[key] = value
    if out.get("min_new_tokens") is not None:
        out["min_length"] = 0  # VisualGLM's default min_length (prompt included) would otherwise still apply
        if out["min_new_tokens"] == 0:
            del out["min_new_tokens"]  # min_length=0 says it all (both set makes transformers warn)
    return out


def missing_extra(module: str, prog: str, extra: str) -> bool:
    """True (after saying which extra to install) when ``module`` of an optional extra cannot be imported."""
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        return False
    print(f"{prog} needs the [{extra}] extra: pip install 'modeling_visualglm[{extra}]'", file=sys.stderr)
    return True


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(model_dir: str, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) of a hub folder, loaded as users load it: ``AutoModelForCausalLM`` with remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype = DTYPES[dtype] or (torch.float32 if device == "cpu" else torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch_dtype)
    model = model.to(device).eval()
    for name in ("chat", "stream_chat", "chat_defaults_for", "_chat_inputs"):
        if not hasattr(model, name):
            raise SystemExit(f"{model_dir}: {type(model).__name__} has no {name}(): not a modeling_visualglm folder")
    return model, tokenizer


def chat_defaults(model) -> dict:
    """The family's chat generation defaults (its ``CHAT_DEFAULTS`` row for this config)."""
    return model.chat_defaults_for(model.config)


def describe_sampling(model, overrides: dict) -> str:
    merged = {**chat_defaults(model), **overrides}
    keys = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "min_length",
            "min_new_tokens", "stop_strings")
    return ", ".join(f"{k}={merged[k]!r}" for k in keys if merged.get(k) is not None)


# --- images -----------------------------------------------------------------------------------------------------

class ImageError(ValueError):
    """A picture that cannot be used; the message names it (the server answers 400 with it)."""


def image_loader(model):
    """The folder's image processor: its ``load_image`` is the bounded loader (pixel/byte limits, URL timeout)."""
    return model.chat_image_processor()


def load_image_source(model, source: str, *, allow_local_files: bool = True, allow_urls: bool = True,
                      max_bytes: int | None = None):
    """An RGB PIL image from ``data:image/...;base64,...``, an http(s) URL or (when allowed) a local path."""
    processor = image_loader(model)
    limit = max_bytes if max_bytes is not None else getattr(processor, "max_image_bytes", 20 << 20)
    if not isinstance(source, str) or not source:
        raise ImageError("image URL must be a non-empty string")
    head = source[:16].lower()
    try:
        if head.startswith("data:"):
            meta, _, payload = source.partition(",")
            if ";base64" not in meta.lower():
                raise ImageError("data: image URLs must be base64 (data:image/png;base64,...)")
            if len(payload) > (limit * 4) // 3 + 4:
                raise ImageError(f"data: image is larger than {limit:,} bytes")
            try:
                raw = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as err:
                raise ImageError(f"data: image is not valid base64: {err}") from err
            return processor._decode(io.BytesIO(raw), "data: URL")
        if head.startswith(("http://", "https://")):
            if not allow_urls:
                raise ImageError("http(s) image URLs are disabled on this server")
            return processor.load_image(source)
        if "://" in head:
            if head.startswith("file://") and allow_local_files:
                source = source[len("file://"):]
            else:
                raise ImageError(f"image URL scheme not supported: {source[:40]!r} (use data:, http or https)")
        if not allow_local_files:
            raise ImageError("local image paths are refused (start the server with --allow-local-files)")
        return processor.load_image(os.path.expanduser(source))
    except ImageError:
        raise
    except (ValueError, OSError, TypeError) as err:  # the loader's own messages name the source
        raise ImageError(str(err)) from err
