"""Configuration of CogVLM / CogVLM2: EVA2-CLIP-E → (CogVLM2: 2x2 conv) → GLU adapter with boi/eoi → LLaMA
with visual experts.

``version="cogvlm"`` is CogVLM-17B (Vicuna-7B-v1.5 language model, 224 or 490 px, no downsample);
``version="cogvlm2"`` is CogVLM2-19B (Llama-3-8B-Instruct, 1344 px, 2x2 stride-2 conv before the adapter).
Defaults are the real sizes of THUDM's HF checkpoints ``cogvlm-chat-hf`` and ``cogvlm2-llama3-chat-19B`` (their
``config.json``; the CogVLM1 tower is EVA2-CLIP-E as in THUDM/CogVLM @f7283b2 ``utils/models/eva_clip_model.py``).
No torch import here.
"""

from transformers import PretrainedConfig

from .configuration_blocks import EvaVisionConfig, LlamaExpertConfig, sub_config, with_text_token_ids

VERSIONS = ("cogvlm", "cogvlm2")

# The HF demos' chat defaults (cogvlm-chat-hf / cogvlm2-llama3-chat-19B README): greedy, 2048 new tokens. Used by
# `chat`, `stream_chat` and the CLIs; generation_config.json stays neutral.
CHAT_DEFAULTS = dict(do_sample=False, max_new_tokens=2048)


def default_vision_config(version: str) -> dict:
    """EVA2-CLIP-E: 63 post-sublayer-LN layers, hidden 1792, 16 heads, MLP 15360, CLS dropped."""
    return dict(
        image_size=490 if version == "cogvlm" else 1344, patch_size=14, hidden_size=1792, intermediate_size=15360,
        num_hidden_layers=63, num_attention_heads=16, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True,
        layernorm_order="post_sublayer", use_post_layernorm=False, drop_cls_token=True,
    )


def default_text_config(version: str) -> dict:
    if version == "cogvlm":  # Vicuna-7B-v1.5
        return dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, rope_theta=10000.0, rms_norm_eps=1e-5,
                    max_position_embeddings=2048, vision_qkv_bias=False, bos_token_id=1, eos_token_id=2,
                    pad_token_id=0)
    # Llama-3-8B-Instruct; CogVLM2 forces pad 128002 (<|reserved_special_token_0|>)
    return dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
                max_position_embeddings=8192, vision_qkv_bias=True, bos_token_id=128000, eos_token_id=128001,
                pad_token_id=128002)


class CogVLMConfig(PretrainedConfig):
    """Top-level config.

    ``image_token_id`` marks the image placeholders in ``input_ids``: each image is one run of
    ``num_image_tokens`` (= grid² + 2, boi and eoi included: 258 at 224 px, 1227 at 490 px, 2306 for CogVLM2)
    copies of it. Default ``text_config.vocab_size``: an id the LM head can never produce and the embedding
    never looks up (the placeholders are masked before the lookup), so it is never pad/bos/eos/unk.
    ``adapter_layer_norm_eps`` is the GLU's LayerNorm eps (torch's default 1e-5 upstream).
    ``template_version`` is the default prompt template of ``chat`` (base | chat | vqa | text).
    """

    model_type = "cogvlm"
    sub_configs = {"vision_config": EvaVisionConfig, "text_config": LlamaExpertConfig}

    def __init__(
        self,
        version="cogvlm",
        vision_config=None,
        text_config=None,
        image_token_id=None,
        adapter_layer_norm_eps=1e-5,
        template_version="chat",
        initializer_range=0.02,
        tie_word_embeddings=False,
        **kwargs,
    ):
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
        self.version = version
        self.vision_config = vision_config = sub_config(EvaVisionConfig, vision_config, default_vision_config(version))
        self.text_config = text_config = sub_config(LlamaExpertConfig, text_config, default_text_config(version))
        if not (vision_config.drop_cls_token and vision_config.layernorm_order == "post_sublayer"):
            raise ValueError("CogVLM's tower is EVA2-CLIP-E: layernorm_order='post_sublayer', drop_cls_token=True")
        grid = vision_config.image_size // vision_config.patch_size
        if version == "cogvlm2" and grid % 2:
            raise ValueError(f"CogVLM2's 2x2 downsample needs an even patch grid, got {grid}x{grid}")
        self.image_token_id = text_config.vocab_size if image_token_id is None else image_token_id
        self.adapter_layer_norm_eps = adapter_layer_norm_eps
        self.template_version = template_version
        self.initializer_range = initializer_range
        # passed to the base class: transformers 4.57.x's sets it (default True) and would override an earlier value
        super().__init__(tie_word_embeddings=tie_word_embeddings, **with_text_token_ids(self.text_config, kwargs))

    @property
    def downsample(self) -> int:
        """Side of the square of patches merged into one image token (CogVLM2's stride-2 conv)."""
        return 2 if self.version == "cogvlm2" else 1

    @property
    def image_grid(self) -> int:
        """Image tokens per side after the (optional) downsample."""
        return self.vision_config.image_size // self.vision_config.patch_size // self.downsample

    @property
    def num_image_tokens(self) -> int:
        """Placeholders per image: grid² patches + boi + eoi."""
        return self.image_grid**2 + 2
