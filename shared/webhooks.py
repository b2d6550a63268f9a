"""Outbound webhooks: ``account.connected``, ``account.reauth_required``, ``account.recovered``,
``account.disconnected``, the team-mailbox tenant events ``tenant.consent_required`` and ``tenant.recovered``,
and the mailbox events ``message.received``, ``message.sent``, ``message.updated`` and ``message.deleted``
(docs/webhooks.md).

Body: JSON ``{"id","type","createdAt","data":{"account":Account}}``; a tenant event carries
``"data":{"tenantConnection":TenantConnection,"accountIds":[…]}``; a mailbox event carries
``"data":{"accountId","message":{…}}`` instead (``message.sent`` also ``origin`` and ``trackingId``).
Signature header, in the style of Stripe's scheme:
``X-Connector-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "t.body")>``.
A receiver recomputes the HMAC over the raw body, compares in constant time, rejects a ``t``
older than 5 minutes or more than :data:`FUTURE_SKEW_S` ahead, and drops event ids it has already
handled (replays); see ``docs/webhooks.md``. Deliveries never follow redirects: a 3xx would make
the HTTP client re-post the signed body to wherever ``Location`` points (a 307/308 keeps the
method and body, RFC 9110 §15.4.8), so it counts as a failed delivery.

Events go through the ``webhook-deliveries`` queue, so a slow or failing receiver never blocks
the connect or refresh that caused them. Failed deliveries are re-enqueued with exponential
backoff and jitter (visibility timeout), up to :data:`MAX_ATTEMPTS`.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from shared.accounts import iso, utcnow
from shared.backoff import backoff_delay

if TYPE_CHECKING:
    import requests

    from shared.storage import Queue
    from shared.telemetry import Telemetry

AccountJson = dict[str, object]

log = logging.getLogger("connector.webhooks")

EVENTS = ("account.connected", "account.reauth_required", "account.recovered", "account.disconnected")
TENANT_EVENTS = ("tenant.consent_required", "tenant.recovered")  # data: {"tenantConnection", "accountIds"}
MESSAGE_RECEIVED = "message.received"  # data: {"accountId", "message"}, not {"account"}
MESSAGE_EVENTS = (MESSAGE_RECEIVED, "message.sent", "message.updated", "message.deleted")
SIGNATURE_HEADER = "X-Connector-Signature"
MAX_ATTEMPTS = 8
PENDING_MAX = 10_000  # events kept in memory while storage is down
PENDING_RETRY_S = 900  # how long they are retried before they are given up (logged at ERROR)
TOLERANCE_S = 300
FUTURE_SKEW_S = 30  # clock skew accepted on a timestamp from the future
_MAX_HEADER = 512


def sign(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, body: bytes, header: str, *, now: int | None = None, tolerance_s: int = TOLERANCE_S) -> bool:
    """Receiver-side check (also used by our tests): signature and freshness. Never raises: anything
    malformed (header, timestamp, a non-ASCII or non-hex ``v1``) is simply not valid."""
    try:
        parts = _signature_parts(header)
        t = int(parts["t"]) if parts["t"].isascii() and parts["t"].isdigit() and len(parts["t"]) <= 12 else -1
        given = parts.get("v1", "")
        if t < 0 or not given.isascii():
            return False
        current = int(time.time()) if now is None else now
        if current - t > tolerance_s or t - current > FUTURE_SKEW_S:
            return False
        expected = sign(secret, body, t).split("v1=", 1)[1]
        return hmac.compare_digest(expected.encode("ascii"), given.encode("ascii"))
    except Exception:  # a receiver's check must answer False, never a 500
        return False


def _signature_parts(header: object) -> dict[str, str]:
    if not isinstance(header, str) or len(header) > _MAX_HEADER:
        raise ValueError("bad signature header")
    parts = dict(p.strip().split("=", 1) for p in header.split(",") if "=" in p)
    if "t" not in parts:
        raise ValueError("no timestamp")
    return parts


class Webhooks:
    def __init__(self, url: str | None, secret: str | Callable[[], str] | None, *, queue: Callable[[], Queue],
                 session: requests.Session, telemetry: Telemetry | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        from shared.telemetry import OFF

        self._telemetry = telemetry or OFF  # connector.webhook.delivery (docs/operations.md)
        # ``secret`` may be a callable (the Key Vault read, cached with a TTL): resolved per delivery,
        # so a vault problem never stops start-up and a rotated secret is picked up without a restart.
        self._url = url
        self._secret = secret
        self._queue = queue  # the queue, created on first use
        self._session = session
        # Events that could not be queued (storage down) wait here and are retried in the background:
        # the operation that caused them already happened, so the event must still go out.
        self._pending: collections.deque[bytes] = collections.deque(maxlen=PENDING_MAX)
        self._pending_lock = threading.Lock()
        self._retrier: threading.Thread | None = None
        self._sleep = sleep

    @property
    def enabled(self) -> bool:
        return bool(self._url and self._secret)

    def emit(self, event: str, account: AccountJson) -> None:
        """Enqueue an event; never raises (a webhook problem must not fail the operation)."""
        if event not in EVENTS:
            raise ValueError(f"unknown webhook event {event!r}")  # a programming error, not a delivery problem
        self._enqueue(event, {"account": account})

    def emit_tenant(self, event: str, connection: AccountJson, account_ids: list[str]) -> None:
        """Enqueue a tenant event (:data:`TENANT_EVENTS`) about a team mailboxes' tenant connection; never raises."""
        if event not in TENANT_EVENTS:
            raise ValueError(f"unknown webhook event {event!r}")
        self._enqueue(event, {"tenantConnection": connection, "accountIds": account_ids})

    def _enqueue(self, event: str, data: dict[str, object]) -> None:
        if not self.enabled:
            return
        payload = {"id": "evt_" + uuid.uuid4().hex, "type": event, "createdAt": iso(utcnow()), "data": data}
        message = json.dumps({"attempt": 0, "event": payload}).encode()
        try:
            self._queue().send(message)
        except Exception as e:  # storage trouble: keep the event and retry it in the background
            log.warning("could not enqueue webhook %s (%s); retrying in the background", event, type(e).__name__)
            self._keep(message)

    def _keep(self, message: bytes) -> None:
        with self._pending_lock:
            if len(self._pending) == self._pending.maxlen:
                log.error("webhook retry buffer full; the oldest pending event is dropped")
            self._pending.append(message)
            if self._retrier is None or not self._retrier.is_alive():
                self._retrier = threading.Thread(target=self._flush_pending, name="webhook-enqueue-retry",
                                                 daemon=True)
                self._retrier.start()

    def _flush_pending(self) -> None:
        """Re-enqueue kept events with backoff until storage answers (bounded: PENDING_RETRY_S)."""
        deadline = time.monotonic() + PENDING_RETRY_S
        attempt = 0
        while time.monotonic() < deadline:
            with self._pending_lock:
                if not self._pending:
                    return
                message = self._pending[0]
            try:
                self._queue().send(message)
            except Exception as e:  # still down: wait and try again
                attempt += 1
                log.debug("webhook re-enqueue failed (%s)", type(e).__name__)
                self._sleep(backoff_delay(attempt, base=0.5, cap=30.0))
                continue
            attempt = 0
            with self._pending_lock:
                if self._pending and self._pending[0] is message:
                    self._pending.popleft()
        with self._pending_lock:
            lost, self._pending = len(self._pending), collections.deque(maxlen=PENDING_MAX)
        log.error("%d webhook event(s) could not be queued within %d s and are lost", lost, PENDING_RETRY_S)


    def enqueue_message_event(self, event: str, account_id: str, message: dict[str, object],
                              **extra: object) -> str | None:
        """Enqueue a mailbox event (:data:`MESSAGE_EVENTS`); returns the event id, None when webhooks are off.

        Unlike :meth:`emit` it raises (StorageUnavailableError) when the event could not be queued:
        mailbox events are delivered at least once, so the caller retries instead of losing one."""
        if event not in MESSAGE_EVENTS:
            raise ValueError(f"unknown mailbox event {event}")
        if not self.enabled:
            return None
        event_id = "evt_" + uuid.uuid4().hex
        payload = {"id": event_id, "type": event, "createdAt": iso(utcnow()),
                   "data": {"accountId": account_id, **extra, "message": message}}
        self._queue().send(json.dumps({"attempt": 0, "event": payload}).encode())
        return event_id

    def deliver(self, message: bytes) -> None:
        """Queue-trigger body: POST once; on failure re-enqueue with backoff instead of raising."""
        if not self.enabled:
            return
        try:
            item = json.loads(message)
            event, attempt = item["event"], int(item.get("attempt", 0))
        except (ValueError, KeyError, TypeError):
            log.error("dropping a malformed webhook message")
            return
        body = json.dumps(event, separators=(",", ":")).encode()
        if not (self._secret and self._url):  # narrowed by `enabled` above; keeps mypy and -O honest
            return
        try:
            secret = self._secret() if callable(self._secret) else self._secret
            headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, body, int(time.time())),
                       "X-Connector-Event": event["type"], "X-Connector-Delivery": event["id"]}
            resp = self._session.post(self._url, data=body, headers=headers, timeout=(5, 10), allow_redirects=False)
            ok = 200 <= resp.status_code < 300
            why = f"HTTP {resp.status_code}"
        except Exception as e:
            ok, why = False, type(e).__name__
        kind = event["type"] if event.get("type") in (*EVENTS, *MESSAGE_EVENTS) else "other"
        if ok:
            self._telemetry.webhook("delivered", attempt=attempt + 1, event=kind)
            log.info("webhook %s delivered (%s)", event["type"], event["id"])
            return
        attempt += 1
        if attempt >= MAX_ATTEMPTS:
            self._telemetry.webhook("abandoned", attempt=attempt, event=kind)
            log.error("webhook %s (%s) abandoned after %d attempts: %s", event["type"], event["id"], attempt, why)
            return
        self._telemetry.webhook("retry", attempt=attempt, event=kind)
        delay = int(backoff_delay(attempt, base=5, cap=3600))
        log.warning("webhook %s failed (%s); retry %d in %d s", event["type"], why, attempt, delay)
        self._queue().send(json.dumps({"attempt": attempt, "event": event}).encode(), visibility_timeout=delay)
