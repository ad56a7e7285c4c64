"""ChatGLM-6B (GLM v1) decoder: 2D rotary positions, alpha-scaled post-LN residual, prefix-LM mask.

Implements the language model of ChatGLM-6B / VisualGLM-6B as a batch-first transformers 5.x block.
Paper: GLM, Du et al. 2022, "GLM: General Language Model Pretraining with Autoregressive Blank
Infilling", https://arxiv.org/abs/2103.10360. Originals: THUDM's HF ``modeling_chatglm.py``
(THUDM/chatglm-6b, git mirror greensheng/chatglm-6b @8b7d335) and SwissArmyTransformer 0.4.12
``sat/model/official/chatglm_model.py`` (THUDM/SwissArmyTransformer @63dc23a), which VisualGLM-6B runs.
Parameter names follow THUDM-HF (``query_key_value`` head-interleaved: rows [h0: q, k, v; h1: q, k, v; ...]),
so THUDM-HF checkpoints load by renaming alone and SAT checkpoints (blocked [Q; K; V]) need one permutation.

Per layer, with alpha = sqrt(2 * num_hidden_layers) and both residuals taken from the *normalized* input:
``a = LN_in(x); h = alpha * a + Attn(a); m = LN_post(h); y = alpha * m + MLP(m)``.

Deliberate differences from the originals:
- Batch-first tensors, transformers ``Cache`` objects, attention through ``ALL_ATTENTION_FUNCTIONS``.
- The rotary ``inv_freq`` is exact fp32 (= SAT 0.4.12) unless ``config.rope_fp16_inv_freq`` (= THUDM-HF,
  which rounds it to fp16 even in fp32 models).
- No per-layer ``coeff = layer_id + 1`` score scaling: THUDM-HF divides q by ``sqrt(hd) * coeff`` and
  multiplies the scores by ``coeff`` again before the fp32 softmax, which is the identity up to fp16
  rounding (SAT >= 0.4 dropped it too).
- Left padding comes from ``attention_mask`` only, never from ``pad_token_id`` (SAT fills VisualGLM's image
  slots with the pad id, so "leading pad ids" would misfire there).
- The prefix-LM mask is derived from the block position ids (block 0 = bidirectional prefix), so no token
  lookup happens in ``forward`` and decode steps have no host sync.
- No int4/int8 ``quantize()`` and no P-tuning prefix (use bitsandbytes / peft).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import (
    DecoderPreTrainedModel, DenseMLP, DispatchedAttention, RotaryEmbedding, fold_sign, rotary_inv_freq, rotate_blocks,
)
from .compat import kv_length
from .configuration_blocks import ChatGLMConfig

# ---------------------------------------------------------------------------------------------------
# 2D positions and the prefix-LM mask
# ---------------------------------------------------------------------------------------------------


def chatglm_position_ids(
    input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor], config: ChatGLMConfig
) -> torch.LongTensor:
    """GLM 2D positions (B, 2, T): row 0 = position ids, row 1 = block position ids.

    Tensor ops only (no host sync), so generation may call it on prompt + generated ids every step and keep
    the tail. With ``p`` the index of a token among the real (non-padding) tokens of its row, ``ctx`` the ``p``
    of the first ``<sop>`` and ``mp`` the ``p`` of the first ``[gMASK]`` before it (else the first ``[MASK]``
    before it): position = p if p < ctx else mp; block = 0 if p < ctx else p - ctx + 1. Padding (where
    ``attention_mask`` is 0) gets (0, 0).

    Rows that break the prompt format get a defined, documented result (``forward`` rejects them at prefill):
    without ``<sop>`` the whole row is the bidirectional prefix (ctx = T); without a mask token before
    ``<sop>``, mp = ctx - 1 (the last prefix token, i.e. where ``[gMASK]`` sits in a well-formed prompt).
    Mask tokens are only searched before ``<sop>`` so generated tokens can never move the prompt's positions.
    """
    b, t = input_ids.shape
    if attention_mask is None:
        real = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        real = attention_mask[:, -t:].bool()
    p = real.long().cumsum(-1) - 1  # (B, T) index among real tokens; -1 on leading pads
    not_found = torch.full_like(p, t)

    sop = (input_ids == config.bos_token_id) & real
    ctx = torch.where(sop, p, not_found).amin(-1, keepdim=True)  # (B, 1); t when absent
    in_prefix = p < ctx
    gmask = (input_ids == config.gmask_token_id) & real & in_prefix
    mask = (input_ids == config.mask_token_id) & real & in_prefix
    mp = torch.where(
        gmask.any(-1, keepdim=True),
        torch.where(gmask, p, not_found).amin(-1, keepdim=True),
        torch.where(
            mask.any(-1, keepdim=True),
            torch.where(mask, p, not_found).amin(-1, keepdim=True),
            (ctx - 1).clamp(min=0),
        ),
    )  # (B, 1)

    position = torch.where(in_prefix, p, mp)
    block = torch.where(in_prefix, torch.zeros_like(p), p - ctx + 1)
    zero = torch.zeros_like(p)
    position = torch.where(real, position, zero)
    block = torch.where(real, block, zero)
    return torch.stack([position, block], dim=1)  # (B, 2, T)


def check_chatglm_prompt(
    input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor], config: ChatGLMConfig
) -> None:
    """Raise ValueError naming the first row that lacks ``<sop>`` or a ``[gMASK]``/``[MASK]`` before it.

    One host sync; meant for prefill only.
    """
    t = input_ids.shape[1]
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask[:, -t:].bool()
    sop = (input_ids == config.bos_token_id) & real
    # a mask token counts only before the first <sop>, as in chatglm_position_ids
    before_sop = (sop.long().cumsum(-1) == 0) & real
    has_sop = sop.any(-1)
    has_mask = (
        ((input_ids == config.gmask_token_id) | (input_ids == config.mask_token_id)) & before_sop
    ).any(-1)
    flags = torch.stack([has_sop, has_mask]).tolist()  # the one sync
    for row, (ok_sop, ok_mask) in enumerate(zip(*flags)):
        if not ok_sop:
            raise ValueError(
                f"row {row} of input_ids has no <sop> (bos_token_id={config.bos_token_id}): ChatGLM prompts end "
                "with [gMASK], <sop> (tokenizer.build_inputs_with_special_tokens adds them)"
            )
        if not ok_mask:
            raise ValueError(
                f"row {row} of input_ids has neither [gMASK] (id {config.gmask_token_id}) nor [MASK] "
                f"(id {config.mask_token_id}) before its <sop>: ChatGLM needs one to place its 2D positions"
            )


def chatglm_prefix_lm_mask(
    position_ids: torch.LongTensor,
    attention_mask: Optional[torch.Tensor],
    past_length,
    kv_length: int,
) -> torch.Tensor:
    """Boolean (B, 1, T, kv_length) mask, True = attend.

    Query i (absolute index past_length + i) sees key k iff k is not padding and (k <= past_length + i or k
    is a current token in the prefix, i.e. block position 0). Cached keys are always earlier than the
    queries; keys at or beyond past_length + T (the empty tail of a static cache) are never seen.
    ``past_length`` may be an int or a 0-d tensor (static caches count on device); ``attention_mask`` is the
    2D padding mask (B, past_length + T) or None.
    """
    b, _, t = position_ids.shape
    device = position_ids.device
    prefix = position_ids[:, 1] == 0  # (B, T)
    q_idx = torch.arange(t, device=device)
    k_rel = torch.arange(kv_length, device=device) - past_length  # (Tk,) key index relative to this chunk
    causal = k_rel[None, :] <= q_idx[:, None]  # (T, Tk); includes every cached key
    in_chunk = (k_rel >= 0) & (k_rel < t)
    prefix_key = prefix.gather(1, k_rel.clamp(0, t - 1).expand(b, kv_length)) & in_chunk  # (B, Tk)
    allowed = causal[None] | prefix_key[:, None, :]  # (B, T, Tk)
    if attention_mask is not None:
        keep = attention_mask[:, :kv_length].bool()
        if keep.shape[1] < kv_length:  # static cache: its unused tail is never attended
            keep = nn.functional.pad(keep, (0, kv_length - keep.shape[1]), value=False)
        allowed = allowed & keep[:, None, :]
    return allowed[:, None]  # (B, 1, T, Tk)


# ---------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------


class ChatGLMRotaryEmbedding(RotaryEmbedding):
    """2D rotary tables: (B, 2, T) positions → cos, sin of shape (B, 1, T, head_dim), where the first half
    of head_dim follows the position ids and the second half the block position ids."""

    @staticmethod
    def compute_inv_freq(config: ChatGLMConfig) -> torch.Tensor:
        # each half of a head is its own rotary space of size head_dim / 2
        return rotary_inv_freq(config.head_dim // 2, config.rope_theta, fp16_round=config.rope_fp16_inv_freq)

    @torch.no_grad()
    def forward(self, position_ids: torch.LongTensor, dtype: torch.dtype):
        # fp32 angles like SAT 0.4.12; THUDM-HF builds them in the model dtype (fp16), which drifts at long range
        freqs = self.angles(position_ids)  # (B, 2, T, hd/4)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, 2, T, hd/2)
        emb = torch.cat((emb[:, 0], emb[:, 1]), dim=-1)[:, None]  # (B, 1, T, hd)
        return emb.cos().to(dtype), fold_sign(emb.sin().to(dtype), blocks=2)  # for apply_2d_rotary


def apply_2d_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """GLM's 2D RoPE on x (..., hd) (the attention passes query and key heads together, (B, T, nh, 2, hd), with
    (B, T, 1, 1, hd) tables): each half of a head rotates (``apply_rotary``) with its half of the tables; the sin
    table comes sign-folded (``fold_sign(sin, blocks=2)``, see ``rotate_blocks``)."""
    return rotate_blocks(x, cos, signed_sin, blocks=2)


class ChatGLMAttention(DispatchedAttention):
    """Self-attention with fused head-interleaved qkv and 2D rotary: (B, T, H) → (B, T, H)."""

    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        # the mask always carries the structure (bidirectional prefix, causal after <sop>); kernels must never
        # substitute a plain causal mask
        super().__init__(config, is_causal=False)
        self.layer_idx = layer_idx
        self.num_key_value_groups = 1
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.num_attention_heads * self.head_dim)
        self.dense = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        **kwargs,
    ):
        """``kwargs``: ``cache``, ``cache_update`` (see ``attend_cached``) and the kernel's."""
        input_shape = hidden_states.shape[:-1]
        # interleaved per head, so -1 heads also works on a tensor-parallel shard of whole heads
        qkv = self.query_key_value(hidden_states).view(*input_shape, -1, 3, self.head_dim)  # (B, T, nh, 3, hd)
        cos, signed_sin = (table.transpose(1, 2)[:, :, :, None] for table in position_embeddings)  # (B, T, 1, 1, hd)
        query_key = apply_2d_rotary(qkv[..., :2, :], cos, signed_sin)  # query and key together: (B, T, nh, 2, hd)
        query, key = (query_key[..., i, :].transpose(1, 2) for i in range(2))  # (B, nh, T, hd) each
        value = qkv[..., 2, :].transpose(1, 2)
        attn_output, attn_weights = self.attend_cached(query, key, value, attention_mask, **kwargs)
        return self.dense(attn_output), attn_weights


class ChatGLMBlock(GradientCheckpointingLayer):
    """One GLM layer (post-LN with alpha-scaled residuals of the normalized input): (B, T, H) → (B, T, H)."""

    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.alpha = math.sqrt(2 * config.num_hidden_layers)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = ChatGLMAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = DenseMLP(config)  # tanh-GELU; no gating despite THUDM's "GLU"

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        """``kwargs``: the attention's (``position_embeddings``, ``attention_mask``, ``cache``, ...)."""
        attn_input = self.input_layernorm(hidden_states)
        attn_output, _ = self.attention(attn_input, **kwargs)
        hidden_states = self.alpha * attn_input + attn_output
        mlp_input = self.post_attention_layernorm(hidden_states)
        return self.alpha * mlp_input + self.mlp(mlp_input)


class ChatGLMPreTrainedModel(DecoderPreTrainedModel):
    """The transformers class attributes of ChatGLM models (flash and flex stay off: see the base)."""

    config_class = ChatGLMConfig
    _no_split_modules = ["ChatGLMBlock"]


class ChatGLMModel(ChatGLMPreTrainedModel):
    """ChatGLM-6B decoder without the LM head: ids/embeddings (B, T[, H]) → last_hidden_state (B, T, H)
    after ``final_layernorm``, plus the updated cache."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([ChatGLMBlock(config, i) for i in range(config.num_hidden_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rotary_emb = ChatGLMRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @property
    def final_norm(self) -> nn.LayerNorm:
        return self.final_layernorm

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding):
        self.word_embeddings = value

    def check_input_kinds(self, input_ids, inputs_embeds) -> None:
        # both may be given: the embeddings are used and the ids only locate <sop> / [gMASK] for the positions
        if input_ids is None and inputs_embeds is None:
            raise ValueError("pass input_ids or inputs_embeds")

    def layer_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, cache, kwargs) -> dict:
        """
        input_ids (B, T) and/or inputs_embeds (B, T, H): when both are given the embeddings are used and the
            ids only locate ``<sop>`` / ``[gMASK]`` for the positions.
        attention_mask: None, a 2D padding mask (B, past + T) (1 = real token), or a ready 4D mask
            (B, 1, T, Tk) that already encodes the prefix-LM pattern (passed through untouched).
        position_ids (B, 2, T): required once the cache holds tokens; at prefill they are derived from
            ``input_ids`` (see ``chatglm_position_ids``) after checking every row has ``<sop>`` and a mask token.
        The whole prefix (everything before ``<sop>``) must be in one forward call: its bidirectional attention
            is decided per call, so a prefix split across calls would see only its earlier part.
        """
        position_ids = self._position_ids(position_ids, input_ids, attention_mask, cache)
        mask = self._attention_mask(attention_mask, position_ids, cache, inputs_embeds.shape[1])
        position_embeddings = self.rotary_emb(position_ids, inputs_embeds.dtype)  # once per forward
        return {"position_embeddings": position_embeddings, "attention_mask": mask}

    def _position_ids(self, position_ids, input_ids, attention_mask, cache) -> torch.LongTensor:
        """The given (B, 2, T) positions, checked; or, at prefill, derived from ``input_ids`` after checking that
        every row has ``<sop>`` and a mask token (one host sync)."""
        if position_ids is not None:
            if position_ids.ndim != 3 or position_ids.shape[1] != 2:
                raise ValueError(
                    f"ChatGLM position_ids are 2D per token, shaped (B, 2, T) (position, block position); got "
                    f"{tuple(position_ids.shape)}"
                )
            return position_ids
        # one host sync, acceptable at prefill; decode steps always pass position_ids
        if cache is not None and cache.get_seq_length() != 0:
            raise ValueError(
                "position_ids are required for decode steps (the cache is not empty): compute them with "
                "chatglm_position_ids(full_input_ids, attention_mask, config) on prompt + generated ids and "
                "keep the last columns (generate() does this)"
            )
        if input_ids is None:
            raise ValueError("position_ids are required with inputs_embeds unless input_ids are also given")
        pad_mask = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
        check_chatglm_prompt(input_ids, pad_mask, self.config)
        return chatglm_position_ids(input_ids, pad_mask, self.config)

    @staticmethod
    def _attention_mask(attention_mask, position_ids, cache, seq_len: int):
        """The prefix-LM mask (B, 1, T, Tk) from the 2D padding mask and the block positions; a ready 4D mask
        as given; None when a single new token sees every cached key."""
        if attention_mask is not None and attention_mask.ndim == 4:
            return attention_mask
        past_length = cache.get_seq_length() if cache is not None else 0
        kv_len = kv_length(cache, seq_len) if cache is not None else seq_len
        if attention_mask is None and seq_len == 1 and isinstance(past_length, int) and kv_len == past_length + 1:
            return None
        return chatglm_prefix_lm_mask(position_ids, attention_mask, past_length, kv_len)
