"""The composition every family shares, in the shape of transformers' LLaVA (``models/llava/modeling_llava.py``).

Images are runs of ``config.image_token_id`` placeholders in ``input_ids`` (exactly ``config.num_image_tokens``
per image, the images in ``pixel_values`` in order of appearance); their embeddings are replaced by the image
features with ``masked_scatter``. Then the language model, the LM head, the shifted cross-entropy (placeholders
never supervised) and one output type. ``chat`` / ``stream_chat`` run one turn over a family's prompt builder
and chat defaults, with the image processor the model's folder ships.

A family class sets ``config_class``, its submodules, ``image_processor_class``, ``chat_defaults`` (its
configuration module's ``CHAT_DEFAULTS``), and writes ``get_image_features``, ``_language_model_inputs`` (its
positions and input checks), its generation hooks and ``_chat_prompt_ids``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.generation import LogitsProcessorList

from .attention import TextPreTrainedModel
from .chat_utils import check_history, prepare_chat, stream_generate
from .compat import (CACHE_ARG, MultimodalCausalLMOutputWithPast, cache_kwargs, generation_cache, kv_length, output_cache,
                     pick_cache, placeholder_safe_processors)
from .decode_graphs import FastDecoder, can_loop, decode_loop, plan, resolve_mode


def placeholder_count_error(n_placeholders: int, num_images: int, num_image_tokens: int, image_token_id: int,
                            per_image: str = "") -> str | None:
    """The error message when ``n_placeholders`` placeholders cannot hold ``num_images`` images, else None."""
    expected = num_images * num_image_tokens
    if n_placeholders == expected:
        return None
    return (
        f"input_ids hold {n_placeholders} image placeholders (id {image_token_id}) but {num_images} image(s) need "
        f"{expected} ({num_image_tokens} each{per_image}); each image must be one run of {num_image_tokens} "
        "placeholders and pixel_values must hold exactly the images in order of appearance"
    )


def check_image_count(image_mask: torch.Tensor, num_images: int, num_image_tokens: int, image_token_id: int) -> None:
    """One host sync (call it on prefill only): the placeholders must hold exactly the given images."""
    error = placeholder_count_error(int(image_mask.sum()), num_images, num_image_tokens, image_token_id)
    if error:
        raise ValueError(error)


def drop_images_after_prefill(model_inputs: dict, input_ids: torch.Tensor) -> dict:
    """Decode steps never re-encode the images: ``pixel_values`` go to the prefill only (by shapes, no host sync).
    transformers 5.x drops them itself; 4.57.x passes them at every step."""
    step_ids = model_inputs.get("input_ids")
    if step_ids is not None and step_ids.shape[1] != input_ids.shape[1]:
        model_inputs["pixel_values"] = None
    return model_inputs


class MultimodalPreTrainedModel(TextPreTrainedModel):
    """What every family shares: image + text in, a ``language_model`` sub-model and an ``lm_head`` out.

    Flash and flex attention stay off (see ``TextPreTrainedModel``).

    ``quantization_skip_modules`` names every top-level module outside the language model (vision tower,
    adapters) plus ``lm_head``: pass it as ``BitsAndBytesConfig(llm_int8_skip_modules=...)`` to quantize the
    language model alone and keep the rest in the load dtype (bitsandbytes replaces that default list).

    Weights: every block initialises its own parameters; ``_init_weights`` here (transformers' default: normal
    Linear/Conv weights with ``config.initializer_range``, zero biases, unit norms) covers the projections,
    adapters and ``lm_head`` of the family, which adds only its bare ``nn.Parameter``\\ s.
    """

    quantization_skip_modules: list[str] = ["lm_head"]

    input_modalities = ("image", "text")

    # positions the image block of one image saves against its token count (CogVLM: all but 3)
    image_positions_saved = 0

    def check_prompt_length(self, seq_len: int, has_images: bool) -> None:
        """Before any compute (shapes only, no host sync): a prompt must fit the language model's positions.
        In a batch mixing image and text-only rows the image rows' saving is granted to all (a bound, not exact)."""
        max_positions = self.config.text_config.max_position_embeddings
        allowed = max_positions + (self.image_positions_saved if has_images else 0)
        if seq_len > allowed:
            raise ValueError(
                f"the prompt is {seq_len} tokens{' with its image(s)' if has_images else ''}, more than the "
                f"{max_positions} positions of the language model: shorten it (chat() leaves out old history turns "
                "by itself)"
            )

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.language_model


class MultimodalForConditionalGeneration(MultimodalPreTrainedModel, GenerationMixin):
    """The shared half of every ``…ForConditionalGeneration``: embeddings with the images scattered in, the LM
    head, the loss and the output; the generation prefill checks; ``chat`` and ``stream_chat``."""

    _tp_plan = {"lm_head": "colwise_gather_output"}
    # the family's image processor class: what its hub folders ship in preprocessor_config.json
    image_processor_class = None
    # the family's chat generation defaults (its configuration module's CHAT_DEFAULTS)
    chat_defaults: dict = {}
    # chat()/stream_chat() keywords that shape the prompt (handed to _chat_prompt_ids), not generate()
    chat_prompt_options: tuple[str, ...] = ()
    # logits in float32 whatever the weights' dtype (CogVLM's originals do so)
    fp32_logits = False
    _chat_image_processor = None  # loaded on first use, see chat_image_processor
    # decode steps from a CUDA graph: "auto" (on CUDA), "graphs", "compile" or "off" (decode_graphs.py)
    fast_decode = "auto"
    _fast_decoder = None

    # --- forward pieces ---------------------------------------------------------------------------
    def _check_image_count(self, image_mask: torch.Tensor, num_images: int) -> None:
        check_image_count(image_mask, num_images, self.config.num_image_tokens, self.config.image_token_id)

    def _check_prefill(self, image_mask: torch.Tensor, pixel_values) -> None:
        """A prefill's checks before any compute (one host sync): the prompt fits the positions and the
        placeholders hold exactly the images of ``pixel_values`` (None: no image)."""
        self.check_prompt_length(image_mask.shape[1], pixel_values is not None)
        self._check_image_count(image_mask, 0 if pixel_values is None else pixel_values.shape[0])

    @staticmethod
    def _check_input_kinds(input_ids, inputs_embeds, pixel_values) -> None:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is None and pixel_values is not None:
            raise ValueError("pixel_values need input_ids (their placeholders say where the images go)")

    def embed_with_images(self, input_ids: torch.LongTensor, image_mask: torch.Tensor, pixel_values=None):
        """(B, T) ids, their (B, T) placeholder mask → ((B, T, H) embeddings, image features (N, num_image_tokens,
        H) or None). The placeholder id may lie outside the embedding table: it is never looked up. The features
        follow the embeddings' device, which differs from the vision tower's under a ``device_map`` split."""
        inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        if pixel_values is None:
            return inputs_embeds, None
        features = self.get_image_features(pixel_values).to(inputs_embeds.device, inputs_embeds.dtype)
        mask = image_mask.to(inputs_embeds.device).unsqueeze(-1)
        return inputs_embeds.masked_scatter(mask, features), features

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
    ) -> MultimodalCausalLMOutputWithPast:
        """``input_ids`` (B, T) with each image as a run of ``config.num_image_tokens`` × ``config.image_token_id``,
        ``pixel_values`` (N_images, 3, S, S) for the images in order of appearance → ``logits`` (B, T, V), and the
        loss over ``labels``. ``position_ids`` and the family's own arguments: see its ``_language_model_inputs``."""
        self._check_input_kinds(input_ids, inputs_embeds, pixel_values)
        cache = pick_cache(cache, past_key_values)  # `past_key_values` is the name before transformers 5.24
        fast = self._fast_decoder if labels is None and not output_hidden_states else None
        if fast is not None and fast.active is not None:  # inside a fast-decode generate: graphs (decode_graphs.py)
            call = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
            graph = fast.takes(input_ids, cache, pixel_values)
            if graph is not None:  # a decode step
                return graph.step(self, call)
            output = fast.prefill(self, dict(call, pixel_values=pixel_values, cache=cache))
            if output is not None:
                return output
        image_mask = image_features = None
        if input_ids is not None:
            image_mask = input_ids == self.config.image_token_id  # (B, T)
        lm_inputs = self._language_model_inputs(input_ids, image_mask, pixel_values, attention_mask, position_ids,
                                                cache, kwargs)
        if input_ids is not None:
            inputs_embeds, image_features = self.embed_with_images(input_ids, image_mask, pixel_values)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **lm_inputs,
            **kwargs,
        )
        return self.lm_output(outputs, labels, image_mask, image_features, logits_to_keep)

    def _language_model_inputs(self, input_ids, image_mask, pixel_values, attention_mask, position_ids, cache,
                               kwargs) -> dict:
        """The family's checks before any compute, and the language model's keyword arguments besides the
        embeddings, mask, cache and flags (at least ``position_ids``). ``input_ids``/``image_mask`` are None when
        the caller gave ``inputs_embeds``; the family's own forward arguments are taken out of ``kwargs``."""
        raise NotImplementedError

    def lm_output(self, outputs, labels=None, image_mask=None, image_features=None, logits_to_keep=0):
        """The language model's output → logits (B, T, V) of the last ``logits_to_keep`` positions (0: all), the
        shifted cross-entropy over ``labels`` (−100 and image placeholders ignored), the cache and features."""
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        if self.fp32_logits:
            logits = logits.float()
        loss = None
        if labels is not None:
            if image_mask is not None:
                labels = labels.masked_fill(image_mask, -100)  # image positions are never supervised
            shift_logits = logits[:, :-1, :].float()
            shift_labels = labels[:, 1:].to(shift_logits.device)
            loss = nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100
            )
        return MultimodalCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **cache_kwargs(output_cache(outputs)),
            hidden_states=outputs.hidden_states,
            image_hidden_states=image_features,
        )

    # --- generation hooks -------------------------------------------------------------------------
    def generate(self, *args, fast_decode: str | None = None, **kwargs):
        """transformers' ``generate``; on CUDA its decode steps replay a CUDA graph over a static cache
        (``fast_decode``: "auto" | "graphs" | "compile" | "off", default ``self.fast_decode``; see decode_graphs.py).
        Beam search, assisted decoding, a given cache or cache implementation run the plain loop."""
        mode = fast_decode if fast_decode is not None else self.fast_decode
        max_cache_len = plan(self, mode, args, kwargs)
        if max_cache_len is None:
            return super().generate(*args, **kwargs)
        if self._fast_decoder is None:
            self._fast_decoder = FastDecoder()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        with self._fast_decoder.session(self, input_ids.shape[0], max_cache_len,
                                        resolve_mode(mode, self.device)) as graph:
            return super().generate(*args, **kwargs, **{CACHE_ARG: graph.cache}, disable_compile=True)

    def _get_logits_processor(self, *args, **kwargs):
        return placeholder_safe_processors(super()._get_logits_processor(*args, **kwargs))

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                streamer=None, **model_kwargs):
        """transformers' greedy/sampling loop; in a fast-decode session ``decode_graphs.decode_loop``, which reads the
        stop check one step late so that the host never waits for the GPU between two replays."""
        if (self._fast_decoder is not None and self._fast_decoder.active is not None
                and can_loop(self, generation_config, synced_gpus)):
            return decode_loop(self, input_ids, logits_processor, stopping_criteria, generation_config, streamer,
                               model_kwargs)
        return super()._sample(input_ids, logits_processor, stopping_criteria, generation_config,
                               synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)

    def release_fast_decode(self) -> None:
        """Free the static cache and CUDA graph kept for the next ``generate`` call."""
        if self._fast_decoder is not None:
            self._fast_decoder.release()

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # the cache travels in kwargs under the running release's name (see compat.py)
        model_inputs = super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask, **kwargs)
        step_ids = model_inputs.get("input_ids")
        if step_ids is not None and step_ids.shape[1] == input_ids.shape[1]:  # the prefill (shapes only decide)
            self._check_generation_prefill(input_ids, attention_mask, model_inputs.get("pixel_values") is not None)
        return drop_images_after_prefill(model_inputs, input_ids)

    def _generation_prompt_ids(self, inputs_tensor, model_kwargs):
        """For a family's ``_prepare_position_ids_for_generation``: the prompt ids ``generate`` starts from when the
        positions can be built from them alone (ids, an empty cache, no 2-D mask of another length); else None."""
        input_ids = model_kwargs.get("input_ids")
        if input_ids is None or input_ids.shape[1] == 0:
            input_ids = inputs_tensor
        cache, mask = generation_cache(model_kwargs), model_kwargs.get("attention_mask")
        if (input_ids is None or input_ids.is_floating_point() or (cache is not None and cache.get_seq_length() != 0)
                or (mask is not None and (mask.ndim != 2 or mask.shape[-1] != input_ids.shape[1]))):
            return None
        return input_ids

    def create_masks_for_generate(self, config=None, attention_mask=None, **kwargs):
        # The language models build their own masks (ChatGLM: prefix-LM from the block positions; LLaMA: causal) from
        # the 2-D padding mask, inside forward, so inside a decode step's CUDA graph (decode_graphs.py) rather than
        # as a dozen eager kernels per step outside it. For compileable (static) caches the padding mask is widened
        # to the cache length so every decode step has the same input shapes; the unused tail is never attended.
        cache = pick_cache(kwargs.get("cache"), kwargs.get("past_key_values"))  # the name changed in 5.24
        if attention_mask is None or attention_mask.ndim != 2 or not getattr(cache, "is_compileable", False):
            return attention_mask
        max_len = kv_length(cache, 1)  # a static cache's key length is its capacity
        if attention_mask.shape[1] >= max_len:
            return attention_mask
        return nn.functional.pad(attention_mask, (0, max_len - attention_mask.shape[1]), value=0)

    def _check_generation_prefill(self, input_ids, attention_mask, has_images: bool) -> None:
        """A generation prefill's checks: ``forward`` cannot tell it from a decode step without reading the cache
        (generate passes a cache and positions), so the family checks it here, by shapes."""
        self.check_prompt_length(input_ids.shape[1], has_images)
        if not has_images:  # else forward checks the count itself
            self._check_image_count(input_ids == self.config.image_token_id, 0)

    # --- chat -------------------------------------------------------------------------------------
    @classmethod
    def chat_defaults_for(cls, config) -> dict:
        """The original's chat generation defaults for ``config`` (used by ``chat``, the CLIs and the model card)."""
        return dict(cls.chat_defaults)

    def _chat_prompt_ids(self, tokenizer, query: str, history: list, has_image: bool, **options) -> list[int]:
        """The family's prompt ids for ``history`` + ``query`` (``options``: its ``chat_prompt_options``)."""
        raise NotImplementedError

    def _chat_logits_processors(self, tokenizer) -> list:
        """Logits processors that ``chat`` runs after the caller's."""
        return []

    def _chat_pad_token_id(self, tokenizer):
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.config.text_config.pad_token_id

    @staticmethod
    def _chat_response(text: str) -> str:
        """The answer from the decoded new tokens (the family's ``process_response``)."""
        return text

    def chat_image_processor(self, image_processor=None):
        """The image processor of ``chat``: ``image_processor`` when given (an image processor or a processor
        holding one); else the one in the model's folder (``preprocessor_config.json``, loaded once); else, for
        a model not loaded from a folder that ships one, the family's processor built from the config."""
        if image_processor is not None:
            return getattr(image_processor, "image_processor", image_processor)
        if self._chat_image_processor is None:
            source = getattr(self.config, "name_or_path", "") or ""
            processor = None
            if source:
                try:
                    processor = self.image_processor_class.from_pretrained(source)
                except (OSError, ValueError):  # no preprocessor_config.json there (e.g. a plain save_pretrained)
                    processor = None
            if processor is None:
                processor = self.image_processor_class(size=self.config.vision_config.image_size)
            self._chat_image_processor = processor
        return self._chat_image_processor

    def _chat_inputs(self, tokenizer, image, query, history, gen_kwargs, image_processor=None):
        """(input_ids (1, T), pixel_values or None, generate kwargs) of one chat turn."""
        gen_kwargs = dict(gen_kwargs)
        options = {key: gen_kwargs.pop(key) for key in self.chat_prompt_options if key in gen_kwargs}
        has_image = image is not None

        def build(turns):
            return self._chat_prompt_ids(tokenizer, query, turns, has_image, **options)

        ids, kwargs = prepare_chat(build, history, self.chat_defaults_for(self.config), gen_kwargs,
                                   self.config.text_config.max_position_embeddings,
                                   saved_positions=self.image_positions_saved if has_image else 0)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        pixel_values = None
        if has_image:
            pixel_values = self.chat_image_processor(image_processor)(image, return_tensors="pt")["pixel_values"]
            pixel_values = pixel_values.to(device=self.device, dtype=self.vision_model.dtype)
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.extend(self._chat_logits_processors(tokenizer))
        if processors:
            kwargs["logits_processor"] = processors
        if kwargs.get("stop_strings"):
            kwargs.setdefault("tokenizer", tokenizer)  # generate() matches stop strings through it
        kwargs.setdefault("eos_token_id", self.config.text_config.eos_token_id)
        kwargs.setdefault("pad_token_id", self._chat_pad_token_id(tokenizer))
        return input_ids, pixel_values, kwargs

    @torch.no_grad()
    def chat(self, tokenizer, image, query: str, history=None, *, image_processor=None, **gen_kwargs):
        """One chat turn. ``image``: a path, a URL, a PIL image, or None (text only).

        Returns ``(response, history + [(query, response)])``. Generation defaults are the original's
        (``chat_defaults_for(config)``, the family's ``CHAT_DEFAULTS``); any ``generate`` keyword overrides them,
        e.g. ``do_sample=False, max_new_tokens=64``, and ``logits_processor`` runs before the family's own.
        ``max_length`` counts new tokens here; history turns that do not fit the model's positions are left out
        of the prompt, oldest first, with a warning. ``image_processor``: see ``chat_image_processor``.
        """
        history = check_history(history)
        input_ids, pixel_values, kwargs = self._chat_inputs(tokenizer, image, query, history, gen_kwargs,
                                                            image_processor=image_processor)
        outputs = self.generate(input_ids=input_ids, pixel_values=pixel_values, **kwargs)
        new_tokens = outputs[0, input_ids.shape[1] :].tolist()
        response = self._chat_response(tokenizer.decode(new_tokens, skip_special_tokens=True))
        return response, history + [(query, response)]

    @torch.no_grad()
    def stream_chat(self, tokenizer, image, query: str, history=None, *, image_processor=None, **gen_kwargs):
        """Like ``chat`` but yields ``(partial_response, history + [(query, partial_response)])`` per new token."""
        history = check_history(history)
        input_ids, pixel_values, kwargs = self._chat_inputs(tokenizer, image, query, history, gen_kwargs,
                                                            image_processor=image_processor)

        def decode(tokens):
            return self._chat_response(tokenizer.decode(tokens, skip_special_tokens=True))

        for response in stream_generate(self, decode, input_ids=input_ids, pixel_values=pixel_values, **kwargs):
            yield response, history + [(query, response)]
