"""Plain transformers folders: what ``llama-original`` and ``fastchat-delta`` write (CONTRACTS §1).

A plain folder loads with transformers' own classes (``LlamaForCausalLM.from_pretrained(DIR)``), no remote
code, so the hub writer (``hub_export.writer``: ``auto_map``, the remote-code closure, processor, model
card) does not apply. It holds:

- safetensors weights, shard by shard from the plan's stream (``hub_export.weights``, shared with the
  hub writer): ``model.safetensors``, or ``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json``;
- ``config.json`` (the config's own ``save_pretrained``, with ``architectures`` and ``dtype``);
- ``generation_config.json``;
- the tokenizer: its ``save_pretrained`` files plus verbatim copies (the SentencePiece model, which
  ``tokenizer.json`` cannot replace for code that tokenizes with SentencePiece directly).

Without a tokenizer the weights and configs are still written and the result says it is incomplete.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..hub_export.weights import write_safetensors_shards


@dataclass
class TokenizerFiles:
    """A transformers tokenizer to ``save_pretrained`` and files to copy next to its output unchanged."""

    tokenizer: object
    copy: tuple[Path, ...] = ()

    def save(self, folder: Path) -> list[str]:
        written = []
        with tempfile.TemporaryDirectory(prefix="plain-tokenizer-") as scratch:
            self.tokenizer.save_pretrained(scratch)
            for path in sorted(Path(scratch).iterdir()):
                if path.is_file():
                    shutil.copy2(path, folder / path.name)
                    written.append(path.name)
        for path in self.copy:
            if not (folder / path.name).exists() or not (folder / path.name).samefile(path):
                shutil.copy2(path, folder / path.name)
            written.append(path.name)
        return sorted(set(written))


def ids_generation_config(config):
    """Token ids only, as transformers' ``save_pretrained`` writes for a model without sampling defaults."""
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                            pad_token_id=config.pad_token_id)


@dataclass
class PlainFolderResult:
    folder: Path
    complete: bool
    weight_files: list[str]
    other_files: list[str] = field(default_factory=list)
    total_size: int = 0
    total_parameters: int = 0


def write_plain_folder(
    folder: str | Path,
    *,
    config,
    architecture: str,
    weight_entries: list,
    dtype: torch.dtype,
    tokenizer: TokenizerFiles | None,
    generation_config,
    max_shard_size: int | str = "5GB",
    progress: bool = True,
) -> PlainFolderResult:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = write_safetensors_shards(weight_entries, folder, max_shard_size=max_shard_size, progress=progress)
    config.architectures = [architecture]
    config.dtype = str(dtype).replace("torch.", "")
    config.save_pretrained(str(folder))
    generation_config.save_pretrained(str(folder))
    other = ["config.json", "generation_config.json"]
    if tokenizer is not None:
        other += tokenizer.save(folder)
    return PlainFolderResult(folder, tokenizer is not None, weights["files"], sorted(set(other)),
                             weights["total_size"], weights["total_parameters"])
