"""Storage that refuses connections, or accepts them and never answers (an emulator or account that
hangs): every route answers 503 + ``Retry-After`` promptly (never 500, never a hang), sends nothing,
and the host recovers by itself when storage is back.

A dev host talks to Azurite through :class:`StorageProxy`, a TCP proxy on loopback whose mode the
test switches: ``forward``, ``refuse`` (nothing listens: ECONNREFUSED) or ``hang`` (connections are
accepted and read, nothing is forwarded or answered).
"""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from devstack.azurite import connection_string
from devstack.process import start_host
from tests.conftest import ARTIFACTS, HTTP_ONLY, Host, connect, free_port, wait_for

USER = "adele@contoso.onmicrosoft.com"
OWNER = "owner-storage-faults"
# The client gives up far beyond the connector's interactive storage budget (about 13 s): a route
# that hangs fails the test with a read timeout instead of answering.
CLIENT_TIMEOUT_S = 30


class StorageProxy:
    """Forwards loopback ports to Azurite's table and queue ports; can refuse or hang on demand."""

    def __init__(self, targets: dict[str, int]) -> None:
        self.mode = "forward"
        self.ports = {name: free_port() for name in targets}
        self._targets = targets
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._listeners: dict[str, socket.socket] = {}
        self._conns: set[socket.socket] = set()
        self._stop = False
        for name in targets:
            self._listen(name)

    def _listen(self, name: str) -> None:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.ports[name]))
        srv.listen(128)
        srv.settimeout(0.2)
        self._listeners[name] = srv
        threading.Thread(target=self._accept, args=(name, srv), daemon=True).start()

    def _accept(self, name: str, srv: socket.socket) -> None:
        while not self._stop:
            try:
                client, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the listener was closed (refuse mode)
            threading.Thread(target=self._serve, args=(name, client), daemon=True).start()

    def _serve(self, name: str, client: socket.socket) -> None:
        with self._lock:
            self._conns.add(client)
            if self.mode == "hang":  # accepted, never answered
                self._changed.wait_for(lambda: self.mode != "hang" or self._stop)
                self._drop(client)
                return
        upstream = socket.create_connection(("127.0.0.1", self._targets[name]), timeout=10)
        with self._lock:
            self._conns.add(upstream)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    if self.mode == "hang":  # swallow it, then drop the connection once the fault ends
                        self._changed.wait_for(lambda: self.mode != "hang" or self._stop)
                        break
                dst.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._drop(src)
            self._drop(dst)

    def _drop(self, s: socket.socket) -> None:
        self._conns.discard(s)
        try:
            s.close()
        except OSError:
            pass

    def set_mode(self, mode: str) -> None:
        with self._lock:
            previous, self.mode = self.mode, mode
            self._changed.notify_all()
            if mode == "refuse":
                for srv in self._listeners.values():
                    srv.close()
                for s in list(self._conns):
                    self._drop(s)
        if previous == "refuse" and mode != "refuse":
            for name in self._targets:
                self._listen(name)

    def connection_string(self) -> str:
        return connection_string(queue=self.ports["queue"], table=self.ports["table"], blob=self.ports["queue"])

    def close(self) -> None:
        self._stop = True
        self.set_mode("refuse")


@pytest.fixture(scope="module")
def proxy(azurite: Any) -> Any:
    p = StorageProxy({"table": azurite.table_port, "queue": azurite.queue_port})
    yield p
    p.close()


@pytest.fixture(scope="module")
def fault_host(host: Host, proxy: StorageProxy) -> Any:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(host.env, AzureWebJobsStorage=proxy.connection_string(), PUBLIC_BASE_URL=base)
    env.update(HTTP_ONLY)  # its workers would take other tests' queue messages into the outage
    log_path = ARTIFACTS / "host-storage-faults.log"
    proc = start_host(env, port, log_path)
    try:
        proc.wait_healthy(60)
        yield Host(base, env, log_path, proc.proc)
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def account(host: Host, browser_session: Any, control: Any) -> tuple[str, str]:
    acc = connect(host, browser_session, sub=OWNER, login_hint=USER)["result"]["accountId"]
    mid = control.seed_messages(USER, 1)[0]
    return acc, mid


def _routes(acc: str, mid: str) -> list[tuple[str, str, dict[str, Any]]]:
    state = "x" * 43 + "." + "0" * 40  # well-formed, so the callback has to look it up in storage
    send = {"to": ["someone@example.com"], "subject": "must not be sent", "bodyText": "storage is down"}
    return [
        ("GET", "/api/accounts", {}),
        ("GET", f"/api/accounts/{acc}", {}),
        ("POST", f"/api/accounts/{acc}/send", {"json": send}),
        ("POST", f"/api/accounts/{acc}/send", {"json": send, "headers": {"Idempotency-Key": "k-storage-down"}}),
        ("GET", f"/api/accounts/{acc}/messages", {}),
        ("GET", f"/api/accounts/{acc}/messages/{mid}", {}),
        ("GET", f"/api/accounts/{acc}/folders", {}),
        ("GET", f"/api/accounts/{acc}/diagnose", {}),
        ("POST", f"/api/accounts/{acc}/refresh", {}),
        # Graph's notification: when it cannot be queued, 503 so that Graph delivers it again.
        ("POST", "/api/notifications/microsoft", {"sub": None, "json": {"value": [
            {"subscriptionId": "s-1", "clientState": "c" * 43, "changeType": "created", "resourceData": {"id": "AAMk1"}}]}}),
        ("GET", "/api/connect/microsoft", {"params": {"returnUrl": "https://app.example.com/connected"}}),
        # Entra's form_post (RFC 9700 §4.3.1): the code and state come in the POST body.
        ("POST", "/api/connect/microsoft/callback", {"data": {"state": state, "code": "c"}, "sub": None}),
        ("DELETE", f"/api/accounts/{acc}", {}),
    ]


def _call(host: Host, method: str, path: str, kw: dict[str, Any]) -> requests.Response:
    kw = dict(kw)
    sub = kw.pop("sub", OWNER)
    return host.api(method, path, sub=sub, timeout=CLIENT_TIMEOUT_S, **kw)


@pytest.mark.parametrize("mode", ["refuse", "hang"])
def test_every_route_answers_503_with_retry_after_and_recovers(mode: str, fault_host: Host, proxy: StorageProxy,
                                                              account: tuple[str, str], control: Any) -> None:
    acc, mid = account
    sent_before = len(control.sent(USER))
    assert _call(fault_host, "GET", f"/api/accounts/{acc}", {}).status_code == 200
    proxy.set_mode(mode)
    try:
        routes = _routes(acc, mid)
        with ThreadPoolExecutor(len(routes) + 1) as pool:
            answers = list(pool.map(lambda r: _call(fault_host, *r), routes))
            health = pool.submit(fault_host.http.get, fault_host.url + "/api/health", timeout=CLIENT_TIMEOUT_S)
            health_answer = health.result()
    finally:
        proxy.set_mode("forward")
    for (method, path, _), r in zip(routes, answers, strict=True):
        assert r.status_code == 503, (mode, method, path, r.status_code, r.text[:300])
        assert r.headers["Content-Type"].startswith("application/problem+json"), (method, path)
        assert r.json()["code"] == "storage_unavailable", (method, path, r.text[:300])
        assert int(r.headers["Retry-After"]) >= 1, (method, path)
    assert health_answer.status_code == 503
    assert health_answer.json()["checks"]["storage"]["ok"] is False
    assert len(control.sent(USER)) == sent_before  # nothing was sent while storage was down
    assert "Traceback" not in fault_host.log_text()
    # Storage is back: the same host recovers by itself, with no restart.
    wait_for(lambda: fault_host.http.get(fault_host.url + "/api/health", timeout=CLIENT_TIMEOUT_S).status_code == 200,
             timeout=60, what="the host's health to recover")
    assert _call(fault_host, "GET", f"/api/accounts/{acc}", {}).status_code == 200
    r = _call(fault_host, "POST", f"/api/accounts/{acc}/send",
              {"json": {"to": ["someone@example.com"], "subject": f"after {mode}", "bodyText": "back"},
               "headers": {"Idempotency-Key": f"k-after-{mode}"}})
    assert r.status_code == 202, r.text
    assert [m for m in control.sent(USER) if m["message"].get("subject") == f"after {mode}"]
