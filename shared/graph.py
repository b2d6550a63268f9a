"""Microsoft Graph client over an injected ``requests.Session``: the one path to Graph.

Every Graph call, upload-session chunk PUTs included, goes through :meth:`GraphClient._exchange`:

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
* Upload-session URLs are pre-authenticated and outside ``GRAPH_BASE_URL``: they get no
  ``Authorization`` header (https://learn.microsoft.com/graph/outlook-large-attachments).
  They carry a secret in their query string, so they are never logged nor put in an error.
* Paths are written for the signed-in user (``me/…``); the token source names the mailbox they address, and
  :func:`mailbox_path` (the one place that decides it) turns them into ``users/{address}/…`` for a team mailbox
  reached with application permissions, which cannot use ``/me`` (https://learn.microsoft.com/graph/api/user-get).
* Every request sends ``Prefer: IdType="ImmutableId"``: message ids in answers, delta rounds and the
  notifications of subscriptions created with it stay the same when a message moves
  (https://learn.microsoft.com/graph/outlook-immutable-id).
"""

from __future__ import annotations

import json as _json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol, TypedDict

import requests
from requests.auth import AuthBase
from urllib3.exceptions import NewConnectionError

from shared.backoff import retry_after_from
from shared.errors import ConnectorError, MicrosoftError, ThrottledError, UpstreamUnavailableError
from shared.keyed import PerKey
from shared.ms_errors import from_graph_response

if TYPE_CHECKING:
    from shared.telemetry import Telemetry

log = logging.getLogger("connector.graph")

MAX_CONCURRENT_PER_MAILBOX = 4


class TokenSource(Protocol):
    """An access token for one mailbox, and that mailbox's Graph path (``me``, or ``users/{address}``)."""

    @property
    def root(self) -> str: ...

    def get(self) -> str: ...

    def refresh(self, stale: str) -> str: ...


def mailbox_path(root: str, path: str) -> str:
    """``path``, written for the signed-in user (``me`` or ``me/…``), as a path of the mailbox at ``root``."""
    if root == "me" or not (path == "me" or path.startswith("me/")):
        return path
    return root + path[2:]


class _Bearer(AuthBase):
    """``Authorization: Bearer``, set as requests' auth so a session-level auth or .netrc cannot replace it."""

    def __init__(self, access_token: str) -> None:
        self._token = access_token

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self._token}"
        return r

    def __repr__(self) -> str:  # never show the token
        return "_Bearer(***)"


class _NoAuthorization(AuthBase):
    """No ``Authorization`` at all: Graph answers 401 to an upload PUT that carries one."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers.pop("Authorization", None)
        return r


class _SendKw(TypedDict, total=False):
    """What one request sends besides its method, URL, headers and auth."""

    params: Mapping[str, str] | None
    data: bytes | memoryview | None
    stream: bool


class GraphClient:
    def __init__(self, base_url: str, session: requests.Session, *, max_concurrent: int = MAX_CONCURRENT_PER_MAILBOX,
                 retry_budget_s: float = 30.0, max_single_wait_s: float = 15.0,
                 timeout: tuple[float, float] = (5.0, 60.0), upload_timeout: tuple[float, float] = (5.0, 120.0),
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 telemetry: Telemetry | None = None) -> None:
        from shared.telemetry import OFF

        self.base_url = base_url.rstrip("/")
        self._telemetry = telemetry or OFF  # connector.graph.throttled (docs/operations.md)
        self.session = session
        # A bounded semaphore per mailbox (never dropped: one in use may not be replaced by a fresh one).
        self._limiter = PerKey(lambda: threading.BoundedSemaphore(max_concurrent), idle=None)
        self._budget = retry_budget_s
        self._max_wait = max_single_wait_s
        self._timeout = timeout
        self._upload_timeout = upload_timeout
        self._sleep = sleep
        self._clock = clock

    def url(self, path: str) -> str:
        if path.startswith("https://") or path.startswith("http://"):
            if not path.startswith(self.base_url + "/"):
                raise ValueError("refusing a Graph URL outside GRAPH_BASE_URL")
            return path
        return self.base_url + "/" + path.lstrip("/")

    def request(self, method: str, path: str, *, mailbox: str, token: TokenSource, safe: bool | None = None,
                json: Mapping[str, object] | None = None, params: Mapping[str, str] | None = None,
                headers: dict[str, str] | None = None, data: bytes | None = None, stream: bool = False,
                context: Mapping[str, str] | None = None) -> requests.Response:
        """Send one Graph request for ``mailbox``; return the successful response or raise a typed error.

        ``safe`` (default: GET/HEAD) says whether an unknown outcome may be retried: a 503 is
        retried after ``Retry-After`` only for safe requests.
        """
        safe = method.upper() in ("GET", "HEAD") if safe is None else safe
        if json is not None:  # UTF-8 is what Graph counts against its 4 MB; \uXXXX escapes would multiply it
            data = _json.dumps(json, separators=(",", ":"), ensure_ascii=False).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        return self._exchange(method, self.url(mailbox_path(token.root, path)), mailbox=mailbox, token=token,
                              safe=safe, context=context,
                              headers=headers, timeout=self._timeout,
                              send_kw=_SendKw(params=params, data=data, stream=stream))

    def get_json(self, path: str, *, mailbox: str, token: TokenSource, params: Mapping[str, str] | None = None,
                 context: Mapping[str, str] | None = None) -> dict[str, object]:
        """GET a Graph resource as a JSON object."""
        doc = self.request("GET", path, mailbox=mailbox, token=token, params=params, context=context).json()
        return doc if isinstance(doc, dict) else {}

    def upload_range(self, upload_url: str, chunk: bytes | memoryview, *, start: int, total: int, mailbox: str,
                     context: Mapping[str, str] | None = None) -> requests.Response:
        """PUT ``chunk`` as bytes ``start`` to ``start+len-1`` of ``total`` to a createUploadSession URL.

        https://learn.microsoft.com/graph/outlook-large-attachments — the URL is pre-authenticated
        (no ``Authorization``). A PUT of the same range is idempotent, so a throttled (429/503) chunk
        is sent again after ``Retry-After``, under the mailbox's limiter like any Graph call.
        Returns Graph's 200 (``nextExpectedRanges``) or 201 (upload complete).
        """
        if not upload_url.startswith("https://"):
            raise ValueError("refusing an upload URL that is not https")  # it carries a secret
        if not chunk or start < 0 or start + len(chunk) > total:
            raise ValueError("the chunk does not fit in the declared total")
        headers = {"Content-Range": f"bytes {start}-{start + len(chunk) - 1}/{total}",
                   "Content-Length": str(len(chunk)), "Content-Type": "application/octet-stream"}
        try:
            return self._exchange("PUT", upload_url, mailbox=mailbox, token=None, safe=True, context=context,
                                  headers=headers, timeout=self._upload_timeout, send_kw=_SendKw(data=chunk))
        except MicrosoftError as e:
            if e.status != 404:
                raise
            # Not a message of the caller's: the session expired (or was cancelled). Never our 404.
            raise MicrosoftError("The attachment upload session expired or no longer exists.",
                                 code="upload_session_expired", status=502, microsoft=e.microsoft,
                                 hint="Retry the send; nothing was sent.") from None

    def _exchange(self, method: str, url: str, *, mailbox: str, token: TokenSource | None, safe: bool,
                  context: Mapping[str, str] | None, headers: Mapping[str, str] | None,
                  timeout: tuple[float, float], send_kw: _SendKw) -> requests.Response:
        """The retry loop shared by every call: one refresh on 401, Retry-After waits, typed errors."""
        started = self._clock()
        access = token.get() if token is not None else None
        refreshes = 0
        while True:
            auth: AuthBase = _Bearer(access) if access is not None else _NoAuthorization()
            resp = self._send_once(method, url, mailbox=mailbox, auth=auth, safe=safe, timeout=timeout,
                                   headers=_headers(headers), send_kw=send_kw)
            if resp.status_code < 400:
                return resp
            body = _json_or_none(resp)
            if token is not None and access is not None and _is_stale_token(resp, body) and (
                    refreshes == 0 or (refreshes == 1 and getattr(token, "adopted", False))):
                # One refresh, one retry. Unless that "refresh" only adopted tokens another writer had
                # stored before: revoked with the stale one (CAE), they earn one real refresh more.
                refreshes += 1
                access = token.refresh(access)
                continue
            try:
                wait = self._throttle_wait(resp, body, safe=safe, started=started, context=context)
            except ThrottledError:
                self._telemetry.throttled(resp.status_code, mailbox=mailbox, gave_up=True)
                raise
            if wait is None:
                raise _failure(resp, body, safe=safe, context=context)
            self._telemetry.throttled(resp.status_code, mailbox=mailbox, gave_up=False)
            log.info("graph throttled (%s %d); waiting %.0f s", method, resp.status_code, wait)
            resp.close()
            self._sleep(wait)

    def _send_once(self, method: str, url: str, *, mailbox: str, auth: AuthBase, safe: bool,
                   timeout: tuple[float, float], headers: dict[str, str], send_kw: _SendKw) -> requests.Response:
        with self._limiter.get(mailbox):
            try:
                return self.session.request(method, url, headers=headers, auth=auth, timeout=timeout,
                                            params=send_kw.get("params"),
                                            data=send_kw.get("data"), stream=send_kw.get("stream", False))
            except (requests.ConnectionError, requests.Timeout) as e:
                raise _unreachable(e, safe) from None

    def _throttle_wait(self, resp: requests.Response, body: object, *, safe: bool, started: float,
                       context: Mapping[str, str] | None) -> float | None:
        """Seconds to wait before trying again, None when this is not a throttle; raises past the budget."""
        if not (resp.status_code == 429 or (resp.status_code == 503 and safe)):
            return None
        err = from_graph_response(resp.status_code, body, resp.headers, context=context)
        if not isinstance(err, ThrottledError):
            raise err
        wait = float(err.retry_after)
        if wait <= self._max_wait and self._clock() - started + wait <= self._budget:
            return wait
        raise err  # 503 + Retry-After to our caller


#: Every request asks for immutable message ids: a message keeps its id when it moves (Outlook gives a moved
#: item a new regular id), in answers, delta rounds and the notifications of subscriptions created with it.
#: https://learn.microsoft.com/graph/outlook-immutable-id
IMMUTABLE_IDS = 'IdType="ImmutableId"'


def _headers(extra: Mapping[str, str] | None) -> dict[str, str]:
    """The request's headers: JSON, immutable ids, and the caller's (a caller's ``Prefer`` joins ours)."""
    headers = {"Accept": "application/json", "Prefer": IMMUTABLE_IDS}
    for name, value in (extra or {}).items():
        if name.lower() == "prefer":
            headers["Prefer"] = f"{IMMUTABLE_IDS}, {value}"
        else:
            headers[name] = value
    return headers


def _is_stale_token(resp: requests.Response, body: object) -> bool:
    """Graph's 401 for an access token it no longer accepts (https://learn.microsoft.com/graph/errors)."""
    if resp.status_code != 401:
        return False
    err = body.get("error") if isinstance(body, dict) else None
    return (err.get("code") if isinstance(err, dict) else None) in ("InvalidAuthenticationToken", None)


def _failure(resp: requests.Response, body: object, *, safe: bool, context: Mapping[str, str] | None) -> ConnectorError:
    err = from_graph_response(resp.status_code, body, resp.headers, context=context)
    if resp.status_code >= 500 and not safe:
        # A 5xx on a state-changing request: it may have been processed. Not retried.
        return ThrottledError(err.detail + " The request was not retried to avoid a duplicate.",
                              retry_after=retry_after_from(resp.headers), microsoft=err.microsoft,
                              hint="Microsoft Graph failed; check Sent Items before retrying.",
                              extra={"outcomeUnknown": True})
    return err


def _unreachable(e: Exception, safe: bool) -> UpstreamUnavailableError:
    what = "timed out" if isinstance(e, requests.Timeout) else f"could not be reached ({type(e).__name__})"
    if safe:
        return UpstreamUnavailableError(f"Microsoft Graph {what}.", hint="Retry later.")
    if _connect_failed(e):
        return UpstreamUnavailableError(f"Microsoft Graph {what}; nothing was sent.", hint="Retry later.")
    return UpstreamUnavailableError(
        f"Microsoft Graph {what}. The outcome is unknown; it was not retried to avoid a duplicate.",
        hint="Check Sent Items before retrying.", extra={"outcomeUnknown": True})


def _connect_failed(e: Exception) -> bool:
    """A refused or timed-out *connection*: nothing reached Microsoft. Anything later is an unknown outcome."""
    if isinstance(e, requests.ConnectTimeout):
        return True
    if not isinstance(e, requests.ConnectionError):
        return False
    reason = e.args[0] if e.args else None
    reason = getattr(reason, "reason", reason)  # requests wraps urllib3's MaxRetryError(reason=...)
    return isinstance(reason, NewConnectionError) or "NewConnectionError" in repr(e.args)


def _json_or_none(resp: requests.Response) -> object:
    try:
        return resp.json()
    except ValueError:
        return None
