"""A local stand-in for the Hugging Face Hub, for tests that must stay offline.

`fake_hub({"org/tiny": folder})` serves each folder as a model repository (one commit, revision
`main` or its sha) on 127.0.0.1 and yields the endpoint URL: a `str` that also carries the log of
the requests it served (`hub.requests`, `hub.resolve_requests()`, `hub.bytes_served()`...), so a
test can assert what was downloaded. A key `"datasets/org/name"` serves a dataset repository
instead, for `datasets.load_dataset("org/name", ...)`. `hub_env(hub, home, monkeypatch)` points
huggingface_hub (and `datasets`) at it: it sets `HF_ENDPOINT`, `HF_HUB_OFFLINE=0`,
`HF_DATASETS_OFFLINE=0` and a private `HF_HOME`/`HF_HUB_CACHE` in `os.environ` (for subprocesses,
the most faithful) and, because huggingface_hub and `datasets` copy those into
`huggingface_hub.constants` and `datasets.config` at import time, patches those modules too (for
in-process calls).

Endpoints, as huggingface_hub 2.4 calls them (see its hf_api.py, file_download.py,
_snapshot_download.py and utils/_http.py); a dataset repository answers the same routes under
`/api/datasets/{repo}...` and `/datasets/{repo}/resolve/...` (what `datasets` 5.2 and
`HfFileSystem` call):

* `GET /api/models/{repo}[/revision/{rev}]`: `model_info`/`repo_info`; `sha` and `siblings`
  (with `size`/`blobId`/`lfs` when `?blobs=true`).
* `GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=..`: `list_repo_tree`/`list_repo_files`
  and `snapshot_download`'s listing (one page, no `Link: next`).
* `HEAD /{repo}/resolve/{rev}/{file}`: `hf_hub_download`'s metadata and `file_exists`:
  `X-Repo-Commit`, `ETag` (git blob sha1, or sha256 for LFS files), `X-Linked-Etag` and
  `X-Linked-Size` for LFS files, `Content-Length`. Served directly (200), not redirected to a CDN.
* `GET /{repo}/resolve/{rev}/{file}`: the bytes, honouring `Range: bytes=a-b` (206 with
  `Content-Range: bytes a-b/size`), which `get_safetensors_metadata` relies on.
* `GET /api/agent-harnesses`: the empty registry huggingface_hub asks for when building headers.

Uploads (`create_repo`, `create_branch`, `upload_folder`/`upload_file`/`create_commit` through the
legacy LFS protocol, which huggingface_hub takes when `HF_HUB_DISABLE_XET=1`, as `hub_env` sets),
each needing `Authorization: Bearer <token>` with the hub's `token`:

* `POST /api/validate-yaml` (the model card's metadata must parse as a YAML mapping).
* `POST /api/repos/create` (409 when it exists), `POST /api/models/{repo}/branch/{branch}`.
* `POST /api/models/{repo}/preupload/{rev}`: LFS for the `LFS_SUFFIXES`, regular otherwise.
* `POST /{repo}.git/info/lfs/objects/batch` -> an upload action `PUT /lfs-upload/{oid}` (the
  sha256 checked), then `POST /api/models/{repo}/commit/{rev}` (NDJSON: header, file, lfsFile).
  `fail_uploads=True` answers every LFS PUT with 403: an upload that fails halfway.

Errors carry `X-Error-Code` as the Hub's do: `RepoNotFound` (401), `RevisionNotFound` and
`EntryNotFound` (404), so huggingface_hub raises its usual typed exceptions.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".model")
EMPTY_AGENT_REGISTRY = {"standardEnvVars": [], "harnesses": {}}


@dataclass(frozen=True)
class ServedRequest:
    method: str
    path: str  # URL path, unquoted
    query: str
    repo: str | None
    file: str | None  # for /resolve/ requests
    range: tuple[int, int] | None  # inclusive byte range served (206), else None
    status: int
    body_bytes: int  # bytes of body sent


@dataclass(frozen=True)
class _File:
    path: Path  # on disk, or only the name (uploaded files keep their bytes in `data`)
    size: int
    blob_sha1: str  # git blob id
    sha256: str
    data: bytes | None = None

    @property
    def lfs(self) -> bool:
        return self.path.suffix in LFS_SUFFIXES

    @classmethod
    def of(cls, path: Path, data: bytes, keep: bool) -> "_File":
        return cls(path, len(data), hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
                   hashlib.sha256(data).hexdigest(), data if keep else None)

    def read(self) -> bytes:
        return self.data if self.data is not None else self.path.read_bytes()


class _Repo:
    def __init__(self, repo_id: str, root: Path | None, private: bool = False) -> None:
        self.repo_id = repo_id  # the key: "org/name", or "datasets/org/name" for a dataset repository
        self.name = repo_id.removeprefix("datasets/")
        self.private = private
        self.files: dict[str, _File] = {}
        for p in sorted(root.rglob("*")) if root is not None else []:
            if p.is_file() and ".cache" not in p.relative_to(root).parts:
                self.files[p.relative_to(root).as_posix()] = _File.of(p, p.read_bytes(), keep=False)
        self.branches: dict[str, dict[str, _File]] = {}  # other than main: their files
        self.commits: list[dict] = []  # uploads: {"branch", "summary", "files"}
        self._rehash()

    def _rehash(self) -> None:
        digest = hashlib.sha1(self.repo_id.encode())
        for name, f in self.files.items():
            digest.update(f"{name}\0{f.sha256}\n".encode())
        self.sha = digest.hexdigest()

    def files_at(self, rev: str) -> dict[str, _File] | None:
        if rev in ("main", self.sha):
            return self.files
        return self.branches.get(rev)

    def commit(self, branch: str, summary: str, added: dict[str, _File], deleted: list[str]) -> str:
        files = self.files if branch == "main" else self.branches[branch]
        files.update(added)
        for name in deleted:
            files.pop(name, None)
        self.commits.append({"branch": branch, "summary": summary, "files": sorted(added)})
        self._rehash()
        return hashlib.sha1(f"{self.sha}{len(self.commits)}".encode()).hexdigest()

    def info(self, blobs: bool) -> dict:
        siblings = []
        for name, f in self.files.items():
            s: dict = {"rfilename": name}
            if blobs:
                s.update(size=f.size, blobId=f.blob_sha1)
                if f.lfs:
                    s["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
            siblings.append(s)
        return {
            "_id": self.sha[:24], "id": self.name, "modelId": self.name, "author": self.name.split("/")[0],
            "sha": self.sha, "lastModified": "2024-01-01T00:00:00.000Z", "createdAt": "2024-01-01T00:00:00.000Z",
            "private": self.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
            "library_name": "transformers", "siblings": siblings,
        }

    def tree(self, prefix: str, recursive: bool) -> list[dict]:
        base = prefix.strip("/")
        out, folders = [], set()
        for name, f in self.files.items():
            if base and not name.startswith(base + "/"):
                continue
            rest = name[len(base) + 1:] if base else name
            if not recursive and "/" in rest:
                folders.add((base + "/" if base else "") + rest.split("/")[0])
                continue
            entry = {"type": "file", "oid": f.blob_sha1, "size": f.size, "path": name}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            out.append(entry)
        return out + [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                      for d in sorted(folders)]


class FakeHub(str):
    """The endpoint URL (use it as HF_ENDPOINT) plus the log of what the server answered, and the
    repositories (uploads land there: `hub.repo_files("org/name")`)."""

    requests: list[ServedRequest]
    repos: dict[str, _Repo]
    token: str

    def __new__(cls, url: str, log: list[ServedRequest], repos: dict | None = None, token: str = "") -> "FakeHub":
        obj = super().__new__(cls, url)
        obj.requests = log
        obj.repos = repos if repos is not None else {}
        obj.token = token
        return obj

    def repo_files(self, repo: str, branch: str = "main") -> dict[str, bytes]:
        """{file name: bytes} of a repository's branch."""
        files = self.repos[repo].files_at(branch) or {}
        return {name: f.read() for name, f in files.items()}

    @property
    def url(self) -> str:
        return str(self)

    def resolve_requests(self, repo: str | None = None, pattern: str = "*") -> list[ServedRequest]:
        """File requests (HEAD and GET on /resolve/), optionally for one repo and a file glob."""
        return [r for r in list(self.requests) if r.file is not None and (repo is None or r.repo == repo)
                and fnmatch.fnmatch(r.file, pattern)]

    def downloads(self, repo: str | None = None, pattern: str = "*") -> list[ServedRequest]:
        """GETs of files that sent a body."""
        return [r for r in self.resolve_requests(repo, pattern) if r.method == "GET" and r.body_bytes > 0]

    def files_downloaded(self, repo: str | None = None) -> set[str]:
        return {r.file for r in self.downloads(repo) if r.file}

    def bytes_served(self, repo: str | None = None, pattern: str = "*") -> int:
        return sum(r.body_bytes for r in self.downloads(repo, pattern))

    def clear(self) -> None:
        self.requests.clear()


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """`bytes=a-b`, `bytes=a-` or `bytes=-n` -> inclusive (start, end); None without a header;
    "invalid" for what we cannot satisfy (416)."""
    if not header:
        return None
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not m or (m.group(1) == "" and m.group(2) == ""):
        return "invalid"
    if m.group(1) == "":
        n = int(m.group(2))
        return (max(size - n, 0), size - 1) if n else "invalid"
    start = int(m.group(1))
    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    return (start, end) if start <= end and start < size else "invalid"


def _make_handler(repos: dict[str, _Repo], log: list[ServedRequest], lock: threading.Lock, token: str = "",
                  fail_uploads: bool = False):
    lfs_store: dict[str, bytes] = {}  # sha256 -> bytes PUT by an LFS upload, until a commit names them
    announced: set[str] = set()  # oids an authenticated LFS batch request handed an upload URL for

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - quiet
            pass

        def do_HEAD(self):  # noqa: N802
            self._route(head=True)

        def do_GET(self):  # noqa: N802
            self._route(head=False)

        def do_POST(self):  # noqa: N802
            self._write_route("POST")

        def do_PUT(self):  # noqa: N802
            self._write_route("PUT")

        # -- plumbing ----------------------------------------------------------------------------
        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, *, head: bool = False,
                  repo: str | None = None, file: str | None = None, served_range=None, length: int | None = None):
            self.send_response(status)
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            hdrs.setdefault("Content-Length", str(len(body) if length is None else length))
            for k, v in hdrs.items():
                self.send_header(k, v)
            self.end_headers()
            sent = 0
            if not head and body:
                self.wfile.write(body)
                sent = len(body)
            parts = urlsplit(self.path)
            with lock:
                log.append(ServedRequest(self.command, unquote(parts.path), parts.query, repo, file, served_range, status, sent))

        def _json(self, obj, head: bool, repo: str | None = None):
            self._send(200, json.dumps(obj).encode(), head=head, repo=repo)

        def _error(self, status: int, code: str, message: str, head: bool, repo=None, file=None, extra=None):
            body = json.dumps({"error": message}).encode()
            self._send(status, body, {"X-Error-Code": code, "X-Error-Message": message, **(extra or {})},
                       head=head, repo=repo, file=file)

        def _find_repo(self, path: str) -> tuple[_Repo | None, str]:
            for repo_id in sorted(repos, key=len, reverse=True):
                if path == repo_id or path.startswith(repo_id + "/"):
                    return repos[repo_id], path[len(repo_id):]
            return None, path

        def _check_rev(self, repo: _Repo, rev: str, head: bool, file: str | None = None) -> bool:
            if repo.files_at(unquote(rev)) is not None:
                return True
            self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(rev)}", head, repo.repo_id, file)
            return False

        # -- routes ------------------------------------------------------------------------------
        def _route(self, head: bool):
            parts = urlsplit(self.path)
            path, query = unquote(parts.path), parse_qs(parts.query)
            if path == "/api/agent-harnesses":
                return self._json(EMPTY_AGENT_REGISTRY, head)
            if path.startswith("/api/models/"):
                return self._api(path[len("/api/models/"):], query, head)
            if path.startswith("/api/datasets/"):
                return self._api("datasets/" + path[len("/api/datasets/"):], query, head)
            repo, rest = self._find_repo(path.lstrip("/"))
            if "/resolve/" in path and repo is None:
                return self._error(401, "RepoNotFound", "Repository not found", head)
            if repo is not None and rest.startswith("/resolve/"):
                rev, _, file = rest[len("/resolve/"):].partition("/")
                return self._resolve(repo, rev, file, head)
            self._error(404, "NotFound", f"fake hub: no route for {path}", head)

        def _api(self, path: str, query: dict, head: bool):
            repo, rest = self._find_repo(path)
            if repo is None:
                return self._error(401, "RepoNotFound", "Repository not found", head)
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            if rest in ("", "/"):
                return self._json(repo.info(blobs), head, repo.repo_id)
            m = re.fullmatch(r"/revision/([^/]+)", rest)
            if m:
                return self._check_rev(repo, m.group(1), head) and self._json(repo.info(blobs), head, repo.repo_id)
            m = re.fullmatch(r"/tree/([^/]+)(/.*)?", rest)
            if m:
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                if self._check_rev(repo, m.group(1), head):
                    self._json(repo.tree(m.group(2) or "", recursive), head, repo.repo_id)
                return None
            self._error(404, "NotFound", f"fake hub: no API route for {path}", head, repo.repo_id)

        def _resolve(self, repo: _Repo, rev: str, file: str, head: bool):
            if not self._check_rev(repo, rev, head, file):
                return
            f = repo.files_at(unquote(rev)).get(file)
            base = {"X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            if f is None:
                return self._error(404, "EntryNotFound", f"{file} does not exist", head, repo.repo_id, file, base)
            etag = f.sha256 if f.lfs else f.blob_sha1
            hdrs = {**base, "ETag": f'"{etag}"'}
            if f.lfs:
                hdrs.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
            rng = _parse_range(self.headers.get("Range"), f.size) if not head else None
            if rng == "invalid":
                return self._send(416, b"", {**hdrs, "Content-Range": f"bytes */{f.size}"}, head=head,
                                  repo=repo.repo_id, file=file)
            if head:
                return self._send(200, b"", hdrs, head=True, repo=repo.repo_id, file=file, length=f.size)
            data = f.read()
            if rng is None:
                return self._send(200, data, hdrs, repo=repo.repo_id, file=file)
            start, end = rng
            body = data[start:end + 1]
            self._send(206, body, {**hdrs, "Content-Range": f"bytes {start}-{end}/{f.size}"},
                       repo=repo.repo_id, file=file, served_range=(start, end))

        # -- uploads ---------------------------------------------------------------------------
        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _write_route(self, verb: str):
            parts = urlsplit(self.path)
            path = unquote(parts.path)
            body = self._body()
            if verb == "PUT" and path.startswith("/lfs-upload/"):  # a pre-signed URL from the batch answer: no token
                return self._lfs_put(path.rsplit("/", 1)[-1], body)
            if self.headers.get("Authorization") != f"Bearer {token}" or not token:
                return self._error(401, "Unauthorized", "Invalid credentials in Authorization header", False)
            if verb == "POST" and path == "/api/validate-yaml":  # the model card's metadata, before a commit
                return self._validate_yaml(json.loads(body or b"{}").get("content", ""))
            if verb == "POST" and path == "/api/repos/create":
                return self._create_repo(json.loads(body or b"{}"))
            if verb == "POST" and path.endswith(".git/info/lfs/objects/batch"):
                return self._lfs_batch(json.loads(body))
            if verb == "POST" and path.startswith("/api/models/"):
                repo, rest = self._find_repo(path[len("/api/models/"):])
                if repo is None:
                    return self._error(404, "RepoNotFound", "Repository not found", False)
                m = re.fullmatch(r"/(preupload|commit|branch)/(.+)", rest)
                if m and m.group(1) == "preupload":
                    return self._preupload(repo, json.loads(body))
                if m and m.group(1) == "commit":
                    return self._commit(repo, unquote(m.group(2)), body)
                if m and m.group(1) == "branch":
                    return self._branch(repo, unquote(m.group(2)))
            self._error(404, "NotFound", f"fake hub: no route for {verb} {path}", False)

        def _validate_yaml(self, content: str):
            import yaml

            m = re.match(r"^---\n(.*?)\n---\s*\n", content, re.S)  # the card's front matter, as the Hub reads it
            try:
                meta = yaml.safe_load(m.group(1)) if m else {}
            except yaml.YAMLError as e:
                return self._send(400, json.dumps({"errors": [{"message": f"invalid YAML: {e}"}]}).encode())
            if not isinstance(meta, dict):
                return self._send(400, json.dumps({"errors": [{"message": "metadata must be a mapping"}]}).encode())
            bases = meta.get("base_model") or []
            for b in [bases] if isinstance(bases, str) else bases:  # the Hub checks these are model ids
                if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(b)):
                    return self._send(400, json.dumps({"errors": [{"message": f'"base_model" is not a model id: {b}'}]}).encode())
            self._json({"errors": [], "warnings": []}, False)

        def _create_repo(self, payload: dict):
            repo_id = f"{payload.get('organization')}/{payload['name']}" if payload.get("organization") else payload["name"]
            with lock:
                exists = repo_id in repos
                if not exists:
                    repos[repo_id] = _Repo(repo_id, None, private=payload.get("visibility") == "private")
            url = f"http://{self.headers['Host']}/{repo_id}"
            if exists:  # the Hub's 409 names the existing repo's url, which create_repo(exist_ok=True) returns
                body = json.dumps({"error": "You already created this model repo", "url": url}).encode()
                return self._send(409, body, {"X-Error-Code": "RepoExists"}, repo=repo_id)
            self._json({"url": url, "name": repo_id, "id": repo_id}, False, repo_id)

        def _branch(self, repo: _Repo, branch: str):
            with lock:
                if branch == "main" or branch in repo.branches:
                    return self._error(409, "BranchExists", f"Reference already exists: {branch}", False, repo.repo_id)
                repo.branches[branch] = dict(repo.files)
            self._json({}, False, repo.repo_id)

        def _preupload(self, repo: _Repo, payload: dict):
            files = [{"path": f["path"], "uploadMode": "lfs" if Path(f["path"]).suffix in LFS_SUFFIXES else "regular",
                      "shouldIgnore": False} for f in payload.get("files", [])]
            self._json({"files": files}, False, repo.repo_id)

        def _lfs_batch(self, payload: dict):
            host = f"http://{self.headers['Host']}"
            with lock:
                announced.update(o["oid"] for o in payload.get("objects", []))
            objs = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                     "actions": {"upload": {"href": f"{host}/lfs-upload/{o['oid']}", "header": {}}}}
                    for o in payload.get("objects", [])]
            body = json.dumps({"transfer": "basic", "objects": objs}).encode()
            self._send(200, body, {"Content-Type": "application/vnd.git-lfs+json"})

        def _lfs_put(self, oid: str, data: bytes):
            if fail_uploads:
                return self._error(403, "Forbidden", "fake hub: uploads refused (fail_uploads)", False)
            if oid not in announced:
                return self._error(403, "Forbidden", "fake hub: no batch announced this upload", False)
            if hashlib.sha256(data).hexdigest() != oid:
                return self._error(400, "BadRequest", "sha256 mismatch", False)
            with lock:
                lfs_store[oid] = data
            self._send(200, b"{}")

        def _commit(self, repo: _Repo, rev: str, body: bytes):
            if repo.files_at(rev) is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", False, repo.repo_id)
            added, deleted, summary = {}, [], ""
            for line in body.splitlines():
                item = json.loads(line)
                v = item["value"]
                if item["key"] == "header":
                    summary = v.get("summary", "")
                elif item["key"] == "file":
                    added[v["path"]] = _File.of(Path(v["path"]), base64.b64decode(v["content"]), keep=True)
                elif item["key"] == "lfsFile":
                    if v["oid"] not in lfs_store:
                        return self._error(400, "BadRequest", f"LFS object {v['oid']} was never uploaded", False, repo.repo_id)
                    added[v["path"]] = _File.of(Path(v["path"]), lfs_store[v["oid"]], keep=True)
                elif item["key"] in ("deletedFile", "deletedFolder"):
                    deleted.append(v["path"])
            branch = "main" if rev == repo.sha else rev
            with lock:
                oid = repo.commit(branch, summary, added, deleted)
            host = f"http://{self.headers['Host']}"
            self._json({"commitUrl": f"{host}/{repo.repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None},
                       False, repo.repo_id)

    return Handler


@contextmanager
def fake_hub(repos: dict[str, Path], *, token: str = "hf_fake_write_token", fail_uploads: bool = False) -> Iterator[FakeHub]:
    """Serve `{repo_id: folder}` as Hub model repositories (`{"datasets/org/name": folder}` as a dataset
    repository); yields the endpoint URL (with its log). Uploads need `token`; `fail_uploads` makes
    every LFS upload fail (403)."""
    log: list[ServedRequest] = []
    served = {repo_id: _Repo(repo_id, Path(folder)) for repo_id, folder in repos.items()}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(served, log, threading.Lock(), token, fail_uploads))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="fake-hub", daemon=True)
    thread.start()
    try:
        yield FakeHub(f"http://127.0.0.1:{server.server_address[1]}", log, served, token)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def hub_env(endpoint: str, home: Path, monkeypatch) -> dict[str, str]:
    """Point huggingface_hub and `datasets` at `endpoint` with a private cache under `home`, in this
    process (os.environ, `huggingface_hub.constants` and `datasets.config`, via `monkeypatch`) and
    for subprocesses (the returned environment)."""
    from huggingface_hub import constants

    home = Path(home)
    env = {
        "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
        "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"), "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_XET": "1",
        "HF_DATASETS_OFFLINE": "0", "HF_DATASETS_CACHE": str(home / "datasets"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    patches = {
        "ENDPOINT": endpoint, "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"), "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_PROGRESS_BARS": True, "HF_HUB_DISABLE_XET": True,
    }
    for k, v in patches.items():
        if hasattr(constants, k):
            monkeypatch.setattr(constants, k, v)
    _patch_datasets_config(endpoint, home, monkeypatch)
    return {**os.environ, **env}


def _patch_datasets_config(endpoint: str, home: Path, monkeypatch) -> None:
    """`datasets` too copies the endpoint, offline flag and caches at import time. It is imported here
    (once per session) so that the patches are undone after the test: a first import inside the test
    would keep the fake endpoint for the rest of the session. The fake hub has no dataset viewer
    (datasets-server), so `datasets` is told not to ask it for Parquet exports."""
    import datasets.config as cfg

    endpoint = str(endpoint)  # a plain str: datasets copies its config, and FakeHub cannot be rebuilt from a str
    patches = {
        "HF_ENDPOINT": endpoint, "HUB_DATASETS_URL": endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
        "HF_HUB_OFFLINE": False, "HF_DATASETS_OFFLINE": False, "USE_PARQUET_EXPORT": False,
        "HF_CACHE_HOME": str(home), "HF_DATASETS_CACHE": home / "datasets",
        "DOWNLOADED_DATASETS_PATH": home / "datasets" / "downloads",
        "EXTRACTED_DATASETS_PATH": home / "datasets" / "downloads" / "extracted",
    }
    for k, v in patches.items():
        if hasattr(cfg, k):
            monkeypatch.setattr(cfg, k, v)
