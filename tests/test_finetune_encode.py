"""visualglm-finetune asks as ``chat`` asks (issue 16): on the shipped tiny trained models, every chat-format sample
(VisualGLM fewshot JSON, CogVLM-SFT folder, messages JSONL) encodes to the very prompt ids the model's own
``_chat_inputs`` feeds ``generate`` for the same question, image and history, and its answer ends the way generation
stops (and the way ``tools/train_tiny.py`` trained the shipped models). cc_sbu_align keeps MiniGPT-4's stage-2
template on purpose (tests/test_finetune.py compares it with the original's rule).
"""

from __future__ import annotations

import json

import pytest
import torch

from modeling_visualglm.tools import shapes
from modeling_visualglm.tools.finetune import data
from modeling_visualglm.tools.finetune.encode import IGNORE, SampleEncoder
from modeling_visualglm.tools.finetune.model import load_config, load_processing, model_class
from modeling_visualglm.tools.train_tiny import FAMILIES as TRAINING

FAMILIES = ("visualglm", "minigpt4", "cogvlm")
RED_CIRCLE = shapes.Scene(0, 0, 4, 1 << 30)
# (question, answer) turns; the second asks in Chinese after an English turn (VisualGLM picks 问/答 from the query)
TURNS = [(shapes.question("colour", "en"), "red"), (shapes.question("shape", "zh"), "圆形")]


@pytest.fixture(scope="module")
def chat_format_data(tmp_path_factory):
    """The same picture and conversation in the three chat-format layouts (fewshot: first turn only)."""
    root = tmp_path_factory.mktemp("encode_data")
    (root / "sft" / "images").mkdir(parents=True)
    (root / "sft" / "labels").mkdir()
    picture = shapes.render(RED_CIRCLE, 224)
    picture.save(root / "red.png")
    picture.save(root / "sft" / "images" / "00000000.jpg")
    messages = [m for q, a in TURNS for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    (root / "sft" / "labels" / "00000000.json").write_text(json.dumps({"conversations": messages}))
    image_first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TURNS[0][0]}]}]
    with open(root / "chat.jsonl", "w") as f:
        f.write(json.dumps({"messages": image_first + messages[1:], "images": ["red.png"]}) + "\n")
        f.write(json.dumps({"messages": messages}) + "\n")  # no picture: a text-only conversation
    (root / "fewshot.json").write_text(json.dumps([{"img": "red.png", "prompt": TURNS[0][0], "label": TURNS[0][1]}]))
    return [*data.load_jsonl(root / "chat.jsonl"), *data.load_cogvlm_sft(root / "sft"),
            *data.load_visualglm_fewshot(root / "fewshot.json")]


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_format_prompt_is_chats_prompt(trained_hub_folders, chat_format_data, family):
    folder = trained_hub_folders[family]
    config = load_config(folder)
    tokenizer, _ = load_processing(folder, config)  # what visualglm-finetune loads
    model = model_class(config).from_pretrained(str(folder), dtype=torch.float32).eval()
    encoder = SampleEncoder(tokenizer, config)  # the CLI's defaults (--english auto, the folder's template)
    assert {s.history for s in chat_format_data} == {(), (TURNS[0],)}
    assert {s.image is None for s in chat_format_data} == {True, False}
    for sample in chat_format_data:
        enc = encoder(sample)
        chat_ids, _, kwargs = model._chat_inputs(tokenizer, sample.image, sample.query, list(sample.history), {})
        assert enc.input_ids[: enc.prompt_length] == chat_ids[0].tolist(), sample.source

        # the answer: what tools/train_tiny.py supervised, ending with the id chat's generate stops at
        answer = enc.input_ids[enc.prompt_length:]
        assert answer == TRAINING[family].answer_ids(tokenizer, sample.answer), sample.source
        assert answer[-1] == kwargs["eos_token_id"]
        if family == "minigpt4":  # Vicuna v0's chat stops at the string "###", before the eos
            assert kwargs["stop_strings"] == ["###"] and tokenizer.decode(answer[:-1]).endswith("###")
        # supervised: the answer and its end (VisualGLM also <sop>, the prompt's last id, as its original)
        first = enc.prompt_length - (family == "visualglm")
        assert enc.labels == [IGNORE] * first + enc.input_ids[first:]


def test_cc_sbu_align_keeps_the_stage2_template(trained_hub_folders, chat_format_data):
    """MiniGPT-4's stage-2 recipe (no system prompt, answer + "###" only) is not chat's prompt, deliberately."""
    folder = trained_hub_folders["minigpt4"]
    config = load_config(folder)
    tokenizer, _ = load_processing(folder, config)
    model = model_class(config).from_pretrained(str(folder), dtype=torch.float32).eval()
    picture = next(s.image for s in chat_format_data if s.image)
    sample = data.Sample(data.ALIGNMENT_INSTRUCTIONS[0], "a red circle", picture, template="minigpt4-stage2")
    enc = SampleEncoder(tokenizer, config)(sample)
    chat_ids = model._chat_inputs(tokenizer, sample.image, sample.query, [], {})[0][0].tolist()
    prompt = tokenizer.decode(enc.input_ids[1: enc.prompt_length])
    assert prompt.startswith("###Human: <Img>") and "Give the following image" not in prompt
    assert len(enc.input_ids[: enc.prompt_length]) < len(chat_ids)
    answer = enc.input_ids[enc.prompt_length:]
    assert tokenizer.decode(answer) == "a red circle###" and tokenizer.eos_token_id not in answer
