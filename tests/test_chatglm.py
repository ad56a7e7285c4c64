"""ChatGLM-6B decoder block: SAT parity, 2D positions, prefix-LM mask, cache, padding, kernels, checkpointing.

Reference: SwissArmyTransformer 0.4.12 ``sat.model.official.chatglm_model.ChatGLMModel`` (what VisualGLM-6B
runs), built on CPU in SAT's model-only mode with its own ``get_args`` defaults and fed the inputs its own
``get_inputs`` (``get_masks`` / ``get_position_ids``) builds.
"""


import pytest
import torch

from helpers import enable_checkpointing, randomize_fan_in_, rel_err
from transformers import DynamicCache, StaticCache

from modeling_visualglm.chatglm import (
    ChatGLMModel,
    chatglm_position_ids,
    chatglm_prefix_lm_mask,
)
from modeling_visualglm.configuration_blocks import ChatGLMConfig

PAD, MASK, GMASK, SOP, EOP = 3, 128, 129, 130, 131
VOCAB = 150
TOL = 1e-4


def tiny_config(**overrides) -> ChatGLMConfig:
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=128, bos_token_id=SOP, eos_token_id=EOP, pad_token_id=PAD,
        mask_token_id=MASK, gmask_token_id=GMASK,
    )
    kwargs.update(overrides)
    return ChatGLMConfig(**kwargs)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    return randomize_fan_in_(model, seed, is_norm=lambda name: "layernorm" in name and name.endswith("weight"), embed_key="embeddings", rest_scale=0.2)


def build_model(seed: int = 0, **overrides) -> ChatGLMModel:
    torch.manual_seed(seed)
    return randomize(ChatGLMModel(tiny_config(**overrides)), seed).eval()


def prompt(n_text: int, n_gen: int, seed: int) -> torch.Tensor:
    """[n_text ordinary tokens, gMASK, sop, n_gen ordinary tokens]; ordinary ids avoid pad and specials."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(4, MASK, (n_text,), generator=gen)
    tail = torch.randint(4, MASK, (n_gen,), generator=gen)
    return torch.cat([text, torch.tensor([GMASK, SOP]), tail])


def left_pad(rows):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------------
# SwissArmyTransformer reference
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sat_chatglm_cls():
    from sat_reference import import_sat

    import_sat()
    from sat.model.official.chatglm_model import ChatGLMModel as SatChatGLM

    return SatChatGLM


def build_sat(sat_cls, config: ChatGLMConfig):
    # SAT's own argparse defaults (BaseModel.get_args) with the tiny sizes; "post" is ChatGLM's branch
    args = sat_cls.get_args(
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads, vocab_size=config.vocab_size,
        inner_hidden_size=config.intermediate_size, max_sequence_length=config.max_position_embeddings,
        layernorm_order="post", layernorm_epsilon=config.layer_norm_eps, hidden_dropout=0.0,
        attention_dropout=0.0, bos_token_id=config.bos_token_id, mask_token_id=config.mask_token_id,
        gmask_token_id=config.gmask_token_id, pad_token_id=config.pad_token_id,
    )
    return sat_cls(args).eval()


def interleaved_to_sat_blocked(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Our (THUDM-HF) qkv rows [h: q, k, v] → sat 0.4.12 rows [Q all heads; K; V] (spec §4.3)."""
    head_dim = tensor.shape[0] // (3 * num_heads)
    rest = tensor.shape[1:]
    return tensor.reshape(num_heads, 3, head_dim, *rest).transpose(0, 1).reshape(tensor.shape)


def sat_state_dict(model: ChatGLMModel, lm_head: torch.Tensor, blocked: bool = True) -> dict:
    sd = {}
    for name, tensor in model.state_dict().items():
        if "query_key_value" in name and blocked:
            tensor = interleaved_to_sat_blocked(tensor, model.config.num_attention_heads)
        sd["transformer." + name] = tensor
    sd["mixins.chatglm-final.lm_head.weight"] = lm_head
    return sd


@torch.no_grad()
def test_sat_parity_single_and_left_padded(sat_chatglm_cls):
    config = tiny_config()
    ours = build_model(seed=1)
    lm_head = torch.randn(VOCAB, config.hidden_size, generator=torch.Generator().manual_seed(11))
    sat = build_sat(sat_chatglm_cls, config)
    sat.load_state_dict(sat_state_dict(ours, lm_head), strict=True)

    rows = [prompt(20, 5, seed=2), prompt(11, 3, seed=3)]
    ids, attn = left_pad(rows)

    # single row: SAT builds its own positions and prefix mask (get_inputs → get_masks/get_position_ids)
    single = rows[0][None]
    sat_mask, sat_pos = sat.get_inputs(single)
    assert torch.equal(chatglm_position_ids(single, None, config), sat_pos)
    ref = sat(input_ids=single, position_ids=sat_pos, attention_mask=sat_mask)[0]
    got = ours(single).last_hidden_state @ lm_head.T
    assert rel_err(got, ref) <= TOL

    # left-padded batch: SAT finds pads by pad id; we take them from the attention mask
    sat_mask, sat_pos = sat.get_inputs(ids)
    assert torch.equal(chatglm_position_ids(ids, attn, config), sat_pos)
    ref = sat(input_ids=ids, position_ids=sat_pos, attention_mask=sat_mask)[0]
    got = ours(ids, attention_mask=attn).last_hidden_state @ lm_head.T
    real = attn.bool()
    assert rel_err(got[real], ref[real]) <= TOL

    # negative control: the qkv layout must matter, or this test could not catch a wrong permutation
    sat.load_state_dict(sat_state_dict(ours, lm_head, blocked=False), strict=True)
    wrong = sat(input_ids=single, position_ids=sat.get_inputs(single)[1], attention_mask=sat.get_inputs(single)[0])[0]
    assert rel_err(ours(single).last_hidden_state @ lm_head.T, wrong) > 1e-2


@torch.no_grad()
def test_rope_fp16_inv_freq_is_a_different_model(sat_chatglm_cls):
    config = tiny_config()
    exact = build_model(seed=4)
    rounded = build_model(seed=4, rope_fp16_inv_freq=True)
    assert not torch.equal(exact.rotary_emb.inv_freq, rounded.rotary_emb.inv_freq)
    lm_head = torch.randn(VOCAB, config.hidden_size, generator=torch.Generator().manual_seed(12))
    sat = build_sat(sat_chatglm_cls, config)
    sat.load_state_dict(sat_state_dict(exact, lm_head), strict=True)

    ids = prompt(40, 8, seed=5)[None]  # long enough for the fp16 rounding of inv_freq to show in the angles
    mask, pos = sat.get_inputs(ids)
    ref = sat(input_ids=ids, position_ids=pos, attention_mask=mask)[0]
    err_exact = rel_err(exact(ids).last_hidden_state @ lm_head.T, ref)
    err_rounded = rel_err(rounded(ids).last_hidden_state @ lm_head.T, ref)
    assert err_exact <= TOL
    assert err_rounded > 10 * max(err_exact, 1e-7)


# ---------------------------------------------------------------------------------------------------
# Positions and mask, derived by hand from the rules in chatglm_position_ids' docstring
# ---------------------------------------------------------------------------------------------------


def test_position_ids_hand_derived():
    config = tiny_config()
    ids = torch.tensor([
        [5, 6, GMASK, SOP, 7, 8],        # plain: ctx 3, mp 2
        [PAD, PAD, 9, GMASK, SOP, 7],    # 2 left pads: p = -,-,0,1,2,3 → ctx 2, mp 1
        [MASK, 5, 6, SOP, 9, 9],         # only [MASK]: mp 0
        [MASK, GMASK, 5, SOP, 7, 8],     # [gMASK] wins over an earlier [MASK]: mp 1
        [5, 6, 7, 8, 9, GMASK],          # no <sop>: all prefix, block 0
        [5, 6, SOP, 7, GMASK, 8],        # no mask before <sop>: mp = ctx - 1 = 1; later gMASK ignored
    ])
    attn = torch.ones_like(ids)
    attn[1, :2] = 0
    expected = torch.tensor([
        [[0, 1, 2, 2, 2, 2], [0, 0, 0, 1, 2, 3]],
        [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 2]],
        [[0, 1, 2, 0, 0, 0], [0, 0, 0, 1, 2, 3]],
        [[0, 1, 2, 1, 1, 1], [0, 0, 0, 1, 2, 3]],
        [[0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 0, 0]],
        [[0, 1, 1, 1, 1, 1], [0, 0, 1, 2, 3, 4]],
    ])
    assert torch.equal(chatglm_position_ids(ids, attn, config), expected)
    # generation computes positions on prompt + generated ids and keeps the tail: prompt columns must not move
    assert torch.equal(chatglm_position_ids(ids[:, :4], attn[:, :4], config), expected[..., :4])


def test_prefix_lm_mask_hand_derived():
    # one row, 2 left pads, prefix [a, gMASK] then <sop>, x: blocks (0,0,0,0,1,2)
    position_ids = torch.tensor([[[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 2]]])
    attn = torch.tensor([[0, 0, 1, 1, 1, 1]])
    got = chatglm_prefix_lm_mask(position_ids, attn, past_length=0, kv_length=6)[0, 0]
    expected = torch.tensor([
        # keys: pad pad a gM sop x
        [0, 0, 1, 1, 0, 0],  # pad queries still see the real prefix (no empty rows for SDPA)
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0, 0],  # a sees gMASK after it: bidirectional prefix
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],  # sop: causal from here on
        [0, 0, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(got, expected)
    # decode step with 3 cached keys in a static cache of 6: sees cache + itself, never the empty tail
    step = chatglm_prefix_lm_mask(torch.tensor([[[1], [2]]]), None, past_length=torch.tensor(3), kv_length=6)
    assert torch.equal(step[0, 0, 0], torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------
# Model behaviour
# ---------------------------------------------------------------------------------------------------


def test_prefill_validation_errors():
    model = build_model(seed=0)
    good = prompt(4, 0, seed=6)[None]
    no_sop = good[:, :-1]
    no_mask = torch.cat([good[:, :-2], good[:, -1:]], dim=1)
    ids, attn = left_pad([good[0], no_sop[0]])
    with pytest.raises(ValueError, match="row 1 .*<sop>"):
        model(ids, attention_mask=attn)
    with pytest.raises(ValueError, match=r"row 0 .*\[gMASK\]"):
        model(no_mask)
    cache = DynamicCache(config=model.config)
    model(good, cache=cache)
    with pytest.raises(ValueError, match="decode steps"):
        model(torch.tensor([[7]]), cache=cache)


@torch.no_grad()
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_cached_decode_matches_full_forward(cache_kind):
    model = build_model(seed=7)
    rows = [prompt(9, 6, seed=8), prompt(5, 6, seed=9)]
    full_ids, full_attn = left_pad(rows)
    n_new = 6
    full = model(full_ids, attention_mask=full_attn, use_cache=False).last_hidden_state

    prompt_len = full_ids.shape[1] - n_new
    if cache_kind == "dynamic":
        cache = DynamicCache(config=model.config)
    else:
        cache = StaticCache(config=model.config, max_cache_len=full_ids.shape[1] + 4)
    out = model(full_ids[:, :prompt_len], attention_mask=full_attn[:, :prompt_len], cache=cache)
    real = full_attn[:, :prompt_len].bool()
    assert rel_err(out.last_hidden_state[real], full[:, :prompt_len][real]) <= TOL
    for t in range(prompt_len, full_ids.shape[1]):
        pos = chatglm_position_ids(full_ids[:, : t + 1], full_attn[:, : t + 1], model.config)[..., -1:]
        out = model(
            full_ids[:, t : t + 1], attention_mask=full_attn[:, : t + 1], position_ids=pos, cache=cache
        )
        assert rel_err(out.last_hidden_state[:, 0], full[:, t]) <= TOL


@torch.no_grad()
def test_decode_without_mask_matches_full_forward():
    # generate() drops all-ones masks: single row, mask None on prefill and decode
    model = build_model(seed=10)
    ids = prompt(7, 4, seed=11)[None]
    full = model(ids).last_hidden_state
    cache = DynamicCache(config=model.config)
    model(ids[:, :-4], cache=cache)
    for t in range(ids.shape[1] - 4, ids.shape[1]):
        pos = chatglm_position_ids(ids[:, : t + 1], None, model.config)[..., -1:]
        out = model(ids[:, t : t + 1], position_ids=pos, cache=cache)
        assert rel_err(out.last_hidden_state[:, 0], full[:, t]) <= TOL


@torch.no_grad()
def test_left_padded_batch_matches_single_rows():
    model = build_model(seed=12)
    rows = [prompt(3, 2, seed=13), prompt(12, 4, seed=14), prompt(7, 0, seed=15)]
    ids, attn = left_pad(rows)
    batched = model(ids, attention_mask=attn).last_hidden_state
    for i, row in enumerate(rows):
        alone = model(row[None]).last_hidden_state[0]
        assert rel_err(batched[i, ids.shape[1] - len(row):], alone) <= TOL


@torch.no_grad()
def test_eager_matches_sdpa():
    model = build_model(seed=16)
    ids, attn = left_pad([prompt(8, 3, seed=17), prompt(4, 2, seed=18)])
    assert model.config._attn_implementation == "sdpa"
    sdpa = model(ids, attention_mask=attn).last_hidden_state
    model.set_attn_implementation("eager")
    eager = model(ids, attention_mask=attn).last_hidden_state
    real = attn.bool()
    assert rel_err(eager[real], sdpa[real]) <= TOL


def test_gradient_checkpointing_backward():
    ids, attn = left_pad([prompt(6, 3, seed=19), prompt(3, 1, seed=20)])
    grads = []
    for checkpointing in (False, True):
        model = build_model(seed=21).train()
        if checkpointing:
            enable_checkpointing(model)
            assert all(layer.gradient_checkpointing for layer in model.layers)
        out = model(ids, attention_mask=attn, use_cache=False).last_hidden_state
        (out[attn.bool()] ** 2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert grad.abs().max() > 0, name
        assert rel_err(grads[1][name], grad) <= TOL, name


def test_checkpointing_makes_no_cache_when_the_config_asks_for_one(caplog):
    """The config's default ``use_cache`` (on) under gradient checkpointing: no cache is made, so backward's
    recomputation cannot append each layer's keys a second time (on transformers before 5.24, whose checkpointing
    layer does not drop a ``cache`` argument, that failed with "size 2T vs T"); the gradients equal the plain run's,
    and only an explicit ``use_cache=True`` warns."""
    from modeling_visualglm.compat import output_cache

    ids, attn = left_pad([prompt(6, 3, seed=26), prompt(3, 1, seed=27)])
    grads = []
    for checkpointing in (False, True):
        model = build_model(seed=28).train()
        assert model.config.use_cache
        if checkpointing:
            enable_checkpointing(model)
        with caplog.at_level("WARNING"):
            out = model(ids, attention_mask=attn)  # use_cache from the config
        if checkpointing:
            assert output_cache(out) is None
            assert not [r for r in caplog.records if "cache" in r.getMessage().lower()], caplog.text
        (out.last_hidden_state[attn.bool()] ** 2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert rel_err(grads[1][name], grad) <= TOL, name
    with caplog.at_level("WARNING"):
        assert output_cache(model(ids, attention_mask=attn, use_cache=True)) is None
    assert "no cache is used" in caplog.text


@torch.no_grad()
def test_save_load_roundtrip(tmp_path):
    model = build_model(seed=22, rope_fp16_inv_freq=True)
    model.save_pretrained(tmp_path)
    loaded = ChatGLMModel.from_pretrained(tmp_path).eval()
    assert set(loaded.state_dict()) == set(model.state_dict())  # inv_freq stays out of the checkpoint
    assert torch.equal(loaded.rotary_emb.inv_freq, model.rotary_emb.inv_freq)
    ids = prompt(6, 2, seed=23)[None]
    assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)


@torch.no_grad()
def test_rotary_tables_survive_dtype_casts():
    model = build_model(seed=24)
    pos = chatglm_position_ids(prompt(30, 5, seed=25)[None], None, model.config)
    cos32, sin32 = model.rotary_emb(pos, torch.float32)
    model.to(torch.bfloat16)  # casts every floating buffer, inv_freq included
    cos, sin = model.rotary_emb(pos, torch.float32)
    assert torch.equal(cos, cos32) and torch.equal(sin, sin32)
