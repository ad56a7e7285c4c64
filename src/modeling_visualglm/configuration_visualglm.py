"""Configuration of VisualGLM-6B: EVA ViT-g → ln_vision → Q-Former → glm_proj → ChatGLM-6B."""

from transformers import PretrainedConfig

from .configuration_blocks import ChatGLMConfig, EvaVisionConfig, QFormerConfig, sub_config, with_text_token_ids

# THUDM's HF chat()/stream_chat() defaults (visualglm-6b modeling_chatglm.py), used by `chat`, `stream_chat` and
# the CLIs; generation_config.json stays neutral. The original's `max_length=1024` counted the prompt too: here
# the same number counts new tokens only, so a long history never leaves the answer without room (chat_utils).
# `min_length` keeps its generate() meaning (prompt included), as in the original.
CHAT_DEFAULTS = dict(max_new_tokens=1024, min_length=100, do_sample=True, top_p=0.4, top_k=100, temperature=0.8,
                     repetition_penalty=1.2)


class VisualGLMConfig(PretrainedConfig):
    """Top-level config. ``image_token_id`` marks the image placeholders in ``input_ids``: each image is a
    run of ``num_image_tokens`` (= the Q-Former's query count, 32) copies of it. It is a dedicated id
    (the tokenizer's ``<image>``), never pad/unk/bos/eos; its embedding row is never looked up."""

    model_type = "visualglm"
    sub_configs = {"vision_config": EvaVisionConfig, "qformer_config": QFormerConfig, "text_config": ChatGLMConfig}

    def __init__(
        self,
        vision_config=None,
        qformer_config=None,
        text_config=None,
        image_token_id=None,
        tie_word_embeddings=True,
        initializer_range=0.02,
        **kwargs,
    ):
        self.vision_config = sub_config(EvaVisionConfig, vision_config)
        self.qformer_config = sub_config(QFormerConfig, qformer_config)
        self.text_config = sub_config(ChatGLMConfig, text_config)
        # the Q-Former cross-attends to the tower's output
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        self.image_token_id = image_token_id
        self.text_config.tie_word_embeddings = tie_word_embeddings
        self.initializer_range = initializer_range
        # passed to the base class: transformers 4.57.x's sets it (default True) and would override an earlier value
        super().__init__(tie_word_embeddings=tie_word_embeddings, **with_text_token_ids(self.text_config, kwargs))

    @property
    def num_image_tokens(self) -> int:
        return self.qformer_config.num_query_tokens
