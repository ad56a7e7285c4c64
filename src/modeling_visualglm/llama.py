"""LLaMA decoder with optional per-token visual experts (CogVLM / CogVLM2; plain LLaMA for MiniGPT-4).

Implements the language model of CogVLM (Wang et al. 2023, "CogVLM: Visual Expert for Pretrained Language
Models", https://arxiv.org/abs/2311.03079) and CogVLM2 (Hong et al. 2024, https://arxiv.org/abs/2408.16500):
a pre-RMSNorm LLaMA (Touvron et al. 2023, https://arxiv.org/abs/2302.13971) whose attention projections
(fused qkv and output) and SwiGLU MLP exist twice per layer, a language expert and a vision expert, chosen
per token. Originals: THUDM/CogVLM @f7283b2 ``utils/models/mixin.py`` on SwissArmyTransformer 0.4.12
``sat/model/official/llama_model.py``, and the CogVLM2 HF ``modeling_cogvlm.py`` (cogvlm2-llama3-chat-19B).
With ``config.use_visual_experts=False`` only the language expert exists: a plain LLaMA with a fused
[Q; K; V] projection.

Parameter names follow THUDM's HF CogVLM checkpoints (``cogvlm-chat-hf``, ``cogvlm2-llama3-*``) under
``model.``, so those convert by renaming alone: ``embed_tokens``, ``layers.{i}.input_layernorm``,
``layers.{i}.self_attn.{language,vision}_expert_query_key_value`` (blocked [Q; K; V], heads contiguous inside
each block; [Q | K | V] = [nh*hd | nkv*hd | nkv*hd]), ``layers.{i}.self_attn.{language,vision}_expert_dense``,
``layers.{i}.post_attention_layernorm``, ``layers.{i}.mlp.{language,vision}_mlp.{gate,up,down}_proj``, ``norm``.

Routing: ``vision_expert_mask`` (B, T) says which tokens use the vision expert (``routing`` passes the split
``expert_routing`` already made from such a mask). Without either, every token takes the language path (no
indexing, no host sync: decode steps and text-only prompts). With it, the tokens are sorted once per forward into
a language part and a vision part (one host sync, to learn the split size), each expert runs only on its own
rows, and one gather restores the order; all layers reuse that permutation.

Deliberate differences from the originals:
- RoPE angles are computed in fp32 from fp32 positions (as transformers' LLaMA). The originals build them in
  ``inv_freq``'s dtype, so under a bf16 cast positions above 256 round; identical in fp32.
- Routing by a permutation computed once per forward instead of boolean-mask indexing in every layer (the
  HF original re-derives and checks the masks per layer, which syncs and runs data-dependent shapes at
  every decode step).
- Batch-first tensors, transformers ``Cache`` objects, attention through ``ALL_ATTENTION_FUNCTIONS`` with a
  boolean causal + padding mask from transformers' masking utilities; no xformers / triton. The kernel is looked
  up in ``LlamaExpertAttention.forward`` itself, where vLLM's Transformers backend looks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import (
    DecoderPreTrainedModel, DispatchedAttention, RotaryEmbedding, eager_attention_forward, fold_sign,
    grouped_single_query, rotary_inv_freq, rotate_blocks, single_query_attention,
)
from .compat import ALL_ATTENTION_FUNCTIONS, causal_mask
from .configuration_blocks import LlamaExpertConfig

# ---------------------------------------------------------------------------------------------------
# Expert routing
# ---------------------------------------------------------------------------------------------------


@dataclass
class ExpertRouting:
    """A split of the flattened (B*T) tokens into the language rows and the vision rows.

    ``order`` lists the language rows then the vision rows (each in sequence order); ``inverse`` undoes it;
    ``num_language`` is a Python int, so the split is a static slice.
    """

    order: torch.LongTensor
    inverse: torch.LongTensor
    num_language: int


def expert_routing(
    vision_expert_mask: Optional[torch.Tensor], num_vision: Optional[int] = None
) -> Optional[ExpertRouting]:
    """(B, T) bool → routing, or None when no token uses the vision expert.

    One host sync to count the vision rows, unless the caller already knows ``num_vision`` (CogVLM reads it
    together with its input checks).
    """
    if vision_expert_mask is None:
        return None
    flat = vision_expert_mask.reshape(-1).to(torch.uint8)
    if num_vision is None:
        num_vision = int(flat.sum())  # the one host sync of a routed forward
    if num_vision == 0:
        return None
    # a stable sort puts language rows (0) before vision rows (1), each keeping its order
    order = torch.argsort(flat, stable=True)
    inverse = torch.argsort(order)
    return ExpertRouting(order=order, inverse=inverse, num_language=flat.numel() - num_vision)


def route(
    hidden_states: torch.Tensor,
    language: nn.Module,
    vision: Optional[nn.Module],
    routing: Optional[ExpertRouting],
) -> torch.Tensor:
    """Apply ``language`` or ``vision`` per token: (B, T, D_in) → (B, T, D_out); each row runs one expert."""
    if routing is None:
        return language(hidden_states)
    batch_shape = hidden_states.shape[:-1]
    # the routing is built once per forward; with a device_map split a layer may live on another device
    # (`.to` is a no-op when it is already there)
    order = routing.order.to(hidden_states.device)
    inverse = routing.inverse.to(hidden_states.device)
    rows = hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, order)  # (N, D_in)
    language_out = language(rows[: routing.num_language])
    vision_out = vision(rows[routing.num_language :])
    out = torch.cat([language_out, vision_out], dim=0).index_select(0, inverse)  # (N, D_out)
    return out.view(*batch_shape, -1)


# ---------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------


class LlamaExpertRMSNorm(nn.Module):
    """RMSNorm in CogVLM's order: normalize in fp32, multiply by the weight in fp32, then cast (one fused kernel on
    CUDA where input and weight share a dtype: ``torch.nn.functional.rms_norm`` computes in that order).

    transformers' LlamaRMSNorm casts before multiplying; in bf16/fp16 that changes the logits (found by
    transformers PR #28196), in fp32 the two are identical.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        # torch's rms_norm computes in this order (fp32), fused on CUDA; under torch.compile the formula below, which
        # inductor fuses with its neighbours (the fused kernel would stay a separate call)
        if self.weight.dtype == input_dtype and not torch.compiler.is_compiling():
            return nn.functional.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return (self.weight.to(torch.float32) * hidden_states).to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class LlamaExpertRotaryEmbedding(RotaryEmbedding):
    """Rotate-half (NeoX) RoPE tables: positions (B, T) → cos, sin of shape (B, 1, T, head_dim)."""

    @staticmethod
    def compute_inv_freq(config: LlamaExpertConfig) -> torch.Tensor:
        return rotary_inv_freq(config.head_dim, config.rope_theta)

    @torch.no_grad()
    def forward(self, position_ids: torch.LongTensor, dtype: torch.dtype):
        freqs = self.angles(position_ids)  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
        return emb.cos().to(dtype), fold_sign(emb.sin().to(dtype))  # for rotate_blocks


class LlamaExpertMLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x). (…, H) → (…, H)."""

    def __init__(self, config: LlamaExpertConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class LlamaExpertFeedForward(nn.Module):
    """Per-token choice between ``language_mlp`` and ``vision_mlp``. (B, T, H) → (B, T, H)."""

    def __init__(self, config: LlamaExpertConfig):
        super().__init__()
        self.language_mlp = LlamaExpertMLP(config)
        self.vision_mlp = LlamaExpertMLP(config) if config.use_visual_experts else None

    def forward(self, hidden_states: torch.Tensor, routing: Optional[ExpertRouting] = None) -> torch.Tensor:
        return route(hidden_states, self.language_mlp, self.vision_mlp, routing)


class LlamaExpertAttention(DispatchedAttention):
    """Causal GQA self-attention with rotate-half RoPE and per-token expert qkv / output projections.

    (B, T, H) → (B, T, H). The cache stores ``num_key_value_heads`` heads; each serves
    ``num_attention_heads / num_key_value_heads`` consecutive query heads.
    """

    def __init__(self, config: LlamaExpertConfig, layer_idx: int):
        super().__init__(config, is_causal=True)
        self.layer_idx = layer_idx
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.q_size = config.num_attention_heads * self.head_dim
        self.kv_size = config.num_key_value_heads * self.head_dim
        qkv_size = self.q_size + 2 * self.kv_size
        self.language_expert_query_key_value = nn.Linear(config.hidden_size, qkv_size, bias=config.language_qkv_bias)
        self.language_expert_dense = nn.Linear(self.q_size, config.hidden_size, bias=False)
        if config.use_visual_experts:
            # CogVLM2 has a bias on the vision qkv only (config.vision_qkv_bias)
            self.vision_expert_query_key_value = nn.Linear(config.hidden_size, qkv_size, bias=config.vision_qkv_bias)
            self.vision_expert_dense = nn.Linear(self.q_size, config.hidden_size, bias=False)
        else:
            self.vision_expert_query_key_value = None
            self.vision_expert_dense = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        routing: Optional[ExpertRouting] = None,
        cache=None,
        cache_update: Optional[dict] = None,
        **kwargs,
    ):
        """``kwargs``: ``cache``, ``cache_update`` (see ``DispatchedAttention.attend_cached``) and the kernel's."""
        input_shape = hidden_states.shape[:-1]
        qkv = route(
            hidden_states, self.language_expert_query_key_value, self.vision_expert_query_key_value, routing
        )  # (B, T, (nh + 2 nkv) hd)
        query_key, value = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        cos, signed_sin = position_embeddings  # (B, 1, T, hd)
        # query and key heads rotate together: one set of rotary kernels per layer
        query_key = rotate_blocks(query_key.view(*input_shape, -1, self.head_dim), cos.transpose(1, 2),
                                  signed_sin.transpose(1, 2))  # (B, T, nh + nkv, hd)
        num_heads = self.q_size // self.head_dim
        query = query_key[:, :, :num_heads].transpose(1, 2)  # (B, nh, T, hd)
        key = query_key[:, :, num_heads:].transpose(1, 2)  # (B, nkv, T, hd)
        value = value.view(*input_shape, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, **(cache_update or {}))  # see compat.py
        # The kernel lookup and its one call stay in this forward (not in the base class's `attend`): vLLM's
        # Transformers backend finds the attention layers it serves by reading them in the layer's own forward.
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        # a decode step over a long cache: two matrix products; one of grouped-query attention (CogVLM2): each
        # key/value head with its group of query heads
        direct = single_query_attention(self, query, key, value, attention_mask, self.scaling)
        grouped = (direct, None) if direct is not None else grouped_single_query(
            self, attention_interface, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        if grouped is not None:
            attn_output, attn_weights = grouped
        else:
            attn_output, attn_weights = attention_interface(
                self, query, key, value, attention_mask,
                dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
            )  # (B, T, nh, hd); vLLM's kernel returns (T, nh * hd) for its batch of one
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # (B, T, nh * hd)
        return route(attn_output, self.language_expert_dense, self.vision_expert_dense, routing), attn_weights


class LlamaExpertDecoderLayer(GradientCheckpointingLayer):
    """Pre-RMSNorm LLaMA block with expert attention and MLP: (B, T, H) → (B, T, H)."""

    def __init__(self, config: LlamaExpertConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = LlamaExpertRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = LlamaExpertAttention(config, layer_idx)
        self.post_attention_layernorm = LlamaExpertRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaExpertFeedForward(config)

    def forward(self, hidden_states: torch.Tensor, routing: Optional[ExpertRouting] = None, **kwargs) -> torch.Tensor:
        """``kwargs``: the attention's (``position_embeddings``, ``attention_mask``, ``cache``, ...)."""
        attn_output, _ = self.self_attn(self.input_layernorm(hidden_states), routing=routing, **kwargs)
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states), routing=routing)


class LlamaExpertPreTrainedModel(DecoderPreTrainedModel):
    """The transformers class attributes of LLaMA-with-experts models (flash and flex stay off: see the base)."""

    config_class = LlamaExpertConfig
    _no_split_modules = ["LlamaExpertDecoderLayer"]
    output_cache_without_use_cache = False


class LlamaExpertModel(LlamaExpertPreTrainedModel):
    """LLaMA decoder without the LM head: ids/embeddings (B, T[, H]) → last_hidden_state (B, T, H) after
    ``norm``, plus the updated cache."""

    def __init__(self, config: LlamaExpertConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([LlamaExpertDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaExpertRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaExpertRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @property
    def final_norm(self) -> LlamaExpertRMSNorm:
        return self.norm

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.embed_tokens = value

    def layer_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, cache, kwargs) -> dict:
        """
        input_ids (B, T) or inputs_embeds (B, T, H).
        attention_mask: None, a 2D padding mask (B, past + T) (1 = real token; left padding), or a ready 4D mask.
        position_ids (B, T): default ``cumsum(attention_mask) - 1`` (so left padding needs nothing more), or
            ``past + arange(T)`` without a mask. CogVLM passes its own (the image block takes 3 positions).
        vision_expert_mask (B, T) bool, keyword: True where the vision expert runs; None = language expert
            everywhere (no host sync). Needs ``config.use_visual_experts``.
        routing, keyword: the same split already made by ``expert_routing(vision_expert_mask)`` for these (B, T)
            tokens (CogVLM builds it together with its input checks, saving the host sync); give one of the two.
        """
        batch_size, seq_len = inputs_embeds.shape[:2]
        vision_expert_mask, routing = kwargs.pop("vision_expert_mask", None), kwargs.pop("routing", None)
        routing = self._routing(vision_expert_mask, routing, batch_size, seq_len)
        position_ids = llama_position_ids(position_ids, attention_mask, cache, inputs_embeds)
        # With a padding mask, transformers' "all ones? then is_causal" shortcut reads the mask on the host at every
        # step: it is materialized instead (generate drops all-ones masks, so those still get SDPA's is_causal).
        mask = causal_mask(self.config, inputs_embeds, attention_mask, cache, allow_is_causal_skip=attention_mask is None)
        position_embeddings = self.rotary_emb(position_ids, inputs_embeds.dtype)  # once per forward
        return {"position_embeddings": position_embeddings, "attention_mask": mask, "routing": routing}

    def _routing(self, vision_expert_mask, routing, batch_size: int, seq_len: int) -> Optional[ExpertRouting]:
        """The expert split of this forward's (B, T) tokens, from the mask or as given; None: language only."""
        if vision_expert_mask is None and routing is None:
            return None
        given = "vision_expert_mask" if vision_expert_mask is not None else "routing"
        if not self.config.use_visual_experts:
            raise ValueError(f"{given} was given but this model has no visual experts")
        if vision_expert_mask is not None and routing is not None:
            raise ValueError("pass vision_expert_mask or routing, not both")
        if routing is not None:
            if routing.order.numel() != batch_size * seq_len:
                raise ValueError(f"the routing covers {routing.order.numel()} tokens, not {batch_size * seq_len}")
            return routing
        if vision_expert_mask.shape != (batch_size, seq_len):
            raise ValueError(
                f"vision_expert_mask must be (batch, seq_len) = {(batch_size, seq_len)}, got "
                f"{tuple(vision_expert_mask.shape)}"
            )
        return expert_routing(vision_expert_mask)


def llama_position_ids(position_ids, attention_mask, cache, inputs_embeds: torch.Tensor) -> torch.LongTensor:
    """The given (B, T) positions, checked; else ``cumsum(mask) - 1`` with a 2D padding mask (left padding gets 0),
    else ``past + arange(T)``."""
    if position_ids is not None:
        if position_ids.ndim != 2:
            raise ValueError(f"position_ids must be (batch, seq_len), got {tuple(position_ids.shape)}")
        return position_ids
    batch_size, seq_len = inputs_embeds.shape[:2]
    if attention_mask is not None and attention_mask.ndim == 2:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
    past_length = cache.get_seq_length() if cache is not None else 0
    return (torch.arange(seq_len, device=inputs_embeds.device)[None] + past_length).expand(batch_size, -1)


__all__ = ["LlamaExpertPreTrainedModel", "LlamaExpertModel", "ExpertRouting", "expert_routing"]
