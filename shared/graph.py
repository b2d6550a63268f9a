"""Microsoft Graph client over an injected ``requests.Session``.

* At most 4 requests in flight per mailbox per instance — Outlook's documented concurrency limit
  (https://learn.microsoft.com/graph/throttling-limits#outlook-service-limits).
* 429 (and 503 for safe requests) honour ``Retry-After`` within a bounded budget, then raise
  :class:`~shared.errors.ThrottledError` so the caller gets 503 + ``Retry-After``
  (https://learn.microsoft.com/graph/throttling#best-practices-to-handle-throttling).
* 401 ``InvalidAuthenticationToken`` for a token we believed valid (early expiry, revocation,
  a CAE claims challenge) → refresh once and retry once
  (https://learn.microsoft.com/entra/identity-platform/claims-challenge).
* A request that may have changed state (``sendMail``, ``send``) is never retried after an
  unknown outcome (timeout, 5xx): a 429 or 401 is a refusal, so retrying it cannot deliver twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import requests

from shared.errors import ConnectorError, ThrottledError, UpstreamUnavailableError
from shared.ms_errors import from_graph_response

log = logging.getLogger("connector.graph")

MAX_CONCURRENT_PER_MAILBOX = 4


class TokenSource(Protocol):
    def get(self) -> str: ...

    def refresh(self, stale: str) -> str: ...


class _Limiter:
    """A bounded semaphore per mailbox, created on demand."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._sems: dict[str, threading.BoundedSemaphore] = {}

    def get(self, key: str) -> threading.BoundedSemaphore:
        with self._lock:
            sem = self._sems.get(key)
            if sem is None:
                sem = self._sems[key] = threading.BoundedSemaphore(self._limit)
            return sem


class GraphClient:
    def __init__(self, base_url: str, session: requests.Session, *, max_concurrent: int = MAX_CONCURRENT_PER_MAILBOX,
                 retry_budget_s: float = 30.0, max_single_wait_s: float = 15.0,
                 timeout: tuple[float, float] = (5.0, 60.0),
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self._limiter = _Limiter(max_concurrent)
        self._budget = retry_budget_s
        self._max_wait = max_single_wait_s
        self._timeout = timeout
        self._sleep = sleep
        self._clock = clock

    def url(self, path: str) -> str:
        if path.startswith("https://") or path.startswith("http://"):
            if not path.startswith(self.base_url + "/"):
                raise ValueError("refusing a Graph URL outside GRAPH_BASE_URL")
            return path
        return self.base_url + "/" + path.lstrip("/")

    def request(self, method: str, path: str, *, mailbox: str, token: TokenSource, safe: bool | None = None,
                json: Any = None, params: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
                data: Any = None, stream: bool = False, context: dict[str, Any] | None = None) -> requests.Response:
        """Send one Graph request for ``mailbox``; return the successful response or raise a typed error."""
        safe = method.upper() in ("GET", "HEAD") if safe is None else safe
        url = self.url(path)
        started = self._clock()
        refreshed = False
        access = token.get()
        sem = self._limiter.get(mailbox)
        while True:
            hdrs = {"Authorization": f"Bearer {access}", "Accept": "application/json"}
            hdrs.update(headers or {})
            with sem:
                try:
                    resp = self.session.request(method, url, json=json, params=params, headers=hdrs, data=data,
                                                timeout=self._timeout, stream=stream)
                except (requests.ConnectionError, requests.Timeout) as e:
                    raise _unreachable(e, safe) from None
            if resp.status_code < 400:
                return resp
            body = _json_or_none(resp)
            code = (body or {}).get("error", {}).get("code") if isinstance(body, dict) else None
            if resp.status_code == 401 and not refreshed and (code == "InvalidAuthenticationToken" or code is None):
                refreshed = True
                access = token.refresh(access)
                continue
            if resp.status_code == 429 or (resp.status_code == 503 and safe):
                err = from_graph_response(resp.status_code, body, resp.headers, context=context)
                if not isinstance(err, ThrottledError):
                    raise err
                wait = float(err.retry_after)
                if wait <= self._max_wait and self._clock() - started + wait <= self._budget:
                    log.info("graph throttled (%s); waiting %.0f s", resp.status_code, wait)
                    self._sleep(wait)
                    continue
                raise err
            err2: ConnectorError = from_graph_response(resp.status_code, body, resp.headers, context=context)
            if resp.status_code >= 500 and not safe:
                # A 5xx on a state-changing request: it may have been processed. Not retried.
                err2 = ThrottledError(err2.detail + " The request was not retried to avoid a duplicate.",
                                      retry_after=_retry_after(resp), microsoft=err2.microsoft,
                                      hint="Microsoft Graph failed; check Sent Items before retrying.",
                                      extra={"outcomeUnknown": True})
            raise err2

    def get_json(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw).json()


def _unreachable(e: Exception, safe: bool) -> UpstreamUnavailableError:
    what = "timed out" if isinstance(e, requests.Timeout) else f"could not be reached ({type(e).__name__})"
    if safe:
        return UpstreamUnavailableError(f"Microsoft Graph {what}.", hint="Retry later.")
    # A refused or timed-out *connection* means nothing reached Microsoft; anything later is unknown.
    connect_failed = isinstance(e, requests.ConnectTimeout) or (
        isinstance(e, requests.ConnectionError) and "NewConnectionError" in repr(e.args))
    if connect_failed:
        return UpstreamUnavailableError(f"Microsoft Graph {what}; nothing was sent.", hint="Retry later.")
    return UpstreamUnavailableError(
        f"Microsoft Graph {what}. The outcome is unknown; it was not retried to avoid a duplicate.",
        hint="Check Sent Items before retrying.", extra={"outcomeUnknown": True})


def _json_or_none(resp: requests.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None


def retry_after_seconds(value: str | None, default: int = 5) -> int:
    """``Retry-After`` as whole seconds (delta-seconds form, RFC 9110 §10.2.3; Graph sends that form)."""
    try:
        return max(1, int(float(value))) if value else default
    except ValueError:
        return default


def _retry_after(resp: requests.Response) -> int:
    return retry_after_seconds(resp.headers.get("Retry-After"))
