"""Named tensor ops used by rule tables.

Every op takes the source tensors (in the order of the rule's source templates) plus the rule's keyword
arguments and returns one tensor per target. Ops use only shape operations (view/permute/cat/split), so the
applier can run them on ``meta`` tensors to learn the output shapes before reading any data.
"""

from __future__ import annotations

import torch

OPS = {}


def register(name: str):
    def deco(fn):
        OPS[name] = fn
        return fn

    return deco


def _heads(rows: int, num_heads: int, parts: int, name: str) -> int:
    if rows % (parts * num_heads):
        raise ValueError(f"{name}: {rows} rows are not {parts} x {num_heads} heads")
    return rows // (parts * num_heads)


@register("interleave_qkv_heads")
def interleave_qkv_heads(t: torch.Tensor, *, num_heads: int) -> tuple[torch.Tensor]:
    """Blocked [Q (all heads); K; V] → head-interleaved [h0: q,k,v; h1: q,k,v; ...] (rows of a fused qkv).

    SAT ≥ cf2cb8a (July 2023) stores ChatGLM's fused qkv blocked; THUDM-HF, the May-2023 SAT release and our
    ``ChatGLMModel`` use the interleaved order. Works for weights (3H, H_in) and biases (3H,).
    """
    hd = _heads(t.shape[0], num_heads, 3, "interleave_qkv_heads")
    rest = t.shape[1:]
    return (t.reshape(3, num_heads, hd, *rest).transpose(0, 1).reshape(t.shape),)


@register("block_qkv_heads")
def block_qkv_heads(t: torch.Tensor, *, num_heads: int) -> tuple[torch.Tensor]:
    """Inverse of :func:`interleave_qkv_heads`: interleaved → blocked [Q; K; V]."""
    hd = _heads(t.shape[0], num_heads, 3, "block_qkv_heads")
    rest = t.shape[1:]
    return (t.reshape(num_heads, 3, hd, *rest).transpose(0, 1).reshape(t.shape),)


@register("split_qkv")
def split_qkv(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocked fused [Q; K; V] → three tensors (equal thirds along dim 0)."""
    if t.shape[0] % 3:
        raise ValueError(f"split_qkv: {t.shape[0]} rows are not divisible by 3")
    return tuple(t.chunk(3, dim=0))


@register("fuse_qkv")
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor]:
    """Three tensors → blocked fused [Q; K; V] along dim 0."""
    return (torch.cat([q, k, v], dim=0),)


@register("concat")
def concat(*tensors: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor]:
    """Concatenate the sources along ``dim`` (e.g. model-parallel shards)."""
    return (torch.cat(tensors, dim=dim),)


@register("squeeze0")
def squeeze0(t: torch.Tensor) -> tuple[torch.Tensor]:
    """Drop a leading singleton dim (e.g. BLIP-2 ``query_tokens`` [1, Q, H] → [Q, H])."""
    if t.shape[0] != 1:
        raise ValueError(f"squeeze0: leading dim is {t.shape[0]}, not 1")
    return (t[0],)


@register("unsqueeze0")
def unsqueeze0(t: torch.Tensor) -> tuple[torch.Tensor]:
    """Add a leading singleton dim."""
    return (t.unsqueeze(0),)


def run_op(name: str | None, tensors: tuple[torch.Tensor, ...], kwargs: dict) -> tuple[torch.Tensor, ...]:
    if name is None:
        if len(tensors) != 1:
            raise ValueError("a rule without an op takes exactly one source tensor")
        return tensors
    if name not in OPS:
        raise KeyError(f"unknown op {name!r}; known: {sorted(OPS)}")
    return tuple(OPS[name](*tensors, **kwargs))
