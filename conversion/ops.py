"""Named tensor ops used by rule tables.

Every op takes the source tensors (in the order of the rule's source templates) plus the rule's keyword
arguments and returns one tensor per target. Ops use only shape operations (view/permute/cat/split), so the
applier can run them on ``meta`` tensors to learn the output shapes before reading any data; the few that compute
(a LoRA merge, a bicubic resize) skip the arithmetic on ``meta`` tensors. Every op of every format is here.

An op registered with ``inverse_of`` undoes another one: ``conversion.apply.to_original`` runs a rule table
backwards through them (our state dict → a source layout).
"""

from __future__ import annotations

import torch

OPS = {}
INVERSES = {}  # op name → the name of the op that undoes it


def register(name: str, *, inverse_of: str | None = None):
    def deco(fn):
        OPS[name] = fn
        if inverse_of is not None:
            INVERSES[inverse_of] = name
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


@register("block_qkv_heads", inverse_of="interleave_qkv_heads")
def block_qkv_heads(t: torch.Tensor, *, num_heads: int) -> tuple[torch.Tensor]:
    """Inverse of :func:`interleave_qkv_heads`: interleaved → blocked [Q; K; V]."""
    hd = _heads(t.shape[0], num_heads, 3, "block_qkv_heads")
    rest = t.shape[1:]
    return (t.reshape(num_heads, 3, hd, *rest).transpose(0, 1).reshape(t.shape),)


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


@register("rope_permute")
def rope_permute(t: torch.Tensor, *, num_heads: int) -> tuple[torch.Tensor]:
    """Meta's rotary row order → transformers' (q/k projections of LLaMA, per head).

    Meta's ``apply_rotary_emb`` rotates interleaved pairs (rows 2j, 2j+1 of a head, a complex view);
    transformers' ``rotate_half`` pairs row j with row j + d/2. Per head, view the d rows as (d/2, 2) and
    transpose: the even rows come first, then the odd ones. Works for weights (rows, in) and biases (rows,).
    """
    hd = _heads(t.shape[0], num_heads, 1, "rope_permute")
    if hd % 2:
        raise ValueError(f"rope_permute: head dim {hd} is odd; rotary pairs need an even head dim")
    rest = t.shape[1:]
    return (t.reshape(num_heads, hd // 2, 2, *rest).transpose(1, 2).reshape(t.shape),)


@register("concat_mp_shards")
def concat_mp_shards(*shards: torch.Tensor, dim: int, rope_heads: int = 0) -> tuple[torch.Tensor]:
    """Model-parallel slices → the full tensor: concatenate along ``dim``, then ``rope_permute`` if asked.

    fairscale's ColumnParallelLinear splits the output rows (dim 0), RowParallelLinear the input columns
    (dim 1), ParallelEmbedding the embedding dim (dim 1). Permuting after the concatenation is right because
    Meta splits q/k on head boundaries (each slice holds whole heads). One shard is returned as it is (no copy).
    """
    first = shards[0]
    for k, s in enumerate(shards[1:], 1):
        if s.dim() != first.dim() or any(a != b for d, (a, b) in enumerate(zip(s.shape, first.shape)) if d != dim):
            raise ValueError(f"concat_mp_shards: shard {k} has shape {list(s.shape)}, shard 0 {list(first.shape)}: "
                             f"they must agree except along dim {dim}")
        if s.dtype != first.dtype:
            raise ValueError(f"concat_mp_shards: shard {k} is {s.dtype}, shard 0 {first.dtype}")
    full = first if len(shards) == 1 else torch.cat(shards, dim=dim)
    if rope_heads:
        (full,) = rope_permute(full, num_heads=rope_heads)
    return (full,)


@register("replicated")
def replicated(*shards: torch.Tensor) -> tuple[torch.Tensor]:
    """A tensor every model-parallel shard holds a copy of (norm weights): shard 0's, after checking the rest.

    The copies must be bit-equal; different copies mean the shards come from different checkpoints.
    """
    first = shards[0]
    for k, s in enumerate(shards[1:], 1):
        if s.shape != first.shape or s.dtype != first.dtype:
            raise ValueError(f"replicated: shard {k} holds {list(s.shape)} {s.dtype}, shard 0 "
                             f"{list(first.shape)} {first.dtype}")
        if not first.is_meta and not torch.equal(s, first):
            raise ValueError(f"replicated: shard {k}'s copy differs from shard 0's: the model-parallel files "
                             "come from different checkpoints")
    return (first,)


@register("add_delta")
def add_delta(base: torch.Tensor, delta: torch.Tensor, *, dtype: str | None = None,
              pad_rows: bool = False) -> tuple[torch.Tensor]:
    """``base + delta`` (FastChat's ``apply_delta``), computed in ``dtype`` (default: the delta's dtype).

    Both operands are cast to that dtype first and added once, as FastChat does in float16
    (``param.data += delta`` after loading both with ``torch_dtype=float16``). With ``pad_rows`` (the
    vocabulary tensors) a base with fewer rows than the delta is zero-padded first, as FastChat v0.1.10 did
    for Vicuna v0 (it resized the base to 32001 rows and zeroed the new one). Any other shape difference is
    an error.
    """
    if base.shape != delta.shape:
        same_tail = base.dim() == delta.dim() and base.shape[1:] == delta.shape[1:]
        if not (pad_rows and same_tail and delta.shape[0] > base.shape[0]):
            what = ("the delta has fewer rows than the base" if pad_rows and same_tail
                    else "only the vocabulary rows of embed_tokens/lm_head may differ" if pad_rows
                    else "the shapes must be equal")
            raise ValueError(f"add_delta: base {list(base.shape)} vs delta {list(delta.shape)}: {what}")
    compute = getattr(torch, dtype) if dtype else delta.dtype
    base, delta = base.to(compute), delta.to(compute)
    if base.shape[0] < delta.shape[0]:
        pad = torch.zeros((delta.shape[0] - base.shape[0], *base.shape[1:]), dtype=compute, device=base.device)
        base = torch.cat([base, pad], dim=0)
    return (base + delta,)


# --- MiniGPT-4 (MiniGPT-4 @ef1ac08 mini_gpt4.py / minigpt_v2.py, LAVIS eva_vit.py) ----------------------------

@register("minigpt4_qv_bias")
def qv_bias(q_bias: torch.Tensor, v_bias: torch.Tensor) -> tuple[torch.Tensor]:
    """EVA's separate q/v biases → one [3H] qkv bias with a zero K slice (the bias EVA's attention applies)."""
    return (torch.cat([q_bias, torch.zeros_like(q_bias), v_bias]),)


@register("minigpt4_pad_rows")
def pad_rows(t: torch.Tensor, *, rows: int) -> tuple[torch.Tensor]:
    """Append zero rows up to ``rows`` (the image placeholder's row; never looked up, never sampled)."""
    if t.shape[0] > rows:
        raise ValueError(f"{t.shape[0]} rows, more than {rows}")
    if t.shape[0] == rows:
        return (t,)
    return (torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))]),)


@register("minigpt4_interpolate_pos")
def interpolate_pos(t: torch.Tensor, *, grid: int) -> tuple[torch.Tensor]:
    """[1, 1 + g², H] → [1 + grid², H]: CLS kept, the g×g position grid resized bicubically (fp32,
    align_corners False), as MiniGPT-v2's ``interpolate_pos_embed``."""
    t = t[0]
    cls, pos = t[:1], t[1:]
    g = int(round(pos.shape[0] ** 0.5))
    if g * g != pos.shape[0]:
        raise ValueError(f"{pos.shape[0]} positions are not a square grid")
    if t.is_meta:
        return (t.new_empty((1 + grid * grid, t.shape[1])),)
    pos = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    pos = torch.nn.functional.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False)
    pos = pos.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(t.dtype)
    return (torch.cat([cls, pos]),)


@register("minigpt4_fuse_qkv_lora")
def fuse_qkv_lora(q, k, v, qa, qb, va, vb, *, alpha: float) -> tuple[torch.Tensor]:
    """q/k/v with the LoRA deltas of q and v merged (W + alpha/r · B A, peft's scaling), then fused blocked [Q; K; V]."""
    scale = alpha / qa.shape[0]  # lora_A is [r, in]
    if not q.is_meta:
        q = (q.float() + scale * (qb.float() @ qa.float())).to(q.dtype)
        v = (v.float() + scale * (vb.float() @ va.float())).to(v.dtype)
    return (torch.cat([q, k, v]),)


# --- SAT LoRA (SwissArmyTransformer 0.4.12 sat/model/finetune/lora2.py: LoraLinear, merge_linear_lora) ----------
# A LoraLinear of ``partition`` p keeps W as ``original`` and p pairs A_k [r, in], B_k [rows_k, r]; its output rows
# are the concatenation of the p slices (q, k, v for a fused qkv): y = W x + cat_k(B_k A_k x) · alpha / r.
# The sources of these ops are (A_0 … A_{p-1}, B_0 … B_{p-1}), after W for the merge. ``then`` names the op of the
# base weight's rule (e.g. ``interleave_qkv_heads``), applied to the result with the remaining keyword arguments:
# it permutes output rows, so it commutes with adding a delta (P(W + D) = PW + PD).

def _lora_pairs(ab: tuple, rows: int | None = None, cols: int | None = None) -> tuple[list, list, int]:
    """(A list, B list, r), after checking the shapes LoraLinear gives them (``rows``/``cols``: W's shape)."""
    if not ab or len(ab) % 2:
        raise ValueError(f"LoRA needs matrix_A and matrix_B in pairs, got {len(ab)} tensors")
    p = len(ab) // 2
    a, b = list(ab[:p]), list(ab[p:])
    r = a[0].shape[0] if a[0].dim() == 2 else -1
    cols = a[0].shape[-1] if cols is None else cols
    bad = [f"matrix_A.{k} is {list(t.shape)}, not [{r}, {cols}]" for k, t in enumerate(a)
           if t.dim() != 2 or tuple(t.shape) != (r, cols)]
    bad += [f"matrix_B.{k} is {list(t.shape)}, not [rows, {r}] (rank {r} from matrix_A.0)" for k, t in enumerate(b)
            if t.dim() != 2 or t.shape[1] != r]
    if not bad and rows is not None and sum(t.shape[0] for t in b) != rows:
        bad.append(f"the matrix_B rows {[t.shape[0] for t in b]} do not add up to the {rows} output rows")
    if bad or r < 1:
        raise ValueError("; ".join(bad) or "rank 0")
    return a, b, r


def _then(t: torch.Tensor, then: str | None, kwargs: dict) -> tuple[torch.Tensor]:
    return (t,) if then is None else tuple(OPS[then](t, **kwargs))


@register("sat_lora_merge")
def sat_lora_merge(w: torch.Tensor, *ab: torch.Tensor, alpha: float, then: str | None = None,
                   **then_kwargs) -> tuple[torch.Tensor]:
    """W + cat_k(B_k A_k) · alpha / r as SAT's ``merge_linear_lora`` computes it (each B_k A_k in float32, scaled,
    concatenated, added to W, cast back to W's dtype), then the base rule's op."""
    if w.dim() != 2:
        raise ValueError(f"original.weight is {list(w.shape)}, not a matrix")
    a, b, r = _lora_pairs(ab, rows=w.shape[0], cols=w.shape[1])
    if not w.is_meta:
        delta = torch.cat([bk.float() @ ak.float() * (alpha / r) for ak, bk in zip(a, b)], dim=-2)
        w = (w + delta).to(w.dtype)
    return _then(w, then, then_kwargs)


@register("sat_lora_stack_a")
def sat_lora_stack_a(*a: torch.Tensor) -> tuple[torch.Tensor]:
    """A_0 … A_{p-1} → peft's ``lora_A`` [p·r, in] (one adapter of rank p·r)."""
    if any(t.dim() != 2 or t.shape != a[0].shape for t in a):
        raise ValueError(f"matrix_A shapes {[list(t.shape) for t in a]} are not one [r, in] shape")
    return (torch.cat(a, dim=0),)


@register("sat_lora_blockdiag_b")
def sat_lora_blockdiag_b(*b: torch.Tensor, then: str | None = None, **then_kwargs) -> tuple[torch.Tensor]:
    """B_0 … B_{p-1} → peft's ``lora_B`` [Σ rows_k, p·r]: block-diagonal, so slice k of the output sees only A_k
    (with peft's scaling alpha·p / (r·p) = SAT's alpha / r); then the base rule's op on the rows."""
    if any(t.dim() != 2 or t.shape[1] != b[0].shape[1] for t in b):
        raise ValueError(f"matrix_B shapes {[list(t.shape) for t in b]} do not share one rank")
    r = b[0].shape[1]
    out = b[0].new_zeros((sum(t.shape[0] for t in b), r * len(b)))
    row = 0
    for k, t in enumerate(b):
        out[row : row + t.shape[0], k * r : (k + 1) * r] = t
        row += t.shape[0]
    return _then(out, then, then_kwargs)


def run_op(name: str | None, tensors: tuple[torch.Tensor, ...], kwargs: dict) -> tuple[torch.Tensor, ...]:
    if name is None:
        if len(tensors) != 1:
            raise ValueError("a rule without an op takes exactly one source tensor")
        return tensors
    if name not in OPS:
        raise KeyError(f"unknown op {name!r}; known: {sorted(OPS)}")
    return tuple(OPS[name](*tensors, **kwargs))
