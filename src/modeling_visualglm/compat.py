"""Version shims: every place where the supported transformers releases differ, and nothing else.

Supported: transformers 4.57.x (the last 4.x) and every 5.x from 5.17 to the newest. The runtime follows the
newest release's conventions; each shim below names the release it exists for, so it can be deleted when the
floor moves past that release. Detection is by feature (a signature, an attribute), not by version number, so
a backport or a dev build takes the right branch.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import field, make_dataclass
from typing import Optional

import torch
from transformers import masking_utils
from transformers.cache_utils import Cache
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as _ALL_ATTENTION_FUNCTIONS

# --- attention dispatch ----------------------------------------------------------------------------------------
class _AttentionFunctions:
    """transformers 4.57.x's registry has no ``get_interface``: the same lookup, eager for "eager"."""

    def get_interface(self, attn_implementation, default):
        if attn_implementation in (None, "eager"):
            return default
        return _ALL_ATTENTION_FUNCTIONS[attn_implementation]


# attention.py calls `ALL_ATTENTION_FUNCTIONS.get_interface(...)` literally (`DispatchedAttention.attend`): transformers
# 5.x lets `set_attn_implementation` switch a model whose module defines an `*Attention*(nn.Module)` class only when
# that source contains the call; the blocks' attention classes subclass `DispatchedAttention` instead.
ALL_ATTENTION_FUNCTIONS = (
    _ALL_ATTENTION_FUNCTIONS if hasattr(_ALL_ATTENTION_FUNCTIONS, "get_interface") else _AttentionFunctions()
)


# --- the cache's name ------------------------------------------------------------------------------------------
# transformers 5.24 renamed `past_key_values` to `cache` everywhere: forward arguments, model outputs, the masking
# utilities and generate()'s model kwargs (the old name still works there, with a FutureWarning). 4.57.x-5.23 pass
# and read `past_key_values`. Our forward methods take `cache` and accept `past_key_values` as an alias, so both
# generate() loops (and callers of either era) work; outputs carry the cache under the name the running release
# reads.
_MASK_PARAMS = inspect.signature(masking_utils.create_causal_mask).parameters
CACHE_ARG = "cache" if "cache" in _MASK_PARAMS else "past_key_values"


def pick_cache(cache, past_key_values):
    """The cache given under either name (``cache`` is the 5.24+ name, ``past_key_values`` the older one)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache once: `cache` and `past_key_values` name the same argument")
    return cache if cache is not None else past_key_values


def cache_kwargs(cache) -> dict:
    """``{name: cache}`` with the name the running transformers uses for outputs and its own functions."""
    return {CACHE_ARG: cache}


def output_cache(outputs):
    """The cache of a transformers ``ModelOutput`` (read without the 5.24+ deprecation warning)."""
    return getattr(outputs, CACHE_ARG, None)


def generation_cache(model_kwargs: dict):
    """The cache in generate()'s ``model_kwargs`` (5.24+: ``cache``; before: ``past_key_values``)."""
    return model_kwargs.get(CACHE_ARG)


def _multimodal_output_fields():
    tensor = Optional[torch.FloatTensor]
    return [
        ("loss", tensor, field(default=None)),
        ("logits", tensor, field(default=None)),
        (CACHE_ARG, Optional[object], field(default=None)),
        ("hidden_states", Optional[tuple], field(default=None)),
        ("image_hidden_states", tensor, field(default=None)),
    ]


# The families' output: a dataclass whose cache field has the running release's name (5.24+ `cache`, else
# `past_key_values`), because generate() looks the cache up by that name in the output.
MultimodalCausalLMOutputWithPast = make_dataclass(
    "MultimodalCausalLMOutputWithPast",
    _multimodal_output_fields(),
    bases=(ModelOutput,),
    namespace={
        "__doc__": "``logits`` (B, T, V); the cache; ``image_hidden_states`` (N_images, num_image_tokens, H_text) "
        "when images were encoded; ``loss`` when labels were given.",
        "__module__": __name__,
    },
)


# --- cache positions -------------------------------------------------------------------------------------------
# transformers 4.57.x caches locate writes and mask sizes by `cache_position` tensors (a static cache writes at
# `cache_kwargs["cache_position"]`, else at 0..T-1); 5.x caches track their own length.
_LEGACY_CACHE_POSITIONS = "cache_position" in inspect.signature(Cache.get_mask_sizes).parameters


def cache_update_kwargs(cache, query_length: int, device) -> dict:
    """Keyword arguments for ``cache.update(k, v, layer_idx, **kwargs)`` in this forward: none on 5.x; on 4.57.x
    the write positions ``past + arange(T)`` (device ops only: a static cache's length is a tensor there)."""
    if cache is None or not _LEGACY_CACHE_POSITIONS:
        return {}
    past = cache.get_seq_length()
    return {"cache_kwargs": {"cache_position": torch.arange(query_length, device=device) + past}}


def static_cache_counts_on_device() -> bool:
    """5.x: a ``StaticLayer`` counts its length in a device tensor that ``update`` bumps in place, so a replayed CUDA
    graph writes at the right position (decode_graphs.py); 4.57.x locates writes by ``cache_position`` arguments."""
    return not _LEGACY_CACHE_POSITIONS


def kv_length(cache, query_length: int) -> int:
    """How many key positions attention sees after adding ``query_length`` tokens (a static cache: its size)."""
    if _LEGACY_CACHE_POSITIONS:  # transformers 4.57.x: get_mask_sizes(cache_position, layer_idx)
        return cache.get_mask_sizes(torch.arange(query_length), 0)[0]
    return cache.get_mask_sizes(query_length, 0)[0]


# --- masks -----------------------------------------------------------------------------------------------------
# 4.57.x: create_causal_mask(config, input_embeds, attention_mask, cache_position, past_key_values, ...) with no
# allow_is_causal_skip; 5.x: (config, inputs_embeds, attention_mask, <cache name>, ..., allow_is_causal_skip).
_MASK_457 = "cache_position" in _MASK_PARAMS


def causal_mask(config, inputs_embeds: torch.Tensor, attention_mask, cache, allow_is_causal_skip: bool = True):
    """transformers' causal + padding mask for ``config._attn_implementation`` (or None when the kernel's own
    causal flag suffices). Position ids are never passed: CogVLM repeats positions, which the packed-sequence
    detection would misread."""
    if _MASK_457:  # transformers 4.57.x
        past = cache.get_seq_length() if cache is not None else 0
        cache_position = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past
        return masking_utils.create_causal_mask(
            config=config, input_embeds=inputs_embeds, attention_mask=attention_mask,
            cache_position=cache_position, past_key_values=cache, position_ids=None,
        )
    return masking_utils.create_causal_mask(
        config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=None,
        allow_is_causal_skip=allow_is_causal_skip, **cache_kwargs(cache),
    )


def bidirectional_mask(config, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, encoder_hidden_states):
    """A (B, Tk) key padding mask in the form the attention implementation wants (cross-attention)."""
    create = getattr(masking_utils, "create_bidirectional_mask", None)
    if create is None:  # transformers 4.57.x has no create_bidirectional_mask: a boolean (B, 1, 1, Tk) mask
        return attention_mask.bool()[:, None, None, :]
    return create(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                  encoder_hidden_states=encoder_hidden_states)


# --- weight init -----------------------------------------------------------------------------------------------
try:  # transformers 5.x: init helpers that respect already-loaded weights
    from transformers import initialization as init

    TRANSFORMERS_4 = False
except ImportError:  # transformers 4.57.x: plain in-place copies (its loading never re-initializes loaded weights)
    TRANSFORMERS_4 = True

    class init:  # noqa: N801 - stands in for the module
        @staticmethod
        @torch.no_grad()
        def copy_(tensor: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
            return tensor.copy_(other)

        @staticmethod
        @torch.no_grad()
        def normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
            return tensor.normal_(mean, std)

        @staticmethod
        @torch.no_grad()
        def zeros_(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.zero_()

        @staticmethod
        @torch.no_grad()
        def ones_(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.fill_(1.0)

        @staticmethod
        @torch.no_grad()
        def trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
            return torch.nn.init.trunc_normal_(tensor, mean=mean, std=std)


# --- sub-model flags -------------------------------------------------------------------------------------------
def keep_in_fp32(patterns: list[str]) -> list[str] | None:
    """A sub-model's ``_keep_in_fp32_modules``. 5.x takes regexes and gathers the sub-models' lists into the
    composite model; 4.57.x takes bare module names of the model that is loaded and rejects the regexes, so there
    the list is dropped (on 4.57 an fp16 load keeps the Q-Former in fp16 too)."""
    return None if TRANSFORMERS_4 else patterns


# --- processors and tokenizers ---------------------------------------------------------------------------------
def legacy_processor_attributes(cls):
    """Class decorator for an (image processor, tokenizer) ``ProcessorMixin``: transformers 4.57.x finds the parts
    through class attributes; 5.x reads ``__init__``'s parameters and warns that those attributes are deprecated."""
    if TRANSFORMERS_4:
        cls.attributes = ["image_processor", "tokenizer"]
        cls.image_processor_class = "AutoImageProcessor"
        cls.tokenizer_class = "AutoTokenizer"
    return cls


def set_extra_special_tokens(tokenizer, **tokens) -> None:
    """Named special tokens beyond bos/eos/unk/sep/pad/cls/mask (``gmask_token``, ``image_token``, ...): 5.x keeps
    any ``*_token`` given to ``__init__`` as an attribute; transformers 4.57.x keeps only its fixed names."""
    if TRANSFORMERS_4:
        for name, value in tokens.items():
            setattr(tokenizer, name, value)


def llama_tokenizer_class():
    """The tokenizers-backed Llama tokenizer: ``LlamaTokenizer`` in 5.x; in transformers 4.57.x that name is the slow
    SentencePiece class, which cannot load a ``tokenizer.json``-only folder, and the fast one is ``LlamaTokenizerFast``."""
    import transformers

    return transformers.LlamaTokenizerFast if TRANSFORMERS_4 else transformers.LlamaTokenizer


# --- repetition penalty over image placeholders ------------------------------------------------------------------
# transformers up to at least 5.17 (and 4.57.x) gathers the repetition penalty's scores at every id of the sequence,
# so an image placeholder id past the LM head's rows (CogVLM's default: the text vocab_size) fails with an index
# error; later releases drop such ids (they can never be generated). Detected by trying it once.
@functools.cache
def repetition_penalty_skips_foreign_ids() -> bool:
    try:
        RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[2]]), torch.ones(1, 2))
    except (IndexError, RuntimeError):
        return False
    return True


class _PlaceholderSafeRepetitionPenalty(RepetitionPenaltyLogitsProcessor):
    """The same penalty; ids past the scores' last row go to one extra column, dropped afterwards."""

    def __call__(self, input_ids, scores):
        vocab = scores.shape[-1]
        extended = torch.cat([scores, scores.new_zeros(scores.shape[0], 1)], dim=-1)
        return super().__call__(input_ids.clamp(max=vocab), extended)[:, :vocab]


def placeholder_safe_processors(processors):
    """``processors`` (a ``LogitsProcessorList``) with transformers' repetition penalty made safe for placeholder
    ids past the LM head where the running release is not."""
    if repetition_penalty_skips_foreign_ids():
        return processors
    for i, processor in enumerate(processors):
        if type(processor) is RepetitionPenaltyLogitsProcessor:
            safe = _PlaceholderSafeRepetitionPenalty.__new__(_PlaceholderSafeRepetitionPenalty)
            safe.__dict__.update(processor.__dict__)
            processors[i] = safe
    return processors
