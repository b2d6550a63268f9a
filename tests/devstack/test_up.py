"""The README's run command, as a new user runs it: ``python -m devstack up`` (what ``make dev`` runs)
brings up Azurite, the sandbox and the dev host; /api/health answers 200 within 60 s; the printed
caller token works; the demo page is served; Ctrl-C stops everything."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests

from tests.conftest import ROOT, wait_for


def test_up_serves_health_within_60_s_and_prints_what_to_do_next(tmp_path: Path) -> None:
    from devstack.azurite import free_ports

    port, sandbox_port, blob, queue, table = free_ports(5)
    # A clean environment, as on a new machine: nothing but PATH and HOME; settings come from the file.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1",
           "AZURITE_BLOB_PORT": str(blob), "AZURITE_QUEUE_PORT": str(queue), "AZURITE_TABLE_PORT": str(table)}
    settings = tmp_path / "local.settings.json"
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "devstack", "up", "--port", str(port), "--sandbox-port",
                             str(sandbox_port), "--settings", str(settings)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: a kill below reaches every child
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    http = requests.Session()
    http.trust_env = False
    try:
        def healthy() -> Any:
            if proc.poll() is not None:
                raise AssertionError("devstack up exited:\n" + "".join(out))
            try:
                return http.get(f"http://127.0.0.1:{port}/api/health", timeout=5).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(healthy, timeout=60, what="/api/health to answer 200")
        assert time.monotonic() - started < 60
        text = wait_for(lambda: "".join(out) if "Press Ctrl-C" in "".join(out) else None, timeout=10,
                        what="the banner")
        assert settings.exists() and oct(settings.stat().st_mode & 0o777) == "0o600"  # created, private
        assert f"http://localhost:{port}/demo/" in text
        token = re.search(r"export TOKEN=(\S+)", text)
        assert token, text
        r = http.get(f"http://127.0.0.1:{port}/api/accounts", headers={"Authorization": "Bearer " + token.group(1)},
                     timeout=30)
        assert r.status_code == 200 and r.json() == {"accounts": []}
        demo = http.get(f"http://localhost:{port}/demo/", timeout=10)
        assert demo.status_code == 200 and "Outlook connector" in demo.text
        # The connect route works against the local sandbox with the seeded settings.
        start = http.get(f"http://127.0.0.1:{port}/api/connect/microsoft", timeout=30,
                         params={"returnUrl": f"http://localhost:{port}/demo/"},
                         headers={"Authorization": "Bearer " + token.group(1)})
        assert start.status_code == 200, start.text
        assert start.json()["authUrl"].startswith(f"https://localhost:{sandbox_port}/common/oauth2/v2.0/authorize")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: no Azurite left on its ports
            raise
    assert proc.returncode == 0, "".join(out)[-2000:]
    assert "devstack: stopping" in "".join(out)


def _start_up(tmp_path: Path, **extra: str) -> tuple[subprocess.Popen[str], list[str], int, list[int]]:
    from devstack.azurite import free_ports

    port, sandbox_port, blob, queue, table = free_ports(5)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1",
           "AZURITE_BLOB_PORT": str(blob), "AZURITE_QUEUE_PORT": str(queue), "AZURITE_TABLE_PORT": str(table),
           **extra}
    proc = subprocess.Popen([sys.executable, "-m", "devstack", "up", "--port", str(port), "--sandbox-port",
                             str(sandbox_port), "--settings", str(tmp_path / "local.settings.json")], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, "")), daemon=True).start()  # type: ignore[union-attr]
    wait_for(lambda: "Press Ctrl-C" in "".join(out) or proc.poll() is not None, timeout=60, what="the banner")
    assert proc.poll() is None, "".join(out)
    return proc, out, port, [blob, queue, table]


def test_sigterm_stops_every_child_and_persist_keeps_the_data(tmp_path: Path) -> None:
    """SIGTERM (not only Ctrl-C) stops Azurite too: the next `make dev` finds its ports free. With PERSIST=1
    Azurite keeps its data on disk (AZURITE_LOCATION) instead of in memory."""
    from devstack.azurite import port_in_use

    data = tmp_path / "azurite-data"
    proc, out, _, storage = _start_up(tmp_path, PERSIST="1", AZURITE_LOCATION=str(data))
    try:
        assert f"kept in {data}" in "".join(out)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "devstack: stopping" in "".join(out)
    wait_for(lambda: not any(port_in_use(p) for p in storage), timeout=15, what="Azurite to free its ports")
    assert data.is_dir() and any(data.iterdir())  # Azurite's on-disk store


def test_a_sigkilled_up_leaves_no_azurite(tmp_path: Path) -> None:
    """Even a SIGKILL of `devstack up` alone (nothing can run in it) takes Azurite down (PR_SET_PDEATHSIG)."""
    from devstack.azurite import port_in_use

    proc, _, _, storage = _start_up(tmp_path)
    try:
        assert all(port_in_use(p) for p in storage)
        proc.kill()  # this process only, not its group
        proc.wait(30)
        wait_for(lambda: not any(port_in_use(p) for p in storage), timeout=15, what="Azurite to exit")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
