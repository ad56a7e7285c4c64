"""Untrusted images and prompts (issue: "nothing lost, nothing leaked"): image URLs are bounded like files,
16-bit and float images keep their brightness, prompts longer than the model's positions fail before any compute."""

from __future__ import annotations

import http.server
import io
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from modeling_visualglm.image_processing_visualglm import VisualGLMImageProcessor, to_rgb


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit gray) followed by a tiny IDAT: a decompression bomb that
    costs nothing to serve; a loader that checks the header refuses it before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


class _Server:
    """A loopback HTTP server with a few hostile routes."""

    def __init__(self, routes: dict):
        routes = routes

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                route = routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                kind, payload = route
                if kind == "slow":
                    time.sleep(payload)
                    payload, kind = png_bytes(Image.new("RGB", (8, 8))), "body"
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                if kind == "body":
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                elif kind == "lying":  # says 100 bytes, sends the whole payload without a length-limited body
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    self.wfile.write(payload)
                elif kind == "endless":  # no Content-Length; streams until the client gives up
                    self.end_headers()
                    try:
                        for _ in range(payload):
                            self.wfile.write(b"\0" * 65536)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    good = Image.fromarray(np.tile(np.arange(16, dtype=np.uint8)[None, :, None] * 16, (16, 1, 3)))
    srv = _Server({
        "/good.png": ("body", png_bytes(good)),
        "/bomb.png": ("body", png_header_only(12000, 12000)),
        "/big.png": ("body", png_bytes(Image.effect_noise((256, 256), 64).convert("RGB"))),
        "/endless": ("endless", 2000),  # up to 125 MiB if nobody stops reading
        "/slow.png": ("slow", 3.0),
        "/not-an-image": ("body", b"<html>hello</html>"),
    })
    srv.good = good
    yield srv
    srv.close()


def test_url_loads_like_the_same_file(server, tmp_path):
    path = tmp_path / "good.png"
    server.good.save(path)
    ip = VisualGLMImageProcessor(size=16)
    assert torch.equal(ip(server.url + "/good.png")["pixel_values"], ip(str(path))["pixel_values"])


def test_url_bomb_is_refused_before_decoding(server):
    ip = VisualGLMImageProcessor(size=16)
    with pytest.raises(ValueError, match="12000x12000 = 144,000,000 pixels"):
        ip(server.url + "/bomb.png")
    path_like = VisualGLMImageProcessor(size=16, max_image_pixels=100)
    with pytest.raises(ValueError, match="more than the limit of 100"):
        path_like(server.url + "/good.png")


def test_url_bytes_are_capped_while_reading(server):
    small = VisualGLMImageProcessor(size=16, max_image_bytes=10_000)
    with pytest.raises(ValueError, match="more than max_image_bytes=10,000"):
        small(server.url + "/big.png")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="max_image_bytes"):  # no Content-Length: the cap still holds
        VisualGLMImageProcessor(size=16, max_image_bytes=1_000_000)(server.url + "/endless")
    assert time.perf_counter() - start < 10


def test_url_timeout_scheme_and_garbage(server):
    with pytest.raises(ValueError, match="could not fetch"):
        VisualGLMImageProcessor(size=16, url_timeout=0.5)(server.url + "/slow.png")
    ip = VisualGLMImageProcessor(size=16)
    for url in ("file:///etc/hostname", "ftp://127.0.0.1/x.png", "gopher://x"):
        with pytest.raises(ValueError, match="only http and https"):
            ip(url)
    with pytest.raises(ValueError, match="could not fetch"):
        ip(server.url + "/missing.png")
    with pytest.raises(ValueError, match="corrupt or not an image"):
        ip(server.url + "/not-an-image")


def test_sixteen_bit_and_float_images_keep_their_brightness(tmp_path):
    ramp16 = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1040).astype(np.uint16)  # 0 .. 65520
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp16).save(path)
    assert Image.open(path).mode.startswith("I")
    expected = np.round(ramp16 * (255 / 65535)).astype(np.uint8)
    got = np.asarray(to_rgb(Image.open(path)))
    assert (got == expected[..., None]).all()
    # float in [0, 1] (a typical float TIFF), and float in [0, 255]
    half = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32))
    tiff = tmp_path / "half.tiff"
    half.save(tiff)
    assert np.asarray(to_rgb(Image.open(tiff)))[0, 0].tolist() == [128, 128, 128]
    wide = Image.fromarray(np.array([[0.0, 100.0], [300.0, float("nan")]], dtype=np.float32))
    assert np.asarray(to_rgb(wide))[..., 0].tolist() == [[0, 100], [255, 0]]
    # the processor sees the same image through a path
    ip = VisualGLMImageProcessor(size=8)
    assert torch.equal(ip(str(path))["pixel_values"], ip(Image.fromarray(expected).convert("RGB"))["pixel_values"])


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["L", "RGB", "RGBA", "P", "I;16", "I", "F", "1", "LA", "CMYK"]),
       st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_any_pil_mode_gives_a_normalized_tensor(mode, width, height, seed):
    rng = np.random.default_rng(seed)
    if mode in ("I;16",):
        image = Image.fromarray(rng.integers(0, 65536, (height, width)).astype(np.uint16))
    elif mode == "I":
        image = Image.fromarray(rng.integers(0, 65536, (height, width)).astype(np.int32))
    elif mode == "F":
        image = Image.fromarray(rng.normal(0.5, 2.0, (height, width)).astype(np.float32))
    else:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3)).astype(np.uint8)).convert(mode)
    pixels = VisualGLMImageProcessor(size=8)(image)["pixel_values"]
    assert pixels.shape == (1, 3, 8, 8) and torch.isfinite(pixels).all()
    lo = (0 - max(VisualGLMImageProcessor().image_mean)) / min(VisualGLMImageProcessor().image_std)
    hi = (1 - min(VisualGLMImageProcessor().image_mean)) / min(VisualGLMImageProcessor().image_std)
    assert lo - 1e-4 <= pixels.min() and pixels.max() <= hi + 1e-4


# --- prompts ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_visualglm(tiny_tokenizer):
    from modeling_visualglm.modeling_visualglm import VisualGLMForConditionalGeneration
    from modeling_visualglm.tools.tiny_models import randomize_, tiny_visualglm_config

    return randomize_(VisualGLMForConditionalGeneration(tiny_visualglm_config(tiny_tokenizer)).eval(), seed=5)


def test_a_huge_query_fails_before_any_compute(tiny_visualglm, tiny_tokenizer):
    calls = []
    hook = tiny_visualglm.language_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        start = time.perf_counter()
        with pytest.raises(ValueError, match="the model has only 512"):
            tiny_visualglm.chat(tiny_tokenizer, None, "x y " * 50_000, history=[])
        assert time.perf_counter() - start < 10 and calls == []
        ids = torch.full((1, 600), 7)
        with pytest.raises(ValueError, match="more than the 512 positions"):
            tiny_visualglm(input_ids=ids)
        with pytest.raises(ValueError, match="more than the 512 positions"):
            tiny_visualglm.generate(input_ids=ids, max_new_tokens=2)
        assert calls == []
    finally:
        hook.remove()


def test_cogvlm_counts_positions_not_tokens():
    """CogVLM's image block takes 3 positions for all its tokens: the bound is on positions."""
    from modeling_visualglm.modeling_cogvlm import CogVLMForConditionalGeneration
    from modeling_visualglm.tools.tiny_models import tiny_cogvlm_config

    config = tiny_cogvlm_config("cogvlm")
    config.text_config.max_position_embeddings = 16
    model = CogVLMForConditionalGeneration(config).eval()
    n = config.num_image_tokens  # 18 > 16 positions: only legal because it takes 3
    model.check_prompt_length(n + 13, has_images=True)
    with pytest.raises(ValueError, match="more than the 16 positions"):
        model.check_prompt_length(n + 14, has_images=True)
    with pytest.raises(ValueError, match="more than the 16 positions"):
        model.check_prompt_length(17, has_images=False)
