"""visualglm-chat (tools/chat.py) in a real pseudo-terminal (pexpect), on tiny random hub folders of every family.

What the terminal shows must be what ``model.chat`` answers (greedy, in-process); the commands, multi-line input and
Ctrl-C in the middle of a long answer are typed as a user types them.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pexpect
import pytest

from conftest import shipped_trained_families
from helpers import loaded_model
from tiny_folders import FOLDERS

from modeling_visualglm.tools.serving import load_image_source
from modeling_visualglm.tools import shapes
from modeling_visualglm.tools.tiny_models import demo_image_path

EXE = str(Path(sys.executable).parent / "visualglm-chat")
PROMPT = ">>> "


@pytest.fixture(scope="module")
def folders(tiny_hub_folders):
    return tiny_hub_folders


def spawn(folder, *args) -> pexpect.spawn:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TERM": "dumb"}
    child = pexpect.spawn(EXE, ["--model", str(folder), *args], env=env, encoding="utf-8", timeout=120,
                          dimensions=(40, 200))
    child.expect_exact(PROMPT)
    return child


def ask(child: pexpect.spawn, line: str) -> str:
    """Type ``line``, return what the program printed before the next prompt (without the echo)."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    text = child.before.replace("\r\n", "\n")
    # what the terminal shows: the CLI redraws a line (CR + erase line) when the answer's clean-up rewrote its tail
    text = "\n".join(line.split("\r\x1b[K")[-1] for line in text.split("\n"))
    echo = line.replace("\r\n", "\n")
    assert text.startswith(echo + "\n"), (text, echo)
    return text[len(echo) + 1:]


def close(child: pexpect.spawn) -> None:
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, (child.exitstatus, child.signalstatus)


@pytest.mark.parametrize("family", FOLDERS)
def test_streamed_answer_equals_chat(folders, family):
    """Greedy answers in the terminal (with the picture, then a follow-up that uses the history) are ``chat``'s."""
    model, tokenizer = loaded_model(str(folders[family]))
    image = load_image_source(model, demo_image_path())
    first, history = model.chat(tokenizer, image, "What is in the picture?", do_sample=False, max_new_tokens=8)
    second, _ = model.chat(tokenizer, image, "And its colour?", history=history, do_sample=False, max_new_tokens=8)
    child = spawn(folders[family], "--image", demo_image_path(), "--greedy", "--max-new-tokens", "8")
    banner = child.before
    assert "sampling: do_sample=False" in banner and "max_new_tokens=8" in banner, banner
    assert "[picture: " in banner
    # (transformers' notes, e.g. VisualGLM's min_length above a short answer's room, follow as [warning: ...])
    assert ask(child, "What is in the picture?").startswith(first + "\n")
    assert ask(child, "And its colour?").startswith(second + "\n")
    close(child)


def test_commands_multiline_and_ctrl_c(folders):
    folder = folders["minigpt4"]
    model, tokenizer = loaded_model(str(folder))
    child = spawn(folder, "--greedy", "--max-new-tokens", "6")
    assert ask(child, "/history") == "[no conversation yet]\n"
    # a question over two lines (backslash) and a \"\"\" block: the model gets the lines joined by newlines
    query = "first line\nsecond line"
    want, history = model.chat(tokenizer, None, query, do_sample=False, max_new_tokens=6)
    again, _ = model.chat(tokenizer, None, query, history=history, do_sample=False, max_new_tokens=6)
    child.sendline("first line\\")
    child.expect_exact("... ")
    assert ask(child, "second line").endswith(want + "\n")
    child.sendline('"""')
    child.expect_exact("... ")
    child.sendline("first line")
    child.expect_exact("... ")
    child.sendline("second line")
    child.expect_exact("... ")
    assert ask(child, '"""').endswith(again + "\n")
    shown = ask(child, "/history")
    assert shown == f"[1] you: {query}\n[1] model: {want}\n[2] you: {query}\n[2] model: {again}\n", shown
    assert ask(child, "/clear") == "[conversation cleared]\n"
    assert ask(child, "/history") == "[no conversation yet]\n"
    assert "unknown command" in ask(child, "/bogus")
    assert "cannot use that picture" in ask(child, "/image /no/such/file.png")
    assert ask(child, f"/image {demo_image_path()}").startswith("[picture: ")
    close(child)

    # Ctrl-C in the middle of a long answer: the answer stops, the program goes on
    child = spawn(folder, "--greedy", "--min-new-tokens", "300", "--max-new-tokens", "300")
    child.sendline("tell me a long story")
    child.expect_exact("tell me a long story")
    child.expect(r"\S")  # the first streamed characters
    t0 = time.monotonic()
    child.sendintr()
    child.expect_exact("[stopped]")  # printed only when the answer ended because of the Ctrl-C
    child.expect_exact(PROMPT)
    assert time.monotonic() - t0 < 10
    shown = ask(child, "/history")
    assert re.search(r"\[1\] model: \S", shown), shown  # the part written so far is kept
    # still alive, and Ctrl-C at the prompt only drops the line
    child.send("half a line")
    child.sendintr()
    child.expect_exact("^C")
    child.expect_exact(PROMPT)
    child.sendline("/exit")  # after the dropped line, a command still works
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    # and Ctrl-D quits too
    child = spawn(folder, "--greedy", "--max-new-tokens", "2")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize("family", shipped_trained_families())
def test_trained_model_answers_right_in_the_terminal(trained_hub_folders, family, tmp_path):
    """The tiny trained model in a real terminal, greedy: the true colour, then, in a cleared conversation (the tiny
    models were trained on single questions), the true shape in Chinese."""
    scene = shapes.Scene(2, 2, 6, 2**31 + 99)  # a blue triangle, bottom left
    picture = tmp_path / "shape.png"
    shapes.render(scene, 224).save(picture)
    # --min-new-tokens 0: VisualGLM's own default min_length=100 (prompt included) would force text past the answer
    child = spawn(trained_hub_folders[family], "--image", str(picture), "--greedy", "--max-new-tokens", "24",
                  "--min-new-tokens", "0")
    assert ask(child, shapes.question("colour", "en")).splitlines()[0].strip() == shapes.answer(scene, "colour", "en")
    assert ask(child, "/clear") == "[conversation cleared]\n"
    assert ask(child, shapes.question("shape", "zh")).splitlines()[0].strip() == shapes.answer(scene, "shape", "zh")
    close(child)
