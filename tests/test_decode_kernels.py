"""The decode step's cheaper kernels compute what the reference formulas compute.

- ``single_query_attention`` (one new token over a long cache, as matrix products) against
  ``eager_attention_forward`` (the reference: repeated key/value heads, float32 softmax), for grouped-query and
  multi-head shapes, boolean and additive masks, and what it must leave to the other kernels;
- the whole fast-decode ``generate`` with it switched on for every cache length, against the plain loop;
- ``LlamaExpertRMSNorm`` (``torch.nn.functional.rms_norm`` where the dtypes match) against CogVLM's order written
  out: normalize in float32, multiply by the weight in float32, cast — in bf16, fp16 and fp32.
"""

from __future__ import annotations

import types

import pytest
import torch

from modeling_visualglm import attention
from modeling_visualglm.attention import (apply_rotary, eager_attention_forward, fold_sign, rotate_blocks,
                                          single_query_attention)
from modeling_visualglm.llama import LlamaExpertRMSNorm


def _module(impl="sdpa", training=False):
    return types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation=impl), training=training,
                                 num_key_value_groups=1)


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_single_query_attention_equals_the_reference(heads, kv_heads, mask_kind):
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads)
    b, hd, keys = 3, 16, 1200
    query = torch.randn(b, heads, 1, hd, generator=gen)
    key, value = (torch.randn(b, kv_heads, keys, hd, generator=gen) for _ in range(2))
    allowed = torch.rand(b, 1, 1, keys, generator=gen) < 0.7
    allowed[..., 0] = True
    mask = {"bool": allowed, "float": torch.where(allowed, 0.0, -1e9), "none": None}[mask_kind]
    out = single_query_attention(_module(), query, key, value, mask, scaling=0.3)
    module = types.SimpleNamespace(training=False)
    ref, _ = eager_attention_forward(module, query, key, value, mask, scaling=0.3)  # (B, 1, nh, hd)
    assert out.shape == ref.shape == (b, 1, heads, hd)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_single_query_attention_leaves_the_rest_to_the_kernels():
    query, key = torch.randn(1, 4, 1, 8), torch.randn(1, 4, 2048, 8)
    assert single_query_attention(_module(), query, key, key, None, 1.0) is not None
    assert single_query_attention(_module(), query, key[:, :, :1000], key[:, :, :1000], None, 1.0) is None  # short
    assert single_query_attention(_module(training=True), query, key, key, None, 1.0) is None
    assert single_query_attention(_module("eager"), query, key, key, None, 1.0) is None  # the reference stays
    two = torch.randn(1, 4, 2, 8)
    assert single_query_attention(_module(), two, key, key, None, 1.0) is None  # a prefill
    per_head = torch.ones(1, 4, 1, 2048, dtype=torch.bool)
    assert single_query_attention(_module(), query, key, key, per_head, 1.0) is None


def test_generate_with_it_on_every_step_equals_the_plain_loop(monkeypatch):
    from modeling_visualglm.tools.tiny_models import TRAINED_FAMILIES, load_trained
    from test_prefill_graphs import _generate, _inputs

    monkeypatch.setattr(attention, "SINGLE_QUERY_MATMUL_KEYS", 1)
    calls = []
    original = attention.single_query_attention

    def counted(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(attention, "single_query_attention", counted)
    import modeling_visualglm.llama as llama
    monkeypatch.setattr(llama, "single_query_attention", counted)
    for family in TRAINED_FAMILIES:
        model, tokenizer = load_trained(family)
        inputs = _inputs(model.eval(), tokenizer, "What colour is the shape?")
        ref_tokens, ref_logits = _generate(model, inputs, "off")
        calls.clear()
        tokens, logits = _generate(model, inputs, "graphs")
        assert any(calls), family  # the decode steps went through it
        assert torch.equal(tokens, ref_tokens), family
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_keeps_cogvlm_order(dtype):
    gen = torch.Generator().manual_seed(7)
    norm = LlamaExpertRMSNorm(256, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(256, generator=gen))
    norm = norm.to(dtype)
    x = (3 * torch.randn(2, 5, 256, generator=gen)).to(dtype)
    h = x.float()
    expected = (norm.weight.float() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5))).to(dtype)
    assert torch.equal(norm(x), expected)
    # transformers' order (cast, then multiply) differs in half precision: the test can tell them apart
    hf = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    assert dtype == torch.float32 or not torch.equal(hf, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("blocks", [1, 2])
def test_rotate_blocks_gives_apply_rotary_bit_for_bit(dtype, blocks):
    """LLaMA's rotary (1 block) and ChatGLM's 2D rotary (2 blocks: each half of a head rotates with its half of
    the tables), written the reference way: chunk, negate, cat."""
    gen = torch.Generator().manual_seed(blocks)
    x = torch.randn(2, 5, 3, 32, generator=gen).to(dtype).transpose(1, 2)  # (B, nh, T, hd), strided like q/k
    angles = [torch.rand(2, 1, 5, 32 // (2 * blocks), generator=gen) * 50 for _ in range(blocks)]
    tables = torch.cat([torch.cat((a, a), -1) for a in angles], -1)  # each block: NeoX's (freqs, freqs)
    cos, sin = tables.cos().to(dtype), tables.sin().to(dtype)
    width = 32 // blocks
    expected = torch.cat([apply_rotary(x[..., i * width:(i + 1) * width], cos[..., i * width:(i + 1) * width],
                                       sin[..., i * width:(i + 1) * width]) for i in range(blocks)], dim=-1)
    assert torch.equal(rotate_blocks(x, cos, fold_sign(sin, blocks), blocks), expected)
