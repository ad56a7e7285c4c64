"""hub_export as a library: the folder writer on a model's own state dict, the model card, ``check`` failing
on broken folders, and the fake Hub with plain huggingface_hub calls."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from hub_export.card import with_model_id
from hub_export.check import check_folder
from hub_export.families import VISUALGLM
from hub_export.writer import write_hub_folder
from modeling_visualglm.modeling_visualglm import VisualGLMForConditionalGeneration
from modeling_visualglm.testing_utils import randomize_, tiny_visualglm_config


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return randomize_(VisualGLMForConditionalGeneration(tiny_visualglm_config(tiny_tokenizer)).eval(), seed=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model, tiny_tokenizer):
    out = tmp_path_factory.mktemp("written") / "tiny"
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    entries = [((k,), v.nbytes, lambda k=k, v=v: {k: v}) for k, v in sd.items()]
    write_hub_folder(out, family=VISUALGLM, config=model.config, weight_entries=entries, dtype=torch.float32,
                     tokenizer=tiny_tokenizer, max_shard_size="50KB", progress=False)
    return out


def test_written_folder_loads_through_every_auto_class(folder, model, tiny_tokenizer):
    from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM,
                              AutoModelForImageTextToText, AutoProcessor, AutoTokenizer)

    assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__ == "VisualGLMConfig"
    for auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
        loaded = auto.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
        assert type(loaded).__name__ == "VisualGLMForConditionalGeneration"
        assert type(loaded).__module__.startswith("transformers_modules.")  # the folder's copy of the code
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert tok.image_token_id == tiny_tokenizer.image_token_id
    assert type(AutoProcessor.from_pretrained(folder, trust_remote_code=True)).__name__ == "VisualGLMProcessor"
    image_proc = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(image_proc).__name__ == "VisualGLMImageProcessor"
    assert image_proc.size == {"height": 56, "width": 56}


def test_card_snippet_is_repointed_on_push(folder):
    text = (folder / "README.md").read_text()
    assert f'model_id = "{folder.resolve()}"' in text
    repointed = with_model_id(text, "org/name")
    assert 'model_id = "org/name"' in repointed and str(folder.resolve()) not in repointed.split("## Conversion")[0]


def test_check_fails_when_the_folder_is_broken(folder, tmp_path, capsys):
    broken = shutil.copytree(folder, tmp_path / "broken")
    (broken / "qformer.py").unlink()  # a file of the import closure is missing
    assert check_folder(broken) == 1
    assert "FAILED" in capsys.readouterr().err
    assert check_folder(tmp_path / "nothing-here") == 1
    bad_json = shutil.copytree(folder, tmp_path / "bad_json")
    (bad_json / "config.json").write_text("{not json")
    assert check_folder(bad_json) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_check_on_a_device_this_machine_lacks_is_a_one_line_usage_error(folder):
    cmd = [sys.executable, "-m", "hub_export.cli", "check", "--folder", str(folder), "--device", "cuda"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.splitlines() == ["visualglm-export check: error: --device cuda: torch "
                                        f"{torch.__version__} sees no cuda device on this machine (use --device cpu)"]


@pytest.mark.parametrize("device, needle", [("gpu", "--device 'gpu' is not a torch device (Expected one of cpu"),
                                            ("cuda:x", "--device 'cuda:x' is not a torch device"),
                                            ("cuda:99", "--device cuda:99: ")])
def test_check_refuses_bad_devices_before_starting(device, needle, folder, capsys):
    from hub_export.cli import main

    with pytest.raises(SystemExit) as e:
        main(["check", "--folder", str(folder), "--device", device])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_every_cli_option_has_help():
    import argparse

    from conversion.cli import build_parser as convert_parser
    from hub_export.cli import build_parser as export_parser

    parsers = {"visualglm-convert": convert_parser(), "visualglm-export": export_parser()}
    for action in parsers["visualglm-export"]._actions:
        if isinstance(action, argparse._SubParsersAction):
            assert {a.dest for a in action._choices_actions if a.help} == {"check", "push"}
            parsers.update({f"visualglm-export {name}": sub for name, sub in action.choices.items()})
    missing = [f"{prog} {action.option_strings[-1]}" for prog, parser in parsers.items()
               for action in parser._actions if action.option_strings and not (action.help or "").strip()]
    assert not missing, f"options without help: {missing}"
    assert set(parsers) == {"visualglm-convert", "visualglm-export", "visualglm-export check",
                            "visualglm-export push"}


def test_check_cannot_import_our_packages(tmp_path):
    """The check's interpreter really cannot see modeling_visualglm/conversion/hub_export."""
    from hub_export.check import blocker_source

    code = blocker_source() + (
        "import importlib\n"
        "for name in ('modeling_visualglm', 'conversion.cli', 'hub_export'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError as e:\n"
        "        print('blocked', name)\n"
        "import json; print('stdlib ok')\n"
    )
    proc = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split("\n")[:4] == ["blocked modeling_visualglm", "blocked conversion.cli",
                                            "blocked hub_export", "stdlib ok"], proc.stderr
    # without the blocker the editable install makes them importable: the blocker is what the check relies on
    proc = subprocess.run([sys.executable, "-I", "-c", "import hub_export; print('visible')"], capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.strip() == "visible"


HUB_CLIENT = r"""
import sys
from huggingface_hub import HfApi, hf_hub_download
api = HfApi()
api.create_repo("org/files", exist_ok=True)
api.create_repo("org/files", exist_ok=True)  # exist_ok on a second call
info = api.upload_folder(folder_path=sys.argv[1], repo_id="org/files", commit_message="files")
print(info.commit_url)
print(open(hf_hub_download("org/files", "big.safetensors", cache_dir=sys.argv[2]), "rb").read() ==
      open(sys.argv[1] + "/big.safetensors", "rb").read())
print(sorted(f.path for f in api.list_repo_tree("org/files", recursive=True)))
try:
    hf_hub_download("org/files", "absent.json", cache_dir=sys.argv[2])
except Exception as e:
    print(type(e).__name__)
"""


def test_fake_hub_speaks_the_hub_api(tmp_path):
    from fake_hub import FakeHub

    up = tmp_path / "up"
    up.mkdir()
    (up / "config.json").write_text(json.dumps({"a": 1}))
    (up / "big.safetensors").write_bytes(os.urandom(30_000))  # an LFS upload
    with FakeHub(lifetime=120) as hub:
        env = dict(os.environ, **hub.env())
        proc = subprocess.run([sys.executable, "-c", HUB_CLIENT, str(up), str(tmp_path / "cache")], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.strip().splitlines()
        sha = hub.state.repos["org/files"].branches["main"]
        assert lines[0] == f"{hub.endpoint}/org/files/commit/{sha}"
        assert lines[1] == "True"
        assert lines[2] == "['.gitattributes', 'big.safetensors', 'config.json']"
        assert lines[3] in ("RemoteEntryNotFoundError", "EntryNotFoundError")
        assert ("PUT", f"/lfs-upload/{hub.state.repos['org/files'].commits[sha]['big.safetensors'].lfs_oid}") in hub.requests
    assert hub._thread is not None and not hub._thread.is_alive()  # stopped with the context
