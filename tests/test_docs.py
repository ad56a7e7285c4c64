"""The docs run as written (issue #12): every python and shell block of README.md and docs/*.md runs here on
tiny models, or is marked as needing what a CPU test machine lacks (the convention: tests/docs_blocks.py and
docs/testing.md, "Docs examples").

Runnable blocks get the stand-ins of ``SUBSTITUTIONS`` for the real checkpoints and pictures they name, then
run like a user's script: a fresh interpreter in an empty temporary folder (python blocks: ``python -I`` with our
packages blocked, as a user who has only a hub folder; shell blocks: ``bash -e`` with the venv's console
scripts on PATH), offline, failing on DeprecationWarning/FutureWarning and on deprecations transformers logs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from docs_blocks import SKIP_REASONS, collect, parse, scripts

ROOT = Path(__file__).resolve().parents[1]
BLOCKS, PROBLEMS = collect(ROOT)
SCRIPTS = scripts(BLOCKS)

# What the runnable blocks name → what they get here. The docs introduce each name as "a folder written by
# visualglm-convert, or its Hub repo id" or as a picture of the reader's; a name is replaced where it stands
# alone as a path (not inside a longer name such as `visualglm-6b-hf2` or `ORG/visualglm-6b-hf`).
SUBSTITUTIONS = {
    "visualglm-6b-hf": ("tiny hub folder", "visualglm"),
    "cogvlm2-converted": ("tiny hub folder", "cogvlm2"),
    "minigpt4-hf": ("tiny hub folder", "minigpt4"),
    "photo.jpg": ("bundled demo image", None),
    "street.jpg": ("bundled demo image", None),
    "examples/1.jpeg": ("bundled demo image", None),
}
TIMEOUT_S = 300


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"(?<![\w./~-]){re.escape(name)}(?![\w/-]|\.\w)")


def substitute(code: str, stand_ins: dict[str, str]) -> str:
    for name, value in stand_ins.items():
        code = _pattern(name).sub(lambda _m, v=value: v, code)
    return code


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory):
    """``SUBSTITUTIONS`` resolved: tiny hub folders (built once per session, only those the docs use)."""
    from tiny_folders import write_tiny_folder

    from modeling_visualglm.tools.tiny_models import demo_image_path

    root = tmp_path_factory.mktemp("docs_tiny")
    folders: dict[str, str] = {}
    values = {}
    for name, (kind, family) in SUBSTITUTIONS.items():
        if kind == "tiny hub folder":
            if family not in folders:
                folders[family] = str(write_tiny_folder(family, root / family))
            values[name] = folders[family]
        else:
            values[name] = demo_image_path()
    for value in values.values():
        assert re.fullmatch(r"[\w./-]+", value), f"{value!r} needs quoting in a shell block"
    return values


@pytest.fixture(scope="session")
def run_env(tmp_path_factory):
    env = dict(os.environ)
    env.update(
        # the runnable blocks need nothing from the network; a Hub id left unsubstituted fails instead of downloading
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        # the folders' remote code is copied here, not into the user's ~/.cache
        HF_MODULES_CACHE=str(tmp_path_factory.mktemp("hf_modules")),
        # one thread per block: on a shared 2-core machine OpenMP's spinning threads made a tiny chat 10x slower
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="error::DeprecationWarning,error::FutureWarning",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    env.pop("PYTHONPATH", None)
    return env


def _runner_source() -> str:
    from modeling_visualglm.hub_export.check import blocker_source

    return blocker_source() + "import runpy, sys\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"


def _logged_deprecations(output: str) -> list[str]:
    # as tests/conftest.py: transformers logs renames as often as it warns
    return [line for line in output.splitlines() if "deprecat" in line.lower() and "torch_dtype" not in line]


# --- the convention ---------------------------------------------------------------------------------------------


def test_every_block_is_run_or_marked():
    assert not PROBLEMS, "docs code blocks break the docs-test convention (docs/testing.md):\n" + "\n".join(PROBLEMS)
    code_blocks = [b for b in BLOCKS if b.kind is not None]
    run = {b.id for s in SCRIPTS for b in s.blocks}
    for block in code_blocks:
        assert (block.id in run) != (block.skip_reason is not None), block.id
    assert run, "no docs block runs"


def test_substitution_table_is_used():
    """Each stand-in is needed by some runnable block: the table cannot outlive the docs' names."""
    runnable = "\n".join(s.code for s in SCRIPTS)
    unused = [name for name in SUBSTITUTIONS if not _pattern(name).search(runnable)]
    assert not unused, f"SUBSTITUTIONS rows no runnable docs block uses: {unused}"


def test_substitute_replaces_whole_names_only():
    stand_ins = {"visualglm-6b-hf": "/tiny/v", "photo.jpg": "/img.png"}
    code = ('folder = "visualglm-6b-hf"; model.chat(tok, "photo.jpg", "q")\n'
            "visualglm-convert --out visualglm-6b-hf2 && push --repo-id ORG/visualglm-6b-hf --folder visualglm-6b-hf\n"
            "cp photo.jpg.bak photo.jpgs ~/visualglm-6b-hf x/photo.jpg")
    assert substitute(code, stand_ins) == (
        'folder = "/tiny/v"; model.chat(tok, "/img.png", "q")\n'
        "visualglm-convert --out visualglm-6b-hf2 && push --repo-id ORG/visualglm-6b-hf --folder /tiny/v\n"
        "cp photo.jpg.bak photo.jpgs ~/visualglm-6b-hf x/photo.jpg")


def test_convention_problems_are_reported(tmp_path):
    """The parser flags everything that would let a block slip through unrun and unmarked."""
    doc = tmp_path / "docs" / "x.md"
    doc.parent.mkdir()
    doc.write_text(textwrap.dedent("""\
        # x
        <!-- docs-test: continue -->
        ```python
        orphan_continue = 1
        ```
        ```
        no language
        ```
        <!-- docs-test: skip someday -->
        ```bash
        echo unknown reason
        ```
        <!-- docs-test: skip gpu -->

        ```python
        print("a blank line between marker and fence")
        ```
        <!-- docs-test: maybe -->
        ```sh
        echo unknown marker
        ```
        <!-- docs-test skip gpu -->
        <!-- docs-test: skip gpu -->
        ```text
        output never runs, so no marker
        ```
        ```python
        a = 1
        ```
        <!-- docs-test: continue -->
        ```python
        print(a)
        ```
        <!-- docs-test: skip install -->
        ```console
        $ pip install x
        output
        ```
        ````python
        ```nested fence```
        ````
        """))
    blocks, problems = parse(doc, tmp_path)
    expected = [
        "docs/x.md:3: continue, but no python block before it in this file runs",
        "docs/x.md:6: fence without a language",
        "docs/x.md:10: skip reason 'someday' is not one of",
        "docs/x.md:13: a docs-test marker must be the line right above a code fence",
        "docs/x.md:19: unknown docs-test marker 'maybe'",
        "docs/x.md:22: malformed docs-test marker",
        "docs/x.md:24: docs-test marker on a text block, which never runs",
    ]
    assert len(problems) == len(expected), problems
    for want in expected:
        assert any(p.startswith(want) for p in problems), (want, problems)
    runnable = scripts(blocks)
    assert [s.id for s in runnable] == ["docs/x.md:15", "docs/x.md:19", "docs/x.md:27+31", "docs/x.md:39"]
    assert runnable[2].code == "a = 1\n\nprint(a)\n"
    assert runnable[3].code == "```nested fence```\n"
    assert set(SKIP_REASONS) == {"real-weights", "gpu", "install", "suite", "long"}


# --- the blocks -------------------------------------------------------------------------------------------------


def _run(script, stand_ins: dict, env: dict, tmp: Path) -> tuple[str, subprocess.CompletedProcess]:
    code = substitute(script.code, stand_ins)
    work = tmp / "cwd"
    work.mkdir(parents=True)
    if script.kind == "python":
        path = tmp / "block.py"
        path.write_text(code)
        cmd = [sys.executable, "-I", "-c", _runner_source(), str(path)]
    else:
        path = tmp / "block.sh"
        path.write_text(code)
        cmd = ["bash", "-euo", "pipefail", str(path)]
    return code, subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="session")
def block_runs(request, stand_ins, run_env, tmp_path_factory):
    """Every selected block, started together on first use, one per core (each is a single-threaded fresh
    interpreter that mostly imports torch and transformers): script id → future of ``_run``."""
    selected = [item.callspec.params["script"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_docs_block_runs"]
    pool = ThreadPoolExecutor(max_workers=max(1, min(len(selected), os.cpu_count() or 1)))
    futures = {s.id: pool.submit(_run, s, stand_ins, run_env, tmp_path_factory.mktemp("docs_block"))
               for s in selected}
    yield futures
    pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.id for s in SCRIPTS])
def test_docs_block_runs(script, block_runs):
    code, proc = block_runs[script.id].result()
    output = proc.stdout + proc.stderr
    where = f"{script.id} ({script.kind}) failed, run as:\n{code}\n--- output (tail) ---\n{output[-4000:]}"
    assert proc.returncode == 0, where
    deprecations = _logged_deprecations(output)
    assert not deprecations, f"{script.id} made transformers log a deprecation:\n" + "\n".join(deprecations)
