"""Attention shared by every block: the eager reference kernel, the attention base classes, rotary-embedding
helpers, and the decoder plumbing that ChatGLM and LLaMA share (layer loop, cache, outputs).

Every attention layer subclasses ``DispatchedAttention``, whose ``attend`` calls
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)``, so SDPA
(default), flash and flex kernels plug in without code changes; the eager function here is the reference they are
tested against. (transformers 5.x's ``set_attn_implementation`` looks for that call in the source of a module that
defines an ``*Attention*(nn.Module)`` class: this one does; the blocks' attention classes subclass it.) Tensors are
batch-first: query (B, nh, Tq, hd), key/value (B, nkv, Tk, hd); the result is (B, Tq, nh, hd).

Masks follow transformers' convention: a boolean mask is True where attention is allowed, a float
mask is added to the scores; either broadcasts to (B, 1|nh, Tq, Tk).
"""

from typing import Optional

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import logging

from .compat import ALL_ATTENTION_FUNCTIONS, cache_kwargs, cache_update_kwargs, init, pick_cache

logger = logging.get_logger(__name__)


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


def fold_sign(sin: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """The sin table of ``rotate_blocks``: the first half of each of ``blocks`` equal parts of the last dim negated
    (once per forward, not per layer)."""
    parts = sin.reshape(*sin.shape[:-1], blocks, 2, sin.shape[-1] // (2 * blocks))
    return torch.stack((-parts[..., 0, :], parts[..., 1, :]), dim=-2).reshape(sin.shape)


def rotate_blocks(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """``apply_rotary`` on each of ``blocks`` equal parts of x's last dim (ChatGLM's 2D rotary: 2), its sign folded
    into the table (``fold_sign``): x·cos + swap(x)·signed_sin, where swap exchanges the two halves of each part.
    The same numbers as ``apply_rotary`` (−a·b = a·(−b) exactly), in 4 kernels instead of 5 per part and a cat."""
    shape = x.shape
    swapped = x.reshape(*shape[:-1], blocks, 2, shape[-1] // (2 * blocks)).flip(-2).reshape(shape)
    return x * cos + swapped * signed_sin


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


# ---------------------------------------------------------------------------------------------------
# Attention modules
# ---------------------------------------------------------------------------------------------------


# Decode steps over at least this many cached keys take ``single_query_attention`` instead of the SDPA kernel.
SINGLE_QUERY_MATMUL_KEYS = 1024


def single_query_attention(module, query, key, value, attention_mask, scaling):
    """One new token per row over a long cache, as matrix products: (B, nh, 1, hd) → (B, 1, nh, hd), or None where
    it does not apply (training, longer queries, fewer than ``SINGLE_QUERY_MATMUL_KEYS`` keys, a kernel other than
    SDPA, a mask that differs per head or query).

    SDPA's fused kernels spread a decode step over (batch × heads) thread blocks: 8–32 blocks for one row, a few
    of the GPU's 132 streaming multiprocessors reading the whole cache (CogVLM2's 2.5k-key cache: 53 µs per layer on
    an H200, ~200 GB/s). The same attention as two batched products and a softmax (cuBLAS splits the keys across the
    GPU) takes a few µs. Each key/value head attends with its group of query heads (grouped-query attention needs no
    repeated cache). The softmax is in float32 like ``eager_attention_forward``'s."""
    b, nh, t, hd = query.shape
    if (t != 1 or module.training or key.shape[2] < SINGLE_QUERY_MATMUL_KEYS
            or module.config._attn_implementation != "sdpa"
            or (attention_mask is not None and (attention_mask.ndim != 4 or attention_mask.shape[1] != 1
                                                or attention_mask.shape[2] != 1))):
        return None
    nkv = key.shape[1]
    scores = torch.matmul(query.reshape(b, nkv, nh // nkv, hd), key.transpose(2, 3))  # (B, nkv, groups, Tk)
    if attention_mask is None:
        scores = scores * scaling
    else:
        mask = attention_mask[..., : key.shape[2]]
        if mask.dtype == torch.bool:
            mask = torch.where(mask, 0.0, torch.finfo(scores.dtype).min).to(scores.dtype)
        scores = torch.add(mask, scores, alpha=scaling)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).reshape(b, 1, nh, hd)


class _OneQueryGroupView:
    """What a kernel reads from an attention module (``num_key_value_groups``, ``is_causal``, ``training``,
    ``config``), for a call whose query rows are one key/value head's group of query heads (see
    ``grouped_single_query``): one query head per key/value head, no causal mask over the group."""

    num_key_value_groups = 1
    is_causal = False
    training = False

    def __init__(self, config):
        self.config = config


def grouped_single_query(module, attention_interface, query, key, value, attention_mask, **kwargs):
    """Grouped-query attention of one new token per row without repeating the cache's key/value heads: the query
    (B, nh, 1, hd) is viewed as (B, nkv, nh / nkv, hd), each key/value head attending with its group of query heads
    as if they were query positions (exact: it is the same per-head attention). ``repeat_kv``, which transformers'
    SDPA uses whenever a mask is given (before 5.24, and under torch.compile after), copies the whole cache
    ``nh / nkv`` times per layer and step. Only for masks shared by all heads and query positions, (B|1, 1, 1, Tk);
    returns None when it does not apply. → (B, 1, nh, hd), weights (B, nh, 1, Tk) or None."""
    groups = module.num_key_value_groups
    if (groups == 1 or query.shape[2] != 1 or module.training
            or module.config._attn_implementation not in ("sdpa", "eager")
            or (attention_mask is not None and (attention_mask.ndim != 4 or attention_mask.shape[1] != 1
                                                or attention_mask.shape[2] != 1))):
        return None
    view = module.__dict__.get("_one_query_group_view")
    if view is None:
        view = module.__dict__["_one_query_group_view"] = _OneQueryGroupView(module.config)
    b, nh, _, hd = query.shape
    out, weights = attention_interface(view, query.reshape(b, nh // groups, groups, hd), key, value, attention_mask,
                                       **kwargs)  # (B, groups, nkv, hd)
    out = out.transpose(1, 2).reshape(b, 1, nh, hd)
    if weights is not None:
        weights = weights.reshape(b, nh, 1, weights.shape[-1])
    return out, weights


class DispatchedAttention(nn.Module):
    """Base of every attention layer: the fields transformers' kernels read from the module (``config``,
    ``scaling``, ``is_causal``, ``attention_dropout``) and ``attend``, which runs the kernel that
    ``config._attn_implementation`` names: query (B, nh, Tq, hd), key/value (B, nkv, Tk, hd) → (B, Tq, nh, hd)."""

    def __init__(self, config, is_causal: bool = False):
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = is_causal
        self.attention_dropout = config.attention_dropout

    def attend(self, query, key, value, attention_mask, **kwargs):
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        return attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )  # (B, Tq, nh, hd), weights or None

    def attend_cached(self, query, key, value, attention_mask, cache=None, cache_update=None, **kwargs):
        """``attend`` after appending key/value to ``cache`` (a decoder's): (B, T, nh * hd), weights."""
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, **(cache_update or {}))  # see compat.py
        direct = single_query_attention(self, query, key, value, attention_mask, self.scaling)
        if direct is not None:  # a decode step over a long cache
            return direct.reshape(*direct.shape[:2], -1), None
        attn_output, attn_weights = self.attend(query, key, value, attention_mask, **kwargs)
        return attn_output.reshape(*attn_output.shape[:2], -1).contiguous(), attn_weights


class BlockedSelfAttention(DispatchedAttention):
    """Full (unmasked) multi-head self-attention with SAT's fused, blocked [Q; K; V] projection (EVA ViT,
    Q-Former): rows [0, H) are Q, [H, 2H) K, [2H, 3H) V, heads split inside each block. (B, T, H) → (B, T, H)."""

    def __init__(self, config, qkv_bias: bool = True):
        super().__init__(config)
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=qkv_bias)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        batch_size, seq_len, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states).view(batch_size, seq_len, 3, -1, self.head_dim)  # (B, T, 3, nh, hd)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hd)
        attn_output, _ = self.attend(query, key, value, None, **kwargs)  # (B, T, nh, hd)
        return self.dense(attn_output.reshape(batch_size, seq_len, -1))


class DenseMLP(nn.Module):
    """SAT's two-layer MLP (EVA ViT, Q-Former, ChatGLM): dense_h_to_4h → ``config.hidden_act`` → dense_4h_to_h, no
    gating. (…, H) → (…, H)."""

    def __init__(self, config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(hidden_states)))


class RotaryEmbedding(nn.Module):
    """Base of the decoders' rotary tables: a non-persistent fp32 ``inv_freq`` from ``compute_inv_freq(config)``."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.inv_freq = nn.Buffer(self.compute_inv_freq(config), persistent=False)

    @staticmethod
    def compute_inv_freq(config) -> torch.Tensor:
        raise NotImplementedError

    def angles(self, position_ids: torch.LongTensor) -> torch.Tensor:
        """positions (...) → fp32 angles (..., len(inv_freq))."""
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32:
            # model.half()/.to(bf16) also casts buffers; a rounded inv_freq would silently change the model. The exact
            # table is recomputed once per device (not per step: a host-to-device copy inside a decode step would
            # also break its CUDA-graph capture)
            exact = self.__dict__.get("_exact_inv_freq")
            if exact is None or exact.device != position_ids.device:
                exact = self.compute_inv_freq(self.config).to(position_ids.device)
                self.__dict__["_exact_inv_freq"] = exact
            inv_freq = exact
        return position_ids[..., None].float() * inv_freq.to(position_ids.device)


# ---------------------------------------------------------------------------------------------------
# Decoder models
# ---------------------------------------------------------------------------------------------------


class BlockPreTrainedModel(PreTrainedModel):
    """The transformers class attributes every model of this folder shares: no base-model prefix (a block is an
    attribute of the family model), gradient checkpointing, SDPA and the attention-backend registry."""

    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True


class TextPreTrainedModel(BlockPreTrainedModel):
    """What the language models and the family models add: ids in, a cache that accelerate leaves in place, and no
    flash / flex attention. ChatGLM's mask is a bidirectional prefix followed by a causal tail (flash takes only
    causal/full + padding; flex would need a BlockMask from the block positions), and transformers' flash / flex
    paths read packed sequences from position_ids when no mask is given, which CogVLM's repeated image positions
    (bos 0, boi 1, patches 2, eoi 3) would misread; SDPA and eager take the explicit masks the blocks build."""

    main_input_name = "input_ids"
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = False
    _supports_flex_attn = False


class DecoderPreTrainedModel(TextPreTrainedModel):
    """Base of the language models (ChatGLM, LLaMA with experts): the rotary buffer's init, and ``forward``:
    embeddings → ``layers`` → ``final_norm`` → ``BaseModelOutputWithPast``.

    A subclass sets ``layers``, ``final_norm`` and ``rotary_emb`` and writes ``layer_inputs`` (its positions, mask
    and rotary tables: everything its layers take besides the cache).
    """

    # the output carries a given cache even under use_cache=False (ChatGLM) or only under use_cache (LLaMA)
    output_cache_without_use_cache = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, RotaryEmbedding):
            # a non-persistent buffer: after meta-device loading only this recomputation fills it
            init.copy_(module.inv_freq, module.compute_inv_freq(module.config))

    def check_input_kinds(self, input_ids, inputs_embeds) -> None:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")

    def layer_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, cache, kwargs) -> dict:
        """The layers' keyword arguments besides the cache (may take the subclass's own entries out of ``kwargs``)."""
        raise NotImplementedError

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache=None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        past_key_values=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """ids (B, T) / embeddings (B, T, H) → last_hidden_state (B, T, H) after ``final_norm``, plus the cache;
        ``attention_mask``, ``position_ids`` and the subclass's own arguments: see its ``layer_inputs``."""
        self.check_input_kinds(input_ids, inputs_embeds)
        cache = pick_cache(cache, past_key_values)
        kwargs.pop("cache_position", None)  # transformers 4.57.x generate() passes it; positions come from the cache
        if getattr(self, "gradient_checkpointing", False) and self.training:
            # backward recomputes every layer: a cache would take each layer's keys a second time (and transformers
            # before 5.24 does not drop a cache passed as `cache`), so none is made or used; the config default
            # (`use_cache` on) switches off quietly, an explicit request with a warning
            if use_cache or cache is not None:
                logger.warning_once("gradient checkpointing recomputes the layers in backward: no cache is used "
                                    "while training with it (use_cache=False)")
            use_cache, cache = False, None
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)

        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        layer_kwargs = self.layer_inputs(input_ids, inputs_embeds, attention_mask, position_ids, cache, kwargs)
        cache_update = cache_update_kwargs(cache, inputs_embeds.shape[1], inputs_embeds.device)
        hidden_states, all_hidden_states = run_decoder_layers(
            self.layers, self.final_norm, inputs_embeds, output_hidden_states, cache=cache, cache_update=cache_update,
            **layer_kwargs, **kwargs,
        )

        output_cache = cache if use_cache or self.output_cache_without_use_cache else None
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, **cache_kwargs(output_cache)
        )
        return output if return_dict else output.to_tuple()
