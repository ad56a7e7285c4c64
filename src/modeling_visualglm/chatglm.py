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
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast

from .attention import apply_rotary, eager_attention_forward, rotary_inv_freq, run_decoder_layers
from .compat import ALL_ATTENTION_FUNCTIONS, cache_kwargs, cache_update_kwargs, init, kv_length, pick_cache
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


class ChatGLMRotaryEmbedding(nn.Module):
    """2D rotary tables: (B, 2, T) positions → cos, sin of shape (B, 1, T, head_dim), where the first half
    of head_dim follows the position ids and the second half the block position ids."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.config = config
        # each half of a head is its own rotary space of size head_dim / 2
        self.inv_freq = nn.Buffer(self.compute_inv_freq(config), persistent=False)

    @staticmethod
    def compute_inv_freq(config: ChatGLMConfig) -> torch.Tensor:
        return rotary_inv_freq(config.head_dim // 2, config.rope_theta, fp16_round=config.rope_fp16_inv_freq)

    @torch.no_grad()
    def forward(self, position_ids: torch.LongTensor, dtype: torch.dtype):
        # fp32 angles like SAT 0.4.12; THUDM-HF builds them in the model dtype (fp16), which drifts at long range
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32:
            # model.half()/.to(bf16) also casts buffers; a rounded inv_freq would silently change the model
            inv_freq = self.compute_inv_freq(self.config)
        inv_freq = inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq  # (B, 2, T, hd/4)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, 2, T, hd/2)
        emb = torch.cat((emb[:, 0], emb[:, 1]), dim=-1)[:, None]  # (B, 1, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class ChatGLMMLP(nn.Module):
    """(B, T, H) → (B, T, H): dense_h_to_4h → tanh-GELU → dense_4h_to_h (no gating despite THUDM's "GLU")."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(hidden_states)))


class ChatGLMAttention(nn.Module):
    """Self-attention with fused head-interleaved qkv and 2D rotary: (B, T, H) → (B, T, H)."""

    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = 1
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        # the mask always carries the structure (bidirectional prefix, causal after <sop>); kernels must never
        # substitute a plain causal mask
        self.is_causal = False
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.num_attention_heads * self.head_dim)
        self.dense = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[Cache] = None,
        cache_update: Optional[dict] = None,
        **kwargs,
    ):
        input_shape = hidden_states.shape[:-1]
        # interleaved per head, so -1 heads also works on a tensor-parallel shard of whole heads
        qkv = self.query_key_value(hidden_states).view(*input_shape, -1, 3 * self.head_dim)  # (B, T, nh, 3hd)
        query, key, value = qkv.transpose(1, 2).split(self.head_dim, dim=-1)  # (B, nh, T, hd) each

        cos, sin = position_embeddings  # (B, 1, T, hd)
        half = self.head_dim // 2
        query = torch.cat(
            (apply_rotary(query[..., :half], cos[..., :half], sin[..., :half]),
             apply_rotary(query[..., half:], cos[..., half:], sin[..., half:])),
            dim=-1,
        )
        key = torch.cat(
            (apply_rotary(key[..., :half], cos[..., :half], sin[..., :half]),
             apply_rotary(key[..., half:], cos[..., half:], sin[..., half:])),
            dim=-1,
        )

        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, **(cache_update or {}))  # see compat.py

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )  # (B, T, nh, hd)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.dense(attn_output), attn_weights


class ChatGLMBlock(GradientCheckpointingLayer):
    """One GLM layer (post-LN with alpha-scaled residuals of the normalized input): (B, T, H) → (B, T, H)."""

    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.alpha = math.sqrt(2 * config.num_hidden_layers)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = ChatGLMAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ChatGLMMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[Cache] = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_input = self.input_layernorm(hidden_states)
        attn_output, _ = self.attention(
            attn_input,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        hidden_states = self.alpha * attn_input + attn_output
        mlp_input = self.post_attention_layernorm(hidden_states)
        return self.alpha * mlp_input + self.mlp(mlp_input)


class ChatGLMPreTrainedModel(PreTrainedModel):
    """Weights init and the transformers class attributes shared by ChatGLM models."""

    config_class = ChatGLMConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ChatGLMBlock"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    # flash kernels take only causal/full attention plus padding, not a bidirectional prefix followed by a
    # causal tail; flex would need a BlockMask built from the block positions (not done)
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ChatGLMRotaryEmbedding):
            # a non-persistent buffer: after meta-device loading only this recomputation fills it
            init.copy_(module.inv_freq, module.compute_inv_freq(module.config))


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

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding):
        self.word_embeddings = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        past_key_values: Optional[Cache] = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
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
        if input_ids is None and inputs_embeds is None:
            raise ValueError("pass input_ids or inputs_embeds")
        cache = pick_cache(cache, past_key_values)
        kwargs.pop("cache_position", None)  # transformers 4.57.x generate() passes it; positions come from the cache
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)

        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        position_ids = self._position_ids(position_ids, input_ids, attention_mask, cache)
        mask = self._attention_mask(attention_mask, position_ids, cache, inputs_embeds.shape[1])

        position_embeddings = self.rotary_emb(position_ids, inputs_embeds.dtype)  # once per forward
        cache_update = cache_update_kwargs(cache, inputs_embeds.shape[1], inputs_embeds.device)
        hidden_states, all_hidden_states = run_decoder_layers(
            self.layers, self.final_layernorm, inputs_embeds, output_hidden_states,
            position_embeddings=position_embeddings, attention_mask=mask, cache=cache, cache_update=cache_update,
            **kwargs,
        )

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            **cache_kwargs(cache),
        )
        return output if return_dict else output.to_tuple()

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
