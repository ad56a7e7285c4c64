"""VisualGLM-6B for transformers 5.x: EVA ViT-g → ln_vision → Q-Former → glm_proj → ChatGLM-6B.

Implements THUDM's VisualGLM-6B (https://github.com/THUDM/VisualGLM-6B @e314fb9, SwissArmyTransformer
0.4.12 ``VisualGLMModel`` and the HF ``ChatGLMForConditionalGenerationWithImage`` of THUDM/visualglm-6b)
as a composition of the shared blocks. BLIP-2: Li et al. 2023, https://arxiv.org/abs/2301.12597;
GLM: Du et al. 2022, https://arxiv.org/abs/2103.10360.

Deliberate differences from the originals:
- Images are marked by runs of ``config.image_token_id`` (a dedicated ``<image>`` id) and spliced with
  ``masked_scatter`` (LLaVA style), so batches may mix rows with and without images, with left padding.
- Batch-first tensors, transformers ``Cache`` objects, attention through ``ALL_ATTENTION_FUNCTIONS``.
- ChatGLM's 2D positions are recomputed from the full sequence at every generation step (the generic
  ``position_ids + 1`` update of ``generate`` is wrong for GLM, whose first row stays at the mask position).
- ``InvalidScoreLogitsProcessor`` forces ``<eop>`` on a row whose scores contain NaN/+inf, without a host
  sync; THUDM's version forced token id 5 and also fired on the ``-inf`` that ``min_length`` writes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.generation import LogitsProcessorList

from .chat_utils import (
    InvalidScoreLogitsProcessor,
    TokenRangeLogitsProcessor,
    check_history,
    prepare_chat,
    stream_generate,
)
from .chatglm import ChatGLMModel, chatglm_position_ids, check_chatglm_prompt
from .compat import cache_kwargs, kv_length, output_cache, pick_cache
from .configuration_visualglm import CHAT_DEFAULTS, VisualGLMConfig
from .eva_vit import EvaVisionModel
from .image_processing_visualglm import VisualGLMImageProcessor
from .multimodal import (
    MultimodalCausalLMOutputWithPast,
    MultimodalPreTrainedModel,
    check_image_count,
    drop_images_after_prefill,
)
from .processing_visualglm import build_visualglm_inputs, process_response
from .qformer import QFormerModel
# transformers 4.57.x copies out of a local folder only the files that the loaded file itself imports (5.x follows
# imports recursively): these lines name the rest of the import closure (delete with the 4.57 floor)
from .attention import eager_attention_forward  # noqa: F401
from .configuration_blocks import ChatGLMConfig  # noqa: F401


VisualGLMCausalLMOutputWithPast = MultimodalCausalLMOutputWithPast


class VisualGLMPreTrainedModel(MultimodalPreTrainedModel):
    config_class = VisualGLMConfig
    quantization_skip_modules = ["vision_model", "qformer", "glm_proj", "lm_head"]

    def _init_weights(self, module):
        # only glm_proj and lm_head live here: sub-models initialise their own parameters
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class VisualGLMForConditionalGeneration(VisualGLMPreTrainedModel, GenerationMixin):
    """VisualGLM-6B with a language-modeling head.

    forward: ``input_ids`` (B, T) with each image as a run of ``config.num_image_tokens`` ×
    ``config.image_token_id``; ``pixel_values`` (N_images, 3, S, S) for the images in order of appearance
    → ``logits`` (B, T, V).
    """

    _tied_weights_keys = {"lm_head.weight": "language_model.word_embeddings.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: VisualGLMConfig):
        super().__init__(config)
        self.vision_model = EvaVisionModel(config.vision_config)
        self.qformer = QFormerModel(config.qformer_config)
        self.glm_proj = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
        self.language_model = ChatGLMModel(config.text_config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    # --- images -----------------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """(N, 3, S, S) → (N, num_image_tokens, H_text): tower (+ ln_vision) → Q-Former → glm_proj."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (N, 1+P, H_vit)
        query_output = self.qformer(encoder_hidden_states=image_embeds).last_hidden_state  # (N, Q, H_q)
        return self.glm_proj(query_output.to(self.glm_proj.weight.dtype))

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
    ) -> VisualGLMCausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = pick_cache(cache, past_key_values)  # `past_key_values` is the name before transformers 5.24
        # Decode steps inside generate() always bring position_ids and no pixel_values; they must not read
        # the cache length (a device value for static caches: a host sync and a torch.compile graph break).
        derive_positions = position_ids is None
        if derive_positions and cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                "position_ids are required with a non-empty cache: compute them with chatglm_position_ids("
                "full_input_ids, attention_mask, config.text_config) on the whole sequence (generate() does this)"
            )
        image_features = None
        image_mask = None
        if inputs_embeds is None:
            image_mask = input_ids == self.config.image_token_id  # (B, T)
            # the placeholder id may lie outside the embedding table: never look it up
            inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
            if pixel_values is not None or derive_positions:  # a prefill: one host sync is fine
                self.check_prompt_length(input_ids.shape[1], pixel_values is not None)
                self._check_image_count(image_mask, 0 if pixel_values is None else pixel_values.shape[0])
            if pixel_values is not None:
                inputs_embeds, image_features = self._scatter_image_features(inputs_embeds, image_mask, pixel_values)
            if derive_positions:
                check_chatglm_prompt(input_ids, attention_mask, self.config.text_config)
                position_ids = chatglm_position_ids(input_ids, attention_mask, self.config.text_config)
        elif pixel_values is not None:
            raise ValueError("pixel_values need input_ids (their placeholders say where the images go)")
        if position_ids is None:
            raise ValueError(
                "position_ids are required with inputs_embeds: compute them with chatglm_position_ids("
                "input_ids, attention_mask, config.text_config)"
            )

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

        return VisualGLMCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **cache_kwargs(output_cache(outputs)),
            hidden_states=outputs.hidden_states,
            image_hidden_states=image_features,
        )

    # --- generation hooks -------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # generate() tracks 1-D positions (+1 per step); GLM's are 2-D with row 0 frozen at the mask
        # position, so they are derived from the full sequence instead (tensor ops only, no host sync).
        kwargs.pop("position_ids", None)
        # the cache travels in kwargs under the running release's name (see compat.py)
        model_inputs = super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask, **kwargs)
        step_ids = model_inputs.get("input_ids")
        if step_ids is not None:
            full_mask = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
            positions = chatglm_position_ids(input_ids, full_mask, self.config.text_config)
            model_inputs["position_ids"] = positions[..., -step_ids.shape[1] :]
            if step_ids.shape[1] == input_ids.shape[1]:  # the prefill (shapes only: no host sync per step)
                self.check_prompt_length(input_ids.shape[1], model_inputs.get("pixel_values") is not None)
                check_chatglm_prompt(input_ids, full_mask, self.config.text_config)
                if model_inputs.get("pixel_values") is None:  # else forward checks the count itself
                    self._check_image_count(input_ids == self.config.image_token_id, 0)
        return drop_images_after_prefill(model_inputs, input_ids)

    def create_masks_for_generate(self, config=None, attention_mask=None, **kwargs):
        # The language model builds its own prefix-LM mask from the 2-D padding mask and positions. For
        # compileable (static) caches the padding mask is widened to the cache length so every decode step
        # has the same input shapes (no recompilation); the unused tail is never attended.
        cache = pick_cache(kwargs.get("cache"), kwargs.get("past_key_values"))  # the name changed in 5.24
        if attention_mask is None or attention_mask.ndim != 2 or not getattr(cache, "is_compileable", False):
            return attention_mask
        max_len = kv_length(cache, 1)  # a static cache's key length is its capacity
        if attention_mask.shape[1] >= max_len:
            return attention_mask
        return nn.functional.pad(attention_mask, (0, max_len - attention_mask.shape[1]), value=0)

    # --- chat -------------------------------------------------------------------------------------
    @classmethod
    def chat_defaults_for(cls, config) -> dict:
        """The original's chat generation defaults for ``config`` (used by ``chat``, the CLIs and the model card)."""
        return dict(CHAT_DEFAULTS)

    def _chat_inputs(self, tokenizer, image, query, history, gen_kwargs, logits_processor=None, english=None):
        """(input_ids (1, T), pixel_values or None, generate kwargs) of one chat turn."""

        def build(turns):
            return build_visualglm_inputs(tokenizer, query, history=turns, has_image=image is not None,
                                          num_image_tokens=self.config.num_image_tokens, english=english)

        ids, kwargs = prepare_chat(build, history, self.chat_defaults_for(self.config), gen_kwargs,
                                   self.config.text_config.max_position_embeddings)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        pixel_values = None
        if image is not None:
            processor = VisualGLMImageProcessor(size=self.config.vision_config.image_size)
            pixel_values = processor(image, return_tensors="pt")["pixel_values"]
            pixel_values = pixel_values.to(device=self.device, dtype=self.vision_model.dtype)
        processors = LogitsProcessorList(logits_processor or [])
        processors.append(TokenRangeLogitsProcessor(tokenizer.vocab_size))
        processors.append(InvalidScoreLogitsProcessor(self.config.text_config.eos_token_id))
        kwargs["logits_processor"] = processors
        kwargs.setdefault("eos_token_id", self.config.text_config.eos_token_id)
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        return input_ids, pixel_values, kwargs

    @torch.no_grad()
    def chat(self, tokenizer, image, query: str, history=None, logits_processor=None, english=None, **gen_kwargs):
        """One chat turn. ``image``: a path, a PIL image, or None (text only).

        Returns ``(response, history + [(query, response)])``. Generation defaults are THUDM's
        (``configuration_visualglm.CHAT_DEFAULTS``: sampling, top_p 0.4, top_k 100, temperature 0.8,
        repetition_penalty 1.2, 1024 new tokens, min_length 100); any ``generate`` keyword overrides them, e.g.
        ``do_sample=False, max_new_tokens=64, min_length=0``. ``max_length`` counts new tokens here; history
        turns that do not fit the model's positions are left out of the prompt, oldest first, with a warning.
        """
        history = check_history(history)
        input_ids, pixel_values, kwargs = self._chat_inputs(tokenizer, image, query, history, gen_kwargs,
                                                            logits_processor, english=english)
        outputs = self.generate(input_ids=input_ids, pixel_values=pixel_values, **kwargs)
        response = process_response(tokenizer.decode(outputs[0, input_ids.shape[1] :].tolist(),
                                                     skip_special_tokens=True))
        return response, history + [(query, response)]

    @torch.no_grad()
    def stream_chat(self, tokenizer, image, query: str, history=None, logits_processor=None, english=None,
                    **gen_kwargs):
        """Like ``chat`` but yields ``(partial_response, history)`` after every generated token."""
        history = check_history(history)
        input_ids, pixel_values, kwargs = self._chat_inputs(tokenizer, image, query, history, gen_kwargs,
                                                            logits_processor, english=english)

        def decode(tokens):
            return process_response(tokenizer.decode(tokens, skip_special_tokens=True))

        for response in stream_generate(self, decode, input_ids=input_ids, pixel_values=pixel_values, **kwargs):
            yield response, history + [(query, response)]
