"""Retries with backoff for transient errors only.

Dagster's ``RetryPolicy`` retries any exception. Retrying a corrupt input, a bad config value or a
bug three times only delays the failure (and on a GPU node wastes the node), so asset bodies are
wrapped with ``retry_transient_only``: errors that a retry can plausibly fix (network resets,
timeouts, S3 throttling, a GPU that is momentarily out of memory) propagate unchanged and the
policy retries them with exponential backoff; everything else becomes a ``dg.Failure`` with
``allow_retries=False`` and fails the step at once, with the original exception as its cause.
"""

import errno
import functools
import os
from collections.abc import Callable

import dagster as dg

#: errno values of OSErrors raised by sockets / network file systems that a later attempt can fix
TRANSIENT_ERRNOS = frozenset({
    errno.EAGAIN, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.ESTALE, errno.EBUSY,
})
#: class names of transient errors from libraries we do not import here (botocore, aiohttp, torch)
TRANSIENT_CLASS_NAMES = frozenset({
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ServerDisconnectedError", "ClientConnectionError", "ClientPayloadError", "OutOfMemoryError",
    "IncompleteRead", "ProtocolError",
})
#: fragments of S3 error codes/messages for throttling and server-side hiccups (s3fs maps them to OSError)
TRANSIENT_MESSAGES = ("SlowDown", "ServiceUnavailable", "RequestTimeout", "Throttl", "InternalError",
                      "503", "Connection reset", "timed out")


def is_transient(exc: BaseException) -> bool:
    """True when a retry of the same step can succeed without anyone changing data, code or config."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:  # also look through `raise ... from`
        seen.add(id(current))
        if isinstance(current, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in TRANSIENT_CLASS_NAMES for cls in type(current).__mro__):
            return True
        if isinstance(current, OSError) and not isinstance(current, (FileNotFoundError, PermissionError,
                                                                      IsADirectoryError, NotADirectoryError)):
            if current.errno in TRANSIENT_ERRNOS or any(m in str(current) for m in TRANSIENT_MESSAGES):
                return True
        current = current.__cause__ or current.__context__
    return False


def transient_retry_policy() -> dg.RetryPolicy:
    """Exponential backoff with jitter: delay, 2*delay, 4*delay ... (``COSYVOICE_RETRY_MAX`` /
    ``COSYVOICE_RETRY_DELAY_S`` override the defaults of 3 retries starting at 15 s)."""
    return dg.RetryPolicy(
        max_retries=int(os.environ.get("COSYVOICE_RETRY_MAX", "3")),
        delay=float(os.environ.get("COSYVOICE_RETRY_DELAY_S", "15")),
        backoff=dg.Backoff.EXPONENTIAL,
        jitter=dg.Jitter.PLUS_MINUS,
    )


def retry_transient_only(fn: Callable) -> Callable:
    """Decorate an asset/op body (under ``@dg.asset``) so only transient errors reach its RetryPolicy."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (dg.Failure, dg.RetryRequested):
            raise
        except Exception as exc:
            if is_transient(exc):
                raise
            raise dg.Failure(
                description=f"{type(exc).__name__}: {exc} (not a transient error, so it is not retried)",
                allow_retries=False,
            ) from exc

    return wrapper
