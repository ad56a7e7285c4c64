"""Errors of the converters. ``ConversionError`` = bad or inconsistent input (CLI exit code 1)."""

from __future__ import annotations


class ConversionError(Exception):
    """Carries every problem found, so one run reports all of them at once."""

    def __init__(self, problems: str | list[str], header: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.header = header
        super().__init__(self.render())

    def render(self) -> str:
        if len(self.problems) == 1 and not self.header:
            return self.problems[0]
        head = self.header or "conversion failed"
        noun = "problem" if len(self.problems) == 1 else "problems"
        return f"{head} ({len(self.problems)} {noun}):\n" + "\n".join(f"  - {p}" for p in self.problems)


class UsageError(Exception):
    """A command-line mistake (CLI exit code 2)."""
