"""The prefill of a fast-decode ``generate`` replayed from a CUDA graph, per prompt-length bucket.

An image prompt's prefill runs the vision tower, the adapter and the language model once: for VisualGLM-6B and
MiniGPT-4 (one 224 px image, ~60 prompt tokens) that is ~2,000 small kernels whose launches, not their work,
set the time to the first token (launch-bound: 9–24× the weight-read floor on an H200, docs/performance.md).
Here the whole prefill (image features, embeddings, every layer, the last position's logits) is recorded once per
shape into a ``torch.cuda.CUDAGraph`` and replayed.

Shapes are made static by padding the prompt on the right to a multiple of ``PREFILL_BUCKET`` tokens (at most the
static cache's length and the language model's positions):

- the padding repeats the row's last token and its position ids (a text token: a prompt whose last column holds
  an image placeholder runs eagerly), so it comes after every real token: under the causal mask no real token
  attends to it, and ChatGLM's bidirectional prefix never includes it (it has the block position of ``<sop>``);
- its key/value land in the static cache behind the prompt; the graph then sets the cache's lengths back to the
  real prompt length, so the first decode step overwrites them, and the 2-D padding mask (0 past the prompt, see
  ``create_masks_for_generate``) hides them until then;
- the logits are those of the last real position (``logits_to_keep`` as an index tensor).

So a padded prefill computes what the plain prefill computes, on the same cache (tests/test_fast_decode.py
compares tokens and logits with ``fast_decode="off"``). The family's checks and routing (one host sync) run
before the graph, outside it, on the padded inputs. Large prefills (over ``PREFILL_GRAPH_TOKENS`` prompt tokens ×
rows or ``PREFILL_GRAPH_PIXELS`` image pixels) are compute-bound: they keep the eager path, whose activations are
freed after it, where a graph would keep its memory pool. One prefill graph is kept per decode graph (the last
signature); a new prompt bucket, image count or batch captures anew (one eager warm-up, then the capture).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .static_graphs import StaticGraph

PREFILL_BUCKET = 64
PREFILL_GRAPH_TOKENS = 4096
PREFILL_GRAPH_PIXELS = 4096 * 14 * 14
# the prefill call's own arguments (generate passes exactly these); anything else keeps the eager prefill
_TAKEN = {"input_ids", "pixel_values", "attention_mask", "position_ids", "logits_to_keep", "use_cache",
          "return_dict", "cache", "past_key_values"}


def padded_length(length: int, max_cache_len: int, max_positions: int) -> int:
    """The prompt's bucket: ``length`` rounded up to ``PREFILL_BUCKET``, within the cache and the positions."""
    return max(length, min(-(-length // PREFILL_BUCKET) * PREFILL_BUCKET, max_cache_len, max_positions))


def pad_right(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """``tensor`` (..., T) → (..., ``length``), the last column repeated."""
    extra = length - tensor.shape[-1]
    if extra == 0:
        return tensor
    return torch.cat([tensor, tensor[..., -1:].expand(*tensor.shape[:-1], extra)], dim=-1)


def _split(values: dict):
    """A flat dict of tensors and a hashable description of everything else (dataclasses such as CogVLM's
    ``ExpertRouting`` are opened one level)."""
    tensors, static = {}, []
    for name, value in sorted(values.items()):
        if isinstance(value, torch.Tensor):
            tensors[name] = value
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
            static.append((name, type(value).__qualname__,
                           repr(sorted((k, v) for k, v in fields.items() if not isinstance(v, torch.Tensor)))))
            tensors.update({f"{name}.{k}": v for k, v in fields.items() if isinstance(v, torch.Tensor)})
        else:
            static.append((name, repr(value)))
    return tensors, tuple(static)


def _join(values: dict, tensors: dict) -> dict:
    """``values`` with their tensors replaced by ``tensors`` (``_split``'s names)."""
    out = {}
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            out[name] = tensors[name]
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            prefix = name + "."
            out[name] = dataclasses.replace(
                value, **{k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        else:
            out[name] = value
    return out


class PrefillGraph(StaticGraph):
    """The captured prefill of one static cache (the last signature seen)."""

    def __init__(self, cache):
        super().__init__()
        self.cache = cache
        self.static = None  # the family's language-model inputs: their non-tensor values (the signature's)
        self.last_padded_length = None

    @staticmethod
    def takes(model, call: dict, max_cache_len: int) -> bool:
        """Is this forward call a prefill the graph can run (generate's own arguments, position ids, no padding
        mask or a 2-D one as wide as the cache, the last real position's logits only, small enough to be
        launch-bound)?"""
        input_ids, mask = call.get("input_ids"), call.get("attention_mask")
        pixels = call.get("pixel_values")
        if (set(k for k, v in call.items() if v is not None) - _TAKEN or call.get("logits_to_keep") != 1
                or call.get("use_cache") is False or call.get("position_ids") is None):
            return False
        if input_ids is None or input_ids.ndim != 2 or input_ids.shape[1] < 2:
            return False
        if mask is not None and (mask.ndim != 2 or mask.shape[1] != max_cache_len):
            return False
        if input_ids.numel() > PREFILL_GRAPH_TOKENS:
            return False
        return pixels is None or pixels[:, 0].numel() <= PREFILL_GRAPH_PIXELS

    def run(self, model, call: dict, max_cache_len: int):
        """The prefill's output (logits of the last position, the cache filled with the prompt)."""
        input_ids = call["input_ids"]
        if bool((input_ids[:, -1] == model.config.image_token_id).any()):  # padding must be a text token
            return None
        length = input_ids.shape[1]
        padded = padded_length(length, max_cache_len, model.config.text_config.max_position_embeddings)
        ids = pad_right(input_ids, padded)
        image_mask = ids == model.config.image_token_id
        pixel_values, mask = call.get("pixel_values"), call.get("attention_mask")
        lm_inputs = model._language_model_inputs(ids, image_mask, pixel_values, mask,
                                                 pad_right(call["position_ids"], padded), self.cache, {})
        lm_tensors, lm_static = _split(lm_inputs)
        optional = {"pixel_values": pixel_values, "attention_mask": mask}
        tensors = {"input_ids": ids, "image_mask": image_mask,
                   "index": torch.full((1,), length - 1, device=ids.device),
                   "length": torch.full((), length, device=ids.device),
                   **{k: v for k, v in optional.items() if v is not None},
                   **{"lm." + k: v for k, v in lm_tensors.items()}}
        signature = (tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in tensors.items()), lm_static)
        self.last_padded_length = padded
        return self.replay(tensors, signature, lambda: self._capture(model, lm_inputs), lambda: self._body(model))

    # --- the captured body -----------------------------------------------------------------------------------
    def _body(self, model):
        inputs = self.inputs
        for layer in self.cache.layers:  # a prefill fills the cache from its start
            if layer.is_initialized:
                layer.cumulative_length.zero_()
        lm_inputs = _join(self.static, {k[3:]: v for k, v in inputs.items() if k.startswith("lm.")})
        embeds, features = model.embed_with_images(inputs["input_ids"], inputs["image_mask"],
                                                   inputs.get("pixel_values"))
        outputs = model.language_model(inputs_embeds=embeds, attention_mask=inputs.get("attention_mask"),
                                       cache=self.cache, use_cache=True, **lm_inputs)
        result = model.lm_output(outputs, None, inputs["image_mask"], features, inputs["index"])
        for layer in self.cache.layers:  # the padding's keys/values stay behind the prompt, to be overwritten
            layer.cumulative_length.copy_(inputs["length"])
        return result

    def _capture(self, model, lm_inputs: dict):
        self.static = lm_inputs  # its tensors come from self.inputs
        if not self.inputs["input_ids"].is_cuda:
            return
        if not self.cache.is_initialized:  # allocate the cache outside the graph's pool, on this stream
            self._body(model)  # (every run starts the cache over)
        self.record(lambda: self._body(model), warmups=1)
