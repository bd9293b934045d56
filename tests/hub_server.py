"""A small Hugging Face Hub-compatible HTTP server for offline tests.

`LocalHub` serves the subset of the Hub API that the real clients use (huggingface_hub 2.x `HfApi`,
`hf_hub_download`, `snapshot_download`, `upload_folder`, `create_commit`; transformers `from_pretrained`;
datasets `load_dataset`), on 127.0.0.1, standard library only. Point clients at it with
`HfApi(endpoint=hub.url)` / `hf_hub_download(..., endpoint=hub.url)` in-process, or with `HF_ENDPOINT=<hub.url>`
in a subprocess (huggingface_hub reads `HF_ENDPOINT` at import time; `HF_HUB_OFFLINE` must be unset).

Supported:
- repo types `model` and `dataset`; ids are always `namespace/name` (a bare name is put under `hub.user`);
  a new repo gets an initial commit holding `.gitattributes`, like on the Hub;
- every commit has a new 40-hex sha and stores a full snapshot, so any commit sha is a valid revision;
  branches (`main`, `create_branch`, commits with `revision=BRANCH`), `create_pr=True` commits and
  `create_pull_request` (both land on `refs/pr/N`), deletions of files and folders, `parent_commit` checks (412);
- `POST /api/repos/create` (409 when it exists: the client handles `exist_ok`), `POST /api/repos/delete`,
  `POST /api/validate-yaml`, `GET /api/whoami-v2`,
  `GET /api/{models,datasets}/{id}[/revision/{rev}]`, `GET .../tree/{rev}[/{path}]?recursive=`
  (404 `EntryNotFound` for a missing folder), `POST .../paths-info/{rev}`, `POST .../preupload/{rev}`,
  `POST .../commit/{rev}[?create_pr=1]` (NDJSON, base64 files), `GET .../refs`, `POST|DELETE .../branch/{b}`,
  `POST .../discussions` (pull requests), `GET .../discussions/{n}`;
- `HEAD`/`GET /{id}/resolve/{rev}/{path}` and `/datasets/{id}/resolve/{rev}/{path}` with `ETag` (git blob sha1),
  `X-Repo-Commit`, `Content-Length`, single `Range` requests (206/416); 404 with `X-Error-Code` `RepoNotFound`,
  `RevisionNotFound` or `EntryNotFound` (the latter with `X-Repo-Commit`, so clients cache the absence);
- optional auth: `LocalHub(token="...")` answers 401 to writes without `Authorization: Bearer <token>`; private
  repos answer 401 `RepoNotFound` to reads without it (without a server token any bearer header opens them);
- `GET /api/agent-harnesses` (an empty registry: huggingface_hub probes it for its user-agent unless telemetry is off);
- `hub.requests` records every request (method, raw path, lower-cased headers, body, status); `hub.files()` and
  `hub.refs()` show the server-side state; `hub.env(hf_home)` is the environment for a subprocess client;
- the `local_hub` pytest fixture (function-scoped, started; keyword arguments via indirect parametrization).

Not supported: LFS/Xet transfer. Preupload answers "regular" for every file, whatever its size, so the client sends
the content base64-encoded inside the NDJSON commit; huggingface_hub 2.4 has no client-side size limit or Xet
requirement for "regular" files (a 60 MB file round-trips in ~3 s), but client and server hold the whole payload in
memory: keep test files small. Also not supported: commit
`lfsFile`/copy operations (400), tags, spaces, pagination (one page), discussions other than pull requests'
metadata, `.gitignore` rules, merges, gated repos, `expand=True` metadata (last commit, security).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

GITATTRIBUTES = b"""*.bin filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.parquet filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
"""
_ENV_DROPPED = {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE", "HF_TOKEN_PATH"}
REPO_TYPES = {"models": "model", "datasets": "dataset"}


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 of `data` (what the Hub reports as `oid`/`ETag` for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubError(Exception):
    """An error answered as JSON `{"error": message}` with the Hub's `X-Error-Code` header."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class Commit:
    sha: str
    files: dict[str, str]  # path -> blob oid
    title: str
    parent: str | None
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    refs: dict[str, str] = field(default_factory=dict)  # "main", "dev", "refs/pr/1" -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)
    pull_requests: dict[int, str] = field(default_factory=dict)  # num -> title


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # raw request target, query included
    headers: dict[str, str]  # lower-cased names
    body: bytes
    status: int


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    file: Path | None = None  # streamed instead of `body`: bytes [offset, offset + length)
    offset: int = 0
    length: int = 0


def _json(data: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(data).encode(), {"Content-Type": "application/json"})


class LocalHub:
    """A Hub-compatible server on 127.0.0.1 (see the module docstring); use as a context manager."""

    def __init__(self, token: str | None = None, user: str = "local-user") -> None:
        self.token, self.user = token, user
        self.requests: list[RecordedRequest] = []
        self._repos: dict[tuple[str, str], Repo] = {}
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> LocalHub:
        self._tmp = tempfile.TemporaryDirectory(prefix="localhub-")
        (Path(self._tmp.name) / "blobs").mkdir()
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers for tests

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        """Server-side view of a revision: path -> content."""
        with self._lock:
            commit = self._resolve(self._repo(repo_type, repo_id), revision)
            return {path: self._blob(oid).read_bytes() for path, oid in commit.files.items()}

    def env(self, hf_home: str | Path) -> dict[str, str]:
        """Environment for a subprocess that must use this hub: `HF_ENDPOINT` set, offline flags and tokens unset."""
        env = {k: v for k, v in os.environ.items() if k not in _ENV_DROPPED}
        env.update(HF_ENDPOINT=self.url, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1")
        return env

    def refs(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        """Branches and pull-request refs -> commit sha."""
        with self._lock:
            return dict(self._repo(repo_type, repo_id).refs)

    # ------------------------------------------------------------------ storage

    def _blob(self, oid: str) -> Path:
        assert self._tmp is not None
        return Path(self._tmp.name) / "blobs" / oid

    def _store(self, data: bytes) -> str:
        oid = git_blob_oid(data)
        path = self._blob(oid)
        if not path.exists():
            tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return oid

    def _new_commit(self, repo: Repo, files: dict[str, str], title: str, parent: str | None) -> Commit:
        seed = json.dumps([repo.repo_id, parent, title, next(self._counter), sorted(files.items())])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), files, title, parent, _now())
        repo.commits[commit.sha] = commit
        return commit

    def _repo(self, repo_type: str, repo_id: str, headers: dict[str, str] | None = None) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        if headers is not None and repo.private and not self._authorized(headers):
            raise HubError(401, "Repository not found (private repo, missing or wrong token)", "RepoNotFound")
        return repo

    @staticmethod
    def _branch(revision: str) -> str:
        return revision.removeprefix("refs/heads/")

    def _resolve(self, repo: Repo, revision: str) -> Commit:
        sha = repo.refs.get(self._branch(revision)) or (revision if revision in repo.commits else None)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[sha]

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{'datasets/' if repo.repo_type == 'dataset' else ''}{repo.repo_id}"

    # ------------------------------------------------------------------ auth

    def _authorized(self, headers: dict[str, str]) -> bool:
        auth = headers.get("authorization", "")
        return auth == f"Bearer {self.token}" if self.token is not None else auth.startswith("Bearer ")

    def _check_write(self, headers: dict[str, str]) -> None:
        if self.token is not None and not self._authorized(headers):
            raise HubError(401, "Invalid credentials in Authorization header")

    # ------------------------------------------------------------------ routing

    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Reply:
        split = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        parts = [unquote(p) for p in split.path.strip("/").split("/")]
        with self._lock:
            if parts[0] == "api":
                return self._api(method, parts[1:], query, headers, body)
            repo_type = "model"
            if parts[0] == "datasets":
                repo_type, parts = "dataset", parts[1:]
            if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                rev, rest = _take_revision(parts[3:])
                return self._resolve_file(repo_type, f"{parts[0]}/{parts[1]}", rev, "/".join(rest), headers)
        raise HubError(404, f"LocalHub has no route for {method} {split.path}")

    def _api(self, method: str, parts: list[str], query: dict[str, str], headers: dict[str, str], body: bytes) -> Reply:
        if parts == ["whoami-v2"] and method == "GET":
            if not self._authorized(headers):
                raise HubError(401, "Invalid credentials in Authorization header")
            token_info = {"displayName": "local", "role": "write"}
            return _json({"type": "user", "id": "0", "name": self.user, "fullname": self.user, "orgs": [],
                          "auth": {"type": "access_token", "accessToken": token_info}})
        if parts == ["agent-harnesses"] and method == "GET":  # huggingface_hub's user-agent probe
            return _json({"standardEnvVars": [], "harnesses": {}})
        if parts == ["validate-yaml"] and method == "POST":
            return _json({"errors": [], "warnings": []})
        if parts[:1] == ["repos"] and method == "POST":
            self._check_write(headers)
            payload = json.loads(body or b"{}")
            repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
            repo_type = payload.get("type") or "model"
            if parts[1:] == ["create"]:
                return self._create_repo(repo_type, repo_id, payload)
            if parts[1:] == ["delete"]:
                self._repo(repo_type, repo_id)
                del self._repos[(repo_type, repo_id)]
                return _json({})
        if len(parts) >= 3 and parts[0] in REPO_TYPES:
            repo = self._repo(REPO_TYPES[parts[0]], f"{parts[1]}/{parts[2]}", headers)
            action, rest = (parts[3], parts[4:]) if len(parts) > 3 else ("", [])
            if method != "GET" and action != "paths-info":
                self._check_write(headers)
            rev, rest = _take_revision(rest) if rest else ("main", [])
            key = (method, action)
            if key in (("GET", ""), ("GET", "revision")):
                return _json(self._info(repo, self._resolve(repo, rev)))
            if key == ("GET", "tree"):
                recursive = query.get("recursive", "false").lower() in ("1", "true")
                return _json(self._tree(self._resolve(repo, rev), "/".join(rest), recursive))
            if key == ("POST", "paths-info"):
                paths = parse_qs(body.decode()).get("paths", [])
                return _json(self._paths_info(self._resolve(repo, rev), paths))
            if key == ("POST", "preupload"):
                return _json(self._preupload(repo, rev, json.loads(body)))
            if key == ("POST", "commit"):
                return _json(self._commit(repo, rev, body, query.get("create_pr") in ("1", "true", "True")))
            if key == ("GET", "refs"):
                return _json(self._refs(repo))
            if action == "branch" and method in ("POST", "DELETE"):
                return _json(self._branch_op(repo, method, rev, json.loads(body or b"{}")))
            if key == ("POST", "discussions"):
                return _json(self._open_pull_request(repo, json.loads(body)))
            if key == ("GET", "discussions"):
                return _json(self._pull_request(repo, int(rev)))
        raise HubError(404, f"LocalHub has no route for {method} /api/{'/'.join(parts)}")

    # ------------------------------------------------------------------ endpoints

    def _create_repo(self, repo_type: str, repo_id: str, payload: dict[str, Any]) -> Reply:
        if repo_type not in REPO_TYPES.values():
            raise HubError(400, f"LocalHub does not support repo type {repo_type!r}")
        if (repo_type, repo_id) in self._repos:
            repo = self._repos[(repo_type, repo_id)]
            return _json({"error": f"You already created this {repo_type} repo", "url": self._repo_url(repo)}, 409)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = Repo(repo_type, repo_id, private, _now())
        repo.refs["main"] = self._new_commit(repo, {".gitattributes": self._store(GITATTRIBUTES)}, "initial commit",
                                             None).sha
        self._repos[(repo_type, repo_id)] = repo
        return _json({"url": self._repo_url(repo), "name": repo_id, "id": repo.refs["main"][:24]})

    def _info(self, repo: Repo, commit: Commit) -> dict[str, Any]:
        siblings = [{"rfilename": p, "size": self._blob(oid).stat().st_size, "blobId": oid}
                    for p, oid in sorted(commit.files.items())]
        namespace = repo.repo_id.split("/")[0]
        return {"_id": repo.repo_id, "id": repo.repo_id, "author": namespace, "sha": commit.sha,
                "private": repo.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
                "tags": [], "createdAt": repo.created_at, "lastModified": commit.date, "siblings": siblings}

    def _file_entry(self, path: str, oid: str) -> dict[str, Any]:
        return {"type": "file", "oid": oid, "size": self._blob(oid).stat().st_size, "path": path}

    @staticmethod
    def _dir_entry(commit: Commit, path: str) -> dict[str, Any]:
        listing = sorted((p, oid) for p, oid in commit.files.items() if p.startswith(path + "/"))
        return {"type": "directory", "oid": hashlib.sha1(json.dumps(listing).encode()).hexdigest(), "path": path}

    def _tree(self, commit: Commit, folder: str, recursive: bool) -> list[dict[str, Any]]:
        folder = folder.strip("/")
        prefix = folder + "/" if folder else ""
        under = {p: oid for p, oid in commit.files.items() if p.startswith(prefix)}
        if folder and not under:
            raise HubError(404, f"{folder} does not exist on this revision", "EntryNotFound")
        dirs: set[str] = set()
        files: list[dict[str, Any]] = []
        for path, oid in under.items():
            parts = path[len(prefix):].split("/")
            depth = len(parts) - 1 if recursive else min(1, len(parts) - 1)
            dirs.update(prefix + "/".join(parts[: i + 1]) for i in range(depth))
            if recursive or len(parts) == 1:
                files.append(self._file_entry(path, oid))
        return [self._dir_entry(commit, d) for d in sorted(dirs)] + sorted(files, key=lambda e: e["path"])

    def _paths_info(self, commit: Commit, paths: list[str]) -> list[dict[str, Any]]:
        out = []
        for path in (p.strip("/") for p in paths):
            if path in commit.files:
                out.append(self._file_entry(path, commit.files[path]))
            elif any(p.startswith(path + "/") for p in commit.files):
                out.append(self._dir_entry(commit, path))
        return out

    def _preupload(self, repo: Repo, rev: str, payload: dict[str, Any]) -> dict[str, Any]:
        commit = self._resolve(repo, rev)
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": commit.files.get(f["path"])}
                 for f in payload["files"]]
        return {"files": files, "commitOid": commit.sha}

    def _commit(self, repo: Repo, rev: str, body: bytes, create_pr: bool) -> dict[str, Any]:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        ref = self._branch(rev)
        if ref not in repo.refs:
            raise HubError(404, f"Invalid rev id: {rev} (commits go to a branch or refs/pr/N)", "RevisionNotFound")
        base = repo.commits[repo.refs[ref]]
        if header.get("parentCommit") not in (None, base.sha):
            raise HubError(412, f"parentCommit {header['parentCommit']} is not the head of {rev} ({base.sha})")
        files = dict(base.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"].strip("/")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[path] = self._store(base64.b64decode(value["content"]))
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                gone = [p for p in files if p.startswith(path + "/")]
                if not gone:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in gone:
                    del files[p]
            else:
                raise HubError(400, f"LocalHub does not support {key!r} operations (LFS/Xet/copies)")
        commit = self._new_commit(repo, files, header.get("summary", ""), base.sha)
        pr_url = None
        if create_pr:
            num = self._new_pull_request(repo, header.get("summary", ""), commit.sha)
            pr_url = f"{self._repo_url(repo)}/discussions/{num}"
        else:
            repo.refs[ref] = commit.sha
        return {"success": True, "commitOid": commit.sha, "commitUrl": f"{self._repo_url(repo)}/commit/{commit.sha}",
                "pullRequestUrl": pr_url}

    def _new_pull_request(self, repo: Repo, title: str, sha: str) -> int:
        num = len(repo.pull_requests) + 1
        repo.pull_requests[num] = title
        repo.refs[f"refs/pr/{num}"] = sha
        return num

    def _open_pull_request(self, repo: Repo, payload: dict[str, Any]) -> dict[str, Any]:
        if not payload.get("pullRequest"):
            raise HubError(400, "LocalHub only supports pull requests, not discussions")
        num = self._new_pull_request(repo, payload["title"], repo.refs["main"])
        return {"num": num, "url": f"{self._repo_url(repo)}/discussions/{num}"}

    def _pull_request(self, repo: Repo, num: int) -> dict[str, Any]:
        if num not in repo.pull_requests:
            raise HubError(404, f"Discussion {num} not found")
        return {"num": num, "title": repo.pull_requests[num], "status": "draft", "isPullRequest": True,
                "createdAt": repo.commits[repo.refs[f"refs/pr/{num}"]].date, "author": {"name": self.user},
                "repo": {"name": repo.repo_id, "type": repo.repo_type}, "events": [],
                "changes": {"base": "refs/heads/main"}, "filesWithConflicts": [], "diff": ""}

    @staticmethod
    def _refs(repo: Repo) -> dict[str, Any]:
        def ref(name: str, full: str) -> dict[str, str]:
            return {"name": name, "ref": full, "targetCommit": repo.refs[name]}

        return {"branches": [ref(n, f"refs/heads/{n}") for n in repo.refs if not n.startswith("refs/")],
                "converts": [], "tags": [], "pullRequests": [ref(n, n) for n in repo.refs if n.startswith("refs/pr/")]}

    def _branch_op(self, repo: Repo, method: str, branch: str, payload: dict[str, Any]) -> dict[str, Any]:
        branch = self._branch(branch)
        if method == "DELETE":
            if branch not in repo.refs or branch == "main":
                raise HubError(404 if branch != "main" else 403, f"Cannot delete branch {branch}", "RevisionNotFound")
            del repo.refs[branch]
            return {}
        if branch in repo.refs:
            raise HubError(409, f"Branch {branch} already exists")
        repo.refs[branch] = self._resolve(repo, payload.get("startingPoint") or "main").sha
        return {}

    def _resolve_file(self, repo_type: str, repo_id: str, rev: str, path: str, headers: dict[str, str]) -> Reply:
        repo = self._repo(repo_type, repo_id, headers)
        commit = self._resolve(repo, rev)
        oid = commit.files.get(path)
        if oid is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        blob = self._blob(oid)
        size = blob.stat().st_size
        reply = Reply(200, headers={"ETag": f'"{oid}"', "X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes",
                                    "Content-Type": "application/octet-stream"}, file=blob, length=size)
        wanted = headers.get("range", "")
        if wanted.startswith("bytes=") and "," not in wanted:
            first, _, last = wanted[6:].partition("-")
            start = int(first) if first else max(size - int(last), 0)
            end = min(int(last), size - 1) if first and last else size - 1
            if start >= size or start > end:
                raise HubError(416, f"Range {wanted} not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            reply.status, reply.offset, reply.length = 206, start, end - start + 1
            reply.headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return reply


def _take_revision(parts: list[str]) -> tuple[str, list[str]]:
    """Split `[rev, *rest]`, also accepting an unquoted `refs/pr/N`-style revision spread over 3 segments."""
    if parts[0] == "refs" and len(parts) >= 3 and parts[1] in ("pr", "heads", "convert"):
        return "/".join(parts[:3]), parts[3:]
    return parts[0], parts[1:]


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"  # keep-alive: every reply carries Content-Length

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self) -> None:
        body = self._read_body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            reply = self.hub.handle(self.command, self.path, headers, body)
        except HubError as e:
            reply = _json({"error": e.message}, e.status)
            reply.headers.update(e.headers)
            reply.headers["X-Error-Message"] = e.message.encode("latin-1", "replace").decode("latin-1")
            if e.code:
                reply.headers["X-Error-Code"] = e.code
        except Exception as e:  # a LocalHub bug: say so instead of dropping the connection
            reply = _json({"error": f"LocalHub internal error: {e!r}"}, 500)
        self.hub.requests.append(RecordedRequest(self.command, self.path, headers, body, reply.status))
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(reply.length if reply.file is not None else len(reply.body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if reply.file is None:
            self.wfile.write(reply.body)
            return
        with reply.file.open("rb") as f:
            f.seek(reply.offset)
            remaining = reply.length
            while remaining > 0 and (chunk := f.read(min(remaining, 1 << 20))):
                self.wfile.write(chunk)
                remaining -= len(chunk)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch


@pytest.fixture
def local_hub(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[LocalHub]:
    """A started `LocalHub`; without a token unless parametrized indirectly with `LocalHub` keyword arguments:
    `@pytest.mark.parametrize("local_hub", [{"token": "hf_x"}], indirect=True)`.

    No Hub token from the environment or the token file is sent to it, and an already imported huggingface_hub
    does not probe huggingface.co for its user-agent (`/api/agent-harnesses`, skipped when telemetry is off).
    """
    no_token = str(tmp_path / "no-hf-token")  # never created: hides a token saved by `hf auth login`
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", no_token)
    if (constants := sys.modules.get("huggingface_hub.constants")) is not None:
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", no_token)
    with LocalHub(**getattr(request, "param", {})) as hub:
        yield hub
