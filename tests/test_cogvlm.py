"""CogVLMForConditionalGeneration (v1 and v2): re-derived forward, 3-position rule, cache, ragged batches,
kernels, generation modes, chat, processor, grounding, bad input.

The blocks are checked against SAT / transformers in test_eva2clip.py and test_llama.py; here the composition is
checked against an explicit re-derivation written from the spec (cogvlm.md §1.3, §2.1-2.5): tower patches →
(CogVLM2: 2x2 stride-2 conv over the row-major grid, written as a sum over the four taps) → GLU → [boi, patches,
eoi] spliced after bos; token types, vision-expert mask and positions computed by a plain-Python transcription of
the original rule (boi/eoi relabelled LANGUAGE, the counter advances on LANGUAGE tokens and on the first token of
each remaining VISION run).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import SyncCounter
from PIL import Image

from modeling_visualglm.compat import output_cache
from modeling_visualglm.configuration_cogvlm import CogVLMConfig
from modeling_visualglm.image_processing_cogvlm import CogVLMImageProcessor
from modeling_visualglm.modeling_cogvlm import CogVLMForConditionalGeneration, cogvlm_position_ids
from modeling_visualglm.processing_cogvlm import (
    CogVLMProcessor,
    build_cogvlm_inputs,
    build_cogvlm_prompt,
    draw_grounding,
    format_box,
    parse_boxes,
    parse_grounding,
)
from modeling_visualglm.tools.tiny_models import randomize_

TOL = 1e-4
# CogVLM1: 56 px → 4x4 patches; CogVLM2: 112 px → 8x8 patches → conv → 4x4 (CONTRACTS §6)
IMAGE_SIZE = {"cogvlm": 56, "cogvlm2": 112}


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tiny_llama_tokenizer import make_tiny_llama_tokenizer

    return make_tiny_llama_tokenizer(tmp_path_factory.mktemp("tiny_llama_tokenizer"))


def tiny_config(tokenizer, version):
    v2 = version == "cogvlm2"
    return CogVLMConfig(
        version=version,
        vision_config=dict(
            image_size=IMAGE_SIZE[version], patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, layernorm_order="post_sublayer", use_post_layernorm=False, drop_cls_token=True,
        ),
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2 if v2 else 8, vision_qkv_bias=v2,
            rope_theta=500000.0 if v2 else 10000.0, max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0,
        ),
    )


_MODELS = {}


def get_model(tokenizer, version):
    if version not in _MODELS:
        torch.manual_seed(0)
        model = CogVLMForConditionalGeneration(tiny_config(tokenizer, version)).eval()
        randomize_(model, seed=1 if version == "cogvlm" else 2)
        _MODELS[version] = model
    model = _MODELS[version]
    model.set_attn_implementation("sdpa")
    return model


def make_image(seed, size=(70, 50)):
    gen = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size[1], size[0], 3, generator=gen) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def pixels(model, *images):
    proc = CogVLMImageProcessor(size=model.config.vision_config.image_size)
    return proc(list(images), return_tensors="pt")["pixel_values"]


def chat_ids(model, tokenizer, query, history=None, template="chat", image=True):
    prompt = build_cogvlm_prompt(query, history, template)
    return build_cogvlm_inputs(tokenizer, prompt, image, model.config.num_image_tokens, model.config.image_token_id)


# ---------------------------------------------------------------------------------------------------
# Plain-Python transcription of the original rules (cogvlm.md §2.1, §2.3)
# ---------------------------------------------------------------------------------------------------


def spec_positions(types):
    """HF ``build_position_ids`` on one unpadded row, as the spec states it."""
    n = len(types)
    relabeled = list(types)
    for i in range(n):
        if types[i] == 1 and (i == 0 or types[i - 1] == 0):
            relabeled[i] = 0  # boi
        if types[i] == 1 and (i == n - 1 or types[i + 1] == 0):
            relabeled[i] = 0  # eoi
    positions = [0]
    for i in range(1, n):
        advance = relabeled[i] == 0 or relabeled[i - 1] == 0
        positions.append(positions[-1] + int(advance))
    return positions


def spec_vision_expert(types):
    return [types[i] == 1 and i + 1 < len(types) and types[i + 1] == 1 for i in range(len(types))]


def rederived_image_tokens(model, pv):
    """Tower → (conv as a sum over the 2x2 taps) → GLU written out → [boi, patches, eoi]."""
    cfg, ad = model.config, model.adapter
    patches = model.vision_model(pixel_values=pv).last_hidden_state  # (N, g², C), CLS dropped
    if cfg.version == "cogvlm2":
        n, p, c = patches.shape
        g = math.isqrt(p)
        grid = patches.view(n, g, g, c)  # row-major patch grid
        w, b = ad.conv.weight, ad.conv.bias  # (C_out, C_in, 2, 2)
        rows = []
        for i in range(g // 2):
            for j in range(g // 2):
                acc = b.expand(n, -1).clone()
                for di in range(2):
                    for dj in range(2):
                        acc = acc + grid[:, 2 * i + di, 2 * j + dj] @ w[:, :, di, dj].T
                rows.append(acc)
        patches = torch.stack(rows, dim=1)  # (N, (g/2)², C)
    h = patches @ ad.linear_proj.weight.T
    h = F.gelu(F.layer_norm(h, h.shape[-1:], ad.norm1.weight, ad.norm1.bias, eps=1e-5))
    h = (F.silu(h @ ad.gate_proj.weight.T) * (h @ ad.dense_h_to_4h.weight.T)) @ ad.dense_4h_to_h.weight.T
    n = h.shape[0]
    return torch.cat([ad.boi.expand(n, -1, -1), h, ad.eoi.expand(n, -1, -1)], dim=1)


@pytest.mark.parametrize("version", ["cogvlm", "cogvlm2"])
@torch.no_grad()
def test_forward_matches_rederivation(tokenizer, version):
    model = get_model(tokenizer, version)
    cfg = model.config
    ids = chat_ids(model, tokenizer, "what is the red box?", history=[("hi", "hello there")])
    pv = pixels(model, make_image(0))
    ours = model(input_ids=torch.tensor([ids]), pixel_values=pv).logits

    types = [int(i == cfg.image_token_id) for i in ids]
    start = types.index(1)
    assert start == 1 and sum(types) == cfg.num_image_tokens == cfg.image_grid**2 + 2  # right after bos
    embeds = model.language_model.embed_tokens.weight[[0 if t else i for i, t in zip(ids, types)]][None].clone()
    embeds[0, start : start + cfg.num_image_tokens] = rederived_image_tokens(model, pv)[0]
    positions = torch.tensor([spec_positions(types)])
    vision = torch.tensor([spec_vision_expert(types)])
    hidden = model.language_model(inputs_embeds=embeds, position_ids=positions, vision_expert_mask=vision)
    ref = hidden.last_hidden_state @ model.lm_head.weight.T
    assert ours.shape == (1, len(ids), cfg.text_config.vocab_size) and ours.dtype == torch.float32
    assert rel_err(ours, ref) <= TOL


@torch.no_grad()
def test_cogvlm2_conv_reads_the_row_major_grid(tokenizer):
    model = get_model(tokenizer, "cogvlm2")
    assert model.config.image_grid == 4 and model.config.vision_config.image_size // 14 == 8
    pv = pixels(model, make_image(1))
    feats = model.get_image_features(pv)
    assert rel_err(feats, rederived_image_tokens(model, pv)) <= TOL
    # a column-major grid would give other tokens: the test can tell the orders apart
    patches = model.vision_model(pixel_values=pv).last_hidden_state
    transposed = patches.view(1, 8, 8, -1).transpose(1, 2).reshape(1, 64, -1)
    assert rel_err(model.adapter(transposed), feats) > 1e-2


# ---------------------------------------------------------------------------------------------------
# The 3-position rule
# ---------------------------------------------------------------------------------------------------


TEMPLATE_CASES = [
    ("base", None, True),
    ("chat", None, True),
    ("vqa", None, True),
    ("chat", [("what is it?", "a box"), ("which color?", "red")], True),
    ("text", [("hello", "hi")], False),
]


@pytest.mark.parametrize("version", ["cogvlm", "cogvlm2"])
@pytest.mark.parametrize("template,history,image", TEMPLATE_CASES)
@torch.no_grad()
def test_three_position_rule(tokenizer, version, template, history, image):
    model = get_model(tokenizer, version)
    cfg = model.config
    ids = chat_ids(model, tokenizer, "describe the image", history, template, image=image)
    types = [int(i == cfg.image_token_id) for i in ids]
    n_text = len(ids) - 1 - (cfg.num_image_tokens if image else 0)
    if image:  # bos 0, boi 1, every patch 2, eoi 3, text from 4
        expected = [0, 1] + [2] * (cfg.num_image_tokens - 2) + [3] + list(range(4, 4 + n_text))
    else:
        expected = list(range(len(ids)))
    assert spec_positions(types) == expected
    ours = cogvlm_position_ids(torch.tensor([ids]) == cfg.image_token_id)
    assert ours[0].tolist() == expected

    # forward hands exactly these positions to the language model
    seen = {}
    hook = model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(pos=kwargs["position_ids"].clone()), with_kwargs=True
    )
    pv = pixels(model, make_image(2)) if image else None
    model(input_ids=torch.tensor([ids]), pixel_values=pv)
    hook.remove()
    assert seen["pos"][0].tolist() == expected


def test_positions_ignore_left_padding_and_allow_several_images():
    img = 99
    row = [1, img, img, img, img, img, 7, 8, img, img, img, img, img, 9]  # two 5-token images
    mask = torch.tensor([[0, 0, 0] + [1] * len(row)])
    ids = torch.tensor([[0, 0, 0] + row])
    pos = cogvlm_position_ids(ids == img, mask)[0].tolist()
    types = [int(t == img) for t in row]
    assert pos[3:] == spec_positions(types) == [0, 1, 2, 2, 2, 3, 4, 5, 6, 7, 7, 7, 8, 9]
    assert pos[:3] == [0, 0, 0]


# ---------------------------------------------------------------------------------------------------
# Cache, batching, kernels, generation modes
# ---------------------------------------------------------------------------------------------------


def _gen(model, **kwargs):
    return model.generate(return_dict_in_generate=True, output_logits=True, do_sample=False,
                          pad_token_id=0, eos_token_id=None, **kwargs)


@pytest.mark.parametrize("version", ["cogvlm", "cogvlm2"])
@pytest.mark.parametrize("template", ["base", "chat"])
@torch.no_grad()
def test_cached_generation_equals_full_forward(tokenizer, version, template):
    model = get_model(tokenizer, version)
    ids = torch.tensor([chat_ids(model, tokenizer, "what is this", template=template)])
    pv = pixels(model, make_image(3))
    out = _gen(model, input_ids=ids, pixel_values=pv, max_new_tokens=6)
    steps = torch.stack(out.logits, dim=1)  # (1, 6, V)
    full = model(input_ids=out.sequences, pixel_values=pv).logits[:, ids.shape[1] - 1 : -1]
    assert rel_err(steps, full) <= TOL


@torch.no_grad()
def test_prompt_ending_at_eoi_decodes_language_tokens(tokenizer):
    # base with an empty text tail: the prompt ends at eoi; generated tokens must still be LANGUAGE at 4, 5, ...
    model = get_model(tokenizer, "cogvlm")
    cfg = model.config
    ids = torch.tensor([[tokenizer.bos_token_id] + [cfg.image_token_id] * cfg.num_image_tokens])
    pv = pixels(model, make_image(4))
    calls = []
    hook = model.vision_model.register_forward_hook(lambda *args: calls.append(1))
    # HF-style token_type_ids end in VISION here: generate() must not carry that type into the decode steps
    out = _gen(model, input_ids=ids, pixel_values=pv, max_new_tokens=4,
               token_type_ids=(ids == cfg.image_token_id).long())
    hook.remove()
    assert len(calls) == 1  # decode steps never re-encode the image
    full = model(input_ids=out.sequences, pixel_values=pv).logits[:, ids.shape[1] - 1 : -1]
    assert rel_err(torch.stack(out.logits, 1), full) <= TOL
    assert cogvlm_position_ids(out.sequences == cfg.image_token_id)[0, -4:].tolist() == [4, 5, 6, 7]


def _batch(model, tokenizer, rows):
    """rows: (query, template, image or None) → left-padded batch through the processor."""
    proc = CogVLMProcessor(CogVLMImageProcessor(size=model.config.vision_config.image_size), tokenizer,
                           num_image_tokens=model.config.num_image_tokens, image_token_id=model.config.image_token_id)
    texts = [build_cogvlm_prompt(q, None, t) for q, t, _ in rows]
    return proc(images=[img for _, _, img in rows], text=texts)


RAGGED = [
    ("what is the red box on the left of the picture?", "chat", 5),
    ("cat", "base", 6),
    ("hello there", "text", None),
]


@pytest.mark.parametrize("version", ["cogvlm", "cogvlm2"])
@torch.no_grad()
def test_ragged_batch_equals_singles(tokenizer, version):
    model = get_model(tokenizer, version)
    rows = [(q, t, make_image(s) if s is not None else None) for q, t, s in RAGGED]
    batch = _batch(model, tokenizer, rows)
    assert batch["attention_mask"][:, 0].tolist() != [1, 1, 1]  # really ragged, left-padded
    out = _gen(model, **batch, max_new_tokens=5)
    width = batch["input_ids"].shape[1]
    for i, row in enumerate(rows):
        single = _batch(model, tokenizer, [row])
        ref = _gen(model, **single, max_new_tokens=5)
        ref_logits = torch.stack(ref.logits, 1)[0]
        top2 = ref_logits.topk(2, dim=-1).values
        assert ((top2[:, 0] - top2[:, 1]) > 1e-3).all(), "near-tie in the reference: pick another seed"
        assert out.sequences[i, width:].tolist() == ref.sequences[0, single["input_ids"].shape[1] :].tolist()
        assert rel_err(torch.stack(out.logits, 1)[i], ref_logits) <= TOL


@pytest.mark.parametrize("version", ["cogvlm", "cogvlm2"])
@torch.no_grad()
def test_eager_equals_sdpa(tokenizer, version):
    model = get_model(tokenizer, version)
    rows = [(q, t, make_image(s) if s is not None else None) for q, t, s in RAGGED]
    batch = _batch(model, tokenizer, rows)
    sdpa = model(**batch).logits
    model.set_attn_implementation("eager")
    eager = model(**batch).logits
    model.set_attn_implementation("sdpa")
    real = batch["attention_mask"].bool()
    assert rel_err(eager[real], sdpa[real]) <= TOL


@torch.no_grad()
def test_beam_search_and_sampling_with_and_without_cache(tokenizer):
    model = get_model(tokenizer, "cogvlm2")
    rows = [(q, t, make_image(s) if s is not None else None) for q, t, s in RAGGED[:2]]
    batch = _batch(model, tokenizer, rows)
    common = dict(max_new_tokens=4, pad_token_id=0, eos_token_id=None)
    beams = [model.generate(**batch, num_beams=3, num_return_sequences=2, do_sample=False, use_cache=c, **common)
             for c in (True, False)]
    assert beams[0].tolist() == beams[1].tolist()
    samples = []
    for c in (True, False):
        torch.manual_seed(123)
        samples.append(model.generate(**batch, do_sample=True, top_k=20, temperature=1.5, use_cache=c, **common))
    assert samples[0].tolist() == samples[1].tolist()


@torch.no_grad()
def test_static_cache_generation_equals_dynamic(tokenizer):
    model = get_model(tokenizer, "cogvlm")
    rows = [(q, t, make_image(s) if s is not None else None) for q, t, s in RAGGED]
    batch = _batch(model, tokenizer, rows)
    dynamic = _gen(model, **batch, max_new_tokens=4)
    static = _gen(model, **batch, max_new_tokens=4, cache_implementation="static")
    assert static.sequences.tolist() == dynamic.sequences.tolist()
    assert rel_err(torch.stack(static.logits, 1), torch.stack(dynamic.logits, 1)) <= TOL


@torch.no_grad()
def test_one_host_sync_per_prefill_none_per_decode(tokenizer):
    model = get_model(tokenizer, "cogvlm2")
    ids = torch.tensor([chat_ids(model, tokenizer, "what is this")])
    pv = pixels(model, make_image(7))
    counter = SyncCounter(count_tolist=True)
    with counter:
        out = model(input_ids=ids, pixel_values=pv)
    assert len(counter.syncs) == 1, counter.syncs  # checks + routing split, read together
    nxt = out.logits[:, -1:].argmax(-1)
    pos = cogvlm_position_ids(ids == model.config.image_token_id)[:, -1:] + 1
    counter = SyncCounter(count_tolist=True)
    with counter:
        model(input_ids=nxt, position_ids=pos, cache=output_cache(out))
    assert counter.syncs == []

    # a ragged, left-padded batch: the padding mask must not add host reads either
    rows = [(q, t, make_image(s) if s is not None else None) for q, t, s in RAGGED]
    batch = _batch(model, tokenizer, rows)
    counter = SyncCounter(count_tolist=True)
    with counter:
        out = model(**batch)
    assert len(counter.syncs) == 1, counter.syncs
    mask = torch.cat([batch["attention_mask"], torch.ones(3, 1, dtype=torch.long)], 1)
    pos = cogvlm_position_ids(batch["input_ids"] == model.config.image_token_id, batch["attention_mask"])[:, -1:] + 1
    counter = SyncCounter(count_tolist=True)
    with counter:
        model(input_ids=out.logits[:, -1:].argmax(-1), position_ids=pos, attention_mask=mask,
              cache=output_cache(out))
    assert counter.syncs == []


@torch.no_grad()
def test_labels_skip_image_positions(tokenizer):
    model = get_model(tokenizer, "cogvlm")
    answer = tokenizer.encode("a box", add_special_tokens=False)
    ids = torch.tensor([chat_ids(model, tokenizer, "what is this") + answer])
    pv = pixels(model, make_image(8))
    out = model(input_ids=ids, pixel_values=pv, labels=ids)
    labels = ids.masked_fill(ids == model.config.image_token_id, -100)
    ref = F.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    assert abs(out.loss.item() - ref.item()) <= 1e-5


def test_save_and_reload_keeps_weights(tokenizer, tmp_path):
    model = get_model(tokenizer, "cogvlm2")
    model.save_pretrained(tmp_path)
    loaded = CogVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.version == "cogvlm2" and loaded.config.num_image_tokens == 18
    ids = torch.tensor([chat_ids(model, tokenizer, "what is this")])
    pv = pixels(model, make_image(9))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, pixel_values=pv).logits, model(input_ids=ids, pixel_values=pv).logits)


# ---------------------------------------------------------------------------------------------------
# Chat, templates, processor
# ---------------------------------------------------------------------------------------------------


def test_templates():
    h = [("q1", "a1"), ("q2", "a2")]
    assert build_cogvlm_prompt("q3", h, "base") == "q3"
    assert build_cogvlm_prompt("q3", h, "chat") == (
        "Question: q1 Answer: a1\nQuestion: q2 Answer: a2\nQuestion: q3 Answer:"
    )
    assert build_cogvlm_prompt("q3", None, "vqa") == "Question: q3 Short answer:"
    assert build_cogvlm_prompt("q3", h[:1], "text") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: q1 ASSISTANT: a1\nUSER: q3 ASSISTANT:"
    )
    with pytest.raises(ValueError, match="template"):
        build_cogvlm_prompt("q", None, "llama3")
    with pytest.raises(ValueError, match="empty"):
        build_cogvlm_prompt("  ", None, "chat")
    with pytest.raises(ValueError, match="history"):
        build_cogvlm_prompt("q", [("only one",)], "chat")


def test_processor_batch(tokenizer):
    model = get_model(tokenizer, "cogvlm")
    cfg = model.config
    rows = [("what is it?", "chat", make_image(10)), ("hi", "text", None)]
    batch = _batch(model, tokenizer, rows)
    assert batch["pixel_values"].shape == (1, 3, 56, 56)
    first = chat_ids(model, tokenizer, "what is it?")
    second = chat_ids(model, tokenizer, "hi", template="text", image=False)
    width = max(len(first), len(second))
    assert batch["input_ids"][0, width - len(first) :].tolist() == first
    assert batch["input_ids"][1, width - len(second) :].tolist() == second
    assert batch["attention_mask"].sum(-1).tolist() == [len(first), len(second)]
    assert first[:2] == [tokenizer.bos_token_id, cfg.image_token_id]
    proc = CogVLMProcessor(CogVLMImageProcessor(size=56), tokenizer, num_image_tokens=18, image_token_id=400)
    with pytest.raises(ValueError, match="image entries"):
        proc(images=[make_image(1)], text=["a", "b"])


@pytest.mark.parametrize("version", ["cogvlm", "cogvlm2"])
def test_chat_and_stream_chat(tokenizer, version):
    model = get_model(tokenizer, version)
    image = make_image(11)
    response, history = model.chat(tokenizer, image, "what is this", max_new_tokens=5)
    assert history == [("what is this", response)]
    # the same turn by hand
    ids = torch.tensor([chat_ids(model, tokenizer, "what is this")])
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=pixels(model, image), max_new_tokens=5, do_sample=False,
                             pad_token_id=0, eos_token_id=tokenizer.eos_token_id)
    assert response == tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True).strip()
    streamed = list(model.stream_chat(tokenizer, image, "where", history=history, max_new_tokens=5))
    final, _ = model.chat(tokenizer, image, "where", history=history, max_new_tokens=5)
    assert streamed and streamed[-1][0] == final and streamed[-1][1] == history + [("where", final)]
    text_only, _ = model.chat(tokenizer, None, "hello", template="text", max_new_tokens=3)
    assert isinstance(text_only, str)


# ---------------------------------------------------------------------------------------------------
# Grounding
# ---------------------------------------------------------------------------------------------------


def test_parse_grounding():
    text = "A cat [[100,200,300,400]] sits next to two dogs [[000,000,500,500;510,020,999,999]]."
    groups = parse_grounding(text, (640, 480))
    assert [g["phrase"] for g in groups] == ["A cat", "sits next to two dogs"]
    # x * 640 // 1000, y * 480 // 1000
    assert groups[0]["boxes"] == [(64, 96, 192, 192)]
    assert groups[1]["boxes"] == [(0, 0, 320, 240), (326, 9, 639, 479)]
    assert text[slice(*groups[0]["span"])] == "[[100,200,300,400]]"
    assert parse_grounding("no boxes here", (10, 10)) == []
    assert parse_boxes("100,200,300,400", Image.new("RGB", (640, 480))) == [(64, 96, 192, 192)]
    assert format_box((64, 96, 192, 192), (640, 480)) == "[[100,200,300,400]]"


@pytest.mark.parametrize("bad", [
    "x [[100,200,300]]", "x [[100,200,300,400,500]]", "x [[1000,0,5,5]]", "x [[a,b,c,d]]",
    "x [[300,200,100,400]]", "x [[100,200,300,400;]]", "x [[100,200", "x [[-1,0,5,5]]",
])
def test_malformed_boxes_raise(bad):
    with pytest.raises(ValueError):
        parse_grounding(bad, (100, 100))


def test_draw_grounding():
    image = Image.new("RGB", (100, 80), (0, 0, 0))
    drawn = draw_grounding(image, "dog [[100,100,500,500]]", width=2)
    assert image.getpixel((10, 8)) == (0, 0, 0)  # the input is not modified
    assert drawn.getpixel((10, 30)) != (0, 0, 0)  # left edge of the box at x = 10
    assert drawn.getpixel((30, 30)) == (0, 0, 0)  # inside stays untouched


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_bad_inputs(tokenizer):
    model = get_model(tokenizer, "cogvlm")
    cfg = model.config
    ids = chat_ids(model, tokenizer, "what is this")
    pv = pixels(model, make_image(12))
    t = torch.tensor([ids])
    with pytest.raises(ValueError, match="placeholders"):  # image without placeholders
        model(input_ids=torch.tensor([chat_ids(model, tokenizer, "hi", image=False)]), pixel_values=pv)
    with pytest.raises(ValueError, match="placeholders"):  # placeholders without image
        model(input_ids=t)
    with pytest.raises(ValueError, match="placeholders"):  # two images, one run
        model(input_ids=t, pixel_values=torch.cat([pv, pv]))
    broken = list(ids)
    broken[5] = 7  # splits the run: same count once a stray placeholder is added at the end
    broken.append(cfg.image_token_id)
    with pytest.raises(ValueError, match="run"):
        model(input_ids=torch.tensor([broken]), pixel_values=pv)
    types = (t == cfg.image_token_id).long()
    ok = model(input_ids=t, pixel_values=pv, token_type_ids=types).logits
    assert torch.equal(ok, model(input_ids=t, pixel_values=pv).logits)
    bad_types = types.clone()
    bad_types[0, -1] = 1  # a text token marked VISION
    with pytest.raises(ValueError, match="token_type_ids disagree"):
        model(input_ids=t, pixel_values=pv, token_type_ids=bad_types)
    with pytest.raises(ValueError, match="token_type_ids disagree"):
        model(input_ids=t, pixel_values=pv, token_type_ids=torch.zeros_like(t))
    out = model(input_ids=t, pixel_values=pv)
    with pytest.raises(ValueError, match="position_ids are required"):
        model(input_ids=t[:, -1:], cache=output_cache(out))
    with pytest.raises(ValueError, match="pixel_values need input_ids"):
        model(inputs_embeds=torch.zeros(1, 3, 64), pixel_values=pv)
    with pytest.raises(ValueError, match="patches"):
        model(input_ids=t, pixel_values=torch.zeros(1, 3, 70, 70))
    with pytest.raises(ValueError, match="version"):
        CogVLMConfig(version="cogvlm3")
    with pytest.raises(ValueError, match="even patch grid"):
        CogVLMConfig(version="cogvlm2", vision_config=dict(
            image_size=42, patch_size=14, layernorm_order="post_sublayer", drop_cls_token=True))
    with pytest.raises(TypeError):
        model.chat(tokenizer, None, "hi", history="not a list")


def test_processor_save_and_reload(tokenizer, tmp_path):
    proc = CogVLMProcessor(CogVLMImageProcessor(size=56), tokenizer, num_image_tokens=18, image_token_id=400,
                           pad_token_id=0)
    proc.save_pretrained(tmp_path)
    loaded = CogVLMProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert (loaded.num_image_tokens, loaded.image_token_id, loaded.pad_token_id) == (18, 400, 0)
    assert loaded.image_processor.size == {"height": 56, "width": 56}
    image = make_image(13)
    a, b = proc(images=image, text="Question: hi Answer:"), loaded(images=image, text="Question: hi Answer:")
    assert a["input_ids"].tolist() == b["input_ids"].tolist()
    assert torch.equal(a["pixel_values"], b["pixel_values"])
