"""Loading a hub folder for training; LoRA default targets per family; freeze switches; QLoRA.

The default LoRA of each family is its original recipe (spec visualglm.md §5, cogvlm.md §5, minigpt4.md §1.5/§6):

| family | targets | r / alpha / dropout | trained besides LoRA |
|---|---|---|---|
| VisualGLM | ChatGLM ``attention.query_key_value`` + ``attention.dense`` of layers ``range(0, L, L // 2)`` (0 and 14 of 28: SAT ``layer_range``) | 10 / 1 / 0 (SAT lora2: α 1, scale 1/r) | nothing (ViT, Q-Former, glm_proj frozen) |
| CogVLM (v1) | language-expert ``query_key_value`` + ``dense`` of every LM layer, ViT ``attention.query_key_value`` + ``dense`` (SAT ``finetune_cogvlm_lora.sh``) | 10 / 1 / 0 | nothing (the SAT recipe also trains ViT MLPs 46-54: ``--train-vision``) |
| CogVLM2 | ``vision_expert_query_key_value`` (``finetune_demo/peft_lora.py``) | 8 / 32 / 0.1 | nothing |
| MiniGPT-4 | LLaMA attention ``language_expert_query_key_value`` (MiniGPT-v2's LoRA; fused q/k/v here) | 64 / 16 / 0.05 | ``llama_proj`` in full (stage 2 trains only it) |

``--lora-targets`` replaces the targets (module-name suffixes, or one regular expression matched against full
names); ``--train-vision/--train-qformer/--train-adapter/--train-lm`` train those parts in full (LoRA: as peft
``modules_to_save``, saved in the adapter; full fine-tuning: ``requires_grad``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .encode import family_of

# the top-level modules of each family's model, by part
PARTS = {
    "visualglm": {"vision": ["vision_model"], "qformer": ["qformer"], "adapter": ["glm_proj"],
                  "lm": ["language_model", "lm_head"]},
    "cogvlm": {"vision": ["vision_model"], "qformer": [], "adapter": ["adapter"], "lm": ["language_model", "lm_head"]},
    "minigpt4": {"vision": ["vision_model"], "qformer": ["qformer"], "adapter": ["llama_proj"],
                 "lm": ["language_model", "lm_head"]},
}
# parts a method trains by default (None: frozen). Full fine-tuning: language model + adapter.
DEFAULT_PARTS = {"lora": {"visualglm": set(), "cogvlm": set(), "minigpt4": {"adapter"}},
                 "full": {"visualglm": {"lm", "adapter"}, "cogvlm": {"lm", "adapter"}, "minigpt4": {"lm", "adapter"}}}
DEFAULT_PARTS["qlora"] = DEFAULT_PARTS["lora"]


@dataclass
class LoraDefaults:
    targets: str | list[str]
    r: int
    alpha: float
    dropout: float
    note: str = ""
    extra: dict = field(default_factory=dict)


def read_config_json(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} is not a hub folder (no config.json)") from None


def lora_defaults(config) -> LoraDefaults:
    family = family_of(config)
    layers = config.text_config.num_hidden_layers
    if family == "visualglm":
        chosen = sorted(set(range(0, layers, max(layers // 2, 1))))
        return LoraDefaults(
            rf"language_model\.layers\.({'|'.join(map(str, chosen))})\.attention\.(query_key_value|dense)", 10, 1.0,
            0.0, f"ChatGLM qkv + dense of layers {chosen} (SAT layer_range)")
    if family == "cogvlm" and config.version == "cogvlm2":
        return LoraDefaults(["vision_expert_query_key_value"], 8, 32.0, 0.1, "CogVLM2 peft_lora.py")
    if family == "cogvlm":
        return LoraDefaults(r"(language_model\.layers\.\d+\.self_attn\.language_expert_(query_key_value|dense)|"
                            r"vision_model\.layers\.\d+\.attention\.(query_key_value|dense))", 10, 1.0, 0.0,
                            "CogVLM SAT LoRA: language-expert and ViT attention")
    return LoraDefaults(["language_expert_query_key_value"], 64, 16.0, 0.05, "MiniGPT-v2 LoRA on LLaMA attention")


def parse_targets(text: str) -> str | list[str]:
    """``a,b,c`` → suffix list; anything with regex characters → one full-name regular expression."""
    if any(c in text for c in "\\()[]|*+?^$"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def trained_parts(method: str, family: str, switches: dict) -> set[str]:
    """The parts trained in full: the method's default for the family, overridden by ``--train-*`` switches."""
    parts = set(DEFAULT_PARTS[method][family])
    for part, on in switches.items():
        if on is True:
            parts.add(part)
        elif on is False:
            parts.discard(part)
    return parts


def part_modules(family: str, parts: set[str]) -> list[str]:
    return [name for part in sorted(parts) for name in PARTS[family][part]]


def load_processing(folder: str | Path, config):
    """(tokenizer, image processor) of a hub folder, from the runtime package's classes (as ``chat`` would)."""
    from modeling_visualglm.hub_export.families import FAMILIES

    family = FAMILIES[family_of(config)]
    if family.tokenizer is None:  # CogVLM: a stock transformers tokenizer
        from transformers import AutoTokenizer

        # no remote code is needed for it; without the explicit False, transformers sees the folder's auto_map
        # and asks on the terminal whether to run the folder's code
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    else:
        tokenizer = family.tokenizer.load().from_pretrained(str(folder))
    image_processor = family.image_processor.load().from_pretrained(str(folder))
    return tokenizer, image_processor


def model_class(config):
    from modeling_visualglm.hub_export.families import FAMILIES

    return FAMILIES[family_of(config)].model.load()


def load_config(folder: str | Path):
    from modeling_visualglm.hub_export.families import FAMILIES

    kind = read_config_json(folder).get("model_type")
    if kind not in FAMILIES:
        raise ValueError(f"{folder}: not a VisualGLM / CogVLM / MiniGPT-4 hub folder (model_type {kind!r})")
    return FAMILIES[kind].config.load().from_pretrained(str(folder))


def qlora_config(cls):
    """bitsandbytes NF4 for the language model only; the image path (``quantization_skip_modules``: vision tower,
    Q-Former, adapters, lm_head) stays in bf16."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16,
                              llm_int8_skip_modules=list(cls.quantization_skip_modules))


def check_qlora_available() -> str | None:
    """Why QLoRA cannot run here, or None."""
    if not torch.cuda.is_available():
        return ("--method qlora needs a CUDA GPU: bitsandbytes' NF4 layers do not train on CPU. Use --method lora "
                "(the same adapter format, full-precision base) on this machine, or run on a GPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "--method qlora needs bitsandbytes: pip install 'modeling_visualglm[quant]'"
    return None


def build_model(folder, config, *, method: str, dtype, parts: set[str], lora: LoraDefaults | None,
                gradient_checkpointing: bool = False, device_map=None):
    """The model to train: base weights from ``folder``; LoRA/QLoRA wrapped by peft, or full with the chosen parts
    trainable. Returns (model, summary lines)."""
    cls = model_class(config)
    family = family_of(config)
    kwargs = {"dtype": dtype}
    if method == "qlora":
        kwargs.update(quantization_config=qlora_config(cls), dtype=torch.bfloat16,
                      device_map=device_map or {"": torch.cuda.current_device()})
    model = cls.from_pretrained(str(folder), **kwargs)
    # Our loss is computed by the trainer from logits (token-weighted across accumulation steps and processes);
    # forward must not receive Trainer's num_items_in_batch.
    model.accepts_loss_kwargs = False
    model.config.use_cache = False
    summary = []
    if method == "full":
        model.requires_grad_(False)
        for name in part_modules(family, parts):
            getattr(model, name).requires_grad_(True)
        summary.append(f"full fine-tuning of {', '.join(sorted(parts)) or 'nothing'} "
                       f"({', '.join(part_modules(family, parts))})")
        if gradient_checkpointing and not any(p.requires_grad for p in model.get_input_embeddings().parameters()):
            model.enable_input_require_grads()
        return model, summary

    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    modules_to_save = part_modules(family, parts) or None
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.targets,
                             modules_to_save=modules_to_save, bias="none")
    with warnings.catch_warnings():
        # peft <= 0.18 reads `is_gradient_checkpointing`, which transformers 5.24 deprecates (not our call)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, peft_config)
    trainable, total = model.get_nb_trainable_parameters()
    summary.append(f"{method}: r={lora.r} alpha={lora.alpha:g} dropout={lora.dropout:g} targets={lora.targets}"
                   + (f" ({lora.note})" if lora.note else ""))
    if modules_to_save:
        summary.append(f"trained in full and saved in the adapter: {', '.join(modules_to_save)}")
    summary.append(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)")
    return model, summary
