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
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.generation import LogitsProcessorList

from .chat_utils import TokenRangeLogitsProcessor, check_history, prepare_chat, stream_generate
from .compat import cache_kwargs, output_cache, pick_cache
from .configuration_minigpt4 import CHAT_DEFAULTS, MERGE_TOKENS, MiniGPT4Config
from .eva_vit import EvaVisionModel
from .image_processing_visualglm import VisualGLMImageProcessor
from .llama import LlamaExpertModel
from .multimodal import (
    MultimodalCausalLMOutputWithPast,
    MultimodalPreTrainedModel,
    check_image_count,
    drop_images_after_prefill,
)
from .processing_minigpt4 import STOP_STRINGS, build_minigpt4_inputs, process_response
from .qformer import QFormerModel
# transformers 4.57.x copies out of a local folder only the files that the loaded file itself imports (5.x follows
# imports recursively): these lines name the rest of the import closure (delete with the 4.57 floor)
from .attention import eager_attention_forward  # noqa: F401
from .configuration_blocks import LlamaExpertConfig  # noqa: F401


MiniGPT4CausalLMOutputWithPast = MultimodalCausalLMOutputWithPast


class MiniGPT4PreTrainedModel(MultimodalPreTrainedModel):
    config_class = MiniGPT4Config
    quantization_skip_modules = ["vision_model", "qformer", "llama_proj", "lm_head"]

    def _init_weights(self, module):
        # only llama_proj and lm_head live here: sub-models initialise their own parameters
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class MiniGPT4ForConditionalGeneration(MiniGPT4PreTrainedModel, GenerationMixin):
    """MiniGPT-4 / MiniGPT-v2 with a language-modeling head.

    forward: ``input_ids`` (B, T) with each image as a run of ``config.num_image_tokens`` ×
    ``config.image_token_id``; ``pixel_values`` (N_images, 3, S, S) for the images in order of appearance
    → ``logits`` (B, T, V).
    """

    _tied_weights_keys = {"lm_head.weight": "language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: MiniGPT4Config):
        super().__init__(config)
        self.vision_model = EvaVisionModel(config.vision_config)
        self.qformer = QFormerModel(config.qformer_config) if config.variant == "vicuna0" else None
        self.llama_proj = nn.Linear(config.projector_in_features, config.text_config.hidden_size)
        self.language_model = LlamaExpertModel(config.text_config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    # --- images -----------------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """(N, 3, S, S) → (N, num_image_tokens, H_text)."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (N, 1+P, H_vit), ln_vision'd
        if self.qformer is not None:
            features = self.qformer(encoder_hidden_states=image_embeds).last_hidden_state  # (N, Q, H_q)
        else:
            patches = image_embeds[:, 1:]  # (N, P, H_vit): the CLS token is dropped
            n, p, h = patches.shape
            # 4 consecutive row-major patches side by side (mini_gpt4.py: view(bs, pn / 4, hs * 4))
            features = patches.reshape(n, p // MERGE_TOKENS, h * MERGE_TOKENS)  # (N, P/4, 4 H_vit)
        return self.llama_proj(features.to(self.llama_proj.weight.dtype))

    def _check_image_count(self, image_mask, num_images):
        check_image_count(image_mask, num_images, self.config.num_image_tokens, self.config.image_token_id)

    # --- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.FloatTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache=None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values=None,
        **kwargs,
    ) -> MiniGPT4CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = pick_cache(cache, past_key_values)  # `past_key_values` is the name before transformers 5.24
        image_features = None
        image_mask = None
        if inputs_embeds is None:
            image_mask = input_ids == self.config.image_token_id  # (B, T)
            inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
            if pixel_values is not None or cache is None:  # a prefill, or no cache at all (training)
                self.check_prompt_length(input_ids.shape[1], pixel_values is not None)
            if pixel_values is not None:  # a prefill: one host sync for the count check is fine
                self._check_image_count(image_mask, pixel_values.shape[0])
                inputs_embeds, image_features = self._scatter_image_features(inputs_embeds, image_mask, pixel_values)
        elif pixel_values is not None:
            raise ValueError("pixel_values need input_ids (their placeholders say where the images go)")

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            if image_mask is not None:
                labels = labels.masked_fill(image_mask, -100)  # image positions are never supervised
            shift_logits = logits[:, :-1, :].float()
            shift_labels = labels[:, 1:].to(shift_logits.device)
            loss = nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100
            )

        return MiniGPT4CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **cache_kwargs(output_cache(outputs)),
            hidden_states=outputs.hidden_states,
            image_hidden_states=image_features,
        )

    # --- generation hooks -------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # the cache travels in kwargs under the running release's name (see compat.py)
        model_inputs = super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask, **kwargs)
        step_ids = model_inputs.get("input_ids")
        if step_ids is not None and step_ids.shape[1] == input_ids.shape[1]:  # the prefill (shapes only decide)
            self.check_prompt_length(input_ids.shape[1], model_inputs.get("pixel_values") is not None)
            if model_inputs.get("pixel_values") is None:  # else forward checks the count itself
                self._check_image_count(input_ids == self.config.image_token_id, 0)
        return drop_images_after_prefill(model_inputs, input_ids)

    # --- chat -------------------------------------------------------------------------------------
    @classmethod
    def chat_defaults_for(cls, config) -> dict:
        """The original's chat generation defaults for ``config`` (used by ``chat``, the CLIs and the model card)."""
        return dict(CHAT_DEFAULTS[config.variant])

    def _chat_inputs(self, tokenizer, image, query, history, gen_kwargs, logits_processor=None):
        """(input_ids (1, T), pixel_values or None, generate kwargs) of one chat turn."""

        def build(turns):
            return build_minigpt4_inputs(
                tokenizer, self.config.variant, query, history=turns, has_image=image is not None,
                num_image_tokens=self.config.num_image_tokens, image_token_id=self.config.image_token_id,
            )

        ids, kwargs = prepare_chat(build, history, self.chat_defaults_for(self.config), gen_kwargs,
                                   self.config.text_config.max_position_embeddings)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        pixel_values = None
        if image is not None:
            processor = VisualGLMImageProcessor(size=self.config.vision_config.image_size)
            pixel_values = processor(image, return_tensors="pt")["pixel_values"]
            pixel_values = pixel_values.to(device=self.device, dtype=self.vision_model.dtype)
        stops = STOP_STRINGS[self.config.variant]
        if stops and "stop_strings" not in gen_kwargs:
            kwargs["stop_strings"] = stops
            kwargs["tokenizer"] = tokenizer
        processors = LogitsProcessorList(logits_processor or [])
        # the image placeholder id (and any padded rows) lie past the tokenizer: never sample them
        processors.append(TokenRangeLogitsProcessor(len(tokenizer)))
        kwargs["logits_processor"] = processors
        kwargs.setdefault("eos_token_id", self.config.text_config.eos_token_id)
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                          else self.config.text_config.eos_token_id)
        return input_ids, pixel_values, kwargs

    def _decode(self, tokenizer, tokens) -> str:
        return process_response(tokenizer.decode(tokens, skip_special_tokens=True))

    @torch.no_grad()
    def chat(self, tokenizer, image, query: str, history=None, logits_processor=None, **gen_kwargs):
        """One chat turn. ``image``: a path, a PIL image, or None (text only).

        Returns ``(response, history + [(query, response)])``. Defaults are the original ``Chat.answer``'s
        (``configuration_minigpt4.CHAT_DEFAULTS``: sampling, top_p 0.9, temperature 1.0, 300 new tokens, 500 for
        MiniGPT-v2, stop at ``###`` for the MiniGPT-4 variants); any ``generate`` keyword overrides them, e.g.
        ``do_sample=False, max_new_tokens=64``. ``max_length`` counts new tokens here; history turns that do not
        fit the model's positions are left out of the prompt, oldest first, with a warning.
        """
        history = check_history(history)
        input_ids, pixel_values, kwargs = self._chat_inputs(tokenizer, image, query, history, gen_kwargs,
                                                            logits_processor)
        outputs = self.generate(input_ids=input_ids, pixel_values=pixel_values, **kwargs)
        response = self._decode(tokenizer, outputs[0, input_ids.shape[1]:].tolist())
        return response, history + [(query, response)]

    @torch.no_grad()
    def stream_chat(self, tokenizer, image, query: str, history=None, logits_processor=None, **gen_kwargs):
        """Like ``chat`` but yields ``(partial_response, history)`` after every generated token."""
        history = check_history(history)
        input_ids, pixel_values, kwargs = self._chat_inputs(tokenizer, image, query, history, gen_kwargs,
                                                            logits_processor)
        for response in stream_generate(self, lambda t: self._decode(tokenizer, t), input_ids=input_ids,
                                        pixel_values=pixel_values, **kwargs):
            yield response, history + [(query, response)]


__all__ = ["MiniGPT4PreTrainedModel", "MiniGPT4ForConditionalGeneration"]
