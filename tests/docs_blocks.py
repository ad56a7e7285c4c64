"""Code blocks of README.md and docs/*.md, and the markers that say which ones cannot run here (test helper).

Convention (docs/testing.md, "Docs examples"): every fenced block has a language. ``python``, ``bash``, ``sh``,
``shell`` and ``console`` blocks are code and run in tests/test_docs.py, unless the line right above the fence is
one of

    <!-- docs-test: skip REASON -->   REASON one of SKIP_REASONS: the block cannot run on a CPU-only test machine
    <!-- docs-test: continue -->      a python block that goes on from the previous python block of the same file
                                      (same interpreter: it uses the names defined there)

Any other language (``text`` for output, usage synopses, trees; ``json``, ``jinja``, ...) is not code and never
runs. A fence without a language, an unknown marker, a marker that is not right above a fence, a skip without a
known reason and a ``continue`` without a python block to continue are errors (``problems``), so a new block
is either run or explicitly marked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

CODE_LANGUAGES = {"python": "python", "bash": "shell", "sh": "shell", "shell": "shell", "console": "shell"}
SKIP_REASONS = {
    "real-weights": "needs the real checkpoints or downloads them (Hub, Meta, SAT releases)",
    "gpu": "needs a CUDA GPU (device_map='cuda', bitsandbytes, CUDA graphs)",
    "install": "installs packages or creates an environment",
    "suite": "runs the test suite itself",
    "long": "a benchmark that writes or reads many GB or runs for minutes",
}

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>```+|~~~+)(?P<info>.*)$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")
_MENTION = re.compile(r"^\s*<!--.*docs-test", re.IGNORECASE)  # a marker-like comment (prose may name markers)


@dataclass
class Block:
    path: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    language: str  # the fence's info string (first word), "" when missing
    code: str
    marker: str | None = None  # "skip REASON", "continue" or None

    @property
    def kind(self) -> str | None:
        """"python" or "shell" for code blocks, None for anything else."""
        return CODE_LANGUAGES.get(self.language)

    @property
    def skip_reason(self) -> str | None:
        if self.marker and self.marker.startswith("skip"):
            return self.marker[len("skip"):].strip()
        return None

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Script:
    """What one test runs: a python block plus the blocks that ``continue`` it, or one shell block."""

    kind: str  # "python" or "shell"
    blocks: list[Block] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.blocks[0].path}:" + "+".join(str(b.line) for b in self.blocks)

    @property
    def code(self) -> str:
        return "\n".join(shell_commands(b) if self.kind == "shell" else b.code for b in self.blocks)


def doc_files(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def parse(path: Path, root: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of one Markdown file and the problems found in its markers and fences."""
    rel = str(path.relative_to(root))
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    i = 0
    pending: tuple[int, str] | None = None  # (line, marker body) waiting for its fence on the next line
    while i < len(lines):
        line = lines[i]
        marker = _MARKER.match(line)
        fence = _FENCE.match(line)
        if pending is not None and not fence:
            problems.append(f"{rel}:{pending[0]}: a docs-test marker must be the line right above a code fence")
            pending = None
        if marker:
            pending = (i + 1, marker.group("body"))
        elif _MENTION.search(line) and not fence:
            problems.append(f"{rel}:{i + 1}: malformed docs-test marker {line.strip()!r} "
                            "(write <!-- docs-test: skip REASON --> or <!-- docs-test: continue -->)")
        if not fence:
            i += 1
            continue
        # a fenced block: find its end (same fence characters, at least as long)
        opening = fence.group("fence")
        info = fence.group("info").strip()
        end = i + 1
        while end < len(lines):
            closing = _FENCE.match(lines[end])
            if closing and closing.group("fence")[0] == opening[0] and len(closing.group("fence")) >= len(opening) \
                    and not closing.group("info").strip():
                break
            end += 1
        if end == len(lines):
            problems.append(f"{rel}:{i + 1}: code fence is never closed")
        indent = len(fence.group("indent"))
        code = "\n".join(l[indent:] if l[:indent].strip() == "" else l for l in lines[i + 1:end]) + "\n"
        block = Block(rel, i + 1, info.split()[0] if info else "", code, pending[1] if pending else None)
        pending = None
        blocks.append(block)
        i = end + 1
    if pending is not None:
        problems.append(f"{rel}:{pending[0]}: a docs-test marker must be the line right above a code fence")
    problems += _check_blocks(blocks)
    return blocks, problems


def _check_blocks(blocks: list[Block]) -> list[str]:
    problems = []
    last_python_run: Block | None = None
    for block in blocks:
        where = f"{block.id}"
        if not block.language:
            problems.append(f"{where}: fence without a language: use python/bash for code (run by tests/test_docs.py "
                            "unless marked), text for output or usage synopses")
        if block.marker is not None:
            if block.kind is None:
                problems.append(f"{where}: docs-test marker on a {block.language or 'plain'} block, which never runs")
            elif block.marker == "continue":
                if block.kind != "python":
                    problems.append(f"{where}: only python blocks can continue")
                elif last_python_run is None:
                    problems.append(f"{where}: continue, but no python block before it in this file runs")
            elif block.skip_reason is not None:
                if block.skip_reason not in SKIP_REASONS:
                    problems.append(f"{where}: skip reason {block.skip_reason!r} is not one of "
                                    f"{', '.join(SKIP_REASONS)}")
            else:
                problems.append(f"{where}: unknown docs-test marker {block.marker!r}")
        if block.kind == "python":
            if block.skip_reason is None:
                last_python_run = block
            elif block.marker is not None:
                last_python_run = None  # a continue after a skipped block would run half a script
    return problems


def collect(root: Path) -> tuple[list[Block], list[str]]:
    blocks, problems = [], []
    for path in doc_files(root):
        b, p = parse(path, root)
        blocks += b
        problems += p
    return blocks, problems


def scripts(blocks: list[Block]) -> list[Script]:
    """The runnable scripts, in document order: unmarked code blocks, with ``continue`` blocks appended."""
    out: list[Script] = []
    current: dict[str, Script] = {}  # file → its last python script
    for block in blocks:
        if block.kind is None or block.skip_reason is not None:
            if block.kind == "python":
                current.pop(block.path, None)
            continue
        if block.marker == "continue":
            if block.path in current:
                current[block.path].blocks.append(block)
            continue
        script = Script(block.kind, [block])
        out.append(script)
        if block.kind == "python":
            current[block.path] = script
    return out


def shell_commands(block: Block) -> str:
    """A shell block as a script: ``console`` blocks keep only their ``$ `` lines (the rest is output)."""
    if block.language == "console":
        return "\n".join(line[2:] for line in block.code.splitlines() if line.startswith("$ ")) + "\n"
    return block.code
