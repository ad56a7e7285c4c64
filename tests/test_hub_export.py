"""hub_export as a library: the folder writer on a model's own state dict, the model card, ``check`` failing
on broken folders, and the fake Hub with plain huggingface_hub calls."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_visualglm.hub_export import INCOMPLETE_MARKER
from modeling_visualglm.hub_export.card import with_model_id
from modeling_visualglm.hub_export.check import check_folder
from modeling_visualglm.hub_export.families import VISUALGLM
from modeling_visualglm.hub_export.writer import write_hub_folder
from modeling_visualglm.modeling_visualglm import VisualGLMForConditionalGeneration
from modeling_visualglm.tools.tiny_models import randomize_, tiny_visualglm_config


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
    cmd = [sys.executable, "-m", "modeling_visualglm.hub_export.cli", "check", "--folder", str(folder), "--device", "cuda"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.splitlines() == ["visualglm-export check: error: --device cuda: torch "
                                        f"{torch.__version__} sees no cuda device on this machine (use --device cpu)"]


@pytest.mark.parametrize("device, needle", [("gpu", "--device 'gpu' is not a torch device (Expected one of cpu"),
                                            ("cuda:x", "--device 'cuda:x' is not a torch device"),
                                            ("cuda:99", "--device cuda:99: ")])
def test_check_refuses_bad_devices_before_starting(device, needle, folder, capsys):
    from modeling_visualglm.hub_export.cli import main

    with pytest.raises(SystemExit) as e:
        main(["check", "--folder", str(folder), "--device", device])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_every_cli_option_has_help():
    import argparse

    from modeling_visualglm.conversion.cli import build_parser as convert_parser
    from modeling_visualglm.hub_export.cli import build_parser as export_parser

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
    """The check's interpreter really cannot see modeling_visualglm (runtime and tooling alike)."""
    from modeling_visualglm.hub_export.check import blocker_source

    code = blocker_source() + (
        "import importlib\n"
        "for name in ('modeling_visualglm', 'modeling_visualglm.conversion.cli', 'modeling_visualglm.hub_export'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError as e:\n"
        "        print('blocked', name)\n"
        "import json; print('stdlib ok')\n"
    )
    proc = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split("\n")[:4] == ["blocked modeling_visualglm", "blocked modeling_visualglm.conversion.cli",
                                            "blocked modeling_visualglm.hub_export", "stdlib ok"], proc.stderr
    # without the blocker the editable install makes them importable: the blocker is what the check relies on
    proc = subprocess.run([sys.executable, "-I", "-c", "import modeling_visualglm.hub_export; print('visible')"], capture_output=True,
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


# --- the allow-list (issue #13, "hostile input"): check and push accept only what a hub folder holds -------------

from modeling_visualglm.hub_export.allowlist import ALLOWED_NAMES, scan_folder  # noqa: E402
from modeling_visualglm.hub_export.push import PushError, push_folder  # noqa: E402

SECRET = "TOP-SECRET: must never reach the Hub"
LOCAL_ONLY = {name for name, (_, upload) in ALLOWED_NAMES.items() if not upload}


class _Exec:
    """Unpickling this runs ``exec(code)``: the payload of a hostile ``pytorch_model.bin``."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def evil_pickle(sentinel, protocol: int) -> bytes:
    code = f"open({str(sentinel)!r}, 'w').write('pwned')"
    if protocol == 0:  # hand-written, as attackers do: GLOBAL builtins.exec, MARK, UNICODE code, TUPLE, REDUCE, STOP
        return b"cbuiltins\nexec\n(V" + code.encode() + b"\ntR."
    return pickle.dumps(_Exec(code), protocol=protocol)


class Ctx:
    def __init__(self, tmp_path):
        self.outside = tmp_path / "outside"
        self.outside.mkdir()
        self.secret = self.outside / "secret.txt"
        self.secret.write_text(SECRET)
        self.sentinel = tmp_path / "PWNED"


def _shards(f):
    return sorted(p.name for p in f.glob("model-*-of-*.safetensors"))


def _replace_with_link(path, target):
    path.unlink()
    path.symlink_to(target)


def _drop_last_shard_from_index(f):
    index = json.loads((f / "model.safetensors.index.json").read_text())
    last = _shards(f)[-1]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != last}
    (f / "model.safetensors.index.json").write_text(json.dumps(index))
    return [last]


def _etc_hostname_link(f, c):
    target = "/etc/hostname" if os.path.isfile("/etc/hostname") else c.secret
    (f / "special_tokens_map.json").symlink_to(target)
    return ["special_tokens_map.json"]


def _outside_copy_link(f, c, name):
    shutil.copy2(f / name, c.outside / name)
    _replace_with_link(f / name, c.outside / name)  # same bytes: only being a link is wrong
    return [name]


def _foreign_auto_map(f, c):
    cfg = json.loads((f / "config.json").read_text())
    cfg["auto_map"]["AutoModelForCausalLM"] = "someone/else--modeling_evil.Evil"
    (f / "config.json").write_text(json.dumps(cfg))
    return ["config.json"]


# attack -> mutate a copy of the clean folder, return the names that must be reported
ATTACKS = {
    "link to a secret, named like an existing allowed file": lambda f, c: (
        _replace_with_link(f / "README.md", c.secret), ["README.md"])[1],
    "link to a secret, named like an allowed file": lambda f, c: (
        (f / "tokenizer.json").symlink_to(c.secret), ["tokenizer.json"])[1],
    "link to /etc/hostname": _etc_hostname_link,
    "link to a secret, unknown name": lambda f, c: ((f / "notes.txt").symlink_to(c.secret), ["notes.txt"])[1],
    "symlinked directory": lambda f, c: ((f / "extra").symlink_to(c.outside, target_is_directory=True),
                                         ["extra"])[1],
    "dangling link": lambda f, c: (_replace_with_link(f / "added_tokens.json", c.outside / "nothing"),
                                   ["added_tokens.json"])[1],
    "weights shard replaced by a link": lambda f, c: _outside_copy_link(f, c, _shards(f)[0]),
    "closure .py replaced by a link": lambda f, c: _outside_copy_link(f, c, "qformer.py"),
    "stray torch.save pytorch_model.bin": lambda f, c: (
        torch.save({"w": torch.ones(3)}, f / "pytorch_model.bin"), ["pytorch_model.bin"])[1],
    "malicious pytorch_model.bin (protocol 0)": lambda f, c: (
        (f / "pytorch_model.bin").write_bytes(evil_pickle(c.sentinel, 0)), ["pytorch_model.bin"])[1],
    "malicious pickle named tokenizer.model": lambda f, c: (
        (f / "tokenizer.model").write_bytes(evil_pickle(c.sentinel, 4)), ["tokenizer.model"])[1],
    "legacy torch.save as ice_text.model": lambda f, c: (
        torch.save({"w": torch.ones(3)}, f / "ice_text.model", _use_new_zipfile_serialization=False),
        ["ice_text.model"])[1],
    "other pickle suffixes": lambda f, c: (
        [(f / n).write_bytes(pickle.dumps({"a": 1})) for n in ("x.pt", "x.pth", "x.pkl", "x.ckpt")],
        ["x.ckpt", "x.pkl", "x.pt", "x.pth"])[1],
    "stray evil.py": lambda f, c: ((f / "evil.py").write_text("import os\nos.system('echo pwned')\n"),
                                   ["evil.py"])[1],
    "index names a missing shard": lambda f, c: ((f / _shards(f)[-1]).unlink(),
                                                 ["model.safetensors.index.json"])[1],
    "index misses an existing shard": lambda f, c: _drop_last_shard_from_index(f),
    "unknown file notes.txt": lambda f, c: ((f / "notes.txt").write_text("hello"), ["notes.txt"])[1],
    "subfolder": lambda f, c: ((f / "extra").mkdir(), (f / "extra" / "config.json").write_text("{}"),
                               ["extra/"])[2],
    "subfolder holding a link": lambda f, c: ((f / "extra").mkdir(), (f / "extra" / "s").symlink_to(c.secret),
                                              ["extra/", "extra/s"])[2],
    "fifo named like an allowed file": lambda f, c: ((f / "generation_config.json").unlink(),
                                                     os.mkfifo(f / "generation_config.json"),
                                                     ["generation_config.json"])[2],
    "auto_map pointing at another repository": _foreign_auto_map,
}


@pytest.fixture
def hub():
    from fake_hub import FakeHub

    with FakeHub(lifetime=120) as hub:
        yield hub


@pytest.fixture
def no_child(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("check started the child interpreter on a folder it should have refused")

    monkeypatch.setattr("modeling_visualglm.hub_export.check.subprocess.run", refuse)


def _reported(text: str) -> set[str]:
    return {line.strip().split(": ")[0] for line in text.splitlines() if line.startswith("  ")}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_check_and_push_refuse_a_hostile_folder(attack, folder, tmp_path, hub, no_child, capsys):
    f = shutil.copytree(folder, tmp_path / "hub", symlinks=True)
    ctx = Ctx(tmp_path)
    offenders = ATTACKS[attack](f, ctx)

    scan = scan_folder(f)
    assert set(offenders) <= {p.name for p in scan.problems}, scan.problems
    assert not set(offenders) & {a.name for a in scan.allowed}

    assert check_folder(f) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "not a clean hub folder" in err and "Traceback" not in err
    assert set(offenders) <= _reported(err), err

    with pytest.raises(PushError) as e:
        push_folder(f, "org/attacked", endpoint=hub.endpoint, token="hf_fake_token_for_tests")
    assert set(offenders) <= _reported(str(e.value)) and "nothing was uploaded" in str(e.value)
    assert hub.requests == [] and hub.commits == []  # refused before the first request
    assert SECRET not in err + str(e.value)
    assert not ctx.sentinel.exists()  # no pickle was ever loaded


def test_the_malicious_pickle_is_live(tmp_path):
    """The payloads above really run code when unpickled (so the refusals are what keeps them from running)."""
    for protocol in (0, 4):
        sentinel = tmp_path / f"proof{protocol}"
        (tmp_path / "p.bin").write_bytes(evil_pickle(sentinel, protocol))
        code = "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())"
        subprocess.run([sys.executable, "-I", "-c", code, str(tmp_path / "p.bin")], check=True, timeout=60)
        assert sentinel.read_text() == "pwned"


def test_the_allow_list_accepts_written_folders_and_their_exact_closure(folder, tmp_path):
    """Every file the writer makes is allowed, and the closure computed from a folder's own auto_map and bytes is
    exactly the .py files the writer copied (for each family's entry points)."""
    from tiny_folders import write_tiny_folder

    cogvlm = write_tiny_folder("cogvlm", tmp_path / "cogvlm")
    for f in (folder, cogvlm, write_tiny_folder("minigpt4", tmp_path / "minigpt4")):
        scan = scan_folder(f)
        assert scan.problems == [], scan.problems
        assert [a.name for a in scan.allowed] == sorted(p.name for p in f.iterdir())
        assert {a.name for a in scan.allowed if a.what == "remote code"} == {p.name for p in f.glob("*.py")}
    # the closure comes from the folder's auto_map, not from its file list: another family's file is refused
    copy = shutil.copytree(folder, tmp_path / "copy")
    shutil.copy2(cogvlm / "modeling_cogvlm.py", copy)
    assert [p.name for p in scan_folder(copy).problems] == ["modeling_cogvlm.py"]


def test_push_uploads_exactly_the_allow_listed_files(folder, tmp_path, hub):
    """A clean sharded folder (+ .gitattributes and the local-only markers) through the CLI: the fake Hub receives one
    commit holding exactly the allow-listed files, byte for byte (the card re-pointed at the repo id)."""
    f = shutil.copytree(folder, tmp_path / "hub")
    (f / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    for marker in LOCAL_ONLY - {INCOMPLETE_MARKER}:
        (f / marker).write_text("written by visualglm-convert\n")
    expected = sorted(p.name for p in f.iterdir() if p.name not in LOCAL_ONLY)
    assert len(_shards(f)) > 1 and "model.safetensors.index.json" in expected
    env = dict(os.environ, **hub.env())
    cmd = [sys.executable, "-m", "modeling_visualglm.hub_export.cli", "push", "--folder", str(f), "--repo-id", "org/clean"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [(repo, paths) for repo, _, _, paths in hub.commits] == [("org/clean", expected)]
    assert f"uploading {len(expected)} files to org/clean" in proc.stderr
    remote = hub.files("org/clean")
    for name in expected:
        if name != "README.md":
            assert remote[name] == (f / name).read_bytes(), name
    assert 'model_id = "org/clean"' in remote["README.md"].decode()


def test_push_and_check_cli_refuse_with_one_line_per_file(folder, tmp_path, hub):
    f = shutil.copytree(folder, tmp_path / "hub")
    ctx = Ctx(tmp_path)
    offenders = set()
    for attack in ("link to a secret, unknown name", "malicious pytorch_model.bin (protocol 0)", "stray evil.py",
                   "subfolder holding a link", "closure .py replaced by a link"):
        offenders.update(ATTACKS[attack](f, ctx))
    env = dict(os.environ, **hub.env())
    for command in (["push", "--folder", str(f), "--repo-id", "org/refused"], ["check", "--folder", str(f)]):
        proc = subprocess.run([sys.executable, "-m", "modeling_visualglm.hub_export.cli", *command], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr, proc
        assert _reported(proc.stderr) == offenders, proc.stderr
        assert "qformer.py: symbolic link to " in proc.stderr and "pytorch_model.bin: a pickle file" in proc.stderr
    assert hub.requests == [] and hub.commits == [] and not ctx.sentinel.exists()


def _swap_after_scan(monkeypatch, swap):
    import modeling_visualglm.hub_export.push as push_module

    real = push_module.scan_dir_fd

    def scan_then_swap(dir_fd):
        result = real(dir_fd)
        swap()
        return result

    monkeypatch.setattr(push_module, "scan_dir_fd", scan_then_swap)


@pytest.mark.parametrize("how", ["link", "other file"])
def test_push_refuses_weights_swapped_after_the_check(how, folder, tmp_path, hub, monkeypatch):
    f = shutil.copytree(folder, tmp_path / "hub")
    ctx = Ctx(tmp_path)
    shard = f / _shards(f)[0]
    decoy = ctx.outside / "decoy.safetensors"
    from safetensors.torch import save_file

    save_file({"secret": torch.ones(4)}, str(decoy))  # a valid safetensors file, not the one that was checked

    def swap():
        shard.unlink()
        if how == "link":
            shard.symlink_to(decoy)
        else:
            shutil.copy2(decoy, shard)

    _swap_after_scan(monkeypatch, swap)
    with pytest.raises(PushError, match="changed after the check"):
        push_folder(f, "org/raced", endpoint=hub.endpoint, token="hf_fake_token_for_tests")
    assert hub.requests == [] and hub.commits == []


# huggingface_hub 2.4's plain-LFS upload of in-memory bytes hands them to httpx as data=
@pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")
def test_push_uploads_the_checked_bytes_when_a_config_is_swapped_after_the_check(folder, tmp_path, hub, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # the fake Hub speaks LFS only
    f = shutil.copytree(folder, tmp_path / "hub")
    ctx = Ctx(tmp_path)
    checked = (f / "config.json").read_bytes()
    _swap_after_scan(monkeypatch, lambda: _replace_with_link(f / "config.json", ctx.secret))
    push_folder(f, "org/raced", endpoint=hub.endpoint, token="hf_fake_token_for_tests")
    remote = hub.files("org/raced")
    assert remote["config.json"] == checked
    assert not any(SECRET.encode() in data for data in remote.values())


def test_incomplete_folders_are_still_refused_first(folder, tmp_path, hub, no_child, capsys):
    f = shutil.copytree(folder, tmp_path / "hub")
    (f / INCOMPLETE_MARKER).write_text("no tokenizer\n")
    assert scan_folder(f).problems == []  # the marker is on the allow-list (the writer makes such folders) ...
    assert check_folder(f) == 1 and "INCOMPLETE" in capsys.readouterr().err  # ... but check and push refuse them
    with pytest.raises(PushError, match="incomplete"):
        push_folder(f, "org/incomplete", endpoint=hub.endpoint, token="hf_fake_token_for_tests")
    assert hub.requests == []


# --- property: whatever a folder holds, links, pickles, directories and unknown names are never accepted ---------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SYNTH_CODE = {
    "configuration_x.py": "X = 1\n",
    "modeling_x.py": "from .configuration_x import X\nfrom .helpers import h\n",
    "helpers.py": "def h():\n    return 1\n",
    "tokenization_x.py": "from . import helpers\n",
}
SYNTH_OPTIONAL = {
    "generation_config.json": "{}", "processor_config.json": "{}", "preprocessor_config.json": "{}",
    "special_tokens_map.json": "{}", "added_tokens.json": "{}", "chat_template.jinja": "{{ messages }}",
    "tokenizer.json": '{"model": {}}', "README.md": "---\nlibrary_name: transformers\n---\n# card\n",
    ".gitattributes": "*.safetensors filter=lfs\n", ".visualglm-convert": "marker\n",
}


def _safetensors_bytes(seed: int) -> bytes:
    header = json.dumps({"__metadata__": {"format": "pt", "seed": str(seed)}}).encode()
    return len(header).to_bytes(8, "little") + header


def write_synthetic_clean_folder(root, optional, n_shards, with_tokenizer_code):
    (root / "config.json").write_text(json.dumps(
        {"auto_map": {"AutoConfig": "configuration_x.XConfig", "AutoModel": "modeling_x.XModel"}}))
    code = dict(SYNTH_CODE)
    if with_tokenizer_code:
        tokenizer_config = {"auto_map": {"AutoTokenizer": ["tokenization_x.T", None]}}
        (root / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    else:
        code.pop("tokenization_x.py")
    for name, text in code.items():
        (root / name).write_text(text)
    for name in optional:
        (root / name).write_text(SYNTH_OPTIONAL[name])
    if n_shards == 1:
        (root / "model.safetensors").write_bytes(_safetensors_bytes(0))
    else:
        names = [f"model-{k:05d}-of-{n_shards:05d}.safetensors" for k in range(1, n_shards + 1)]
        for k, name in enumerate(names):
            (root / name).write_bytes(_safetensors_bytes(k))
        (root / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {f"t{k}": name for k, name in enumerate(names)}}))


CLEAN = st.tuples(st.sets(st.sampled_from(sorted(SYNTH_OPTIONAL))), st.integers(1, 4), st.booleans())
NAMES = st.one_of(
    st.sampled_from(sorted(ALLOWED_NAMES) + sorted(SYNTH_CODE) + [
        "model-00001-of-00002.safetensors", "pytorch_model.bin", "evil.py", "notes.txt", "x.pt", "x.pkl",
        "x.ckpt", "x.pth", "__init__.py", ".DS_Store", "model.safetensors.index.json.bak"]),
    st.text(st.sampled_from("abcXYZ019._- é"), min_size=1, max_size=12).filter(lambda s: s not in (".", "..")),
)
KINDS = st.sampled_from(["link_file", "link_dir", "dangling_link", "dir", "pickle", "zip", "text"])


def _is_known_name(name: str) -> bool:
    import re

    return name in ALLOWED_NAMES or name in SYNTH_CODE or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name)


def _plant(root, outside, name, kind, protocol):
    path = root / name
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    if kind == "link_file":
        path.symlink_to(outside / "secret.txt")
    elif kind == "link_dir":
        path.symlink_to(outside, target_is_directory=True)
    elif kind == "dangling_link":
        path.symlink_to(outside / "missing")
    elif kind == "dir":
        path.mkdir()
        (path / "inner.json").write_text("{}")
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"w": [1, 2, 3], "name": name}, protocol=protocol))
    elif kind == "zip":
        import zipfile

        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", pickle.dumps({"w": 1}, protocol=2))
    else:
        path.write_text("hello\n")


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(clean=CLEAN, hostile=st.dictionaries(NAMES, st.tuples(KINDS, st.integers(0, 5)), max_size=5))
def test_property_the_allow_list_never_accepts_links_pickles_dirs_or_unknown_names(clean, hostile):
    import tempfile

    with tempfile.TemporaryDirectory(prefix="allowlist-") as tmp:
        root, outside = Path(tmp) / "hub", Path(tmp) / "outside"
        root.mkdir()
        outside.mkdir()
        (outside / "secret.txt").write_text(SECRET)
        write_synthetic_clean_folder(root, *clean)
        if not hostile:  # a clean folder is always accepted, every file of it
            scan = scan_folder(root)
            assert scan.problems == [], scan.problems
            assert [a.name for a in scan.allowed] == sorted(p.name for p in root.iterdir())
            return
        for name, (kind, protocol) in hostile.items():
            _plant(root, outside, name, kind, protocol)
        scan = scan_folder(root)
        allowed = {a.name for a in scan.allowed}
        reported = {p.name for p in scan.problems}
        for name, (kind, _) in hostile.items():
            if kind == "text" and _is_known_name(name):
                continue  # harmless text under an allowed name may be fine (a README) or not (invalid JSON)
            assert name not in allowed, (name, kind)
            assert {name, f"{name}/"} & reported or any(r == ascii(name) or r == f"{ascii(name)}/" for r in reported), \
                (name, kind, scan.problems)
        for a in scan.allowed:  # whatever is accepted is a regular file under an allowed name, never a pickle
            path = root / a.name
            assert path.is_file() and not path.is_symlink() and _is_known_name(a.name), a
            assert not a.name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))
        assert not any(SECRET.encode() in (a.data or b"") for a in scan.allowed)
