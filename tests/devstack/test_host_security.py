"""The dev host's own endpoints against DNS rebinding, off-loopback and cross-site callers:
``/admin/functions/{name}`` wants the master key unless the caller is on loopback by address and
by ``Host``, and takes only same-origin JSON; ``/demo/token`` answers only loopback host names.
Bodies are read only when a function asks; slow or vanished clients cost one log line."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import azure.functions as func
import pytest
import requests

from devstack.host import DEMO_DIR, DevHost, compile_route


def _app(fired: threading.Event) -> func.FunctionApp:
    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

    @app.timer_trigger(schedule="0 0 0 1 1 *", arg_name="t")
    def yearly(t: Any) -> None:
        fired.set()

    @app.route(route="capped", methods=["POST"])
    def capped(req: func.HttpRequest) -> func.HttpResponse:
        """Refuses a declared length over 100 bytes before asking for the body, like the app's capped routes."""
        if int(req.headers.get("Content-Length") or 0) > 100:
            return func.HttpResponse("too large", status_code=413)
        return func.HttpResponse(str(len(req.get_body())), status_code=200)

    @app.route(route="peek", methods=["POST"])
    def peek(req: func.HttpRequest) -> func.HttpResponse:
        """Reads at most 100 bytes of whatever body comes, declared or chunked."""
        return func.HttpResponse(str(len(req.read_body_up_to(100))), status_code=200)  # type: ignore[attr-defined]

    @app.route(route="whoami", methods=["GET"])
    def whoami(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse(req.url, status_code=200)

    return app


@pytest.fixture(scope="module")
def devhost() -> Iterator[Any]:
    fired = threading.Event()
    h = DevHost(_app(fired), host="0.0.0.0", port=0, static={"/demo/": DEMO_DIR}).start()
    h.fired = fired  # type: ignore[attr-defined]
    s = requests.Session()
    s.trust_env = False
    h.s = s  # type: ignore[attr-defined]
    h.local = f"http://127.0.0.1:{h.port}"  # type: ignore[attr-defined]
    yield h
    h.stop()


def _lan_address() -> str | None:
    """This machine's address on a non-loopback interface, if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            addr = str(s.getsockname()[0])
    except OSError:
        return None
    return None if addr.startswith("127.") else addr


def test_admin_on_loopback_needs_no_key(devhost: Any) -> None:
    devhost.fired.clear()
    r = devhost.s.post(devhost.local + "/admin/functions/yearly", json={}, timeout=10)
    assert r.status_code == 202 and devhost.fired.is_set()


@pytest.mark.parametrize("host_header", ["evil.example", "evil.example:7071", "127.0.0.1.nip.io"])
def test_admin_through_a_rebound_name_needs_the_master_key(devhost: Any, host_header: str) -> None:
    devhost.fired.clear()
    url = devhost.local + "/admin/functions/yearly"
    r = devhost.s.post(url, json={}, headers={"Host": host_header}, timeout=10)
    assert r.status_code == 401 and r.headers["Content-Type"] == "application/problem+json"
    wrong = devhost.s.post(url, json={}, headers={"Host": host_header, "x-functions-key": "nope"}, timeout=10)
    assert wrong.status_code == 401 and not devhost.fired.is_set()
    ok = devhost.s.post(url, json={}, headers={"Host": host_header, "x-functions-key": devhost.admin_key}, timeout=10)
    assert ok.status_code == 202 and devhost.fired.is_set()


def test_admin_from_another_address_needs_the_master_key(devhost: Any) -> None:
    lan = _lan_address()
    if lan is None:
        pytest.skip("no non-loopback interface on this machine")
    url = f"http://{lan}:{devhost.port}/admin/functions/yearly"
    assert devhost.s.post(url, json={}, headers={"Host": "localhost"}, timeout=10).status_code == 401
    ok = devhost.s.post(url, json={}, headers={"Host": "localhost", "x-functions-key": devhost.admin_key}, timeout=10)
    assert ok.status_code == 202


def test_admin_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVHOST_ADMIN_KEY", "from-env-key")
    assert DevHost(_app(threading.Event()), port=0).admin_key == "from-env-key"
    monkeypatch.delenv("DEVHOST_ADMIN_KEY")
    a, b = DevHost(_app(threading.Event()), port=0), DevHost(_app(threading.Event()), port=0)
    assert a.admin_key != b.admin_key and len(a.admin_key) >= 32


@pytest.mark.parametrize("headers", [{"Host": "evil.example"}, {"Host": "localhost.evil.example"},
                                     {"Origin": "http://evil.example"}, {"Origin": "null"}])
def test_demo_token_refuses_foreign_names(devhost: Any, headers: dict[str, str]) -> None:
    r = devhost.s.post(devhost.local + "/demo/token", json={"sub": "demo-user"}, headers=headers, timeout=10)
    assert r.status_code == 403


@pytest.mark.parametrize("host_header", ["localhost", "127.0.0.1", "[::1]:7071", "app.localhost:7071"])
def test_demo_token_answers_loopback_names(devhost: Any, host_header: str) -> None:
    r = devhost.s.post(devhost.local + "/demo/token", json={"sub": "demo-user"}, headers={"Host": host_header},
                       timeout=10)
    assert r.status_code != 403, r.text


def test_route_patterns_end_at_the_end_of_the_path() -> None:
    rx, _ = compile_route("health")
    assert rx.match("health") and rx.match("health/") and not rx.match("health\n")


# -- cross-site admin calls -------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"}, {"Origin": "http://localhost:1"},
])
def test_admin_refuses_another_sites_request(devhost: Any, headers: dict[str, str]) -> None:
    """A web page can POST to 127.0.0.1 from the developer's browser: it must not run a function."""
    devhost.fired.clear()
    r = devhost.s.post(devhost.local + "/admin/functions/yearly", json={}, headers=headers, timeout=10)
    assert r.status_code == 403 and not devhost.fired.is_set()


def test_admin_takes_only_json(devhost: Any) -> None:
    """A cross-site form or text/plain POST needs no CORS preflight: it must not be accepted either."""
    devhost.fired.clear()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = devhost.s.post(devhost.local + "/admin/functions/yearly", data=b"{}", headers={"Content-Type": ctype},
                           timeout=10)
        assert r.status_code == 415, (ctype, r.status_code)
    assert not devhost.fired.is_set()
    same = {"Origin": devhost.local, "Sec-Fetch-Site": "same-origin"}
    assert devhost.s.post(devhost.local + "/admin/functions/yearly", json={}, headers=same,
                          timeout=10).status_code == 202
    assert devhost.fired.is_set()


# -- bodies, slow and vanished clients, forwarded headers --------------------------------------------

def _raw(port: int, head: str, body: bytes = b"", *, close_after: bool = False, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.encode() + b"\r\n\r\n" + body)
        if close_after:
            return b""
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk


def test_a_refused_declared_length_is_answered_without_reading_the_body(devhost: Any) -> None:
    """100 MB declared, 1 byte sent: the route's 413 comes at once (nothing waits for, or buffers, the rest)."""
    head = (f"POST /api/capped HTTP/1.1\r\nHost: 127.0.0.1:{devhost.port}\r\nContent-Type: application/json"
            f"\r\nContent-Length: {99 * 1024 * 1024}\r\nConnection: close")
    answer = _raw(devhost.port, head, b"{", timeout=5)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    ok = devhost.s.post(devhost.local + "/api/capped", data=b"12345", timeout=10)
    assert ok.status_code == 200 and ok.text == "5"


def test_a_client_gone_mid_body_is_one_log_line(devhost: Any, caplog: pytest.LogCaptureFixture) -> None:
    head = (f"POST /api/capped HTTP/1.1\r\nHost: 127.0.0.1:{devhost.port}\r\nContent-Type: application/json"
            "\r\nContent-Length: 90")
    with caplog.at_level("WARNING", logger="devstack.host"):
        _raw(devhost.port, head, b"{" * 10, close_after=True)
        from tests.conftest import wait_for

        wait_for(lambda: any("went away" in r.getMessage() for r in caplog.records), timeout=10,
                 what="the dev host's line")
    lines = [r for r in caplog.records if r.name == "devstack.host"]
    assert len([r for r in lines if "went away" in r.getMessage()]) == 1
    assert all("Traceback" not in r.getMessage() and not r.exc_info for r in lines)


def test_a_silent_client_is_dropped_after_the_read_timeout(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("DEVHOST_READ_TIMEOUT_SECONDS", "1")
    h = DevHost(_app(threading.Event()), port=0).start()
    try:
        with socket.create_connection(("127.0.0.1", h.port), timeout=10) as s:
            s.sendall(b"POST /api/capped HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 50\r\n\r\n{")
            data = s.recv(65536)  # the host gives up on the body after 1 s: it answers (or just closes)
        assert data == b"" or data.startswith(b"HTTP/1.1 400"), data[:100]
    finally:
        h.stop()
    with pytest.raises(ValueError, match="DEVHOST_READ_TIMEOUT_SECONDS"):
        monkeypatch.setenv("DEVHOST_READ_TIMEOUT_SECONDS", "0")
        DevHost(_app(threading.Event()), port=0)


def test_forwarded_host_is_ignored_unless_trusted(devhost: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    r = devhost.s.get(devhost.local + "/api/whoami", headers={"X-Forwarded-Host": "evil.example"}, timeout=10)
    assert r.status_code == 200 and "evil.example" not in r.text
    monkeypatch.setenv("DEVHOST_TRUST_FORWARDED", "true")
    h = DevHost(_app(threading.Event()), port=0).start()
    try:
        r = devhost.s.get(f"http://127.0.0.1:{h.port}/api/whoami", headers={"X-Forwarded-Host": "tunnel.example"},
                          timeout=10)
        assert r.text.startswith("http://tunnel.example/api/whoami")
    finally:
        h.stop()


def test_a_chunked_body_is_read_only_up_to_the_routes_cap(devhost: Any) -> None:
    """No Content-Length to refuse: the lazy body hands the route no more than the cap it asks for (what
    werkzeug then drains of the rest is discarded as it arrives, never held)."""

    def chunks() -> Any:
        for _ in range(160):  # 10 MB, chunked
            yield b"x" * 65536

    r = devhost.s.post(devhost.local + "/api/peek", data=chunks(), timeout=30)
    assert r.status_code == 200 and r.text == "100"


def test_capped_body_refuses_a_non_ascii_digit_length() -> None:
    from shared.blueprints._http import capped_body
    from shared.errors import ValidationError

    req = func.HttpRequest("POST", "http://h/api/x", headers={"Content-Length": "\u00b2"}, body=b"12")
    with pytest.raises(ValidationError) as e:
        capped_body(req, 10, "A body")
    assert e.value.field == "Content-Length"
