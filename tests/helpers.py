"""Small helpers shared by the tests."""

import copy
import functools
import math
import subprocess
import sys
from pathlib import Path
import os

import pytest
import sentencepiece as spm
import torch
from torch.utils._python_dispatch import TorchDispatchMode


def enable_checkpointing(model):
    """transformers 5.2x renames gradient_checkpointing_enable; support both (the GPU image has 5.17)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


# --- seeded random weights and errors (every parity test's building blocks) -----------------------------------


@torch.no_grad()
def randomize_scaled_(module: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Every parameter (norm weights/biases, CLS, positions, queries too) ← randn·scale, seeded, in name order."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(module.named_parameters()):
        p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module


@torch.no_grad()
def randomize_fan_in_(model: torch.nn.Module, seed: int, *, is_norm, embed_key: str, rest_scale: float):
    """Every parameter random: norms N(0, 1) (both signs), matrices ~ 1/sqrt(fan_in) except embeddings (N(0, 1)),
    everything else (biases) ``rest_scale``·N(0, 1); ``is_norm(name)`` says which parameters are norm weights."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if is_norm(name):
            param.copy_(noise)
        elif param.ndim == 2 and embed_key not in name:
            param.copy_(noise / math.sqrt(param.shape[1]))
        elif param.ndim == 2:
            param.copy_(noise)
        else:
            param.copy_(rest_scale * noise)
    return model


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| (CONTRACTS §5's relative error)."""
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def seeded_randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- behaviour every encoder tower shares (ViT, EVA2-CLIP, Q-Former) -------------------------------------------


def assert_batch_matches_single(model, x: torch.Tensor, key: str) -> None:
    """A batch gives what its rows give one at a time (``model(**{key: x})``)."""
    with torch.no_grad():
        batched = model(**{key: x}).last_hidden_state
        singles = torch.cat([model(**{key: x[i : i + 1]}).last_hidden_state for i in range(len(x))])
    assert rel_err(batched, singles) <= 1e-5


def assert_checkpointing_matches_plain_backward(model, x: torch.Tensor, key: str, input_grad: bool = False) -> None:
    """Gradient checkpointing changes no gradient (of the parameters, and of the input when ``input_grad``)."""
    results = []
    for checkpointing in (False, True):
        m = copy.deepcopy(model).train()
        if checkpointing:
            enable_checkpointing(m)
            assert all(layer.gradient_checkpointing for layer in m.layers)
        inp = x.clone().requires_grad_(input_grad)
        m(**{key: inp}).last_hidden_state.square().mean().backward()
        results.append(({n: p.grad for n, p in m.named_parameters()}, inp.grad))
    (plain, plain_x), (ckpt, ckpt_x) = results
    assert all(g is not None for g in ckpt.values())
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    if input_grad:
        torch.testing.assert_close(ckpt_x, plain_x, rtol=1e-5, atol=1e-7)


SAT_VIT_RENAMES = {
    "mixins.patch_embedding.proj.weight": "embeddings.patch_embedding.weight",
    "mixins.patch_embedding.proj.bias": "embeddings.patch_embedding.bias",
    "transformer.word_embeddings.weight": "embeddings.cls_embedding",
    "transformer.position_embeddings.weight": "embeddings.position_embedding",
}


def sat_vit_to_ours(sat_sd: dict, extra_renames: dict | None = None) -> dict:
    """SAT ViT keys (``mixins.eva.model.vit.*`` / ``mixins.eva.vit_model.*`` without the prefix) → ours, written
    from SAT's module names by hand (the converter's rules are not used here); every key must map."""
    renames = {**SAT_VIT_RENAMES, **(extra_renames or {})}
    out = {}
    for key, value in sat_sd.items():
        if key in renames:
            out[renames[key]] = value
        elif key.startswith("transformer.layers."):
            out[key[len("transformer.") :]] = value
        else:
            raise AssertionError(f"unmapped SAT key {key}")
    return out


# --- host syncs -----------------------------------------------------------------------------------------------


class SyncCounter(TorchDispatchMode):
    """Counts device → host reads (``.item()``/``bool()``/``int()`` go through ``_local_scalar_dense``) and
    data-dependent shapes (``nonzero``); with ``count_tolist``, ``tolist()`` too (on CPU it reads memory without
    dispatching an op, so it is counted by patching)."""

    def __init__(self, count_tolist: bool = False):
        super().__init__()
        self.syncs = []
        self.count_tolist = count_tolist

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        if self.count_tolist:
            self._tolist = torch.Tensor.tolist
            counter = self

            def tolist(tensor):
                counter.syncs.append("tolist")
                return counter._tolist(tensor)

            torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        if self.count_tolist:
            torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


# --- the tiny ChatGLM tokenizer (fixtures: import them into a test module to use them) ---------------------------


@pytest.fixture(scope="module")
def sp(tiny_tokenizer_dir):
    """The tiny ice_text SentencePiece model itself."""
    return spm.SentencePieceProcessor(model_file=os.path.join(tiny_tokenizer_dir, "ice_text.model"))


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


# --- CLI round trips shared by the conversion tests ------------------------------------------------------------


def run_parallel(commands: dict, timeout=300, python_for=lambda command: [sys.executable]) -> dict:
    """Run several CLI processes at once (each spends most of its time importing torch/transformers)."""
    procs = {k: subprocess.Popen([*python_for(c), *map(str, c)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
             for k, c in commands.items()}
    results = {}
    for k, p in procs.items():
        out, err = p.communicate(timeout=timeout)
        results[k] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return results


def convert_in_process(argv: list, capsys) -> tuple[int, str, str]:
    """``visualglm-convert ARGV --no-progress`` in this process: (exit code, stdout, stderr)."""
    from modeling_visualglm.conversion.cli import main as convert_main

    rc = convert_main([*map(str, argv), "--no-progress"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def load_safetensors_folder(folder: Path) -> dict:
    """Every tensor of a folder's ``*.safetensors`` shards, by name."""
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


@functools.lru_cache(maxsize=None)
def loaded_model(folder: str):
    """(model, tokenizer) of a hub folder through the serving loader, once per folder and process."""
    from modeling_visualglm.tools.serving import load_model

    return load_model(folder, device="cpu")


def edit_sat_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of the SAT folder ``src`` at ``dst`` whose rank-0 state dict went through ``edit`` (in place)."""
    import shutil

    shutil.copytree(src, dst)
    ckpt = dst / "1" / "mp_rank_00_model_states.pt"
    state = torch.load(ckpt, weights_only=True)
    edit(state["module"])
    torch.save(state, ckpt)
    return dst


def assert_conversion_failed(rc, err, out_dir: Path, *needles) -> None:
    """Exit 1, every needle in the message, nothing at ``out_dir`` and no temp folder left beside it."""
    assert rc == 1, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.tmp-")]


def assert_checks_pass(folders: dict, *needles) -> None:
    """``visualglm-export check`` on each folder (in parallel): passed, through the folder's own code."""
    procs = run_parallel({name: ["-m", "modeling_visualglm.hub_export.cli", "check", "--folder", folder]
                          for name, folder in folders.items()})
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}: {proc.stdout}\n{proc.stderr}"
        assert "check passed" in proc.stdout and "transformers_modules" in proc.stdout  # not our package
        for needle in needles:
            assert needle in proc.stdout, f"{name}: {needle!r} not in:\n{proc.stdout}"
