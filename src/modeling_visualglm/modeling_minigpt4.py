"""MiniGPT-4 for transformers 5.x: EVA ViT-g → ln_vision → (Q-Former | merge-4) → llama_proj → LLaMA.

Implements MiniGPT-4 (Zhu et al. 2023, "MiniGPT-4: Enhancing Vision-Language Understanding with Advanced
Large Language Models", https://arxiv.org/abs/2304.10592) and MiniGPT-v2 (Chen et al. 2023,
https://arxiv.org/abs/2310.09478) as in Vision-CAIR/MiniGPT-4 @ef1ac08 ``minigpt4/models/mini_gpt4.py``
(Vicuna-v0 and LLaMA-2) and HEAD ``minigpt4/models/minigpt_v2.py``, composed from the shared blocks
(``EvaVisionModel`` with ``post_layernorm`` = ``ln_vision``, ``QFormerModel``, ``LlamaExpertModel`` without
experts). BLIP-2: Li et al. 2023, https://arxiv.org/abs/2301.12597.

Variants (``config.variant``): ``vicuna0`` projects the Q-Former's 32 query outputs; ``llama2`` and
``minigptv2`` drop the CLS token and concatenate each run of 4 consecutive patch tokens (row order, i.e. 1×4
horizontal runs, not 2×2 blocks) before ``llama_proj``.

Deliberate differences from the original:
- Images are runs of ``config.image_token_id`` placeholders in ``input_ids``, filled with ``masked_scatter``
  (LLaVA style), instead of embeddings spliced between separately embedded segments; the ids around them
  are the same (see processing_minigpt4.py), so the logits are too. Batches may mix rows with and without
  images, with left padding.
- No ``low_resource`` mode moving the ViT to the CPU: place components with ``device_map`` / dtypes.
- The Q-Former stays fp32 under fp16 loading (``_keep_in_fp32_modules``) instead of running under autocast.
- MiniGPT-v2's LoRA is merged into the LLaMA weights at conversion time.

``MiniGPT4Model`` is the same composition without the LM head (LLaVA's ``LlavaModel``): what ``auto_map.AutoModel``
names, so that vLLM's Transformers modeling backend, which loads ``AutoModel`` and adds its own head, can serve the
folder (docs/serving.md). Both classes hold the same submodules under the same names, so one checkpoint loads into
either.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .chat_utils import TokenRangeLogitsProcessor
from .configuration_minigpt4 import CHAT_DEFAULTS, MERGE_TOKENS, MiniGPT4Config
from .eva_vit import EvaVisionModel
from .image_processing_visualglm import VisualGLMImageProcessor
from .llama import LlamaExpertModel
from .multimodal import (
    MultimodalCausalLMOutputWithPast, MultimodalForConditionalGeneration, MultimodalPreTrainedModel, check_image_count,
)
from .processing_minigpt4 import STOP_STRINGS, build_minigpt4_inputs, process_response
from .qformer import QFormerModel
# transformers 4.57.x copies out of a local folder only the files that the loaded file itself imports (5.x follows
# imports recursively): these lines name the rest of the import closure (delete with the 4.57 floor)
from .attention import eager_attention_forward  # noqa: F401
from .compat import init  # noqa: F401
from .configuration_blocks import LlamaExpertConfig  # noqa: F401
from .decode_graphs import FastDecoder  # noqa: F401
from .prefill_graphs import PrefillGraph  # noqa: F401
from .static_graphs import StaticGraph  # noqa: F401


MiniGPT4CausalLMOutputWithPast = MultimodalCausalLMOutputWithPast


class MiniGPT4PreTrainedModel(MultimodalPreTrainedModel):
    """The submodules and the picture path that the base model and the generation model share."""

    config_class = MiniGPT4Config
    quantization_skip_modules = ["vision_model", "qformer", "llama_proj", "lm_head"]

    def _init_submodules(self, config: MiniGPT4Config) -> None:
        self.vision_model = EvaVisionModel(config.vision_config)
        self.qformer = QFormerModel(config.qformer_config) if config.variant == "vicuna0" else None
        self.llama_proj = nn.Linear(config.projector_in_features, config.text_config.hidden_size)
        self.language_model = LlamaExpertModel(config.text_config)

    def get_image_features(self, pixel_values: torch.FloatTensor, return_dict: bool = False, **kwargs):
        """(N, 3, S, S) → (N, num_image_tokens, H_text); with ``return_dict`` a ``BaseModelOutputWithPooling``
        whose ``pooler_output`` is that tensor and ``last_hidden_state`` the tower's output (vLLM asks so)."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (N, 1+P, H_vit), ln_vision'd
        if self.qformer is not None:
            features = self.qformer(encoder_hidden_states=image_embeds).last_hidden_state  # (N, Q, H_q)
        else:
            patches = image_embeds[:, 1:]  # (N, P, H_vit): the CLS token is dropped
            n, p, h = patches.shape
            # 4 consecutive row-major patches side by side (mini_gpt4.py: view(bs, pn / 4, hs * 4))
            features = patches.reshape(n, p // MERGE_TOKENS, h * MERGE_TOKENS)  # (N, P/4, 4 H_vit)
        features = self.llama_proj(features.to(self.llama_proj.weight.dtype))
        if return_dict:
            return BaseModelOutputWithPooling(last_hidden_state=image_embeds, pooler_output=features)
        return features


class MiniGPT4Model(MiniGPT4PreTrainedModel):
    """MiniGPT-4 without the LM head: ids (B, T) with image placeholders + pixel values, or embeddings (B, T, H) with
    the images already in → ``last_hidden_state`` (B, T, H) and the cache (``LlamaExpertModel``'s output).

    vLLM's Transformers backend calls it with ``inputs_embeds`` (it merges the images itself through
    ``get_image_features``) and 1D ``position_ids``, and passes its attention through ``**kwargs``.
    """

    # the same merge and count check as the generation model
    embed_with_images = MultimodalForConditionalGeneration.embed_with_images

    def __init__(self, config: MiniGPT4Config):
        super().__init__(config)
        self._init_submodules(config)
        self.post_init()

    def get_output_embeddings(self):
        return None

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                inputs_embeds=None, **kwargs):
        """``kwargs``: the language model's (``cache``/``past_key_values``, ``use_cache``, ``return_dict``, ...)."""
        MultimodalForConditionalGeneration._check_input_kinds(input_ids, inputs_embeds, pixel_values)
        if input_ids is not None:
            image_mask = input_ids == self.config.image_token_id  # (B, T)
            num_images = 0 if pixel_values is None else pixel_values.shape[0]
            check_image_count(image_mask, num_images, self.config.num_image_tokens, self.config.image_token_id)
            inputs_embeds, _ = self.embed_with_images(input_ids, image_mask, pixel_values)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, **kwargs)


# GenerationMixin among the direct bases: transformers' remote-code loader looks for it there
class MiniGPT4ForConditionalGeneration(MiniGPT4PreTrainedModel, MultimodalForConditionalGeneration, GenerationMixin):
    """MiniGPT-4 / MiniGPT-v2 with a language-modeling head.

    forward: ``MultimodalForConditionalGeneration.forward``. ``chat``: ``Chat.answer``'s defaults of the variant,
    stopping at its ``STOP_STRINGS``.
    """

    _tied_weights_keys = {"lm_head.weight": "language_model.embed_tokens.weight"}
    image_processor_class = VisualGLMImageProcessor  # BLIP-2's eval transform, as VisualGLM's
    chat_defaults = CHAT_DEFAULTS  # per variant
    _chat_response = staticmethod(process_response)

    def __init__(self, config: MiniGPT4Config):
        super().__init__(config)
        self._init_submodules(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def _language_model_inputs(self, input_ids, image_mask, pixel_values, attention_mask, position_ids, cache,
                               kwargs) -> dict:
        """position_ids (B, T): LLaMA's, by default ``cumsum(attention_mask) - 1`` (see ``LlamaExpertModel``)."""
        if input_ids is not None:
            if pixel_values is not None:  # a prefill: one host sync for the count check is fine
                self._check_prefill(image_mask, pixel_values)
            elif cache is None:  # no cache at all (training): the length only (generate checks a text prefill)
                self.check_prompt_length(input_ids.shape[1], False)
        return {"position_ids": position_ids}

    # --- chat -------------------------------------------------------------------------------------
    @classmethod
    def chat_defaults_for(cls, config) -> dict:
        """``CHAT_DEFAULTS`` of ``config.variant``, stopping at the variant's ``STOP_STRINGS`` (``###``)."""
        stops = STOP_STRINGS[config.variant]
        return {**cls.chat_defaults[config.variant], **({"stop_strings": list(stops)} if stops else {})}

    def _chat_prompt_ids(self, tokenizer, query, history, has_image):
        return build_minigpt4_inputs(
            tokenizer, self.config.variant, query, history=history, has_image=has_image,
            num_image_tokens=self.config.num_image_tokens, image_token_id=self.config.image_token_id,
        )

    def _chat_logits_processors(self, tokenizer):
        # the image placeholder id and any padded rows lie past the SentencePiece pieces: never sample them (the
        # tokenizer may count the placeholder as its <ImageHere> token, see MiniGPT4Tokenizer)
        decodable = len(tokenizer)
        if self.config.image_token_id is not None:
            decodable = min(decodable, self.config.image_token_id)
        return [TokenRangeLogitsProcessor(decodable)]

    def _chat_pad_token_id(self, tokenizer):
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.config.text_config.eos_token_id


__all__ = ["MiniGPT4PreTrainedModel", "MiniGPT4Model", "MiniGPT4ForConditionalGeneration"]
