"""The fast decode path (src/modeling_visualglm/decode_graphs.py) gives generate()'s own tokens.

On the CPU the path runs its static cache and static input buffers without the CUDA graph itself (capture and
replay need a GPU; benchmarks/ measures them there, docs/performance.md). The reference is the plain
``generate()`` with transformers' dynamic cache (``fast_decode="off"``), on the shipped tiny trained models in
fp32: greedy and seeded-sampling tokens must be equal and the per-step logits equal to float rounding, for one
prompt and for a ragged, left-padded batch of two. The compiled mode runs ``torch.compile(fullgraph=True)`` on
the decode step, which also proves the step has no graph break (no host sync, no data-dependent shape).
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from modeling_visualglm.decode_graphs import CACHE_BUCKET, resolve_mode
from modeling_visualglm.tools import shapes
from modeling_visualglm.tools.tiny_models import TRAINED_FAMILIES, load_trained

QUESTIONS = ["What colour is the shape?", "Describe the picture."]


@pytest.fixture(scope="module", params=TRAINED_FAMILIES)
def trained(request):
    model, tokenizer = load_trained(request.param)
    return request.param, model.eval(), tokenizer


def _pictures(n):
    return [shapes.render(shapes.Scene(i % 6, i % 3, (4 * i) % 9, (1 << 29) + 101 * i)) for i in range(n)]


def _batch(model, tokenizer, n):
    """A ragged batch of ``n`` chat prompts with pictures, left-padded as generate() expects."""
    rows, pixels, kwargs = [], [], {}
    for i, image in enumerate(_pictures(n)):
        ids, pv, kwargs = model._chat_inputs(tokenizer, image, QUESTIONS[i % 2] + " Be brief." * i, [], {})
        rows.append(ids[0].tolist())
        pixels.append(pv)
    width = max(map(len, rows))
    pad = kwargs["pad_token_id"]
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    kwargs = {k: v for k, v in kwargs.items() if k in ("eos_token_id", "pad_token_id", "logits_processor")}
    return dict(input_ids=input_ids, attention_mask=mask, pixel_values=torch.cat(pixels), **kwargs)


def _generate(model, inputs, mode, **extra):
    out = model.generate(**inputs, max_new_tokens=10, min_new_tokens=10, output_logits=True,
                         return_dict_in_generate=True, fast_decode=mode, **extra)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_tokens_and_logits_equal_plain_generate(trained, batch):
    family, model, tokenizer = trained
    inputs = _batch(model, tokenizer, batch)
    ref_tokens, ref_logits = _generate(model, inputs, "off", do_sample=False)
    tokens, logits = _generate(model, inputs, "graphs", do_sample=False)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    graph = model._fast_decoder.current
    assert graph.captures == 1  # one decode-step signature per call: every later step reused the buffers
    assert graph.key == (batch, CACHE_BUCKET, "graphs")


def test_seeded_sampling_equals_plain_generate(trained):
    family, model, tokenizer = trained
    inputs = _batch(model, tokenizer, 2)
    sampling = dict(do_sample=True, temperature=0.9, top_p=0.8, top_k=20, repetition_penalty=1.2)
    runs = {}
    for mode in ("off", "graphs"):
        torch.manual_seed(1234)
        runs[mode] = _generate(model, inputs, mode, **sampling)[0]
    assert torch.equal(runs["graphs"], runs["off"])


def test_chat_and_stream_chat_answer_the_same_through_the_fast_path(trained):
    family, model, tokenizer = trained
    image = _pictures(1)[0]
    plain, _ = model.chat(tokenizer, image, QUESTIONS[0], do_sample=False, fast_decode="off")
    fast, _ = model.chat(tokenizer, image, QUESTIONS[0], do_sample=False, fast_decode="graphs")
    streamed = [r for r, _ in model.stream_chat(tokenizer, image, QUESTIONS[0], do_sample=False,
                                                fast_decode="graphs")]
    assert fast == plain and streamed[-1] == plain and len(streamed) > 1


def test_the_cache_and_its_step_are_reused_across_calls(trained):
    family, model, tokenizer = trained
    model.release_fast_decode()
    inputs = _batch(model, tokenizer, 1)
    first = _generate(model, inputs, "graphs", do_sample=False)[0]
    graph = model._fast_decoder.current
    second = _generate(model, inputs, "graphs", do_sample=False)[0]
    assert model._fast_decoder.current is graph and graph.captures == 1  # reset, not rebuilt or recaptured
    assert torch.equal(first, second)
    _generate(model, _batch(model, tokenizer, 2), "graphs", do_sample=False)  # another batch size: a new cache
    assert model._fast_decoder.current is not graph
    model.release_fast_decode()
    assert model._fast_decoder.current is None


def test_plain_loop_where_the_fast_path_does_not_apply(trained):
    family, model, tokenizer = trained
    model.release_fast_decode()
    inputs = _batch(model, tokenizer, 1)
    ref = _generate(model, inputs, "off", do_sample=False)[0]
    beams = model.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False, fast_decode="graphs")
    assert model._fast_decoder is None or model._fast_decoder.current is None  # beam search: the plain loop
    assert beams.shape[0] == 1
    assert torch.equal(_generate(model, inputs, None, do_sample=False)[0], ref)  # "auto" is off on the CPU
    assert model._fast_decoder is None or model._fast_decoder.current is None


class _Collect(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.reshape(-1, 1) if value.ndim == 1 else value.reshape(value.shape[0], -1))

    def end(self):
        self.ended = True


class _StopAt(StoppingCriteria):
    """Stops every row once the sequence is ``length`` long (a device tensor, as transformers' criteria give)."""

    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, device=input_ids.device)


def _counting_forwards(model):
    calls = []
    return calls, model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)


@pytest.mark.parametrize("batch", [1, 3])
def test_answers_that_end_early_equal_plain_generate(trained, batch):
    """Rows end on EOS at different steps (the stop check read one step late, decode_graphs.decode_loop): the
    same sequences, scores and logits as the plain loop, and exactly one decode step more, which is undone."""
    family, model, tokenizer = trained
    inputs = _batch(model, tokenizer, batch)
    runs = {}
    for mode in ("off", "graphs"):
        calls, hook = _counting_forwards(model)
        try:
            out = model.generate(**inputs, max_new_tokens=40, do_sample=False, output_scores=True,
                                 output_logits=True, return_dict_in_generate=True, fast_decode=mode)
        finally:
            hook.remove()
        runs[mode] = out, len(calls)
    (ref, ref_calls), (out, calls) = runs["off"], runs["graphs"]
    assert ref.sequences.shape[1] - inputs["input_ids"].shape[1] < 40  # every row ended on EOS
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == len(ref.scores) == len(out.logits)
    torch.testing.assert_close(torch.stack(out.scores, 1), torch.stack(ref.scores, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(ref.logits, 1), rtol=1e-5, atol=1e-5)
    steps = ref.sequences.shape[1] - inputs["input_ids"].shape[1]
    assert ref_calls == steps  # the prefill and one forward per later token
    assert calls == steps + (steps > 1)  # ... and the one step launched before the stop was read (none after
    # the first token: it is checked at once)


def test_streamed_tokens_equal_plain_generate(trained):
    family, model, tokenizer = trained
    inputs = _batch(model, tokenizer, 1)
    streams = {}
    for mode in ("off", "graphs"):
        streams[mode] = _Collect()
        out = model.generate(**inputs, max_new_tokens=40, do_sample=False, streamer=streams[mode], fast_decode=mode)
    assert streams["graphs"].ended
    assert len(streams["graphs"].chunks) == len(streams["off"].chunks) > 2  # the prompt, then one per token
    assert torch.equal(torch.cat(streams["graphs"].chunks, 1), torch.cat(streams["off"].chunks, 1))
    assert torch.equal(torch.cat(streams["graphs"].chunks, 1), out)


@pytest.mark.parametrize("stop", ["max_new_tokens", "criterion"])
def test_length_and_custom_stops_equal_plain_generate(trained, stop):
    """max_new_tokens is known on the host: no step beyond it. A caller's stopping criterion is read one step late
    like EOS, and the extra step undone."""
    family, model, tokenizer = trained
    inputs = _batch(model, tokenizer, 2)
    length = inputs["input_ids"].shape[1] + 3
    options = (dict(max_new_tokens=3) if stop == "max_new_tokens"
               else dict(max_new_tokens=40, stopping_criteria=StoppingCriteriaList([_StopAt(length)])))
    runs = {}
    for mode in ("off", "graphs"):
        calls, hook = _counting_forwards(model)
        try:
            runs[mode] = model.generate(**inputs, do_sample=False, fast_decode=mode, **options), len(calls)
        finally:
            hook.remove()
    (ref, ref_calls), (out, calls) = runs["off"], runs["graphs"]
    assert ref.shape[1] == length and torch.equal(out, ref)
    assert calls == ref_calls + (stop == "criterion")


def test_modes_are_checked():
    assert resolve_mode(None, torch.device("cuda")) == "graphs"
    assert resolve_mode("auto", torch.device("cpu")) == "off"
    with pytest.raises(ValueError, match="fast_decode must be one of"):
        resolve_mode("fast", torch.device("cpu"))


# inductor itself calls the deprecated torch.jit.script_method while compiling (torch 2.13)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_step_equals_plain_generate(trained):
    family, model, tokenizer = trained
    inputs = _batch(model, tokenizer, 2)
    ref_tokens, ref_logits = _generate(model, inputs, "off", do_sample=False)
    tokens, logits = _generate(model, inputs, "compile", do_sample=False)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    model.release_fast_decode()
