"""What a source format provides to the CLI: its flags, and a loader returning source + rules + config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConversionError, UsageError
from ..rules import Rule
from ..sources import TensorSource

# every source flag any format takes (CONTRACTS §1); a format lists the ones it accepts
SOURCE_FLAGS = {
    "src": "source checkpoint folder",
    "base": "base model folder (fastchat-delta)",
    "delta": "delta weights folder (fastchat-delta)",
    "ckpt": "fine-tuned checkpoint file (minigpt4)",
    "llm": "language model folder (minigpt4)",
    "blip2": "BLIP-2 checkpoint file (minigpt4 vicuna0)",
    "vit": "EVA ViT checkpoint file (minigpt4)",
    "variant": "model variant (minigpt4)",
    "qkv_layout": "ChatGLM fused qkv row order in the source (sat-visualglm)",
    "lora_as_adapter": "write a fine-tuned SAT checkpoint's LoRA as a peft adapter folder DIR (default: OUT-lora "
                       "beside --out) instead of merging it (sat-visualglm, sat-cogvlm)",
}


@dataclass
class Loaded:
    """A source opened and understood: everything ``build_plan`` and the writer need."""

    source: TensorSource
    rules: list[Rule]
    config: object
    model_class: type
    family: object  # hub_export.families.Family
    tokenizer: object | None
    notes: list[str] = field(default_factory=list)  # printed with the coverage report and put in the card
    adapter: object | None = None  # conversion.lora.AdapterPart with --lora-as-adapter


class Format:
    name: str = ""
    help: str = ""
    required_flags: tuple[str, ...] = ()
    optional_flags: dict = {}  # flag → default

    def check_flags(self, args) -> None:
        problems = []
        for flag in SOURCE_FLAGS:
            value = getattr(args, flag, None)
            cli = "--" + flag.replace("_", "-")
            if flag in self.required_flags and value is None:
                problems.append(f"--format {self.name} needs {cli}")
            elif value is not None and flag not in self.required_flags and flag not in self.optional_flags:
                problems.append(f"--format {self.name} does not take {cli}")
        if problems:
            raise UsageError("; ".join(problems))
        for flag, default in self.optional_flags.items():
            if getattr(args, flag, None) is None:
                setattr(args, flag, default)

    def load(self, args) -> Loaded:
        raise NotImplementedError

    def rule_table(self, config, **options) -> list[Rule]:
        """The rules ``load`` uses for a model of ``config`` (``options``: the format's flags that change them, e.g.
        ``qkv_layout``), for ``conversion.apply.to_original``. Formats whose source is several checkpoints (model
        ranks, a base and a delta, MiniGPT-4's files) have none."""
        raise ConversionError(f"--format {self.name} has no reverse conversion (its source is not one checkpoint "
                              "whose rules can be run backwards)")


def existing_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{what} {path} is not a folder")
    return path
