"""VisualGLMForConditionalGeneration: splice, positions, loss, cache, batching, attention backends, chat.

The blocks are checked against SwissArmyTransformer / transformers in their own test files; here the
composition is checked against an explicit re-derivation of the original forward (SAT VisualGLMModel:
text embeddings, the 32 image embeddings concatenated at ``pre_image``, more text, GLM 2D positions).
"""

import pytest
import torch
from PIL import Image

from modeling_visualglm.modeling_visualglm import VisualGLMForConditionalGeneration
from modeling_visualglm.processing_visualglm import build_visualglm_inputs
from modeling_visualglm.tools.tiny_models import randomize_, tiny_visualglm_config

REL_TOL = 1e-4


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def make_image(seed, size=56):
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    torch.manual_seed(0)
    cfg = tiny_visualglm_config(tiny_tokenizer)
    m = VisualGLMForConditionalGeneration(cfg).eval()
    randomize_(m, seed=1)
    return m


def pixel(model, *images):
    from modeling_visualglm.image_processing_visualglm import VisualGLMImageProcessor

    proc = VisualGLMImageProcessor(size=model.config.vision_config.image_size)
    return proc(list(images), return_tensors="pt")["pixel_values"]


def glm_positions_by_hand(ids, sop, gmask, mask):
    """Spec §2.3, one unpadded row, written as plain Python."""
    ctx = ids.index(sop)
    mp = ids.index(gmask) if gmask in ids else ids.index(mask)
    pos = [i if i < ctx else mp for i in range(len(ids))]
    block = [0 if i < ctx else i - ctx + 1 for i in range(len(ids))]
    return torch.tensor([[pos, block]])


def test_forward_matches_rederived_splice(model, tiny_tokenizer):
    tok, cfg = tiny_tokenizer, model.config
    ids = build_visualglm_inputs(tok, "What is in the picture?", history=[("Hi", "Hello there")], has_image=True,
                                 num_image_tokens=cfg.num_image_tokens)
    pv = pixel(model, make_image(0))
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([ids]), pixel_values=pv).logits

        # re-derivation: the original splits at pre_image and concatenates text / image / text embeddings
        pre_image = ids.index(cfg.image_token_id)
        post = pre_image + cfg.num_image_tokens
        assert all(i == cfg.image_token_id for i in ids[pre_image:post])
        emb = model.language_model.word_embeddings
        vit = model.vision_model(pixel_values=pv).last_hidden_state
        q = model.qformer(encoder_hidden_states=vit).last_hidden_state
        img = model.glm_proj(q)
        embeds = torch.cat([emb(torch.tensor([ids[:pre_image]])), img, emb(torch.tensor([ids[post:]]))], dim=1)
        positions = glm_positions_by_hand(ids, cfg.text_config.bos_token_id, cfg.text_config.gmask_token_id,
                                          cfg.text_config.mask_token_id)
        hidden = model.language_model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
        ref = hidden @ model.language_model.word_embeddings.weight.T  # tied lm_head
    assert ours.shape == (1, len(ids), cfg.text_config.vocab_size)
    assert rel_err(ours, ref) <= REL_TOL


def test_lm_head_is_tied(model):
    assert model.lm_head.weight.data_ptr() == model.language_model.word_embeddings.weight.data_ptr()


def test_loss_is_shifted_cross_entropy(model, tiny_tokenizer):
    cfg = model.config
    ids = build_visualglm_inputs(tiny_tokenizer, "Describe it.", has_image=True,
                                 num_image_tokens=cfg.num_image_tokens)
    answer = tiny_tokenizer.encode("A red square", add_special_tokens=False) + [cfg.text_config.eos_token_id]
    full = ids + answer
    labels = [-100] * (len(ids) - 1) + full[len(ids) - 1 :]  # supervise from <sop> on, like finetune_visualglm.py
    # also put real ids on the image placeholders: the model must ignore them
    pre = ids.index(cfg.image_token_id)
    labels[pre : pre + 4] = full[pre : pre + 4]
    pv = pixel(model, make_image(1))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([full]), pixel_values=pv, labels=torch.tensor([labels]))
    logp = torch.log_softmax(out.logits[0].double(), dim=-1)
    terms = []
    for t in range(len(full) - 1):
        target = labels[t + 1]
        if target == -100 or full[t + 1] == cfg.image_token_id:
            continue
        terms.append(-logp[t, target])
    expected = torch.stack(terms).mean()
    assert len(terms) == len(answer) + 1  # <sop>→first answer token … last answer token→<eop>
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)


def greedy_without_cache(model, ids, pv, steps):
    """Reference decode: a full forward over the whole sequence at every step (no cache)."""
    seq = list(ids)
    margins = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([seq]), pixel_values=pv, use_cache=False).logits[0, -1]
            top2 = logits.topk(2).values
            margins.append((top2[0] - top2[1]).item())
            seq.append(int(logits.argmax()))
    return seq[len(ids) :], margins


def assert_same_greedy(ours, ref, margins):
    for step, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            assert margins[step] < 1e-3, f"token {step} differs ({a} vs {b}) with reference margin {margins[step]}"
            return  # a near-tie: the rest of the sequences legitimately diverge
    assert len(ours) == len(ref)


def test_cached_generate_equals_full_forward(model, tiny_tokenizer):
    cfg = model.config
    ids = build_visualglm_inputs(tiny_tokenizer, "What colour is it?", has_image=True,
                                 num_image_tokens=cfg.num_image_tokens)
    pv = pixel(model, make_image(2))
    ref, margins = greedy_without_cache(model, ids, pv, steps=8)
    out = model.generate(input_ids=torch.tensor([ids]), pixel_values=pv, do_sample=False, max_new_tokens=8,
                         min_length=0, eos_token_id=None)
    assert_same_greedy(out[0, len(ids) :].tolist(), ref, margins)
    assert len(set(ref)) > 1, "the tiny model is degenerate (repeats one token): re-seed it"


def test_left_padded_batch_equals_single_runs(model, tiny_tokenizer):
    cfg = model.config
    rows = [
        ("What is shown?", make_image(3)),
        ("A text-only question that is a good deal longer than the others", None),
        ("Colours?", make_image(4)),
    ]
    singles = []
    for query, image in rows:
        ids = build_visualglm_inputs(tiny_tokenizer, query, has_image=image is not None,
                                     num_image_tokens=cfg.num_image_tokens)
        pv = pixel(model, image) if image is not None else None
        out = model.generate(input_ids=torch.tensor([ids]), pixel_values=pv, do_sample=False, max_new_tokens=6,
                             min_length=0, eos_token_id=None)
        singles.append((ids, out[0, len(ids) :].tolist()))

    width = max(len(ids) for ids, _ in singles)
    pad = cfg.text_config.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in singles])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in singles])
    pv = pixel(model, rows[0][1], rows[2][1])
    out = model.generate(input_ids=input_ids, attention_mask=mask, pixel_values=pv, do_sample=False,
                         max_new_tokens=6, min_length=0, eos_token_id=None)
    for row, (_, expected) in enumerate(singles):
        assert out[row, width:].tolist() == expected, f"row {row}"


def test_eager_equals_sdpa(model, tiny_tokenizer):
    cfg = model.config
    ids = build_visualglm_inputs(tiny_tokenizer, "Where?", has_image=True, num_image_tokens=cfg.num_image_tokens)
    pv = pixel(model, make_image(5))
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        sdpa = model(input_ids=torch.tensor([ids]), pixel_values=pv).logits
        model.set_attn_implementation("eager")
        try:
            eager = model(input_ids=torch.tensor([ids]), pixel_values=pv).logits
        finally:
            model.set_attn_implementation("sdpa")
    assert model.language_model.config._attn_implementation == "sdpa"
    assert rel_err(sdpa, eager) <= REL_TOL


def test_beam_search_and_sampling_run(model, tiny_tokenizer):
    cfg = model.config
    ids = build_visualglm_inputs(tiny_tokenizer, "Describe.", has_image=True, num_image_tokens=cfg.num_image_tokens)
    pv = pixel(model, make_image(6))
    inp = torch.tensor([ids])
    beams = model.generate(input_ids=inp, pixel_values=pv, do_sample=False, num_beams=3, max_new_tokens=5,
                           min_length=0, eos_token_id=None)
    assert beams.shape == (1, len(ids) + 5)
    one_beam = model.generate(input_ids=inp, pixel_values=pv, do_sample=False, num_beams=1, max_new_tokens=5,
                              min_length=0, eos_token_id=None)
    greedy, margins = greedy_without_cache(model, ids, pv, steps=5)
    assert_same_greedy(one_beam[0, len(ids) :].tolist(), greedy, margins)
    torch.manual_seed(7)
    s1 = model.generate(input_ids=inp, pixel_values=pv, do_sample=True, top_k=10, max_new_tokens=5, min_length=0)
    torch.manual_seed(7)
    s2 = model.generate(input_ids=inp, pixel_values=pv, do_sample=True, top_k=10, max_new_tokens=5, min_length=0)
    assert torch.equal(s1, s2)


def test_positions_built_once_equal_positions_derived_every_step(model, tiny_tokenizer, monkeypatch):
    """generate() builds the 2D positions once from the prompt and continues them by (+0, +1) per token; the result
    equals deriving them from the whole sequence at every step (the fallback for loops that are not generate's),
    for a left-padded batch under beam search with several returned sequences (rows expanded and reordered) and
    for seeded sampling with several returned sequences."""
    from modeling_visualglm import modeling_visualglm as module

    cfg = model.config
    rows = [build_visualglm_inputs(tiny_tokenizer, q, has_image=True, num_image_tokens=cfg.num_image_tokens)
            for q in ("Describe it.", "What colour is the thing in the middle?")]
    width = max(map(len, rows))
    pad = cfg.text_config.pad_token_id
    inputs = dict(input_ids=torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
                  attention_mask=torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
                  pixel_values=pixel(model, make_image(8), make_image(9)), min_length=0, eos_token_id=None,
                  max_new_tokens=6)
    runs = [dict(do_sample=False, num_beams=3, num_return_sequences=2), dict(do_sample=True, top_k=20,
                                                                             num_return_sequences=2)]
    derived = {"n": 0}
    original = module.chatglm_position_ids

    def counted(*args, **kwargs):
        derived["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "chatglm_position_ids", counted)
    once = []
    for run in runs:
        torch.manual_seed(11)
        once.append(model.generate(**inputs, **run))
    assert derived["n"] == len(runs)  # once per generate call
    monkeypatch.setattr(type(model), "_prepare_position_ids_for_generation", lambda self, inputs, kwargs: None)
    for run, expected in zip(runs, once):
        derived["n"] = 0
        torch.manual_seed(11)
        assert torch.equal(model.generate(**inputs, **run), expected), run
        assert derived["n"] == inputs["max_new_tokens"]  # the fallback derived them at every forward


def test_placeholder_count_mismatch_raises(model, tiny_tokenizer):
    cfg = model.config
    ids = build_visualglm_inputs(tiny_tokenizer, "Hi?", has_image=True, num_image_tokens=cfg.num_image_tokens)
    pv = pixel(model, make_image(7))
    short = [i for n, i in enumerate(ids) if not (i == cfg.image_token_id and n == ids.index(cfg.image_token_id))]
    with pytest.raises(ValueError, match="image placeholders"):
        model(input_ids=torch.tensor([short]), pixel_values=pv)
    with pytest.raises(ValueError, match="image placeholders"):
        model(input_ids=torch.tensor([ids]), pixel_values=torch.cat([pv, pv]))
    with pytest.raises(ValueError, match="image placeholders"):
        model(input_ids=torch.tensor([ids]))


def test_missing_glm_specials_raise(model, tiny_tokenizer):
    ids = tiny_tokenizer.encode("no specials here", add_special_tokens=False)
    with pytest.raises(ValueError, match="<sop>"):
        model(input_ids=torch.tensor([ids]))


def test_chat_and_stream_chat(model, tiny_tokenizer, tmp_path):
    img = make_image(8)
    path = tmp_path / "img.png"
    img.save(path)
    kwargs = dict(do_sample=False, max_new_tokens=6, min_length=0)
    r_pil, h_pil = model.chat(tiny_tokenizer, img, "What is it?", **kwargs)
    r_path, _ = model.chat(tiny_tokenizer, str(path), "What is it?", **kwargs)
    assert r_pil == r_path
    assert h_pil == [("What is it?", r_pil)]
    r2, h2 = model.chat(tiny_tokenizer, img, "And then?", history=h_pil, **kwargs)
    assert h2 == h_pil + [("And then?", r2)]
    streamed = list(model.stream_chat(tiny_tokenizer, img, "What is it?", **kwargs))
    assert streamed and streamed[-1][0] == r_pil and streamed[-1][1] == h_pil
    text_only, _ = model.chat(tiny_tokenizer, None, "Hello?", **kwargs)
    assert isinstance(text_only, str)


def test_chat_bad_inputs(model, tiny_tokenizer, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError):
        model.chat(tiny_tokenizer, str(bad), "What?", max_new_tokens=2, min_length=0)
    with pytest.raises(ValueError):
        model.chat(tiny_tokenizer, make_image(9), "   ", max_new_tokens=2, min_length=0)
    with pytest.raises((TypeError, ValueError)):
        model.chat(tiny_tokenizer, make_image(9), "What?", history="not a list", max_new_tokens=2, min_length=0)
    with pytest.raises((TypeError, ValueError)):
        model.chat(tiny_tokenizer, make_image(9), "What?", history=[("only one",)], max_new_tokens=2, min_length=0)


def test_chat_never_samples_undecodable_ids(tiny_tokenizer):
    # an embedding table larger than the tokenizer, like the real 130528 rows for 130344 pieces
    cfg = tiny_visualglm_config(tiny_tokenizer, vocab_size=tiny_tokenizer.vocab_size + 40)
    m = VisualGLMForConditionalGeneration(cfg).eval()
    randomize_(m, seed=3)
    with torch.no_grad():  # make the extra rows win every argmax unless they are masked
        m.lm_head.weight[tiny_tokenizer.vocab_size :] = m.lm_head.weight[: 40] * 50
    ids = build_visualglm_inputs(tiny_tokenizer, "Hi?", has_image=False, num_image_tokens=cfg.num_image_tokens)
    raw = m.generate(input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=4, min_length=0, eos_token_id=None)
    assert (raw[0, len(ids) :] >= tiny_tokenizer.vocab_size).any()  # the unmasked model does pick them
    response, _ = m.chat(tiny_tokenizer, None, "Hi?", do_sample=False, max_new_tokens=4, min_length=0)
    assert isinstance(response, str)


def test_static_cache_generate_equals_dynamic(model, tiny_tokenizer):
    cfg = model.config
    rows = [build_visualglm_inputs(tiny_tokenizer, q, has_image=True, num_image_tokens=cfg.num_image_tokens)
            for q in ("What is shown?", "Describe the colours of everything")]
    width = max(map(len, rows))
    pad = cfg.text_config.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pv = pixel(model, make_image(10), make_image(11))
    kw = dict(input_ids=input_ids, attention_mask=mask, pixel_values=pv, do_sample=False, max_new_tokens=6,
              min_length=0, eos_token_id=None)
    dynamic = model.generate(**kw)
    static = model.generate(**kw, cache_implementation="static")
    assert torch.equal(dynamic, static)


def test_static_cache_decode_step_compiles_without_graph_breaks(model, tiny_tokenizer):
    """The per-token path has no host sync or data-dependent branch: dynamo captures it as one graph."""
    from transformers import StaticCache

    from modeling_visualglm.chatglm import chatglm_position_ids

    cfg = model.config
    ids = torch.tensor([build_visualglm_inputs(tiny_tokenizer, "Hi?", has_image=True,
                                               num_image_tokens=cfg.num_image_tokens)])
    cache = StaticCache(config=cfg, max_cache_len=ids.shape[1] + 8)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixel(model, make_image(12)), cache=cache)
        nxt = out.logits[:, -1:].argmax(-1)
        full = torch.cat([ids, nxt], dim=1)
        pos = chatglm_position_ids(full, None, cfg.text_config)[..., -1:]
        mask = torch.nn.functional.pad(torch.ones_like(full), (0, ids.shape[1] + 8 - full.shape[1]))

        def step(input_ids, position_ids, attention_mask):
            return model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                         cache=cache, logits_to_keep=1).logits

        explained = torch._dynamo.explain(step)(nxt, pos, mask)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


def test_generate_with_placeholders_but_no_image_raises(model, tiny_tokenizer):
    cfg = model.config
    ids = build_visualglm_inputs(tiny_tokenizer, "Hi?", has_image=True, num_image_tokens=cfg.num_image_tokens)
    with pytest.raises(ValueError, match="image placeholders"):
        model.generate(input_ids=torch.tensor([ids]), max_new_tokens=2, min_length=0)


def test_cache_is_accepted_under_both_names(model, tiny_tokenizer):
    """``cache`` (transformers >= 5.24) and ``past_key_values`` (before) name one argument, in every family's
    forward; the output carries the cache under the running release's name."""
    from transformers import DynamicCache

    from modeling_visualglm.chatglm import chatglm_position_ids
    from modeling_visualglm.compat import CACHE_ARG

    cfg = model.config
    prompt = build_visualglm_inputs(tiny_tokenizer, "Hi?", has_image=False, num_image_tokens=cfg.num_image_tokens)
    ids = torch.tensor([prompt + [7]])  # the prompt, then one "generated" token
    steps = []
    for name in ("cache", "past_key_values"):
        cache = DynamicCache(config=cfg.text_config)
        with torch.no_grad():
            out = model(input_ids=ids[:, :-1], **{name: cache})
            assert getattr(out, CACHE_ARG) is cache
            pos = chatglm_position_ids(ids, None, cfg.text_config)[..., -1:]
            steps.append(model(input_ids=ids[:, -1:], position_ids=pos, **{name: cache}).logits)
    assert torch.equal(steps[0], steps[1])
    with pytest.raises(ValueError, match="pass the cache once"):
        model(input_ids=ids, cache=DynamicCache(config=cfg.text_config),
              past_key_values=DynamicCache(config=cfg.text_config))
