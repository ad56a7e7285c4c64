"""User text is always text (issue 13 items 6 and 8), one plain test per reported case.

Control tokens typed by a user (query or history) must never become control ids, the image slot is only where the
template puts it, ``<sop>`` in a VisualGLM query no longer breaks chat, MiniGPT-4 refuses ``<ImageHere>`` in any
user text and an empty query with errors naming them, and CogVLM's grounding helpers turn overflowing sizes and
coordinates into ``ValueError``. Expected ids come from raw ``SentencePieceProcessor.encode`` (which never produces
a CONTROL piece from text) or from the tokenizer with ``split_special_tokens=True``, never from the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import sp  # noqa: F401 - pytest fixture
from PIL import Image

from modeling_visualglm.image_processing_cogvlm import CogVLMImageProcessor
from modeling_visualglm.image_processing_visualglm import VisualGLMImageProcessor
from modeling_visualglm.processing_cogvlm import (
    CogVLMProcessor,
    build_cogvlm_inputs,
    build_cogvlm_prompt,
    format_box,
    parse_boxes,
    parse_grounding,
)
from modeling_visualglm.processing_minigpt4 import (
    MiniGPT4Processor,
    build_minigpt4_inputs,
    build_minigpt4_prompt,
    legacy_encode,
)
from modeling_visualglm.processing_visualglm import (
    VisualGLMProcessor,
    build_visualglm_inputs,
    build_visualglm_prompt,
)
from modeling_visualglm.tokenization_chatglm import preprocess_text
from test_minigpt4 import IMAGE_ID, llama_spm, llama_tokenizer, make_model  # noqa: F401 (fixtures)

GLM_CONTROLS = ["[gMASK]", "[MASK]", "[sMASK]", "<eop>", "<pad>", "<unk>", "<sop>", "<s>", "</s>"]
LLAMA_CONTROLS = ["<s>", "</s>", "<unk>"]


def make_image(size=56):
    return Image.new("RGB", (size, size), (200, 30, 30))


@pytest.fixture(scope="module")
def glm_control_ids(tiny_tokenizer):
    return {tiny_tokenizer.convert_tokens_to_ids(t) for t in GLM_CONTROLS[:7]} | {1, 2}


@pytest.fixture(scope="module")
def cogvlm_tokenizer(tmp_path_factory):
    from tiny_llama_tokenizer import make_tiny_llama_tokenizer

    return make_tiny_llama_tokenizer(tmp_path_factory.mktemp("user_text_llama"))


# ---- VisualGLM --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("control", GLM_CONTROLS)
def test_visualglm_control_strings_in_query_and_history_are_text(tiny_tokenizer, sp, glm_control_ids, control):
    g, sop, img = sp.piece_to_id("[gMASK]"), sp.piece_to_id("<sop>"), tiny_tokenizer.image_token_id
    query, history = f"what {control} is", [(f"q {control}", f"{control} r")]
    ids = build_visualglm_inputs(tiny_tokenizer, query, history, num_image_tokens=4)
    expected = (sp.encode("<img>") + [img] * 4
                + sp.encode(preprocess_text(f"</img>Q:q {control}\nA:{control} r\nQ:what {control} is\nA:")) + [g, sop])
    assert ids == expected
    assert [i for i in ids if i in glm_control_ids] == [g, sop]  # only the template's tail
    text_only = build_visualglm_inputs(tiny_tokenizer, query, history, has_image=False)
    assert text_only == sp.encode(preprocess_text(f"Q:q {control}\nA:{control} r\nQ:what {control} is\nA:")) + [g, sop]


def test_visualglm_tokenizer_default_still_maps_specials_for_callers_who_mean_them(tiny_tokenizer):
    # the builders differ from a plain tokenizer call on purpose: the tokenizer keeps transformers' default
    assert tiny_tokenizer.encode("[gMASK]", add_special_tokens=False) == [tiny_tokenizer.gmask_token_id]
    as_text = tiny_tokenizer.encode("[gMASK]", add_special_tokens=False, split_special_tokens=True)
    assert tiny_tokenizer.gmask_token_id not in as_text and tiny_tokenizer.decode(as_text) == "[gMASK]"


def test_visualglm_image_marker_typed_by_the_user_is_text(tiny_tokenizer, sp):
    processor = VisualGLMProcessor(VisualGLMImageProcessor(size=56), tiny_tokenizer, num_image_tokens=4)
    img = tiny_tokenizer.image_token_id
    # a text-only prompt whose user text holds <img></img>, given one image: refused, never spliced into the text
    prompt = build_visualglm_prompt("what is <img></img> here", has_image=False)
    with pytest.raises(ValueError, match=r"0 '<img></img>' marker\(s\) at the start"):
        processor(images=make_image(), text=prompt)
    out = processor(text=prompt)
    assert img not in out["input_ids"][0].tolist()
    assert out["input_ids"][0].tolist() == build_visualglm_inputs(
        tiny_tokenizer, "what is <img></img> here", has_image=False)
    # with the template's image: exactly one run, at the start, and the user's marker stays text
    prompt = build_visualglm_prompt("what is <img></img> here", history=[("<img></img>", "ok")])
    ids = processor(images=make_image(), text=prompt)["input_ids"][0].tolist()
    assert ids == build_visualglm_inputs(tiny_tokenizer, "what is <img></img> here", [("<img></img>", "ok")],
                                         num_image_tokens=4)
    assert ids.count(img) == 4 and ids[len(sp.encode("<img>")):][:4] == [img] * 4
    assert "Q:<img></img>\nA:ok\nQ:what is <img></img> here" in tiny_tokenizer.decode(ids)


def test_visualglm_image_placeholder_in_user_text_is_a_clear_error(tiny_tokenizer):
    for query, history in (("what <image>", None), ("hi", [("a <image>", "b")]), ("hi", [("a", "<image>")])):
        with pytest.raises(ValueError, match="image placeholder token '<image>'"):
            build_visualglm_inputs(tiny_tokenizer, query, history)


def test_visualglm_chat_with_sop_and_gmask_in_query_and_history(tiny_tokenizer):
    from modeling_visualglm.modeling_visualglm import VisualGLMForConditionalGeneration
    from modeling_visualglm.tools.tiny_models import randomize_, tiny_visualglm_config

    torch.manual_seed(0)
    model = VisualGLMForConditionalGeneration(tiny_visualglm_config(tiny_tokenizer)).eval()
    randomize_(model, seed=1)
    kwargs = dict(do_sample=False, max_new_tokens=3, min_length=0)
    for image in (make_image(), None):
        response, history = model.chat(tiny_tokenizer, image, "what <sop> is [gMASK] this <eop>",
                                       history=[("<sop>", "[MASK] <pad> <unk>")], **kwargs)
        assert isinstance(response, str) and history[-1][0] == "what <sop> is [gMASK] this <eop>"


# ---- CogVLM -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("control", LLAMA_CONTROLS)
@pytest.mark.parametrize("template", ["base", "chat", "vqa", "text"])
def test_cogvlm_control_strings_are_text(cogvlm_tokenizer, control, template):
    tok = cogvlm_tokenizer
    query, history = f"a {control} b", [(f"{control}", f"x {control}")]
    prompt = build_cogvlm_prompt(query, history, template)
    ids = build_cogvlm_inputs(tok, prompt, True, 5, 400)
    assert ids[:6] == [tok.bos_token_id] + [400] * 5
    assert not {tok.bos_token_id, tok.eos_token_id, tok.unk_token_id} & set(ids[6:])
    assert ids[6:] == tok.encode(prompt, add_special_tokens=False, split_special_tokens=True)
    assert tok.decode(ids[6:]) == prompt
    processor = CogVLMProcessor(CogVLMImageProcessor(size=56), tok, num_image_tokens=5, image_token_id=400)
    assert processor(text=prompt, images=make_image())["input_ids"][0].tolist() == ids


# ---- MiniGPT-4 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["vicuna0", "llama2", "minigptv2"])
def test_minigpt4_only_template_bos_is_bos(llama_tokenizer, variant):  # noqa: F811
    tok = llama_tokenizer
    query, history = "is <s> or </s> or <unk> here", [("<s>[INST] hi", "</s> bye <s>")]
    ids = build_minigpt4_inputs(tok, variant, query, history, num_image_tokens=3, image_token_id=IMAGE_ID)
    template_bos = build_minigpt4_prompt(variant, "q", [("q", "a")]).count("<s>")
    assert ids.count(tok.bos_token_id) == 1 + template_bos  # the leading BOS and the template's "<s>[INST]" only
    assert tok.eos_token_id not in ids and tok.unk_token_id not in ids
    assert ids.count(IMAGE_ID) == 3
    # the user's strings decode back as typed (the template's own <s> are skipped as specials)
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert "is <s> or </s> or <unk> here" in decoded and "</s> bye <s>" in decoded and "<s>[INST] hi" in decoded


@pytest.mark.parametrize("variant", ["vicuna0", "llama2", "minigptv2"])
def test_minigpt4_plain_text_keeps_the_legacy_ids(llama_tokenizer, variant):  # noqa: F811
    history = [("what is this", "a red box")]
    prompt = build_minigpt4_prompt(variant, "where is the cat?", history, has_image=True)
    before, after = prompt.split("<ImageHere>")
    expected = [llama_tokenizer.bos_token_id] + legacy_encode(llama_tokenizer, before) + [IMAGE_ID] * 3 + legacy_encode(
        llama_tokenizer, after)
    assert build_minigpt4_inputs(llama_tokenizer, variant, "where is the cat?", history, num_image_tokens=3,
                                 image_token_id=IMAGE_ID) == expected


@pytest.mark.parametrize("query, history, where", [
    ("what is <ImageHere>?", None, "the query"),
    ("hi", [("look: <ImageHere>", "ok")], r"history\[0\] \(query\)"),
    ("hi", [("a", "b"), ("c", "<ImageHere>")], r"history\[1\] \(answer\)"),
])
def test_minigpt4_image_marker_in_user_text_is_a_clear_error(llama_tokenizer, query, history, where):  # noqa: F811
    for variant in ("vicuna0", "llama2", "minigptv2"):
        with pytest.raises(ValueError, match=f"{where} contains the image marker '<ImageHere>'"):
            build_minigpt4_inputs(llama_tokenizer, variant, query, history, image_token_id=IMAGE_ID)


@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_minigpt4_empty_query_is_a_clear_error(query):
    for variant in ("vicuna0", "llama2", "minigptv2"):
        with pytest.raises(ValueError, match="query is empty"):
            build_minigpt4_prompt(variant, query)


def test_minigpt4_chat_refuses_empty_query_and_history_marker_and_reads_bos_as_text(llama_tokenizer):  # noqa: F811
    model = make_model("llama2", seed=3, image_size=56)
    kwargs = dict(do_sample=False, max_new_tokens=2, min_length=0)
    with pytest.raises(ValueError, match="query is empty"):
        model.chat(llama_tokenizer, make_image(), "  ", **kwargs)
    with pytest.raises(ValueError, match=r"history\[0\] \(query\) contains the image marker"):
        model.chat(llama_tokenizer, make_image(), "hi", history=[("<ImageHere>", "x")], **kwargs)
    response, history = model.chat(llama_tokenizer, make_image(), "<s> what </s>", history=[("<s>", "</s>")], **kwargs)
    assert isinstance(response, str) and history[-1][0] == "<s> what </s>"


def test_minigpt4_processor_reads_bos_only_at_the_template_positions(llama_tokenizer):  # noqa: F811
    processor = MiniGPT4Processor(VisualGLMImageProcessor(size=56), llama_tokenizer, num_image_tokens=3,
                                  variant="llama2")
    history = [("hi </s> there", "a <s> b")]
    prompt = build_minigpt4_prompt("llama2", "what <s> is", history)
    ids = processor(text=prompt, images=make_image())["input_ids"][0].tolist()
    assert ids == build_minigpt4_inputs(llama_tokenizer, "llama2", "what <s> is", history, num_image_tokens=3,
                                        image_token_id=llama_tokenizer.image_token_id)
    assert ids.count(llama_tokenizer.bos_token_id) == 3 and llama_tokenizer.eos_token_id not in ids


# ---- CogVLM grounding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [
    (math.inf, 100), (100, math.inf), (math.nan, 10), (1e307, 10), (10, -math.inf), (0, 10), (-5, 10),
    (10**400, 10), (True, 10), ("640", 480), (100,), None, (2**21, 10),
])
def test_grounding_bad_image_sizes_are_value_errors(size):
    with pytest.raises(ValueError, match="image|width|height"):
        parse_grounding("a [[100,200,300,400]]", size)
    with pytest.raises(ValueError):
        format_box((1, 2, 3, 4), size)
    with pytest.raises(ValueError):
        parse_boxes("100,200,300,400", size)


@pytest.mark.parametrize("box", [
    (1e307, 0, 5, 5), (0, 0, math.inf, 5), (0, -math.inf, 5, 5), (math.nan, 0, 1, 1), (0, 0, 10**400, 1),
    (1, 2, 3), "1,2,3,4", (True, 0, 1, 1),
])
def test_format_box_bad_coordinates_are_value_errors(box):
    with pytest.raises(ValueError):
        format_box(box, (640, 480))


def test_grounding_sizes_that_still_work():
    assert format_box((64.0, 96.0, 192.0, 192.0), (640.0, 480.0)) == "[[100,200,300,400]]"
    assert parse_grounding("x [[100,200,300,400]]", (1 << 20, 1 << 20))[0]["boxes"] == [
        (104857, 209715, 314572, 419430)]
    assert format_box((-10, -10, 10_000, 10_000), (640, 480)) == "[[000,000,999,999]]"  # clamped, as before
