"""The last hop of every Table and Queue call: azure-core's transport interface over ``http.client``.

Why not azure-core's ``RequestsTransport``: a refresh makes about five storage calls, and a third of
each call's CPU went to requests and urllib3 (session and environment merging, the cookie jar, URL
re-parsing and re-encoding) that a storage client never uses.
The SDKs' pipelines — shared-key or token auth, retries, timeouts, error mapping — stay as they are;
only the socket work changes. Anything this transport does not handle the plain way (a streamed
download, file uploads, a legacy request object) goes to a ``RequestsTransport`` unchanged.

* Keep-alive connections are pooled per (scheme, host, port). A pooled connection the server has
  closed (readable while idle: EOF) is dropped before reuse. One that fails before any byte of an
  answer arrived (the server closed it just as we sent) is retried once on a new connection, but
  only for an idempotent request (RFC 9112 §9.3.1, RFC 9110 §9.2.2: GET, HEAD, PUT, DELETE, OPTIONS)
  or a conditional one (``If-Match``: a replay that already landed fails its ETag check). A POST
  (insert, queue message) is never replayed here: azure-core's retry policy decides, as with
  ``RequestsTransport``.
* When the server answers early and closes while the body is still going out (an early 413), the
  answer is read rather than reported as a broken connection, as urllib3 does.
* Timeouts: ``connection_timeout`` for the TCP/TLS handshake, ``read_timeout`` for every read
  afterwards (azure-core per-call options; :class:`shared.storage.Budget` sets both).
* Response headers are split on their first colon (:class:`PlainHeadersResponse`) rather than run through the ``email``
  parser ``http.client`` uses, which cost about a sixth of a storage call's CPU; status line, chunking, length
  and keep-alive are ``http.client``'s own.
* Errors: azure-core's own types, so its retry policy and :func:`shared.storage.mapped` see what
  they see from ``RequestsTransport``: ``ServiceRequestError`` (nothing was sent),
  ``ServiceResponseError`` (sent, no answer), and their ``…TimeoutError`` forms.
"""

from __future__ import annotations

import http.client
import select
import ssl
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from azure.core.exceptions import (
    ServiceRequestError,
    ServiceRequestTimeoutError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)
from azure.core.pipeline.transport import HttpTransport

from shared._azure_core import is_rest_request, rest_response

if TYPE_CHECKING:
    from azure.core.pipeline.transport import RequestsTransport
    from azure.core.rest import HttpRequest, HttpResponse

Key = tuple[str, str, int]  # (scheme, host, port)
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
_HAS_POLL = hasattr(select, "poll")  # not on Windows (`func start` there, the operator CLI)
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})


class StorageTransport(HttpTransport):
    def __init__(self, *, pool_size: int = 64, connection_timeout: float = 10.0, read_timeout: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._pool_size = pool_size
        self._connection_timeout = connection_timeout
        self._read_timeout = read_timeout
        self._ssl_context = ssl_context
        self._lock = threading.Lock()
        self._pool = ConnectionPool(size=pool_size, tls=self._tls)
        self._fallback: RequestsTransport | None = None

    # -- HttpTransport ----------------------------------------------------------------------
    def __enter__(self) -> StorageTransport:
        return self

    def __exit__(self, *args: object) -> None:
        pass  # shared by every client of a Storage: closed by its owner, not by one client

    def open(self) -> None:
        pass

    def close(self) -> None:
        self._pool.close()

    def send(self, request: HttpRequest, **kwargs: object) -> HttpResponse:
        method, data = str(request.method), getattr(request, "data", None)
        if kwargs.get("stream") or getattr(request, "files", None) or not is_rest_request(request) \
                or not (data is None or isinstance(data, (bytes, str))):
            return self._requests_transport().send(request, **kwargs)
        connect_s = _seconds(kwargs.get("connection_timeout"), self._connection_timeout)
        read_s = _seconds(kwargs.get("read_timeout"), self._read_timeout)
        url = urlsplit(request.url)
        scheme = url.scheme.lower()
        key: Key = (scheme, url.hostname or "", url.port or (443 if scheme == "https" else 80))
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        body = data.encode("utf-8") if isinstance(data, str) else data
        headers = dict(request.headers)
        if body is not None:
            headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
            headers["Content-Length"] = str(len(body))  # bytes, not the characters azure-core counted
        replayable = method.upper() in _IDEMPOTENT or any(k.lower() == "if-match" for k in headers)
        for attempt in (1, 2):
            conn, reused = self._pool.acquire(key, connect_s)
            answered = False
            try:
                if conn.sock is None:
                    self._connect(conn, connect_s)
                conn.sock.settimeout(read_s)
                try:
                    conn.request(method, target, body=body, headers=headers)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the server may have answered early and closed: read what it said, if anything
                raw = conn.getresponse()
                answered = True
                response = _response(request, raw)
            except ServiceRequestError:
                conn.close()
                raise
            except _STALE as e:
                conn.close()
                if reused and attempt == 1 and not answered and replayable:
                    continue  # a keep-alive connection the server had closed: nothing was processed
                raise ServiceResponseError(f"connection closed: {type(e).__name__}", error=e) from None
            except TimeoutError as e:
                conn.close()
                raise ServiceResponseTimeoutError(f"no answer within {read_s:g} s", error=e) from None
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise ServiceResponseError(f"{type(e).__name__}", error=e) from None
            self._pool.release(key, conn, raw)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    # -- connections -------------------------------------------------------------------------
    @staticmethod
    def _connect(conn: http.client.HTTPConnection, connect_s: float) -> None:
        conn.timeout = connect_s
        try:
            conn.connect()
        except TimeoutError as e:
            raise ServiceRequestTimeoutError(f"no connection within {connect_s:g} s", error=e) from None
        except (OSError, http.client.HTTPException) as e:
            raise ServiceRequestError(f"could not connect: {type(e).__name__}", error=e) from None

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            import certifi

            self._ssl_context = ssl.create_default_context(cafile=certifi.where())
        return self._ssl_context

    def _requests_transport(self) -> RequestsTransport:
        with self._lock:
            if self._fallback is None:
                from azure.core.pipeline.transport import RequestsTransport

                from shared._http import new_session

                self._fallback = RequestsTransport(session=new_session(None, pool_size=self._pool_size),
                                                   session_owner=False)
            return self._fallback


class ConnectionPool:
    """Keep-alive ``http.client`` connections per (scheme, host, port), at most ``size`` idle per key. One the server
    closed while it was idle is dropped before reuse; new connections parse headers with :class:`PlainHeadersResponse`.
    (This transport and MSAL's, ``shared._token_http``.)"""

    def __init__(self, *, size: int, tls: Callable[[], ssl.SSLContext]) -> None:
        self._size = size
        self._tls = tls
        self._lock = threading.Lock()
        self._idle: dict[Key, list[http.client.HTTPConnection]] = {}

    def acquire(self, key: Key, connect_s: float) -> tuple[http.client.HTTPConnection, bool]:
        """A connection for ``key`` and whether it was pooled (a new one is not connected yet)."""
        with self._lock:
            idle = self._idle.get(key)
            while idle:
                conn = idle.pop()
                if not closed_by_peer(conn):
                    return conn, True
                conn.close()
        scheme, host, port = key
        conn = (http.client.HTTPSConnection(host, port, timeout=connect_s, context=self._tls()) if scheme == "https"
                else http.client.HTTPConnection(host, port, timeout=connect_s))
        conn.response_class = PlainHeadersResponse
        return conn, False

    def release(self, key: Key, conn: http.client.HTTPConnection, raw: http.client.HTTPResponse) -> None:
        """Back to the pool once its answer was read, unless the server closes it or the pool is full."""
        if raw.will_close or conn.sock is None:
            conn.close()
            return
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self._size:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


class PlainHeadersResponse(http.client.HTTPResponse):
    """``http.client``'s response with a plain header parser: storage services send plain ``Name: value`` lines
    (RFC 9112 §5: a field line is a name, a colon and a value; obsolete line folding continues the value)."""

    def begin(self) -> None:  # CPython 3.11's HTTPResponse.begin, with the header block parsed by _headers
        if self.headers is not None:
            return
        while True:
            version, status, reason = self._read_status()
            if status != http.client.CONTINUE:
                break
            http.client._read_headers(self.fp)  # a 100 response's headers
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = self.msg = parse_header_lines(http.client._read_headers(self.fp))
        tr_enc = self.headers.get("transfer-encoding")
        self.chunked = bool(tr_enc and tr_enc.lower() == "chunked")
        self.chunk_left = None
        self.will_close = self._check_close()
        self.length = None
        length = self.headers.get("content-length")
        if length and not self.chunked:
            try:
                self.length = int(length)
            except ValueError:
                self.length = None
            else:
                if self.length < 0:
                    self.length = None
        if status in (http.client.NO_CONTENT, http.client.NOT_MODIFIED) or 100 <= status < 200 \
                or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True


def parse_header_lines(lines: list[bytes]) -> http.client.HTTPMessage:
    msg = http.client.HTTPMessage()
    for raw in lines:
        line = raw.decode("iso-8859-1").rstrip("\r\n")
        if not line:
            continue
        if line[0] in " \t" and msg._headers:  # type: ignore[attr-defined]  # obsolete folding: same value
            name, value = msg._headers.pop()  # type: ignore[attr-defined]
            msg.set_raw(name, f"{value} {line.strip()}")
            continue
        name, _, value = line.partition(":")
        msg.set_raw(name.strip(), value.strip())
    return msg


def closed_by_peer(conn: http.client.HTTPConnection) -> bool:
    """An idle keep-alive socket that is readable has been closed (or sent garbage): do not reuse it."""
    sock = conn.sock
    if sock is None:
        return False
    if _HAS_POLL:
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))
    # Windows has no poll(); select() takes sockets there (and has no FD_SETSIZE limit on them).
    readable, _, broken = select.select([sock], [], [sock], 0)
    return bool(readable or broken)


def _seconds(value: object, default: float) -> float:
    """A per-call timeout from the pipeline's options (azure-core passes numbers), else the transport's."""
    return float(value) if isinstance(value, (int, float)) and value else default


def _response(request: HttpRequest, raw: http.client.HTTPResponse) -> HttpResponse:
    return rest_response(request, raw)
