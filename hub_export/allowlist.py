"""What a hub folder may hold (CONTRACTS §2), as one allow-list that ``check``, ``push`` (and the writer) share.

``scan_folder(folder) -> FolderScan(allowed, problems)`` is a pure function of the folder's contents; it
reads the folder through one directory descriptor and every file with ``O_NOFOLLOW`` (it never follows a
link, never unpickles, never imports anything from the folder). A file is allowed only if it is a regular
file directly in the folder and is one of:

- a fixed name of :data:`ALLOWED_NAMES` (configs, tokenizer data, model card, ``.gitattributes``, markers);
- weights: ``model.safetensors``, or shards ``model-XXXXX-of-YYYYY.safetensors`` plus
  ``model.safetensors.index.json`` whose ``weight_map`` names exactly the shards present;
- remote code: exactly the ``.py`` files that the ``auto_map`` entries of ``config.json``,
  ``tokenizer_config.json``, ``processor_config.json`` and ``preprocessor_config.json`` reach through
  relative imports (``hub_export.code.relative_imports``, the rule the writer copies the closure with),
  computed from the folder's own bytes.

Refused, each with its reason: symbolic links (to files or directories), subdirectories, other non-regular
files (fifos, sockets, devices), pickles by name (``*.bin``, ``*.pt``, ``*.pth``, ``*.pkl``, ``*.pickle``,
``*.ckpt``) and by content (whatever the name: a pickle stream, a zip or tar archive as ``torch.save``
writes them), ``.py`` files outside the closure, unknown names, and broken allowed files (invalid JSON, a
safetensors file without a safetensors header, an index that disagrees with the shards present).

Files other than weights are read into memory once (``AllowedFile.data``), so ``push`` uploads exactly the
bytes that were checked; weights are streamed, after ``push`` re-opens them and confirms they are still the
same regular files (``same_file``).
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import re
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from . import INCOMPLETE_MARKER
from .code import relative_imports

# name -> (what it is, uploaded by ``push``). The one list of fixed names a hub folder may hold.
ALLOWED_NAMES: dict[str, tuple[str, bool]] = {
    "config.json": ("model config", True),
    "generation_config.json": ("generation config", True),
    "processor_config.json": ("processor config", True),
    "preprocessor_config.json": ("image processor config", True),
    "tokenizer_config.json": ("tokenizer config", True),
    "special_tokens_map.json": ("tokenizer config", True),  # written by some transformers releases
    "added_tokens.json": ("tokenizer config", True),  # written by slow tokenizers with added tokens
    "chat_template.jinja": ("chat template", True),
    "tokenizer.json": ("tokenizer data", True),
    "tokenizer.model": ("tokenizer data", True),
    "ice_text.model": ("tokenizer data", True),
    "model.safetensors": ("weights", True),
    "model.safetensors.index.json": ("weights index", True),
    "README.md": ("model card", True),
    ".gitattributes": ("git attributes", True),
    # markers: accepted, never uploaded (they describe this local copy, may name local paths). check/push
    # refuse a folder holding INCOMPLETE_MARKER on their own, with the converter's explanation.
    INCOMPLETE_MARKER: ("incomplete-conversion marker", False),
    # PLACEHOLDER name: the marker visualglm-convert writes into every folder it makes (so that --force
    # recognises them) is being added elsewhere; the lead reconciles its final name here.
    ".visualglm-convert": ("converter marker", False),
}

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
# the JSON files whose ``auto_map`` entries (also nested ones, e.g. processor_config.json's image processor)
# transformers resolves to remote code
AUTO_MAP_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# transformers' class reference: "module.Class" (flat), optionally "repo--module.Class" (code from elsewhere)
CLASS_REF = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")
MAX_IN_MEMORY = 64 << 20  # every allowed file but the weights is read whole; configs and tokenizers are far smaller
SNIFF_BYTES = 1 << 20  # how much of a large file the pickle sniffing reads


class Problem(NamedTuple):
    name: str
    why: str

    def __str__(self) -> str:
        return f"{self.name}: {self.why}"


@dataclass(frozen=True)
class AllowedFile:
    name: str
    what: str  # ALLOWED_NAMES' description, "weights shard" or "remote code"
    upload: bool
    size: int
    dev: int
    ino: int
    mtime_ns: int
    ctime_ns: int
    data: bytes | None = field(default=None, repr=False)  # the checked content; None for weights (streamed)


class FolderScan(NamedTuple):
    allowed: list[AllowedFile]
    problems: list[Problem]

    @property
    def upload_names(self) -> list[str]:
        return [f.name for f in self.allowed if f.upload]


def show(name: str) -> str:
    """A file name as it can be printed on one line (odd characters escaped)."""
    return name if name.isprintable() and name.strip() == name and name else ascii(name)


# --- content -----------------------------------------------------------------------------------------------

def pickle_signature(head: bytes, truncated: bool = False) -> str | None:
    """Why ``head`` (a file's first bytes; ``truncated`` if the file goes on) looks like something
    ``torch.load``/``pickle.load`` would unpickle, or None. Parses opcodes only (``pickletools.genops``)."""
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "its content is a zip archive (torch.save's format, a pickle inside)"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "its content is a tar archive (the oldest torch.save format, pickles inside)"
    count, first = 0, None
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(head)):
            count += 1
            if first is None:
                first = (op.name, arg)
            if op.name == "STOP":
                break
        else:
            return None
    except Exception as e:  # not a pickle stream (or one cut off by our window)
        cut = truncated and "unknown" not in str(e)
        if not (cut and (count >= 8 or (first and first[0] == "PROTO"))):
            return None
    if first and first[0] == "PROTO":
        return f"its content is a pickle (protocol {first[1]})"
    return "its content is a pickle (protocol 0/1)"


def safetensors_problem(head: bytes, size: int) -> str | None:
    if size < 10:
        return "not a safetensors file (too short)"
    n = int.from_bytes(head[:8], "little")
    if n < 2 or 8 + n > size or head[8:9] != b"{":
        return "not a safetensors file (no safetensors header)"
    return None


def _decode_json(data: bytes):
    return json.loads(data.decode("utf-8"))


# --- the scan ----------------------------------------------------------------------------------------------

def open_no_follow(name: str, dir_fd: int) -> int:
    """Open ``name`` in ``dir_fd`` read-only, never following a link, never blocking on a fifo."""
    return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0),
                   dir_fd=dir_fd)


def same_file(st: os.stat_result, f: AllowedFile) -> bool:
    """Still the regular file that was checked (ctime too: it catches a new file that reuses the inode number)."""
    return (stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            == (f.dev, f.ino, f.size, f.mtime_ns, f.ctime_ns))


def _read(fd: int, limit: int) -> bytes:
    chunks, left = [], limit
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _subdirectory_problems(name: str, dir_fd: int) -> list[Problem]:
    """One problem for the subdirectory, plus one per link inside it (what a recursive upload would follow)."""
    count, links = 0, []
    try:
        for root, dirs, files, root_fd in os.fwalk(name, dir_fd=dir_fd, follow_symlinks=False):
            for entry in dirs + files:
                count += 1
                try:
                    if stat.S_ISLNK(os.stat(entry, dir_fd=root_fd, follow_symlinks=False).st_mode):
                        target = os.readlink(entry, dir_fd=root_fd)
                        links.append(Problem(f"{show(root)}/{show(entry)}",
                                             f"symbolic link to {show(target)}; links are never followed"))
                except OSError:
                    continue
    except OSError:
        pass
    why = f"a subdirectory ({count} entries inside): a hub folder is flat, nothing below it is uploaded"
    return [Problem(f"{show(name)}/", why)] + links


def scan_dir_fd(dir_fd: int) -> FolderScan:
    """:func:`scan_folder` on an open directory descriptor (``push`` keeps it open while it uploads)."""
    reasons: dict[str, list[str]] = {}
    regular: dict[str, AllowedFile] = {}  # every regular file, content read (data None for big ones)
    heads: dict[str, bytes] = {}
    extra: list[Problem] = []

    def refuse(name: str, why: str):
        reasons.setdefault(name, []).append(why)

    for name in sorted(os.listdir(dir_fd)):
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as e:
            refuse(name, f"cannot be read ({type(e).__name__}: {e.strerror or e})")
            continue
        if stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(name, dir_fd=dir_fd)
            except OSError:
                target = "?"
            try:
                kind = "a directory" if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd).st_mode) else "a file"
            except OSError:
                kind = "nothing (dangling)"
            refuse(name, f"symbolic link to {show(target)} ({kind}); links are never followed: a hub folder "
                         "holds regular files only")
            continue
        if stat.S_ISDIR(st.st_mode):
            extra.extend(_subdirectory_problems(name, dir_fd))
            continue
        if not stat.S_ISREG(st.st_mode):
            refuse(name, "not a regular file (fifo, socket or device)")
            continue
        try:
            fd = open_no_follow(name, dir_fd)
        except OSError as e:
            refuse(name, f"cannot be opened ({type(e).__name__}: {e.strerror or e})")
            continue
        try:
            fst = os.fstat(fd)
            if not same_file(fst, AllowedFile(name, "", True, st.st_size, st.st_dev, st.st_ino, st.st_mtime_ns,
                                              st.st_ctime_ns)):
                refuse(name, "changed while it was being checked")
                continue
            weights = name == SAFE_WEIGHTS_NAME or SHARD_PATTERN.fullmatch(name) is not None
            whole = not weights and fst.st_size <= MAX_IN_MEMORY
            content = _read(fd, fst.st_size + 1 if whole else SNIFF_BYTES)
            if whole and len(content) != fst.st_size:
                refuse(name, "changed while it was being checked")
                continue
        except OSError as e:
            refuse(name, f"cannot be read ({type(e).__name__}: {e.strerror or e})")
            continue
        finally:
            os.close(fd)
        heads[name] = content
        regular[name] = AllowedFile(name, "", True, fst.st_size, fst.st_dev, fst.st_ino, fst.st_mtime_ns,
                                    fst.st_ctime_ns, content if whole else None)

    # names and contents
    candidates: dict[str, tuple[str, bool]] = {}
    py_files: list[str] = []
    for name, f in regular.items():
        head = heads[name]
        truncated = f.data is None
        if name in ALLOWED_NAMES:
            candidates[name] = ALLOWED_NAMES[name]
        elif SHARD_PATTERN.fullmatch(name):
            candidates[name] = ("weights shard", True)
        elif name.endswith(".py"):
            py_files.append(name)
        elif name.lower().endswith(PICKLE_SUFFIXES):
            refuse(name, f"a pickle file ({Path(name).suffix}): pickled weights run code when they are loaded; "
                         "a hub folder carries safetensors only")
        else:
            refuse(name, "not a file a hub folder holds (unknown name)")
        if name.endswith(".safetensors"):
            problem = safetensors_problem(head, f.size)
            if problem:
                refuse(name, problem)
                sig = pickle_signature(head, truncated)
                if sig:
                    refuse(name, sig)
            continue
        sig = pickle_signature(head, truncated)
        if sig:
            refuse(name, sig + (", refused whatever the name" if name in candidates or name.endswith(".py") else ""))
        if name in candidates and f.data is None:
            refuse(name, f"larger than {MAX_IN_MEMORY >> 20} MiB: not a {candidates[name][0]} file")
        elif name in candidates and name.endswith(".json"):
            try:
                value = _decode_json(f.data)
            except ValueError as e:
                refuse(name, f"not valid JSON ({e})")
            else:
                if not isinstance(value, dict):
                    refuse(name, "not a JSON object")
        elif name in candidates and name.endswith((".md", ".jinja")):
            try:
                f.data.decode("utf-8")
            except UnicodeDecodeError as e:
                refuse(name, f"not UTF-8 text ({e})")

    def ok(name: str) -> bool:
        return name in regular and name not in reasons

    # required files
    if "config.json" not in regular and "config.json" not in reasons:
        refuse("config.json", "missing (every hub folder has one)")

    # weights
    shards = sorted(n for n in regular if SHARD_PATTERN.fullmatch(n))
    has_single = SAFE_WEIGHTS_NAME in regular or SAFE_WEIGHTS_NAME in reasons
    has_index = SAFE_WEIGHTS_INDEX_NAME in regular or SAFE_WEIGHTS_INDEX_NAME in reasons
    if has_single and has_index:
        refuse(SAFE_WEIGHTS_INDEX_NAME, f"beside {SAFE_WEIGHTS_NAME}: transformers would load only one of them; "
                                        "keep either the single file or the shards with their index")
    if not has_single and not has_index and not shards:
        refuse(SAFE_WEIGHTS_NAME,
               f"missing: no weights ({SAFE_WEIGHTS_NAME}, or shards with {SAFE_WEIGHTS_INDEX_NAME})")
    if shards and not has_index:
        for s in shards:
            refuse(s, f"a weights shard without {SAFE_WEIGHTS_INDEX_NAME}")
    if ok(SAFE_WEIGHTS_INDEX_NAME):
        index = _decode_json(regular[SAFE_WEIGHTS_INDEX_NAME].data)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(v, str) for v in weight_map.values()):
            refuse(SAFE_WEIGHTS_INDEX_NAME, "no weight_map of tensor name -> shard file")
        else:
            named = sorted(set(weight_map.values()))
            for target in named:
                if not SHARD_PATTERN.fullmatch(target):
                    refuse(SAFE_WEIGHTS_INDEX_NAME, f"weight_map names {show(target)}, which is not a shard name "
                                                    "(model-XXXXX-of-YYYYY.safetensors)")
                elif target not in regular:
                    refuse(SAFE_WEIGHTS_INDEX_NAME, f"weight_map names {show(target)}, which is not a regular "
                                                    "file in the folder")
            for s in shards:
                if s not in named:
                    refuse(s, f"a weights shard that {SAFE_WEIGHTS_INDEX_NAME}'s weight_map does not name")
            numbers = [tuple(int(x) for x in SHARD_PATTERN.fullmatch(s).groups()) for s in shards]
            totals = {total for _, total in numbers}
            if numbers and (len(totals) != 1 or sorted(k for k, _ in numbers) != list(range(1, len(numbers) + 1))
                            or totals != {len(numbers)}):
                refuse(SAFE_WEIGHTS_INDEX_NAME, f"the shards present are not one complete set 1..N: {shards}")

    # remote code: the relative-import closure of the auto_map entries, from the folder's own bytes
    todo: list[tuple[str, str]] = []  # (module, where it was reached from)
    for source in AUTO_MAP_FILES:
        if not ok(source):
            continue
        for key, ref in _auto_map_refs(_decode_json(regular[source].data)):
            where = f"{source} auto_map[{key!r}]"
            if not isinstance(ref, str):
                refuse(source, f"{where} is {ref!r}, not a class reference 'module.Class'")
            elif "--" in ref:
                refuse(source, f"{where} = {ref!r} loads code from another repository; a hub folder carries "
                               "its own remote code")
            elif not CLASS_REF.fullmatch(ref):
                refuse(source, f"{where} = {ref!r} is not a class reference 'module.Class' of a file here")
            else:
                todo.append((ref.split(".")[0], where))
    closure: set[str] = set()
    cut_at: list[str] = []
    while todo:
        module, where = todo.pop(0)
        fname = f"{module}.py"
        if fname in closure:
            continue
        closure.add(fname)
        if fname not in regular:
            if fname not in reasons:
                refuse(fname, f"missing: remote code reached from {where}")
            cut_at.append(fname)
            continue
        f = regular[fname]
        if f.data is None or fname in reasons:
            cut_at.append(fname)
            continue
        try:
            imports = relative_imports(_InMemoryFile(fname, f.data))
        except (SyntaxError, ValueError) as e:  # UnicodeDecodeError is a ValueError
            refuse(fname, f"remote code that cannot be parsed ({type(e).__name__}: {e})")
            cut_at.append(fname)
            continue
        todo.extend((m, f"{fname}'s relative imports") for m in sorted(imports))
    for name in py_files:
        if name in closure:
            candidates[name] = ("remote code", True)
        else:
            note = f" (the closure could not be followed past {', '.join(sorted(cut_at))})" if cut_at else ""
            refuse(name, "a .py file that no auto_map entry reaches through relative imports: remote code is "
                         f"exactly {', '.join(sorted(closure)) or 'nothing'}{note}")

    allowed = [replace(f, what=candidates[n][0], upload=candidates[n][1])
               for n, f in sorted(regular.items()) if n in candidates and n not in reasons]
    problems = [Problem(show(n), "; ".join(dict.fromkeys(w))) for n, w in sorted(reasons.items())] + extra
    return FolderScan(allowed, sorted(problems))


def scan_folder(folder: str | Path) -> FolderScan:
    """The allow-list verdict on ``folder``: (files a hub folder may hold, with their checked bytes;
    problems, one per offending entry with every reason). Never follows a link, never unpickles."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        return scan_dir_fd(fd)
    finally:
        os.close(fd)


def format_problems(problems: list[Problem]) -> str:
    lines = [f"  {p}" for p in problems]
    lines.append("A hub folder holds only regular files: " + ", ".join(n for n in ALLOWED_NAMES)
                 + ", model-XXXXX-of-YYYYY.safetensors shards named by the index, and the .py files its "
                   "auto_map entries reach (docs/conversion.md, \"The hub folder\").")
    return "\n".join(lines)


def _auto_map_refs(value, found=None):
    """Every (auto class, class reference) of every ``auto_map`` in a JSON document, nested ones included."""
    found = [] if found is None else found
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "auto_map" and isinstance(item, dict):
                for auto_class, ref in item.items():
                    for r in (ref if isinstance(ref, list) else [ref]):
                        if r is not None:
                            found.append((auto_class, r))
            else:
                _auto_map_refs(item, found)
    elif isinstance(value, list):
        for item in value:
            _auto_map_refs(item, found)
    return found


class _InMemoryFile:
    """What ``hub_export.code.relative_imports`` reads (``read_text``, ``str``), backed by the checked bytes,
    so that the closure is computed with the writer's own rule from exactly what will be uploaded."""

    def __init__(self, name: str, data: bytes):
        self.name, self.data = name, data

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.data.decode(encoding)

    def __str__(self) -> str:
        return self.name
