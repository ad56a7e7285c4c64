"""visualglm-finetune (issue 16): the four data formats, label masking per family against the originals' rules, the
token-weighted loss, train / eval / save / resume / merge → `visualglm-export check`, and the QLoRA refusal on CPU.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from modeling_visualglm.tools.finetune import cli, data
from modeling_visualglm.tools.finetune.collate import Collator, FinetuneDataset
from modeling_visualglm.tools.finetune.encode import IGNORE, SampleEncoder
from modeling_visualglm.tools.finetune.model import load_config, load_processing, model_class
from modeling_visualglm.tools.finetune.trainer import shifted_cross_entropy

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
QUESTION = "What colour is this?"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tiny_folders import write_tiny_folder

    root = tmp_path_factory.mktemp("finetune_tiny")
    return {name: write_tiny_folder(name, root / name) for name in ("visualglm", "cogvlm", "cogvlm2", "minigpt4")}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The same 4 colour samples in each of the four formats."""
    root = tmp_path_factory.mktemp("finetune_data")
    (root / "imgs").mkdir()
    (root / "sft" / "images").mkdir(parents=True)
    (root / "sft" / "labels").mkdir()
    (root / "cc" / "image").mkdir(parents=True)
    fewshot, annotations = [], []
    with open(root / "chat.jsonl", "w") as jsonl:
        for i, (name, rgb) in enumerate(COLOURS.items()):
            for path in (root / "imgs" / f"{name}.png", root / "sft" / "images" / f"{i:08d}.jpg",
                         root / "cc" / "image" / f"{i + 2}.jpg"):
                Image.new("RGB", (64, 64), rgb).save(path)
            fewshot.append({"img": f"imgs/{name}.png", "prompt": QUESTION, "label": f"It is {name}."})
            (root / "sft" / "labels" / f"{i:08d}.json").write_text(json.dumps({"conversations": [
                {"role": "user", "content": QUESTION}, {"role": "assistant", "content": f"It is {name}."}]}))
            annotations.append({"image_id": str(i + 2), "caption": f"A {name} square."})
            jsonl.write(json.dumps({"messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": f"It is {name}."},
                {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "yes"}],
                "images": [f"imgs/{name}.png"]}) + "\n")
    (root / "fewshot.json").write_text(json.dumps(fewshot))
    (root / "cc" / "filter_cap.json").write_text(json.dumps({"annotations": annotations}))
    return {"visualglm-fewshot": root / "fewshot.json", "cogvlm-sft": root / "sft", "cc-sbu-align": root / "cc",
            "jsonl": root / "chat.jsonl"}


def _setup(folder):
    config = load_config(folder)
    tokenizer, image_processor = load_processing(folder, config)
    return config, tokenizer, image_processor


# --- data adapters ------------------------------------------------------------------------------------------

def test_formats_read_into_one_sample_type(datasets):
    fewshot = data.load_samples("visualglm-fewshot", datasets["visualglm-fewshot"])
    assert [(s.query, s.answer) for s in fewshot] == [(QUESTION, f"It is {c}.") for c in COLOURS]
    assert all(Path(s.image).is_file() for s in fewshot)
    sft = data.load_samples("cogvlm-sft", datasets["cogvlm-sft"])
    assert [s.answer for s in sft] == [f"It is {c}." for c in COLOURS] and sft[0].image.endswith("00000000.jpg")
    cc = data.load_samples("cc-sbu-align", datasets["cc-sbu-align"])
    assert [s.query for s in cc] == list(data.ALIGNMENT_INSTRUCTIONS)  # instruction i % 4
    assert {s.template for s in cc} == {"minigpt4-stage2"} and cc[1].image.endswith("3.jpg")
    chat = data.load_samples("jsonl", datasets["jsonl"])
    assert len(chat) == 8  # two assistant turns per conversation → two samples, the second with its history
    assert chat[1].history == ((QUESTION, "It is red."),) and (chat[1].query, chat[1].answer) == ("Sure?", "yes")


@pytest.mark.parametrize("line, message", [
    ({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "q"}]}, "alternate"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "images": ["a", "b"]},
     "at most one"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "images": ["missing.png"]}, "does not exist"),
])
def test_bad_jsonl_is_refused_with_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(data.DataError, match=message) as info:
        data.load_jsonl(path)
    assert "bad.jsonl:1" in str(info.value)


# --- label masking: the originals' rules, written out independently -----------------------------------------

def _visualglm_original(tok, config, prompt, label):
    """finetune_visualglm.py FewShotDataset (our dedicated <image> id in the slots instead of <pad>)."""
    a = (tok.encode("<img>", add_special_tokens=False) + [config.image_token_id] * config.num_image_tokens
         + tok.encode("</img>问：" + prompt + "\n答：", add_special_tokens=False))
    b = tok.encode(label, add_special_tokens=False)
    ids = a + [tok.gmask_token_id, tok.sop_token_id] + b + [tok.eop_token_id]
    context_length = ids.index(tok.sop_token_id)
    return ids, [IGNORE] * context_length + ids[context_length:]


def _cogvlm_original(tok, config, prompt_text, answer):
    """HF build_conversation_input_ids(..., answer=) of cogvlm2-llama3-chat-19B."""
    ids = [tok.bos_token_id] + [config.image_token_id] * config.num_image_tokens
    ids += tok.encode(prompt_text, add_special_tokens=False)
    answer_ids = tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]
    ids += answer_ids
    return ids, [IGNORE] * (len(ids) - len(answer_ids)) + answer_ids


def _minigpt4_original(tok, config, instruction, caption):
    """MiniGPT-4 stage 2 (Vicuna v0): bos + prompt_wrap('###Human: <Img><ImageHere></Img> {instr} ###Assistant: ')
    unsupervised (empty_targets), then tokenizer(caption + '###') supervised."""
    before = tok.encode("###Human: <Img>", add_special_tokens=False)
    after = tok.encode(f"</Img> {instruction} ###Assistant: ", add_special_tokens=False)
    answer = tok.encode(caption + "###", add_special_tokens=False)
    ids = [tok.bos_token_id] + before + [config.image_token_id] * config.num_image_tokens + after + answer
    return ids, [IGNORE] * (len(ids) - len(answer)) + answer


@pytest.mark.parametrize("name", ["visualglm", "cogvlm", "cogvlm2", "minigpt4"])
def test_labels_follow_the_original_and_never_cover_the_prompt(folders, datasets, name):
    config, tok, image_processor = _setup(folders[name])
    image = str(datasets["visualglm-fewshot"].parent / "imgs" / "red.png")
    if name == "visualglm":
        encoder = SampleEncoder(tok, config, english=False)  # the original always used 问：/答：
        sample = data.Sample(QUESTION, "It is red.", image)
        want = _visualglm_original(tok, config, QUESTION, "It is red.")
    elif name.startswith("cogvlm"):
        encoder = SampleEncoder(tok, config)
        sample = data.Sample(QUESTION, "It is red.", image)
        want = _cogvlm_original(tok, config, f"Question: {QUESTION} Answer:", "It is red.")
    else:
        encoder = SampleEncoder(tok, config)
        sample = data.load_samples("cc-sbu-align", datasets["cc-sbu-align"])[0]
        want = _minigpt4_original(tok, config, sample.query, sample.answer)
    enc = encoder(sample)
    assert (enc.input_ids, enc.labels) == want
    ids, labels = torch.tensor(enc.input_ids), torch.tensor(enc.labels)
    image_slots = ids == config.image_token_id
    assert int(image_slots.sum()) == config.num_image_tokens
    assert (labels[image_slots] == IGNORE).all()
    first = int((labels != IGNORE).nonzero()[0])
    assert first > int(image_slots.nonzero()[-1])  # everything up to the end of the prompt is unsupervised
    assert (labels[first:] == ids[first:]).all()  # and everything after it is (answer + end token)
    if name == "visualglm":
        assert enc.input_ids[first] == tok.sop_token_id  # supervised from <sop> on
        assert enc.input_ids[first - 1] == tok.gmask_token_id

    # the trainer's token-weighted loss is the model's own forward loss on one sample ...
    model = model_class(config).from_pretrained(str(folders[name]), dtype=torch.float32).eval()
    row = FinetuneDataset([enc], image_processor)[0]
    batch = Collator(tok.pad_token_id if tok.pad_token_id is not None else 0)([row])
    with torch.no_grad():
        out = model(**batch)
        ours = shifted_cross_entropy(out.logits, batch["labels"])
        assert torch.allclose(out.loss, ours, rtol=1e-5)
        # ... and a left-padded batch of two rows gives the token-weighted mean of the rows' sums
        short = encoder(data.Sample("Hue?", "It is a red one, clearly.", image))
        rows = [row, FinetuneDataset([short], image_processor)[0]]
        pair = Collator(tok.pad_token_id if tok.pad_token_id is not None else 0)(rows)
        pair_loss = shifted_cross_entropy(model(**pair).logits, pair["labels"])
        single = [Collator(0)([r]) for r in rows]
        sums = [shifted_cross_entropy(model(**b).logits, b["labels"]) * (b["labels"][:, 1:] != IGNORE).sum()
                for b in single]
        count = (pair["labels"][:, 1:] != IGNORE).sum()
        assert torch.allclose(pair_loss, sum(sums) / count, rtol=1e-4)


def test_multi_turn_history_is_context_only(folders):
    config, tok, _ = _setup(folders["cogvlm2"])
    enc = SampleEncoder(tok, config)(data.Sample("Sure?", "yes", None, history=((QUESTION, "It is red."),)))
    supervised = [i for i, label in zip(enc.input_ids, enc.labels) if label != IGNORE]
    assert supervised == tok.encode("yes", add_special_tokens=False) + [tok.eos_token_id]


# --- the CLI: train, eval, save, resume, merge, check ------------------------------------------------------------

def _train(folder, dataset, fmt, out, *extra):
    argv = ["--model", str(folder), "--data", str(dataset), "--data-format", fmt, "--output-dir", str(out),
            "--batch-size", "2", "--lr", "5e-3", "--warmup", "0", "--lora-dropout", "0", "--no-progress",
            "--logging-steps", "1", *extra]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's CPU autocast / checkpoint notes
        assert cli.main(argv) == 0


def _adapter(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


@pytest.mark.parametrize("name, fmt", [("visualglm", "visualglm-fewshot"), ("cogvlm2", "cogvlm-sft"),
                                       ("minigpt4", "cc-sbu-align")])
def test_train_eval_merge_check(folders, datasets, tmp_path, name, fmt, capsys):
    from peft import PeftModel

    out = tmp_path / "run"
    _train(folders[name], datasets[fmt], fmt, out, "--max-steps", "2", "--eval-split", "1",
           "--gradient-checkpointing")
    log = capsys.readouterr().out
    assert "eval_loss" in log and "trained 2 steps" in log
    adapter = _adapter(out)
    assert adapter and any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # it learnt something
    if name == "minigpt4":
        assert any("llama_proj" in k for k in adapter)  # stage 2 trains the projection: saved with the adapter

    merged = tmp_path / "merged"
    assert cli.main(["merge", "--base", str(folders[name]), "--adapter", str(out), "--out", str(merged),
                     "--no-progress"]) == 0
    config, tok, image_processor = _setup(folders[name])
    cls = model_class(config)
    enc = SampleEncoder(tok, config)(data.load_samples(fmt, datasets[fmt])[0])
    batch = Collator(0)([FinetuneDataset([enc], image_processor)[0]])
    with torch.no_grad():
        base = cls.from_pretrained(str(folders[name]), dtype=torch.float32).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft reads a property transformers 5.24 renamed
            peft = PeftModel.from_pretrained(base, str(out)).eval()
        want = peft(**batch).logits
        got = cls.from_pretrained(str(merged), dtype=torch.float32).eval()(**batch).logits
    assert (got - want).abs().max() / want.abs().max() < 1e-5
    assert (want - cls.from_pretrained(str(folders[name]), dtype=torch.float32)(**batch).logits).abs().max() > 1e-4

    from modeling_visualglm.hub_export.check import check_folder

    assert check_folder(merged) == 0


def test_resume_continues_the_interrupted_run(folders, datasets, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = ("--max-steps", "4", "--save-steps", "2", "--batch-size", "1")
    _train(folders["cogvlm2"], datasets["jsonl"], "jsonl", whole, *args)
    _train(folders["cogvlm2"], datasets["jsonl"], "jsonl", resumed, *args, "--resume",
           str(whole / "checkpoint-2"))
    a, b = _adapter(whole), _adapter(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    halfway = _adapter(whole / "checkpoint-2")
    assert any(not torch.equal(halfway[k], a[k]) for k in a)  # the last two steps changed it


def test_full_fine_tuning_writes_a_hub_folder(folders, datasets, tmp_path):
    out = tmp_path / "full"
    _train(folders["minigpt4"], datasets["jsonl"], "jsonl", out, "--method", "full", "--max-steps", "1",
           "--no-train-lm", "--save-steps", "100")
    config = load_config(out / "hub")
    before = model_class(config).from_pretrained(str(folders["minigpt4"]), dtype=torch.float32)
    after = model_class(config).from_pretrained(str(out / "hub"), dtype=torch.float32)
    assert not torch.equal(before.llama_proj.weight, after.llama_proj.weight)  # the adapter trained
    for name in ("language_model.embed_tokens.weight", "vision_model.embeddings.patch_embedding.weight"):
        if name in dict(before.named_parameters()):
            assert torch.equal(before.get_parameter(name), after.get_parameter(name))  # frozen parts kept


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
def test_qlora_is_refused_clearly_on_cpu(folders, datasets, tmp_path, capsys):
    code = cli.main(["--model", str(folders["visualglm"]), "--data", str(datasets["visualglm-fewshot"]),
                     "--data-format", "visualglm-fewshot", "--output-dir", str(tmp_path / "q"), "--method", "qlora"])
    assert code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_usage_errors(folders, datasets, tmp_path, capsys):
    base = ["--model", str(folders["visualglm"]), "--data-format", "visualglm-fewshot", "--output-dir",
            str(tmp_path / "o")]
    assert cli.main(base + ["--data", str(tmp_path / "none.json")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert cli.main(base + ["--data", str(datasets["visualglm-fewshot"]), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--model", "x"])  # required flags
