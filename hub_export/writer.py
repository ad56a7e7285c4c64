"""The hub-folder writer every converter uses (CONTRACTS §2).

``write_hub_folder`` fills an (empty, usually temporary) folder with:

- safetensors weights, shard by shard, from the converter's stream (``hub_export.weights``);
- ``config.json`` with ``architectures`` and an ``auto_map`` for AutoConfig, AutoModel,
  AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor and AutoImageProcessor;
- the remote-code files: the relative-import closure of the model, config, tokenizer and processor
  modules (``hub_export.code``), nothing else;
- tokenizer files (``ice_text.model``, ``tokenizer_config.json`` with its own ``auto_map``),
  ``processor_config.json`` (nested image processor with its ``auto_map``), ``chat_template.jinja``;
- ``generation_config.json`` with the stop/pad/bos ids and neutral defaults (``NEUTRAL_GENERATION``);
- ``README.md``, the model card.

Without a tokenizer it still writes weights, config and code, plus :data:`INCOMPLETE_MARKER`, which makes
``visualglm-export check`` (and ``push``) fail until the conversion is re-run with a tokenizer.

``staged_output`` builds a folder next to its final place and renames it there only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .card import render_card
from .code import copy_code
from .families import NEUTRAL_GENERATION, Family, package_dir
from .weights import write_safetensors_shards

from . import INCOMPLETE_MARKER


@dataclass
class FolderResult:
    folder: Path
    complete: bool
    weight_files: list[str]
    code_files: list[str]
    other_files: list[str] = field(default_factory=list)
    total_size: int = 0
    total_parameters: int = 0


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def write_config(folder: Path, family: Family, config, dtype: torch.dtype) -> None:
    config.architectures = [family.model.name]
    config.auto_map = family.config_auto_map()
    config.dtype = _dtype_name(dtype)
    config.to_json_file(str(folder / "config.json"), use_diff=False)


def _patch_json(path: Path, update) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    update(data)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def write_tokenizer_and_processor(folder: Path, family: Family, tokenizer, config) -> list[str]:
    """Save tokenizer (+ processor) data files; code files come from the closure, not from save_pretrained."""
    written = []
    with tempfile.TemporaryDirectory(prefix="hub-export-") as scratch:
        scratch = Path(scratch)
        if family.processor is not None:
            image_processor = family.image_processor.load()(**family.image_processor_kwargs(config))
            processor = family.processor.load()(
                image_processor=image_processor, tokenizer=tokenizer, **family.processor_kwargs(config)
            )
            processor.save_pretrained(str(scratch))
        else:
            tokenizer.save_pretrained(str(scratch))
        if family.image_processor is not None:
            # preprocessor_config.json too: transformers 4.57.x reads the image processor only from there (5.x
            # nests it in processor_config.json and still reads the old file)
            image_processor = family.image_processor.load()(**family.image_processor_kwargs(config))
            image_processor.save_pretrained(str(scratch))
        for path in sorted(scratch.iterdir()):
            if path.is_file() and path.suffix != ".py":
                shutil.copy2(path, folder / path.name)
                written.append(path.name)

    tok_cfg = folder / "tokenizer_config.json"

    def tok_update(data):
        auto = data.setdefault("auto_map", {})
        if family.tokenizer is not None:  # None: a tokenizer class transformers ships (no remote code)
            auto["AutoTokenizer"] = [family.tokenizer.auto_map_value, None]
        if family.processor is not None:
            auto["AutoProcessor"] = family.processor.auto_map_value
        data.pop("name_or_path", None)  # the scratch folder's path means nothing in the hub folder

    _patch_json(tok_cfg, tok_update)
    proc_cfg = folder / "processor_config.json"
    if proc_cfg.exists():
        def proc_update(data):
            data.setdefault("auto_map", {})["AutoProcessor"] = family.processor.auto_map_value
            image = data.get("image_processor")
            if isinstance(image, dict):
                image.setdefault("auto_map", {})["AutoImageProcessor"] = family.image_processor.auto_map_value

        _patch_json(proc_cfg, proc_update)
    image_cfg = folder / "preprocessor_config.json"
    if image_cfg.exists():
        _patch_json(image_cfg, lambda data: data.setdefault("auto_map", {}).__setitem__(
            "AutoImageProcessor", family.image_processor.auto_map_value))
    return written


def write_generation_config(folder: Path, family: Family, config, tokenizer) -> None:
    from transformers import GenerationConfig

    text = getattr(config, "text_config", config)
    eos = tokenizer.eos_token_id if tokenizer is not None else text.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer is not None else text.pad_token_id
    if pad is None:
        pad = text.pad_token_id if text.pad_token_id is not None else eos
    GenerationConfig(**NEUTRAL_GENERATION, bos_token_id=text.bos_token_id, eos_token_id=eos,
                     pad_token_id=pad).save_pretrained(str(folder))


def write_hub_folder(
    folder: str | Path,
    *,
    family: Family,
    config,
    weight_entries: list,
    dtype: torch.dtype,
    tokenizer=None,
    max_shard_size: int | str = "5GB",
    model_id: str | None = None,
    source_note: str = "",
    progress: bool = True,
) -> FolderResult:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # stock transformers tokenizers (CogVLM's Llama ones) have no image token: the config alone defines it
    if tokenizer is not None and getattr(config, "image_token_id", None) != getattr(
        tokenizer, "image_token_id", getattr(config, "image_token_id", None)
    ):
        raise ValueError(
            f"config.image_token_id={config.image_token_id} but the tokenizer's <image> id is {tokenizer.image_token_id}"
        )
    weights = write_safetensors_shards(weight_entries, folder, max_shard_size=max_shard_size, progress=progress)
    write_config(folder, family, config, dtype)
    code_files = copy_code(package_dir(), family.code_modules(), folder)
    other = ["config.json"]
    complete = tokenizer is not None
    if complete:
        other += write_tokenizer_and_processor(folder, family, tokenizer, config)
    write_generation_config(folder, family, config, tokenizer)
    other.append("generation_config.json")
    if not complete:
        (folder / INCOMPLETE_MARKER).write_text(
            "This folder is incomplete: it has weights, config.json and the model code but no tokenizer\n"
            "files and no processor files. Re-run visualglm-convert with --tokenizer PATH\n"
            f"({family.tokenizer_hint}). `visualglm-export check` and `push` refuse this folder until then.\n"
        )
        other.append(INCOMPLETE_MARKER)
    files_note = (
        f"Files: {len(weights['files'])} safetensors file(s), {weights['total_parameters']:,} parameters "
        f"({_dtype_name(dtype)}); remote code: {', '.join(code_files)}."
    )
    card = render_card(family, model_id=model_id or str(folder.resolve()), source_note=source_note,
                       files_note=files_note, complete=complete, config=config)
    (folder / "README.md").write_text(card, encoding="utf-8")
    other.append("README.md")
    return FolderResult(folder, complete, weights["files"], code_files, sorted(set(other)),
                        weights["total_size"], weights["total_parameters"])


@contextlib.contextmanager
def staged_output(out: str | Path, force: bool = False):
    """Yield a fresh temporary folder beside ``out``; on success rename it to ``out``.

    The folder lives in ``out``'s parent (same file system, so the final ``rename`` is atomic). An existing
    ``out`` must be explicitly allowed with ``force``; it is moved aside only after the new folder is complete
    and deleted after the swap. On any error the temporary folder is removed and ``out`` is untouched.
    """
    out = Path(out).absolute()
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the final folder gets normal permissions
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old / out.name, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
