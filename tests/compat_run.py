"""Run tests/compat_check.py on every tiny folder under one Python interpreter, optionally comparing with a
reference run (test helper script; the compatibility stage of .ci/run and tests/test_compat.py use it).

    python tests/compat_run.py --python PY --folders DIR --out DIR [--compare DIR] [--strict-warnings]

Each check runs as ``PY -I`` (no PYTHONPATH, no user site) with our packages blocked, so the folder's own remote
code is all it has. ``--compare`` checks the greedy tokens and answers are identical to the reference run's and the
first-step logits agree to 1e-5 (relative to their largest magnitude): the same weights must give the same model
under every supported transformers release. Exit code 0 only if everything passed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from tiny_folders import FOLDERS  # noqa: E402

LOGITS_TOL = 1e-5


def run_one(python: str, folder: Path, name: str, out: Path, strict_warnings: bool) -> tuple[str, int, str, float]:
    from modeling_visualglm.hub_export.check import blocker_source

    code = blocker_source() + (
        "import runpy, sys\n"
        f"sys.argv = ['compat_check.py', {str(folder)!r}, {name!r}, {str(out)!r}]\n"
        f"runpy.run_path({str(HERE / 'compat_check.py')!r}, run_name='__main__')\n"
    )
    flags = []
    if strict_warnings:  # later -W options win: peft 0.21 itself reads the attribute transformers 5.2x renamed
        flags = ["-W", "error::FutureWarning", "-W", "error::DeprecationWarning",
                 "-W", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"]
    start = time.perf_counter()
    proc = subprocess.run([python, "-I", *flags, "-c", code], capture_output=True, text=True, cwd=str(out.parent))
    return name, proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def compare(name: str, got: dict, ref: dict) -> list[str]:
    problems = []
    for key in ("plain_generate", "chat", "batch", "classes"):
        if got[key] != ref[key]:
            problems.append(f"{name}: {key} differs: {got[key]!r} (transformers {got['transformers']}) vs {ref[key]!r} "
                            f"(transformers {ref['transformers']})")
    scale = max(abs(x) for x in ref["first_logits"])
    err = max(abs(a - b) for a, b in zip(got["first_logits"], ref["first_logits"])) / scale
    if err > LOGITS_TOL:
        problems.append(f"{name}: first-step logits differ by {err:.2e} (relative) from transformers {ref['transformers']}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", required=True, help="interpreter of the environment under test")
    parser.add_argument("--folders", required=True, type=Path, help="folder holding the tiny hub folders")
    parser.add_argument("--out", required=True, type=Path, help="where the JSON results go")
    parser.add_argument("--compare", type=Path, help="results of a reference run to compare with")
    parser.add_argument("--strict-warnings", action="store_true", help="FutureWarning/DeprecationWarning are errors")
    parser.add_argument("--only", nargs="*", default=list(FOLDERS), help="folder names (default: all)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=2) as pool:  # two cores
        runs = list(pool.map(lambda n: run_one(args.python, args.folders / n, n, args.out / f"{n}.json",
                                               args.strict_warnings), args.only))
    problems = []
    for name, rc, output, seconds in runs:
        if rc != 0:
            problems.append(f"{name}: compat_check failed (exit {rc}):\n{output[-4000:]}")
            continue
        print(f"{name}: passed in {seconds:.1f} s")
        if args.compare is not None:
            got = json.loads((args.out / f"{name}.json").read_text())
            ref = json.loads((args.compare / f"{name}.json").read_text())
            problems += compare(name, got, ref)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
