"""CogVLM and CogVLM2 for transformers 5.x: EVA2-CLIP-E → (CogVLM2: 2x2 conv) → GLU adapter with boi/eoi →
LLaMA with per-token visual experts.

Implements CogVLM (Wang et al. 2023, "CogVLM: Visual Expert for Pretrained Language Models",
https://arxiv.org/abs/2311.03079; THUDM/CogVLM @f7283b2 ``utils/models/cogvlm_model.py``, ``mixin.py``,
``utils/utils/language.py`` on SwissArmyTransformer 0.4.12, and THUDM's HF ``cogvlm-chat-hf`` code) and CogVLM2
(Hong et al. 2024, https://arxiv.org/abs/2408.16500; the HF ``cogvlm2-llama3-chat-19B`` ``modeling_cogvlm.py`` /
``visual.py``) as a composition of the shared blocks (``config.version`` picks the variant).

The image of a row is a run of ``config.num_image_tokens`` placeholders (boi, grid² patches, eoi). Token types
follow from the placeholders: the run is VISION, everything else LANGUAGE. The vision expert runs on boi and
the patches (a token is routed to it iff it and the next token are VISION, so eoi uses the language expert).
Positions: the image run takes 3 positions (boi p+1, all patches p+2, eoi p+3), every other token one:
bos 0, boi 1, patches 2, eoi 3, text from 4; generated tokens are LANGUAGE and continue at last + 1.

Deliberate differences from the originals:
- Images are marked by a dedicated ``config.image_token_id`` (LLaVA style) instead of pad ids plus separate
  ``token_type_ids``; passed ``token_type_ids`` must agree with the placeholders. Several images per row work
  (each run gets its own 3 positions); the originals allow one, right after bos.
- Left padding does not shift positions (the HF original starts left-padded rows at 1); RoPE is relative, so
  only rounding differs.
- Expert routing sorts the tokens once per forward (one host sync per prefill, fused with the input checks);
  decode steps run the language expert only, with no host sync (see ``llama.py``).
- The generation positions are computed once from the prompt (``_prepare_position_ids_for_generation``) and
  continued by ``generate``'s +1 per step, instead of being rebuilt from the whole history at every step.
- SDPA / eager attention from transformers instead of xformers and triton kernels; RoPE angles in fp32.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from transformers import GenerationMixin

from .compat import init
from .configuration_cogvlm import CHAT_DEFAULTS, CogVLMConfig
from .eva_vit import EvaVisionModel
from .image_processing_cogvlm import CogVLMImageProcessor
from .llama import LlamaExpertModel, expert_routing
from .multimodal import (
    MultimodalCausalLMOutputWithPast,
    MultimodalForConditionalGeneration,
    MultimodalPreTrainedModel,
    placeholder_count_error,
)
from .processing_cogvlm import VISION_TOKEN_TYPE, build_cogvlm_inputs, build_cogvlm_prompt, process_response
# transformers 4.57.x copies out of a local folder only the files that the loaded file itself imports (5.x follows
# imports recursively): these lines name the rest of the import closure (delete with the 4.57 floor)
from .attention import eager_attention_forward  # noqa: F401
from .chat_utils import check_history  # noqa: F401
from .configuration_blocks import LlamaExpertConfig  # noqa: F401
from .decode_graphs import FastDecoder  # noqa: F401
from .prefill_graphs import PrefillGraph  # noqa: F401
from .static_graphs import StaticGraph  # noqa: F401
from .image_processing_visualglm import VisualGLMImageProcessor  # noqa: F401

# ---------------------------------------------------------------------------------------------------
# Token types, expert mask, positions and input checks from the placeholders
# ---------------------------------------------------------------------------------------------------


def _image_run_edges(image_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) placeholder mask → (first, last) token of each placeholder run, i.e. (boi, eoi)."""
    prev = nn.functional.pad(image_mask[:, :-1], (1, 0), value=False)
    nxt = nn.functional.pad(image_mask[:, 1:], (0, 1), value=False)
    return image_mask & ~prev, image_mask & ~nxt


def cogvlm_vision_expert_mask(image_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True on boi and patches (a VISION token followed by a VISION token), False on eoi and text."""
    _, eoi = _image_run_edges(image_mask)
    return image_mask & ~eoi


def cogvlm_position_ids(image_mask: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.LongTensor:
    """(B, T) positions: one per real token, except that each image run takes three (boi, patches, eoi).

    ``attention_mask`` (B, ≥T), 1 = real token: padding does not advance the counter and gets position 0, so a
    left-padded row has the positions of the same row alone.
    """
    t = image_mask.shape[1]
    real = torch.ones_like(image_mask) if attention_mask is None else attention_mask[:, -t:].bool()
    boi, eoi = _image_run_edges(image_mask)
    patches = image_mask & ~boi & ~eoi
    first_patch = patches & nn.functional.pad(boi[:, :-1], (1, 0), value=False)
    advance = real & (~patches | first_patch)
    return (advance.long().cumsum(-1) - 1).clamp(min=0)


def prefill_position_ids(image_mask: torch.Tensor, attention_mask, is_prefill: bool) -> torch.LongTensor:
    """``cogvlm_position_ids`` of a prompt; once the cache holds tokens the caller must continue them instead."""
    if not is_prefill:
        raise ValueError(
            "position_ids are required once the cache holds tokens: continue the prompt's positions "
            "(cogvlm_position_ids(prompt_ids == config.image_token_id, attention_mask)[:, -1:] + 1 for "
            "the first new token; generate() does this)"
        )
    return cogvlm_position_ids(image_mask, attention_mask)


def _bad_image_runs(image_mask: torch.Tensor, run_length: int) -> torch.Tensor:
    """Number of placeholder runs whose length is not ``run_length`` (0-d tensor)."""
    boi, eoi = _image_run_edges(image_mask)
    idx = torch.arange(image_mask.shape[1], device=image_mask.device).expand_as(image_mask)
    start = torch.where(boi, idx, torch.full_like(idx, -1)).cummax(-1).values  # index of the run's boi
    return (eoi & (idx - start + 1 != run_length)).sum()


def check_cogvlm_inputs(image_mask, num_images: int, token_type_ids, attention_mask, config: CogVLMConfig) -> int:
    """Placeholders vs images, run lengths and ``token_type_ids`` in one host sync; returns the number of tokens
    routed to the vision expert."""
    n_img, image_token_id = config.num_image_tokens, config.image_token_id
    t = image_mask.shape[1]
    real = torch.ones_like(image_mask) if attention_mask is None else attention_mask[:, -t:].bool()
    if token_type_ids is not None:
        if token_type_ids.shape != image_mask.shape:
            raise ValueError(
                f"token_type_ids must match input_ids' shape {tuple(image_mask.shape)}, got "
                f"{tuple(token_type_ids.shape)}"
            )
        disagree = (((token_type_ids == VISION_TOKEN_TYPE) != image_mask) & real).sum()
    else:
        disagree = image_mask.new_zeros((), dtype=torch.long)
    stats = torch.stack([
        image_mask.sum(), _bad_image_runs(image_mask, n_img), disagree, cogvlm_vision_expert_mask(image_mask).sum()
    ]).tolist()  # the one sync of a prefill
    n_placeholders, bad_runs, n_disagree, num_vision = stats
    error = placeholder_count_error(n_placeholders, num_images, n_img, image_token_id,
                                    per_image=f": boi, {n_img - 2} patches, eoi")
    if error:
        raise ValueError(error)
    if bad_runs:
        raise ValueError(
            f"{bad_runs} image placeholder run(s) are not exactly {n_img} long: each image must be one "
            f"uninterrupted run of {n_img} placeholders (id {image_token_id})"
        )
    if n_disagree:
        raise ValueError(
            f"token_type_ids disagree with the image placeholders at {n_disagree} token(s): VISION (1) must "
            f"mark exactly the placeholder runs (id {image_token_id}); omit token_type_ids to derive them"
        )
    return num_vision


# ---------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------


CogVLMCausalLMOutputWithPast = MultimodalCausalLMOutputWithPast


class CogVLMAdapter(nn.Module):
    """Tower patches (N, g², H_vit) → LM image tokens (N, (g/d)² + 2, H): CogVLM2's 2x2 stride-2 conv over the
    row-major grid (d = 2), then the GLU (linear_proj → LayerNorm → GELU → SwiGLU → dense_4h_to_h), then the
    learned boi / eoi around the patches. No output scaling (unlike GLM-4V)."""

    def __init__(self, config: CogVLMConfig):
        super().__init__()
        vision_hidden = config.vision_config.hidden_size
        hidden, inner = config.text_config.hidden_size, config.text_config.intermediate_size
        self.conv = (
            nn.Conv2d(vision_hidden, vision_hidden, kernel_size=2, stride=2) if config.downsample == 2 else None
        )
        self.linear_proj = nn.Linear(vision_hidden, hidden, bias=False)
        self.norm1 = nn.LayerNorm(hidden, eps=config.adapter_layer_norm_eps)
        self.act1 = nn.GELU()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.dense_h_to_4h = nn.Linear(hidden, inner, bias=False)
        self.dense_4h_to_h = nn.Linear(inner, hidden, bias=False)
        self.boi = nn.Parameter(torch.zeros(1, 1, hidden))
        self.eoi = nn.Parameter(torch.zeros(1, 1, hidden))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            n, num_patches, channels = patches.shape
            grid = math.isqrt(num_patches)
            x = patches.view(n, grid, grid, channels).permute(0, 3, 1, 2)  # (N, H_vit, g, g)
            patches = self.conv(x).flatten(2).transpose(1, 2)  # (N, (g/2)², H_vit), row-major
        x = self.act1(self.norm1(self.linear_proj(patches)))
        x = self.dense_4h_to_h(nn.functional.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))  # (N, P, H)
        n = x.shape[0]
        return torch.cat([self.boi.to(x.dtype).expand(n, -1, -1), x, self.eoi.to(x.dtype).expand(n, -1, -1)], dim=1)


class CogVLMPreTrainedModel(MultimodalPreTrainedModel):
    config_class = CogVLMConfig
    _no_split_modules = ["LlamaExpertDecoderLayer", "EvaVisionLayer", "CogVLMAdapter"]
    quantization_skip_modules = ["vision_model", "adapter", "lm_head"]

    @property
    def image_positions_saved(self) -> int:
        return self.config.num_image_tokens - 3  # the image block takes 3 positions (boi, patches, eoi)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CogVLMAdapter):
            init.normal_(module.boi, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.eoi, mean=0.0, std=self.config.initializer_range)


# GenerationMixin among the direct bases: transformers' remote-code loader looks for it there
class CogVLMForConditionalGeneration(CogVLMPreTrainedModel, MultimodalForConditionalGeneration, GenerationMixin):
    """CogVLM / CogVLM2 with a language-modeling head.

    forward: ``MultimodalForConditionalGeneration.forward`` (logits in float32). ``chat``: the demos' greedy
    defaults; ``template=`` base | chat | vqa | text.
    """

    _tied_weights_keys = {"lm_head.weight": "language_model.embed_tokens.weight"}
    fp32_logits = True  # as the originals
    image_processor_class = CogVLMImageProcessor
    chat_defaults = CHAT_DEFAULTS
    chat_prompt_options = ("template",)
    _chat_response = staticmethod(process_response)

    def __init__(self, config: CogVLMConfig):
        super().__init__(config)
        self.vision_model = EvaVisionModel(config.vision_config)
        self.adapter = CogVLMAdapter(config)
        self.language_model = LlamaExpertModel(config.text_config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_image_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """(N, 3, S, S) → (N, num_image_tokens, H_text): [boi, patches, eoi]."""
        patches = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (N, g², H_vit), no CLS
        return self.adapter(patches.to(self.adapter.linear_proj.weight.dtype))

    def _language_model_inputs(self, input_ids, image_mask, pixel_values, attention_mask, position_ids, cache,
                               kwargs) -> dict:
        """
        token_type_ids (B, T), keyword: optional (HF CogVLM's LANGUAGE 0 / VISION 1); derived from the placeholders,
            and must agree with them where given.
        position_ids (B, T): derived from the placeholders on prefill (``cogvlm_position_ids``); required once the
            cache holds tokens (``generate`` passes them).
        """
        token_type_ids = kwargs.pop("token_type_ids", None)
        if input_ids is None:
            if token_type_ids is not None and bool((token_type_ids == VISION_TOKEN_TYPE).any()):
                raise ValueError("token_type_ids mark VISION tokens, but inputs_embeds carry no image placeholders")
            return {"position_ids": position_ids, "routing": None}
        # a static cache reports its length as a tensor: reading it would sync, so only an int 0 means prefill
        seq = cache.get_seq_length() if cache is not None else 0
        is_prefill = pixel_values is not None or (isinstance(seq, int) and seq == 0)
        num_vision = routing = None
        if is_prefill:
            self.check_prompt_length(input_ids.shape[1], pixel_values is not None)
        if is_prefill or token_type_ids is not None:
            num_images = 0 if pixel_values is None else pixel_values.shape[0]
            num_vision = check_cogvlm_inputs(image_mask, num_images, token_type_ids, attention_mask, self.config)
        if position_ids is None:
            position_ids = prefill_position_ids(image_mask, attention_mask, is_prefill)
        if pixel_values is not None:
            routing = expert_routing(cogvlm_vision_expert_mask(image_mask), num_vision=num_vision)
        return {"position_ids": position_ids, "routing": routing}

    # --- generation hooks -------------------------------------------------------------------------
    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        # generate() builds the prompt positions once (cumsum of the mask by default) and then adds +1 per new
        # token; with the image block's 3-position rule in the prompt, that +1 continuation is exactly right
        input_ids = self._generation_prompt_ids(inputs_tensor, model_kwargs)
        if input_ids is None:
            return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        return cogvlm_position_ids(input_ids == self.config.image_token_id, model_kwargs.get("attention_mask"))

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, token_type_ids=None, **kwargs):
        # generate() extends token_type_ids by repeating the last one: they are checked at prefill, derived elsewhere
        if kwargs.get("position_ids") is None:
            # generate() did not build positions (e.g. a caller's loop): derive them from the whole sequence
            full_mask = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
            kwargs["position_ids"] = cogvlm_position_ids(input_ids == self.config.image_token_id, full_mask)
        model_inputs = super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask, **kwargs)
        ids = model_inputs.get("input_ids")
        if token_type_ids is not None and ids is not None and model_inputs.get("pixel_values") is not None:
            model_inputs["token_type_ids"] = token_type_ids[:, -ids.shape[1] :]
        return model_inputs

    def _check_generation_prefill(self, input_ids, attention_mask, has_images: bool) -> None:
        pass  # forward checks a prefill itself (it reads an empty cache), in its one host sync

    # --- chat -------------------------------------------------------------------------------------
    def _chat_prompt_ids(self, tokenizer, query, history, has_image, template=None):
        """``template``: base | chat | vqa | text (default ``config.template_version``)."""
        prompt = build_cogvlm_prompt(query, history, template or self.config.template_version)
        return build_cogvlm_inputs(tokenizer, prompt, has_image, self.config.num_image_tokens,
                                   self.config.image_token_id)


__all__ = [
    "CogVLMPreTrainedModel",
    "CogVLMForConditionalGeneration",
    "cogvlm_position_ids",
    "cogvlm_vision_expert_mask",
]
