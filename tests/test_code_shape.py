"""The house rules of issue 14, kept: no function in the runtime (src/) or the converters (conversion/) over 60
lines, no family model class over 120 (what differs per family; the shared composition is in multimodal.py), and
the remote-code folder imports only torch, transformers, sentencepiece, PIL, the standard library and itself."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "src" / "modeling_visualglm"
FAMILY_CLASSES = ("VisualGLMForConditionalGeneration", "CogVLMForConditionalGeneration",
                  "MiniGPT4ForConditionalGeneration")
ALLOWED_IMPORTS = {"torch", "transformers", "sentencepiece", "PIL", "__future__"} | set(sys.stdlib_module_names)


def lines(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def definitions(folder: Path):
    for path in sorted(folder.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield path.relative_to(ROOT), node


@pytest.mark.parametrize("folder", ["src", "conversion"])
def test_no_function_over_60_lines(folder):
    long = [f"{path}:{node.lineno} {node.name} ({lines(node)} lines)" for path, node in definitions(ROOT / folder)
            if not isinstance(node, ast.ClassDef) and lines(node) > 60]
    assert not long, "\n".join(long)


def test_family_model_classes_hold_only_what_differs():
    sizes = {node.name: lines(node) for _, node in definitions(RUNTIME) if isinstance(node, ast.ClassDef)}
    assert set(FAMILY_CLASSES) <= set(sizes)
    big = {name: sizes[name] for name in FAMILY_CLASSES if sizes[name] > 120}
    assert not big, big


def test_runtime_imports_only_what_a_hub_folder_may_import():
    bad = []
    for path in sorted(RUNTIME.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            bad += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] not in ALLOWED_IMPORTS]
    assert not bad, bad
    assert not any(p.is_dir() and p.name != "__pycache__" for p in RUNTIME.iterdir()), "the runtime folder is flat"
