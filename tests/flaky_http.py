"""An HTTP server on 127.0.0.1 for tests of transient failures: it answers 503 for chosen paths (always,
or for their first N requests), can cut a body short, and counts the requests for each path."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


class Flaky:
    """What the server does: which paths answer 503 (always, or for their first N requests), and how
    many requests each path got."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.failing: set[str] = set()
        self.fail_first: dict[str, int] = {}
        self.requests: Counter[str] = Counter()
        self.cut: dict[str, int] = {}  # path -> bytes of the body sent before the connection is dropped

    def should_fail(self, path: str) -> bool:
        with self.lock:
            self.requests[path] += 1
            if path in self.failing:
                return True
            left = self.fail_first.get(path, 0)
            if left:
                self.fail_first[path] = left - 1
                return True
            return False


def _handler(flaky: Flaky, folder: Path) -> type[SimpleHTTPRequestHandler]:
    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)

        def _answer(self, serve) -> None:
            if flaky.should_fail(self.path.split("?", 1)[0]):
                self.send_response(503, "Service Unavailable")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            serve()

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path in flaky.cut:
                flaky.requests[path] += 1
                data = (folder / path.lstrip("/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: flaky.cut[path]])
                self.wfile.flush()
                self.close_connection = True  # the body ends early: the client sees a broken transfer
                return
            self._answer(super().do_GET)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(super().do_HEAD)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def flaky_server(tmp_path: Path) -> Iterator[tuple[Flaky, Path, str]]:
    """(controls, served folder, base URL) of a server that fails on demand."""
    folder = tmp_path / "served"
    folder.mkdir()
    flaky = Flaky()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(flaky, folder))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield flaky, folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
