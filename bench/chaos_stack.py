"""The chaos run's local stack: every part a real process or server on loopback, each one killable.

* Azurite persists to a temporary directory, so it can be stopped and restarted on the same ports
  without losing data (stopped with SIGTERM: Azurite's Loki stores autosave every 5 s, so a SIGKILL
  would drop writes it had acknowledged — a data loss Azure Storage never has; the outage is the fault).
* The Microsoft sandbox runs in its own process (strict refresh-token rotation, 10-minute access
  tokens so that accounts in use are renewed during the run).
* A Key Vault double (in this process) holds the client secret, the token key ring and the webhook
  secret, so both can be rotated while the hosts run; the hosts read it through their managed identity.
* Two or more dev hosts share one ``PUBLIC_BASE_URL`` (the "front door"): the clients balance the
  load themselves and skip an instance that does not answer, as a load balancer would.
* A webhook receiver on a fixed port records every delivery and can be taken down and brought back.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / ".out" / "chaos"
CLIENT_ID = "5a1b0c3d-0000-4000-8000-00000000c0de"
FIRST_SECRET = "chaos-client-secret-1-not-a-real-secret"


class Receiver:
    """The integrator's webhook endpoint: records event ids, checks signatures; stoppable on its port."""

    def __init__(self, secret: str) -> None:
        from devstack.azurite import free_port

        self.port = free_port()
        self.secret = secret
        self.lock = threading.Lock()
        self.events: dict[str, dict[str, Any]] = {}  # event id -> the first delivery's body
        self.deliveries = 0
        self.bad_signatures = 0  # a whole body whose signature does not verify: the connector's fault
        self.cut_off = 0  # a body shorter than its Content-Length: the sender died mid-request
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                from shared.webhooks import SIGNATURE_HEADER, verify

                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                if len(body) < length:  # the connection closed early (a host SIGKILLed while sending)
                    with outer.lock:
                        outer.cut_off += 1
                    return
                ok = verify(outer.secret, body, self.headers.get(SIGNATURE_HEADER, ""))
                with outer.lock:
                    outer.deliveries += 1
                    if not ok:
                        outer.bad_signatures += 1
                    else:
                        doc = json.loads(body)
                        outer.events.setdefault(doc["id"], doc)
                self.send_response(204 if ok else 401)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def start(self) -> None:
        for _ in range(50):  # the port may linger a moment after a stop: bounded retries
            try:
                self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"webhook receiver could not bind 127.0.0.1:{self.port}")
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return dict(self.events)


@dataclass
class HostProc:
    index: int
    port: int
    env: dict[str, str]
    log_path: Path
    proc: Any = None
    restarts: int = 0
    logs: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class ChaosStack:
    """Start with :meth:`start`, always :meth:`stop` (idempotent)."""

    def __init__(self, *, hosts: int = 2, refresh_schedule: str = "*/15 * * * * *") -> None:
        self.n_hosts = hosts
        self.refresh_schedule = refresh_schedule
        self.dir = Path(tempfile.mkdtemp(prefix="chaos-azurite-"))
        self.hosts: list[HostProc] = []
        self.client_secrets = [FIRST_SECRET]
        self.key_material: list[str] = []
        self.sandbox: Any = None
        self.azurite: Any = None
        self.vault: Any = None
        self.receiver: Receiver | None = None
        self.http = requests.Session()
        self.http.trust_env = False

    # -- start / stop ---------------------------------------------------------------------
    def start(self) -> ChaosStack:
        from devstack.azurite import Azurite, free_ports
        from devstack.certs import ensure_certs

        OUT.mkdir(parents=True, exist_ok=True)
        self.ca = str(ensure_certs().ca_cert)
        self.azurite = Azurite(in_memory=False, location=str(self.dir), **dict(zip(
            ("blob_port", "queue_port", "table_port"), free_ports(3), strict=True))).start()
        self.ports = free_ports(self.n_hosts)
        self.front_door = f"http://127.0.0.1:{self.ports[0]}"
        self._start_sandbox()
        self._start_vault()
        self.receiver = Receiver(secrets.token_urlsafe(24))
        self.vault.set_secret("webhook-secret", self.receiver.secret)
        self.receiver.start()
        env = self.host_env()
        self.hosts = [HostProc(i, p, dict(env), OUT / f"host{i}.log") for i, p in enumerate(self.ports)]
        for h in self.hosts:
            self.start_host(h)
        return self

    def _start_sandbox(self) -> None:
        from devstack.azurite import free_port
        from devstack.process import ServerProcess
        from devstack.sandbox import SandboxControl

        port = free_port()
        self.sandbox_url = f"https://localhost:{port}"
        env = dict(os.environ, MS_CLIENT_ID=CLIENT_ID, MS_CLIENT_SECRET=FIRST_SECRET,
                   SANDBOX_REDIRECT_URIS=f"{self.front_door}/api/connect/microsoft/callback")
        self.sandbox = ServerProcess(["devstack.sandbox", "--port", str(port), "--quiet"], env=env,
                                     log_path=OUT / "sandbox.log", health_url=f"{self.sandbox_url}/_sandbox/health",
                                     verify=self.ca).wait_healthy(60)
        self.control = SandboxControl(self.sandbox_url, verify=self.ca, timeout=30)
        self.control.set_rotation(True)
        self.control.set_access_token_lifetime(600)  # Entra's minimum: accounts in use renew during the run

    def _start_vault(self) -> None:
        from devstack.keyvault import KeyVaultDouble

        self.vault = KeyVaultDouble().start()
        key = base64.b64encode(secrets.token_bytes(32)).decode()
        self.key_material.append(key)
        self.ring: dict[str, Any] = {"active": "c1", "keys": {"c1": key}}
        self.vault.set_secret("token-encryption-keys", json.dumps(self.ring))
        self.vault.set_secret("ms-client-secret", FIRST_SECRET)

    def host_env(self) -> dict[str, str]:
        from devstack.azurite import connection_string

        assert self.azurite is not None and self.receiver is not None
        self.jwt_secret = secrets.token_urlsafe(32)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MS_", "AUTH_", "GRAPH_", "WEBHOOK_"))}
        env.update({
            "MS_CLIENT_ID": CLIENT_ID, "MS_AUTHORITY_HOST": self.sandbox_url, "MS_TENANT": "common",
            "GRAPH_BASE_URL": self.sandbox_url + "/v1.0", "MS_CA_BUNDLE": self.ca, "PUBLIC_BASE_URL": self.front_door,
            "AzureWebJobsStorage": connection_string(blob=self.azurite.blob_port, queue=self.azurite.queue_port,
                                                     table=self.azurite.table_port),
            "AUTH_ISSUER": "https://chaos.bench", "AUTH_AUDIENCE": "chaos", "AUTH_HS256_SECRET": self.jwt_secret,
            "ALLOWED_RETURN_URLS": "https://app.example.com/connected", "KEY_VAULT_URL": self.vault.url,
            "WEBHOOK_URL": self.receiver.url, "REFRESH_SCHEDULE": self.refresh_schedule,
            "CLEANUP_SCHEDULE": "30 * * * * *", "NOTIFICATIONS_ENABLED": "false", "PYTHONUNBUFFERED": "1",
            # Failed queue messages come back after 2 s (host.json says 10 s), and a message an instance
            # took before it died comes back after 20 s instead of 10 minutes, within the run.
            "AzureFunctionsJobHost__extensions__queues__visibilityTimeout": "00:00:02",
            "DEVHOST_QUEUE_LEASE_SECONDS": "20",
        })
        env.update(self.vault.identity_env())
        return env

    def start_host(self, h: HostProc) -> None:
        from devstack.process import start_host

        path = OUT / f"host{h.index}-{h.restarts}.log"
        h.logs.append(path)
        h.proc = start_host(h.env, h.port, path)
        h.proc.wait_healthy(90, ok=(200, 503))

    def kill_host(self, h: HostProc) -> None:
        """SIGKILL: no clean-up, no flush, in the middle of whatever it is doing."""
        h.proc.proc.kill()
        h.proc.proc.wait(10)
        h.proc.stop()  # closes the log file; the process is already gone
        h.restarts += 1

    def stop_azurite(self) -> None:
        self.azurite.stop()

    def start_azurite(self) -> None:
        self.azurite.start()  # the same ports and data directory

    def reencrypt(self, ring: dict[str, Any]) -> dict[str, Any]:
        """``python -m shared.cli reencrypt`` as an operator runs it, against the vault's new ring."""
        self.vault.set_secret("token-encryption-keys", json.dumps(ring))
        out = subprocess.run([sys.executable, "-m", "shared.cli", "reencrypt"], cwd=ROOT, env=self.hosts[0].env,
                             capture_output=True, text=True, timeout=300)
        (OUT / "reencrypt.log").write_text(out.stdout + out.stderr)
        if out.returncode != 0:
            raise RuntimeError(f"reencrypt failed: {out.stdout[-500:]} {out.stderr[-2000:]}")
        return dict(json.loads(out.stdout))

    def log_paths(self) -> list[Path]:
        return [p for h in self.hosts for p in h.logs] + [OUT / "reencrypt.log"]

    def stop(self) -> None:
        for h in self.hosts:
            if h.proc is not None:
                h.proc.stop()
        for part in (self.receiver, self.vault, self.sandbox, self.azurite):
            if part is not None:
                try:
                    part.stop()
                except Exception as e:  # keep stopping the rest
                    print(f"chaos: stopping {type(part).__name__} failed: {e}", file=sys.stderr)
        self.http.close()
        shutil.rmtree(self.dir, ignore_errors=True)
