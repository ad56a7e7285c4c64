"""EVA-CLIP ViT vision towers: BLIP-2's EVA ViT-g (VisualGLM-6B, MiniGPT-4) and EVA2-CLIP-E (CogVLM).

Implements the EVA ViT-g/14 encoder of EVA-CLIP (Fang et al. 2022, https://arxiv.org/abs/2211.07636;
Sun et al. 2023, https://arxiv.org/abs/2303.15389) in the configuration BLIP-2 (Li et al. 2023,
https://arxiv.org/abs/2301.12597) feeds to its Q-Former: the last of the 40 blocks dropped, followed by
BLIP-2's ``ln_vision`` LayerNorm. Matches the SwissArmyTransformer ``ViTModel`` that
THUDM/VisualGLM-6B @e314fb9 ``model/blip2.py`` (``EVAViT``) builds with sat 0.4.12
(``sat/model/official/vit_model.py``, ``sat/model/transformer.py``): patch Conv2d → [CLS, patches]
→ learned positions → pre-LN blocks with a fused, blocked [Q; K; V] projection → ``ln_vision``.

EVA2-CLIP-E (CogVLM, CogVLM2; THUDM/CogVLM @f7283b2 ``utils/models/eva_clip_model.py``, sat 0.4.12
``sat/model/official/eva_clip_model.py`` ``EVA2CLIPModel``) is a variant of the same block selected by the
config: ``layernorm_order="post_sublayer"`` layer-norms each sub-layer's output before the residual add
(SAT's ``NewLayerForward``; the norms keep their pre-LN names), no final norm, and ``drop_cls_token`` returns
the patch tokens only (SAT's ``IdentityMixin``).

Parameter names follow SAT (``query_key_value``, ``dense``, ``dense_h_to_4h``, ...) so SAT checkpoints
convert by renaming alone (docs/architecture.md).

Deliberate differences from the originals:
- ``ln_vision`` lives inside the tower as ``post_layernorm`` (eps ``config.post_layernorm_eps``, 1e-5 as
  ``nn.LayerNorm``'s default upstream) instead of in a separate mixin.
- No position-embedding interpolation: every original caller runs at the training resolution, so a
  different image size is an error instead of a silent resample.
- Attention goes through transformers' ``ALL_ATTENTION_FUNCTIONS`` (SDPA by default); no dropout,
  drop-path or classifier head (inference and fine-tuning of the released checkpoints never use them).
  EVA2-CLIP-E originally runs xformers' ``memory_efficient_attention``: same math, no mask.
"""

from typing import Optional

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput

from .attention import BlockedSelfAttention, BlockPreTrainedModel, DenseMLP
from .compat import init
from .configuration_blocks import EvaVisionConfig


class EvaVisionEmbeddings(nn.Module):
    """Patch embedding + CLS token + learned absolute positions.

    (B, C, S, S) → (B, 1 + N, H) with N = (S / patch_size)², CLS first, patches row-major.
    """

    def __init__(self, config: EvaVisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        # SAT keeps the CLS vector as a 1-row word-embedding table (vocab_size 1); stored here as [1, H]
        # so the checkpoint tensor loads unchanged.
        self.cls_embedding = nn.Parameter(torch.empty(1, config.hidden_size))
        self.position_embedding = nn.Parameter(torch.empty(config.num_patches + 1, config.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patch_embeds = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, H, g, g)
        patch_embeds = patch_embeds.flatten(2).transpose(1, 2)  # (B, N, H), row-major over the grid
        if patch_embeds.shape[1] + 1 != self.position_embedding.shape[0]:
            raise ValueError(
                f"pixel_values of size {tuple(pixel_values.shape[-2:])} give {patch_embeds.shape[1]} patches, but the "
                f"tower has positions for {self.position_embedding.shape[0] - 1} "
                f"({self.config.image_size}px, patch {self.config.patch_size}); resize images to the model's image_size"
            )
        cls = self.cls_embedding.to(patch_embeds.dtype).expand(patch_embeds.shape[0], 1, -1)  # (B, 1, H)
        embeddings = torch.cat([cls, patch_embeds], dim=1)  # (B, 1+N, H)
        return embeddings + self.position_embedding.to(embeddings.dtype)


class EvaVisionLayer(GradientCheckpointingLayer):
    """Transformer block, (B, T, H) → (B, T, H). ``layernorm_order="pre"`` (EVA ViT-g):
    x += Attn(LN1 x); x += MLP(LN2 x). ``"post_sublayer"`` (EVA2-CLIP-E): x += LN1(Attn x); x += LN2(MLP x).
    """

    def __init__(self, config: EvaVisionConfig):
        super().__init__()
        self.normalize_output = config.layernorm_order == "post_sublayer"
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # SAT builds qkv with bias = use_bias or use_qkv_bias, so the EVA checkpoints carry a full [3H] bias
        # including a K slice (zero in EVA-CLIP, but loaded and applied as stored)
        self.attention = BlockedSelfAttention(config, qkv_bias=config.qkv_bias)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = DenseMLP(config)  # exact erf GELU for EVA

    def attention_branch(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.normalize_output:
            return self.input_layernorm(self.attention(hidden_states, **kwargs))
        return self.attention(self.input_layernorm(hidden_states), **kwargs)

    def mlp_branch(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.normalize_output:
            return self.post_attention_layernorm(self.mlp(hidden_states))
        return self.mlp(self.post_attention_layernorm(hidden_states))

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        hidden_states = hidden_states + self.attention_branch(hidden_states, **kwargs)
        return hidden_states + self.mlp_branch(hidden_states)


class EvaVisionPreTrainedModel(BlockPreTrainedModel):
    config_class = EvaVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["EvaVisionLayer", "EvaVisionEmbeddings"]
    _supports_flash_attn = True

    def _init_weights(self, module):
        super()._init_weights(module)  # Linear / Conv2d: normal(initializer_range), zero bias; LayerNorm: 1, 0
        if isinstance(module, EvaVisionEmbeddings):
            # the bare parameters (the patch Conv2d is reached on its own by the recursion)
            init.normal_(module.cls_embedding, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.position_embedding, mean=0.0, std=self.config.initializer_range)


class EvaVisionModel(EvaVisionPreTrainedModel):
    """EVA ViT tower (+ BLIP-2 ``ln_vision`` as ``post_layernorm``).

    forward: ``pixel_values`` (B, C, S, S) → ``last_hidden_state`` (B, 1 + N, H), CLS first, after
    ``post_layernorm`` when ``config.use_post_layernorm``; (B, N, H) without the CLS token when
    ``config.drop_cls_token`` (EVA2-CLIP-E); ``hidden_states`` (embeddings + every block's output, with CLS,
    before ``post_layernorm``) when ``output_hidden_states``.
    """

    def __init__(self, config: EvaVisionConfig):
        super().__init__(config)
        self.embeddings = EvaVisionEmbeddings(config)
        self.layers = nn.ModuleList([EvaVisionLayer(config) for _ in range(config.num_hidden_layers)])
        # BLIP-2's ln_vision is a plain nn.LayerNorm (eps 1e-5), unlike the blocks (1e-6).
        self.post_layernorm = (
            nn.LayerNorm(config.hidden_size, eps=config.post_layernorm_eps) if config.use_post_layernorm else None
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: Optional[bool] = None,
        **kwargs,
    ) -> BaseModelOutput:
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        kwargs.pop("return_dict", None)

        hidden_states = self.embeddings(pixel_values)  # (B, 1+N, H)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, **kwargs)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)

        if self.post_layernorm is not None:
            hidden_states = self.post_layernorm(hidden_states)
        if self.config.drop_cls_token:
            hidden_states = hidden_states[:, 1:]  # (B, N, H)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden_states)


__all__ = ["EvaVisionPreTrainedModel", "EvaVisionModel"]
