"""Retries with backoff for transient errors only.

Dagster's ``RetryPolicy`` retries any exception. Retrying a corrupt input, a bad config value or a
bug three times only delays the failure (and on a GPU node wastes the node), so asset bodies are
wrapped with ``retry_transient_only``: errors that a retry can plausibly fix (network resets,
timeouts, S3 throttling, a GPU that is momentarily out of memory) propagate unchanged and the
policy retries them with exponential backoff; everything else becomes a ``dg.Failure`` with
``allow_retries=False`` and fails the step at once, with the original exception as its cause.
Which errors are transient is decided in one place, ``cosyvoice.storage.is_transient`` (storage reads
have already retried those a few times where they happened before the step sees them).
"""

import functools
import os
from collections.abc import Callable

import dagster as dg

from cosyvoice.storage import is_transient  # the one classification of transient errors

__all__ = ["is_transient", "retry_transient_only", "transient_retry_policy"]


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
