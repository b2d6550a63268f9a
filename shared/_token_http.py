"""MSAL's ``http_client`` over ``http.client``: the token endpoint and Entra's metadata, with a keep-alive pool.

Why not the ``requests`` session Graph uses: a proactive refresh is one token request, and requests and urllib3
(session and environment merging, adapters, URL re-parsing) were a third of that request's CPU — the largest
share of a refresh after storage. MSAL needs little of an HTTP client (``get`` and ``post`` answering
``status_code``, ``text``, ``headers`` and ``raise_for_status``; see ``msal.throttled_http_client``).

* Trust is explicit, as for every other client here: certifi's bundle plus ``MS_CA_BUNDLE`` (the sandbox's CA),
  hostname checked; no proxy or CA settings are read from the environment.
* Timeouts: MSAL's ``timeout=(connect, read)`` per call, else the client's.
* A client span per request (as the ``requests`` instrumentation makes for Graph): method, the URL without its
  query, status — so an Entra call is a dependency of the invocation that made it (docs/operations.md).
* A pooled connection the server has closed is dropped before reuse; a request is never sent twice (a refresh
  token must not be redeemed twice): a failure raises, and MSAL's caller (``shared.oauth``) reports it as
  unavailable.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from urllib.parse import urlencode, urlsplit

from shared._storage_transport import ConnectionPool, Key


class TokenHttpError(OSError):
    """``raise_for_status`` of an error answer (MSAL calls it on 5xx)."""


class TokenResponse:
    def __init__(self, status: int, text: str, headers: Mapping[str, str]) -> None:
        self.status_code = status
        self.text = text
        self.headers = {k.lower(): v for k, v in headers.items()}

    def json(self) -> object:
        return json.loads(self.text)

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise TokenHttpError(f"HTTP {self.status_code}")

    def __repr__(self) -> str:  # never the body: it may carry tokens
        return f"TokenResponse(status_code={self.status_code})"


class TokenHttpClient:
    def __init__(self, *, ca_file: str, timeout: tuple[float, float] = (5.0, 30.0), pool_size: int = 16) -> None:
        context = ssl.create_default_context(cafile=ca_file)
        self._timeout = timeout
        self._pool = ConnectionPool(size=pool_size, tls=lambda: context)

    def get(self, url: str, params: Mapping[str, str] | None = None, headers: Mapping[str, str] | None = None,
            timeout: object = None, **_: object) -> TokenResponse:
        return self._send("GET", url, params, None, headers, timeout)

    def post(self, url: str, params: Mapping[str, str] | None = None, data: object = None,
             headers: Mapping[str, str] | None = None, timeout: object = None, **_: object) -> TokenResponse:
        return self._send("POST", url, params, data, headers, timeout)

    def close(self) -> None:
        self._pool.close()

    def _send(self, method: str, url: str, params: Mapping[str, str] | None, data: object,
              headers: Mapping[str, str] | None, timeout: object) -> TokenResponse:
        connect_s, read_s = _timeouts(timeout, self._timeout)
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        key: Key = (scheme, parts.hostname or "", parts.port or (443 if scheme == "https" else 80))
        query = "&".join(q for q in (parts.query, urlencode(params) if params else "") if q)
        target = (parts.path or "/") + (f"?{query}" if query else "")
        sent = dict(headers or {})
        body: bytes | None = None
        if isinstance(data, Mapping):
            body = urlencode(data).encode()
            sent.setdefault("Content-Type", "application/x-www-form-urlencoded")
        elif isinstance(data, (bytes, str)):
            body = data.encode() if isinstance(data, str) else data
        from opentelemetry import trace

        from shared.telemetry import strip_url

        with trace.get_tracer("connector.token_http").start_as_current_span(
                method, kind=trace.SpanKind.CLIENT) as span:
            if span.is_recording():
                span.set_attributes({"http.request.method": method, "url.full": strip_url(url),
                                     "server.address": key[1], "server.port": key[2]})
            conn, _ = self._pool.acquire(key, connect_s)
            try:
                conn.timeout = connect_s
                if conn.sock is None:
                    conn.connect()
                conn.sock.settimeout(read_s)
                conn.request(method, target, body=body, headers=sent)
                raw = conn.getresponse()
                text = raw.read().decode("utf-8", errors="replace")
            except BaseException:
                conn.close()
                raise
            if span.is_recording():
                span.set_attribute("http.response.status_code", raw.status)
                if raw.status >= 400:
                    span.set_status(trace.StatusCode.ERROR)
        self._pool.release(key, conn, raw)
        return TokenResponse(raw.status, text, dict(raw.getheaders()))


def _timeouts(value: object, default: tuple[float, float]) -> tuple[float, float]:
    if isinstance(value, (int, float)) and value > 0:
        return float(value), float(value)
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return float(value[0]), float(value[1])
    return default
