"""What ``pip install`` puts into site-packages: one name, ``modeling_visualglm``, holding the runtime (the flat
remote-code folder) and the tooling under ``modeling_visualglm.conversion``/``.hub_export``/``.tools``; no generic
top-level package (``conversion``, ``hub_export``, ``tools``) and no test helpers. Built as a real wheel, installed
into a scratch target and imported from there."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # built from a copy of what the sdist holds, so the in-tree build/ and egg-info never touch the checkout
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("src", "conversion", "hub_export", "tools"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("modeling_visualglm-*.whl")
    return path


def test_wheel_installs_one_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"modeling_visualglm"}, tops
    for expected in (
        "modeling_visualglm/modeling_visualglm.py",
        "modeling_visualglm/conversion/cli.py",
        "modeling_visualglm/conversion/formats/cogvlm.py",
        "modeling_visualglm/hub_export/allowlist.py",
        "modeling_visualglm/tools/demo.py",
        "modeling_visualglm/tools/assets/demo.png",
    ):
        assert expected in names, expected
    # the runtime folder holds only remote code: no tooling or test helpers beside the family files
    runtime = {n.split("/")[1] for n in names if n.startswith("modeling_visualglm/") and n.count("/") == 1}
    assert not runtime & {"demo.py", "testing_utils.py", "tiny_tokenizer.py"}, runtime
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "modeling_visualglm.conversion.cli:main" in text and "modeling_visualglm.hub_export.cli:main" in text
    assert "modeling_visualglm.tools.demo:main" in text


def test_installed_wheel_imports_its_tooling(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import modeling_visualglm.conversion.cli as c, modeling_visualglm.hub_export.check as h\n"
        "from modeling_visualglm.tools.tiny_models import demo_image_path\n"
        "from pathlib import Path\n"
        "for f in (c.__file__, h.__file__, demo_image_path()):\n"
        "    assert Path(f).resolve().is_relative_to(Path(sys.argv[1]).resolve()), f\n"
        "assert h.demo_image() is not None\n"
        "import importlib.util\n"
        "assert all(importlib.util.find_spec(n) is None for n in ('conversion', 'hub_export', 'tools'))\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
