"""Rule tables: how one source checkpoint's tensor names map onto our state-dict names.

A format is a list of rules. Each rule has a full-match *source template* (or a tuple of them, for ops that
combine several tensors) and either target name(s) plus an optional named op from ``conversion.ops``, or an
explicit drop with the reason. Templates are tensor names with slots:

- ``{i}``, ``{j}``            a decimal index (layer numbers);
- ``{wb}``                    ``weight`` or ``bias``;
- ``{name:alt1|alt2}``        one of the listed literal alternatives, captured as ``name``.

Everything outside the braces is literal (dots are not wildcards). Targets use the same slot names
(``{i}``, ``{wb}``, ``{name}``) and are filled from the source match, e.g.::

    rename("transformer.layers.{i}.{ln:input_layernorm|post_attention_layernorm}.{wb}",
           "language_model.layers.{i}.{ln}.{wb}")
    convert("transformer.layers.{i}.attention.query_key_value.{wb}",
            "language_model.layers.{i}.attention.query_key_value.{wb}",
            "interleave_qkv_heads", num_heads=32)
    drop("transformer.position_embeddings.weight", "ChatGLM uses rotary positions; SAT keeps an unused table")
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

SLOT_PATTERNS = {"i": r"\d+", "j": r"\d+", "k": r"\d+", "wb": r"weight|bias"}
_SLOT = re.compile(r"\{(\w+)(?::([^{}]+))?\}")


def _compile(template: str, known: dict[str, str] | None = None) -> tuple[re.Pattern, tuple[str, ...]]:
    """Regex for a template; ``known`` gives slot bodies defined elsewhere (a target uses its source's)."""
    parts, names, pos = [], [], 0
    for m in _SLOT.finditer(template):
        parts.append(re.escape(template[pos : m.start()]))
        name, alternatives = m.group(1), m.group(2)
        if name in names:  # the same slot twice must carry the same value
            parts.append(f"(?P={name})")
        else:
            if alternatives is not None:
                body = "|".join(re.escape(a) for a in alternatives.split("|"))
            elif known and name in known:
                body = known[name]
            elif name in SLOT_PATTERNS:
                body = SLOT_PATTERNS[name]
            else:
                raise ValueError(f"slot {{{name}}} in {template!r} has no default pattern: write {{{name}:a|b}}")
            parts.append(f"(?P<{name}>{body})")
            names.append(name)
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts)), tuple(names)


def _slot_names(template: str) -> set[str]:
    return {m.group(1) for m in _SLOT.finditer(template)}


def _plain(template: str) -> str:
    """The template with alternatives stripped (``{ln:a|b}`` → ``{ln}``), ready for ``str.format``."""
    return _SLOT.sub(lambda m: "{" + m.group(1) + "}", template)


def specialize(template: str, values: dict[str, str], keep: tuple[str, ...]) -> str:
    """``template`` with every slot not in ``keep`` fixed to its value in ``values`` (``{lin:a|b}`` → ``a``); kept slots
    lose their alternatives (``{i}``). Derives narrower rules from a matched one (conversion.lora)."""
    return _SLOT.sub(lambda m: "{" + m.group(1) + "}" if m.group(1) in keep else values[m.group(1)], template)


@dataclass(frozen=True)
class Rule:
    """One row of a format table. Build rows with :func:`rename`, :func:`convert` and :func:`drop`."""

    sources: tuple[str, ...]
    targets: tuple[str, ...] = ()
    op: str | None = None
    op_kwargs: tuple = ()  # sorted (key, value) pairs: rules are hashable
    reason: str | None = None  # set for drops
    _compiled: tuple = field(default=(), compare=False, repr=False)

    def __post_init__(self):
        compiled = tuple(_compile(s) for s in self.sources)
        object.__setattr__(self, "_compiled", compiled)
        source_slots = [set(names) for _, names in compiled]
        if any(s != source_slots[0] for s in source_slots):
            raise ValueError(f"all source templates of one rule need the same slots: {self.sources}")
        for t in self.targets:
            missing = _slot_names(t) - source_slots[0]
            if missing:
                raise ValueError(f"target {t!r} uses slots {sorted(missing)} that the source {self.sources} lacks")
        if self.is_drop == bool(self.targets):
            raise ValueError(f"a rule either has targets or is a drop with a reason: {self}")

    @property
    def is_drop(self) -> bool:
        return self.reason is not None

    @property
    def kwargs(self) -> dict:
        return dict(self.op_kwargs)

    def match(self, key: str) -> tuple[int, dict[str, str]] | None:
        """(index of the matching source template, slot values) or None."""
        for index, (pattern, _) in enumerate(self._compiled):
            m = pattern.fullmatch(key)
            if m:
                return index, m.groupdict()
        return None

    def source_names(self, slots: dict[str, str]) -> tuple[str, ...]:
        return tuple(_plain(s).format(**slots) for s in self.sources)

    def target_names(self, slots: dict[str, str]) -> tuple[str, ...]:
        return tuple(_plain(t).format(**slots) for t in self.targets)

    def invert_slots(self, target: str) -> dict[str, str] | None:
        """The slot values under which this rule produces ``target``, or None (also for a drop)."""
        bodies = {}
        for m in _SLOT.finditer(self.sources[0]):
            alternatives = m.group(2)
            bodies[m.group(1)] = ("|".join(re.escape(a) for a in alternatives.split("|"))
                                  if alternatives else SLOT_PATTERNS[m.group(1)])
        for t in self.targets:
            pattern, _ = _compile(t, bodies)
            m = pattern.fullmatch(target)
            if m:
                slots = m.groupdict()
                if _slot_names(self.sources[0]) <= set(slots):
                    return slots
        return None

    def invert(self, target: str) -> tuple[str, ...] | None:
        """The source names that would produce ``target`` (for "missing tensor" hints), or None."""
        slots = self.invert_slots(target)
        return None if slots is None else self.source_names(slots)

    def describe(self) -> str:
        src = " + ".join(self.sources)
        if self.is_drop:
            return f"{src}  →  (dropped: {self.reason})"
        op = ""
        if self.op:
            args = ", ".join(f"{k}={v}" for k, v in self.op_kwargs)
            op = f"  [{self.op}({args})]" if args else f"  [{self.op}]"
        return f"{src}  →  {' + '.join(self.targets)}{op}"


def _tuple(x: str | Iterable[str]) -> tuple[str, ...]:
    return (x,) if isinstance(x, str) else tuple(x)


def rename(source: str, target: str) -> Rule:
    """Copy the tensor under a new name."""
    return Rule(sources=(source,), targets=(target,))


def convert(source: str | Iterable[str], target: str | Iterable[str], op: str, **op_kwargs) -> Rule:
    """Apply the named op of ``conversion.ops`` (one or several sources → one or several targets)."""
    return Rule(sources=_tuple(source), targets=_tuple(target), op=op, op_kwargs=tuple(sorted(op_kwargs.items())))


def drop(source: str, reason: str) -> Rule:
    """Consume the tensor without writing it; ``reason`` appears in the coverage report."""
    if not reason:
        raise ValueError("a drop needs a reason")
    return Rule(sources=(source,), reason=reason)
