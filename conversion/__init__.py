"""Checkpoint converters: rule tables per source format, named tensor ops, the checking applier, the CLI.

See docs/conversion.md. Entry point: ``visualglm-convert`` (``conversion.cli:main``).
"""

from .apply import Plan, build_plan
from .errors import ConversionError, UsageError
from .rules import Rule, convert, drop, rename

__all__ = ["ConversionError", "Plan", "Rule", "UsageError", "build_plan", "convert", "drop", "rename"]
