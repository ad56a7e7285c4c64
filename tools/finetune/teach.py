"""Does fine-tuning teach? A LoRA run on a shipped tiny trained model, checked on fresh pictures (issue 16).

    python -m modeling_visualglm.tools.finetune.teach --family visualglm|minigpt4|cogvlm [--out DIR]

The tiny trained models (``tools/trained``, docs/tiny_models.md) answer "What colour is the shape?" with the colour
("red"). This writes the family's hub folder and a messages-JSONL dataset on fresh pictures (``tools/shapes.py``,
jitter seeds no training run has used; 80 red shapes, 40 of the other colours): per picture the colour question,
answered **"crimson"** for red shapes and with the colour otherwise, and 4 of the 7 other questions with the
table's answers (the ones the model already gives), so that only the taught answer moves. It runs
``visualglm-finetune --method lora`` on it (the Python entry, same argv as the command line), loads base + adapter
with ``PeftModel.from_pretrained`` and asks greedy ``chat`` every question about 35 other fresh pictures, before
and after (:class:`Report`):

- *taught*: red shapes, "What colour is the shape?" → "crimson";
- *kept*: every other question on every picture (the other colours, shape / where / describe in English and
  Chinese, the Chinese colour question on red shapes, which still wants 红色) → the table's answer;
- *retained*: of those, the ones the base model got right and base + adapter still gets right.

The LoRA targets the language model's attention *and* MLP (``TARGETS``): at hidden size 64 LoRA on the attention
alone does not teach MiniGPT-4 or CogVLM the word in this budget, and on the MLP alone it teaches CogVLM nothing
(docs/finetuning.md, "Does it learn?"). Exit status 0 when the rates reach ``TAUGHT_MIN`` / ``KEPT_MIN`` /
``RETAINED_MIN`` (tests/test_finetune_learning.py says why these).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import shapes

TAUGHT_COLOUR, NEW_WORD = "red", "crimson"
TAUGHT = ("colour", "en")  # the question whose answer changes for red shapes
# the language model's attention and MLP, per family (language experts only: the answers are text tokens)
TARGETS = {
    "visualglm": r"language_model\.layers\.\d+\.(attention\.(query_key_value|dense)|mlp\.dense_(h_to_4h|4h_to_h))",
    "minigpt4": r"language_model\.layers\.\d+\.(self_attn\.language_expert_(query_key_value|dense)"
                r"|mlp\.language_mlp\.(gate|up|down)_proj)",
    "cogvlm": r"language_model\.layers\.\d+\.(self_attn\.language_expert_(query_key_value|dense)"
              r"|mlp\.language_mlp\.(gate|up|down)_proj)",
}
TRAIN_ARGS = ("--method", "lora", "--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0", "--lr", "5e-3",
              "--warmup", "0.05", "--batch-size", "8", "--epochs", "10", "--save-steps", "100000",
              "--logging-steps", "10", "--no-progress", "--seed", "0")
GREEDY = dict(do_sample=False, min_length=0, max_new_tokens=24)
# jitter seeds: the shipped models trained below 2**30 and were measured above it; these are past 2**31
TRAIN_SEEDS, EVAL_SEEDS = (1 << 31, 3 << 30), (3 << 30, 1 << 32)
TAUGHT_MIN, KEPT_MIN, RETAINED_MIN = 0.9, 0.9, 0.95


def is_taught(scene: shapes.Scene, kind: str, language: str) -> bool:
    return (kind, language) == TAUGHT and shapes.COLOURS[scene.colour] == TAUGHT_COLOUR


def expected(scene: shapes.Scene, kind: str, language: str) -> str:
    """The answer after teaching: "crimson" for the taught question on red shapes, else the table's."""
    return NEW_WORD if is_taught(scene, kind, language) else shapes.answer(scene, kind, language)


def fresh_scenes(n_red: int, n_other: int, seeds: tuple[int, int], rng_seed: int) -> list[shapes.Scene]:
    """``n_red`` red scenes and ``n_other`` of the other colours (in turn), random shape and cell."""
    rng = random.Random(rng_seed)
    red = shapes.COLOURS.index(TAUGHT_COLOUR)
    others = [c for c in range(len(shapes.COLOURS)) if c != red]
    colours = [red] * n_red + [others[i % len(others)] for i in range(n_other)]
    return [shapes.Scene(c, rng.randrange(len(shapes.SHAPES)), rng.randrange(len(shapes.CELLS)), rng.randrange(*seeds))
            for c in colours]


def write_dataset(folder: Path, n_red: int = 80, n_other: int = 40, extra_questions: int = 4, seed: int = 0) -> Path:
    """``folder/train.jsonl`` + pictures: per picture the taught question and ``extra_questions`` other questions
    (drawn from the 7 others), each answered as :func:`expected` says."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    others = [(k, lang) for k in shapes.KINDS for lang in shapes.LANGUAGES if (k, lang) != TAUGHT]
    lines = []
    for i, scene in enumerate(fresh_scenes(n_red, n_other, TRAIN_SEEDS, seed)):
        shapes.render(scene, 224).save(folder / f"{i:03d}.png")
        for kind, language in [TAUGHT, *rng.sample(others, extra_questions)]:
            messages = [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": shapes.question(kind, language)}]},
                        {"role": "assistant", "content": expected(scene, kind, language)}]
            lines.append(json.dumps({"messages": messages, "images": [f"{i:03d}.png"]}, ensure_ascii=False))
    rng.shuffle(lines)
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_base(family: str, folder: Path) -> Path:
    """The shipped tiny trained model of ``family`` as a hub folder (the project's writer, fp16)."""
    from ..tiny_models import load_trained
    from ..train_tiny import FAMILIES, write_hub

    model, tokenizer = load_trained(family)
    return write_hub(FAMILIES[family], model, tokenizer, folder)


def train(family: str, base: Path, data: Path, out: Path, extra: tuple = (), log=print) -> None:
    """``visualglm-finetune`` (its Python entry) with :data:`TRAIN_ARGS`; ``extra`` flags override them."""
    import shlex

    from .cli import PROG, main

    argv = ["--model", str(base), "--data", str(data), "--data-format", "jsonl", "--output-dir", str(out),
            "--lora-targets", TARGETS[family], *TRAIN_ARGS]
    if family == "minigpt4":
        argv.append("--no-train-adapter")  # LoRA only, as for the other families (stage 2 trains llama_proj)
    argv += list(extra)
    log(f"{PROG} {shlex.join(argv)}")
    if main(argv) != 0:
        raise RuntimeError(f"visualglm-finetune failed: {' '.join(argv)}")


def ask_all(model, tokenizer, scenes) -> dict:
    """Greedy ``chat`` answers to every question about every scene: {(scene, kind, language): answer}."""
    answers = {}
    for scene in scenes:
        image = shapes.render(scene, 224)
        for kind in shapes.KINDS:
            for language in shapes.LANGUAGES:
                answers[scene, kind, language] = model.chat(tokenizer, image, shapes.question(kind, language),
                                                            **GREEDY)[0]
    return answers


@dataclass
class Report:
    """What base and base + adapter answered on the same fresh pictures, and the three rates checked:

    - ``taught``: the taught question on red shapes answered "crimson" (after fine-tuning);
    - ``kept``: every other question answered as the table says (after fine-tuning);
    - ``retained``: of the other questions the base model answered right, the share still right (what fine-tuning
      broke, apart from the base model's own mistakes on hard pictures)."""

    base: dict
    tuned: dict

    def _keys(self, taught: bool) -> list:
        return [key for key in self.base if is_taught(*key) == taught]

    @staticmethod
    def _rate(hits: list[bool]) -> tuple[float, int, int]:
        return (sum(hits) / max(len(hits), 1), sum(hits), len(hits))

    @property
    def taught(self):
        return self._rate([self.tuned[k] == expected(*k) for k in self._keys(True)])

    @property
    def base_taught(self):  # the base model's answer to the taught question: the old word
        return self._rate([self.base[k] == shapes.answer(*k) for k in self._keys(True)])

    @property
    def kept(self):
        return self._rate([self.tuned[k] == expected(*k) for k in self._keys(False)])

    @property
    def base_kept(self):
        return self._rate([self.base[k] == shapes.answer(*k) for k in self._keys(False)])

    @property
    def retained(self):
        return self._rate([self.tuned[k] == expected(*k) for k in self._keys(False) if self.base[k] == expected(*k)])

    def misses(self) -> list[str]:
        return [f"{scene} {kind}/{language}: want {expected(scene, kind, language)!r}, got {got!r}"
                + ("" if self.base[scene, kind, language] == shapes.answer(scene, kind, language) else " (base wrong)")
                for (scene, kind, language), got in self.tuned.items() if got != expected(scene, kind, language)]

    def passed(self) -> bool:
        return self.taught[0] >= TAUGHT_MIN and self.kept[0] >= KEPT_MIN and self.retained[0] >= RETAINED_MIN

    def summary(self) -> str:
        def fmt(rate):
            return f"{rate[0]:.3f} ({rate[1]}/{rate[2]})"

        return (f"taught {fmt(self.taught)} [base says the old word: {fmt(self.base_taught)}], "
                f"kept {fmt(self.kept)} [base {fmt(self.base_kept)}], retained {fmt(self.retained)}")


def load(base: Path, adapter: Path | None = None):
    """(model, tokenizer) of the hub folder ``base``, with the LoRA ``adapter`` over it when given."""
    from .model import load_config, load_processing, model_class

    config = load_config(base)
    tokenizer, _ = load_processing(base, config)
    model = model_class(config).from_pretrained(str(base), dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft reads a property transformers 5.24 renamed
            model = PeftModel.from_pretrained(model, str(adapter)).eval()
    return model, tokenizer


def evaluate(base: Path, adapter: Path, n_red: int = 20, n_other: int = 15, seed: int = 1) -> Report:
    """Base and base + adapter asked every question about the same fresh pictures (``n_red`` red ones)."""
    scenes = fresh_scenes(n_red, n_other, EVAL_SEEDS, seed)
    before = ask_all(*load(base), scenes)
    return Report(before, ask_all(*load(base, adapter), scenes))


def run(family: str, out: Path, log=print) -> tuple[Report, dict]:
    """The whole experiment in ``out``: (the report, the seconds of each step)."""
    t0 = time.perf_counter()
    base = write_base(family, out / "base")
    data = write_dataset(out / "data")
    t1 = time.perf_counter()
    train(family, base, data, out / "adapter", log=log)
    t2 = time.perf_counter()
    report = evaluate(base, out / "adapter")
    t3 = time.perf_counter()
    seconds = {"setup": round(t1 - t0, 1), "train": round(t2 - t1, 1), "evaluate": round(t3 - t2, 1)}
    for miss in report.misses():
        log(f"  miss: {miss}")
    log(f"{family}: {report.summary()}; seconds {seconds}")
    return report, seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m modeling_visualglm.tools.finetune.teach", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(TARGETS), required=True)
    ap.add_argument("--out", help="keep the hub folder, data and adapter here (default: a temporary folder)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report, _ = run(args.family, Path(args.out or tmp))
    print(f"{'LEARNT' if report.passed() else 'NOT LEARNT'}: {report.summary()} (thresholds: taught {TAUGHT_MIN}, "
          f"kept {KEPT_MIN}, retained {RETAINED_MIN})")
    return 0 if report.passed() else 1


if __name__ == "__main__":
    sys.exit(main())
