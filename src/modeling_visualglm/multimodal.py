"""What the families share: the image-placeholder check (CONTRACTS §4), the output type, and the
PreTrainedModel flags and embedding accessors of a vision-language model with an LM head."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .compat import MultimodalCausalLMOutputWithPast  # noqa: F401 - the families' output type


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


class MultimodalPreTrainedModel(PreTrainedModel):
    """What every family shares: image + text in, a ``language_model`` sub-model and an ``lm_head`` out.

    Flash and flex attention stay off: ChatGLM's prefix-LM mask is not causal, and CogVLM's repeated image
    positions would be read as packed sequences; SDPA and eager take the explicit masks the blocks build.
    Subclasses set ``config_class``, ``_no_split_modules`` where needed, ``quantization_skip_modules``, and
    ``_init_weights``.

    ``quantization_skip_modules`` names every top-level module outside the language model (vision tower,
    adapters) plus ``lm_head``: pass it as ``BitsAndBytesConfig(llm_int8_skip_modules=...)`` to quantize the
    language model alone and keep the rest in the load dtype (bitsandbytes replaces that default list).
    """

    quantization_skip_modules: list[str] = ["lm_head"]

    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True

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

    def _scatter_image_features(
        self, inputs_embeds: torch.Tensor, image_mask: torch.Tensor, pixel_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``pixel_values`` and write the features over the placeholders: (B, T, H) embeddings, (B, T)
        mask → (embeddings, features (N, num_image_tokens, H)). The features and the mask follow the
        embeddings' device, which differs from the vision tower's under a ``device_map`` split."""
        features = self.get_image_features(pixel_values).to(inputs_embeds.device, inputs_embeds.dtype)
        mask = image_mask.to(inputs_embeds.device).unsqueeze(-1)
        return inputs_embeds.masked_scatter(mask, features), features
