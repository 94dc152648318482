"""Which read failures are transient, and the bounded, jittered retries around remote reads."""

from __future__ import annotations

import asyncio
import errno

import aiohttp
import pytest
from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError

from caprl_cli.inputs.retry import backoff_delays, is_transient, with_retries


def http_error(status: int) -> aiohttp.ClientResponseError:
    request = aiohttp.RequestInfo(url=aiohttp.client.URL("http://127.0.0.1/x.tar"), method="GET", headers={})
    return aiohttp.ClientResponseError(request, (), status=status, message="answer")


def aws_error(code: str, status: int) -> ClientError:
    response = {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "GetObject")


def wrapped(outer: BaseException, cause: BaseException) -> BaseException:
    """`outer` raised `from cause`, as fsspec and s3fs wrap backend errors."""
    try:
        raise outer from cause
    except BaseException as exc:  # noqa: BLE001 - building the chain is the point
        return exc


@pytest.mark.parametrize(
    "exc",
    [
        TimeoutError("timed out"),
        asyncio.TimeoutError(),
        ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
        ConnectionResetError(errno.ECONNRESET, "reset"),
        ConnectionAbortedError(errno.ECONNABORTED, "aborted"),
        BrokenPipeError(errno.EPIPE, "broken pipe"),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("Response payload is not completed"),
        aiohttp.ServerTimeoutError("read timed out"),
        http_error(429),
        http_error(500),
        http_error(502),
        http_error(503),
        http_error(504),
        http_error(408),
        aws_error("SlowDown", 503),
        aws_error("ThrottlingException", 400),
        aws_error("RequestTimeout", 400),
        aws_error("ExpiredToken", 400),
        aws_error("InternalError", 500),
        aws_error("AccessDenied", 403),
        aws_error("InvalidToken", 401),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
        # fsspec's HTTP filesystem raises FileNotFoundError from a 503 when it cannot learn the size
        wrapped(FileNotFoundError("http://127.0.0.1/x.tar"), http_error(503)),
        # s3fs turns botocore errors into OSErrors raised from them
        wrapped(OSError(errno.EIO, "slow down"), aws_error("SlowDown", 503)),
        wrapped(PermissionError(errno.EACCES, "expired"), aws_error("ExpiredToken", 400)),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_transient_failures(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        FileNotFoundError("http://127.0.0.1/x.tar"),  # fsspec: 404
        wrapped(FileNotFoundError("http://127.0.0.1/x.tar"), http_error(404)),
        http_error(404),
        http_error(400),
        http_error(401),
        http_error(403),
        http_error(410),
        aws_error("NoSuchKey", 404),
        aws_error("NoSuchBucket", 404),
        wrapped(FileNotFoundError("s3://b/k"), aws_error("NoSuchKey", 404)),
        PermissionError(errno.EACCES, "permission denied"),  # a local file
        OSError(errno.EIO, "input/output error"),
        EOFError("compressed file ended before the end-of-stream marker"),
        ValueError("not an image"),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_permanent_failures(exc: BaseException) -> None:
    assert not is_transient(exc)


class Flaky:
    """Fails with `error` for the first `failures` calls, then answers."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "bytes"


def test_retries_until_a_transient_failure_passes() -> None:
    pauses: list[float] = []
    flaky = Flaky(2, http_error(503))
    assert with_retries(flaky, 2, sleep=pauses.append) == "bytes"
    assert flaky.calls == 3 and len(pauses) == 2


def test_gives_up_after_the_retries_with_the_last_error() -> None:
    pauses: list[float] = []
    flaky = Flaky(5, ConnectionResetError(errno.ECONNRESET, "reset"))
    with pytest.raises(ConnectionResetError):
        with_retries(flaky, 3, sleep=pauses.append)
    assert flaky.calls == 4 and len(pauses) == 3


def test_permanent_failure_is_not_retried() -> None:
    pauses: list[float] = []
    flaky = Flaky(5, FileNotFoundError("gone"))
    with pytest.raises(FileNotFoundError):
        with_retries(flaky, 3, sleep=pauses.append)
    assert flaky.calls == 1 and pauses == []


def test_zero_retries_tries_once() -> None:
    flaky = Flaky(1, http_error(503))
    with pytest.raises(aiohttp.ClientResponseError):
        with_retries(flaky, 0, sleep=pytest.fail)
    assert flaky.calls == 1


def test_backoff_grows_is_capped_and_jittered() -> None:
    top = backoff_delays(6, base=1.0, cap=5.0, rng=lambda: 1.0)
    assert top == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    bottom = backoff_delays(6, base=1.0, cap=5.0, rng=lambda: 0.0)
    assert bottom == [0.5, 1.0, 2.0, 2.5, 2.5, 2.5]
    assert backoff_delays(0) == []
