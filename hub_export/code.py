"""Which remote-code files a hub folder needs: the relative-import closure of the entry modules.

transformers copies a remote class's file plus every file reached through ``from .x import`` lines
(``dynamic_module_utils.get_relative_import_files``) and flattens them into the repo root. We compute the
same closure ourselves from the source text, starting from the model, config, tokenizer and processor
modules, so a folder gets exactly the files it needs: no other family's files, no converter or exporter code.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path


def relative_imports(path: Path) -> set[str]:
    """Module names imported relatively (``from .x import``, ``from . import x``) anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.level != 1:
                raise ValueError(f"{path}: remote code must be flat; '{'.' * node.level}' imports are not copied")
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


def import_closure(package_dir: str | Path, entry_modules: list[str]) -> list[Path]:
    """Files of ``entry_modules`` (names inside ``package_dir``) and everything they import relatively."""
    package_dir = Path(package_dir)
    todo, seen = list(entry_modules), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = package_dir / f"{name}.py"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: module {name!r} is imported but does not exist")
        seen.add(name)
        todo.extend(relative_imports(path) - seen)
    return sorted(package_dir / f"{n}.py" for n in seen)


def copy_code(package_dir: str | Path, entry_modules: list[str], folder: str | Path) -> list[str]:
    files = import_closure(package_dir, entry_modules)
    for f in files:
        shutil.copy2(f, Path(folder) / f.name)
    return [f.name for f in files]
