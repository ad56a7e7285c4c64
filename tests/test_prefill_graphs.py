"""The prefill of a fast-decode generate, padded to its bucket and replayed from a CUDA graph (prefill_graphs.py).

On the CPU the path runs its padded static buffers without the graph itself (capture and replay need a GPU:
benchmarks/gpu/fast_decode_check.py runs them there). The reference is the plain ``generate()`` with transformers'
dynamic cache (``fast_decode="off"``) on the shipped tiny trained models in fp32: the padding must change nothing
(tokens equal, logits equal to float rounding), the cache must hold the prompt's keys and length after it, and
what the graph cannot take must run eagerly.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from modeling_visualglm import prefill_graphs
from modeling_visualglm.compat import CACHE_ARG
from modeling_visualglm.prefill_graphs import PREFILL_BUCKET, padded_length, pad_right
from modeling_visualglm.tools import shapes
from modeling_visualglm.tools.tiny_models import TRAINED_FAMILIES, load_trained


@pytest.fixture(scope="module", params=TRAINED_FAMILIES)
def trained(request):
    model, tokenizer = load_trained(request.param)
    return request.param, model.eval(), tokenizer


def _inputs(model, tokenizer, question, seed=0):
    image = shapes.render(shapes.Scene(seed % 6, seed % 3, (4 * seed) % 9, (1 << 29) + 101 * seed))
    ids, pixel_values, kwargs = model._chat_inputs(tokenizer, image, question, [], {})
    keep = {k: v for k, v in kwargs.items() if k in ("eos_token_id", "pad_token_id")}
    return dict(input_ids=ids, pixel_values=pixel_values, **keep)


def _generate(model, inputs, mode, new=6):
    out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, fast_decode=mode)
    return out.sequences, torch.stack(out.logits, 1)


def test_padded_length():
    assert padded_length(38, 256, 2048) == PREFILL_BUCKET == 64
    assert padded_length(64, 256, 2048) == 64
    assert padded_length(65, 256, 2048) == 128
    assert padded_length(250, 256, 2048) == 256
    assert padded_length(230, 240, 2048) == 240  # never past the static cache
    assert padded_length(60, 256, 62) == 62  # nor past the positions
    assert padded_length(60, 256, 50) == 60  # a prompt already past them (rejected elsewhere) is not shortened
    ids = torch.tensor([[5, 6, 7], [8, 9, 3]])
    assert pad_right(ids, 5).tolist() == [[5, 6, 7, 7, 7], [8, 9, 3, 3, 3]]
    glm = torch.arange(12).view(2, 2, 3)  # ChatGLM's (B, 2, T) positions
    assert pad_right(glm, 4)[..., 3].tolist() == [[2, 5], [8, 11]]


def test_two_prompt_lengths_in_one_bucket_share_one_capture_and_equal_plain_generate(trained):
    family, model, tokenizer = trained
    model.release_fast_decode()
    long, short = (_inputs(model, tokenizer, q, seed=i) for i, q in enumerate(
        ["What colour is the shape?", "What colour?"]))
    lengths = [x["input_ids"].shape[1] for x in (long, short)]
    assert lengths[0] > lengths[1] and len({padded_length(n, 256, 10**6) for n in lengths}) == 1, lengths
    for inputs in (long, short):
        ref_tokens, ref_logits = _generate(model, inputs, "off")
        tokens, logits = _generate(model, inputs, "graphs")
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    prefill = model._fast_decoder.current.prefill
    assert prefill.captures == 1 and prefill.last_padded_length > lengths[0]  # really padded, and reused


def test_the_cache_holds_the_prompt_after_a_padded_prefill(trained):
    family, model, tokenizer = trained
    model.release_fast_decode()
    inputs = _inputs(model, tokenizer, "What colour is the shape?")
    length = inputs["input_ids"].shape[1]
    model.generate(**inputs, max_new_tokens=1, do_sample=False, fast_decode="graphs")  # the prefill alone
    graph = model._fast_decoder.current
    assert graph.prefill.last_padded_length > length
    reference = DynamicCache()
    forward = {k: v for k, v in inputs.items() if k in ("input_ids", "pixel_values")}
    with torch.no_grad():
        model(**forward, **{CACHE_ARG: reference}, use_cache=True)
    for layer, ref in zip(graph.cache.layers, reference.layers):
        assert int(layer.cumulative_length) == length
        torch.testing.assert_close(layer.keys[:, :, :length], ref.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.values[:, :, :length], ref.values, rtol=1e-5, atol=1e-5)


def test_what_the_graph_cannot_take_runs_eagerly(trained, monkeypatch):
    family, model, tokenizer = trained
    inputs = _inputs(model, tokenizer, "What colour is the shape?")
    reference = _generate(model, inputs, "off")
    # too many tokens to be launch-bound: the eager prefill, the same answer
    monkeypatch.setattr(prefill_graphs, "PREFILL_GRAPH_TOKENS", inputs["input_ids"].shape[1] - 1)
    model.release_fast_decode()
    tokens, logits = _generate(model, inputs, "graphs")
    assert model._fast_decoder.current.prefill is None
    assert torch.equal(tokens, reference[0])
    torch.testing.assert_close(logits, reference[1], rtol=1e-5, atol=1e-5)
# ChatGLM prompts end in <sop> (VisualGLM's prefill check refuses any other), never in an image
@pytest.mark.parametrize("family", [f for f in TRAINED_FAMILIES if f != "visualglm"])
def test_a_prompt_ending_in_an_image_placeholder_runs_eagerly(family):
    model, tokenizer = load_trained(family)
    model.eval()
    inputs = _inputs(model, tokenizer, "What colour is the shape?")
    ids, image = inputs["input_ids"], model.config.image_token_id
    text = ids[ids != image].view(1, -1)
    moved = dict(inputs, input_ids=torch.cat([text, ids[ids == image].view(1, -1)], dim=1))  # the image last
    model.release_fast_decode()
    expected = _generate(model, moved, "off")
    tokens, logits = _generate(model, moved, "graphs")
    assert model._fast_decoder.current.prefill.captures == 0  # it cannot be padded with its last token
    assert torch.equal(tokens, expected[0])
    torch.testing.assert_close(logits, expected[1], rtol=1e-5, atol=1e-5)
