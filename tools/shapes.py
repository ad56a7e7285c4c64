"""Synthetic pictures of one coloured shape, and the questions and answers the tiny trained models know.

Every picture has a light, slightly noisy background and one filled shape (circle, square or triangle) in one of
six colours, sitting in one cell of a 3x3 grid, with jittered size, position and colour. Pictures are rendered
with PIL at any size (224x224 is what the held-out measurement uses) and go into a model through the folder's own
image processor, exactly like users' pictures.

The question/answer table (issue 15) in English and Chinese, four kinds:

    kind      English question           answer (en)               Chinese question    answer (zh)
    colour    What colour is the shape?  red                       图形是什么颜色？     红色
    shape     What shape is it?          circle                    这是什么形状？       圆形
    where     Where is the shape?        top left                  图形在哪里？         左上
    describe  Describe the image.        a red circle, top left    描述这张图片。       左上有一个红色的圆形

``Scene`` and ``render`` are deterministic: the same seed gives the same picture, byte for byte.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

COLOURS = ("red", "green", "blue", "yellow", "orange", "purple")
COLOURS_ZH = ("红色", "绿色", "蓝色", "黄色", "橙色", "紫色")
RGB = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (35, 70, 220), "yellow": (235, 205, 20),
       "orange": (245, 130, 15), "purple": (135, 40, 170)}
SHAPES = ("circle", "square", "triangle")
SHAPES_ZH = ("圆形", "正方形", "三角形")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
CELLS_ZH = ("左上", "上", "右上", "左", "中间", "右", "左下", "下", "右下")
KINDS = ("colour", "shape", "where", "describe")
LANGUAGES = ("en", "zh")

QUESTIONS = {
    ("colour", "en"): "What colour is the shape?",
    ("shape", "en"): "What shape is it?",
    ("where", "en"): "Where is the shape?",
    ("describe", "en"): "Describe the image.",
    ("colour", "zh"): "图形是什么颜色？",
    ("shape", "zh"): "这是什么形状？",
    ("where", "zh"): "图形在哪里？",
    ("describe", "zh"): "描述这张图片。",
}
# paraphrases seen in training only (the measurement asks the table's questions)
PARAPHRASES = {
    ("colour", "en"): ("What color is the shape?", "Which colour is it?"),
    ("shape", "en"): ("Which shape is this?",),
    ("where", "en"): ("Where is it?",),
    ("describe", "en"): ("Describe this picture.",),
    ("colour", "zh"): ("这是什么颜色？",),
    ("shape", "zh"): ("图形是什么形状？",),
    ("where", "zh"): ("它在哪里？",),
    ("describe", "zh"): ("描述这幅图。",),
}


# half of a shape's extent, as a fraction of a cell: drawn at random from this range. At the tiny models' 56 px a
# cell is 18.7 px, so shapes are 11-17 px wide (1.5-2 patches of 8 px): smaller ones (9 px) left circle vs square
# at chance for a 64-wide ViT.
HALF_EXTENT = (0.3, 0.45)


@dataclass(frozen=True)
class Scene:
    colour: int  # index into COLOURS
    shape: int  # index into SHAPES
    cell: int  # 0..8, row by row
    seed: int  # jitter (size, position, colour, noise)

    @property
    def labels(self) -> tuple[int, int, int]:
        return self.colour, self.shape, self.cell


def answer(scene: Scene, kind: str, language: str) -> str:
    """The exact answer of the table for ``scene``."""
    c, s, p = scene.colour, scene.shape, scene.cell
    if language == "en":
        return {"colour": COLOURS[c], "shape": SHAPES[s], "where": CELLS[p],
                "describe": f"a {COLOURS[c]} {SHAPES[s]}, {CELLS[p]}"}[kind]
    return {"colour": COLOURS_ZH[c], "shape": SHAPES_ZH[s], "where": CELLS_ZH[p],
            "describe": f"{CELLS_ZH[p]}有一个{COLOURS_ZH[c]}的{SHAPES_ZH[s]}"}[kind]


def question(kind: str, language: str) -> str:
    return QUESTIONS[(kind, language)]


def all_combinations() -> list[tuple[int, int, int]]:
    """The 162 (colour, shape, cell) combinations (6 x 3 x 9)."""
    return [(c, s, p) for c in range(len(COLOURS)) for s in range(len(SHAPES)) for p in range(len(CELLS))]


def random_scene(rng: random.Random) -> Scene:
    return Scene(rng.randrange(len(COLOURS)), rng.randrange(len(SHAPES)), rng.randrange(len(CELLS)),
                 rng.randrange(1 << 30))


def render(scene: Scene, size: int = 224):
    """The picture of ``scene`` as an RGB PIL image of ``size`` x ``size`` pixels."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = random.Random(scene.seed)
    bg = [rng.randint(225, 250) for _ in range(3)]
    scale = 4  # drawn 4x larger, then reduced: smooth edges at every size
    big = size * scale
    image = Image.new("RGB", (big, big), tuple(bg))
    draw = ImageDraw.Draw(image)
    cell = big / 3
    row, col = divmod(scene.cell, 3)
    half = cell * rng.uniform(*HALF_EXTENT)
    slack = max(0.0, cell / 2 - half - cell * 0.04)
    cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
    cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
    colour = tuple(max(0, min(255, v + rng.randint(-18, 18))) for v in RGB[COLOURS[scene.colour]])
    shape = SHAPES[scene.shape]
    if shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=colour)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half * 0.85), (cx + half, cy + half * 0.85)], fill=colour)
    image = image.resize((size, size), Image.Resampling.BOX)
    noise = np.random.default_rng(scene.seed).normal(0.0, 6.0, (size, size, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def held_out_scenes(n_per_combination: int = 1, seed: int = 1234) -> list[Scene]:
    """Fresh scenes (jitter seeds never used in training: training draws seeds below 2**30, these above) covering
    every combination ``n_per_combination`` times."""
    rng = random.Random(seed)
    return [Scene(c, s, p, (1 << 30) + rng.randrange(1 << 30)) for _ in range(n_per_combination)
            for c, s, p in all_combinations()]
