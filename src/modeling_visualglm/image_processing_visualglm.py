"""Image processor of VisualGLM-6B (BLIP-2's eval transform), PIL + torch only.

Implements ``BlipImageEvalProcessor(224)`` of THUDM/VisualGLM-6B (``model/blip2.py`` @e314fb9; the same class in
the HF ``visual.py`` of THUDM/visualglm-6b), from BLIP-2 (Li et al., 2023, "BLIP-2: Bootstrapping
Language-Image Pre-training with Frozen Image Encoders and Large Language Models"):
``convert("RGB")`` → resize to exactly size×size with PIL bicubic (aspect ratio not kept, no crop) → [0, 1]
float32 (÷255) → per-channel ``(x − mean) / std`` with the CLIP constants → ``pixel_values`` (N, 3, H, W).

Deliberate differences from the original:
- No torchvision: torchvision's ``Resize`` on a PIL image calls PIL's ``resize`` with the same filter, and
  ``ToTensor`` + ``Normalize`` are the same float32 operations, so the values are identical.
- Inputs may be PIL images, file paths or http(s) URLs (fetched with a timeout and a byte cap), one or a list;
  unreadable, empty, corrupt, zero-sized and decompression-bomb-sized images raise ``ValueError`` naming the
  source, instead of a PIL traceback. 16-bit and float images are scaled to 8 bits (PIL alone clips them).
- The output stays float32; the model casts ``pixel_values`` to its own dtype (the originals cast to fp16).
"""

from __future__ import annotations

import io
import os
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

# OpenAI CLIP's normalization, used by BLIP-2 and so by VisualGLM
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _as_size(size) -> dict[str, int]:
    if isinstance(size, int):
        return {"height": size, "width": size}
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    if isinstance(size, dict) and {"height", "width"} <= set(size):
        return {"height": int(size["height"]), "width": int(size["width"])}
    if isinstance(size, dict) and "shortest_edge" in size:  # a square size written by another HF processor
        return {"height": int(size["shortest_edge"]), "width": int(size["shortest_edge"])}
    raise ValueError(f"size must be an int, (height, width) or {{'height', 'width'}}, got {size!r}")


class VisualGLMImageProcessor(BaseImageProcessor):
    """PIL image(s) or path(s) → ``pixel_values`` float32 (N, 3, size, size), normalized with CLIP mean/std."""

    model_input_names = ["pixel_values"]
    _auto_class = "AutoImageProcessor"

    def __init__(
        self,
        size=224,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample: int = Image.Resampling.BICUBIC,
        max_image_pixels: int | None = None,
        max_image_bytes: int = 64 * 1024 * 1024,
        url_timeout: float = 20.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.size = _as_size(size)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.resample = int(resample)
        # PIL's own decompression-bomb threshold (89,478,485 px) unless configured
        self.max_image_pixels = int(max_image_pixels) if max_image_pixels is not None else Image.MAX_IMAGE_PIXELS
        self.max_image_bytes = int(max_image_bytes)  # what an image URL may send
        self.url_timeout = float(url_timeout)

    # ---- loading ----------------------------------------------------------------------------------------

    def load_image(self, image) -> Image.Image:
        """An RGB PIL image from a PIL image, a local path or an http(s) URL, with errors that name the source.

        Files and URLs go through the same checks: the pixel limit (``max_image_pixels``, read from the header
        before decoding), corrupt or truncated data, and 16-bit / float images scaled to 8 bits. URLs are fetched
        with a timeout (``url_timeout`` seconds) and at most ``max_image_bytes`` bytes, counted while reading.
        """
        if isinstance(image, Image.Image):
            if image.width == 0 or image.height == 0:
                raise ValueError(f"image has zero size {image.size}")
            self._check_pixels(image, "the given image")
            return to_rgb(image)
        if isinstance(image, str) and "://" in image.split("?")[0][:16]:
            return self._decode(io.BytesIO(self._fetch(image)), image)
        if not isinstance(image, (str, Path)):
            raise TypeError(f"expected a PIL image or a file path (or an http(s) URL), got {type(image).__name__}")
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path!r}")
        if os.path.getsize(path) == 0:
            raise ValueError(f"image file is empty: {path!r}")
        with open(path, "rb") as f:
            return self._decode(f, path)

    def _fetch(self, url: str) -> bytes:
        """The body of an http(s) URL: streamed, at most ``max_image_bytes``, within ``url_timeout`` seconds."""
        scheme = url.split("://", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"image URL {url!r}: only http and https are fetched, not {scheme!r}")
        request = urllib.request.Request(url, headers={"User-Agent": "modeling_visualglm"})
        try:
            with urllib.request.urlopen(request, timeout=self.url_timeout) as response:
                chunks, size = [], 0
                while True:
                    chunk = response.read(1 << 16)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > self.max_image_bytes:  # counted as read: Content-Length is not trusted
                        raise ValueError(f"image URL {url!r} sent more than max_image_bytes={self.max_image_bytes:,}")
                    chunks.append(chunk)
        except ValueError:
            raise
        except (OSError, urllib.error.URLError) as err:  # timeouts, refused connections, HTTP errors
            raise ValueError(f"could not fetch image URL {url!r}: {err}") from err
        if not size:
            raise ValueError(f"image URL {url!r} returned no data")
        return b"".join(chunks)

    def _decode(self, stream, name: str) -> Image.Image:
        try:
            with warnings.catch_warnings():
                # _check_pixels below turns PIL's bomb warning into a clear error
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                opened = Image.open(stream)
        except Image.DecompressionBombError as err:  # PIL's hard limit, 2x MAX_IMAGE_PIXELS
            raise ValueError(f"image {name!r} is too large to decode safely: {err}") from err
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"could not read image {name!r} (corrupt or not an image): {err}") from err
        with opened:
            self._check_pixels(opened, name)
            try:
                opened.load()
                return to_rgb(opened)
            except (OSError, SyntaxError, ValueError) as err:
                raise ValueError(f"could not decode image {name!r} (corrupt or truncated): {err}") from err

    def _check_pixels(self, image: Image.Image, name: str) -> None:
        width, height = image.size
        if width == 0 or height == 0:
            raise ValueError(f"image {name!r} has zero size {image.size}")
        if width * height > self.max_image_pixels:
            raise ValueError(
                f"image {name!r} has {width}x{height} = {width * height:,} pixels, more than the limit of "
                f"{self.max_image_pixels:,} (a decompression bomb?); raise max_image_pixels to accept it"
            )

    # ---- processing -------------------------------------------------------------------------------------

    def to_tensor(self, image: Image.Image, size=None) -> torch.Tensor:
        """One RGB PIL image → normalized float32 tensor (3, H, W)."""
        size = _as_size(size) if size is not None else self.size
        height, width = size["height"], size["width"]
        resized = image.resize((width, height), resample=self.resample)
        pixels = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8)
        pixels = pixels.view(height, width, 3).permute(2, 0, 1).to(torch.float32).div(255.0)  # (3, H, W)
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1)
        return pixels.sub(mean).div(std)

    def preprocess(self, images, return_tensors="pt", size=None, **kwargs) -> BatchFeature:
        """``images``: a PIL image, a path, or a (nested) list of them. Returns ``pixel_values`` (N, 3, H, W)."""
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}; only size and return_tensors are accepted")
        flat = flatten_images(images)
        if not flat:
            raise ValueError("no images given")
        pixel_values = torch.stack([self.to_tensor(self.load_image(image), size=size) for image in flat])
        return BatchFeature({"pixel_values": pixel_values}, tensor_type=return_tensors)

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def to_dict(self):
        out = super().to_dict()
        out.pop("_valid_kwargs_names", None)
        return out


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. PIL's own ``convert("RGB")`` clips 16-bit and 32-bit integer pixels at 255 (nearly white) and
    truncates float pixels in [0, 1] to 0 (black); those are scaled to 0..255 first: 16-bit by 255/65535,
    32-bit integers by 255/65535 when their maximum is above 255, floats by 255 when their maximum is at most 1
    (else clipped to 0..255), NaN → 0."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        sixteen_bit = mode.startswith("I;16")
        if sixteen_bit:
            image = image.convert("I")  # exact: native-endian int32
        dtype = torch.float32 if mode == "F" else torch.int32
        values = torch.frombuffer(bytearray(image.tobytes()), dtype=dtype).to(torch.float64)
        values = torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(values.max()) if values.numel() else 0.0
        if sixteen_bit or (mode == "I" and peak > 255):
            values = values * (255.0 / 65535.0)
        elif mode == "F" and peak <= 1.0:
            values = values * 255.0
        gray = values.round().clamp(0, 255).to(torch.uint8)
        image = Image.frombytes("L", (image.width, image.height), gray.numpy().tobytes())
    return image.convert("RGB")


def flatten_images(images) -> list:
    """A single image/path, or arbitrarily nested lists/tuples of them, in order."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [leaf for item in images for leaf in flatten_images(item)]
    return [images]
