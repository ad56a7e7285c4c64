"""Train the tiny model of one family to answer questions about coloured shapes, and measure it held out.

    python -m modeling_visualglm.tools.train_tiny --family visualglm|minigpt4|cogvlm [--out DIR] [--minutes N]

What it builds (issue 15): the family's real architecture from this project's classes with a tiny config
(``tools/tiny_models.py``: ``trained_*_config``), the family's tokenizer format (an ice_text-like SentencePiece model
for VisualGLM, a LLaMA-format one for MiniGPT-4 and CogVLM, trained on a corpus that holds every question, answer
and prompt-template string), the family's chat prompt (the same ``build_*_inputs`` functions ``chat`` uses, so
training prompts equal inference prompts) and pictures from ``tools/shapes.py`` through the family's own image
processor at the model's size.

The recipe:

1. vision tower (+ Q-Former / adapter / projection): ``get_image_features`` flattened into a throw-away linear
   head that classifies colour, shape and cell (cross-entropy on each), with ViT position embeddings initialised
   at σ = 1 (at σ = 0.02 the tower cannot tell the cells apart at this size);
2. the whole model on chat prompts with the loss on the answer tokens only (each answer ends with the family's
   stop: ``<eop>`` for VisualGLM, ``</s>`` for CogVLM, ``###`` + ``</s>`` for MiniGPT-4 Vicuna v0, whose chat stops
   at ``###``), the vision side at 0.2 x the learning rate.

Training pictures come from all 162 colour x shape x cell combinations (6 x 3 x 9; the issue's "54" counts
colour x cell) with jitter seeds below 2**30, rendered at
56-224 px; the held-out pictures are fresh (seeds above 2**30) at 224 px, and every one of the 8 questions (4 kinds,
English and Chinese) is asked through greedy ``chat`` of ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` on a hub folder written by the project's writer from the fp16 weights that ship.

Writes ``model.safetensors`` (fp16), ``config.json``, the SentencePiece model and ``training.json`` (recipe, wall
times, held-out accuracy) to ``--out`` (default: ``tools/trained/<family>`` of this source tree).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from . import shapes

HERE = Path(__file__).resolve().parent
GREEDY = dict(do_sample=False, min_length=0, max_new_tokens=24)  # chat's sampling defaults would not measure the model
NOTE = ("This is a tiny model trained by `python -m modeling_visualglm.tools.train_tiny`: it knows only coloured "
        "shapes (circle, square, triangle in six colours, in one of 3x3 cells) and answers four kinds of questions "
        "about them in English and Chinese. It is for tests and demos, not a real model.")


# --- corpus, tokenizer, prompts per family ----------------------------------------------------------------------

def all_questions() -> list[tuple[str, str, str]]:
    """(kind, language, question) for the table's questions and the training paraphrases."""
    rows = []
    for (kind, lang), q in shapes.QUESTIONS.items():
        rows.append((kind, lang, q))
        rows += [(kind, lang, p) for p in shapes.PARAPHRASES[(kind, lang)]]
    return rows


def all_answers() -> list[str]:
    return sorted({shapes.answer(shapes.Scene(c, s, p, 0), kind, lang) for c, s, p in shapes.all_combinations()
                   for kind in shapes.KINDS for lang in shapes.LANGUAGES})


class Family:
    """What the trainer needs to know about one family."""

    name = ""
    hub_family = ""

    def make_tokenizer(self, folder: Path):
        raise NotImplementedError

    def config(self, tokenizer):
        raise NotImplementedError

    def prompt_ids(self, tokenizer, config, query: str) -> list[int]:
        raise NotImplementedError

    def answer_ids(self, tokenizer, text: str) -> list[int]:
        raise NotImplementedError

    def image_processor(self, config):
        from ..image_processing_visualglm import VisualGLMImageProcessor

        return VisualGLMImageProcessor(size=config.vision_config.image_size)

    def corpus(self) -> list[str]:
        """Every prompt of the training questions and every answer, as the tokenizer will see them."""
        lines = [self.prompt_text(q) for _, _, q in all_questions()] + all_answers()
        return lines * 4

    def prompt_text(self, query: str) -> str:
        raise NotImplementedError


class VisualGLM(Family):
    name = hub_family = "visualglm"
    vocab_file = "ice_text.model"

    def prompt_text(self, query):
        from ..processing_visualglm import build_visualglm_prompt

        return build_visualglm_prompt(query).replace("\n", "<n>")

    def make_tokenizer(self, folder):
        from .tiny_tokenizer import make_chatglm_tokenizer_from_corpus

        return make_chatglm_tokenizer_from_corpus(folder, self.corpus(), trained_vocab_size=160)

    def config(self, tokenizer):
        from .tiny_models import trained_visualglm_config

        return trained_visualglm_config(tokenizer)

    def prompt_ids(self, tokenizer, config, query):
        from ..processing_visualglm import build_visualglm_inputs

        return build_visualglm_inputs(tokenizer, query, num_image_tokens=config.num_image_tokens)

    def answer_ids(self, tokenizer, text):
        # VisualGLM's finetune_visualglm.py: encode(label) + [eop] after the prompt's [gMASK] <sop>
        return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eop_token_id]


class Llama(Family):
    vocab_file = "tokenizer.model"
    vocab_size = 700

    def make_tokenizer(self, folder):
        from .tiny_tokenizer import train_llama_like_model

        model_file = train_llama_like_model(folder, self.corpus(), self.vocab_size)
        from .tiny_models import trained_tokenizer

        return trained_tokenizer(self.name, folder), model_file


class MiniGPT4(Llama):
    name = hub_family = "minigpt4"

    def prompt_text(self, query):
        from ..processing_minigpt4 import build_minigpt4_prompt

        return build_minigpt4_prompt("vicuna0", query)

    def make_tokenizer(self, folder):
        return super().make_tokenizer(folder)[0]

    def config(self, tokenizer):
        from .tiny_models import trained_minigpt4_config

        return trained_minigpt4_config(tokenizer)

    def prompt_ids(self, tokenizer, config, query):
        from ..processing_minigpt4 import build_minigpt4_inputs

        return build_minigpt4_inputs(tokenizer, "vicuna0", query, num_image_tokens=config.num_image_tokens,
                                     image_token_id=config.image_token_id)

    def answer_ids(self, tokenizer, text):
        # MiniGPT-4's stage-2 targets are answer + end_sym "###" (its chat stops there); </s> after it as well
        from ..processing_minigpt4 import encode_text

        return encode_text(tokenizer, text + "###") + [tokenizer.eos_token_id]


class CogVLM(Llama):
    name = "cogvlm"
    hub_family = "cogvlm"

    def prompt_text(self, query):
        from ..processing_cogvlm import build_cogvlm_prompt

        return build_cogvlm_prompt(query, template="chat")

    def corpus(self):
        return [f"{p} {a}" for p in (self.prompt_text(q) for _, _, q in all_questions()) for a in all_answers()[:6]] \
            + super().corpus()

    def make_tokenizer(self, folder):
        return super().make_tokenizer(folder)[0]

    def config(self, tokenizer):
        from .tiny_models import trained_cogvlm_config

        return trained_cogvlm_config(tokenizer)

    def prompt_ids(self, tokenizer, config, query):
        from ..processing_cogvlm import build_cogvlm_inputs, build_cogvlm_prompt

        return build_cogvlm_inputs(tokenizer, build_cogvlm_prompt(query, template=config.template_version), True,
                                   config.num_image_tokens, config.image_token_id)

    def answer_ids(self, tokenizer, text):
        from ..processing_cogvlm import encode_text

        return encode_text(tokenizer, text) + [tokenizer.eos_token_id]

    def image_processor(self, config):
        from ..image_processing_cogvlm import CogVLMImageProcessor

        return CogVLMImageProcessor(size=config.vision_config.image_size)


FAMILIES = {"visualglm": VisualGLM(), "minigpt4": MiniGPT4(), "cogvlm": CogVLM()}
# steps per family (the defaults of --stage1-steps / --stage2-steps): stage 1 runs until the throw-away head is at
# ~100 % on colour, shape and cell (the Q-Former towers need ~3000 steps for the shape; CogVLM's 49 patch tokens go
# to the LM unpooled and reach it in ~1200), stage 2 until the answer loss is ~0.01 (CogVLM's LM has to find the
# cell among 49 image tokens itself and wants more). Each run takes 7.5-8.5 min on 2 cores (docs/tiny_models.md).
STEPS = {"visualglm": (3000, 2000), "minigpt4": (3000, 1700), "cogvlm": (1200, 4400)}


# --- data -------------------------------------------------------------------------------------------------------

TRAIN_SIZES = (56, 80, 112, 160, 224)


def picture_pool(family: Family, config, n: int, seed: int):
    """``n`` training scenes (every combination equally often) and their pixel_values (n, 3, S, S)."""
    rng = random.Random(seed)
    combos = shapes.all_combinations()
    scenes = [shapes.Scene(*combos[i % len(combos)], rng.randrange(1 << 30)) for i in range(n)]
    rng.shuffle(scenes)
    processor = family.image_processor(config)
    chunks = []
    for start in range(0, n, 256):
        images = [shapes.render(s, rng.choice(TRAIN_SIZES)) for s in scenes[start:start + 256]]
        chunks.append(processor(images, return_tensors="pt")["pixel_values"])
    return scenes, torch.cat(chunks)


class Batches:
    """Stage-2 batches: left-padded prompt + answer ids, labels on the answer only, pixel_values."""

    def __init__(self, family: Family, tokenizer, config, scenes, pixels, seed: int, paraphrase_p: float = 0.25):
        self.scenes, self.pixels = scenes, pixels
        self.rng = random.Random(seed)
        self.paraphrase_p = paraphrase_p
        self.prompts = {q: family.prompt_ids(tokenizer, config, q) for _, _, q in all_questions()}
        self.answers = {a: family.answer_ids(tokenizer, a) for a in all_answers()}
        self.pad = config.text_config.pad_token_id or 0

    def sample(self, batch_size: int):
        rows, labels, index = [], [], []
        for _ in range(batch_size):
            i = self.rng.randrange(len(self.scenes))
            kind, lang = self.rng.choice(shapes.KINDS), self.rng.choice(shapes.LANGUAGES)
            q = shapes.question(kind, lang)
            if self.rng.random() < self.paraphrase_p:
                q = self.rng.choice(shapes.PARAPHRASES[(kind, lang)])
            prompt, ans = self.prompts[q], self.answers[shapes.answer(self.scenes[i], kind, lang)]
            rows.append(prompt + ans)
            labels.append([-100] * len(prompt) + ans)
            index.append(i)
        width = max(map(len, rows))
        ids = torch.full((batch_size, width), self.pad, dtype=torch.long)
        lab = torch.full((batch_size, width), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for b, (r, l) in enumerate(zip(rows, labels)):
            ids[b, width - len(r):] = torch.tensor(r)
            lab[b, width - len(l):] = torch.tensor(l)
            mask[b, width - len(r):] = 1
        return dict(input_ids=ids, attention_mask=mask, labels=lab, pixel_values=self.pixels[index])


# --- training ---------------------------------------------------------------------------------------------------

def init_tiny(model, seed: int):
    """Seeded init; ViT position embeddings at σ = 1 (see the module docstring)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        model.vision_model.embeddings.position_embedding.normal_(0.0, 1.0)
    return model


def vision_parameters(model) -> list[nn.Parameter]:
    lm = {id(p) for p in model.language_model.parameters()} | {id(p) for p in model.lm_head.parameters()}
    return [p for p in model.parameters() if id(p) not in lm]


def schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * 0.95 + 0.05


def stage1(model, scenes, pixels, steps: int, batch_size: int, lr: float, seed: int, log) -> dict:
    """Vision side + throw-away head on (colour, shape, cell); returns the last 50 steps' accuracy per attribute and
    for all three together."""
    device = pixels.device
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        feats = model.get_image_features(pixels[:2])
    head = nn.Linear(feats[0].numel(), len(shapes.COLOURS) + len(shapes.SHAPES) + len(shapes.CELLS)).to(device)
    params = vision_parameters(model)
    opt = torch.optim.AdamW(params + list(head.parameters()), lr=lr, weight_decay=0.01)
    labels = torch.tensor([s.labels for s in scenes], device=device)
    splits = (len(shapes.COLOURS), len(shapes.SHAPES), len(shapes.CELLS))
    names = ("colour", "shape", "cell", "all")
    recent = []
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * schedule(step, steps, 50)
        idx = torch.randint(0, len(scenes), (batch_size,), generator=gen).to(device)
        logits = head(model.get_image_features(pixels[idx]).flatten(1)).split(splits, dim=-1)
        y = labels[idx]
        loss = sum(nn.functional.cross_entropy(lg, y[:, k]) for k, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        hits = torch.stack([lg.argmax(-1) == y[:, k] for k, lg in enumerate(logits)])
        row = torch.cat([hits.float().mean(1), hits.all(0).float().mean()[None]]).tolist()
        recent = (recent + [row])[-50:]
        if step % 100 == 0 or step == steps - 1:
            acc = [sum(r[k] for r in recent) / len(recent) for k in range(4)]
            log(f"  stage 1 step {step:5d}  loss {loss.item():.3f}  accuracy " +
                "  ".join(f"{n} {a:.3f}" for n, a in zip(names, acc)))
    model.eval()
    return {n: round(sum(r[k] for r in recent) / len(recent), 4) for k, n in enumerate(names)}


def stage2(model, batches: Batches, steps: int, batch_size: int, lr: float, vision_lr_scale: float, deadline: float,
           log) -> int:
    device = next(model.parameters()).device
    vision = vision_parameters(model)
    vision_ids = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in vision_ids]
    opt = torch.optim.AdamW([{"params": rest, "scale": 1.0}, {"params": vision, "scale": vision_lr_scale}], lr=lr,
                            weight_decay=0.01)
    model.train()
    recent = []
    step = 0
    for step in range(steps):
        if time.perf_counter() > deadline:
            log(f"  stage 2 stopped at step {step} by --minutes")
            break
        for g in opt.param_groups:
            g["lr"] = lr * g["scale"] * schedule(step, steps, 100)
        out = model(**{k: v.to(device) for k, v in batches.sample(batch_size).items()})
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [out.loss.item()])[-50:]
        if step % 100 == 0 or step == steps - 1:
            log(f"  stage 2 step {step:5d}  answer loss {sum(recent) / len(recent):.4f}")
    model.eval()
    return step + 1


# --- shipping and measuring -------------------------------------------------------------------------------------

@torch.no_grad()
def finalize_(model, num_pieces: int):
    """Make the weights writable in the originals' layouts without changing an answer: the K slice of the towers'
    fused qkv bias is 0 (it shifts every score of a query equally, so no attention weight depends on it; EVA ViT-g
    files have q_bias/v_bias only), and rows past the tokenizer's pieces (the image placeholder's, never looked up,
    never sampled) are 0, as the MiniGPT-4 converter writes them."""
    for name, p in model.vision_model.named_parameters():
        if name.endswith("attention.query_key_value.bias"):
            p[p.shape[0] // 3: 2 * p.shape[0] // 3] = 0
    if model.config.model_type == "minigpt4":
        model.get_input_embeddings().weight[num_pieces:] = 0
        model.lm_head.weight[num_pieces:] = 0
    return model


def state_to_ship(model) -> dict:
    tied = set(model._tied_weights_keys or {}) if model.config.tie_word_embeddings else set()
    return {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items() if k not in tied}


def write_hub(family: Family, model, tokenizer, folder: Path) -> Path:
    """A hub folder of the fp16 weights, written by the project's writer."""
    from ..hub_export.families import FAMILIES as HUB
    from ..hub_export.writer import write_hub_folder

    state = state_to_ship(model)
    entries = [((k,), v.nbytes, lambda k=k, v=v: {k: v}) for k, v in state.items()]
    write_hub_folder(folder, family=HUB[family.hub_family], config=model.config, weight_entries=entries,
                     dtype=torch.float16, tokenizer=tokenizer, progress=False, source_note=NOTE)
    return folder


def ask(model, tokenizer, image, query: str) -> str:
    return model.chat(tokenizer, image, query, **GREEDY)[0]


def measure(folder: Path, scenes, log=print, size: int = 224) -> tuple[float, dict, list]:
    """Greedy chat of ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` on every question of
    every scene; returns (exact-answer rate, rate per (kind, language), mistakes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32).eval()
    per, mistakes, total, right = {}, [], 0, 0
    for scene in scenes:
        image = shapes.render(scene, size)
        for kind in shapes.KINDS:
            for lang in shapes.LANGUAGES:
                want = shapes.answer(scene, kind, lang)
                got = ask(model, tokenizer, image, shapes.question(kind, lang))
                ok = got == want
                key = f"{kind}/{lang}"
                n, r = per.get(key, (0, 0))
                per[key] = (n + 1, r + ok)
                total, right = total + 1, right + ok
                if not ok:
                    mistakes.append((scene, kind, lang, want, got))
    return right / total, {k: r / n for k, (n, r) in per.items()}, mistakes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m modeling_visualglm.tools.train_tiny", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FAMILIES), required=True)
    ap.add_argument("--out", help="where the trained files go (default: tools/trained/<family> of this source tree)")
    ap.add_argument("--minutes", type=float, default=15.0,
                    help="wall-clock cap: stage 2 stops early when training has run this long (default 15)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--pool", type=int, default=6000, help="training pictures (default 6000)")
    ap.add_argument("--stage1-steps", type=int, help="default per family: " + ", ".join(
        f"{k} {v[0]}" for k, v in STEPS.items()))
    ap.add_argument("--stage1-lr", type=float, default=3e-3)
    ap.add_argument("--stage2-steps", type=int, help="default per family: " + ", ".join(
        f"{k} {v[1]}" for k, v in STEPS.items()))
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--held-out", type=int, default=2, help="fresh 224 px pictures per combination (default 2)")
    ap.add_argument("--no-measure", action="store_true", help="skip the held-out measurement")
    ap.add_argument("--image-size", type=int, help="override the preset's vision image_size (experiments)")
    ap.add_argument("--patch-size", type=int, help="override the preset's vision patch_size (experiments)")
    ap.add_argument("--vision-width", type=int, help="override the preset's vision hidden_size (experiments; "
                                                        "intermediate_size follows at 2x)")
    ap.add_argument("--device", default="cpu", help="torch device to train on (default cpu)")
    args = ap.parse_args(argv)
    args.stage1_steps = args.stage1_steps or STEPS[args.family][0]
    args.stage2_steps = args.stage2_steps or STEPS[args.family][1]

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    family = FAMILIES[args.family]
    out = Path(args.out) if args.out else HERE / "trained" / args.family
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    deadline = t0 + args.minutes * 60

    def log(msg):
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:  # only the SentencePiece model ships; the rest is rebuilt from it
        family.make_tokenizer(Path(tmp))
        shutil.copy(Path(tmp) / family.vocab_file, out / family.vocab_file)
    from .tiny_models import trained_tokenizer

    tokenizer = trained_tokenizer(args.family, out)
    config = family.config(tokenizer)
    for key in ("image_size", "patch_size"):
        if getattr(args, key) is not None:
            setattr(config.vision_config, key, getattr(args, key))
    if args.vision_width is not None:
        config.vision_config.hidden_size = args.vision_width
        config.vision_config.intermediate_size = 2 * args.vision_width
        if getattr(config, "qformer_config", None) is not None:
            config.qformer_config.encoder_hidden_size = args.vision_width
    from .tiny_models import trained_model_class

    torch.manual_seed(args.seed)
    model = init_tiny(trained_model_class(args.family)(config), args.seed).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{args.family}: {n_params:,} parameters, vocabulary {len(tokenizer)}, {config.num_image_tokens} image tokens")
    scenes, pixels = picture_pool(family, config, args.pool, args.seed)
    pixels = pixels.to(args.device)
    log(f"{len(scenes)} training pictures rendered ({pixels.shape[-1]} px after the image processor)")
    t1 = time.perf_counter()
    acc1 = stage1(model, scenes, pixels, args.stage1_steps, 64, args.stage1_lr, args.seed, log)
    t2 = time.perf_counter()
    batches = Batches(family, tokenizer, config, scenes, pixels, args.seed)
    steps2 = stage2(model, batches, args.stage2_steps, args.batch_size, args.lr, 0.2, deadline, log)
    t3 = time.perf_counter()

    from safetensors.torch import save_file

    model = model.cpu()
    finalize_(model, len(tokenizer))
    save_file(state_to_ship(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    config.to_json_file(str(out / "config.json"), use_diff=False)
    import platform

    record = dict(command="python -m modeling_visualglm.tools.train_tiny " + " ".join(sys.argv[1:] if argv is None
                                                                                        else argv),
                  machine=dict(host=platform.node(), processor=platform.processor() or platform.machine(),
                               cpu_affinity=len(os.sched_getaffinity(0)), device=args.device,
                               torch=torch.__version__),
                  family=args.family, parameters=n_params, seed=args.seed, pool=args.pool,
                  stage1_steps=args.stage1_steps, stage2_steps=steps2, batch_size=args.batch_size, lr=args.lr,
                  stage1_lr=args.stage1_lr, stage1_accuracy=acc1, threads=args.threads,
                  seconds=dict(setup=round(t1 - t0, 1), stage1=round(t2 - t1, 1), stage2=round(t3 - t2, 1),
                               total_training=round(t3 - t0, 1)),
                  load_average_at_end=[round(x, 2) for x in os.getloadavg()])
    log(f"training done in {t3 - t0:.0f}s (setup {t1 - t0:.0f}s, stage 1 {t2 - t1:.0f}s, stage 2 {t3 - t2:.0f}s); "
        f"load average {os.getloadavg()[0]:.2f}")

    if not args.no_measure:
        from .tiny_models import load_trained

        shipped, shipped_tok = load_trained(args.family, out)
        with tempfile.TemporaryDirectory() as tmp:
            hub = write_hub(family, shipped, shipped_tok, Path(tmp) / "hub")
            scenes_out = shapes.held_out_scenes(args.held_out, seed=1000 + args.seed)
            t4 = time.perf_counter()
            accuracy, per, mistakes = measure(hub, scenes_out, log)
            t5 = time.perf_counter()
        for scene, kind, lang, want, got in mistakes[:20]:
            log(f"  wrong: {scene} {kind}/{lang}: want {want!r}, got {got!r}")
        log("held-out exact answers per question: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(per.items())))
        n = len(scenes_out) * len(shapes.KINDS) * len(shapes.LANGUAGES)
        print(f"HELD-OUT ACCURACY {args.family}: {accuracy:.4f} ({round(accuracy * n)}/{n} exact answers, fresh 224 px "
              f"pictures, greedy chat through AutoModelForCausalLM on a hub folder; {t5 - t4:.0f}s)", flush=True)
        record["seconds"]["held_out_measurement"] = round(t5 - t4, 1)
        record.update(held_out=dict(accuracy=round(accuracy, 4), questions=n, per_question={k: round(v, 4) for k, v in
                                                                                          sorted(per.items())},
                                    seed=1000 + args.seed, size=224))
    (out / "training.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    log("shipped files: " + ", ".join(f"{k} {v:,} B" for k, v in sizes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
