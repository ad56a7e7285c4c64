"""``visualglm-export``: check or upload a hub folder (CONTRACTS §3).

    visualglm-export check --folder DIR [--dtype float32] [--device cpu]
    visualglm-export push  --folder DIR --repo-id ORG/NAME [--private] [--revision R] [--commit-message M]

Both work from the hub-folder allow-list (``hub_export.allowlist``, CONTRACTS §2): a folder holding a symlink, a
subdirectory, a pickle, a ``.py`` outside the remote-code closure or an unknown file is refused before anything
is loaded or uploaded, with one line per offending file. ``push`` uploads exactly the allow-listed files.

Exit codes: 0 success, 1 the folder failed the check / was refused / the upload failed, 2 usage error (including
a ``--device`` this machine does not have: one line, checked before the check starts).
"""

from __future__ import annotations

import argparse
import sys

PROG = "visualglm-export"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Check or upload a converted hub folder.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="load the folder with trust_remote_code in a fresh interpreter and chat once")
    c.add_argument("--folder", required=True, help="the converted hub folder to check")
    c.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "auto"],
                   help="dtype to load the weights in (default float32; auto: the folder's own)")
    c.add_argument("--device", default="cpu", help="torch device to run on: cpu (default), cuda, cuda:1, ...")
    c.add_argument("--query", default="Describe the image.",
                   help="question asked about the bundled image (default: %(default)r)")
    u = sub.add_parser("push", help="upload the folder to the Hugging Face Hub (creates the repo if needed)")
    u.add_argument("--folder", required=True,
                   help="the converted hub folder to upload (check it first); only its allow-listed files go up")
    u.add_argument("--repo-id", required=True, help="target repository, ORG/NAME")
    u.add_argument("--private", action="store_true", help="create the repository as private")
    u.add_argument("--revision", help="branch to commit to (created if needed)")
    u.add_argument("--commit-message", help='commit message (default: "Upload FOLDER_NAME (visualglm-export)")')
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "check":
        from .check import check_folder, device_problem

        problem = device_problem(args.device, args.dtype)
        if problem:  # a usage error: one line, no traceback from the child
            parser.exit(2, f"{PROG} check: error: {problem}\n")
        return check_folder(args.folder, dtype=args.dtype, device=args.device, query=args.query)
    from .push import PushError, push_folder

    if args.repo_id.count("/") != 1 or not all(args.repo_id.split("/")):
        parser.error(f"--repo-id must look like ORG/NAME, got {args.repo_id!r}")
    try:
        url = push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                          commit_message=args.commit_message, log=lambda line: print(line, file=sys.stderr))
    except PushError as e:
        print(f"{PROG}: push refused: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # network / hub errors: one line, not a traceback
        print(f"{PROG}: push failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
