"""StorageTransport (shared/_storage_transport.py) against small real HTTP servers on loopback: keep-alive
reuse, connections the server closed, timeouts and refusals as azure-core's own error types.
(Every Table and Queue test of the suite runs over it against Azurite as well.)"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from azure.core.exceptions import ServiceRequestError, ServiceResponseError, ServiceResponseTimeoutError
from azure.core.rest import HttpRequest

from shared._storage_transport import StorageTransport


class _Server:
    """A raw HTTP/1.1 server: ``answer(conn_no, req_no)`` decides per request: "ok", "ok-then-close"
    (answer as keep-alive, then close the socket), "drop" (close without answering) or "hang"."""

    def __init__(self, answer: Callable[[int, int], str]) -> None:
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.requests: list[tuple[int, int]] = []
        self.methods: list[str] = []
        self.bodies: list[bytes] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, self.connections), daemon=True).start()

    def _serve(self, conn: socket.socket, n: int) -> None:
        with conn:
            f = conn.makefile("rb")
            for i in range(1, 100):
                line = f.readline()
                if not line:
                    return
                length = 0
                while (h := f.readline()) not in (b"\r\n", b""):
                    if h.lower().startswith(b"content-length:"):
                        length = int(h.split(b":", 1)[1])
                self.requests.append((n, i))
                self.methods.append(line.split(b" ", 1)[0].decode())
                what = self.answer(n, i)
                if what == "early":  # answer before reading the body, then close
                    conn.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    return
                self.bodies.append(f.read(length) if length else b"")
                if what == "drop":
                    return
                if what == "hang":
                    self._stop.wait(30)
                    return
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
                if what == "ok-then-close":
                    return

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@contextmanager
def server(answer: Callable[[int, int], str]) -> Iterator[_Server]:
    s = _Server(answer)
    try:
        yield s
    finally:
        s.close()


def _get(t: StorageTransport, port: int, **kw: float) -> int:
    return int(t.send(HttpRequest("GET", f"http://127.0.0.1:{port}/x"), **kw).status_code)


def _send(t: StorageTransport, port: int, method: str, body: str | bytes, **headers: str) -> int:
    return int(t.send(HttpRequest(method, f"http://127.0.0.1:{port}/x", content=body, headers=headers)).status_code)


@pytest.fixture(params=["poll", "select"])
def readiness(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of seeing a closed idle socket: poll() (Linux, macOS) and select() (Windows has no poll)."""
    from shared import _storage_transport

    monkeypatch.setattr(_storage_transport, "_HAS_POLL", request.param == "poll")
    return str(request.param)


def test_keep_alive_connections_are_reused(readiness: str) -> None:
    with server(lambda n, i: "ok") as s:
        t = StorageTransport()
        assert [_get(t, s.port) for _ in range(5)] == [200] * 5
        assert s.connections == 1 and len(s.requests) == 5


def test_a_connection_the_server_closed_while_idle_is_not_reused(readiness: str) -> None:
    with server(lambda n, i: "ok-then-close") as s:
        t = StorageTransport()
        assert _get(t, s.port) == 200
        deadline = time.monotonic() + 5
        while s.connections == 1 and len(s.requests) == 1 and time.monotonic() < deadline:
            assert _get(t, s.port) == 200  # the closed socket is seen (EOF) and dropped before reuse
        assert s.connections == 2 and s.requests == [(1, 1), (2, 1)]


def test_a_keep_alive_connection_closed_as_the_request_went_out_is_retried_once() -> None:
    # The server reads the second request on the first connection and closes without answering.
    with server(lambda n, i: "drop" if (n, i) == (1, 2) else "ok") as s:
        t = StorageTransport()
        assert _get(t, s.port) == 200
        assert _get(t, s.port) == 200
        assert s.requests == [(1, 1), (1, 2), (2, 1)]


def test_a_new_connection_that_closes_without_answer_is_a_response_error() -> None:
    with server(lambda n, i: "drop") as s:
        with pytest.raises(ServiceResponseError):
            _get(StorageTransport(), s.port)
        assert len(s.requests) == 1  # not replayed: only a reused keep-alive connection is


def test_no_answer_within_the_read_timeout() -> None:
    with server(lambda n, i: "hang") as s:
        started = time.monotonic()
        with pytest.raises(ServiceResponseTimeoutError):
            _get(StorageTransport(), s.port, read_timeout=0.5)
        assert time.monotonic() - started < 5


def test_a_refused_connection_is_a_request_error() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with pytest.raises(ServiceRequestError) as e:
        _get(StorageTransport(), port, connection_timeout=2)
    assert not isinstance(e.value, ServiceResponseError)


def test_a_post_is_not_replayed_on_a_new_connection() -> None:
    """An insert or a queue message the server may have processed: the retry policy decides, not the
    transport (RFC 9110 §9.2.2: POST is not idempotent)."""
    with server(lambda n, i: "drop" if (n, i) == (1, 2) else "ok") as s:
        t = StorageTransport()
        assert _send(t, s.port, "POST", b"{}") == 200
        with pytest.raises(ServiceResponseError):
            _send(t, s.port, "POST", b'{"a": 1}')
        assert s.requests == [(1, 1), (1, 2)]


def test_a_conditional_patch_is_replayed_on_a_new_connection() -> None:
    """With If-Match a replay that already landed fails its ETag check, which callers recognise."""
    with server(lambda n, i: "drop" if (n, i) == (1, 2) else "ok") as s:
        t = StorageTransport()
        assert _send(t, s.port, "PUT", b"{}") == 200
        assert _send(t, s.port, "PATCH", b'{"a": 1}', **{"If-Match": 'W/"1"'}) == 200
        assert s.requests == [(1, 1), (1, 2), (2, 1)] and s.methods[1:] == ["PATCH", "PATCH"]


def test_an_early_answer_to_a_large_body_is_read() -> None:
    """The server refuses a body before reading it (413) and closes: the answer, not a broken pipe."""
    with server(lambda n, i: "early") as s:
        assert _send(StorageTransport(), s.port, "PUT", b"x" * (8 << 20)) == 413


def test_a_text_body_is_sent_with_its_length_in_bytes() -> None:
    with server(lambda n, i: "ok") as s:
        t = StorageTransport()
        req = HttpRequest("PUT", f"http://127.0.0.1:{s.port}/x", content="héllo ✓")
        req.headers["Content-Length"] = str(len("héllo ✓"))  # characters, as a str body would be counted
        assert t.send(req).status_code == 200
        assert _get(t, s.port) == 200  # the connection is still in step
        assert s.bodies[0] == "héllo ✓".encode() and s.connections == 1


def test_what_http_client_does_not_send_goes_through_the_requests_fallback() -> None:
    """A streamed answer (or a request that is not azure-core's REST type) is sent by azure-core's
    RequestsTransport on its own pool: the same server answers, and the keep-alive pool is not used."""
    with server(lambda c, r: "ok") as s:
        t = StorageTransport()
        streamed = t.send(HttpRequest("GET", f"http://127.0.0.1:{s.port}/x"), stream=True)
        assert streamed.status_code == 200 and b"".join(streamed.iter_bytes()) == b"{}"
        assert _get(t, s.port) == 200  # the plain way, on a connection of its own pool
        assert s.methods == ["GET", "GET"] and s.connections == 2
        t.close()
