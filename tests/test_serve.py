"""visualglm-serve (tools/serve.py, tools/serving_engine.py) through the official ``openai`` client on loopback.

Tiny random hub folders of every family (tests/tiny_folders.py): every answer must equal what ``model.chat`` says
in-process, greedy, one at a time, so batching, padding, streaming and the request mapping cannot change a token.
The engine's worker is held with a gate around ``generate`` where a test needs a busy server (queue bound,
timeouts, disconnects): no sleeps stand in for synchronisation.
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from conftest import shipped_trained_families
from helpers import loaded_model
from tiny_folders import FOLDERS

from modeling_visualglm.tools import shapes
from modeling_visualglm.tools.serve import create_app, parse_messages, running_server
from modeling_visualglm.tools.tiny_models import demo_image_path

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What colour is the shape?"


@pytest.fixture(scope="module")
def folders(tiny_hub_folders):
    return tiny_hub_folders


def data_url(image: Image.Image) -> str:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def picture(seed: int, size: int = 112) -> Image.Image:
    return shapes.render(shapes.Scene(seed % 6, seed % 3, seed % 9, seed), size)


def user(text: str, image_url: str | None = None) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def reference(model, tokenizer, image, query, history=None, max_new_tokens=10) -> str:
    return model.chat(tokenizer, image, query, history=history, do_sample=False, max_new_tokens=max_new_tokens)[0]


def client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


class Gate:
    """Holds the engine's ``generate`` until opened; ``entered`` is set once a batch is inside."""

    def __init__(self, model, monkeypatch):
        self.open, self.entered = threading.Event(), threading.Event()
        original = model.generate

        def generate(*args, **kwargs):
            self.entered.set()
            assert self.open.wait(60), "gate never opened"
            return original(*args, **kwargs)

        monkeypatch.setattr(model, "generate", generate)


def wait_until(predicate, timeout=30.0, what="condition"):
    """Poll a readiness probe (the server's own state), failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# --- answers ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FOLDERS)
def test_answers_equal_chat_for_every_family(folders, family):
    """Non-streamed and streamed answers (with a data: picture, with history, text only) equal ``model.chat``."""
    model, tokenizer = loaded_model(str(folders[family]))
    image = picture(3)
    want = reference(model, tokenizer, image, QUESTION)
    history = [(QUESTION, "red")]
    want_history = reference(model, tokenizer, image, "And the shape?", history=history)
    want_text = reference(model, tokenizer, None, "hello there")
    app = create_app(model, tokenizer, model_name=family)
    with running_server(app) as url:
        c = client(url)
        assert [m.id for m in c.models.list().data] == [family]
        r = c.chat.completions.create(model=family, messages=[user(QUESTION, data_url(image))], temperature=0,
                                      max_tokens=10)
        assert r.choices[0].message.content == want
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.completion_tokens <= 10 and r.usage.prompt_tokens > model.config.num_image_tokens
        chunks = list(c.chat.completions.create(model=family, messages=[user(QUESTION, data_url(image))],
                                                temperature=0, max_tokens=10, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
        assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
        conversation = [user(QUESTION, data_url(image)), {"role": "assistant", "content": "red"},
                        user("And the shape?")]
        r = c.chat.completions.create(model=family, messages=conversation, temperature=0, max_tokens=10)
        assert r.choices[0].message.content == want_history
        r = c.chat.completions.create(model=family, messages=[{"role": "system", "content": "be brief"},
                                                              user("hello there")], temperature=0, max_tokens=10)
        assert r.choices[0].message.content == want_text


def test_concurrent_requests_share_generate_calls(folders):
    """16 concurrent requests (pictures and text, streamed and not) are batched, and each answer is its own."""
    model, tokenizer = loaded_model(str(folders["minigpt4"]))
    images = [picture(i) if i % 3 else None for i in range(16)]
    queries = [shapes.question(shapes.KINDS[i % 4], "en") for i in range(16)]
    want = [reference(model, tokenizer, im, q, max_new_tokens=8) for im, q in zip(images, queries)]
    app = create_app(model, tokenizer, model_name="m", max_batch_size=8, batch_window_ms=50)
    with running_server(app) as url:
        c = client(url)

        def ask(i):
            messages = [user(queries[i], data_url(images[i]) if images[i] else None)]
            if i % 2:
                s = c.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=8, stream=True)
                return "".join(ch.choices[0].delta.content or "" for ch in s)
            return c.chat.completions.create(model="m", messages=messages, temperature=0,
                                             max_tokens=8).choices[0].message.content

        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(ask, range(16)))
        stats = app.state.engine.stats
    assert got == want
    assert stats["rows"] == 16 and stats["max_rows"] > 1 and stats["batches"] < 16, stats


def test_sampling_fields(folders):
    """``temperature: 0`` is greedy (repeatable); ``max_tokens`` bounds the answer; ``stop`` cuts it; a sampled
    request runs with the family's sampler and still answers."""
    model, tokenizer = loaded_model(str(folders["cogvlm"]))
    image = picture(5)
    app = create_app(model, tokenizer, model_name="m")
    with running_server(app) as url:
        c = client(url)
        ask = functools.partial(c.chat.completions.create, model="m", messages=[user(QUESTION, data_url(image))])
        a, b = (ask(temperature=0, max_tokens=12) for _ in range(2))
        assert a.choices[0].message.content == b.choices[0].message.content
        short = ask(temperature=0, max_tokens=3)
        assert short.usage.completion_tokens <= 3 and short.choices[0].finish_reason in ("length", "stop")
        full = a.choices[0].message.content
        # a character the tokens spell out, first seen past the start
        at = next(i for i, ch in enumerate(full) if i > 0 and ch.isalnum() and ch not in full[:i])
        cut = ask(temperature=0, max_tokens=12, stop=[full[at]])
        assert cut.choices[0].message.content == full[:at].strip() and cut.choices[0].finish_reason == "stop"
        sampled = ask(temperature=0.7, top_p=0.9, max_tokens=6)
        assert sampled.usage.completion_tokens <= 6


# --- images -----------------------------------------------------------------------------------------------------

class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_url_and_local_files(folders, tmp_path):
    """http(s) pictures go through the folder's bounded loader; local paths only with ``allow_local_files``."""
    model, tokenizer = loaded_model(str(folders["visualglm"]))
    image = picture(7)
    image.save(tmp_path / "shape.png")
    (tmp_path / "big.bin").write_bytes(b"\0" * (model.chat_image_processor().max_image_bytes + 1))
    want = reference(model, tokenizer, image, QUESTION)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(_Quiet, directory=str(tmp_path)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        for allow in (False, True):
            app = create_app(model, tokenizer, model_name="m", allow_local_files=allow)
            with running_server(app) as url:
                c = client(url)
                r = c.chat.completions.create(model="m", messages=[user(QUESTION, f"{base}/shape.png")],
                                              temperature=0, max_tokens=10)
                assert r.choices[0].message.content == want
                for bad in (f"{base}/missing.png", f"{base}/big.bin"):
                    with pytest.raises(openai.BadRequestError, match="image"):
                        c.chat.completions.create(model="m", messages=[user(QUESTION, bad)], max_tokens=2)
                local = str(tmp_path / "shape.png")
                if allow:
                    for source in (local, "file://" + local):
                        r = c.chat.completions.create(model="m", messages=[user(QUESTION, source)], temperature=0,
                                                      max_tokens=10)
                        assert r.choices[0].message.content == want
                else:
                    with pytest.raises(openai.BadRequestError, match="allow-local-files"):
                        c.chat.completions.create(model="m", messages=[user(QUESTION, local)], max_tokens=2)
    finally:
        httpd.shutdown()


# --- limits and errors ------------------------------------------------------------------------------------------

def test_limits_and_bad_requests(folders):
    model, tokenizer = loaded_model(str(folders["minigpt4"]))
    url_image = data_url(picture(1))
    app = create_app(model, tokenizer, model_name="m", max_tokens_limit=32, max_body_bytes=200_000)
    with running_server(app) as url:
        c = client(url)
        ask = functools.partial(c.chat.completions.create, model="m")
        cases = [
            (dict(messages=[user("q", url_image)], max_tokens=33), "max_tokens"),
            (dict(messages=[user("q", url_image), {"role": "assistant", "content": "a"}, user("q", url_image)]),
             "at most 1"),
            (dict(messages=[user("q", "data:image/png;base64,@@@@")]), "base64"),
            (dict(messages=[user("q", "data:image/png;base64," + base64.b64encode(b"not a png").decode())]),
             "image"),
            (dict(messages=[user("q", "ftp://example.org/x.png")]), "scheme"),
            (dict(messages=[user("q", "/etc/hostname")]), "allow-local-files"),
            (dict(messages=[user("q", url_image)], n=2), "n > 1"),
            (dict(messages=[{"role": "assistant", "content": "hi"}]), "user"),
            (dict(messages=[user("a"), user("b")]), "alternate"),
            (dict(messages=[]), "non-empty"),
            (dict(messages=[user("q")], temperature=5), "temperature"),
        ]
        for kwargs, match in cases:
            with pytest.raises(openai.BadRequestError, match=match):
                ask(**kwargs)
        with pytest.raises(openai.NotFoundError, match="not served here"):
            c.chat.completions.create(model="other", messages=[user("q")])
        big = "data:image/png;base64," + "A" * 300_000
        for headers in ({}, {"transfer-encoding": "chunked"}):  # declared and undeclared length
            body = json.dumps({"model": "m", "messages": [user("q", big)]}).encode()
            content = iter([body]) if headers else body
            r = httpx.post(f"{url}/chat/completions", content=content, headers={"content-type": "application/json"})
            assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400
        # the server still answers after all of that
        assert ask(messages=[user("q", url_image)], temperature=0, max_tokens=2).choices[0].message.content is not None


def test_parse_messages():
    query, history, images = parse_messages([
        {"role": "system", "content": "x"}, user("first", "data:a"), {"role": "assistant", "content": "one"},
        {"role": "user", "content": "second"}])
    assert (query, history, images) == ("second", [("first", "one")], ["data:a"])


def test_api_key(folders):
    model, tokenizer = loaded_model(str(folders["minigpt4"]))
    app = create_app(model, tokenizer, model_name="m", api_key="s3cret")
    with running_server(app) as url:
        assert httpx.get(url.removesuffix("/v1") + "/health").json()["status"] == "ok"  # probes need no key
        for key in ("wrong", None):
            headers = {"authorization": f"Bearer {key}"} if key else {}
            r = httpx.get(f"{url}/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        r = client(url, api_key="s3cret").chat.completions.create(model="m", messages=[user("hi")], temperature=0,
                                                                   max_tokens=3)
        assert r.choices[0].message.content is not None


# --- overload and disconnects -----------------------------------------------------------------------------------

def test_bounded_queue_refuses_with_retry_after(folders, monkeypatch):
    """A busy worker and a full queue: the next request gets 429 + Retry-After at once; those that waited longer
    than the queue timeout get 503 + Retry-After; every accepted request is answered right once the worker frees."""
    model, tokenizer = loaded_model(str(folders["minigpt4"]))
    want = reference(model, tokenizer, None, "hi", max_new_tokens=4)
    gate = Gate(model, monkeypatch)
    app = create_app(model, tokenizer, model_name="m", max_batch_size=1, max_queue=2, queue_timeout_s=0.3)
    engine = app.state.engine
    with running_server(app) as url:
        c = client(url)
        ask = functools.partial(c.chat.completions.create, model="m", messages=[user("hi")], temperature=0,
                                max_tokens=4)
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(ask)
            assert gate.entered.wait(30)
            queued = [pool.submit(ask) for _ in range(2)]
            wait_until(lambda: engine.queued() == 2, what="two queued requests")
            t0 = time.monotonic()
            with pytest.raises(openai.RateLimitError) as refused:
                ask()
            assert time.monotonic() - t0 < 5  # refused at once, not after a wait
            assert refused.value.response.headers["retry-after"] == "1"
            health = httpx.get(url.removesuffix("/v1") + "/health").json()
            assert health["queued"] == 2 and health["running"] == 1
            time.sleep(0.4)  # the queued requests outwait queue_timeout_s=0.3 (the behaviour under test is a timeout)
            gate.open.set()
            assert first.result(timeout=60).choices[0].message.content == want
            for future in queued:
                with pytest.raises(openai.InternalServerError) as timed_out:
                    future.result(timeout=60)
                assert timed_out.value.status_code == 503 and timed_out.value.response.headers["retry-after"]
        assert ask().choices[0].message.content == want  # and it serves again
    assert engine.stats["refused_full"] == 1 and engine.stats["refused_timeout"] == 2


def test_client_disconnect_frees_its_slot(folders, monkeypatch):
    """A streaming client that goes away mid-answer, and a waiting non-streaming one that times out, are dropped:
    the row stops generating (generate returns long before max_tokens) and the queue slot is freed."""
    model, tokenizer = loaded_model(str(folders["minigpt4"]))
    steps = {"n": 0}
    resume = threading.Event()
    forward = model.forward

    def counted(*args, **kwargs):  # holds decoding after a few steps until the test has disconnected
        steps["n"] += 1
        if steps["n"] == 4:
            assert resume.wait(60)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counted)
    app = create_app(model, tokenizer, model_name="m", max_batch_size=1)
    engine = app.state.engine
    with running_server(app) as url:
        body = {"model": "m", "messages": [user("hi")], "temperature": 0, "max_tokens": 400, "stream": True}
        with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=30) as r:
            first = next(r.iter_lines())
            assert first.startswith("data: ")
            # the role chunk can reach us before the worker has taken the job: wait for the worker, which is
            # held at step 4 (so the job is still running)
            wait_until(lambda: engine.running, what="the worker taking the job")
            job = engine.running[0]
        wait_until(lambda: job.cancelled, what="the server noticing the closed stream")
        # a non-streaming request waits behind it; its client gives up
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/chat/completions", json={**body, "stream": False}, timeout=0.5)
        wait_until(lambda: engine.queued() == 0, what="the abandoned queued request being dropped")
        resume.set()
        wait_until(lambda: not engine.running, what="generate to return")
    assert job.finish_reason == "cancelled" and steps["n"] < 10, (steps, engine.stats, len(job.tokens))
    assert engine.stats["cancelled"] >= 2


# --- the console script and the documented commands -------------------------------------------------------------

def serving_doc_block() -> str:
    """docs/serving.md's session block (server, curl, openai client), found by the comment above it."""
    doc = (ROOT / "docs" / "serving.md").read_text()
    return doc.split("<!-- serve-session -->", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]


def test_docs_session_block(folders, tmp_path):
    """The installed ``visualglm-serve`` as docs/serving.md starts it (``--api-key``), then the doc's curl and
    ``openai`` examples against it, run as written (the doc's names replaced as tests/test_docs.py does, and a free
    port for 8000). tests/test_docs.py runs the same block as part of the docs."""
    import socket

    from test_docs import substitute

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = substitute(serving_doc_block(), {"minigpt4-hf": str(folders["minigpt4"]), "photo.jpg": demo_image_path()})
    script = script.replace("8000", str(port))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    answer = json.loads(next(line for line in lines if line.startswith("{")))
    assert answer["object"] == "chat.completion" and isinstance(answer["choices"][0]["message"]["content"], str)
    assert any(line.startswith("openai:") for line in lines), out.stdout
    assert any(line.startswith("stream:") for line in lines), out.stdout


# --- load -------------------------------------------------------------------------------------------------------

def test_load_short(folders, trained_hub_folders):
    """The load test (benchmarks/modes/serve_load.py) in short: 32 openai clients, 64 requests with pictures, half
    streamed: nothing lost, every answer equal to ``model.chat``; a burst at a small queue is refused in part (429 +
    Retry-After) and every other answer is right."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.modes.serve_load import load_test

    trained = "minigpt4" in shipped_trained_families()
    folder = trained_hub_folders["minigpt4"] if trained else folders["minigpt4"]
    data = load_test(str(folder), clients=32, requests=64, max_tokens=16, burst_queue=4, check_truth=trained,
                     log=lambda *_: None)
    assert data["concurrent"]["ok"] == 64 and data["one_at_a_time"]["ok"] == 64
    assert data["engine"]["max_rows"] > 1
    assert data["burst"]["refused_429"] > 0


# --- content: the tiny trained models answer right through the server -------------------------------------------

@pytest.mark.parametrize("family", shipped_trained_families())
def test_trained_model_answers_right_through_the_server(trained_hub_folders, family):
    """The tiny trained model (docs/tiny_models.md) behind the server: the openai client, streamed and not, in
    English and Chinese, gets the true colour/shape/place of fresh rendered pictures."""
    model, tokenizer = loaded_model(str(trained_hub_folders[family]))
    scenes = [shapes.Scene(colour, shape, cell, seed=2**31 + 17 * colour + 5 * shape + cell)
              for colour, shape, cell in ((0, 0, 0), (2, 1, 4), (5, 2, 8))]
    kinds = [("colour", "en"), ("shape", "zh"), ("where", "en"), ("describe", "zh")]
    with running_server(create_app(model, tokenizer, model_name=family)) as url:
        c = client(url)
        for i, scene in enumerate(scenes):
            for j, (kind, language) in enumerate(kinds):
                message = [user(shapes.question(kind, language), data_url(shapes.render(scene, 224)))]
                want = shapes.answer(scene, kind, language)
                if (i + j) % 2:
                    chunks = c.chat.completions.create(model=family, messages=message, temperature=0,
                                                       max_tokens=24, stream=True)
                    got = "".join(ch.choices[0].delta.content or "" for ch in chunks)
                else:
                    got = c.chat.completions.create(model=family, messages=message, temperature=0,
                                                    max_tokens=24).choices[0].message.content
                assert got.strip() == want, (scene, kind, language, got)
