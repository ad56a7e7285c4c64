"""``visualglm-export push``: upload a complete hub folder with huggingface_hub.

The folder is first judged by the allow-list (``hub_export.allowlist``, CONTRACTS §2): a symlink, a
subdirectory, a pickle (by name or by content), a ``.py`` outside the remote-code closure, an unknown file or an
index that disagrees with the shards refuses the push before any request reaches the Hub, with one line per
offending file. Then the repository is created if needed (``create_repo(exist_ok=True)``; a ``--revision``
branch too) and exactly the allow-listed files go up in one commit, one ``CommitOperationAdd`` each (markers
stay local). Configs, code, tokenizer files and the card are uploaded from the bytes the allow-list checked;
weights are re-opened through the same directory descriptor with ``O_NOFOLLOW``, must still be the regular files
that were checked (same device, inode, size, mtime), and are read from that open descriptor, so swapping a file
for a link after the check uploads nothing from the link. The model card's usage snippet is pointed at the
repository id in the uploaded copy (the local README keeps the local path). ``HF_ENDPOINT`` / ``HF_TOKEN`` are
honoured as usual.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from . import INCOMPLETE_MARKER
from .allowlist import open_no_follow, format_problems, same_file, safetensors_problem, scan_dir_fd


class PushError(Exception):
    pass


def _source(fileobj):
    """What huggingface_hub reads a checked weights file from: on Linux the ``/proc/self/fd/N`` path of our open
    descriptor (it names the inode we checked, whatever the directory entry has become since, and keeps the
    Xet upload path, which refuses file objects); elsewhere the open file object itself (plain LFS upload)."""
    path = f"/proc/self/fd/{fileobj.fileno()}"
    try:
        st, mine = os.stat(path), os.fstat(fileobj.fileno())
    except OSError:
        return fileobj
    return path if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino) else fileobj


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, token: str | None = None, endpoint: str | None = None,
                log: Callable[[str], None] | None = None) -> str:
    """Upload the allow-listed files of ``folder`` to ``repo_id``; returns the commit URL.

    Raises :class:`PushError` (before any request to the Hub) when the folder is not a clean hub folder.
    ``endpoint`` overrides ``HF_ENDPOINT``; ``log`` receives one line naming the files that go up."""
    folder = Path(folder)
    if not folder.is_dir() or not os.path.lexists(folder / "config.json"):
        raise PushError(f"{folder} has no config.json: not a hub folder")
    if os.path.lexists(folder / INCOMPLETE_MARKER):
        raise PushError(f"{folder} is incomplete ({INCOMPLETE_MARKER}): re-run the conversion with --tokenizer")
    dir_fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    opened = []
    try:
        scan = scan_dir_fd(dir_fd)
        if scan.problems:
            raise PushError(f"{folder} is not a clean hub folder ({len(scan.problems)} problem(s)); nothing was "
                            f"uploaded:\n{format_problems(scan.problems)}")
        from huggingface_hub import CommitOperationAdd, HfApi

        from .card import with_model_id

        operations = []
        for f in scan.allowed:
            if not f.upload:
                continue
            if f.data is not None:  # the very bytes the allow-list checked
                data = f.data
                if f.name == "README.md":
                    data = with_model_id(data.decode("utf-8"), repo_id).encode("utf-8")
                operations.append(CommitOperationAdd(path_in_repo=f.name, path_or_fileobj=data))
                continue
            # weights: streamed, from the file that was checked, never through a link
            try:
                fd = open_no_follow(f.name, dir_fd)
            except OSError as e:
                raise PushError(f"{f.name} changed after the check ({type(e).__name__}: {e.strerror or e}); "
                                "nothing was uploaded") from None
            fileobj = os.fdopen(fd, "rb")
            opened.append(fileobj)
            if not same_file(os.fstat(fd), f) or safetensors_problem(fileobj.read(9), f.size):
                raise PushError(f"{f.name} changed after the check (it is not the regular file that was checked); "
                                "nothing was uploaded")
            fileobj.seek(0)
            operations.append(CommitOperationAdd(path_in_repo=f.name, path_or_fileobj=_source(fileobj)))
        if log is not None:
            log(f"uploading {len(operations)} files to {repo_id}: {', '.join(op.path_in_repo for op in operations)}")
        api = HfApi(endpoint=endpoint, token=token)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload {folder.name} (visualglm-export)",
            repo_type="model",
            revision=revision,
        )
        return info.commit_url
    finally:
        for fileobj in opened:
            fileobj.close()
        os.close(dir_fd)
