"""The chaos run's faults: injected one after another on a schedule (the webhook outage alongside),
each logged with its start, end and the time until a probe saw the system healthy again."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.chaos_stack import CLIENT_ID, ChaosStack
from bench.chaos_traffic import REVOKED_USER, Api, Mailbox, Recorder

TOKEN_PATH = "*/oauth2/v2.0/token"
GRAPH_PATH = "/v1.0/*"


@dataclass
class FaultLog:
    name: str
    detail: str
    started: float
    ended: float = 0.0
    recovered: float | None = None  # seconds since the run started; None: not within the bound

    @property
    def recovery_s(self) -> float | None:
        return None if self.recovered is None else max(0.0, self.recovered - self.ended)


@dataclass
class Scale:
    fault_s: float  # how long a fault lasts
    azurite_down_s: float
    webhook_down_s: float
    recover_bound_s: float


FULL = Scale(fault_s=15, azurite_down_s=10, webhook_down_s=60, recover_bound_s=120)
SHORT = Scale(fault_s=3, azurite_down_s=3, webhook_down_s=10, recover_bound_s=60)


class Faults:
    def __init__(self, stack: ChaosStack, rec: Recorder, probe: Api, canary: Mailbox, scale: Scale,
                 stop: threading.Event) -> None:
        self.stack, self.rec, self.probe, self.canary, self.scale, self.stop = stack, rec, probe, canary, scale, stop
        self.log: list[FaultLog] = []
        self.revoked_at: float | None = None
        self.lock = threading.Lock()

    # -- the schedule -----------------------------------------------------------------------
    def sequence(self) -> list[tuple[str, Callable[[FaultLog], None], Callable[[], bool]]]:
        c = self.stack.control
        return [
            ("graph 429 storm", lambda f: self._inject(f, GRAPH_PATH, status=429, retry_after=1, count=100_000),
             self._graph_ok),
            ("token endpoint 5xx/429", lambda f: self._token_errors(f), self._refresh_ok),
            ("Azurite killed and restarted", self._azurite, self._all_hosts_ok),
            ("slow sendMail (client timeouts)", lambda f: self._inject(f, "*/sendMail", latency_ms=2500,
                                                                       count=100_000), self._graph_ok),
            ("host SIGKILLed and restarted", self._kill_host, self._all_hosts_ok),
            (f"grants of {REVOKED_USER} revoked (on purpose)", self._revoke, lambda: True),
            ("token endpoint slow (3 s)", lambda f: self._slow_token(f, c), self._refresh_ok),
            ("client secret rotated", self._rotate_secret, self._refresh_ok),
            ("Graph 5xx", lambda f: self._inject(f, GRAPH_PATH, status=503, count=100_000), self._graph_ok),
            ("key ring rotated + reencrypt", self._rotate_ring, self._all_hosts_ok),
            ("token endpoint down (503)", lambda f: self._inject(f, TOKEN_PATH, status=503, count=100_000),
             self._refresh_ok),
        ]

    def run(self, deadline: float) -> None:
        """Faults spread evenly until ``deadline`` (monotonic); the webhook outage runs alongside."""
        steps = self.sequence()
        span = max(deadline - time.monotonic(), 1.0)
        slot = span / (len(steps) + 1)
        t0 = time.monotonic()
        hook = threading.Thread(target=self._webhook_outage, args=(t0 + slot * 0.6,), daemon=True)
        hook.start()
        for i, (name, inject, healthy) in enumerate(steps):
            if self._wait_until(t0 + slot * (i + 0.6)):
                break
            f = FaultLog(name, "", self.rec.now())
            with self.lock:
                self.log.append(f)
            print(f"chaos: [{f.started:6.1f}s] fault: {name}", flush=True)
            inject(f)
            f.ended = self.rec.now()
            f.recovered = self._until(healthy)
        hook.join(self.scale.webhook_down_s + self.scale.recover_bound_s + 30)

    def _wait_until(self, t: float) -> bool:
        """Wait for monotonic time ``t``; True when the run is being stopped."""
        return self.stop.wait(max(0.0, t - time.monotonic()))

    def _until(self, healthy: Callable[[], bool]) -> float | None:
        deadline = time.monotonic() + self.scale.recover_bound_s
        while time.monotonic() < deadline:
            try:
                if healthy():
                    return self.rec.now()
            except Exception:  # a probe that cannot even ask is not healthy yet
                pass
            time.sleep(0.2)
        return None

    # -- faults -----------------------------------------------------------------------------
    def _inject(self, f: FaultLog, path: str, **kw: Any) -> None:
        f.detail = f"{path} {kw}"
        self.stack.control.inject(path, **kw)
        self.stop.wait(self.scale.fault_s)
        self.stack.control.clear_injections()

    def _token_errors(self, f: FaultLog) -> None:
        f.detail = "429 Retry-After 2, then 500, 503 on /token"
        c = self.stack.control
        c.inject(TOKEN_PATH, status=429, retry_after=2, count=40)
        c.inject(TOKEN_PATH, status=500, count=40)
        c.inject(TOKEN_PATH, status=503, retry_after=1, count=40)
        self.stop.wait(self.scale.fault_s)
        c.clear_injections()

    def _slow_token(self, f: FaultLog, c: Any) -> None:
        f.detail = "3000 ms on every token request"
        c.set_token_latency(3000)
        self.stop.wait(self.scale.fault_s)
        c.set_token_latency(0)

    def _azurite(self, f: FaultLog) -> None:
        f.detail = f"stopped {self.scale.azurite_down_s:.0f} s, restarted on the same ports"
        self.stack.stop_azurite()
        self.stop.wait(self.scale.azurite_down_s)
        self.stack.start_azurite()

    def _kill_host(self, f: FaultLog) -> None:
        h = self.stack.hosts[-1]
        f.detail = f"SIGKILL host{h.index} (port {h.port}), restarted"
        self.stack.kill_host(h)
        self.stop.wait(1.0)
        self.stack.start_host(h)

    def _rotate_secret(self, f: FaultLog) -> None:
        """The operator's rotation: new secret at Entra, then in Key Vault, then the old one expires."""
        c = self.stack.control
        old = self.stack.client_secrets[-1]
        new = f"chaos-client-secret-{len(self.stack.client_secrets) + 1}-{secrets.token_urlsafe(12)}"
        self.stack.client_secrets.append(new)
        c.set_client_secret_valid(CLIENT_ID, new, True)
        self.stack.vault.set_secret("ms-client-secret", new)
        self.stop.wait(1.0)
        c.set_client_secret_valid(CLIENT_ID, old, False)  # hosts still caching it get AADSTS7000215
        f.detail = "new secret at Entra + Key Vault; old one expired (hosts not restarted)"

    def _rotate_ring(self, f: FaultLog) -> None:
        import base64

        key = base64.b64encode(secrets.token_bytes(32)).decode()
        self.stack.key_material.append(key)
        kid = f"c{len(self.stack.ring['keys']) + 1}"
        ring = {"active": kid, "keys": {**self.stack.ring["keys"], kid: key}}
        self.stack.ring = ring
        out = self.stack.reencrypt(ring)
        f.detail = f"active key {kid} in Key Vault; reencrypt examined {out['examined']}, rewrote {out['reencrypted']}"

    def _revoke(self, f: FaultLog) -> None:
        self.stack.control.revoke_grants(REVOKED_USER)
        self.revoked_at = self.rec.now()
        f.detail = "the user's accounts must end reauth_required (re-connects after it stay active)"

    def _webhook_outage(self, start: float) -> None:
        if self._wait_until(start):
            return
        f = FaultLog("webhook receiver down", f"{self.scale.webhook_down_s:.0f} s", self.rec.now())
        with self.lock:
            self.log.append(f)
        print(f"chaos: [{f.started:6.1f}s] fault: webhook receiver down", flush=True)
        assert self.stack.receiver is not None
        expected = set(self.rec.connected)  # events due before the outage must all arrive after it
        self.stack.receiver.stop()
        self.stop.wait(self.scale.webhook_down_s)
        self.stack.receiver.start()
        f.ended = self.rec.now()
        with self.rec.lock:
            expected |= set(self.rec.connected)
        f.recovered = self._until(lambda: expected <= _connected_ids(self.stack))

    # -- probes -----------------------------------------------------------------------------
    def _probe(self, method: str, path: str, host: int) -> bool:
        r = self.probe.call(method, path, route="probe", sub=self.canary.owner, host=host, timeout=10)
        return r is not None and r.status_code == 200

    def _each_host(self, method: str, suffix: str) -> bool:
        path = f"/api/accounts/{self.canary.account_id}{suffix}"
        return all(self._probe(method, path, i) for i in range(len(self.stack.hosts)))

    def _all_hosts_ok(self) -> bool:
        health = all(self.stack.http.get(h.url + "/api/health", timeout=5).status_code == 200 for h in self.stack.hosts)
        return health and self._each_host("GET", "")

    def _graph_ok(self) -> bool:
        return self._each_host("GET", "/messages?top=1")

    def _refresh_ok(self) -> bool:
        return self._each_host("POST", "/refresh")


def _connected_ids(stack: ChaosStack) -> set[str]:
    assert stack.receiver is not None
    return {e["data"]["account"]["id"] for e in stack.receiver.snapshot().values()
            if e["type"] == "account.connected"}
