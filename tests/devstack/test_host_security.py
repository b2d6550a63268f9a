"""The dev host's own endpoints against DNS rebinding and off-loopback callers (issue 16, point 12):
``/admin/functions/{name}`` wants the master key unless the caller is on loopback by address and
by ``Host``; ``/demo/token`` answers only loopback host names."""

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
