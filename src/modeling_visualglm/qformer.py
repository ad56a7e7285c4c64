"""BLIP-2 Querying Transformer (Q-Former) with its learned query tokens, image-conditioned only.

Implements the Q-Former of BLIP-2 (Li et al. 2023, https://arxiv.org/abs/2301.12597) as VisualGLM-6B
runs it: THUDM/VisualGLM-6B @e314fb9 ``model/blip2.py`` (``QFormer``, a SwissArmyTransformer
``BaseModel`` with ``layernorm_order="post"``, ``is_decoder=[True, False] * 6``, ``cross_attn_hidden_size``
1408, eps 1e-12, exact GELU) on sat 0.4.12 (``sat/model/transformer.py`` ``BaseTransformerLayer``,
``sat/transformer_defaults.py`` ``layer_forward_default``). The queries are SAT's 32-row word-embedding
table looked up with ids 0..31; there is no text input and no position embedding.

SAT's "post" layer order is BERT's post-LN with every LayerNorm moved to the start of the next layer:
``a = LN_in(h); h1 = a + SelfAttn(a); m = LN_post(h1); if cross: m = LN_cross(m + CrossAttn(m, image));
out = m + MLP(m)``, and ``final_layernorm`` after the last layer. So layer 0's ``input_layernorm`` is
BERT's embedding LayerNorm and layer i+1's is BERT's layer-i output LayerNorm (transformers'
``Blip2QFormerModel`` converts by that shift and by splitting the fused projections).

Parameter names follow SAT so its checkpoints convert by renaming alone (docs/architecture.md).

Deliberate differences from the originals:
- When loaded with ``dtype=torch.float16`` the Q-Former stays in float32 (``_keep_in_fp32_modules``), as
  transformers' BLIP-2 and LAVIS/MiniGPT-4 keep it; VisualGLM's own code ran it in fp16. Inputs are cast
  to the Q-Former's dtype and the output stays in it: the caller casts back.
- An optional ``encoder_attention_mask`` (B, 1+N) masks image tokens (the originals pass none).
- Attention goes through transformers' ``ALL_ATTENTION_FUNCTIONS`` (SDPA by default); no dropout.
"""

from typing import Optional

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput

from .attention import BlockedSelfAttention, BlockPreTrainedModel, DenseMLP, DispatchedAttention
from .compat import bidirectional_mask, init, keep_in_fp32
from .configuration_blocks import QFormerConfig


class QFormerCrossAttention(DispatchedAttention):
    """Queries attend to the image tokens; K and V come from one blocked [K; V] projection of the image.

    hidden_states (B, Q, H), encoder_hidden_states (B, Tk, E) → (B, Q, H).
    """

    def __init__(self, config: QFormerConfig):
        super().__init__(config)
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key_value = nn.Linear(config.encoder_hidden_size, 2 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> torch.Tensor:
        batch_size, seq_len, _ = hidden_states.shape
        kv_len = encoder_hidden_states.shape[1]
        query = self.query(hidden_states).view(batch_size, seq_len, -1, self.head_dim).transpose(1, 2)  # (B, nh, Q, hd)
        kv = self.key_value(encoder_hidden_states).view(batch_size, kv_len, 2, -1, self.head_dim)  # (B, Tk, 2, nh, hd)
        key, value = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, Tk, hd)
        attn_output, _ = self.attend(query, key, value, attention_mask, **kwargs)  # (B, Q, nh, hd)
        return self.dense(attn_output.reshape(batch_size, seq_len, -1))


class QFormerLayer(GradientCheckpointingLayer):
    """One Q-Former layer in SAT "post" order; cross-attention only when ``layer_idx % frequency == 0``.

    hidden_states (B, Q, H), encoder_hidden_states (B, Tk, E) → (B, Q, H), not normalized (the next
    layer's ``input_layernorm`` or the model's ``final_layernorm`` normalizes it).
    """

    def __init__(self, config: QFormerConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.has_cross_attention = layer_idx % config.cross_attention_frequency == 0
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # unmasked self-attention over the queries (SAT split_tensor_along_last_dim: blocked [Q; K; V])
        self.attention = BlockedSelfAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if self.has_cross_attention:
            self.cross_attention = QFormerCrossAttention(config)
            self.post_cross_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = DenseMLP(config)  # exact erf GELU

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> torch.Tensor:
        # Post-LN residuals start from the *normalized* input (SAT layernorm_order="post").
        normed = self.input_layernorm(hidden_states)
        hidden_states = self.post_attention_layernorm(normed + self.attention(normed, **kwargs))
        if self.has_cross_attention:
            cross = self.cross_attention(hidden_states, encoder_hidden_states, encoder_attention_mask, **kwargs)
            hidden_states = self.post_cross_attention_layernorm(hidden_states + cross)
        return hidden_states + self.mlp(hidden_states)


class QFormerPreTrainedModel(BlockPreTrainedModel):
    config_class = QFormerConfig
    main_input_name = "encoder_hidden_states"
    input_modalities = ("image",)
    _no_split_modules = ["QFormerLayer"]
    # BLIP-2 (LAVIS and transformers) keeps the Q-Former in fp32 when the model is loaded in fp16; it is
    # small (105M of 7.8B parameters in VisualGLM-6B), so the cost is low. transformers merges a sub-model's entries into its parent *unprefixed*
    # and matches them with re.search, so a bare "layers" would also pin the vision tower and language
    # model. The anchored pattern matches this model's keys standalone ("layers.0...") and under the
    # "qformer." prefix every family composite uses. (A composite must therefore not put other modules
    # named layers/final_layernorm/query_tokens at its top level; ours nest them under vision_model. and
    # language_model.)
    _keep_in_fp32_modules = keep_in_fp32([r"^(?:qformer\.)?(?:query_tokens|layers|final_layernorm)(?:\.|$)"])
    # fp32 weights (see above) rule out flash-attention kernels, as in transformers' Blip2QFormerModel.
    _supports_flash_attn = False

    def _init_weights(self, module):
        super()._init_weights(module)  # Linear: normal(initializer_range), zero bias; LayerNorm: 1, 0
        if isinstance(module, QFormerModel):
            init.normal_(module.query_tokens, mean=0.0, std=self.config.initializer_range)


class QFormerModel(QFormerPreTrainedModel):
    """BLIP-2 Q-Former with its learned queries.

    forward: ``encoder_hidden_states`` (B, Tk, E) image tokens (CLS included), optional
    ``encoder_attention_mask`` (B, Tk) with 1 = keep → ``last_hidden_state`` (B, Q, H) in the Q-Former's
    dtype; ``hidden_states`` (queries + every layer's output, before ``final_layernorm``) when
    ``output_hidden_states``.
    """

    def __init__(self, config: QFormerConfig):
        super().__init__(config)
        # SAT stores the queries as a Q-row word-embedding table looked up with ids 0..Q-1.
        self.query_tokens = nn.Parameter(torch.empty(config.num_query_tokens, config.hidden_size))
        self.layers = nn.ModuleList([QFormerLayer(config, i) for i in range(config.num_hidden_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def forward(
        self,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        **kwargs,
    ) -> BaseModelOutput:
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        kwargs.pop("return_dict", None)

        encoder_hidden_states = encoder_hidden_states.to(self.query_tokens.dtype)
        batch_size = encoder_hidden_states.shape[0]
        hidden_states = self.query_tokens.unsqueeze(0).expand(batch_size, -1, -1)  # (B, Q, H)
        if encoder_attention_mask is not None:
            # (B, Tk) → the format the attention implementation wants, e.g. (B, 1, Q, Tk)
            encoder_attention_mask = bidirectional_mask(
                self.config, hidden_states, encoder_attention_mask, encoder_hidden_states
            )

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            # encoder_hidden_states positional: reentrant checkpointing only tracks positional inputs
            hidden_states = layer(hidden_states, encoder_hidden_states, encoder_attention_mask, **kwargs)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)

        hidden_states = self.final_layernorm(hidden_states)  # (B, Q, H)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden_states)


__all__ = ["QFormerPreTrainedModel", "QFormerModel"]
