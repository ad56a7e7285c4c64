"""Shard-by-shard safetensors writing from a stream of tensor producers.

Input: ``entries`` = ``[(names, nbytes, producer), ...]`` where ``producer()`` returns ``{name: tensor}`` for
those names (a converter's ``Plan.weight_entries()``). Entries are packed greedily, in order, into shards of
at most ``max_shard_size`` bytes (an entry larger than that gets a shard of its own, as in transformers).
Only one shard's tensors are alive at a time. The layout is transformers': ``model.safetensors`` when one
shard suffices, else ``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Callable, Iterable

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def parse_size(text: str | int) -> int:
    """``"5GB"`` → 5_000_000_000, ``"500MiB"`` → 524_288_000, ``"1234"`` → 1234 (transformers' units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]
    if value < 1:
        raise ValueError(f"size must be at least 1 byte: {text!r}")
    return int(value)


def plan_shards(entries: list, max_shard_size: int) -> list[list]:
    shards, current, size = [], [], 0
    for entry in entries:
        nbytes = entry[1]
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_safetensors_shards(
    entries: Iterable[tuple[tuple[str, ...], int, Callable[[], dict]]],
    folder: str | Path,
    max_shard_size: int | str = "5GB",
    progress: bool = True,
) -> dict:
    """Write the shards (+ index) into ``folder``; returns ``{"files": [...], "total_size", "total_parameters"}``."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    folder = Path(folder)
    entries = list(entries)
    shards = plan_shards(entries, parse_size(max_shard_size))
    n = len(shards)
    names = [SAFE_WEIGHTS_NAME] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    total = sum(e[1] for e in entries)
    weight_map: dict[str, str] = {}
    total_params = 0
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing weights", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    try:
        for shard, fname in zip(shards, names):
            tensors: dict = {}
            produced = t = None
            for entry_names, nbytes, producer in shard:
                produced = producer()
                if set(produced) != set(entry_names):
                    raise RuntimeError(f"producer for {entry_names} returned {sorted(produced)}")
                tensors.update(produced)
                bar.update(nbytes)
            for k, t in tensors.items():
                weight_map[k] = fname
                total_params += t.numel()
            save_file(tensors, str(folder / fname), metadata={"format": "pt"})
            os.chmod(folder / fname, 0o666 & ~_umask())  # safetensors creates files private (0600)
            # drop every reference before the next shard is produced: peak memory stays ~ one shard
            del tensors, produced, t
    finally:
        bar.close()
    if n > 1:
        index = {"metadata": {"total_size": total, "total_parameters": total_params},
                 "weight_map": dict(sorted(weight_map.items()))}
        (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return {"files": names, "total_size": total, "total_parameters": total_params}
