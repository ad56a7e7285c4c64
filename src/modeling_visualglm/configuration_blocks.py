"""Configurations of the shared blocks: EVA ViT tower, BLIP-2 Q-Former, ChatGLM-6B decoder, LLaMA (+ experts).

Each block is built from its own sub-config so that families (VisualGLM, CogVLM, MiniGPT-4) compose
them without forking. Field names follow transformers conventions (``hidden_size``,
``num_hidden_layers``, ``intermediate_size``, ``layer_norm_eps``); converters map the original names.
Defaults are the real VisualGLM-6B sizes (THUDM/VisualGLM-6B ``model_config.json``).
No torch import here: configs must load without building a model.
"""

from transformers import PretrainedConfig


def sub_config(cls, value, default: dict | None = None):
    """A composite config's sub-config: ``value`` as is when it is a config, ``cls(**value)`` for a dict, and
    ``cls(**default)`` (no arguments without a default) for None."""
    if value is None:
        value = dict(default or {})
    return cls(**value) if isinstance(value, dict) else value


def with_text_token_ids(text_config, kwargs: dict) -> dict:
    """A composite config's ``kwargs`` with bos/eos/pad ids defaulting to its language model's."""
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        kwargs.setdefault(key, getattr(text_config, key))
    return kwargs


class EvaVisionConfig(PretrainedConfig):
    """EVA-CLIP ViT tower (BLIP-2 ViT-g variant: CLS token, learned positions, pre-LN blocks).

    ``num_hidden_layers`` is 39 for BLIP-2/VisualGLM/MiniGPT-4 (EVA ViT-g has 40; BLIP-2 drops the last).
    ``use_post_layernorm`` adds the ``ln_vision`` LayerNorm of BLIP-2 with its own eps (1e-5 there,
    while the blocks use 1e-6).

    EVA2-CLIP-E (CogVLM / CogVLM2: 63 layers, hidden 1792, 16 heads, MLP 15360, 224/490/1344 px) is the same
    block with ``layernorm_order="post_sublayer"`` (each sub-layer's *output* is layer-normed before the
    residual add: x + LN_in(Attn(x)), then x + LN_post(MLP(x))), ``use_post_layernorm=False`` and
    ``drop_cls_token=True`` (the tower returns the patch tokens only).
    """

    model_type = "visualglm_eva_vision"
    base_config_key = "vision_config"

    def __init__(
        self,
        image_size=224,
        patch_size=14,
        num_channels=3,
        hidden_size=1408,
        intermediate_size=6144,
        num_hidden_layers=39,
        num_attention_heads=16,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        qkv_bias=True,
        use_post_layernorm=True,
        post_layernorm_eps=1e-5,
        attention_dropout=0.0,
        initializer_range=0.02,
        layernorm_order="pre",
        drop_cls_token=False,
        **kwargs,
    ):
        if layernorm_order not in ("pre", "post_sublayer"):
            raise ValueError(f"layernorm_order must be 'pre' or 'post_sublayer', got {layernorm_order!r}")
        self.layernorm_order = layernorm_order
        self.drop_cls_token = drop_cls_token
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act
        self.qkv_bias = qkv_bias
        self.use_post_layernorm = use_post_layernorm
        self.post_layernorm_eps = post_layernorm_eps
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class QFormerConfig(PretrainedConfig):
    """BLIP-2 Q-Former: learned queries, self-attention, cross-attention to the image every
    ``cross_attention_frequency`` layers (layers 0, 2, 4, ...), BERT post-LN blocks, no text input."""

    model_type = "visualglm_qformer"
    base_config_key = "qformer_config"

    def __init__(
        self,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        num_query_tokens=32,
        encoder_hidden_size=1408,
        cross_attention_frequency=2,
        attention_dropout=0.0,
        initializer_range=0.02,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act
        self.num_query_tokens = num_query_tokens
        self.encoder_hidden_size = encoder_hidden_size
        self.cross_attention_frequency = cross_attention_frequency
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class ChatGLMConfig(PretrainedConfig):
    """ChatGLM-6B (GLM v1) decoder: 2D rotary positions, alpha-scaled residual on the normalized input,
    tanh-GELU MLP, prefix-LM mask from ``[gMASK]``/``<sop>``.

    ``rope_fp16_inv_freq``: THUDM's HF code rounds the rotary ``inv_freq`` to fp16 even in fp32;
    SwissArmyTransformer 0.4.12 keeps it exact. Default False (exact, = SAT); True reproduces THUDM-HF.
    """

    model_type = "visualglm_chatglm"
    base_config_key = "text_config"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=130528,
        hidden_size=4096,
        num_hidden_layers=28,
        num_attention_heads=32,
        intermediate_size=16384,
        max_position_embeddings=2048,
        layer_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_fp16_inv_freq=False,
        hidden_act="gelu_pytorch_tanh",
        attention_dropout=0.0,
        initializer_range=0.02,
        use_cache=True,
        bos_token_id=130004,
        eos_token_id=130005,
        pad_token_id=3,
        mask_token_id=130000,
        gmask_token_id=130001,
        tie_word_embeddings=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.layer_norm_eps = layer_norm_eps
        self.rope_theta = rope_theta
        self.rope_fp16_inv_freq = rope_fp16_inv_freq
        self.hidden_act = hidden_act
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.mask_token_id = mask_token_id
        self.gmask_token_id = gmask_token_id
        # passed to the base class: transformers 4.57.x's sets it (default True) and would override an earlier value
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads


class LlamaExpertConfig(PretrainedConfig):
    """LLaMA decoder, optionally with CogVLM's per-token visual experts (a second set of qkv, output
    projection and SwiGLU MLP weights used on image tokens).

    Defaults are CogVLM1's language model (Vicuna-7B-v1.5: 32 layers, hidden 4096, MHA, RoPE base 10000).
    CogVLM2 (Llama-3-8B-Instruct): ``num_key_value_heads=8``, ``intermediate_size=14336``,
    ``rope_theta=500000``, ``vocab_size=128256``, ``vision_qkv_bias=True``. With
    ``use_visual_experts=False`` the block is a plain LLaMA with a fused [Q; K; V] projection.
    """

    model_type = "visualglm_llama_expert"
    base_config_key = "text_config"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        hidden_act="silu",
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        use_visual_experts=True,
        vision_qkv_bias=False,
        language_qkv_bias=False,
        attention_dropout=0.0,
        initializer_range=0.02,
        use_cache=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.use_visual_experts = use_visual_experts
        self.vision_qkv_bias = vision_qkv_bias
        self.language_qkv_bias = language_qkv_bias
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        # passed to the base class: transformers 4.57.x's sets it (default True) and would override an earlier value
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
