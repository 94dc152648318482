"""A small JSON-over-HTTP client for OpenAI-compatible servers, on the standard library alone.

Each call is one request on a fresh connection (safe to use from many threads at once). Failures are
exceptions that `inputs.retry.is_transient` already understands: an HTTP error answer is a
`ServerResponseError` carrying its status (408/425/429/5xx transient, other 4xx not), and a server
that cannot be reached, resets the connection or sends a broken answer is a `ConnectionError`. The API
key goes into the Authorization header only: it is never part of a message, a log line or a file.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any

from caprl_cli.storage import redact


class ServerResponseError(Exception):
    """The server answered with an HTTP error status; `status` says which, the message what it said."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class ServerUnreachable(ConnectionError):
    """No answer at all: refused, reset, timed out or broken off."""


class ServerClient:
    """GET and POST JSON under one base URL (`http://host:8000/v1`)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    @property
    def root_url(self) -> str:
        """The server's root: the base URL without a trailing `/v1` (where vLLM serves /version)."""
        return self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url

    def get(self, path: str, *, root: bool = False, timeout: float | None = None) -> Any:
        """GET `path` under the base URL (or under the root with `root`), as parsed JSON."""
        return self._call("GET", path, None, root, timeout)

    def post(self, path: str, body: dict[str, Any], *, root: bool = False, timeout: float | None = None) -> Any:
        """POST `body` as JSON to `path`, the answer as parsed JSON."""
        return self._call("POST", path, json.dumps(body).encode(), root, timeout)

    def _call(self, method: str, path: str, data: bytes | None, root: bool, timeout: float | None) -> Any:
        url = (self.root_url if root else self.base_url) + path
        request = urllib.request.Request(url, data=data, headers=self._headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as answer:
                raw = answer.read()
        except urllib.error.HTTPError as exc:
            raise ServerResponseError(exc.code, _error_text(exc)) from None
        except urllib.error.URLError as exc:
            raise ServerUnreachable(f"cannot reach {redact(url)}: {_reason(exc.reason)}") from None
        except (OSError, http.client.HTTPException) as exc:  # reset, timeout, truncated answer
            raise ServerUnreachable(f"{method} {redact(url)} failed: {_reason(exc)}") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise ServerResponseError(502, f"{method} {redact(url)} answered something that is not JSON") from None


def _error_text(exc: urllib.error.HTTPError) -> str:
    """What an error answer says: the OpenAI-style `error.message` if present, else its text, short."""
    try:
        body = exc.read()[:4000].decode("utf-8", "replace")
    except Exception:
        body = ""
    message = body
    try:
        parsed = json.loads(body)
        error = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
        message = error.get("message") or error.get("detail") or body if isinstance(error, dict) else str(error)
    except ValueError:
        pass
    text = " ".join(str(message).split()) or (exc.reason or "no message")
    return text[:500]


def _reason(reason: object) -> str:
    text = str(reason).strip()
    name = type(reason).__name__
    return f"{name}: {text}" if text and not isinstance(reason, str) else text or name
