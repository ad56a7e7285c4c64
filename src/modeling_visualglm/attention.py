"""Attention shared by every block: the eager reference kernel, rotary-embedding helpers, and the decoder loop.

All attention layers call ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation,
eager_attention_forward)`` so SDPA (default), flash and flex kernels plug in without code changes; the
eager function here is the reference they are tested against. Tensors are batch-first:
query (B, nh, Tq, hd), key/value (B, nkv, Tk, hd); the result is (B, Tq, nh, hd).

Masks follow transformers' convention: a boolean mask is True where attention is allowed, a float
mask is added to the scores; either broadcasts to (B, 1|nh, Tq, Tk).
"""

from typing import Optional

import torch


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, nkv, T, hd) -> (B, nkv * n_rep, T, hd) for grouped-query attention."""
    if n_rep == 1:
        return hidden_states
    b, nkv, t, hd = hidden_states.shape
    return hidden_states[:, :, None].expand(b, nkv, n_rep, t, hd).reshape(b, nkv * n_rep, t, hd)


def eager_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
):
    """Reference attention: softmax in float32, like the originals."""
    n_rep = query.shape[1] // key.shape[1]
    key = repeat_kv(key, n_rep)
    value = repeat_kv(value, n_rep)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, nh, Tq, Tk)
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs, value)  # (B, nh, Tq, hd)
    return out.transpose(1, 2).contiguous(), probs


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """NeoX-style rotation: pairs dimension j with j + d/2."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, d) with cos/sin broadcastable to it."""
    return x * cos + rotate_half(x) * sin


def rotary_inv_freq(dim: int, base: float = 10000.0, fp16_round: bool = False) -> torch.Tensor:
    """inv_freq_i = base^(-2i/dim); ``fp16_round`` reproduces THUDM's HF ChatGLM, which stores it in fp16."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if fp16_round:
        inv_freq = inv_freq.half().float()
    return inv_freq


def run_decoder_layers(layers, final_norm, hidden_states: torch.Tensor, output_hidden_states: bool, **layer_kwargs):
    """``final_norm`` after ``layers`` (each called as ``layer(hidden_states, **layer_kwargs)``) → (B, T, H) and,
    with ``output_hidden_states``, transformers' ``hidden_states`` tuple (each layer's input, then the output)."""
    all_hidden_states = () if output_hidden_states else None
    for layer in layers:
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        hidden_states = layer(hidden_states, **layer_kwargs)
    hidden_states = final_norm(hidden_states)
    if output_hidden_states:
        all_hidden_states += (hidden_states,)
    return hidden_states, all_hidden_states
