"""Typed reads of source configs that collect problems instead of raising.

Every source format reads its config (SAT ``model_config.json``, THUDM ``config.json``, Meta ``params.json``,
transformers ``config.json``, shard indexes; read by ``conversion.sources``) through :class:`Fields` before building anything, so a mistyped
or hostile file gives one ``ConversionError`` listing every problem: a wrong type (``"num_layers": "2"``),
a value out of range (``n_heads: 0``, a negative epsilon, a billion layers), an unknown choice, a missing
section (``eva_args: null``), and the relations between fields (hidden size divisible by the heads, an image
made of whole patches). JSON booleans are not integers here, and integers must be JSON integers.

The upper bounds are far above every released model (LLaMA-65B: 80 layers, 8192 wide; CogVLM2: 128256
tokens) and only keep a hostile config from making the converter build an absurd meta model.
"""

from __future__ import annotations

import math

from .errors import ConversionError

MAX_LAYERS = 4096
MAX_WIDTH = 1 << 17  # hidden / intermediate sizes
MAX_VOCAB = 1 << 24
MAX_IMAGE = 1 << 14  # pixels per side
MAX_POSITIONS = 1 << 24
_MISSING = object()


def json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Fields:
    """Checked access to one config section (a dict) named ``where`` in messages; problems go to ``problems``.

    Each getter returns the value when it is valid, else the default (after recording a problem), so the
    caller can keep reading and report everything at once. ``keys`` may list aliases (first present wins).
    """

    def __init__(self, data, where: str, problems: list[str]):
        self.where = where
        self.problems = problems
        if not isinstance(data, dict):
            problems.append(f"{where} must be a JSON object, got {json_type(data)}")
            data = {}
        self.data = data

    def _lookup(self, keys):
        keys = (keys,) if isinstance(keys, str) else tuple(keys)
        for key in keys:
            if key in self.data and self.data[key] is not None:
                return repr(key), self.data[key]
        return " / ".join(repr(k) for k in keys), _MISSING

    def _bad(self, key, value, want: str):
        self.problems.append(f"{self.where}: {key} must be {want}, got {_show(value)} ({json_type(value)})")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def int(self, keys, *, default=None, required=None, min: int = 1, max: int | None = None):
        """An integer in [min, max]; ``required`` defaults to "no default given"."""
        key, value = self._lookup(keys)
        if value is _MISSING:
            if required if required is not None else default is None:
                self.problems.append(f"{self.where} has no {key}")
            return default
        want = f"an integer >= {min}" + (f" and <= {max}" if max is not None else "")
        if not is_int(value) or value < min or (max is not None and value > max):
            self._bad(key, value, want)
            return default
        return value

    def number(self, keys, *, default=None, required=None, positive: bool = True, max: float | None = None):
        key, value = self._lookup(keys)
        if value is _MISSING:
            if required if required is not None else default is None:
                self.problems.append(f"{self.where} has no {key}")
            return default
        want = ("a number > 0" if positive else "a finite number") + (f" and <= {max}" if max is not None else "")
        if not is_number(value) or (positive and value <= 0) or (max is not None and value > max):
            self._bad(key, value, want)
            return default
        return float(value)

    def bool(self, keys, *, default=None):
        key, value = self._lookup(keys)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self._bad(key, value, "true or false")
            return default
        return value

    def str(self, keys, *, default=None, choices: tuple | None = None, required: bool = False):
        key, value = self._lookup(keys)
        if value is _MISSING:
            if required:
                self.problems.append(f"{self.where} has no {key}")
            return default
        if not isinstance(value, str) or (choices is not None and value not in choices):
            want = "a string" if choices is None else "one of " + ", ".join(repr(c) for c in choices)
            self._bad(key, value, want)
            return default
        return value

    def section(self, keys, *, required: bool = True) -> "Fields":
        """A nested object as its own ``Fields`` (empty, with a problem, when missing or not an object)."""
        key, value = self._lookup(keys)
        if value is _MISSING:
            if required:
                self.problems.append(f"{self.where} has no {key} (an object)")
            return Fields({}, f"{self.where} {key}", [])
        if not isinstance(value, dict):
            self._bad(key, value, "an object")
            return Fields({}, f"{self.where} {key}", [])
        return Fields(value, f"{self.where} {key}", self.problems)

    def image_size(self, keys="image_size", *, default=None):
        """An int, or a square ``[h, w]`` pair; returns the side."""
        key, value = self._lookup(keys)
        if value is _MISSING:
            if default is None:
                self.problems.append(f"{self.where} has no {key}")
            return default
        if isinstance(value, (list, tuple)):
            if len(value) != 2 or not all(is_int(v) and 1 <= v <= MAX_IMAGE for v in value):
                self._bad(key, value, f"an integer or a pair of integers in [1, {MAX_IMAGE}]")
                return default
            if value[0] != value[1]:
                self.problems.append(f"{self.where}: {key} {list(value)} is not square; "
                                     "only square inputs are supported")
                return default
            return value[0]
        if not is_int(value) or not 1 <= value <= MAX_IMAGE:
            self._bad(key, value, f"an integer or a pair of integers in [1, {MAX_IMAGE}]")
            return default
        return value

    def bool_list(self, key: str):
        """A bool or a list of bools (SAT's ``is_decoder``)."""
        value = self.data.get(key)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, list) and all(isinstance(v, bool) for v in value):
            return value
        self._bad(repr(key), value, "true, false or a list of them")
        return None

    def divisible(self, a_name: str, a, b_name: str, b):
        """Record a problem when ``a`` is not a multiple of ``b`` (both valid ints; skipped otherwise)."""
        if is_int(a) and is_int(b) and b > 0 and a % b:
            self.problems.append(f"{self.where}: {a_name} {a} is not a multiple of {b_name} {b}")
            return False
        return True


def raise_if(problems: list[str], header: str):
    if problems:
        raise ConversionError(problems, header=header)


def build_config(cls, where: str, **kwargs):
    """``cls(**kwargs)``, with a refusal by the config class (its own validation) reported as a conversion error."""
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, KeyError) as e:
        raise ConversionError(f"{where}: {cls.__name__} refuses these settings: {type(e).__name__}: "
                              f"{str(e).strip()[:300]}") from None
