"""Fine-tuned SAT checkpoints: unmerged LoRA (merged, or written as a peft adapter) and P-tuning v2 prefixes (refused).

SwissArmyTransformer 0.4.12 ``sat/model/finetune/lora2.py`` replaces a linear layer ``M`` by a ``LoraLinear`` that
saves ``M.original.weight`` (+ ``M.original.bias``), ``M.matrix_A.{k}`` [r, in] and ``M.matrix_B.{k}`` [rows_k, r] for
k < partition (3 on a fused qkv, [heads, kv, kv] slices with grouped-query heads, 1 on ``dense``), and computes
``W x + cat_k(B_k A_k x) · alpha / r``. VisualGLM's ``finetune_visualglm.py`` puts it on ChatGLM's ``attention``
(qkv + dense of the ``--layer_range`` layers); CogVLM's ``finetune_cogvlm_demo.py`` on the language-expert attention and
on the ViT's attention (spec visualglm.md §5, cogvlm.md §5).

The LoRA rules are derived from the format's own table at load time: the rule that converts ``M.weight`` tells where
``M`` goes and which op its rows need (VisualGLM's blocked → interleaved qkv), so LoRA converts wherever the plain
weight does. Two ways out:

- merged (default): ``M.original.weight`` + the pairs → ``sat_lora_merge`` (SAT's ``merge_linear_lora`` arithmetic);
- ``--lora-as-adapter``: ``M.original.*`` → the base folder, the pairs → a peft LoRA adapter folder: ``lora_A`` = the
  A_k stacked [p·r, in], ``lora_B`` = the B_k block-diagonal [rows, p·r], rank p·r with lora_alpha p·alpha, so peft's
  scaling alpha/r is SAT's. Its names and shapes are checked against peft's own LoRA model built on the ``meta``
  device (:class:`PeftLoraAdapter`), like the base folder's against our model.

P-tuning v2 (sat ``prompt_tuning.py``: per-layer key/value prefixes ``mixins.ptuning.prefix.{i}``) has no exact export:
it cannot be merged into weights, and peft's prefix tuning hands the prefixes to the model as a non-empty KV cache,
which our models read as "the prompt is a decode step" (ChatGLM then refuses to derive positions, and ``generate``
would skip the first prompt tokens and the image). The converter says so and what to do instead.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConversionError
from .rules import Rule, convert, rename, specialize
from .sources import SubsetSource, TensorSource
from .validate import raise_if

# VisualGLM's finetune_visualglm.py and CogVLM's finetune_cogvlm_demo.py build LoraMixin(num_layers, lora_rank,
# layer_range=...) and never pass lora_alpha: it stays at lora2's default 1 (scale 1/r); checkpoints do not store it
LORA_ALPHA = 1.0
_LORA_KEY = re.compile(r"(?P<module>.+)\.matrix_(?P<ab>[AB])\.(?P<k>\d+)")
_PTUNING_KEY = re.compile(r"mixins\.ptuning\.prefix\.\d+")
_KEEP_SLOTS = ("i", "j", "k", "wb")  # slots a derived LoRA rule keeps; the others are fixed to the module's values
PEFT_PREFIX = "base_model.model."  # how peft's saved adapters name our modules


def find_sat_lora(source: TensorSource) -> dict[str, int]:
    """SAT module name → its LoRA partition count (how many matrix_A / matrix_B tensors it has, at most)."""
    parts: dict[str, int] = defaultdict(int)
    for key in source.keys():
        m = _LORA_KEY.fullmatch(key)
        if m:
            parts[m["module"]] = max(parts[m["module"]], int(m["k"]) + 1)
    return dict(parts)


def refuse_ptuning(source: TensorSource, where) -> None:
    prefixes = [k for k in source.keys() if _PTUNING_KEY.fullmatch(k)]
    if not prefixes:
        return
    shape = list(source.info(prefixes[0]).shape)
    raise ConversionError(
        f"{where} holds P-tuning v2 prefixes ({len(prefixes)} layers of mixins.ptuning.prefix.N, {shape} = [key/value, "
        "heads, pre_seq_len, head dim]), which cannot be converted exactly: they are not weights that merge, and "
        "peft's prefix tuning passes them as a non-empty KV cache, which the converted model reads as a decode step "
        "(its prompt positions, prefix-LM mask and image would be wrong). What to do: convert the checkpoint this "
        "fine-tune started from (e.g. the released visualglm-6b) and fine-tune it again with LoRA "
        "(visualglm-finetune --method lora, on the same fewshot-data JSON), or re-run the original fine-tune with "
        "--use_lora instead of --use_ptuning and convert that checkpoint")


# --- rules ---------------------------------------------------------------------------------------------------

def _module_of(template: str) -> tuple[str, bool] | None:
    """(the module part, whether the template has a ``{wb}`` slot) of a ``….{wb}`` / ``….weight`` template."""
    for suffix, has_bias in ((".{wb}", True), (".weight", False)):
        if template.endswith(suffix):
            return template[: -len(suffix)], has_bias
    return None


@dataclass(frozen=True)
class _Family:
    """LoRA'd modules that one base rule converts, as templates (SAT module → our module) + the base rule's op."""

    src: str
    dst: str
    has_bias: bool
    op: str | None
    op_kwargs: tuple


def _families(base_rules: list[Rule], modules: dict[str, int], problems: list[str]):
    """{family: partition count} and {our module name: SAT module name}, from the rules converting ``M.weight``."""
    families: dict[_Family, int] = {}
    targets: dict[str, str] = {}
    for module, parts in sorted(modules.items()):
        hits = [(r, m[1]) for r in base_rules if not r.is_drop and (m := r.match(module + ".weight"))]
        if len(hits) != 1 or len(hits[0][0].sources) != 1 or len(hits[0][0].targets) != 1:
            problems.append(f"LoRA on {module!r}, whose weight no single rule of this format converts: unsupported")
            continue
        rule, slots = hits[0]
        src, dst = (_module_of(specialize(t, slots, _KEEP_SLOTS)) for t in (rule.sources[0], rule.targets[0]))
        if src is None or dst is None or src[1] != dst[1]:
            problems.append(f"LoRA on {module!r}: its rule '{rule.describe()}' is not a weight rule; unsupported")
            continue
        family = _Family(src[0], dst[0], src[1], rule.op, rule.op_kwargs)
        families[family] = max(families.get(family, 0), parts)
        targets[rule.target_names(slots)[0][: -len(".weight")]] = module
    return families, targets


def _pair_templates(family: _Family, parts: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (tuple(f"{family.src}.matrix_A.{k}" for k in range(parts)),
            tuple(f"{family.src}.matrix_B.{k}" for k in range(parts)))


def _base_op_rule(source: str, target: str, family: _Family) -> Rule:
    if family.op is None:
        return rename(source, target)
    return convert(source, target, family.op, **dict(family.op_kwargs))


def _then(family: _Family) -> dict:
    return {"then": family.op, **dict(family.op_kwargs)} if family.op else {}


def merge_rules(family: _Family, parts: int) -> list[Rule]:
    """``M.original.weight`` + the pairs → our weight, merged; ``M.original.bias`` → our bias (the base rule's op)."""
    a, b = _pair_templates(family, parts)
    rules = [convert((f"{family.src}.original.weight", *a, *b), f"{family.dst}.weight", "sat_lora_merge",
                     alpha=LORA_ALPHA, **_then(family))]
    if family.has_bias:
        rules.append(_base_op_rule(f"{family.src}.original.bias", f"{family.dst}.bias", family))
    return rules


def adapter_rules(family: _Family, parts: int) -> tuple[list[Rule], list[Rule]]:
    """(base rules: ``M.original.*`` → our weights, adapter rules: the pairs → peft's lora_A / lora_B)."""
    wb = "{wb}" if family.has_bias else "weight"
    base = [_base_op_rule(f"{family.src}.original.{wb}", f"{family.dst}.{wb}", family)]
    a, b = _pair_templates(family, parts)
    peft = PEFT_PREFIX + family.dst
    return base, [convert(a, f"{peft}.lora_A.weight", "sat_lora_stack_a"),
                  convert(b, f"{peft}.lora_B.weight", "sat_lora_blockdiag_b", **_then(family))]


# --- the peft adapter ----------------------------------------------------------------------------------------

@dataclass
class AdapterTarget:
    """What the adapter applies to: our model (class + config) and peft's ``LoraConfig``."""

    model_class: type
    model_config: object
    lora_config: object


class PeftLoraAdapter:
    """The tensors peft saves for ``target.lora_config`` on our model (names and shapes from peft itself; built
    on the ``meta`` device by ``conversion.apply``, which checks the adapter rules' output against them)."""

    def __init__(self, target: AdapterTarget):
        from peft import get_peft_model, get_peft_model_state_dict

        model = target.model_class(copy.deepcopy(target.model_config))
        with warnings.catch_warnings():
            # peft (0.21 included) reads `is_gradient_checkpointing`, which transformers 5.24 deprecates (not our call)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            config = copy.deepcopy(target.lora_config)
            config.base_model_name_or_path = None  # the meta model has no path: peft would warn about renaming it
            peft_model = get_peft_model(model, config)
        self._state = dict(get_peft_model_state_dict(peft_model))

    def state_dict(self) -> dict:
        return self._state


def lora_config(ranks: dict[str, tuple[int, float]], base_dir: str):
    """peft ``LoraConfig`` targeting exactly our modules in ``ranks`` (module → (rank, alpha)); the most common
    (rank, alpha) is the default, the others go to ``rank_pattern`` / ``alpha_pattern`` (full module names)."""
    from peft import LoraConfig

    (r, alpha), _ = Counter(ranks.values()).most_common(1)[0]
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=sorted(ranks),
        rank_pattern={m: mr for m, (mr, _) in sorted(ranks.items()) if mr != r},
        alpha_pattern={m: ma for m, (_, ma) in sorted(ranks.items()) if ma != alpha},
        base_model_name_or_path=base_dir,
    )


@dataclass
class AdapterPart:
    """The adapter half of a ``--lora-as-adapter`` conversion: its source view, rules and target."""

    source: TensorSource
    rules: list[Rule]
    target: AdapterTarget
    out: Path
    notes: list[str] = field(default_factory=list)


# --- the format hook -----------------------------------------------------------------------------------------

def _ranks(source: TensorSource, targets: dict[str, str], modules: dict[str, int], rank_in_config) -> tuple[dict, list]:
    """Our module → (peft rank p·r, peft alpha p·alpha), and the problems (a rank other than model_config's)."""
    ranks, problems = {}, []
    for ours, module in targets.items():
        key = f"{module}.matrix_A.0"
        r = source.info(key).shape[0] if key in source and len(source.info(key).shape) == 2 else 1
        if isinstance(rank_in_config, int) and not isinstance(rank_in_config, bool) and r != rank_in_config:
            problems.append(f"{key} has rank {r} but model_config.json says lora_rank {rank_in_config}")
        ranks[ours] = (modules[module] * r, modules[module] * LORA_ALPHA)
    return ranks, problems


def adapter_dir(args) -> Path | None:
    """Where ``--lora-as-adapter [DIR]`` writes the adapter: DIR, or ``OUT-lora`` beside ``--out``; None without it."""
    value = getattr(args, "lora_as_adapter", None)
    if value is None:
        return None
    return Path(value) if value else Path(str(args.out).rstrip("/\\") + "-lora")


def attach_sat_lora(loaded, source: TensorSource, sat, out: Path, adapter_out: Path | None):
    """Add the LoRA of a fine-tuned SAT checkpoint to ``loaded`` (a format's result for ``source``, to be written to
    ``out``): merge rules, or with ``adapter_out`` base rules + ``loaded.adapter``. Refuses P-tuning prefixes and a
    ``--lora-as-adapter`` without LoRA; every LoRA problem is listed in one ``ConversionError``."""
    refuse_ptuning(source, sat.checkpoint)
    modules = find_sat_lora(source)
    if not modules:
        if adapter_out is not None:
            raise ConversionError(f"--lora-as-adapter: {sat.checkpoint} has no LoRA (no matrix_A / matrix_B tensors): "
                                  "there is no adapter to write; convert it without the flag")
        return loaded
    problems: list[str] = []
    families, targets = _families(loaded.rules, modules, problems)
    ranks, rank_problems = _ranks(source, targets, modules, sat.args.get("lora_rank"))
    raise_if(problems + rank_problems, f"cannot convert the LoRA of {sat.checkpoint}")
    shapes = sorted({f"{modules[m]}x{ranks[ours][0] // modules[m]}" for ours, m in targets.items()})
    what = (f"SAT LoRA on {len(modules)} linear layers (partitions x rank: {', '.join(shapes)}; alpha {LORA_ALPHA:g}, "
            "scale alpha/r)")
    if adapter_out is None:
        loaded.rules = loaded.rules + [rule for f, p in families.items() for rule in merge_rules(f, p)]
        loaded.notes.append(what + " merged into the weights as SAT's merge_lora() does")
        return loaded
    base, adapter = [], []
    for f, p in families.items():
        b, a = adapter_rules(f, p)
        base, adapter = base + b, adapter + a
    lora_keys = {k for k in source.keys() if _LORA_KEY.fullmatch(k)}
    loaded.rules = loaded.rules + base
    loaded.source = SubsetSource(source, [k for k in source.keys() if k not in lora_keys], source.description,
                                 owner=True)
    target = AdapterTarget(loaded.model_class, loaded.config, lora_config(ranks, str(Path(out).absolute())))
    view = SubsetSource(source, [k for k in source.keys() if k in lora_keys], f"{source.description} (LoRA pairs)")
    loaded.adapter = AdapterPart(view, adapter, target, Path(adapter_out), [what])
    loaded.notes.append(what + f": the base weights here, the LoRA as a peft adapter in {adapter_out}")
    return loaded


def write_adapter_folder(folder: Path, plan, config) -> None:
    """``adapter_model.safetensors`` + ``adapter_config.json`` (peft's file names). The tensors are produced task by
    task like the base folder's; an adapter is small (two thin matrices per layer), so they are saved in one file,
    which is what ``PeftModel.from_pretrained`` reads."""
    from safetensors.torch import save_file

    tensors = {}
    for _, _, produce in plan.weight_entries():
        tensors.update(produce())
    save_file(tensors, str(Path(folder) / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(folder))
