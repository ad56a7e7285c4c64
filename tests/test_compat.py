"""The supported transformers range (4.57.x and 5.17+): what can be checked under the installed release.

The other ends of the range run in CI's compatibility stage (.ci/compat: the same tests/compat_check.py in
side virtualenvs with transformers 4.57.6 and the lowest declared 5.x, compared with this release's results).
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import transformers
from packaging.requirements import Requirement
from packaging.version import Version

from modeling_visualglm.hub_export.code import import_closure, relative_imports
from modeling_visualglm.hub_export.families import FAMILIES, package_dir
from modeling_visualglm import compat

ROOT = Path(__file__).resolve().parent.parent


def declared_transformers() -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return next(Requirement(d) for d in project["dependencies"] if Requirement(d).name == "transformers")


def test_feature_detection_agrees_with_the_release_notes():
    """compat.py detects features, not versions; each flag must flip exactly at the release it names."""
    version = Version(transformers.__version__).release
    assert compat.CACHE_ARG == ("cache" if version >= (5, 24) else "past_key_values")
    assert compat.TRANSFORMERS_4 == (version < (5,))


def test_placeholder_safe_repetition_penalty_equals_the_newer_releases():
    """The shim for releases whose repetition penalty fails on ids past the LM head (CogVLM's image placeholders)
    against this release's own processor, which skips them (seeded random scores, ids up to vocab + 3)."""
    from transformers.generation.logits_process import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    if not compat.repetition_penalty_skips_foreign_ids():
        pytest.skip("this transformers has no reference: its penalty fails on such ids (the shim is active)")
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 50, generator=generator)
    ids = torch.randint(0, 54, (3, 20), generator=generator)
    assert (ids >= 50).any()
    reference = RepetitionPenaltyLogitsProcessor(1.4)(ids, scores.clone())
    safe = compat._PlaceholderSafeRepetitionPenalty(1.4)(ids, scores.clone())
    torch.testing.assert_close(safe, reference, rtol=0, atol=0)
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.4)])
    assert compat.placeholder_safe_processors(processors) is processors  # left alone where the release skips them


def test_installed_transformers_is_in_the_declared_range():
    assert Version(transformers.__version__) in declared_transformers().specifier


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_entry_modules_import_their_whole_closure(family):
    """transformers 4.57.x copies only the files an entry module (an auto_map target) imports itself when it loads a
    local folder, so each entry module must import every module of its closure directly."""
    source = package_dir()
    for entry in set(FAMILIES[family].code_modules()):
        closure = {p.stem for p in import_closure(source, [entry])} - {entry}
        direct = relative_imports(source / f"{entry}.py")
        assert closure <= direct, f"{entry}.py reaches {sorted(closure - direct)} only indirectly"


def test_model_card_states_the_declared_range(tmp_path):
    from tiny_folders import write_tiny_folder

    folder = write_tiny_folder("cogvlm", tmp_path / "cogvlm")
    spec = ",".join(sorted((str(s) for s in declared_transformers().specifier), key=lambda s: not s.startswith(">")))
    card = (folder / "README.md").read_text()
    assert f"`transformers{spec}` or 4.57.x" in card
    assert "`do_sample=False`, `max_new_tokens=2048`" in card  # CogVLM's own chat defaults, not another family's


def test_hub_folders_work_on_the_installed_transformers(tmp_path):
    """tests/compat_check.py on every family's tiny folder, in fresh interpreters that cannot import our packages,
    with FutureWarning/DeprecationWarning as errors."""
    from tiny_folders import FOLDERS, write_tiny_folder

    for name in FOLDERS:
        write_tiny_folder(name, tmp_path / "folders" / name)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "compat_run.py"), "--python", sys.executable, "--folders",
         str(tmp_path / "folders"), "--out", str(tmp_path / "results"), "--strict-warnings"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in FOLDERS:
        assert f"{name}: passed" in proc.stdout
