"""Outbound webhooks: ``account.connected``, ``account.reauth_required``, ``account.recovered``,
``account.disconnected`` (SPEC §6).

Body: JSON ``{"id","type","createdAt","data":{"account":Account}}``. Signature header, in the
style of Stripe's scheme: ``X-Connector-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "t.body")>``.
A receiver recomputes the HMAC over the raw body, compares in constant time, and rejects a
``t`` older than 5 minutes (replay); see ``docs/webhooks.md``.

Events go through the ``webhook-deliveries`` queue, so a slow or failing receiver never blocks
the connect or refresh that caused them. Failed deliveries are re-enqueued with exponential
backoff and jitter (visibility timeout), up to :data:`MAX_ATTEMPTS`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from shared.accounts import iso, utcnow
from shared.backoff import backoff_delay

if TYPE_CHECKING:
    import requests

    from shared.storage import Queue

AccountJson = dict[str, object]

log = logging.getLogger("connector.webhooks")

EVENTS = ("account.connected", "account.reauth_required", "account.recovered", "account.disconnected")
SIGNATURE_HEADER = "X-Connector-Signature"
MAX_ATTEMPTS = 8
TOLERANCE_S = 300


def sign(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, body: bytes, header: str, *, now: int | None = None, tolerance_s: int = TOLERANCE_S) -> bool:
    """Receiver-side check (also used by our tests): signature and freshness."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        t = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs((now or int(time.time())) - t) > tolerance_s:
        return False
    expected = sign(secret, body, t).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


class Webhooks:
    def __init__(self, url: str | None, secret: str | None, *, queue: Callable[[], Queue],
                 session: requests.Session) -> None:
        self._url = url
        self._secret = secret
        self._queue = queue  # the queue, created on first use
        self._session = session

    @property
    def enabled(self) -> bool:
        return bool(self._url and self._secret)

    def emit(self, event: str, account: AccountJson) -> None:
        """Enqueue an event; never raises (a webhook problem must not fail the operation)."""
        if not self.enabled:
            return
        if event not in EVENTS:
            raise ValueError(f"unknown webhook event {event!r}")  # a programming error, not a delivery problem
        payload = {"id": "evt_" + uuid.uuid4().hex, "type": event, "createdAt": iso(utcnow()),
                   "data": {"account": account}}
        try:
            self._queue().send(json.dumps({"attempt": 0, "event": payload}).encode())
        except Exception as e:
            log.error("could not enqueue webhook %s: %s", event, type(e).__name__)

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
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self._secret, body, int(time.time())),
                   "X-Connector-Event": event["type"], "X-Connector-Delivery": event["id"]}
        try:
            resp = self._session.post(self._url, data=body, headers=headers, timeout=(5, 10))
            ok = 200 <= resp.status_code < 300
            why = f"HTTP {resp.status_code}"
        except Exception as e:
            ok, why = False, type(e).__name__
        if ok:
            log.info("webhook %s delivered (%s)", event["type"], event["id"])
            return
        attempt += 1
        if attempt >= MAX_ATTEMPTS:
            log.error("webhook %s (%s) abandoned after %d attempts: %s", event["type"], event["id"], attempt, why)
            return
        delay = int(backoff_delay(attempt, base=5, cap=3600))
        log.warning("webhook %s failed (%s); retry %d in %d s", event["type"], why, attempt, delay)
        self._queue().send(json.dumps({"attempt": attempt, "event": event}).encode(), visibility_timeout=delay)
