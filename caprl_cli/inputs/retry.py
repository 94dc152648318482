"""Remote reads that fail for a moment are tried again, and told apart from reads that never will work.

Object stores and HTTP servers answer 503 under load, throttle with 429, drop connections and let
credentials expire; a corpus read over hours meets all of these. Such a failure says nothing about the
image, so it must neither cost the image (a final error row) nor stop the run: it is retried a few
times with growing, jittered pauses, and if it still fails the sample becomes an `unavailable` row that
the next run tries again. A 404 or corrupt bytes will fail the same way every time: those are final.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

BASE_DELAY_S = 0.5  # the first pause; each further one doubles
MAX_DELAY_S = 20.0  # no single pause is longer than this

# HTTP statuses that mean "not now" rather than "never": request timeout, throttling, server trouble.
_TRANSIENT_HTTP = frozenset({408, 425, 429})
# botocore error codes for throttling, timeouts, server trouble and credentials that ran out.
_TRANSIENT_AWS_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "SlowDown",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestThrottled",
        "RequestThrottledException",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        "TokenRefreshRequired",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
    }
)
# botocore exceptions (by class name, so botocore need not be installed) for a connection that broke.
_TRANSIENT_AWS_CLASSES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "ProxyConnectionError",
        "CredentialRetrievalError",
    }
)
# aiohttp exceptions (by class name) for a connection or a body that broke off.
_TRANSIENT_AIOHTTP_CLASSES = frozenset(
    {
        "ServerDisconnectedError",
        "ServerConnectionError",
        "ClientConnectionError",
        "ClientConnectorError",
        "ClientOSError",
        "ClientPayloadError",
        "ServerTimeoutError",
        "ConnectionTimeoutError",
        "SocketTimeoutError",
    }
)


def is_transient(exc: BaseException) -> bool:
    """True when a read failed for a reason that may be gone on the next try.

    Transient: timeouts, refused/reset/aborted/broken connections, a server that disconnected, HTTP 408,
    429 and 5xx, and from botocore throttling, 5xx, RequestTimeout, expired tokens and 401/403.
    Not transient: 404 (`FileNotFoundError`), other 4xx, and anything about the bytes themselves.
    Backends wrap the real cause (fsspec's HTTP filesystem raises `FileNotFoundError` from a 503 when it
    cannot learn a file's size; s3fs turns botocore errors into `OSError`s), so the causes are followed.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _transient_itself(current):
            return True
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return False


def _transient_itself(exc: BaseException) -> bool:
    """`exc` alone, without its causes."""
    name = type(exc).__name__
    status = _http_status(exc)
    if status is not None:
        return status in _TRANSIENT_HTTP or 500 <= status <= 599
    if name in _TRANSIENT_AIOHTTP_CLASSES or name in _TRANSIENT_AWS_CLASSES:
        return True
    if isinstance(exc, (TimeoutError, ConnectionError)):  # refused, reset, aborted, broken pipe, timeouts
        return True
    return False


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status an exception reports: aiohttp's `.status`, botocore's response metadata.

    For botocore a known transient error code counts as a 503, and 401/403 (credentials that expired or
    were rotated mid-run) as a 503 too."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _TRANSIENT_AWS_CODES or status in (401, 403):
            return 503
        return status if isinstance(status, int) else (int(code) if code.isdigit() else 400)
    status = getattr(exc, "status", None)
    if isinstance(status, int) and 100 <= status <= 599 and type(exc).__name__.endswith("ResponseError"):
        return status
    return None


def backoff_delays(
    retries: int,
    base: float = BASE_DELAY_S,
    cap: float = MAX_DELAY_S,
    rng: Callable[[], float] = random.random,
) -> list[float]:
    """The pauses before each retry: `base * 2**n`, capped, each scaled by a random 50-100% so many
    workers that failed together do not all come back at the same instant."""
    return [min(cap, base * 2**attempt) * (0.5 + 0.5 * rng()) for attempt in range(retries)]


def with_retries(
    call: Callable[[], T],
    retries: int,
    *,
    sleep: Callable[[float], None] = time.sleep,
    base: float = BASE_DELAY_S,
    cap: float = MAX_DELAY_S,
    rng: Callable[[], float] = random.random,
) -> T:
    """`call()`, tried again up to `retries` times while it fails transiently; the last failure, or
    the first permanent one, is raised as it was."""
    for delay in backoff_delays(retries, base, cap, rng):
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
        sleep(delay)
    return call()
