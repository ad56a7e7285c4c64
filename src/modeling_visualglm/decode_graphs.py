"""Fast decoding: ``generate``'s decode steps replayed from one CUDA graph over a static cache.

At batch 1 a decode step of a 6–19B model launches ~1,000 small kernels; launched one by one from Python they
leave the GPU idle most of the step (8% of the weight-bandwidth floor with the dynamic cache, see
docs/performance.md). Here the whole step (embedding, every layer, the LM head) is recorded once into a
``torch.cuda.CUDAGraph`` and replayed: one launch per step.

How it fits into ``generate`` (``MultimodalForConditionalGeneration.generate`` decides, see ``plan``):

1. ``generate`` gets a transformers ``StaticCache`` sized to prompt + ``max_new_tokens``, rounded up to
   ``CACHE_BUCKET`` so that later calls of similar length reuse it (and its graph). transformers 5.x counts a static
   cache's length in a device tensor that ``update`` bumps in place, so a replayed step writes its key/value at the
   right position without Python knowing it.
2. The prefill (the images are encoded there) is replayed from its own graph, the prompt padded to a length bucket
   (``prefill_graphs.py``); large, compute-bound prefills run eagerly.
3. The first decode step warms the step up on a side stream, puts the cache length back, and captures it. Each step
   then copies its inputs (ids, positions, the static-shape mask, ...) into the graph's buffers and replays it.
   The inputs' names, shapes and dtypes and the other arguments form the graph's signature; a step with a different
   signature is captured anew.

4. The loop around the steps (``decode_loop``, in place of transformers' ``_sample``) is transformers' greedy/sampling
   loop with its own logits processors, stopping criteria and streamers, except that the host reads "have all rows
   finished?" one step late (``_DeferredStop``), so it never waits for the GPU between two replays.

So the tokens are those of ``generate`` with a static cache (equal to the dynamic cache's in fp32; see
tests/test_fast_decode.py).

Modes (``model.fast_decode`` or ``generate(..., fast_decode=...)``):

- ``"auto"`` (default): ``"graphs"`` on CUDA, off elsewhere.
- ``"graphs"``: as above. On the CPU the same static-buffer machinery runs without the graph (for tests).
- ``"compile"``: the step is compiled by ``torch.compile`` (inductor, ``COMPILE_OPTIONS``) before it is captured:
  fused norms, rotary and epilogues around cuBLAS's products; a minute or more of compiling on the first call of a
  process, cached by inductor on disk for the next process.
- ``"off"``: ``generate`` unchanged.

Only one cache + graph is kept per model (its KV memory is what a static cache needs anyway); ``release()``
frees it.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch
from transformers.cache_utils import StaticCache
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .compat import CACHE_ARG, cache_kwargs, generation_cache, static_cache_counts_on_device
from .prefill_graphs import PrefillGraph
from .static_graphs import StaticGraph

MODES = ("auto", "graphs", "compile", "off")
CACHE_BUCKET = 256
# inductor for the "compile" mode: autotuned fused kernels around cuBLAS's matrix products, no cudagraph trees (the
# step is captured here). Measured on an H200 (docs/performance.md): a decode step's products are matrix-vector, and
# the Triton templates the autotuner picked for VisualGLM's layers read their weights at ~74 % of the bandwidth
# inside the step, where cuBLAS reads them at ~94 %; cuBLAS alone also compiles in a quarter to half the time.
COMPILE_OPTIONS = {"max_autotune": True, "max_autotune_gemm_backends": "ATEN", "triton.cudagraphs": False}
# generate() options under which the plain loop is kept (beam search, assisted decoding, outputs per layer)
_UNSUPPORTED = ("assistant_model", "prompt_lookup_num_tokens", "output_attentions", "output_hidden_states",
                "inputs_embeds", "custom_generate", "synced_gpus")


def resolve_mode(mode: Optional[str], device: torch.device) -> str:
    """``"graphs"`` | ``"compile"`` | ``"off"`` for a model on ``device``."""
    mode = "auto" if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"fast_decode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "graphs" if device.type == "cuda" else "off"
    return mode


def bucketed(length: int) -> int:
    return -(-length // CACHE_BUCKET) * CACHE_BUCKET


def _generation_value(name, kwargs, generation_config):
    return kwargs[name] if name in kwargs else getattr(generation_config, name, None)


def plan(model, mode: Optional[str], args: tuple, kwargs: dict) -> Optional[int]:
    """The static cache length for this ``generate`` call, or None when the plain loop runs (mode off, a cache or
    cache implementation given, beams, assisted decoding, a ``device_map`` over several devices, transformers
    4.57's static cache, ...)."""
    if resolve_mode(mode, model.device) == "off" or not static_cache_counts_on_device():
        return None
    # a caller's cache under either name (5.24+ "cache", before "past_key_values")
    if any(kwargs.get(name) for name in _UNSUPPORTED + ("cache", "past_key_values")):
        return None
    config = kwargs.get("generation_config") or model.generation_config
    if _generation_value("cache_implementation", kwargs, config) is not None:
        return None
    if (_generation_value("num_beams", kwargs, config) or 1) != 1:
        return None
    if not _one_device(model) or getattr(model, "hf_quantizer", None) is not None:
        return None
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        return None
    max_new = _generation_value("max_new_tokens", kwargs, config)
    total = input_ids.shape[1] + max_new if max_new is not None else _generation_value("max_length", kwargs, config)
    return bucketed(max(int(total), input_ids.shape[1] + 1))


def _one_device(model) -> bool:
    """Does the model live on one device? A ``device_map`` over several devices says so in ``hf_device_map``;
    otherwise the first parameter and the LM head tell (walking all ~1,000 parameters costs ~1 ms a call)."""
    device_map = getattr(model, "hf_device_map", None) or {}
    if len({str(d) for d in device_map.values()}) > 1:
        return False
    return next(model.parameters()).device == model.get_output_embeddings().weight.device


class DecodeGraph(StaticGraph):
    """One static cache and the captured decode step that writes into it."""

    def __init__(self, model, batch_size: int, max_cache_len: int, mode: str):
        super().__init__()
        self.mode = mode
        self.key = (batch_size, max_cache_len, mode)
        self.cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=max_cache_len)
        self.step_fn = None
        self.others = None  # the captured step's non-tensor arguments
        self.capturing = False
        self.prefill: Optional[PrefillGraph] = None  # the prompt's graph (prefill_graphs.py), made on first use
        self.prefilled = False  # has this session's prefill run?

    def reset(self):
        self.cache.reset()
        self.prefilled = False

    def takes(self, input_ids, cache, pixel_values) -> bool:
        """Is this forward call a decode step to replay (one new token per row, this graph's cache)?"""
        return (not self.capturing and cache is self.cache and pixel_values is None and input_ids is not None
                and input_ids.shape[1] == 1 and bool(self.cache.is_initialized))

    def step(self, model, call: dict):
        tensors = {k: v for k, v in call.items() if isinstance(v, torch.Tensor)}
        others = {k: v for k, v in call.items() if not isinstance(v, torch.Tensor)}
        signature = (tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in sorted(tensors.items())),
                     repr(sorted(others.items())))
        return self.replay(tensors, signature, lambda: self._capture(model, others), lambda: self._run(others))

    # --- capture ---------------------------------------------------------------------------------------------
    def _run(self, others):
        self.capturing = True
        try:
            return self.step_fn(**self.inputs, **others, **{CACHE_ARG: self.cache})
        finally:
            self.capturing = False

    def _lengths(self):
        return [layer.cumulative_length.clone() for layer in self.cache.layers]

    def _restore(self, lengths):
        for layer, length in zip(self.cache.layers, lengths):
            layer.cumulative_length.copy_(length)

    def _capture(self, model, others):
        self.others = others  # (benchmarks/gpu/step_profile.py reruns the step eagerly with them)
        self.step_fn = model.forward
        if self.mode == "compile":
            self.step_fn = torch.compile(model.forward, options=COMPILE_OPTIONS, fullgraph=True, dynamic=False)
        lengths = self._lengths()
        if self.inputs[next(iter(self.inputs))].is_cuda:  # the cache lengths are not bumped until a replay
            self.record(lambda: self._run(others), warmups=2, undo=lambda: self._restore(lengths))
        elif self.mode == "compile":  # compile now, so that the step's own call is not the first
            self._run(others)
            self._restore(lengths)


class FastDecoder:
    """The decode graph of one model (at most one cache + graph at a time) and the ``generate`` session."""

    def __init__(self):
        self.current: Optional[DecodeGraph] = None
        self.active: Optional[DecodeGraph] = None

    def release(self):
        self.current = self.active = None

    def graph_for(self, model, batch_size: int, max_cache_len: int, mode: str) -> DecodeGraph:
        key = (batch_size, max_cache_len, mode)
        if self.current is None or self.current.key != key:
            self.current = None  # free the old cache before allocating the new one
            self.current = DecodeGraph(model, batch_size, max_cache_len, mode)
        else:
            self.current.reset()
        return self.current

    @contextlib.contextmanager
    def session(self, model, batch_size: int, max_cache_len: int, mode: str):
        graph = self.graph_for(model, batch_size, max_cache_len, mode)
        self.active = graph
        try:
            yield graph
        finally:
            self.active = None

    def takes(self, input_ids, cache, pixel_values) -> Optional[DecodeGraph]:
        graph = self.active
        return graph if graph is not None and graph.takes(input_ids, cache, pixel_values) else None

    def prefill(self, model, call: dict):
        """The output of the session's prefill from its graph (prefill_graphs.py), or None: not this session's
        prefill, or one the graph does not take (it then runs eagerly)."""
        graph = self.active
        if graph is None or graph.prefilled or call.get("cache") is not graph.cache:
            return None
        graph.prefilled = True
        if not PrefillGraph.takes(model, call, graph.key[1]):
            return None
        if graph.prefill is None:
            graph.prefill = PrefillGraph(graph.cache)
        return graph.prefill.run(model, call, graph.key[1])


# --- the decode loop -------------------------------------------------------------------------------------------


class _DeferredStop:
    """The "all rows finished?" flag of step n, read on the host at step n+1.

    transformers' loop reads ``unfinished.max() == 0`` right after each step: the host waits for the GPU to finish
    the step before it prepares and launches the next one, and the GPU idles for that host work, every token.
    Here each step's flag (and, for a streamer, its tokens) is copied to pinned host memory without blocking and
    read one step later, while the next step runs. When a flag says stop, the step taken since is undone.
    """

    def __init__(self, streaming: bool):
        self.streaming = streaming  # copy each step's tokens too (a streamer gets them one step late)
        self.slots = None  # made at the first push: a one-token generate never needs them
        self.index = 0
        self.pending = None

    def push(self, unfinished: torch.Tensor, tokens: torch.Tensor):
        """Queue this step's flag (and tokens, when streaming); return the previous step's (stop, tokens or None),
        or None at the first."""
        if self.slots is None:
            cuda = tokens.is_cuda
            self.slots = [(torch.zeros((), dtype=torch.bool, pin_memory=cuda),
                           torch.zeros(tokens.shape[0], dtype=torch.long, pin_memory=cuda),
                           torch.cuda.Event() if cuda else None) for _ in range(2)]
        flag, host_tokens, event = slot = self.slots[self.index]
        self.index ^= 1
        flag.copy_(unfinished.max() == 0, non_blocking=True)
        if self.streaming:
            host_tokens.copy_(tokens, non_blocking=True)
        if event is not None:
            event.record()
        previous, self.pending = self.pending, slot
        if previous is None:
            return None
        if previous[2] is not None:
            previous[2].synchronize()  # the previous step only: this one is queued behind it
        return bool(previous[0]), previous[1].clone() if self.streaming else None

    def last_tokens(self) -> torch.Tensor:
        if self.pending[2] is not None:
            self.pending[2].synchronize()
        return self.pending[1].clone()


def _applied_once(processors):
    """``processors`` (a ``LogitsProcessorList``) as one function of (ids, scores), their signatures read once:
    the list's own ``__call__`` reads every processor's signature at every step (about a fifth of the loop's host
    time per token). A processor that wants more than (ids, scores) keeps the list's own call and its checks."""
    plain = list(processors)
    if any(len(inspect.signature(processor.__call__).parameters) > 2 for processor in plain):
        return processors

    def apply(input_ids, scores):
        for processor in plain:
            scores = processor(input_ids, scores)
        return scores

    return apply


def can_loop(model, generation_config, synced_gpus: bool) -> bool:
    """May ``decode_loop`` replace transformers' sampling loop for this call?"""
    return (not synced_gpus and hasattr(model, "_prefill") and not generation_config.output_attentions
            and not generation_config.output_hidden_states and not getattr(generation_config, "is_assistant", False))


def decode_loop(model, input_ids, logits_processor, stopping_criteria, generation_config, streamer, model_kwargs):
    """transformers' greedy/sampling loop (``GenerationMixin._sample``) with the stop check read one step late.

    The same pieces in the same order, so the same tokens, scores and logits: the prefill (``_prefill``), then per
    step ``prepare_inputs_for_generation``, the forward (a graph replay), ``_update_model_kwargs_for_generation``,
    the logits processors, argmax or multinomial sampling, finished rows padded, the stopping criteria. Only the
    host's "are all rows finished?" is read one step late (``_DeferredStop``), so the next step is launched before
    the host waits; when a flag says stop, the step taken since is dropped from the outputs (the static cache is
    reset by the next call). A reached ``max_length`` is known on the host and stops at once. The first token is
    checked (and streamed) without delay, so an answer that ends at once takes no extra step.
    """
    config = generation_config
    pad = config._pad_token_tensor
    if pad is not None:
        pad = pad.to(input_ids.device)
    has_eos = any(hasattr(criterion, "eos_token_id") for criterion in stopping_criteria)
    keep = config.return_dict_in_generate
    scores = () if keep and config.output_scores else None
    raw_logits = () if keep and config.output_logits else None
    max_length = stopping_criteria.max_length
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    stop = _DeferredStop(streaming=streamer is not None)
    logits_processor = _applied_once(logits_processor)

    outputs = model._prefill(input_ids, config, model_kwargs)
    first = True
    while True:
        if not first:
            inputs = model.prepare_inputs_for_generation(input_ids, next_sequence_length=1, **model_kwargs)
            outputs = model(**inputs, return_dict=True)
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)
        del outputs
        next_scores = logits_processor(input_ids, logits)
        if scores is not None:
            scores += (next_scores,)
        if raw_logits is not None:
            raw_logits += (logits,)
        next_tokens = _pick(config, next_scores, unfinished if has_eos else None, pad)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        unfinished = unfinished & ~stopping_criteria(input_ids, scores)
        at_max = max_length is not None and input_ids.shape[1] >= max_length
        done, undo = _stop_now(stop, first, unfinished, next_tokens, streamer, at_max)
        first = False
        if done:
            break
    if undo:
        input_ids = input_ids[:, :-1]
        scores = scores[:-1] if scores is not None else None
        raw_logits = raw_logits[:-1] if raw_logits is not None else None
    elif stop.pending is not None and streamer is not None:
        streamer.put(stop.last_tokens())
    if streamer is not None:
        streamer.end()
    return _generate_output(input_ids, scores, raw_logits, model_kwargs) if keep else input_ids


def _pick(config, scores: torch.Tensor, unfinished: Optional[torch.Tensor], pad) -> torch.Tensor:
    """The next token per row (argmax, or a sample when ``do_sample``); rows already finished get ``pad``
    (``unfinished`` None: no EOS criterion, nothing padded)."""
    if config.do_sample:
        tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    else:
        tokens = torch.argmax(scores, dim=-1)
    return tokens if unfinished is None else tokens * unfinished + pad * (1 - unfinished)


def _stop_now(stop: _DeferredStop, first: bool, unfinished, tokens, streamer, at_max_length: bool):
    """(stop the loop?, steps to undo) after a step, streaming the tokens known on the host. The first token is
    checked and streamed at once (one sync, as the prefill's end needs anyway); later steps read the previous
    step's flag, and a stop read there makes this step one too many."""
    if first:
        if streamer is not None:
            streamer.put(tokens.cpu())
        return bool(unfinished.max() == 0) or at_max_length, 0
    previous = stop.push(unfinished, tokens)
    if previous is not None:
        stopped, host_tokens = previous
        if streamer is not None:
            streamer.put(host_tokens)
        if stopped:
            return True, 1
    return at_max_length, 0


def _generate_output(sequences, scores, logits, model_kwargs):
    """``generate``'s ``GenerateDecoderOnlyOutput``, the cache under the running release's field name."""
    return GenerateDecoderOnlyOutput(sequences=sequences, scores=scores, logits=logits,
                                     **cache_kwargs(generation_cache(model_kwargs)))
