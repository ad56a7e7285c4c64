"""VisualGLM-6B for transformers 5.x: EVA ViT-g → ln_vision → Q-Former → glm_proj → ChatGLM-6B.

Implements THUDM's VisualGLM-6B (https://github.com/THUDM/VisualGLM-6B @e314fb9, SwissArmyTransformer
0.4.12 ``VisualGLMModel`` and the HF ``ChatGLMForConditionalGenerationWithImage`` of THUDM/visualglm-6b)
as a composition of the shared blocks. BLIP-2: Li et al. 2023, https://arxiv.org/abs/2301.12597;
GLM: Du et al. 2022, https://arxiv.org/abs/2103.10360.

Deliberate differences from the originals:
- Images are marked by runs of ``config.image_token_id`` (a dedicated ``<image>`` id) and spliced with
  ``masked_scatter`` (LLaVA style), so batches may mix rows with and without images, with left padding.
- Batch-first tensors, transformers ``Cache`` objects, attention through ``ALL_ATTENTION_FUNCTIONS``.
- ChatGLM's 2D positions are computed once from the prompt and continued per new token by (+0, +1) (the generic
  ``position_ids + 1`` update of ``generate`` is wrong for GLM, whose first row stays at the mask position); where
  ``generate`` did not build them (a caller's own loop), they are derived from the full sequence at each step.
- ``InvalidScoreLogitsProcessor`` forces ``<eop>`` on a row whose scores contain NaN/+inf, without a host
  sync; THUDM's version forced token id 5 and also fired on the ``-inf`` that ``min_length`` writes.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin

from .chat_utils import InvalidScoreLogitsProcessor, TokenRangeLogitsProcessor
from .chatglm import ChatGLMModel, chatglm_position_ids, check_chatglm_prompt
from .configuration_visualglm import CHAT_DEFAULTS, VisualGLMConfig
from .eva_vit import EvaVisionModel
from .image_processing_visualglm import VisualGLMImageProcessor
from .multimodal import MultimodalCausalLMOutputWithPast, MultimodalForConditionalGeneration, MultimodalPreTrainedModel
from .processing_visualglm import build_visualglm_inputs, process_response
from .qformer import QFormerModel
# transformers 4.57.x copies out of a local folder only the files that the loaded file itself imports (5.x follows
# imports recursively): these lines name the rest of the import closure (delete with the 4.57 floor)
from .attention import eager_attention_forward  # noqa: F401
from .compat import CACHE_ARG  # noqa: F401
from .configuration_blocks import ChatGLMConfig  # noqa: F401
from .decode_graphs import FastDecoder  # noqa: F401
from .prefill_graphs import PrefillGraph  # noqa: F401
from .static_graphs import StaticGraph  # noqa: F401


VisualGLMCausalLMOutputWithPast = MultimodalCausalLMOutputWithPast


class VisualGLMPreTrainedModel(MultimodalPreTrainedModel):
    config_class = VisualGLMConfig
    quantization_skip_modules = ["vision_model", "qformer", "glm_proj", "lm_head"]


# GenerationMixin among the direct bases: transformers' remote-code loader looks for it there
class VisualGLMForConditionalGeneration(VisualGLMPreTrainedModel, MultimodalForConditionalGeneration, GenerationMixin):
    """VisualGLM-6B with a language-modeling head.

    forward: ``MultimodalForConditionalGeneration.forward``. ``chat``: THUDM's sampling defaults; ``english=``
    picks the prompt language.
    """

    _tied_weights_keys = {"lm_head.weight": "language_model.word_embeddings.weight"}
    image_processor_class = VisualGLMImageProcessor
    chat_defaults = CHAT_DEFAULTS
    chat_prompt_options = ("english",)
    _chat_response = staticmethod(process_response)

    def __init__(self, config: VisualGLMConfig):
        super().__init__(config)
        self.vision_model = EvaVisionModel(config.vision_config)
        self.qformer = QFormerModel(config.qformer_config)
        self.glm_proj = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
        self.language_model = ChatGLMModel(config.text_config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_image_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """(N, 3, S, S) → (N, num_image_tokens, H_text): tower (+ ln_vision) → Q-Former → glm_proj."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (N, 1+P, H_vit)
        query_output = self.qformer(encoder_hidden_states=image_embeds).last_hidden_state  # (N, Q, H_q)
        return self.glm_proj(query_output.to(self.glm_proj.weight.dtype))

    def _language_model_inputs(self, input_ids, image_mask, pixel_values, attention_mask, position_ids, cache,
                               kwargs) -> dict:
        """position_ids (B, 2, T): GLM's 2D positions. Without them the language model derives them from
        ``input_ids`` (a prefill only: decode steps inside ``generate`` always bring them, and must not read the
        cache length, a host sync and a graph break for static caches)."""
        if input_ids is not None and (pixel_values is not None or position_ids is None):  # a prefill: one sync
            self._check_prefill(image_mask, pixel_values)
        # with inputs_embeds given, the ids only place <sop> / [gMASK] for the positions
        return {"input_ids": input_ids, "position_ids": position_ids}

    # --- generation hooks -------------------------------------------------------------------------
    # generate() tracks 1-D positions (+1 per step); GLM's are 2-D (B, 2, T) with row 0 frozen at the mask position.
    # They are built once from the prompt and kept under their own key: generate() would take a 3-D `position_ids`
    # for Qwen2-VL's (3, B, T) (batch on dim 1) when it expands rows, and would add +1 to both rows.
    _GLM_POSITIONS = "glm_position_ids"

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        input_ids = self._generation_prompt_ids(inputs_tensor, model_kwargs)
        if input_ids is not None:
            model_kwargs[self._GLM_POSITIONS] = chatglm_position_ids(input_ids, model_kwargs.get("attention_mask"),
                                                                     self.config.text_config)
        return None  # generate() keeps no 1-D positions for GLM

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens)
        positions = model_kwargs.get(self._GLM_POSITIONS)
        if positions is not None:  # new tokens follow <sop>: position stays at the mask's, block position + 1
            step = torch.arange(1, num_new_tokens + 1, device=positions.device, dtype=positions.dtype)
            new = positions[..., -1:] + torch.stack([torch.zeros_like(step), step])  # (B, 2, n)
            model_kwargs[self._GLM_POSITIONS] = torch.cat([positions, new], dim=-1)
        return model_kwargs

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        kwargs.pop("position_ids", None)
        positions = kwargs.pop(self._GLM_POSITIONS, None)
        model_inputs = super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask, **kwargs)
        step_ids = model_inputs.get("input_ids")
        if step_ids is not None:
            if positions is None or positions.shape[-1] != input_ids.shape[1]:  # not built by generate(): derive
                positions = chatglm_position_ids(input_ids, _padding_mask(attention_mask), self.config.text_config)
            model_inputs["position_ids"] = positions[..., -step_ids.shape[1] :]
        return model_inputs

    def _check_generation_prefill(self, input_ids, attention_mask, has_images: bool) -> None:
        super()._check_generation_prefill(input_ids, attention_mask, has_images)
        check_chatglm_prompt(input_ids, _padding_mask(attention_mask), self.config.text_config)

    # --- chat -------------------------------------------------------------------------------------
    def _chat_prompt_ids(self, tokenizer, query, history, has_image, english=None):
        """``english``: the prompt language (None: English iff the query has no CJK ideograph)."""
        return build_visualglm_inputs(tokenizer, query, history=history, has_image=has_image,
                                      num_image_tokens=self.config.num_image_tokens, english=english)

    def _chat_logits_processors(self, tokenizer):
        # never sample ids past the tokenizer (padded rows, the placeholder); <eop> on fp16 overflow
        return [TokenRangeLogitsProcessor(tokenizer.vocab_size),
                InvalidScoreLogitsProcessor(self.config.text_config.eos_token_id)]


def _padding_mask(attention_mask):
    """The 2-D padding mask generate() tracks, or None (a ready 4-D mask says nothing about padding here)."""
    return attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None


__all__ = ["VisualGLMPreTrainedModel", "VisualGLMForConditionalGeneration"]
