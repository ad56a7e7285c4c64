"""visualglm-web (tools/web.py) in a real headless Chromium (Debian's ``chromium`` driven by playwright).

The installed ``visualglm-web`` command serves a tiny random CogVLM folder (its chat defaults are greedy, so the
page's answer is deterministic); the browser uploads a picture, asks, and the answer read off the page must be
``model.chat``'s. The screenshot of that page is docs/images/web_demo.png (docs/serving.md shows it).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tiny_folders import write_tiny_folder

from modeling_visualglm.tools import shapes
from modeling_visualglm.tools.serving import load_model

from conftest import shipped_trained_families

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = ROOT / "docs" / "images" / "web_demo.png"
QUESTION = "What colour is the shape?"


def letters(text: str) -> str:
    """Letters and digits only: the page renders answers as Markdown, which may eat punctuation."""
    return re.sub(r"[^0-9A-Za-z]", "", text)


@pytest.fixture(scope="module")
def web(tmp_path_factory, trained_hub_folders):
    tmp = tmp_path_factory.mktemp("web")
    # the tiny trained CogVLM (it knows coloured shapes); a random tiny folder only where none is shipped
    folder = trained_hub_folders.get("cogvlm") or write_tiny_folder("cogvlm", tmp / "cogvlm")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    exe = Path(sys.executable).parent / "visualglm-web"
    log = open(tmp / "web.log", "w")
    proc = subprocess.Popen([str(exe), "--model", str(folder), "--port", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    try:
        while True:  # readiness probe: the page answers
            assert proc.poll() is None, (tmp / "web.log").read_text()
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "visualglm-web did not start"
            time.sleep(0.1)
        yield url, folder, tmp
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_upload_ask_and_read_the_answer_in_chromium(web):
    from playwright.sync_api import expect, sync_playwright

    url, folder, tmp = web
    picture = tmp / "shape.png"
    scene = shapes.Scene(0, 1, 4, 11)  # a red square in the center
    shapes.render(scene, 224).save(picture)
    model, tokenizer = load_model(str(folder), device="cpu")
    from PIL import Image

    want, _ = model.chat(tokenizer, Image.open(picture), QUESTION)  # the family's defaults, as the page uses them
    assert letters(want), f"pick another picture: the tiny model's answer {want!r} has no letters to compare"
    if "cogvlm" in shipped_trained_families():
        assert want == shapes.answer(scene, "colour", "en") == "red"  # the page must show the true answer

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.goto(url)
        page.locator("#picture input[type=file]").set_input_files(str(picture))
        expect(page.locator("#picture img").first).to_be_visible(timeout=30_000)
        page.locator("#query textarea").fill(QUESTION)
        page.locator("#send").click()
        bot = page.locator("#chat .bot, #chat [data-testid=bot]").last
        expect(bot).to_be_visible(timeout=60_000)
        deadline = time.monotonic() + 60
        while letters(bot.inner_text()) != letters(want):  # the answer streams in; wait for all of it
            assert time.monotonic() < deadline, (bot.inner_text(), want)
            page.wait_for_timeout(100)
        user = page.locator("#chat .user, #chat [data-testid=user]").last
        assert QUESTION in user.inner_text()
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        # "Clear" empties the chat
        page.locator("#clear").click()
        expect(page.locator("#chat .bot, #chat [data-testid=bot]")).to_have_count(0, timeout=30_000)
        browser.close()
    assert SCREENSHOT.stat().st_size > 10_000
