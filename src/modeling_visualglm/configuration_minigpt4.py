"""Configuration of MiniGPT-4 (Vicuna-v0, LLaMA-2 and MiniGPT-v2 variants).

``variant`` selects the visual path (Vision-CAIR/MiniGPT-4 @ef1ac08 ``minigpt4/models/mini_gpt4.py``,
HEAD ``minigpt_v2.py``):

| variant     | path                                                         | image tokens      |
|-------------|--------------------------------------------------------------|-------------------|
| ``vicuna0`` | EVA ViT-g → ln_vision → Q-Former (32 queries) → llama_proj   | 32                |
| ``llama2``  | EVA ViT-g → ln_vision → drop CLS → merge 4 → llama_proj      | patches / 4 (64)  |
| ``minigptv2``| as ``llama2`` at 448 px (positions interpolated at conversion)| patches / 4 (256) |

No torch import here.
"""

from transformers import PretrainedConfig

from .configuration_blocks import EvaVisionConfig, LlamaExpertConfig, QFormerConfig, sub_config, with_text_token_ids

VARIANTS = ("vicuna0", "llama2", "minigptv2")
# MiniGPT-4 LLaMA-2 / v2 concatenate this many consecutive patch tokens before llama_proj
MERGE_TOKENS = 4

# Chat.answer's defaults (MiniGPT-4 @ef1ac08 conversation.py): sampling with top_p 0.9, temperature 1, one beam,
# 300 new tokens; MiniGPT-v2's demo asks for 500. Used by `chat`, `stream_chat` and the CLIs; generation_config.json
# stays neutral.
_CHAT_ANSWER = dict(max_new_tokens=300, num_beams=1, min_length=1, do_sample=True, top_p=0.9, repetition_penalty=1.0,
                    length_penalty=1.0, temperature=1.0)
CHAT_DEFAULTS = {"vicuna0": _CHAT_ANSWER, "llama2": _CHAT_ANSWER, "minigptv2": {**_CHAT_ANSWER, "max_new_tokens": 500}}


class MiniGPT4Config(PretrainedConfig):
    """Top-level config: ``vision_config`` (EVA ViT-g + ln_vision), ``qformer_config`` (vicuna0 only),
    ``text_config`` (plain LLaMA: ``use_visual_experts=False``), ``image_token_id``.

    ``image_token_id`` marks image placeholders in ``input_ids`` (``num_image_tokens`` per image). It is a
    dedicated id below the embedding rows (the converter uses the first id past the SentencePiece vocabulary,
    32000, adding one embedding row when the LLM has none spare), so transformers' repetition penalty can
    gather its score; its embedding row is never looked up and generation suppresses it.
    """

    model_type = "minigpt4"
    sub_configs = {"vision_config": EvaVisionConfig, "qformer_config": QFormerConfig, "text_config": LlamaExpertConfig}

    def __init__(
        self,
        variant="vicuna0",
        vision_config=None,
        qformer_config=None,
        text_config=None,
        image_token_id=None,
        tie_word_embeddings=False,
        initializer_range=0.02,
        **kwargs,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        self.vision_config = sub_config(EvaVisionConfig, vision_config)
        # ln_vision is part of every variant (LLaMA-2 / v2 keep its fresh init: weight 1, bias 0)
        self.vision_config.use_post_layernorm = True
        if variant == "vicuna0":
            self.qformer_config = sub_config(QFormerConfig, qformer_config)
            self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        else:
            if qformer_config is not None:
                raise ValueError(f"variant {variant!r} has no Q-Former; qformer_config must be None")
            self.qformer_config = None
            if self.vision_config.num_patches % MERGE_TOKENS:
                raise ValueError(f"{self.vision_config.num_patches} patches are not a multiple of {MERGE_TOKENS}")
        text = sub_config(LlamaExpertConfig, text_config, default={"use_visual_experts": False})
        if text.use_visual_experts:
            raise ValueError("MiniGPT-4's language model is a plain LLaMA: text_config.use_visual_experts must be False")
        self.text_config = text
        self.image_token_id = image_token_id
        self.text_config.tie_word_embeddings = tie_word_embeddings
        self.initializer_range = initializer_range
        # passed to the base class: transformers 4.57.x's sets it (default True) and would override an earlier value
        super().__init__(tie_word_embeddings=tie_word_embeddings, **with_text_token_ids(self.text_config, kwargs))

    @property
    def num_image_tokens(self) -> int:
        if self.variant == "vicuna0":
            return self.qformer_config.num_query_tokens
        return self.vision_config.num_patches // MERGE_TOKENS

    @property
    def projector_in_features(self) -> int:
        if self.variant == "vicuna0":
            return self.qformer_config.hidden_size
        return self.vision_config.hidden_size * MERGE_TOKENS


__all__ = ["MiniGPT4Config", "VARIANTS", "MERGE_TOKENS"]
