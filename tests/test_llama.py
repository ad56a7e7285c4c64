"""LLaMA decoder with visual experts: HF Llama parity, routing vs a hand-written two-path reference,
cache, left padding, kernels, host syncs.

References: transformers' ``LlamaForCausalLM`` (experts unused or equal to the language expert) and an
independent plain-torch forward in this file that computes every layer with both experts' weights and picks
per token with ``torch.where``.
"""

import math

import pytest
import torch
from helpers import SyncCounter, enable_checkpointing, randomize_fan_in_, rel_err
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_visualglm.compat import output_cache
from modeling_visualglm.configuration_blocks import LlamaExpertConfig
from modeling_visualglm.llama import LlamaExpertModel

VOCAB = 120
TOL = 1e-4

# v1: CogVLM1 (MHA, base 10000, no qkv bias); v2: CogVLM2 scaled down (8 query heads → 2 KV heads,
# base 500000, bias on the vision qkv only)
PRESETS = {
    "v1": dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0, vision_qkv_bias=False),
    "v2": dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0, vision_qkv_bias=True),
}


def tiny_config(preset: str = "v1", **overrides) -> LlamaExpertConfig:
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    kwargs.update(PRESETS[preset])
    kwargs.update(overrides)
    return LlamaExpertConfig(**kwargs)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    return randomize_fan_in_(model, seed, is_norm=lambda name: "norm" in name, embed_key="embed", rest_scale=0.5)


def build(preset: str = "v1", seed: int = 0, **overrides) -> LlamaExpertModel:
    torch.manual_seed(seed)
    return randomize(LlamaExpertModel(tiny_config(preset, **overrides)), seed).eval()


def lm_head(model: LlamaExpertModel, seed: int = 99) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, model.config.hidden_size, generator=gen) / math.sqrt(model.config.hidden_size)


def random_ids(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=gen)


def image_mask(n: int, start: int, length: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[start : start + length] = True
    return mask


def left_pad(rows, masks=None):
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    vis = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        attn[i, width - len(r) :] = 1
        if masks is not None:
            vis[i, width - len(r) :] = masks[i]
    return ids, attn, vis


# ---------------------------------------------------------------------------------------------------
# transformers' LlamaForCausalLM on mapped weights
# ---------------------------------------------------------------------------------------------------


def to_hf_llama(model: LlamaExpertModel, head: torch.Tensor, attn_implementation: str = "eager") -> LlamaForCausalLM:
    cfg = model.config
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False, attention_bias=False,
        attn_implementation=attn_implementation,
    )
    hf = LlamaForCausalLM(hf_cfg).eval()
    q_size = cfg.num_attention_heads * cfg.head_dim
    kv_size = cfg.num_key_value_heads * cfg.head_dim
    sd = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": head}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        q, k, v = layer.self_attn.language_expert_query_key_value.weight.split([q_size, kv_size, kv_size])
        sd.update({
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": layer.self_attn.language_expert_dense.weight,
            p + "mlp.gate_proj.weight": layer.mlp.language_mlp.gate_proj.weight,
            p + "mlp.up_proj.weight": layer.mlp.language_mlp.up_proj.weight,
            p + "mlp.down_proj.weight": layer.mlp.language_mlp.down_proj.weight,
            p + "input_layernorm.weight": layer.input_layernorm.weight,
            p + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
        })
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf


@torch.no_grad()
def copy_language_to_vision(model: LlamaExpertModel) -> None:
    for layer in model.layers:
        a = layer.self_attn
        a.vision_expert_query_key_value.weight.copy_(a.language_expert_query_key_value.weight)
        if a.vision_expert_query_key_value.bias is not None:
            a.vision_expert_query_key_value.bias.zero_()  # the language qkv has none
        a.vision_expert_dense.weight.copy_(a.language_expert_dense.weight)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(layer.mlp.vision_mlp, name).weight.copy_(getattr(layer.mlp.language_mlp, name).weight)


@pytest.mark.parametrize("preset", ["v1", "v2"])
@torch.no_grad()
def test_matches_hf_llama_without_image(preset):
    model = build(preset, seed=1)
    head = lm_head(model)
    hf = to_hf_llama(model, head)
    ids = random_ids(13, seed=2)[None]
    ours = model(ids).last_hidden_state @ head.T
    ref = hf(ids).logits
    assert rel_err(ours, ref) <= TOL


@pytest.mark.parametrize("preset", ["v1", "v2"])
@torch.no_grad()
def test_equal_experts_with_image_match_hf_llama(preset):
    # routing through a vision expert that equals the language expert must not change anything
    model = build(preset, seed=3)
    copy_language_to_vision(model)
    head = lm_head(model)
    hf = to_hf_llama(model, head)
    ids = torch.stack([random_ids(12, seed=4), random_ids(12, seed=5)])
    vis = torch.stack([image_mask(12, 1, 6), image_mask(12, 3, 2)])
    ours = model(ids, vision_expert_mask=vis).last_hidden_state @ head.T
    assert rel_err(ours, hf(ids).logits) <= TOL


@torch.no_grad()
def test_experts_off_is_plain_llama():
    model = build("v2", seed=6, use_visual_experts=False)
    names = [n for n, _ in model.named_parameters()]
    assert not any("vision" in n for n in names)
    head = lm_head(model)
    hf = to_hf_llama(model, head)
    ids = random_ids(9, seed=7)[None]
    assert rel_err(model(ids).last_hidden_state @ head.T, hf(ids).logits) <= TOL
    with pytest.raises(ValueError, match="no visual experts"):
        model(ids, vision_expert_mask=torch.ones_like(ids, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------
# Routing against an explicit two-path computation
# ---------------------------------------------------------------------------------------------------


def two_path_reference(model: LlamaExpertModel, ids: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """Plain-torch forward (no padding): every sub-layer computed with both experts, picked per token."""
    cfg = model.config
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    b, t = ids.shape
    pick = vis[..., None]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    def lin(x, mod):
        return F.linear(x, mod.weight, mod.bias)

    def swiglu(x, mlp):
        return lin(F.silu(lin(x, mlp.gate_proj)) * lin(x, mlp.up_proj), mlp.down_proj)

    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq  # (T, hd/2)
    cos = torch.cat([angles.cos(), angles.cos()], -1).float()
    sin = torch.cat([angles.sin(), angles.sin()], -1).float()

    def rope(x):  # (B, h, T, hd), rotate-half pairs j with j + hd/2
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    causal = torch.ones(t, t, dtype=torch.bool).tril()
    x = model.embed_tokens.weight[ids]
    for layer in model.layers:
        a = layer.self_attn
        h = rms(x, layer.input_layernorm.weight)
        qkv = torch.where(pick, lin(h, a.vision_expert_query_key_value), lin(h, a.language_expert_query_key_value))
        q = qkv[..., : nh * hd].view(b, t, nh, hd).transpose(1, 2)
        k = qkv[..., nh * hd : (nh + nkv) * hd].view(b, t, nkv, hd).transpose(1, 2)
        v = qkv[..., (nh + nkv) * hd :].view(b, t, nkv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        # each KV head serves nh / nkv consecutive query heads
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        o = (probs @ v).transpose(1, 2).reshape(b, t, nh * hd)
        x = x + torch.where(pick, lin(o, a.vision_expert_dense), lin(o, a.language_expert_dense))
        h = rms(x, layer.post_attention_layernorm.weight)
        x = x + torch.where(pick, swiglu(h, layer.mlp.vision_mlp), swiglu(h, layer.mlp.language_mlp))
    return rms(x, model.norm.weight)


@pytest.mark.parametrize("preset", ["v1", "v2"])
@pytest.mark.parametrize("pattern", ["block", "scattered", "none"])
@torch.no_grad()
def test_routing_equals_two_path_reference(preset, pattern):
    model = build(preset, seed=8)
    ids = torch.stack([random_ids(14, seed=9), random_ids(14, seed=10)])
    if pattern == "block":  # CogVLM: bos, image block, text
        vis = torch.stack([image_mask(14, 1, 7), image_mask(14, 1, 7)])
    elif pattern == "scattered":
        gen = torch.Generator().manual_seed(11)
        vis = torch.rand(2, 14, generator=gen) < 0.5
    else:
        vis = torch.zeros(2, 14, dtype=torch.bool)
    ref = two_path_reference(model, ids, vis)
    assert rel_err(model(ids, vision_expert_mask=vis).last_hidden_state, ref) <= TOL
    if pattern != "none":
        # the experts really differ: ignoring the mask must move the output
        assert rel_err(model(ids).last_hidden_state, ref) > 1e-2


class _ExpertCalls:
    """Counts the rows each expert module sees."""

    def __init__(self, model):
        self.rows = {"language": 0, "vision": 0}
        self.handles = []
        for layer in model.layers:
            for kind in ("language", "vision"):
                mods = [getattr(layer.self_attn, f"{kind}_expert_query_key_value"),
                        getattr(layer.self_attn, f"{kind}_expert_dense"), getattr(layer.mlp, f"{kind}_mlp")]
                for mod in mods:
                    self.handles.append(mod.register_forward_hook(self._hook(kind)))

    def _hook(self, kind):
        def hook(module, args, output):
            self.rows[kind] += args[0].reshape(-1, args[0].shape[-1]).shape[0]
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def test_each_token_runs_one_expert():
    model = build("v2", seed=12)
    ids = torch.stack([random_ids(10, seed=13), random_ids(10, seed=14)])
    vis = torch.stack([image_mask(10, 1, 5), image_mask(10, 2, 3)])
    calls = _ExpertCalls(model)
    out = model(ids, vision_expert_mask=vis)
    # 3 routed modules per layer (qkv, dense, mlp); each token is seen by exactly one expert per module
    per_module = 3 * model.config.num_hidden_layers
    assert calls.rows == {"language": per_module * 12, "vision": per_module * 8}
    calls.rows = {"language": 0, "vision": 0}
    model(random_ids(2, seed=15)[:, None], cache=output_cache(out))  # a decode step (B=2)
    assert calls.rows == {"language": per_module * 2, "vision": 0}
    calls.remove()


@torch.no_grad()
def test_host_syncs():
    model = build("v2", seed=16)
    ids = random_ids(10, seed=17)[None]
    counter = SyncCounter()
    with counter:
        out = model(ids, vision_expert_mask=image_mask(10, 1, 5)[None])
    assert len(counter.syncs) == 1, counter.syncs  # the routing split size, once per prefill
    counter = SyncCounter()
    with counter:
        model(random_ids(1, seed=18)[None], cache=output_cache(out))
    assert counter.syncs == []  # decode: language expert only, static shapes
    counter = SyncCounter()
    with counter:
        model(ids)  # text-only prefill
    assert counter.syncs == []
    # left padding: transformers' all-ones shortcut on the padding mask would read it on the host every step
    ids2, attn, vis = left_pad([random_ids(10, seed=19), random_ids(6, seed=20)],
                               [image_mask(10, 1, 5), image_mask(6, 1, 3)])
    counter = SyncCounter()
    with counter:
        out = model(ids2, attention_mask=attn, vision_expert_mask=vis)
    assert len(counter.syncs) == 1, counter.syncs
    counter = SyncCounter()
    with counter:
        model(random_ids(2, seed=21)[:, None], attention_mask=torch.cat([attn, torch.ones(2, 1, dtype=torch.long)], 1),
              cache=output_cache(out))
    assert counter.syncs == []


# ---------------------------------------------------------------------------------------------------
# Cache, left padding, kernels
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["v1", "v2"])
@torch.no_grad()
def test_cached_decode_equals_full_forward(preset):
    model = build(preset, seed=20)
    n_prompt, n_new = 10, 5
    ids = random_ids(n_prompt + n_new, seed=21)[None]
    vis = image_mask(n_prompt + n_new, 1, 6)[None]  # decode tokens are language
    full = model(ids, vision_expert_mask=vis).last_hidden_state

    out = model(ids[:, :n_prompt], vision_expert_mask=vis[:, :n_prompt])
    steps = [out.last_hidden_state]
    cache = output_cache(out)
    for i in range(n_prompt, n_prompt + n_new):
        out = model(ids[:, i : i + 1], cache=cache)
        steps.append(out.last_hidden_state)
    assert rel_err(torch.cat(steps, 1), full) <= TOL


@pytest.mark.parametrize("preset", ["v1", "v2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@torch.no_grad()
def test_left_padded_batch_equals_singles(preset, attn):
    model = build(preset, seed=22)
    model.set_attn_implementation(attn)
    lengths, starts = [9, 5, 12], [1, 1, 3]
    rows = [random_ids(n, seed=23 + i) for i, n in enumerate(lengths)]
    masks = [image_mask(n, s, 3) for n, s in zip(lengths, starts)]
    ids, attn_mask, vis = left_pad(rows, masks)
    out = model(ids, attention_mask=attn_mask, vision_expert_mask=vis)
    nxt = random_ids(3, seed=30)[:, None]
    step = model(nxt, attention_mask=torch.cat([attn_mask, torch.ones(3, 1, dtype=torch.long)], 1),
                 cache=output_cache(out)).last_hidden_state
    assert torch.isfinite(out.last_hidden_state).all()
    for i, (r, m) in enumerate(zip(rows, masks)):
        single = model(r[None], vision_expert_mask=m[None])
        single_step = model(nxt[i : i + 1], cache=output_cache(single)).last_hidden_state
        assert rel_err(out.last_hidden_state[i, -len(r) :], single.last_hidden_state[0]) <= TOL
        assert rel_err(step[i], single_step[0]) <= TOL


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@torch.no_grad()
def test_grouped_query_decode_without_repeated_kv_equals_repeated(attn, cache_kind, monkeypatch):
    """A grouped-query decode step (v2: 8 query heads on 2 key/value heads) runs each key/value head with its group
    of query heads (``grouped_single_query``) instead of repeating the cache's heads: the outputs equal the repeated
    path's, for a left-padded batch (a padding mask) and without a mask, over a dynamic and a static (longer than the
    sequence, padded-mask) cache."""
    import copy

    from transformers.cache_utils import StaticCache

    import modeling_visualglm.llama as llama_module

    model = build("v2", seed=40)
    model.set_attn_implementation(attn)
    rows = [random_ids(n, seed=41 + i) for i, n in enumerate([9, 6])]
    ids, attn_mask, vis = left_pad(rows, [image_mask(9, 1, 3), image_mask(6, 1, 3)])
    nxt = random_ids(2, seed=44)[:, None]
    packed = []
    real = llama_module.grouped_single_query

    def spying(*args, **kwargs):
        result = real(*args, **kwargs)
        packed.append(result is not None)
        return result

    def run(grouped, mask):
        monkeypatch.setattr(llama_module, "grouped_single_query", grouped)
        if cache_kind == "static":
            cache = StaticCache(config=model.config, max_cache_len=32)
        else:
            cache = None
        prefill_mask = attn_mask if mask else None
        out = model(ids, attention_mask=prefill_mask, vision_expert_mask=vis, cache=cache, use_cache=True)
        cache = copy.deepcopy(output_cache(out))
        step_mask = None
        if mask:
            step_mask = torch.cat([attn_mask, torch.ones(2, 1, dtype=torch.long)], 1)
            if cache_kind == "static":
                step_mask = torch.nn.functional.pad(step_mask, (0, 32 - step_mask.shape[1]))
        return model(nxt, attention_mask=step_mask, cache=cache)

    for mask in (True, False):
        packed.clear()
        got = run(spying, mask)
        assert packed and all(packed[-len(model.layers):]), "the decode step did not take the grouped path"
        ref = run(lambda *a, **k: None, mask)
        assert rel_err(got.last_hidden_state, ref.last_hidden_state) <= TOL, (mask, cache_kind)


@torch.no_grad()
def test_grouped_query_decode_traces_as_one_graph():
    """The grouped decode step under torch.compile(fullgraph=True) (dynamo must not break the graph on the view
    object or the reshapes; the compiled fast-decode path needs one graph) gives the eager step's output."""
    import copy

    from transformers.cache_utils import StaticCache

    model = build("v2", seed=45)
    ids = random_ids(7, seed=46)[None]
    cache = StaticCache(config=model.config, max_cache_len=16)
    out = model(ids, cache=cache, use_cache=True)
    mask = torch.nn.functional.pad(torch.ones(1, 8, dtype=torch.long), (0, 8))
    nxt = random_ids(1, seed=47)[None]
    eager_cache, compiled_cache = copy.deepcopy(output_cache(out)), copy.deepcopy(output_cache(out))
    torch._dynamo.reset()
    step = torch.compile(model.forward, fullgraph=True, backend="eager")
    got = step(nxt, attention_mask=mask, cache=compiled_cache).last_hidden_state  # the first grouped call
    ref = model(nxt, attention_mask=mask, cache=eager_cache).last_hidden_state
    assert rel_err(got, ref) <= TOL


@pytest.mark.parametrize("preset", ["v1", "v2"])
@torch.no_grad()
def test_eager_equals_sdpa(preset):
    model = build(preset, seed=31)
    rows = [random_ids(11, seed=32), random_ids(7, seed=33)]
    ids, attn_mask, vis = left_pad(rows, [image_mask(11, 1, 4), image_mask(7, 2, 3)])
    model.set_attn_implementation("sdpa")
    sdpa = model(ids, attention_mask=attn_mask, vision_expert_mask=vis).last_hidden_state
    sdpa_plain = model(ids[:1]).last_hidden_state
    model.set_attn_implementation("eager")
    eager = model(ids, attention_mask=attn_mask, vision_expert_mask=vis).last_hidden_state
    real = attn_mask.bool()
    assert rel_err(sdpa[real], eager[real]) <= TOL
    assert rel_err(sdpa_plain, model(ids[:1]).last_hidden_state) <= TOL


@pytest.mark.parametrize("use_cache", [False, None])
def test_gradient_checkpointing_and_grads_reach_both_experts(use_cache):
    """Under gradient checkpointing the output equals the eval forward and gradients reach both experts, with
    use_cache off and with the config's default (on): then no cache is made either (backward's recomputation would
    append the keys twice on transformers before 5.24)."""
    from modeling_visualglm.compat import output_cache

    model = build("v2", seed=34)
    ids = random_ids(8, seed=35)[None]
    vis = image_mask(8, 1, 4)[None]
    with torch.no_grad():
        ref = model(ids, vision_expert_mask=vis).last_hidden_state
    model.train()
    enable_checkpointing(model)
    assert model.config.use_cache
    out = model(ids, vision_expert_mask=vis, use_cache=use_cache)
    assert output_cache(out) is None
    assert rel_err(out.last_hidden_state.detach(), ref) <= TOL
    out.last_hidden_state.square().mean().backward()
    attn = model.layers[0].self_attn
    assert attn.vision_expert_query_key_value.weight.grad.abs().sum() > 0
    assert attn.language_expert_query_key_value.weight.grad.abs().sum() > 0


def test_bad_inputs():
    model = build("v1", seed=36)
    ids = random_ids(6, seed=37)[None]
    with pytest.raises(ValueError, match="vision_expert_mask"):
        model(ids, vision_expert_mask=torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(6))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="multiple"):
        tiny_config(num_attention_heads=4, num_key_value_heads=3)
