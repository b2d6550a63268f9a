"""The dev Functions host on its own: routing, admin calls, timers on schedule, bad input."""

from __future__ import annotations

import json
import threading
from typing import Any

import azure.functions as func
import pytest
import requests

from devstack.host import DevHost, compile_route
from devstack.ncrontab import CronError, NCrontab
from tests.conftest import wait_for


def _app(fired: threading.Event, seen: list[Any]) -> func.FunctionApp:
    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

    @app.route(route="items/{itemId}/parts/{partId?}", methods=["GET", "POST"])
    def items(req: func.HttpRequest) -> func.HttpResponse:
        seen.append(req)
        return func.HttpResponse(json.dumps({"route": dict(req.route_params), "q": dict(req.params),
                                             "body": req.get_body().decode(), "h": req.headers.get("x-test")}),
                                 mimetype="application/json")

    @app.route(route="boom", methods=["GET"])
    def boom(req: func.HttpRequest) -> func.HttpResponse:
        raise RuntimeError("kaboom")

    @app.timer_trigger(schedule="* * * * * *", arg_name="t")
    def every_second(t: Any) -> None:
        fired.set()

    return app


@pytest.fixture(scope="module")
def devhost() -> Any:
    fired, seen = threading.Event(), []
    h = DevHost(_app(fired, seen), port=0).start()
    h.fired, h.seen = fired, seen  # type: ignore[attr-defined]
    s = requests.Session()
    s.trust_env = False
    h.s = s  # type: ignore[attr-defined]
    yield h
    h.stop()


def test_routes_params_query_headers_body(devhost: Any) -> None:
    r = devhost.s.post(devhost.url + "/api/items/42/parts/7?x=1&y=two", data=b"hello", headers={"x-test": "yes"},
                       timeout=10)
    assert r.status_code == 200
    assert r.json() == {"route": {"itemId": "42", "partId": "7"}, "q": {"x": "1", "y": "two"}, "body": "hello",
                        "h": "yes"}
    r = devhost.s.get(devhost.url + "/api/items/42/parts", timeout=10)
    assert r.json()["route"] == {"itemId": "42"}


def test_unknown_route_and_wrong_method_are_clear(devhost: Any) -> None:
    r = devhost.s.get(devhost.url + "/api/nothing", timeout=10)
    assert r.status_code == 404 and r.headers["Content-Type"] == "application/problem+json"
    r = devhost.s.delete(devhost.url + "/api/items/1/parts", timeout=10)
    assert r.status_code == 405 and "GET" in r.headers["Allow"]


def test_function_exception_is_500_and_host_survives(devhost: Any) -> None:
    r = devhost.s.get(devhost.url + "/api/boom", timeout=10)
    assert r.status_code == 500 and "kaboom" not in r.text
    assert devhost.s.get(devhost.url + "/api/items/1/parts", timeout=10).status_code == 200


def test_timer_runs_on_schedule(devhost: Any) -> None:
    assert devhost.fired.wait(5), "the every-second timer did not fire"


def test_admin_endpoint(devhost: Any) -> None:
    devhost.fired.clear()
    r = devhost.s.post(devhost.url + "/admin/functions/every_second", json={"input": ""}, timeout=10)
    assert r.status_code == 202 and devhost.fired.is_set()
    r = devhost.s.post(devhost.url + "/admin/functions/nope", json={}, timeout=10)
    assert r.status_code == 404
    r = devhost.s.post(devhost.url + "/admin/functions/every_second", data=b"[not json",
                       headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400
    r = devhost.s.post(devhost.url + "/admin/functions/every_second", data=b"{}", timeout=10)
    assert r.status_code == 415  # not declared JSON: a cross-site form could send it
    r = devhost.s.post(devhost.url + "/admin/functions/items", json={}, timeout=10)
    assert r.status_code == 400


def test_route_templates() -> None:
    rx, names = compile_route("accounts/{accountId}/messages/{messageId}")
    assert names == ["accountId", "messageId"]
    assert rx.match("accounts/a/messages/b").groupdict() == {"accountId": "a", "messageId": "b"}
    assert not rx.match("accounts/a/messages")
    rx, _ = compile_route("files/{*path}")
    assert rx.match("files/a/b/c").group("path") == "a/b/c"
    rx, _ = compile_route("n/{id:int}")
    assert rx.match("n/5")


def test_ncrontab() -> None:
    import datetime as dt

    t = dt.datetime(2026, 11, 22, 10, 3, 7, tzinfo=dt.UTC)  # a Sunday
    assert NCrontab("0 */5 * * * *").next_after(t) == t.replace(minute=5, second=0)
    assert NCrontab("30 30 3 * * *").next_after(t) == dt.datetime(2026, 11, 23, 3, 30, 30, tzinfo=dt.UTC)
    assert NCrontab("0 0 9 * * mon-fri").next_after(t).weekday() == 0  # Sunday → Monday
    assert NCrontab("0 0 0 1 1 *").next_after(t) == dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    assert NCrontab("* * * * * *").next_after(t) == t + dt.timedelta(seconds=1)  # strictly after
    # Day and weekday must both match (NCRONTAB), not either (Vixie cron): the next Friday the 13th.
    assert NCrontab("0 0 0 13 * fri").next_after(t) == dt.datetime(2027, 8, 13, tzinfo=dt.UTC)
    # Fire times are UTC whatever the zone of the clock reading.
    local = t.astimezone(dt.timezone(dt.timedelta(hours=5)))
    nxt = NCrontab("0 0 12 * * *").next_after(local)
    assert nxt == dt.datetime(2026, 11, 22, 12, tzinfo=dt.UTC) and nxt.utcoffset() == dt.timedelta(0)
    for bad in ("* * * * *", "* * * * * * 2027", "@daily", "61 * * * * *", "0 60 * * * *", "a b c d e f",
                "*/0 * * * * *", "0 0 0 30 2 *"):
        with pytest.raises(CronError):
            NCrontab(bad)


def test_bad_timer_schedule_names_its_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    def app() -> func.FunctionApp:  # a fresh one each time: the decorators index only once
        a = func.FunctionApp()

        @a.timer_trigger(schedule="%REFRESH_SCHEDULE%", arg_name="t")
        def refresh(t: Any) -> None:
            pass

        return a

    monkeypatch.setenv("REFRESH_SCHEDULE", "61 */5 * * * *")
    with pytest.raises(CronError, match=r"REFRESH_SCHEDULE.*61 \*/5"):
        DevHost(app(), port=0)
    monkeypatch.setenv("REFRESH_SCHEDULE", "*/5 * * * *")
    with pytest.raises(CronError, match=r"REFRESH_SCHEDULE.*six fields"):
        DevHost(app(), port=0)
    monkeypatch.setenv("REFRESH_SCHEDULE", "0 */5 * * * *")
    assert DevHost(app(), port=0).timers[0].schedule == "0 */5 * * * *"


def test_devstack_cli_errors_are_clear(tmp_path: Any) -> None:
    import socket
    import subprocess
    import sys

    from tests.conftest import ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "devstack", "host", "--port", str(port)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "already in use" in p.stderr and "DEVHOST_PORT" in p.stderr
    p = subprocess.run([sys.executable, "-m", "devstack", "bogus"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "unknown command" in p.stderr
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "devstack", "host", "--port", "0"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env=env)
    assert p.returncode == 1 and "MS_CLIENT_ID" in p.stderr  # fails fast, naming the setting


def test_wait_for_helper_times_out() -> None:
    with pytest.raises(AssertionError):
        wait_for(lambda: False, timeout=0.2, what="nothing")


@pytest.mark.parametrize(("argv", "env"), [
    (["host", "--port", "70000"], {}), (["host", "--port", "-5"], {}), (["host"], {"DEVHOST_PORT": "abc"}),
    (["sandbox", "--port", "70000"], {}), (["sandbox"], {"SANDBOX_PORT": "x"}),
    (["azurite", "--queue-port", "70000"], {}), (["up", "--sandbox-port", "99999"], {}),
])
def test_bad_ports_get_one_clear_line(argv: list[str], env: dict[str, str]) -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    p = subprocess.run([sys.executable, "-m", "devstack", *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env={**os.environ, **env})
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "not a port number" in p.stderr, p.stderr


def test_unknown_host_name_is_a_clear_error() -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    for cmd in (["host", "--host", "no-such-host.invalid", "--port", "65000"],
                ["sandbox", "--host", "no-such-host.invalid", "--port", "0"]):
        p = subprocess.run([sys.executable, "-m", "devstack", *cmd], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert "no-such-host.invalid" in p.stderr



def test_server_process_waits_for_health_and_always_stops(tmp_path: Any) -> None:
    import os
    import time

    from devstack.azurite import DevstackError, free_port
    from devstack.process import ServerProcess

    def http_server(path: str) -> ServerProcess:
        port = free_port()
        return ServerProcess(["http.server", "--bind", "127.0.0.1", str(port), "--directory", str(tmp_path)],
                             env=os.environ, log_path=tmp_path / "server.log",
                             health_url=f"http://127.0.0.1:{port}{path}")

    (tmp_path / "ok").write_text("ok")
    with http_server("/ok") as p:
        assert p.wait_healthy(30) is p and p.proc.poll() is None
    assert p.proc.returncode is not None  # stopped on leaving the block
    p = http_server("/missing")  # answers 404, never 200
    started = time.monotonic()
    with pytest.raises(DevstackError, match="did not answer"):
        p.wait_healthy(1.5)
    assert time.monotonic() - started < 15 and p.proc.returncode is not None


def test_start_host_fails_fast_with_the_log_tail(tmp_path: Any) -> None:
    import time

    from devstack.azurite import DevstackError, free_port
    from devstack.process import start_host

    p = start_host({"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, free_port(), tmp_path / "host.log")
    started = time.monotonic()
    with pytest.raises(DevstackError, match=r"(?s)exited with status 1.*MS_CLIENT_ID"):
        p.wait_healthy(60)
    assert time.monotonic() - started < 30 and p.proc.returncode == 1


@pytest.mark.parametrize("raw", ["0", "-5", "soon"])
def test_a_bad_queue_lease_setting_is_refused_naming_it(raw: str) -> None:
    from devstack.host import _positive_int

    with pytest.raises(ValueError, match="DEVHOST_QUEUE_LEASE_SECONDS"):
        _positive_int("DEVHOST_QUEUE_LEASE_SECONDS", raw, 600)
    assert _positive_int("DEVHOST_QUEUE_LEASE_SECONDS", None, 600) == 600
    assert _positive_int("DEVHOST_QUEUE_LEASE_SECONDS", "20", 600) == 20


def test_a_disabled_function_is_not_triggered_but_can_be_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """``AzureWebJobs.<name>.Disabled=true``: the host ignores the trigger; the admin endpoint still runs it
    (https://learn.microsoft.com/azure/azure-functions/disable-function)."""
    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
    ran: list[str] = []

    @app.timer_trigger(schedule="* * * * * *", arg_name="t")
    def disabled_tick(t: Any) -> None:
        ran.append("tick")

    @app.route(route="off", methods=["GET"])
    def off(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("on")

    @app.route(route="on", methods=["GET"])
    def on(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("on")

    monkeypatch.setenv("AzureWebJobs.disabled_tick.Disabled", "true")
    monkeypatch.setenv("AzureWebJobs.off.Disabled", "True")
    h = DevHost(app, port=0).start()
    try:
        base = f"http://127.0.0.1:{h.port}"
        assert requests.get(f"{base}/api/off", timeout=10).status_code == 404  # a disabled HTTP function
        assert requests.get(f"{base}/api/on", timeout=10).status_code == 200
        assert not any(t.name == "timer-disabled_tick" for t in threading.enumerate())
        r = requests.post(f"{base}/admin/functions/disabled_tick", json={"input": ""}, timeout=10)
        assert r.status_code == 202 and ran == ["tick"]
    finally:
        h.stop()
