"""``visualglm-export push``: upload a complete hub folder with huggingface_hub.

The repository is created if needed (``create_repo(exist_ok=True)``; a ``--revision`` branch too), then the
folder goes up in one commit. The model card's usage snippet is pointed at the repository id in the
uploaded copy (the local README keeps the local path). ``HF_ENDPOINT`` / ``HF_TOKEN`` are honoured as usual.
"""

from __future__ import annotations

from pathlib import Path

from .card import with_model_id
from . import INCOMPLETE_MARKER


class PushError(Exception):
    pass


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, token: str | None = None) -> str:
    """Upload ``folder`` to ``repo_id``; returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PushError(f"{folder} has no config.json: not a hub folder")
    if (folder / INCOMPLETE_MARKER).exists():
        raise PushError(f"{folder} is incomplete ({INCOMPLETE_MARKER}): re-run the conversion with --tokenizer")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    operations = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith(".") or "/." in rel or "__pycache__" in rel:
            continue
        if rel == "README.md":
            card = with_model_id(path.read_text(encoding="utf-8"), repo_id)
            operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=card.encode("utf-8")))
        else:
            operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)))
    info = api.create_commit(
        repo_id,
        operations=operations,
        commit_message=commit_message or f"Upload {folder.name} (visualglm-export)",
        repo_type="model",
        revision=revision,
    )
    return info.commit_url
