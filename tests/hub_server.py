"""A model hub on 127.0.0.1 that `huggingface_hub.snapshot_download` downloads from (via HF_ENDPOINT).

It implements the few routes snapshot_download uses, read from huggingface_hub's own client code:

- `GET /api/models/{repo}/revision/{rev}`: the repo's info, whose `sha` resolves a branch to a commit;
- `GET /api/models/{repo}/tree/{commit}`: the file listing (path, size, blob id);
- `HEAD` and `GET /{repo}/resolve/{rev}/{path}`: a file's metadata (X-Repo-Commit, ETag, size) and its
  bytes, honouring `Range` (huggingface_hub resumes a dropped transfer within a run).

Unknown repos and revisions answer 404 with the hub's X-Error-Code. A file can be set to die part-way:
the server sends that many bytes, then stops listening altogether, as a crashed hub would.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/.*)?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


@dataclass
class Repo:
    """A model repo: its commits (hash -> {path: bytes}) and branches (name -> commit hash)."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def add_commit(self, files: dict[str, bytes], branch: str | None = "main") -> str:
        digest = hashlib.sha1(json.dumps(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items())).encode())
        commit = digest.hexdigest()
        self.commits[commit] = files
        if branch is not None:
            self.branches[branch] = commit
        return commit

    def commit_of(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.branches.get(revision)


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by path relative to it."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


class Hub:
    """The hub's content, what it was asked, and the faults to play."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.die_after: dict[str, int] = {}  # file path in a repo -> bytes sent before the hub dies
        self.served: list[str] = []  # file paths whose bytes were sent to the end, in order
        self._server: ThreadingHTTPServer | None = None
        self.dead = False

    def repo(self, repo_id: str) -> Repo:
        return self.repos.setdefault(repo_id, Repo())

    def start(self) -> str:
        """Listen on a free port of 127.0.0.1; returns the endpoint URL (no trailing slash)."""
        self.dead = False
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        """Stop listening: later connections are refused."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def ranges(self, path_suffix: str) -> list[str | None]:
        """The Range headers of the GETs of files ending in `path_suffix`."""
        with self.lock:
            return [rng for method, path, rng in self.requests if method == "GET" and path.endswith(path_suffix)]


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._answer(send_body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(send_body=False)

        def _answer(self, send_body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            if hub.dead:  # gone: the connection drops before any answer
                self.close_connection = True
                return
            with hub.lock:
                hub.requests.append((self.command, path, self.headers.get("Range")))
            for pattern, route in ((_INFO, self._info), (_TREE, self._tree), (_RESOLVE, self._resolve)):
                match = pattern.match(path)
                if match:
                    route(match, send_body)
                    return
            self._error(404, "EntryNotFound", "no such route")

        def _found(self, match: re.Match[str]) -> tuple[Repo, str] | None:
            repo = hub.repos.get(match["repo"])
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository {match['repo']} not found")
                return None
            commit = repo.commit_of(match["rev"])
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {match['rev']}")
                return None
            return repo, commit

        def _info(self, match: re.Match[str], send_body: bool) -> None:
            found = self._found(match)
            if found:
                repo, commit = found
                siblings = [{"rfilename": name} for name in sorted(repo.commits[commit])]
                self._json({"id": match["repo"], "modelId": match["repo"], "sha": commit, "private": False,
                            "siblings": siblings}, send_body)

        def _tree(self, match: re.Match[str], send_body: bool) -> None:
            found = self._found(match)
            if found:
                repo, commit = found
                listing = [
                    {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in sorted(repo.commits[commit].items())
                ]
                self._json(listing, send_body)

        def _resolve(self, match: re.Match[str], send_body: bool) -> None:
            found = self._found(match)
            if not found:
                return
            repo, commit = found
            data = repo.commits[commit].get(match["path"])
            if data is None:
                self._error(404, "EntryNotFound", f"{match['path']} not found", commit)
                return
            start = 0
            wanted = self.headers.get("Range")
            if wanted and send_body:
                start = int(re.match(r"bytes=(\d+)-", wanted).group(1))
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if not send_body:
                return
            cut = hub.die_after.get(match["path"])
            if cut is None or start:
                self.wfile.write(data[start:])
                with hub.lock:
                    hub.served.append(match["path"])
                return
            self.wfile.write(data[:cut])
            self.wfile.flush()
            self.close_connection = True
            hub.dead = True  # the hub goes away mid-file: nothing answers from now on
            threading.Thread(target=hub.stop, daemon=True).start()

        def _json(self, value: object, send_body: bool) -> None:
            data = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if send_body:
                self.wfile.write(data)

        def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
            data = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler

