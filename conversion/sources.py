"""Reading source checkpoints: the one layer every format reads its files through.

- tensors: a ``TensorSource`` maps tensor names to ``(shape, dtype)`` without reading data, and hands out single
tensors on demand. PyTorch files are opened with ``torch.load(mmap=True, weights_only=True)``: the state dict
is a set of views onto the file, so only the tensors being converted are paged in (file-backed pages, not
anonymous memory). safetensors files are read through ``safe_open``.

Pickles are never executed: ``weights_only=True`` refuses every global outside PyTorch's allow-list plus
the few data-only globals that SAT / DeepSpeed checkpoints contain (see :data:`SAT_SAFE_GLOBALS`).
- JSON files (configs, ``params.json``, shard indexes): :func:`read_json_object`, one error per way a file can
  be unreadable; their fields are then read through ``conversion.validate.Fields``.
- SAT folders (``latest``, ``<iter>/mp_rank_00_model_states.pt``, ``model_config.json``): :func:`open_sat_folder`.
- tokenizers: :func:`find_tokenizer` (``--tokenizer`` or the source folder's) and :func:`load_tokenizer_folder`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConversionError
from .validate import Fields, json_type, raise_if


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def _sat_safe_globals() -> list:
    """Data-only globals SAT checkpoints may hold besides tensors and containers.

    - SAT's inference save (``sat/training/model_io.py: save_checkpoint``, mode "inference") writes only
      ``{'module': state_dict}``: nothing beyond PyTorch's defaults.
    - SAT's DeepSpeed saves (fine-tuning, ``save_ds_checkpoint``) add the client state: ``random.getstate()``
      (tuples of ints), ``torch.get_rng_state()`` (a tensor) and ``np.random.get_state()``, a tuple holding a
      numpy ``uint32`` array, which needs numpy's array reconstruction globals. DeepSpeed's own entries
      (``param_shapes`` of ``torch.Size``, ``ds_config`` dicts, ``ds_version`` strings, sets) are covered by
      PyTorch's defaults. ``argparse.Namespace`` is deliberately *not* allowed: SAT never pickles its args.
    The numpy names are registered under both the numpy 1.x (``numpy.core``) and 2.x (``numpy._core``)
    module paths, since the pickle records the path of the numpy that wrote it.
    """
    allowed: list = []
    try:
        import numpy as np
    except ImportError:  # numpy-free installs still read inference checkpoints
        return allowed
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    allowed += [
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        (_reconstruct, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
    ]
    for scalar in (np.uint32, np.int64, np.float64):
        dtype_cls = type(np.dtype(scalar))
        allowed.append((dtype_cls, f"numpy.dtypes.{dtype_cls.__name__}"))
    return allowed


SAT_SAFE_GLOBALS = _sat_safe_globals()
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_GOT = re.compile(r"but got (<class '[\w.]+'>|[\w.]+)")


def verify_zip_members(path: Path) -> None:
    """Check a ``torch.save`` zip before it is memory-mapped: every member stored uncompressed, and the data of
    every member against the CRC-32 its zip entry records (one sequential read of the file).

    ``torch.load`` checks neither: a memory-mapped load returns flipped bytes as a different weight, and a
    re-zipped (deflate) file's compressed bytes as garbage. Members with a recorded CRC of 0 (``torch.save``
    with ``torch.utils.serialization.config.save.compute_crc32 = False``) cannot be checked and are skipped.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            for info in infos:
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ConversionError(
                        f"{path}: member {info.filename} is compressed (zip method {info.compress_type}); torch.save "
                        "stores every member uncompressed and a memory-mapped load would read the compressed bytes "
                        "as weights. Re-save the checkpoint with torch.save")
            for info in infos:
                if info.CRC == 0:
                    continue
                with zf.open(info) as member:  # zipfile compares the CRC-32 when the member is read to its end
                    while member.read(1 << 24):
                        pass
    except zipfile.BadZipFile as e:
        text = str(e)
        if "CRC" in text:
            raise ConversionError(f"{path}: corrupt: {text} (the data differs from what was saved: a damaged copy "
                                  "or download; fetch it again)") from None
        raise ConversionError(f"{path}: truncated or corrupt (an incomplete download?): {text[:200]}") from None
    except (EOFError, ValueError, NotImplementedError) as e:  # zipfile's other complaints about a damaged file
        raise ConversionError(f"{path}: truncated or corrupt (an incomplete download?): "
                              f"{type(e).__name__}: {str(e)[:200]}") from None


def load_torch_file(path: str | os.PathLike, extra_safe_globals: list | None = None):
    """``torch.load`` a checkpoint memory-mapped, refusing any code in the pickle.

    Zip checkpoints are verified first (:func:`verify_zip_members`: CRC-32 of every member). Raises
    ``ConversionError`` with a specific message for missing, truncated, corrupt, non-PyTorch and unsafe files.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    allowed = SAT_SAFE_GLOBALS + list(extra_safe_globals or [])
    try:
        is_zip = zipfile.is_zipfile(path)
        with open(path, "rb") as f:
            # torch.save's format is a zip archive; one that starts like a zip but has no central directory
            # (which sits at the end) was cut short
            looks_zip = f.read(4) == b"PK\x03\x04"
    except OSError as e:
        raise ConversionError(f"{path}: cannot read it ({e.strerror or e})") from None
    if is_zip:
        verify_zip_members(path)
    try:
        with torch.serialization.safe_globals(allowed):
            # files of torch < 1.6 (legacy format) cannot be memory-mapped; they are read into memory
            return torch.load(path, map_location="cpu", mmap=is_zip, weights_only=True)
    except Exception as e:  # torch/pickle raise many types for bad files; classify them for the user
        text = str(e)
        found = _GLOBAL.search(text)
        refused = "Weights only load failed" in text or "WeightsUnpickler error" in text
        if found or refused or (isinstance(e, pickle.UnpicklingError) and "unsupported" in text.lower()):
            got = _GOT.search(text)
            what = (f"the global {found.group(1)}" if found else f"{got.group(1)}" if got
                    else "an object outside the allow-list")
            raise ConversionError(
                f"{path}: refusing to load: it contains pickled code/objects that weights_only loading refuses "
                f"({what}, which could run code or is not plain data). Only tensors, containers and the "
                "data-only globals of SAT/DeepSpeed checkpoints are accepted (torch.load weights_only=True). "
                "Re-save the checkpoint as a plain state dict if you trust it."
            ) from None
        msg = f"{type(e).__name__}: " + text.strip().split("\n")[-1][:300]
        if is_zip or looks_zip:
            hint = "truncated or corrupt (an incomplete download?)"
        elif path.stat().st_size < 1024:
            hint = "not a PyTorch checkpoint (too small)"
        else:
            hint = "not a readable PyTorch checkpoint (truncated, corrupt, or another format)"
        raise ConversionError(f"{path}: {hint}: {msg}") from None


class TensorSource:
    """Name → tensor access over one or more files. Subclasses fill ``self._infos`` and implement ``_load``."""

    def __init__(self, description: str):
        self.description = description
        self._infos: dict[str, TensorInfo] = {}

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def __contains__(self, key: str) -> bool:
        return key in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    def get(self, key: str) -> torch.Tensor:
        return self._load(key)

    def _load(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self):
        pass


@contextmanager
def closed_on_error(source: TensorSource):
    """Close ``source`` (its memory maps and file handles) when the block raises: a format that fails after
    opening its weights."""
    try:
        yield source
    except BaseException:
        source.close()
        raise


def _check_state_dict(path, sd) -> dict:
    if not isinstance(sd, dict):
        raise ConversionError(f"{path}: expected a dict of tensors, found {type(sd).__name__}")
    problems = []
    bad_keys = [k for k in sd if not isinstance(k, str)]
    if bad_keys:
        problems.append(f"keys that are not strings: {bad_keys[:10]!r}{' ...' if len(bad_keys) > 10 else ''}")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        problems.append(f"entries that are not tensors: {bad[:10]}{' ...' if len(bad) > 10 else ''}")
    odd = [f"{k} ({_odd_tensor(v)})" for k, v in sd.items() if isinstance(v, torch.Tensor) and _odd_tensor(v)]
    if odd:
        problems.append(f"tensors that are not dense CPU tensors: {odd[:10]}{' ...' if len(odd) > 10 else ''}")
    if len(problems) == 1:
        raise ConversionError(f"{path}: {problems[0]}")
    if problems:
        raise ConversionError(problems, header=f"cannot read {path}")
    return sd


def _odd_tensor(t: torch.Tensor) -> str:
    """Why ``t`` cannot be converted as a plain weight ('' if it can)."""
    if t.layout != torch.strided:
        return f"layout {t.layout}"
    if t.is_quantized:
        return "quantized"
    if t.device.type != "cpu":
        return f"device {t.device.type}"
    return ""


class StateDictSource(TensorSource):
    """Tensors of in-memory (usually memory-mapped) state dicts, each tagged with the file it came from."""

    def __init__(self, description: str):
        super().__init__(description)
        self._tensors: dict[str, torch.Tensor] = {}
        self._files: dict[str, str] = {}

    def add(self, path, state_dict: dict, problems: list[str]):
        for k, v in _check_state_dict(path, state_dict).items():
            if k in self._tensors:
                problems.append(f"tensor {k!r} appears in both {self._files[k]} and {path}")
                continue
            self._tensors[k] = v
            self._files[k] = str(path)
            self._infos[k] = TensorInfo(tuple(v.shape), v.dtype)

    def file_of(self, key: str) -> str:
        return self._files[key]

    def _load(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def close(self):
        self._tensors.clear()


def torch_file_source(path: str | os.PathLike, subkey: str | None = None) -> StateDictSource:
    """One ``.pt``/``.bin`` file; ``subkey`` selects a nested state dict (SAT: ``'module'``)."""
    obj = load_torch_file(path)
    if subkey is not None:
        if not isinstance(obj, dict) or subkey not in obj:
            found = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
            raise ConversionError(f"{path}: expected a dict with key {subkey!r}, found {found}")
        obj = obj[subkey]
    src = StateDictSource(str(path))
    problems: list[str] = []
    src.add(path, obj, problems)
    if problems:
        raise ConversionError(problems, header=f"cannot read {path}")
    return src


# --- JSON files ---------------------------------------------------------------------------------------------

def read_json_object(path: Path, *, required: bool = True, what: str = "") -> dict | None:
    """A JSON object from ``path``: None for a missing optional file; ConversionError for anything else
    (not UTF-8, invalid JSON, not an object, unreadable)."""
    path = Path(path)
    if not path.is_file():
        if not required:
            return None
        raise ConversionError(f"{path} not found" + (f" ({what})" if what else ""))
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConversionError(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(raw) > 64 << 20:
        raise ConversionError(f"{path}: {len(raw):,} bytes is not a config file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConversionError(f"{path}: not UTF-8 text (byte {e.start}): not a JSON config") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ConversionError(f"{path}: invalid JSON ({str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object, found {json_type(data)}")
    return data


# --- SAT folders --------------------------------------------------------------------------------------------

def read_latest(src: Path) -> str:
    """SAT's ``latest`` file: an iteration number or ``release`` (the folder holding the weights)."""
    latest = src / "latest"
    if not latest.is_file():
        raise ConversionError(f"{src}: no 'latest' file: not a SAT checkpoint folder "
                              "(expected latest, <iter>/mp_rank_00_model_states.pt, model_config.json)")
    try:
        raw = latest.read_bytes()[:256]
    except OSError as e:
        raise ConversionError(f"{latest}: cannot read it ({e.strerror or e})") from None
    try:
        tag = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConversionError(f"{latest}: not text (binary data {raw[:16]!r}…); SAT writes an iteration "
                              "number or 'release' there") from None
    if not (tag.isdigit() or tag == "release"):
        raise ConversionError(f"{latest}: expected an iteration number or 'release', found {tag[:40]!r}")
    return tag


@dataclass(frozen=True)
class SatFolder:
    """A SAT checkpoint folder, opened: its ``model_config.json`` read, its weights file located (not yet read)."""

    folder: Path
    tag: str  # the iteration ``latest`` names (or ``release``)
    args: dict  # model_config.json: SAT's argparse namespace
    where: str  # model_config.json's path, for messages
    model_class: str

    @property
    def checkpoint(self) -> Path:
        return self.folder / self.tag / "mp_rank_00_model_states.pt"

    def describe(self) -> str:
        return f"SAT checkpoint {self.checkpoint} (iteration {self.tag}, model_class {self.model_class})"


def open_sat_folder(src: Path, *, family: str, merge_hint: str) -> SatFolder:
    """``latest`` and ``model_config.json`` of a SAT folder (SwissArmyTransformer ``save_checkpoint``), checked to be
    a single-rank checkpoint of a ``family`` model class (``model_class`` defaults to ``{family}Model``).

    ``merge_hint`` says how to merge model-parallel ranks, for the message refusing them.
    """
    tag = read_latest(src)
    where = f"{src}/model_config.json"
    args = read_json_object(src / "model_config.json")
    problems: list[str] = []
    top = Fields(args, where, problems)
    mp = top.int("model_parallel_size", default=1)
    model_class = top.str("model_class", default=f"{family}Model")
    raise_if(problems, f"cannot read {where}")
    if mp != 1:
        raise ConversionError(f"{src}: model_parallel_size={mp}; merge the model-parallel ranks first ({merge_hint})")
    if family not in model_class:
        raise ConversionError(f"{where}: model_class {model_class!r} is not a {family} model")
    return SatFolder(Path(src), tag, args, where, model_class)


# --- sharded weights ----------------------------------------------------------------------------------------

def read_index(index_path: Path) -> dict[str, str]:
    """``weight_map`` of a shard index: tensor name → a shard file name inside the index's folder."""
    try:
        index = read_json_object(index_path)
    except ConversionError as e:
        raise ConversionError(f"not a valid shard index: {e}") from None
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise ConversionError(f"{index_path}: 'weight_map' must be an object, got {json_type(weight_map)}")
    problems = []
    for k, v in weight_map.items():
        if not isinstance(v, str):
            problems.append(f"weight_map[{k!r}] must be a file name (a string), got {v!r} ({json_type(v)})")
        elif v in ("", ".", "..") or Path(v).name != v or "\\" in v or "\0" in v:
            problems.append(f"weight_map[{k!r}] = {v!r} is not a file name in {index_path.parent} "
                            "(shards must sit beside the index)")
    if problems:
        raise ConversionError(problems, header=f"{index_path} is not a valid shard index")
    return weight_map


def _shard_files(folder: Path, index_name: str, single_name: str) -> tuple[dict | None, list[str]]:
    """(the index's weight map or None, the shard file names) of a sharded-or-single weights layout."""
    index_path = folder / index_name
    if index_path.is_file():
        weight_map = read_index(index_path)
        return weight_map, sorted(set(weight_map.values()))
    if (folder / single_name).is_file():
        return None, [single_name]
    raise ConversionError(f"{folder}: neither {index_name} nor {single_name} found")


def _index_problems(weight_map: dict, src: TensorSource, shard_of, index_name: str) -> list[str]:
    """Where a shard index disagrees with the shards' contents (``shard_of(key)``: the file name holding it)."""
    problems = []
    for k, shard in weight_map.items():
        if k not in src:
            problems.append(f"{index_name} maps {k!r} to {shard}, which does not contain it")
        elif shard_of(k) != shard:
            problems.append(f"{index_name} maps {k!r} to {shard}, but it is in {shard_of(k)}")
    return problems + [f"{shard_of(k)} holds {k!r}, which {index_name} does not list"
                       for k in src.keys() if k not in weight_map]


def sharded_torch_source(folder: Path, index_name: str, single_name: str) -> StateDictSource:
    """``pytorch_model-0000k-of-0000N.bin`` shards listed in ``index_name``, or the single ``single_name``.

    Every shard is opened memory-mapped; the index must agree with the shards' contents.
    """
    folder = Path(folder)
    weight_map, shards = _shard_files(folder, index_name, single_name)
    src = StateDictSource(str(folder))
    problems: list[str] = []
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            problems.append(f"{index_name} lists {shard}, which is missing")
            continue
        try:
            src.add(path, load_torch_file(path), problems)
        except ConversionError as e:
            problems.extend(e.problems)
    if weight_map is not None and not problems:
        problems = _index_problems(weight_map, src, lambda k: Path(src.file_of(k)).name, index_name)
    if problems:
        raise ConversionError(problems, header=f"cannot read the checkpoint in {folder}")
    return src


def _safetensors_dtypes() -> dict:
    """Every dtype name of the safetensors format → the torch dtype (None where this torch has none)."""
    names = {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
        "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2": "float8_e5m2",
        "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
        "C64": "complex64", "F4": None, "F6_E2M3": None, "F6_E3M2": None,
    }
    return {k: getattr(torch, v, None) if v else None for k, v in names.items()}


# read all; the dtype policy (conversion.apply) decides which ones a model takes
_ST_DTYPES = _safetensors_dtypes()


class SafetensorsSource(TensorSource):
    """One or more ``.safetensors`` files, read tensor by tensor through ``safe_open``."""

    def __init__(self, files: list[Path], description: str):
        from safetensors import safe_open

        super().__init__(description)
        self._handles = {}
        self._where: dict[str, Path] = {}
        problems = []
        for path in files:
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                problems.append(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}")
                continue
            self._handles[path] = handle
            for k in handle.keys():
                if k in self._where:
                    problems.append(f"tensor {k!r} appears in both {self._where[k]} and {path}")
                    continue
                sl = handle.get_slice(k)
                dtype = _ST_DTYPES.get(sl.get_dtype())
                if dtype is None:
                    known = ", ".join(n for n, d in _ST_DTYPES.items() if d is not None)
                    problems.append(f"{path}: tensor {k!r} has dtype {sl.get_dtype()}, which this converter cannot "
                                    f"read (it reads {known})")
                    continue
                self._where[k] = path
                self._infos[k] = TensorInfo(tuple(sl.get_shape()), dtype)
        if problems:
            raise ConversionError(problems, header=f"cannot read {description}")

    def _load(self, key: str) -> torch.Tensor:
        return self._handles[self._where[key]].get_tensor(key)

    def close(self):
        self._handles.clear()


def safetensors_folder_source(folder: Path, index_name: str, single_name: str) -> SafetensorsSource:
    """``model-0000k-of-0000N.safetensors`` shards listed in ``index_name``, or the single ``single_name``."""
    folder = Path(folder)
    weight_map, shards = _shard_files(folder, index_name, single_name)
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise ConversionError([f"{index_name} lists {s}, which is missing" for s in missing],
                              header=f"cannot read the checkpoint in {folder}")
    src = SafetensorsSource([folder / s for s in shards], str(folder))
    if weight_map is not None:
        problems = _index_problems(weight_map, src, lambda k: src._where[k].name, index_name)
        if problems:
            raise ConversionError(problems, header=f"cannot read the checkpoint in {folder}")
    return src


# (index, single file) pairs of a transformers model folder, in the order transformers prefers them
HF_WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def hf_folder_source(folder: str | os.PathLike) -> TensorSource:
    """The weights of a transformers model folder: safetensors (sharded or single) or ``.bin`` (sharded or single).

    safetensors wins when a folder has both, as in ``from_pretrained``. ``.bin`` files are memory-mapped.
    """
    folder = Path(folder)
    (st_index, st_single), (bin_index, bin_single) = HF_WEIGHT_LAYOUTS
    if (folder / st_index).is_file() or (folder / st_single).is_file():
        return safetensors_folder_source(folder, st_index, st_single)
    if (folder / bin_index).is_file() or (folder / bin_single).is_file():
        return sharded_torch_source(folder, bin_index, bin_single)
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".safetensors", ".pth", ".pt"))
    raise ConversionError(
        f"{folder}: no transformers weights (expected {st_single}, {st_index}, {bin_single} or {bin_index})"
        + (f"; found {found[:5]}" if found else ""))


class PrefixedSource(TensorSource):
    """Several sources seen as one, each key prefixed with its part's name (``"base." + key``).

    Lets one rule combine tensors of different checkpoints (a base and its delta, model-parallel shards).
    """

    def __init__(self, parts: dict[str, TensorSource], description: str | None = None):
        super().__init__(description or " + ".join(p.description for p in parts.values()))
        self._parts = dict(parts)
        self._route: dict[str, tuple[TensorSource, str]] = {}
        for prefix, part in self._parts.items():
            for k in part.keys():
                name = f"{prefix}.{k}"
                self._route[name] = (part, k)
                self._infos[name] = part.info(k)

    @property
    def parts(self) -> dict[str, TensorSource]:
        return dict(self._parts)

    def _load(self, key: str) -> torch.Tensor:
        part, k = self._route[key]
        return part.get(k)

    def close(self):
        for part in self._parts.values():
            part.close()


class SubsetSource(TensorSource):
    """Some of another source's tensors, under the same names (a fine-tuned checkpoint split into the base weights
    and the adapter). ``owner``: closing this view closes the parent (give it to exactly one view)."""

    def __init__(self, parent: TensorSource, keys, description: str, owner: bool = False):
        super().__init__(description)
        self._parent, self._owner = parent, owner
        self._infos = {k: parent.info(k) for k in keys}

    def _load(self, key: str) -> torch.Tensor:
        if key not in self._infos:
            raise KeyError(key)
        return self._parent.get(key)

    def close(self):
        if self._owner:
            self._parent.close()


# --- tokenizers ---------------------------------------------------------------------------------------------

SPM_FILE = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
# what a transformers tokenizer folder may hold (listed in messages about one)
TOKENIZER_FILES = (SPM_FILE, TOKENIZER_JSON, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def tokenizer_files(folder: Path) -> list[str]:
    """The transformers tokenizer files in ``folder``, for messages."""
    return [f for f in TOKENIZER_FILES if (folder / f).is_file()]


def find_tokenizer(explicit: str | None, fallback_dirs: list[Path], names: tuple[str, ...]) -> Path | None:
    """The tokenizer file to read: ``--tokenizer`` as given when it is a file, the first of ``names`` in it when it
    is a folder (an error when it holds none); without ``--tokenizer``, the first of ``names`` in the first of
    ``fallback_dirs`` that holds one (the source folder); None when there is none."""
    if explicit is not None:
        path = Path(explicit)
        if path.is_file():
            return path
        found = next((path / n for n in names if (path / n).is_file()), None)
        if found is None:
            has = tokenizer_files(path) if path.is_dir() else []
            wanted = " or ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " or " + names[-1]
            raise ConversionError(f"--tokenizer {explicit}: no {wanted} there"
                                  + (f" (it has {', '.join(has)})" if has else ""))
        return found
    for folder in fallback_dirs:
        found = next((folder / n for n in names if (folder / n).is_file()), None)
        if found is not None:
            return found
    return None


def load_tokenizer_folder(folder: Path, cls=None, **kwargs):
    """``cls.from_pretrained(folder)`` (default ``AutoTokenizer``); a failure says which files it found and what
    it needs.

    transformers 5 loads ``tokenizer.json``; a folder with only ``tokenizer.model`` + ``tokenizer_config.json``
    (FastChat's Vicuna folders, lmsys' deltas) goes through its SentencePiece extractor, which needs protobuf:
    without it transformers falls back to tiktoken and fails with "tiktoken is required".
    """
    from transformers import AutoTokenizer
    from transformers.utils import is_protobuf_available

    if not folder.is_dir():
        raise ConversionError(f"tokenizer folder {folder} not found")
    found = tokenizer_files(folder)
    has = ", ".join(found) or "no tokenizer files"
    if SPM_FILE not in found and TOKENIZER_JSON not in found:
        raise ConversionError(f"{folder} holds no tokenizer (it has {has}; a tokenizer folder needs "
                              f"{TOKENIZER_JSON}, or {SPM_FILE} + tokenizer_config.json)")
    try:
        return (cls or AutoTokenizer).from_pretrained(str(folder), **kwargs)
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError, OSError, ImportError, RecursionError...
        if TOKENIZER_JSON not in found and not is_protobuf_available():
            raise ConversionError(
                f"cannot load the tokenizer in {folder}: it has {has} but no {TOKENIZER_JSON}, and transformers reads "
                f"{SPM_FILE} only with the protobuf package, which is missing (a dependency of modeling_visualglm: "
                "pip install protobuf)") from None
        raise ConversionError(f"cannot load the tokenizer in {folder} (it has {has}): {type(e).__name__}: "
                              f"{str(e).strip()[:300]}") from None
