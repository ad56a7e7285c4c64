"""``visualglm-finetune``: fine-tune a VisualGLM / CogVLM / MiniGPT-4 hub folder (LoRA, QLoRA or full) on
transformers' Trainer + peft, and merge an adapter into a complete hub folder. See docs/finetuning.md.

    visualglm-finetune [train] --model DIR --data PATH --data-format FORMAT --output-dir OUT [options]
    visualglm-finetune merge --base DIR --adapter OUT --out DIR2 [--dtype keep|float32|float16|bfloat16] [--force]

Several processes / GPUs: launch the same command with ``torchrun --nproc_per_node N -m
modeling_visualglm.tools.finetune ...`` or ``accelerate launch -m modeling_visualglm.tools.finetune ...`` (DDP
through Trainer/accelerate; on CPU the gloo backend). ``--batch-size`` is per process: the global batch is
batch-size × processes × grad-accum, and the loss is token-weighted over the global batch.

Exit codes: 0 success, 1 bad data or a failed run, 2 usage error.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

PROG = "visualglm-finetune"


class UsageError(Exception):
    pass


def _fraction_or_count(text: str) -> float:
    value = float(text)
    if value < 0 or (value >= 1 and value != int(value)):
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) or a whole number of samples, got {text}")
    return value


def train_parser() -> argparse.ArgumentParser:
    from .data import FORMATS

    p = argparse.ArgumentParser(
        prog=f"{PROG} [train]", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a converted hub folder (VisualGLM-6B, CogVLM/CogVLM2, MiniGPT-4) with LoRA, QLoRA or "
                    "full fine-tuning. The LoRA adapter (or, for --method full, a complete hub folder in "
                    "OUTPUT_DIR/hub) is written to --output-dir; checkpoints go to OUTPUT_DIR/checkpoint-N.",
        epilog="Example (LoRA on VisualGLM's fewshot data, 300 steps as the original finetune_lora.sh):\n"
               f"  {PROG} --model visualglm-6b-hf --data fewshot-data/dataset.json --data-format visualglm-fewshot \\\n"
               "      --output-dir runs/vg-lora --max-steps 300 --batch-size 4 --bf16\n"
               f"  {PROG} merge --base visualglm-6b-hf --adapter runs/vg-lora --out visualglm-6b-tuned\n"
               "Data formats:\n"
               "  visualglm-fewshot  JSON list of {img, prompt, label} (VisualGLM fewshot-data/dataset.json)\n"
               "  cogvlm-sft         folder with images/ and labels/*.json {conversations|captions} (CogVLM-SFT-311K)\n"
               "  cc-sbu-align       folder with image/ and filter_cap.json {annotations} (MiniGPT-4 stage 2)\n"
               "  jsonl              one {\"messages\": [...], \"images\": [path]} per line\n"
               "Read docs/finetuning.md for recipes, label masking and memory.")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="the hub folder to fine-tune (written by visualglm-convert)")
    g.add_argument("--data", required=True, help="training data: a file or folder in --data-format")
    g.add_argument("--data-format", required=True, choices=sorted(FORMATS), help="the layout of --data (required)")
    g.add_argument("--labels-dir", help="cogvlm-sft: the labels folder name (labels, labels_en, labels_zh)")
    g.add_argument("--eval-data", help="evaluation data in the same format (instead of --eval-split)")
    g.add_argument("--eval-split", type=_fraction_or_count, default=0.0,
                   help="hold out this fraction (<1) or number of training samples for evaluation (default 0)")
    g.add_argument("--output-dir", required=True, help="where the adapter, checkpoints and logs go")
    g.add_argument("--max-target-length", type=int,
                   help="answer tokens kept, end token included (default: the original's: VisualGLM 256, "
                        "CogVLM 128, MiniGPT-4 160)")
    g.add_argument("--english", choices=("auto", "yes", "no"), default="auto",
                   help="VisualGLM prompt language: auto (as chat(): English iff the question has no CJK), yes "
                        "(Q:/A:), no (问：/答：, what finetune_visualglm.py always used)")
    g.add_argument("--template", choices=("base", "chat", "vqa", "text"),
                   help="CogVLM prompt template (default: the folder's template_version, the one chat() uses)")

    g = p.add_argument_group("method")
    g.add_argument("--method", choices=("lora", "qlora", "full"), default="lora",
                   help="lora (default), qlora (4-bit NF4 language model, image path in bf16; CUDA GPU only), full")
    g.add_argument("--lora-r", type=int, help="LoRA rank (default: the family's original recipe)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the family's original recipe)")
    g.add_argument("--lora-dropout", type=float, help="LoRA dropout (default: the family's original recipe)")
    g.add_argument("--lora-targets", help="modules to adapt: comma-separated name suffixes (e.g. "
                   "query_key_value,dense) or one regular expression over full module names")
    for part, what in (("vision", "the vision tower"), ("qformer", "the Q-Former (VisualGLM, MiniGPT-4)"),
                       ("adapter", "the vision→language projection (glm_proj / adapter / llama_proj)"),
                       ("lm", "the language model and its head")):
        g.add_argument(f"--train-{part}", action=argparse.BooleanOptionalAction, default=None,
                       help=f"train {what} in full, or freeze it with --no-train-{part} (default: the method's "
                            "and family's recipe, see docs/finetuning.md)")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    g.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    g.add_argument("--batch-size", type=int, default=1, help="samples per process per step (default 1)")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4, VisualGLM's)")
    g.add_argument("--lr-scheduler", default="cosine", help="transformers scheduler name (default cosine)")
    g.add_argument("--warmup", type=float, default=0.02, help="warm-up: a fraction (<1) of the steps or a count "
                   "(default 0.02, VisualGLM's)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=42)
    prec = g.add_mutually_exclusive_group()
    prec.add_argument("--bf16", action="store_true", help="bfloat16 weights and autocast (GPUs with bf16)")
    prec.add_argument("--fp16", action="store_true", help="float16 autocast with loss scaling (LoRA: fp16 base)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="resume from OUTPUT_DIR's latest checkpoint-N, or from the given checkpoint folder")

    g = p.add_argument_group("evaluation, saving and logs")
    g.add_argument("--eval-steps", type=int, help="evaluate every N steps (default: once per epoch and at the end)")
    g.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps (default 500)")
    g.add_argument("--save-total-limit", type=int, help="keep at most this many checkpoints")
    g.add_argument("--logging-steps", type=int, default=10, help="log the loss every N steps (default 10)")
    g.add_argument("--report-to", default="none", help="Trainer integrations (tensorboard, wandb, ...; default none)")
    g.add_argument("--num-workers", type=int, default=0, help="data loader worker processes")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    return p


def merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} merge",
        description="Merge a LoRA adapter written by visualglm-finetune into its base hub folder and write a "
                    "complete hub folder (weights, config, code, tokenizer, processor, card) that "
                    "`visualglm-export check` accepts and `visualglm-export push` uploads.")
    p.add_argument("--base", required=True, help="the hub folder the adapter was trained on")
    p.add_argument("--adapter", required=True, help="the adapter folder (--output-dir of the training run, or a "
                   "checkpoint-N in it)")
    p.add_argument("--out", required=True, help="the merged hub folder to write (must not exist unless --force)")
    p.add_argument("--dtype", choices=("keep", "float32", "float16", "bfloat16"), default="keep",
                   help="weights dtype of the output (default: the base folder's)")
    p.add_argument("--force", action="store_true", help="replace --out if it is a folder this tool wrote")
    p.add_argument("--no-progress", action="store_true")
    return p


def _log(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{PROG}: {message}", flush=True)


def _split(encoded: list, eval_split: float, seed: int):
    import random

    if not eval_split:
        return encoded, []
    count = int(eval_split) if eval_split >= 1 else max(1, math.floor(len(encoded) * eval_split))
    if count >= len(encoded):
        raise UsageError(f"--eval-split {eval_split:g} leaves no training samples out of {len(encoded)}")
    order = list(range(len(encoded)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [e for i, e in enumerate(encoded) if i not in held], [e for i, e in enumerate(encoded) if i in held]


def _check_lengths(encoded: list, config) -> None:
    limit = config.text_config.max_position_embeddings
    for item in encoded:
        n = len(item.input_ids)
        if config.model_type == "cogvlm" and config.image_token_id in item.input_ids:
            n -= config.num_image_tokens - 3  # the image block takes 3 positions (spec cogvlm.md §2.3)
        if n > limit:
            raise ValueError(f"{item.source}: {n} positions, more than the model's {limit}; lower "
                             "--max-target-length or shorten the prompt")


def run_train(args) -> int:
    import torch
    from transformers import TrainingArguments, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from .collate import Collator, FinetuneDataset
    from .data import load_samples
    from .encode import SampleEncoder, family_of
    from .merge import write_model_folder
    from .model import (build_model, check_qlora_available, load_config, load_processing, lora_defaults,
                        parse_targets, trained_parts)
    from .trainer import FinetuneTrainer

    if args.method == "qlora":
        reason = check_qlora_available()
        if reason:
            raise UsageError(reason)
    if args.fp16 and args.method == "full" and not torch.cuda.is_available():
        raise UsageError("--fp16 needs a CUDA GPU (loss scaling); use --bf16 or float32 on CPU")
    out = Path(args.output_dir)
    resume = None
    if args.resume == "latest":
        resume = get_last_checkpoint(str(out)) if out.is_dir() else None
        if resume is None:
            raise UsageError(f"--resume: no checkpoint-N folder in {out}")
    elif args.resume:
        resume = args.resume
        if not Path(resume).is_dir():
            raise UsageError(f"--resume {resume}: no such checkpoint folder")

    config = load_config(args.model)
    family = family_of(config)
    tokenizer, image_processor = load_processing(args.model, config)
    english = {"auto": None, "yes": True, "no": False}[args.english]
    encoder = SampleEncoder(tokenizer, config, english=english, max_target_length=args.max_target_length,
                            template=args.template)
    train = [encoder(s) for s in load_samples(args.data_format, args.data, args.labels_dir)]
    if args.eval_data:
        if args.eval_split:
            raise UsageError("give --eval-data or --eval-split, not both")
        evaluation = [encoder(s) for s in load_samples(args.data_format, args.eval_data, args.labels_dir)]
    else:
        train, evaluation = _split(train, args.eval_split, args.seed)
    _check_lengths(train + evaluation, config)

    lora = None
    if args.method != "full":
        lora = lora_defaults(config)
        if args.lora_targets:
            lora.targets, lora.note = parse_targets(args.lora_targets), "--lora-targets"
        lora.r = args.lora_r or lora.r
        lora.alpha = args.lora_alpha if args.lora_alpha is not None else lora.alpha
        lora.dropout = args.lora_dropout if args.lora_dropout is not None else lora.dropout
    parts = trained_parts(args.method, family, {"vision": args.train_vision, "qformer": args.train_qformer,
                                                 "adapter": args.train_adapter, "lm": args.train_lm})
    if args.method == "full" and not parts:
        raise UsageError("--method full with every part frozen trains nothing")
    load_dtype = torch.float32
    if args.bf16:
        load_dtype = torch.bfloat16
    elif args.fp16 and args.method != "full":
        load_dtype = torch.float16
    device_map = {"": int(os.environ.get("LOCAL_RANK", "0"))} if args.method == "qlora" else None
    set_seed(args.seed)  # LoRA's initial A matrices: the same on every process and in every run with this seed
    model, summary = build_model(args.model, config, method=args.method, dtype=load_dtype, parts=parts, lora=lora,
                                 gradient_checkpointing=args.gradient_checkpointing, device_map=device_map)
    kind = getattr(config, "version", None) or getattr(config, "variant", None) or family
    _log(f"{kind} from {args.model}; "
         f"{len(train)} training / {len(evaluation)} evaluation samples "
         f"({sum(e.num_supervised for e in train):,} supervised tokens) from {args.data} ({args.data_format})")
    for line in summary:
        _log(line)

    cuda = torch.cuda.is_available()
    has_eval = bool(evaluation)
    training_args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        data_seed=args.seed,
        bf16=args.bf16,
        fp16=args.fp16,
        **_checkpointing_args(args.gradient_checkpointing),
        eval_strategy=("steps" if args.eval_steps else "epoch") if has_eval else "no",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        report_to=args.report_to,
        disable_tqdm=args.no_progress,
        dataloader_num_workers=args.num_workers,
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=True,
        average_tokens_across_devices=True,
        use_cpu=not cuda,
        # DDP (torchrun / accelerate launch): gloo on CPU; every trainable parameter gets a gradient
        **({"ddp_backend": None if cuda else "gloo", "ddp_find_unused_parameters": False}
           if int(os.environ.get("WORLD_SIZE", "1")) > 1 else {}),
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.text_config.pad_token_id
    trainer = FinetuneTrainer(
        model=model, args=training_args, data_collator=Collator(pad),
        train_dataset=FinetuneDataset(train, image_processor),
        eval_dataset=FinetuneDataset(evaluation, image_processor) if has_eval else None,
    )
    result = trainer.train(resume_from_checkpoint=resume)
    _log(f"trained {result.global_step} steps, final training loss {result.training_loss:.4f}")
    if has_eval:
        metrics = trainer.evaluate()
        _log(f"eval_loss {metrics['eval_loss']:.4f} on {len(evaluation)} samples")
    if args.method == "full":
        if trainer.is_world_process_zero():
            from modeling_visualglm.hub_export.writer import staged_output

            with staged_output(out / "hub", force=True, marker={"format": "visualglm-finetune full"}) as tmp:
                write_model_folder(trainer.model, trainer.model.config, tmp, args.model,
                                   dtype=merge_dtype(config), progress=not args.no_progress,
                                   source_note=f"Fully fine-tuned with `{PROG}` from {Path(args.model).name}.")
            _log(f"wrote the fine-tuned hub folder {out / 'hub'}")
    else:
        trainer.save_model(str(out))
        if trainer.is_world_process_zero():
            _log(f"wrote the adapter to {out} (PeftModel.from_pretrained(model, {str(out)!r}); "
                 f"merge: {PROG} merge --base {args.model} --adapter {out} --out DIR)")
    return 0


def _checkpointing_args(enabled: bool) -> dict:
    """TrainingArguments' activation checkpointing flags: ``activation_checkpointing`` since transformers 5.24,
    ``gradient_checkpointing`` before (a deprecated alias from 5.24 on)."""
    import dataclasses

    from transformers import TrainingArguments, set_seed

    if not enabled:
        return {}
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    # non-reentrant: works with frozen inputs (LoRA) and under DDP
    return {f"{prefix}_checkpointing": True, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


def merge_dtype(config):
    from .merge import _stored_dtype

    return _stored_dtype(config)


def run_merge(args) -> int:
    from .merge import merge

    if Path(args.out).resolve() in (Path(args.base).resolve(), Path(args.adapter).resolve()):
        raise UsageError("--out must differ from --base and --adapter")
    result = merge(args.base, args.adapter, args.out, dtype=args.dtype, force=args.force,
                   progress=not args.no_progress)
    print(f"wrote {args.out}: {len(result.weight_files)} weight file(s), {result.total_parameters:,} parameters; "
          f"check it with: visualglm-export check --folder {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .data import DataError

    argv = list(sys.argv[1:] if argv is None else argv)
    command = "train"
    if argv and argv[0] in ("train", "merge"):
        command = argv.pop(0)
    parser = merge_parser() if command == "merge" else train_parser()
    args = parser.parse_args(argv)
    try:
        return run_merge(args) if command == "merge" else run_train(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (DataError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
