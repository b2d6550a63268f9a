"""Start Azurite (Azure Storage emulator, npm package pinned in package.json) for Table and Queue.

``python -m devstack azurite`` runs it in the foreground, in memory by default. Tests use
:class:`Azurite` on free ports so they never collide with a developer's running stack.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Azurite's documented development account; a public, well-known key, not a secret.
# https://learn.microsoft.com/azure/storage/common/storage-use-azurite#http-connection-strings
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class DevstackError(RuntimeError):
    """A local-stack problem with a message a developer can act on."""


def connection_string(host: str = "127.0.0.1", blob: int = 10000, queue: int = 10001, table: int = 10002) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"BlobEndpoint=http://{host}:{blob}/{ACCOUNT};QueueEndpoint=http://{host}:{queue}/{ACCOUNT};"
        f"TableEndpoint=http://{host}:{table}/{ACCOUNT};"
    )


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports: all sockets stay bound until every port is picked, so the
    kernel cannot hand the same ephemeral port out twice."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _die_with_parent() -> None:
    """In the child, before exec (Linux): SIGTERM when the process that started it dies, even by SIGKILL
    (``prctl(PR_SET_PDEATHSIG)``, man 2 prctl), so a killed ``devstack up`` or test session leaves no
    Azurite holding its ports."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def azurite_command() -> list[str]:
    """The azurite executable, installing it with ``npm ci`` the first time."""
    if shutil.which("node") is None:
        raise DevstackError("Node.js is not installed: Azurite needs Node 18+ (https://nodejs.org) on PATH.")
    exe = ROOT / "node_modules" / ".bin" / "azurite"
    if not exe.exists():
        if shutil.which("npm") is None:
            raise DevstackError("npm is not installed: it comes with Node.js and is needed to install Azurite.")
        print("devstack: installing Azurite with npm ci (one time, ~20 s)...", flush=True)
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=ROOT, check=True)
    return [str(exe)]


class Azurite:
    """An Azurite process serving Blob, Queue and Table on the given (or free) ports."""

    def __init__(
        self,
        *,
        blob_port: int | None = None,
        queue_port: int | None = None,
        table_port: int | None = None,
        in_memory: bool = True,
        location: str | None = None,
    ) -> None:
        # Ports we picked ourselves may be taken by someone else before Azurite binds them; then
        # start() picks new ones. Ports the caller chose are never changed behind their back.
        self._own_ports = not (blob_port or queue_port or table_port)
        picked = free_ports(3)
        self.blob_port = blob_port or picked[0]
        self.queue_port = queue_port or picked[1]
        self.table_port = table_port or picked[2]
        self.in_memory = in_memory
        self.location = location or str(ROOT / ".devstack" / "azurite")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def connection_string(self) -> str:
        return connection_string(blob=self.blob_port, queue=self.queue_port, table=self.table_port)

    def start(self, timeout: float = 60.0) -> Azurite:
        for attempt in range(3):
            try:
                return self._start(timeout)
            except DevstackError as e:
                if not (self._own_ports and "EADDRINUSE" in str(e)) or attempt == 2:
                    raise
                self.blob_port, self.queue_port, self.table_port = free_ports(3)
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> Azurite:
        for port in (self.blob_port, self.queue_port, self.table_port):
            if port_in_use(port):
                raise DevstackError(
                    f"Port {port} is already in use: is another Azurite running? Stop it or pick other ports."
                )
        cmd = azurite_command() + [
            "--silent", "--skipApiVersionCheck", "--loose",
            "--blobHost", "127.0.0.1", "--queueHost", "127.0.0.1", "--tableHost", "127.0.0.1",
            "--blobPort", str(self.blob_port), "--queuePort", str(self.queue_port),
            "--tablePort", str(self.table_port),
        ]
        if self.in_memory:
            cmd.append("--inMemoryPersistence")
        else:
            os.makedirs(self.location, exist_ok=True)
            cmd += ["--location", self.location]
        # The parent-death signal follows the *thread* that started the child (man 2 prctl): only a child
        # started by the main thread (devstack up, a test session) gets it; one restarted by a worker thread
        # (the chaos run's storage outage) must outlive that thread.
        tie = sys.platform == "linux" and threading.current_thread() is threading.main_thread()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     preexec_fn=_die_with_parent if tie else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.proc.stderr.read() if self.proc.stderr else b"").decode(errors="replace")
                raise DevstackError(f"Azurite exited at start-up: {err.strip()[:500]}")
            if all(port_in_use(p) for p in (self.blob_port, self.queue_port, self.table_port)):
                return self
            time.sleep(0.1)  # polling a port until it accepts; bounded by the deadline
        self.stop()
        raise DevstackError(f"Azurite did not open its ports within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m devstack azurite", description=__doc__)
    from devstack import env_port, port_number

    p.add_argument("--blob-port", type=port_number, default=env_port("AZURITE_BLOB_PORT", 10000))
    p.add_argument("--queue-port", type=port_number, default=env_port("AZURITE_QUEUE_PORT", 10001))
    p.add_argument("--table-port", type=port_number, default=env_port("AZURITE_TABLE_PORT", 10002))
    p.add_argument("--persist", action="store_true", help="keep data in .devstack/azurite instead of memory")
    a = p.parse_args(argv)
    az = Azurite(blob_port=a.blob_port, queue_port=a.queue_port, table_port=a.table_port, in_memory=not a.persist)
    try:
        az.start()
    except DevstackError as e:
        print(f"devstack azurite: {e}", file=sys.stderr)
        return 1
    print(f"Azurite ready. AzureWebJobsStorage={az.connection_string}", flush=True)
    try:
        assert az.proc is not None
        az.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        az.stop()
    return 0
