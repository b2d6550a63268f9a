"""Waiting between attempts: one backoff formula and one ``Retry-After`` parser for the whole app.

* :func:`backoff_delay` is exponential backoff with "equal jitter" (half fixed, half random), so
  retries from many accounts or instances do not synchronise
  (https://learn.microsoft.com/azure/architecture/best-practices/retry-service-specific).
* :func:`retry_after_seconds` reads ``Retry-After`` in its delta-seconds form (RFC 9110 §10.2.3),
  the form Microsoft Graph and Entra send
  (https://learn.microsoft.com/graph/throttling#best-practices-to-handle-throttling); an HTTP-date
  is honoured too.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

DEFAULT_RETRY_AFTER_S = 5


def backoff_delay(attempt: int, *, base: float = 1.0, cap: float = 3600.0) -> float:
    """Seconds to wait before attempt ``attempt + 1`` (``attempt`` ≥ 1): ``base·2^attempt``, jittered."""
    raw = min(cap, base * 2 ** max(0, attempt))
    return min(cap, raw * (0.5 + random.random()))


def retry_after_seconds(value: str | None, default: int = DEFAULT_RETRY_AFTER_S) -> int:
    """``Retry-After`` as whole seconds ≥ 1; ``default`` when absent or unreadable."""
    if not value:
        return default
    value = value.strip()
    try:
        return max(1, int(float(value)))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return max(1, int((when - dt.datetime.now(dt.timezone.utc)).total_seconds()))


def retry_after_from(headers: Mapping[str, str], default: int = DEFAULT_RETRY_AFTER_S) -> int:
    """``Retry-After`` from a header mapping (case-insensitive or not)."""
    raw = headers.get("Retry-After")
    if raw is None:
        raw = headers.get("retry-after")
    return retry_after_seconds(raw, default)
