"""The applier: source tensors + a rule table → a checked conversion plan.

``build_plan`` matches every source name against the table and verifies, before any data is read, that

- every source tensor matches exactly one rule (no silent leftovers, no ambiguous tables);
- multi-source rules find all their members;
- the produced names are exactly the state-dict keys of the target model, built on the ``meta`` device
  (minus the weights it ties), and no name is produced twice;
- every produced shape equals the model's (ops run on ``meta`` tensors to get their output shapes);
- every source tensor feeding a floating-point parameter is float16, bfloat16, float32 or float64 (integer,
  bool, complex and float8 tensors are listed, never written as they are);

and raises one ``ConversionError`` listing every problem. Tied weights (``lm_head`` = word embeddings) are
decided from the data: a source that stores both bit-equal is written once and stays tied; different
tensors are both kept and the config is untied.

The resulting ``Plan`` produces the output tensors task by task (``Plan.weight_entries``), which the hub
writer groups into safetensors shards. While they stream, each tensor is checked (``DataChecks``, one
``aminmax`` pass per tensor, no copy): NaN/inf in a source tensor, and inf/NaN that a cast (``--dtype``) or an
op creates (an overflow: a 1e6 weight cast to float16). ``Plan.finish_data_checks`` then raises one error
listing every such tensor with its range — source NaN/inf only without ``allow_nonfinite``, which turns them
into warnings.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import ConversionError
from .ops import run_op
from .rules import Rule
from .sources import TensorInfo, TensorSource

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# the floating dtypes a source weight may have; float8 is quantized data that needs scales this converter does
# not apply, so it is refused like integers, bool and complex
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LIST = 8  # names shown per message line


def _names(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_LIST])
    return shown + (f" and {len(keys) - _LIST} more" if len(keys) > _LIST else "")


def _dtype(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def nonfinite_counts(t: torch.Tensor) -> tuple[int, int] | None:
    """(NaN count, inf count) of a floating tensor, or None when every value is finite.

    The common case costs one ``aminmax`` pass (NaN and inf both show in the min or max) and no copy;
    the counts are computed only when something is there.
    """
    if t.numel() == 0:
        return None
    lo, hi = torch.aminmax(t)
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return None
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


def finite_range(tensors) -> str:
    """"[min, max]" over the finite values of ``tensors`` (for messages; only computed on the failure path)."""
    lo = hi = None
    for t in tensors:
        if not t.is_floating_point() or t.numel() == 0:
            continue
        finite = t[torch.isfinite(t)]
        if finite.numel():
            a, b = (float(x) for x in torch.aminmax(finite.double()))
            lo, hi = (a, b) if lo is None else (min(lo, a), max(hi, b))
    return "no finite values" if lo is None else f"values in [{lo:.6g}, {hi:.6g}]"


@dataclass
class DataChecks:
    """Problems found in the tensors' data while they stream (filled by ``compute_task``)."""

    nonfinite_sources: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # key → (dtype, nan, inf)
    overflows: list[str] = field(default_factory=list)

    def record_sources(self, keys, tensors) -> int:
        total = 0
        for k, t in zip(keys, tensors):
            if not t.is_floating_point():
                continue
            counts = nonfinite_counts(t)
            if counts:
                self.nonfinite_sources[k] = (_dtype(t.dtype), *counts)
                total += sum(counts)
        return total

    def record_output(self, name, task, out: torch.Tensor, sources, source_bad: int, cast: bool):
        counts = nonfinite_counts(out)
        if not counts or sum(counts) <= source_bad:
            return
        src_dtypes = sorted({_dtype(t.dtype) for t in sources})
        how = (f"casting to {_dtype(out.dtype)}" if cast and task.rule.op is None
               else f"{task.rule.op}" + (f" + casting to {_dtype(out.dtype)}" if cast else f" in {_dtype(out.dtype)}"))
        self.overflows.append(
            f"overflow: {name!r}: {how} turns {sum(counts) - source_bad} finite value(s) into inf/NaN "
            f"({_dtype(out.dtype)} holds at most ±{torch.finfo(out.dtype).max:.6g}); its source "
            f"{_names(list(task.sources))} ({'/'.join(src_dtypes)}) has {finite_range(sources)}"
            + (f" (and {source_bad} NaN/inf)" if source_bad else "")
            + ": keep the source dtype (--dtype keep) or use a wider one (float32, bfloat16)")

    def problems(self, allow_nonfinite: bool) -> list[str]:
        problems = list(self.overflows)
        if self.nonfinite_sources and not allow_nonfinite:
            problems.append(self.nonfinite_message()
                            + "; pass --allow-nonfinite to convert them as they are")
        return problems

    def nonfinite_message(self) -> str:
        items = [f"{k!r} ({dt}: {nan} NaN, {inf} inf)" for k, (dt, nan, inf) in self.nonfinite_sources.items()]
        shown = ", ".join(items[:_LIST]) + (f" and {len(items) - _LIST} more" if len(items) > _LIST else "")
        return f"{len(items)} source tensor(s) hold NaN/inf values (a diverged or damaged checkpoint?): {shown}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


@dataclass
class Task:
    """One application of a rule: source tensors → target tensors."""

    rule: Rule
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    infos: tuple[TensorInfo, ...] = ()  # of the targets, after the dtype cast


@dataclass
class Plan:
    format_name: str
    source: TensorSource
    config: object
    model_class: type
    dtype: torch.dtype | None  # None = keep each tensor's source dtype
    tasks: list[Task]
    drops: list[tuple[str, str]]  # (source key, reason)
    tied: dict[str, str]  # target not written → the target it is tied to
    tie_note: str = ""
    rule_counts: dict = field(default_factory=dict)
    unused_rules: list[Rule] = field(default_factory=list)
    allow_nonfinite: bool = False
    checks: DataChecks = field(default_factory=DataChecks)

    # --- data -----------------------------------------------------------------------------------
    def compute(self, task: Task) -> dict[str, torch.Tensor]:
        return compute_task(self.source, task, self.checks)

    def finish_data_checks(self) -> list[str]:
        """After every tensor was produced: raise one ``ConversionError`` listing the overflows (and the source
        NaN/inf unless allowed); returns the warnings to print (allowed NaN/inf)."""
        problems = self.checks.problems(self.allow_nonfinite)
        if problems:
            raise ConversionError(problems,
                                  header=f"the weights of {self.source.description} do not convert as they are")
        if self.checks.nonfinite_sources:
            return [self.checks.nonfinite_message() + "; converted as they are (--allow-nonfinite)"]
        return []

    def weight_entries(self) -> list[tuple[tuple[str, ...], int, Callable[[], dict]]]:
        """(target names, bytes, producer) per task, in the model's state-dict order."""
        entries = []
        for task in self.tasks:
            names = tuple(n for n in task.targets if n not in self.tied)
            if not names:
                continue
            nbytes = sum(i.nbytes for n, i in zip(task.targets, task.infos) if n not in self.tied)
            entries.append((names, nbytes, lambda task=task, names=names: {
                k: v for k, v in self.compute(task).items() if k in names}))
        return entries

    @property
    def target_infos(self) -> dict[str, TensorInfo]:
        return {n: i for t in self.tasks for n, i in zip(t.targets, t.infos) if n not in self.tied}

    def main_dtype(self) -> torch.dtype:
        """The floating dtype holding most bytes (recorded as the config's ``dtype``)."""
        by_dtype: dict = defaultdict(int)
        for info in self.target_infos.values():
            if info.dtype.is_floating_point:
                by_dtype[info.dtype] += info.nbytes
        return max(by_dtype, key=by_dtype.get) if by_dtype else torch.float32

    # --- report ---------------------------------------------------------------------------------
    def coverage_report(self) -> str:
        infos = self.target_infos
        n_params = sum(_numel(i.shape) for i in infos.values())
        lines = [
            f"Coverage report: {self.format_name} → {self.model_class.__name__}",
            f"  source: {self.source.description}",
            f"          {len(self.source)} tensors, {human_bytes(self.source.nbytes)}",
            "  rules (matched source tensors):",
        ]
        for rule, count in self.rule_counts.items():
            lines.append(f"    {count:6d}  {rule.describe()}")
        if self.unused_rules:
            lines.append("  rules that matched nothing (optional tensors absent from this checkpoint):")
            lines += [f"            {r.describe()}" for r in self.unused_rules]
        if self.tie_note:
            lines.append(f"  tied weights: {self.tie_note}")
        dtypes = sorted({str(i.dtype).replace("torch.", "") for i in infos.values()})
        lines.append(
            f"  result: {len(infos)} tensors, {n_params:,} parameters, {human_bytes(sum(i.nbytes for i in infos.values()))}"
            f" ({', '.join(dtypes)}); every model key produced once, every source tensor used or dropped"
        )
        return "\n".join(lines)


def compute_task(source: TensorSource, task: Task, checks: DataChecks | None = None) -> dict[str, torch.Tensor]:
    """Read the task's source tensors (memory-mapped), apply its op and dtype cast; with ``checks``, record
    NaN/inf in the sources and values a cast or op turned non-finite (one ``aminmax`` per tensor)."""
    tensors = tuple(source.get(k) for k in task.sources)
    source_bad = checks.record_sources(task.sources, tensors) if checks is not None else 0
    try:
        outs = run_op(task.rule.op, tensors, task.rule.kwargs)
    except ValueError as e:  # a check only the data can fail (e.g. replicated copies that differ)
        raise ConversionError(f"{task.rule.op} refused {list(task.sources)}: {e}") from None
    result = {}
    for name, t, info in zip(task.targets, outs, task.infos):
        cast = t.dtype != info.dtype
        if cast:
            t = t.to(info.dtype)
        # a rename without a cast hands the source tensor through: it was checked above
        if checks is not None and t.is_floating_point() and (cast or task.rule.op is not None):
            checks.record_output(name, task, t, tensors, source_bad, cast)
        t = t.contiguous()
        # a view into a larger storage (op outputs, tensors saved as views) would make safetensors refuse the
        # shard or store the whole storage: give it its own
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        result[name] = t
    return result


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _meta_model(model_class, config):
    with torch.device("meta"):
        model = model_class(config)
    expected = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    return expected, tied


def set_tie_word_embeddings(config, value: bool):
    """Set ``tie_word_embeddings`` on the config and every sub-config that has the field."""
    config.tie_word_embeddings = value
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "tie_word_embeddings"):
            sub.tie_word_embeddings = value


# (rule, its slot values as sorted items) → {index of the source template: source key}
Groups = dict


def _match(source: TensorSource, rules: list[Rule], format_name: str, problems: list[str]):
    """Every source key against the table: (groups of keys per rule application, matches per rule, drops)."""
    groups: Groups = defaultdict(dict)
    rule_counts: dict[Rule, int] = {r: 0 for r in rules}
    drops: list[tuple[str, str]] = []
    for key in source.keys():
        hits = [(r, m) for r in rules if (m := r.match(key)) is not None]
        if not hits:
            problems.append(f"unexpected source tensor {key!r} {list(source.info(key).shape)}: no rule of "
                            f"{format_name} matches it")
            continue
        if len(hits) > 1:
            problems.append(f"source tensor {key!r} matches {len(hits)} rules (ambiguous table): "
                            + "; ".join(r.describe() for r, _ in hits))
            continue
        rule, (member, slots) = hits[0]
        rule_counts[rule] += 1
        if rule.is_drop:
            drops.append((key, rule.reason))
        else:
            groups[(rule, tuple(sorted(slots.items())))][member] = key
    return groups, rule_counts, drops


def _plan_tasks(source: TensorSource, groups: Groups, dtype, problems: list[str]):
    """Run every rule application's op on ``meta`` tensors: (tasks, produced name → (task, info), the targets of
    applications already reported, which are not reported again as missing)."""
    tasks: list[Task] = []
    produced: dict[str, tuple[Task, TensorInfo]] = {}
    failed: set[str] = set()
    for (rule, slots), members in groups.items():
        names = rule.source_names(dict(slots))
        targets = rule.target_names(dict(slots))
        failed.update(targets)
        if len(members) != len(rule.sources):
            missing = [names[i] for i in range(len(names)) if i not in members]
            problems.append(f"rule '{rule.describe()}' needs {missing} together with {sorted(members.values())}")
            continue
        keys = tuple(members[i] for i in range(len(rule.sources)))
        metas = tuple(torch.empty(source.info(k).shape, dtype=source.info(k).dtype, device="meta") for k in keys)
        try:
            outs = run_op(rule.op, metas, rule.kwargs)
        except Exception as e:  # an op refusing a shape is an input problem
            problems.append(f"{rule.op} cannot convert {list(keys)} {[list(m.shape) for m in metas]}: {e}")
            continue
        if len(outs) != len(targets):
            problems.append(f"op {rule.op} returned {len(outs)} tensors for {len(targets)} targets {targets}")
            continue
        infos = tuple(
            TensorInfo(tuple(o.shape), dtype if dtype is not None and o.dtype.is_floating_point else o.dtype)
            for o in outs
        )
        task = Task(rule, keys, targets, infos)
        tasks.append(task)
        for name, info in zip(targets, infos):
            if name in produced:
                problems.append(f"{name!r} is produced twice: from {list(produced[name][0].sources)} and {list(keys)}")
            else:
                produced[name] = (task, info)
    return tasks, produced, failed


def _decide_ties(source: TensorSource, config, model_class, produced: dict, meta: tuple, compare: bool):
    """Tied weights, decided from the data: (target → the one it stays tied to, notes, the model's expected state
    dict, re-read when a tie was given up). ``meta``: the model's (expected state dict, tied weights); ``compare``:
    the data may be read (no problem found so far)."""
    expected, tied = meta
    tied_out: dict[str, str] = {}
    notes = []
    for target, tied_to in tied.items():
        if target not in produced:
            notes.append(f"{target} = {tied_to} (the source has no separate {target})")
            tied_out[target] = tied_to
            continue
        same = False
        if tied_to in produced and compare:
            (ta, ia), (tb, ib) = produced[target], produced[tied_to]
            if ia.shape == ib.shape and ia.dtype == ib.dtype:
                same = torch.equal(compute_task(source, ta)[target], compute_task(source, tb)[tied_to])
        if same:
            tied_out[target] = tied_to
            notes.append(f"{target} = {tied_to} (bit-equal in the source: written once, tied)")
        else:
            set_tie_word_embeddings(config, False)
            expected, tied = _meta_model(model_class, config)
            notes.append(f"{target} kept separate (differs from {tied_to}): tie_word_embeddings=False")
            break
    return tied_out, notes, expected


def build_plan(
    source: TensorSource,
    rules: list[Rule],
    config,
    model_class: type,
    *,
    format_name: str,
    dtype: torch.dtype | None = None,
    allow_nonfinite: bool = False,
) -> Plan:
    """Match, check and plan a conversion; raises ``ConversionError`` listing every problem."""
    problems: list[str] = []
    groups, rule_counts, drops = _match(source, rules, format_name, problems)  # every key: exactly one rule
    tasks, produced, failed = _plan_tasks(source, groups, dtype, problems)  # names and shapes, on meta tensors
    # floating parameters come from floating sources: checked before the tie decision reads any data
    meta = _meta_model(model_class, config)
    problems += _dtype_problems(source, tasks, meta[0], model_class.__name__)
    tied_out, tie_notes, expected = _decide_ties(source, config, model_class, produced, meta, compare=not problems)
    problems += _coverage_problems(source, rules, produced, tied_out, failed, expected, model_class.__name__)
    if problems:
        raise ConversionError(problems, header=f"{source.description} does not convert as {format_name}")

    order = {k: i for i, k in enumerate(expected)}
    tasks.sort(key=lambda t: min(order.get(n, len(order)) for n in t.targets))
    return Plan(
        format_name=format_name,
        source=source,
        config=config,
        model_class=model_class,
        dtype=dtype,
        tasks=tasks,
        drops=drops,
        tied=tied_out,
        tie_note="; ".join(tie_notes),
        rule_counts={r: c for r, c in rule_counts.items() if c},
        unused_rules=[r for r, c in rule_counts.items() if not c],
        allow_nonfinite=allow_nonfinite,
    )


def _coverage_problems(source, rules, produced: dict, tied_out: dict, failed: set, expected: dict,
                       model_name: str) -> list[str]:
    """The produced names and shapes against the model's state dict: nothing foreign, nothing missing."""
    problems = []
    for name, (task, info) in produced.items():
        if name in tied_out:
            continue
        if name not in expected:
            problems.append(f"{list(task.sources)} → {name!r}: {model_name} has no such parameter")
        elif expected[name].shape != info.shape:
            problems.append(
                f"wrong shape: {name!r} would be {list(info.shape)} (from {list(task.sources)} "
                f"{[list(source.info(k).shape) for k in task.sources]}) but the model expects {list(expected[name].shape)}"
            )
    for name, info in expected.items():
        if name in produced or name in tied_out or name in failed:
            continue
        hint = next((h for r in rules if not r.is_drop and (h := r.invert(name))), None)
        need = f"source tensor {list(hint) if len(hint) > 1 else hint[0]!r}" if hint else "a source tensor"
        problems.append(f"missing: {name!r} {list(info.shape)} needs {need}, which the checkpoint lacks")
    return problems


def _dtype_problems(source: TensorSource, tasks: list[Task], expected: dict, model_name: str) -> list[str]:
    """Source tensors whose dtype the target parameters cannot take, one line per dtype."""
    wrong: dict[torch.dtype, list[str]] = defaultdict(list)
    mismatched = []
    for task in tasks:
        want = [expected[n].dtype for n in task.targets if n in expected]
        if not want:
            continue
        for key in task.sources:
            have = source.info(key).dtype
            if any(w.is_floating_point for w in want):
                if have not in FLOAT_DTYPES:
                    wrong[have].append(key)
            elif have not in want:
                mismatched.append(f"{key!r} is {_dtype(have)} but {model_name} stores {task.targets} as "
                                  f"{'/'.join(sorted({_dtype(w) for w in want}))}")
    problems = []
    for dt, keys in wrong.items():
        if dt.is_floating_point:  # float8 (and any other exotic float)
            why = ("quantized float8 data: its scales are not applied by this converter; convert the unquantized "
                   "release")
        else:
            why = (f"{model_name} expects floating-point weights (integer, bool and complex tensors are not converted: "
                   "a quantized or foreign checkpoint?)")
        problems.append(f"{len(keys)} source tensor(s) are {_dtype(dt)}: {why}: {_names(keys)}")
    return problems + mismatched



# --- the reverse direction ------------------------------------------------------------------------------------

def to_original(state_dict: dict[str, torch.Tensor], fmt: str, config, **options) -> dict[str, torch.Tensor]:
    """Our state dict → the tensors of a ``fmt`` checkpoint (``fmt``: a ``--format`` name; ``options``: the format's
    flags that change its rules, e.g. ``qkv_layout="blocked"``): the format's rule table run backwards, each target
    traced to its sources by ``Rule.invert_slots`` and each op undone by its inverse (``conversion.ops.INVERSES``).

    Dropped source tensors (rotary buffers, unused tables) are not produced: add them where a file needs them. Every
    tensor is a contiguous copy. Raises ``ConversionError`` listing every tensor that no rule (or more than one)
    produces and every op without an inverse. For writing original-layout checkpoints (tests, the demo); a parity
    test cannot take it as its reference alone: a wrong rule would convert back to the right model.
    """
    from .formats import FORMATS
    from .ops import INVERSES

    rules = FORMATS[fmt].rule_table(config, **options)
    problems: list[str] = []
    groups: dict = defaultdict(dict)
    for name, tensor in state_dict.items():
        hits = [(r, slots) for r in rules if not r.is_drop and (slots := r.invert_slots(name)) is not None]
        if len(hits) != 1:
            problems.append(f"{name!r}: no rule of {fmt} produces it" if not hits else
                            f"{name!r} is produced by {len(hits)} rules: " + "; ".join(r.describe() for r, _ in hits))
            continue
        rule, slots = hits[0]
        groups[(rule, tuple(sorted(slots.items())))][name] = tensor
    original = {}
    for (rule, slots), got in groups.items():
        targets = rule.target_names(dict(slots))
        if len(got) != len(targets):
            problems.append(f"rule '{rule.describe()}' needs {[t for t in targets if t not in got]} as well")
        elif rule.op is not None and rule.op not in INVERSES:
            problems.append(f"{[*got]}: op {rule.op} of {fmt} has no inverse")
        else:
            outs = run_op(INVERSES.get(rule.op), tuple(got[t].detach() for t in targets), rule.kwargs)
            for name, t in zip(rule.source_names(dict(slots)), outs):
                original[name] = t.clone(memory_format=torch.contiguous_format)
    if problems:
        raise ConversionError(problems, header=f"cannot write this state dict as {fmt}")
    return original
