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
    """A command-line mistake (CLI exit code 2). ``show_usage=False`` for mistakes the usage text does not help
    with (an ``--out`` that is refused): the error line alone is printed."""

    def __init__(self, message: str, show_usage: bool = True):
        self.show_usage = show_usage
        super().__init__(message)


class Interrupted(BaseException):
    """SIGTERM / SIGHUP turned into an exception (like SIGINT's KeyboardInterrupt), so that cleanup runs."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signum)
