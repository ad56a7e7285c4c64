"""VisualGLM image processor, prompt builder, processor and chat template; the CogVLM and MiniGPT-4 chat templates;
``pipeline("image-text-to-text")`` on the hub folders of every family.

Expected ids are spelled out from the VisualGLM rules (THUDM/VisualGLM-6B ``model/chat.py`` and the HF
``build_inputs_with_image``) with raw ``SentencePieceProcessor.encode`` calls on hand-written, already
preprocessed strings ("\\n" written as ``<n>``); expected pixels come from PIL's resize plus a NumPy
normalization with the constants of the spec (§1.4). The CogVLM and MiniGPT-4 chat templates are checked against
the prompt builders (text) and the models' own chat path (``_chat_inputs``: ids and pixels), with processors built
as the folder writer builds them (``hub_export.families``).
"""

import json
import logging
import os
import struct
import warnings
import zlib
from pathlib import Path

import jinja2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.utils.chat_template_utils import render_jinja_template

from helpers import sp, tok  # noqa: F401 - pytest fixtures
from modeling_visualglm.hub_export.families import FAMILIES
from modeling_visualglm import image_processing_visualglm, processing_visualglm
from modeling_visualglm.image_processing_cogvlm import CogVLMImageProcessor
from modeling_visualglm.image_processing_visualglm import VisualGLMImageProcessor
from modeling_visualglm.modeling_cogvlm import CogVLMForConditionalGeneration
from modeling_visualglm.modeling_minigpt4 import MiniGPT4ForConditionalGeneration
from modeling_visualglm.processing_cogvlm import TEMPLATES as COGVLM_TEMPLATES
from modeling_visualglm.processing_cogvlm import CogVLMProcessor, build_cogvlm_prompt, cogvlm_chat_template
from modeling_visualglm.processing_minigpt4 import TEMPLATES as MINIGPT4_VARIANTS
from modeling_visualglm.processing_minigpt4 import (
    MiniGPT4Processor,
    MiniGPT4Tokenizer,
    build_minigpt4_prompt,
    minigpt4_chat_template,
)
from modeling_visualglm.processing_visualglm import (
    VISUALGLM_CHAT_TEMPLATE,
    VisualGLMProcessor,
    build_visualglm_inputs,
    build_visualglm_prompt,
    process_response,
)
from test_minigpt4 import tiny_config as tiny_minigpt4_config
from test_tokenizer import run_isolated
from tiny_folders import FOLDERS, write_tiny_folder
from tiny_tokenizer import make_tiny_chatglm_tokenizer

from modeling_visualglm.tools.tiny_models import demo_image_path

DEMO = Path(demo_image_path())
SPEC_MEAN = (0.48145466, 0.4578275, 0.40821073)
SPEC_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def processor(tok):
    return VisualGLMProcessor(VisualGLMImageProcessor(size=56), tok)


def expected_pixels(image: Image.Image, size: int) -> np.ndarray:
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(resized, dtype=np.float32) / np.float32(255.0)  # (H, W, 3)
    x = (x - np.array(SPEC_MEAN, dtype=np.float32)) / np.array(SPEC_STD, dtype=np.float32)
    return x.transpose(2, 0, 1)


def shapes_image() -> Image.Image:
    """A non-square picture with a different colour in each corner (a crop or flip would show)."""
    image = Image.new("RGB", (90, 40), (255, 255, 255))
    corners = {(0, 0): (255, 0, 0), (80, 0): (0, 255, 0), (0, 30): (0, 0, 255), (80, 30): (0, 0, 0)}
    for (x, y), colour in corners.items():
        image.paste(colour, (x, y, x + 10, y + 10))
    return image


# ---- demo asset -----------------------------------------------------------------------------------------


def test_demo_image_is_small_and_as_documented():
    assert DEMO.stat().st_size < 20_000
    image = Image.open(DEMO)
    assert image.mode == "RGB" and image.size == (64, 48)
    documented = {(14, 16): (220, 30, 30), (38, 16): (30, 60, 200), (56, 27): (250, 200, 20),
                  (30, 32): (0, 0, 0), (10, 42): (70, 160, 60), (60, 2): (255, 255, 255)}
    for xy, rgb in documented.items():
        assert image.getpixel(xy) == rgb, xy


# ---- image processor ------------------------------------------------------------------------------------


def test_defaults_match_blip_eval_processor():
    ip = VisualGLMImageProcessor()
    assert ip.size == {"height": 224, "width": 224}
    assert tuple(ip.image_mean) == SPEC_MEAN and tuple(ip.image_std) == SPEC_STD
    assert ip.resample == Image.Resampling.BICUBIC


@pytest.mark.parametrize("source", ["pil", "str", "path"])
def test_pixels_match_an_independent_computation(source):
    image = Image.open(DEMO)
    arg = {"pil": image, "str": str(DEMO), "path": DEMO}[source]
    out = VisualGLMImageProcessor(size=56)(arg, return_tensors="pt")["pixel_values"]
    assert out.dtype == torch.float32 and out.shape == (1, 3, 56, 56)
    np.testing.assert_allclose(out[0].numpy(), expected_pixels(image, 56), rtol=0, atol=1e-6)


def test_squash_resize_without_crop_and_batches_in_order():
    a, b = shapes_image(), Image.open(DEMO).convert("RGBA")  # RGBA → RGB like the original's convert
    out = VisualGLMImageProcessor(size=56)([a, b])["pixel_values"]
    assert out.shape == (2, 3, 56, 56)
    np.testing.assert_allclose(out[0].numpy(), expected_pixels(a, 56), rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[1].numpy(), expected_pixels(b, 56), rtol=0, atol=1e-6)
    # corners keep their colours after squashing 90x40 → 56x56 (channel order R, G, B)
    red = (1.0 - SPEC_MEAN[0]) / SPEC_STD[0]
    assert out[0, 0, 0, 0] == pytest.approx(red, abs=0.05)


def test_image_processor_saves_and_reloads(tmp_path):
    VisualGLMImageProcessor(size=56).save_pretrained(tmp_path)
    again = VisualGLMImageProcessor.from_pretrained(tmp_path)
    assert again.size == {"height": 56, "width": 56}
    expected = VisualGLMImageProcessor(size=56)(str(DEMO))["pixel_values"]
    torch.testing.assert_close(again(str(DEMO))["pixel_values"], expected, rtol=0, atol=0)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixel data is a stub: only the header is read)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    stub = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", stub) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("empty.png", b"", "empty"),
        ("noise.jpg", bytes(range(256)) * 4, "corrupt or not an image"),
        ("truncated.png", DEMO.read_bytes()[:150], "truncated"),
        ("bomb.png", png_header_only(20000, 20000), "too large"),  # PIL's hard limit (2 x 89.5M px)
        ("big.png", png_header_only(10000, 9000), "more than the limit"),  # 90M px: PIL only warns
    ],
)
def test_bad_image_files_raise_value_error_naming_the_file(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message) as info:
        VisualGLMImageProcessor(size=56)(str(path))
    assert str(path) in str(info.value)


def test_other_bad_images():
    ip = VisualGLMImageProcessor(size=56)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        ip("missing.png")
    with pytest.raises(ValueError, match="zero size"):
        ip(Image.new("RGB", (0, 5)))
    with pytest.raises(TypeError, match="PIL image or a file path"):
        ip(123)
    with pytest.raises(ValueError, match="no images"):
        ip([])


# ---- prompt builder -------------------------------------------------------------------------------------


def test_prompt_format():
    history = [("描述这张图片。", "图中有一个红色的圆。"), ("它在哪里？", "在左上角。")]
    assert build_visualglm_prompt("还有什么？", history) == (
        "<img></img>问：描述这张图片。\n答：图中有一个红色的圆。\n问：它在哪里？\n答：在左上角。\n问：还有什么？\n答："
    )
    assert build_visualglm_prompt("What is it?", [("Hi", "Hello")]) == "<img></img>Q:Hi\nA:Hello\nQ:What is it?\nA:"
    assert build_visualglm_prompt("你好", has_image=False) == "问：你好\n答："
    assert build_visualglm_prompt("你好", english=True) == "<img></img>Q:你好\nA:"
    assert build_visualglm_prompt("hello", english=False) == "<img></img>问：hello\n答："


LANGUAGE_CASES = [("What is this?", True), ("这是什么", False), ("what is 猫", False), ("こんにちは", True),
                  ("\u4e00", False), ("\u4dff", True), ("\u9fa5", False), ("\u9fa6", True), ("ＡＢＣ？", True)]


@pytest.mark.parametrize("query, english", LANGUAGE_CASES)
def test_language_rule_is_cjk_u4e00_to_u9fa5_in_the_query(query, english):
    prompt = build_visualglm_prompt(query, history=[("中文历史", "回答")])
    assert prompt.endswith("\nA:" if english else "\n答：")


@pytest.mark.parametrize("query, english", LANGUAGE_CASES)
def test_chat_template_uses_the_same_language_rule(processor, query, english):
    q, a = ("Q:", "A:") if english else ("问：", "答：")
    messages = [{"role": "user", "content": "中文历史"}, {"role": "assistant", "content": "回答"},
                {"role": "user", "content": query}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == f"{q}中文历史\n{a}回答\n{q}{query}\n{a}"


@pytest.mark.parametrize(
    "query, history, error, match",
    [
        ("", None, ValueError, "empty"),
        ("  \n\t", None, ValueError, "empty"),
        (None, None, TypeError, "string"),
        ("hi", "not a list", TypeError, "list of"),
        ("hi", {"q": "r"}, TypeError, "list of"),
        ("hi", [("a", "b"), ("only one",)], ValueError, r"history\[1\]"),
        ("hi", [("a", "b", "c")], ValueError, r"history\[0\]"),
        ("hi", ["ab"], ValueError, r"history\[0\]"),
        ("hi", [("a", "b"), ("q", None)], TypeError, r"history\[1\]"),
    ],
)
def test_bad_queries_and_histories(tok, query, history, error, match):
    with pytest.raises(error, match=match):
        build_visualglm_prompt(query, history)
    with pytest.raises(error, match=match):
        build_visualglm_inputs(tok, query, history)


def test_inputs_with_image_derived_by_hand(tok, sp):
    g, sop, img = sp.piece_to_id("[gMASK]"), sp.piece_to_id("<sop>"), sp.get_piece_size()
    ids = build_visualglm_inputs(tok, "什么颜色？", history=[("描述这张图片", "一个圆")])
    # encode("<img>") ‖ 32 placeholders ‖ encode("</img>问：…\n答：") ‖ [gMASK, <sop>], two separate dummy prefixes
    expected = (
        sp.encode("<img>") + [img] * 32
        + sp.encode("</img>问：描述这张图片<n>答：一个圆<n>问：什么颜色？<n>答：") + [g, sop]
    )
    assert ids == expected
    assert sp.encode("<img>")[0] == sp.piece_to_id("▁")  # each piece really starts with its own "▁"
    assert ids != sp.encode("<img></img>问：描述这张图片<n>答：一个圆<n>问：什么颜色？<n>答：") + [g, sop]

    english = build_visualglm_inputs(tok, "What color?", num_image_tokens=4)
    assert english == sp.encode("<img>") + [img] * 4 + sp.encode("</img>Q:What color?<n>A:") + [g, sop]


def test_inputs_without_image_encode_the_whole_prompt(tok, sp):
    ids = build_visualglm_inputs(tok, "你好", history=[("问题", "回答")], has_image=False)
    assert ids == sp.encode("问：问题<n>答：回答<n>问：你好<n>答：") + [sp.piece_to_id("[gMASK]"), sp.piece_to_id("<sop>")]


def test_placeholder_text_in_a_query_is_refused(tok):
    with pytest.raises(ValueError, match="placeholder"):
        build_visualglm_inputs(tok, "what is <image>?")


# ---- processor ------------------------------------------------------------------------------------------


def test_processor_expansion_gives_the_same_ids_as_the_builder(processor, tok):
    history = [("描述这张图片", "一个圆")]
    prompt = build_visualglm_prompt("什么颜色？", history)
    out = processor(images=str(DEMO), text=prompt, return_tensors="pt")
    assert out["input_ids"][0].tolist() == build_visualglm_inputs(tok, "什么颜色？", history)
    assert out["attention_mask"].tolist() == [[1] * out["input_ids"].shape[1]]
    np.testing.assert_allclose(out["pixel_values"][0].numpy(), expected_pixels(Image.open(DEMO), 56), atol=1e-6)
    assert processor.image_token_id == tok.image_token_id and processor.num_image_tokens == 32


def test_processor_batch_left_pads_and_orders_images(processor, tok):
    texts = [
        build_visualglm_prompt("What is in the picture?"),
        build_visualglm_prompt("你好", has_image=False),
        build_visualglm_prompt("这是什么？"),
    ]
    first, second = shapes_image(), Image.open(DEMO)
    out = processor(images=[[first], [], [second]], text=texts, return_tensors="pt")
    rows = [
        build_visualglm_inputs(tok, "What is in the picture?"),
        build_visualglm_inputs(tok, "你好", has_image=False),
        build_visualglm_inputs(tok, "这是什么？"),
    ]
    width = max(map(len, rows))
    for row, ids, mask in zip(rows, out["input_ids"].tolist(), out["attention_mask"].tolist()):
        assert ids == [tok.pad_token_id] * (width - len(row)) + row
        assert mask == [0] * (width - len(row)) + [1] * len(row)
    assert out["pixel_values"].shape == (2, 3, 56, 56)
    np.testing.assert_allclose(out["pixel_values"][0].numpy(), expected_pixels(first, 56), atol=1e-6)
    np.testing.assert_allclose(out["pixel_values"][1].numpy(), expected_pixels(second, 56), atol=1e-6)


def test_processor_without_images(processor, tok):
    out = processor(text=build_visualglm_prompt("你好", has_image=False))
    assert "pixel_values" not in out
    assert out["input_ids"][0].tolist() == build_visualglm_inputs(tok, "你好", has_image=False)


@pytest.mark.parametrize(
    "images, text, match",
    [
        (None, "<img></img>问：这是什么\n答：", "1 '<img></img>' marker"),
        ([str(DEMO), str(DEMO)], "<img></img>问：这是什么\n答：", "2 image"),
        (str(DEMO), "问：这是什么\n答：", "0 '<img></img>' marker"),
        (str(DEMO), "<img></img>问：<image>\n答：", "placeholder"),
        (None, None, "needs text"),
    ],
)
def test_processor_input_errors(processor, images, text, match):
    with pytest.raises(ValueError, match=match):
        processor(images=images, text=text)


# ---- chat template --------------------------------------------------------------------------------------


def conversation(image, final_query="什么颜色？"):
    return [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "描述这张图片"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "一个圆"}]},
        {"role": "user", "content": [{"type": "text", "text": final_query}]},
    ]


@pytest.mark.parametrize("image_kind", ["pil", "path"])
def test_chat_template_matches_the_builder(processor, tok, image_kind):
    image = Image.open(DEMO) if image_kind == "pil" else str(DEMO)
    messages = conversation(image)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == build_visualglm_prompt("什么颜色？", [("描述这张图片", "一个圆")])
    out = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert out["input_ids"][0].tolist() == build_visualglm_inputs(tok, "什么颜色？", [("描述这张图片", "一个圆")])
    np.testing.assert_allclose(out["pixel_values"][0].numpy(), expected_pixels(Image.open(DEMO), 56), atol=1e-6)


def test_chat_template_language_and_text_only(processor, tok):
    english = [{"role": "user", "content": "What is this?"}]
    assert processor.apply_chat_template(english, add_generation_prompt=True) == "Q:What is this?\nA:"
    forced = processor.apply_chat_template(english, add_generation_prompt=True, english=False)
    assert forced == "问：What is this?\n答："
    chinese = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
               {"role": "user", "content": [{"type": "text", "text": "再见"}]}]
    out = processor.apply_chat_template(chinese, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert out["input_ids"][0].tolist() == build_visualglm_inputs(tok, "再见", [("你好", "你好！")], has_image=False)
    assert "pixel_values" not in out
    # image placed in a later turn still goes first, as in the original (one image per conversation)
    last = [{"type": "text", "text": "and this?"}, {"type": "image", "image": str(DEMO)}]
    late = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": last}]
    rendered = processor.apply_chat_template(late, add_generation_prompt=True)
    assert rendered == "<img></img>Q:hi\nA:hello\nQ:and this?\nA:"


@pytest.mark.parametrize(
    "messages, match",
    [
        (conversation(str(DEMO)) + [{"role": "assistant", "content": "x"},
                                    {"role": "user", "content": [{"type": "image", "image": str(DEMO)}]}],
         "at most one image"),
        ([{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}], "role system"),
        ([{"role": "assistant", "content": "hi"}], "alternate"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ],
)
def test_chat_template_errors(processor, messages, match):
    with pytest.raises(jinja2.TemplateError, match=match):
        processor.apply_chat_template(messages, add_generation_prompt=True)


# ---- process_response -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("  你好,世界!  \n", "你好，世界！"),
        ("我是[[训练时间]]训练的", "我是2023年训练的"),
        ("是吗?好的;走:了", "是吗？好的；走：了"),
        ("Hello, world! 3:4", "Hello, world! 3:4"),  # no CJK neighbour: unchanged
        ("a,好", "a，好"),  # the mark precedes an ideograph
        ("Hello, 世界", "Hello, 世界"),  # a space in between: unchanged
        ("好,,好", "好，，好"),  # one comma follows 好, the other precedes 好
        ("こんにちは,世界", "こんにちは，世界"),
        ("\u9fff!", "\u9fff！"),  # the punctuation rule reaches U+9FFF (the language rule stops at U+9FA5)
        ("\u4dff!", "\u4dff!"),
    ],
)
def test_process_response(raw, cleaned):
    assert process_response(raw) == cleaned


# ---- saving and remote-code loading ---------------------------------------------------------------------


def test_processor_save_and_auto_load_in_a_clean_interpreter(processor, tok, tmp_path):
    folder = tmp_path / "hub"
    make_tiny_chatglm_tokenizer(folder)
    VisualGLMProcessor(VisualGLMImageProcessor(size=56), tok, num_image_tokens=4).save_pretrained(folder)
    config = json.loads((folder / "processor_config.json").read_text())
    assert config["num_image_tokens"] == 4
    assert config["auto_map"]["AutoProcessor"] == "processing_visualglm.VisualGLMProcessor"
    image_auto_map = config["image_processor"]["auto_map"]
    assert image_auto_map["AutoImageProcessor"] == "image_processing_visualglm.VisualGLMImageProcessor"
    assert (folder / "chat_template.jinja").read_text() == VISUALGLM_CHAT_TEMPLATE
    for module in (processing_visualglm, image_processing_visualglm):
        assert (folder / os.path.basename(module.__file__)).read_bytes() == Path(module.__file__).read_bytes()

    messages = conversation(str(DEMO))
    out = run_isolated(
        f"""
        from transformers import AutoImageProcessor, AutoProcessor
        p = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        ip = AutoImageProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        enc = p.apply_chat_template({messages!r}, add_generation_prompt=True, tokenize=True,
                                    return_dict=True, return_tensors="pt")
        print(json.dumps({{
            "modules": [type(p).__module__, type(ip).__module__, type(p.tokenizer).__module__],
            "num_image_tokens": p.num_image_tokens,
            "ids": enc["input_ids"][0].tolist(),
            "pixels": enc["pixel_values"].flatten().tolist(),
            "ip_pixels": ip({str(DEMO)!r})["pixel_values"].flatten().tolist(),
        }}))
        """,
        tmp_path,
    )
    assert all(m.startswith("transformers_modules.") for m in out["modules"])
    assert out["num_image_tokens"] == 4
    assert out["ids"] == build_visualglm_inputs(tok, "什么颜色？", [("描述这张图片", "一个圆")], num_image_tokens=4)
    expected = expected_pixels(Image.open(DEMO), 56).flatten()
    np.testing.assert_allclose(out["pixels"], expected, atol=1e-6)
    np.testing.assert_allclose(out["ip_pixels"], expected, atol=1e-6)


# ---- CogVLM and MiniGPT-4 chat templates ----------------------------------------------------------------

# (query, history): empty and long histories, Chinese and English, quotes, newlines and "?" inside turns
CHAT_CASES = [
    ("What is in the picture?", []),
    ("它在哪里？", [("描述这张图片。", "图中有一个红色的圆。")]),
    ("And the colour?", [("Hi", "Hello!"), ("What's this? Describe it.", "A 'red' box.\nOn the left.")]),
    ("what is 猫 in English", [("你好", "hello"), ("再见", "bye")]),
]


def chat_messages(query, history, image=None, image_at="first"):
    """``history`` + ``query`` as alternating user/assistant messages; the image (if any) is a block of the first
    or of the last user message. Plain-string and block contents are mixed on purpose."""
    messages = []
    for q, a in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": [{"type": "text", "text": a}]}]
    messages.append({"role": "user", "content": [{"type": "text", "text": query}]})
    if image is not None:
        target = messages[0] if image_at == "first" else messages[-1]
        text = target["content"] if isinstance(target["content"], str) else target["content"][0]["text"]
        target["content"] = [{"type": "image", "path": image}, {"type": "text", "text": text}]
    return messages


def image_variants():
    """(image, where in the messages): none, in the first user message, in the last one."""
    return [(None, "first"), (str(DEMO), "first"), (str(DEMO), "last")]


def export_processor(family_name, config, tokenizer):
    """The processor the hub folder writer builds for ``config`` (hub_export.families' processor_kwargs)."""
    family = FAMILIES[family_name]
    image_processor = family.image_processor.load()(**family.image_processor_kwargs(config))
    return family.processor.load()(image_processor=image_processor, tokenizer=tokenizer,
                                   **family.processor_kwargs(config))


@pytest.fixture(scope="module")
def hub_folders(tmp_path_factory):
    """Tiny seeded hub folders of every family (tests/tiny_folders.py, written by hub_export's writer)."""
    root = tmp_path_factory.mktemp("tiny_hub_folders")
    return {name: write_tiny_folder(name, root / name) for name in FOLDERS}


@pytest.fixture(scope="module")
def cogvlm_parts(hub_folders):
    """version → (model, tokenizer) loaded from the tiny folders with our classes."""
    from transformers import AutoTokenizer

    return {version: (CogVLMForConditionalGeneration.from_pretrained(hub_folders[version], dtype=torch.float32).eval(),
                      AutoTokenizer.from_pretrained(hub_folders[version]))
            for version in ("cogvlm", "cogvlm2")}


@pytest.fixture(scope="module")
def minigpt4_tokenizer(hub_folders):
    return MiniGPT4Tokenizer.from_pretrained(hub_folders["minigpt4"])


@pytest.fixture(scope="module")
def minigpt4_models():
    """variant → an (untrained) tiny model whose vocabulary and image id match the tiny folder's tokenizer."""
    return {variant: MiniGPT4ForConditionalGeneration(tiny_minigpt4_config(variant)).eval()
            for variant in MINIGPT4_VARIANTS}


def assert_same_as_chat(enc, model, tokenizer, image, query, history):
    """``enc`` (one conversation through apply_chat_template) == the model's chat inputs: ids and pixels."""
    ids, pixel_values, _ = model._chat_inputs(tokenizer, image, query, history, {})
    assert enc["input_ids"].tolist() == ids.tolist()
    assert enc["attention_mask"].tolist() == [[1] * ids.shape[1]]
    if image is None:
        assert pixel_values is None and "pixel_values" not in enc
    else:
        torch.testing.assert_close(enc["pixel_values"], pixel_values, rtol=0, atol=0)


@pytest.mark.parametrize("template", COGVLM_TEMPLATES)
@pytest.mark.parametrize("version", ["cogvlm", "cogvlm2"])
def test_cogvlm_chat_template_is_the_builder_and_the_chat_inputs(cogvlm_parts, version, template, monkeypatch):
    model, tokenizer = cogvlm_parts[version]
    monkeypatch.setattr(model.config, "template_version", template)  # as a folder converted with this template
    processor = export_processor("cogvlm", model.config, tokenizer)
    assert processor.template_version == template
    for query, history in CHAT_CASES:
        for image, image_at in image_variants():
            messages = chat_messages(query, history, image, image_at)
            text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            assert text == build_cogvlm_prompt(query, history, template), (query, image_at)
            enc = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True, return_tensors="pt")
            assert_same_as_chat(enc, model, tokenizer, image, query, history)


# text the templates must pass through untouched: CJK, quotes, backslashes, newlines, Jinja's own delimiters
TURN_TEXT = st.lists(st.sampled_from(list("ab Z?!.,'\"\\\n{}%#[]<>/:你好图片。？") + ["{{", "}}", "{%", "###"]),
                     min_size=1, max_size=12).map("".join).filter(str.strip)


@settings(max_examples=60, deadline=None)
@given(query=TURN_TEXT, history=st.lists(st.tuples(TURN_TEXT, TURN_TEXT), max_size=3), image=st.booleans())
def test_chat_templates_render_any_text_as_the_builders(query, history, image):
    messages = chat_messages(query, history, str(DEMO) if image else None, image_at="last")
    for template in COGVLM_TEMPLATES:
        rendered = render_chat(cogvlm_chat_template(template), messages)
        assert rendered == build_cogvlm_prompt(query, history, template)
    for variant in MINIGPT4_VARIANTS:
        rendered = render_chat(minigpt4_chat_template(variant), messages)
        assert rendered == build_minigpt4_prompt(variant, query, history, has_image=image)


def render_chat(template, messages):
    prompts, _ = render_jinja_template(conversations=[messages], chat_template=template, add_generation_prompt=True)
    return prompts[0]


@pytest.mark.parametrize("variant", sorted(MINIGPT4_VARIANTS))
def test_minigpt4_chat_template_is_the_builder_and_the_chat_inputs(minigpt4_models, minigpt4_tokenizer, variant):
    model, tokenizer = minigpt4_models[variant], minigpt4_tokenizer
    processor = export_processor("minigpt4", model.config, tokenizer)
    assert processor.variant == variant and processor.num_image_tokens == model.config.num_image_tokens
    for query, history in CHAT_CASES:
        for image, image_at in image_variants():
            messages = chat_messages(query, history, image, image_at)
            text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            # the image goes into the first user message wherever it was given; the text starts with the BOS that
            # servers tokenizing it themselves need (the processor drops it, and adds the id)
            assert text == tokenizer.bos_token + build_minigpt4_prompt(variant, query, history,
                                                                       has_image=image is not None)
            enc = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True, return_tensors="pt")
            assert_same_as_chat(enc, model, tokenizer, image, query, history)


def test_chat_templates_without_generation_prompt_and_with_an_answer_to_continue(cogvlm_parts, minigpt4_tokenizer):
    """Without add_generation_prompt the prompt stops before the assistant's tag; a final assistant message with
    continue_final_message=True is the start of the answer, right after the tag as the builder writes it."""
    _, tokenizer = cogvlm_parts["cogvlm"]
    history = [("Hi", "Hello!")]
    messages = chat_messages("What is it?", history, str(DEMO))
    prefill = messages + [{"role": "assistant", "content": "A red"}]
    for template in COGVLM_TEMPLATES:
        processor = CogVLMProcessor(CogVLMImageProcessor(size=56), tokenizer, num_image_tokens=18, image_token_id=400,
                                    template_version=template)
        prompt = build_cogvlm_prompt("What is it?", history, template)
        bare = processor.apply_chat_template(messages, add_generation_prompt=False)
        assert prompt.startswith(bare) and (bare == prompt) == (template == "base")
        continued = processor.apply_chat_template(prefill, continue_final_message=True)
        assert continued == prompt + ("A red" if template == "base" else " A red")  # "Answer:" + " " + answer
    for variant in MINIGPT4_VARIANTS:
        processor = MiniGPT4Processor(VisualGLMImageProcessor(size=56), minigpt4_tokenizer, variant=variant)
        prompt = minigpt4_tokenizer.bos_token + build_minigpt4_prompt(variant, "What is it?", history)
        bare = processor.apply_chat_template(messages, add_generation_prompt=False)
        assert prompt.startswith(bare) and bare != prompt
        assert processor.apply_chat_template(prefill, continue_final_message=True) == prompt + "A red"


def left_padded(rows, pad):
    width = max(map(len, rows))
    return ([[pad] * (width - len(r)) + r for r in rows], [[0] * (width - len(r)) + [1] * len(r) for r in rows])


@pytest.mark.parametrize("family", ["cogvlm", "minigpt4"])
def test_batched_chat_template_is_the_left_padded_chat_inputs(cogvlm_parts, minigpt4_models, minigpt4_tokenizer,
                                                              family):
    """A batch of conversations (transformers passes the images nested per conversation; some have none) gives the
    rows of ``_chat_inputs`` left-padded, and the images in row order."""
    model, tokenizer = cogvlm_parts["cogvlm2"] if family == "cogvlm" else (minigpt4_models["vicuna0"],
                                                                          minigpt4_tokenizer)
    processor = export_processor(family, model.config, tokenizer)
    first, second = shapes_image(), str(DEMO)
    rows = [("What is in the picture?", [], first), ("你好", [("Hi", "Hello!")], None),
            ("And here?", [("Describe it.", "A box.")], second)]
    conversations = [chat_messages(q, h, None) for q, h, _ in rows]
    conversations[0][0]["content"].insert(0, {"type": "image", "image": first})
    conversations[2][-1]["content"].append({"type": "image", "path": second})
    texts = processor.apply_chat_template(conversations, add_generation_prompt=True)
    enc = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")
    singles = [model._chat_inputs(tokenizer, image, q, h, {}) for q, h, image in rows]
    pad = processor.pad_token_id if family == "cogvlm" else tokenizer.unk_token_id  # the tiny Llama has no pad
    assert family == "cogvlm" or tokenizer.pad_token_id is None
    ids, mask = left_padded([s[0][0].tolist() for s in singles], pad)
    assert enc["input_ids"].tolist() == ids and enc["attention_mask"].tolist() == mask
    assert enc["input_ids"][:, 0].tolist() != enc["input_ids"][:, -1].tolist()  # really ragged
    torch.testing.assert_close(enc["pixel_values"], torch.cat([singles[0][1], singles[2][1]]), rtol=0, atol=0)
    # the rendered strings go through the processor call the same way (images: one entry per prompt, or nested)
    for images in ([first, None, second], [[first], [], [second]]):
        again = processor(text=texts, images=images)
        assert again["input_ids"].tolist() == ids
        torch.testing.assert_close(again["pixel_values"], enc["pixel_values"], rtol=0, atol=0)


def test_cogvlm_template_version_override_and_export(cogvlm_parts, tmp_path):
    """``template_version=`` in apply_chat_template picks another template for one call; a processor saved with a
    template keeps it (processor_config.json and chat_template.jinja) and reloads to the same prompts."""
    _, tokenizer = cogvlm_parts["cogvlm"]
    processor = CogVLMProcessor(CogVLMImageProcessor(size=56), tokenizer, num_image_tokens=18, image_token_id=400,
                                template_version="vqa")
    query, history = CHAT_CASES[2]
    messages = chat_messages(query, history, str(DEMO))
    assert processor.build_prompt(query, history) == build_cogvlm_prompt(query, history, "vqa")
    for template in COGVLM_TEMPLATES:
        rendered = processor.apply_chat_template(messages, add_generation_prompt=True, template_version=template)
        assert rendered == build_cogvlm_prompt(query, history, template)
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["template_version"] == "vqa"
    assert (tmp_path / "chat_template.jinja").read_text() == cogvlm_chat_template("vqa")
    loaded = CogVLMProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert loaded.template_version == "vqa"
    rendered = loaded.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == build_cogvlm_prompt(query, history, "vqa")


def test_minigpt4_variant_is_saved(minigpt4_tokenizer, tmp_path):
    processor = MiniGPT4Processor(VisualGLMImageProcessor(size=56), minigpt4_tokenizer, num_image_tokens=4,
                                  variant="llama2")
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert (config["variant"], config["num_image_tokens"]) == ("llama2", 4)
    assert (tmp_path / "chat_template.jinja").read_text() == minigpt4_chat_template("llama2")
    loaded = MiniGPT4Processor.from_pretrained(tmp_path, trust_remote_code=True)
    assert loaded.variant == "llama2" and loaded.build_prompt("hi") == build_minigpt4_prompt("llama2", "hi")


def test_hub_folders_carry_the_chat_templates(hub_folders):
    for name in ("cogvlm", "cogvlm2"):
        assert (hub_folders[name] / "chat_template.jinja").read_text() == cogvlm_chat_template("chat")
    assert (hub_folders["minigpt4"] / "chat_template.jinja").read_text() == minigpt4_chat_template("vicuna0")


TWO_IMAGES = chat_messages("And this?", [("Describe it.", "A box.")], str(DEMO))
TWO_IMAGES[-1]["content"].append({"type": "image", "path": str(DEMO)})
TEMPLATE_ERRORS = [
    (TWO_IMAGES, {}, "at most one image"),
    ([{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}], {}, "role system"),
    ([{"role": "assistant", "content": "hi"}], {}, "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], {}, "alternate"),
]


@pytest.mark.parametrize("messages, kwargs, match", TEMPLATE_ERRORS + [
    ([{"role": "user", "content": "hi"}], {"template_version": "qa"}, "template_version must be one of"),
])
def test_cogvlm_chat_template_errors(cogvlm_parts, messages, kwargs, match):
    processor = CogVLMProcessor(CogVLMImageProcessor(size=56), cogvlm_parts["cogvlm"][1], num_image_tokens=18,
                                image_token_id=400)
    with pytest.raises(jinja2.TemplateError, match=match):
        processor.apply_chat_template(messages, add_generation_prompt=True, **kwargs)


@pytest.mark.parametrize("messages, kwargs, match", TEMPLATE_ERRORS + [
    ([{"role": "user", "content": "what is <ImageHere>?"}], {}, "image marker <ImageHere>"),
])
def test_minigpt4_chat_template_errors(minigpt4_tokenizer, messages, kwargs, match):
    processor = MiniGPT4Processor(VisualGLMImageProcessor(size=56), minigpt4_tokenizer, num_image_tokens=4)
    with pytest.raises(jinja2.TemplateError, match=match):
        processor.apply_chat_template(messages, add_generation_prompt=True, **kwargs)


def test_processor_argument_errors(cogvlm_parts, minigpt4_tokenizer):
    tokenizer = cogvlm_parts["cogvlm"][1]
    with pytest.raises(ValueError, match="template_version must be one of"):
        CogVLMProcessor(CogVLMImageProcessor(size=56), tokenizer, template_version="qa")
    with pytest.raises(ValueError, match="unknown MiniGPT-4 variant"):
        MiniGPT4Processor(VisualGLMImageProcessor(size=56), minigpt4_tokenizer, variant="vicuna1")
    cogvlm = CogVLMProcessor(CogVLMImageProcessor(size=56), tokenizer, num_image_tokens=18, image_token_id=400)
    minigpt4 = MiniGPT4Processor(VisualGLMImageProcessor(size=56), minigpt4_tokenizer, num_image_tokens=4)
    with pytest.raises(ValueError, match="prompt 0 has 2 images"):
        cogvlm(text="Question: hi Answer:", images=[[str(DEMO), str(DEMO)]])
    for processor, prompt in ((cogvlm, "Question: hi Answer:"), (minigpt4, "###Human: hi###Assistant: ")):
        with pytest.raises(TypeError, match=r"unexpected arguments \['do_sample'\].*generate_kwargs"):
            processor(text=prompt, do_sample=False)  # what pipeline(..., do_sample=False) would pass on
        with pytest.raises(ValueError, match="images only"):
            processor(text=prompt, videos=["clip.mp4"])
    # what apply_chat_template passes to every processor is accepted (and means nothing here)
    out = cogvlm(text="Question: hi Answer:", images=[[str(DEMO)]], add_special_tokens=False, padding=True)
    assert out["input_ids"][0, :2].tolist() == [tokenizer.bos_token_id, 400]


# ---- pipelines -------------------------------------------------------------------------------------------


class _LogRecorder(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("name", FOLDERS)
def test_image_text_to_text_pipeline_is_chat_inputs_plus_greedy_generate(hub_folders, name):
    """``pipeline("image-text-to-text")`` on a hub folder: loads, renders the chat through the folder's chat template
    and generates (greedy, from the neutral generation_config.json) what ``generate`` does on the inputs of the
    model's own ``chat``, without a warning."""
    from transformers import pipeline

    query, history = "Describe the image.", [("Hi", "Hello!")]
    messages = chat_messages(query, history, str(DEMO), image_at="last")
    recorder = _LogRecorder()
    logging.getLogger("transformers").addHandler(recorder)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe = pipeline("image-text-to-text", model=str(hub_folders[name]), trust_remote_code=True,
                            dtype=torch.float32)
            out = pipe(text=messages, max_new_tokens=4, return_full_text=False)
    finally:
        logging.getLogger("transformers").removeHandler(recorder)
    assert not [str(w.message) for w in caught] and not recorder.messages

    model, tokenizer = pipe.model, pipe.tokenizer
    input_ids, pixel_values, _ = model._chat_inputs(tokenizer, str(DEMO), query, history, {})
    with torch.no_grad():
        reference = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                   pixel_values=pixel_values, max_new_tokens=4, do_sample=False)
    new_tokens = reference[0, input_ids.shape[1]:].tolist()
    expected = tokenizer.decode(new_tokens, skip_special_tokens=True)
    assert len(new_tokens) == 4 and expected.strip()  # a real answer, not an immediate end of text
    assert out[0]["generated_text"] == expected
