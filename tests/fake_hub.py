"""A minimal in-memory Hugging Face Hub API server on 127.0.0.1, for push / from_pretrained round trips.

huggingface_hub has no offline hub, so tests run this one and point clients at it with
``HF_ENDPOINT=http://127.0.0.1:PORT HF_HUB_DISABLE_XET=1`` (``HF_ENDPOINT`` is read when huggingface_hub is
imported, so hub clients run in subprocesses). It implements the endpoints of the spec's table
(hf_ecosystem.md §3): repo creation and branches, preupload (regular vs LFS by extension), the LFS batch API
with basic PUT uploads, NDJSON commits, repo info / revision, tree listing, and HEAD/GET ``resolve``.

Bounded: binds 127.0.0.1 only, caps request bodies, stops itself after ``lifetime`` seconds or
``max_requests`` requests, whichever comes first. Use it as a context manager::

    with FakeHub() as hub:
        env = hub.env()   # {"HF_ENDPOINT": ..., "HF_HUB_DISABLE_XET": "1", ...}
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".model", ".png")
MAX_BODY = 1 << 30  # 1 GiB per request


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FileEntry:
    data: bytes
    lfs_oid: str | None  # sha256 for LFS files

    @property
    def etag(self) -> str:
        return self.lfs_oid or git_blob_oid(self.data)


@dataclass
class Repo:
    private: bool
    branches: dict = field(default_factory=dict)  # name → commit sha
    commits: dict = field(default_factory=dict)  # sha → {path: FileEntry}
    messages: dict = field(default_factory=dict)  # sha → message


class HubState:
    def __init__(self):
        self.lock = threading.Lock()
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.counter = 0
        # every commit received through the commit endpoint: (repo_id, sha, message, sorted paths it wrote)
        self.commit_log: list[tuple[str, str, str, list[str]]] = []

    def new_sha(self, seed: str) -> str:
        self.counter += 1
        return hashlib.sha1(f"{seed}-{self.counter}-{time.time_ns()}".encode()).hexdigest()

    def resolve(self, repo: Repo, rev: str) -> str | None:
        rev = urllib.parse.unquote(rev)
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.commits:
            return rev
        return None


class Handler(BaseHTTPRequestHandler):
    server_version = "FakeHub/1.0"
    protocol_version = "HTTP/1.1"

    # --- plumbing ---------------------------------------------------------------------------------
    @property
    def hub(self) -> "FakeHub":
        return self.server.fake_hub  # type: ignore[attr-defined]

    def log_message(self, fmt, *args):  # quiet; requests are recorded in hub.requests instead
        pass

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                total += size
                if total > MAX_BODY:
                    raise ValueError("body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, code: str, message: str):
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _dispatch(self):
        self.hub.count_request(self.command, self.path)
        try:
            self._route()
        except ValueError as e:
            self._error(400, "BadRequest", str(e))

    do_GET = do_POST = do_PUT = do_HEAD = _dispatch

    # --- routing ----------------------------------------------------------------------------------
    def _route(self):
        parsed = urllib.parse.urlparse(self.path)
        path = parsed.path
        query = urllib.parse.parse_qs(parsed.query)
        m, p = self.command, path.strip("/").split("/")
        st = self.hub.state

        if m == "GET" and path == "/api/agent-harnesses":
            return self._json(200, {})
        if m == "POST" and path == "/api/validate-yaml":
            self._body()
            return self._json(200, {"errors": [], "warnings": []})
        if m == "POST" and path == "/api/repos/create":
            payload = json.loads(self._body() or b"{}")
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            with st.lock:
                if repo_id in st.repos:  # the Hub's 409 also carries the url (create_repo(exist_ok) reads it)
                    msg = f"You already created this model repo: {repo_id}"
                    return self._json(409, {"error": msg, "url": f"{self.hub.endpoint}/{repo_id}"},
                                      {"X-Error-Message": msg})
                repo = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
                sha = st.new_sha(repo_id)
                repo.commits[sha] = {".gitattributes": FileEntry(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", None)}
                repo.messages[sha] = "initial commit"
                repo.branches["main"] = sha
                st.repos[repo_id] = repo
            return self._json(200, {"url": f"{self.hub.endpoint}/{repo_id}", "name": repo_id})

        # /api/models/{org}/{name}/...
        if len(p) >= 4 and p[0] == "api" and p[1] == "models":
            repo_id, rest = f"{p[2]}/{p[3]}", p[4:]
            repo = st.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}")
            if m == "POST" and rest[:1] == ["preupload"]:
                payload = json.loads(self._body())
                files = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                          "shouldIgnore": False} for f in payload["files"]]
                return self._json(200, {"files": files, "commitOid": repo.branches.get("main")})
            if m == "POST" and rest[:1] == ["commit"]:
                return self._commit(repo_id, repo, "/".join(rest[1:]) or "main")
            if m == "POST" and rest[:1] == ["branch"]:
                branch = urllib.parse.unquote("/".join(rest[1:]))
                payload = json.loads(self._body() or b"{}")
                with st.lock:
                    if branch in repo.branches:
                        return self._error(409, "BranchExists", f"branch {branch} exists")
                    start = payload.get("startingPoint") or "main"
                    repo.branches[branch] = st.resolve(repo, start) or repo.branches["main"]
                return self._json(200, {})
            if m == "GET" and (not rest or rest[0] == "revision"):
                rev = "/".join(rest[1:]) if rest else "main"
                sha = st.resolve(repo, rev)
                if sha is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                files = repo.commits[sha]
                return self._json(200, {
                    "id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                    "siblings": [{"rfilename": f, "size": len(e.data)} for f, e in sorted(files.items())],
                    "tags": [], "downloads": 0, "likes": 0, "library_name": "transformers",
                })
            if m == "GET" and rest[:1] == ["tree"]:
                rev = rest[1] if len(rest) > 1 else "main"
                sha = st.resolve(repo, rev)
                if sha is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                prefix = "/".join(rest[2:])
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                return self._json(200, self._tree(repo.commits[sha], prefix, recursive))
            return self._error(404, "EntryNotFound", f"no route {m} {path}")

        # LFS: /{org}/{name}.git/info/lfs/objects/batch and our PUT target /lfs-upload/{oid}
        if len(p) == 6 and p[1].endswith(".git") and p[2:] == ["info", "lfs", "objects", "batch"] and m == "POST":
            payload = json.loads(self._body())
            objects = []
            for obj in payload.get("objects", []):
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in st.lfs:
                    entry["actions"] = {"upload": {"href": f"{self.hub.endpoint}/lfs-upload/{obj['oid']}"}}
                objects.append(entry)
            return self._json(200, {"transfer": "basic", "objects": objects})
        if m == "PUT" and len(p) == 2 and p[0] == "lfs-upload":
            data = self._body()
            if hashlib.sha256(data).hexdigest() != p[1]:
                return self._error(400, "BadOid", "sha256 mismatch")
            with st.lock:
                st.lfs[p[1]] = data
            return self._send(200)

        # downloads: /{org}/{name}/resolve/{rev}/{file...}
        if m in ("GET", "HEAD") and len(p) >= 5 and p[2] == "resolve":
            repo_id, rev, fname = f"{p[0]}/{p[1]}", urllib.parse.unquote(p[3]), urllib.parse.unquote("/".join(p[4:]))
            repo = st.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}")
            sha = st.resolve(repo, rev)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            entry = repo.commits[sha].get(fname)
            if entry is None:
                return self._json(404, {"error": "Entry not found"},
                                  {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha})
            headers = {"ETag": f'"{entry.etag}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
            if entry.lfs_oid:
                headers.update({"X-Linked-Etag": f'"{entry.lfs_oid}"', "X-Linked-Size": str(len(entry.data))})
            data = entry.data
            rng = self.headers.get("Range")
            if rng and m == "GET" and rng.startswith("bytes="):
                start, _, end = rng[6:].partition("-")
                start = int(start or 0)
                end = int(end) if end else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return self._send(206, data[start : end + 1], headers, "application/octet-stream")
            return self._send(200, data, headers, "application/octet-stream")
        return self._error(404, "EntryNotFound", f"no route {m} {path}")

    # --- helpers ----------------------------------------------------------------------------------
    @staticmethod
    def _tree(files: dict, prefix: str, recursive: bool) -> list:
        out, dirs = [], set()
        pre = prefix.rstrip("/") + "/" if prefix else ""
        for name, entry in sorted(files.items()):
            if not name.startswith(pre):
                continue
            rest = name[len(pre):]
            if "/" in rest and not recursive:
                dirs.add(pre + rest.split("/")[0])
                continue
            item = {"type": "file", "path": name, "size": len(entry.data), "oid": git_blob_oid(entry.data)}
            if entry.lfs_oid:
                item["lfs"] = {"oid": entry.lfs_oid, "size": len(entry.data), "pointerSize": 134}
            out.append(item)
        return [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in sorted(dirs)] + out

    def _commit(self, repo_id: str, repo: Repo, rev: str):
        st = self.hub.state
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        rev = urllib.parse.unquote(rev)
        with st.lock:
            if rev not in repo.branches:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            files = dict(repo.commits[repo.branches[rev]])
            message = ""
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "header":
                    message = value.get("summary", "")
                elif key == "file":
                    files[value["path"]] = FileEntry(base64.b64decode(value["content"]), None)
                elif key == "lfsFile":
                    data = st.lfs.get(value["oid"])
                    if data is None or len(data) != value["size"]:
                        return self._error(422, "LfsObjectMissing", f"LFS object {value['oid']} was not uploaded")
                    files[value["path"]] = FileEntry(data, value["oid"])
                elif key in ("deletedFile", "deletedFolder"):
                    path = value["path"].rstrip("/")
                    files = {f: e for f, e in files.items() if f != path and not f.startswith(path + "/")}
                else:
                    return self._error(400, "BadCommit", f"unsupported commit operation {key}")
            sha = st.new_sha(repo_id)
            repo.commits[sha] = files
            repo.messages[sha] = message
            repo.branches[rev] = sha
            written = sorted(item["value"]["path"] for item in lines if item["key"] in ("file", "lfsFile"))
            st.commit_log.append((repo_id, sha, message, written))
        return self._json(200, {"commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha,
                                "pullRequestUrl": None})


class FakeHub:
    """Start with ``with FakeHub() as hub`` (or ``start()``/``stop()``); ``hub.state`` holds the repos."""

    def __init__(self, lifetime: float = 600.0, max_requests: int = 10_000):
        self.state = HubState()
        self.lifetime = lifetime
        self.max_requests = max_requests
        self.requests: list[tuple[str, str]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def env(self) -> dict:
        return {"HF_ENDPOINT": self.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_TOKEN": "hf_fake_token_for_tests", "HF_HUB_ETAG_TIMEOUT": "30", "HF_HUB_OFFLINE": "0"}

    def count_request(self, method: str, path: str):
        self.requests.append((method, path))
        if len(self.requests) >= self.max_requests:
            threading.Thread(target=self.stop, daemon=True).start()

    def start(self) -> "FakeHub":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.fake_hub = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True, name="fake-hub")
        self._thread.start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self):
        server = self._server
        if self._timer is not None:
            self._timer.cancel()
        if server is not None and self._thread is not None and self._thread.is_alive():
            server.shutdown()
            server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def commits(self) -> list[tuple[str, str, str, list[str]]]:
        """Commits received so far (not the repositories' initial ones): (repo_id, sha, message, paths written)."""
        return list(self.state.commit_log)

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.state.repos[repo_id]
        return {k: v.data for k, v in repo.commits[self.state.resolve(repo, rev)].items()}


if __name__ == "__main__":  # manual use: python tests/fake_hub.py  (Ctrl-C to stop)
    import sys

    with FakeHub(lifetime=float(sys.argv[1]) if len(sys.argv) > 1 else 3600) as hub:
        print(" ".join(f"{k}={v}" for k, v in hub.env().items()), flush=True)
        try:
            while hub._thread.is_alive():
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
