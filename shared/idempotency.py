"""``Idempotency-Key`` for sends, in the spirit of draft-ietf-httpapi-idempotency-key-header.

The record (table ``idempotency``, PartitionKey = owner partition + account, RowKey = SHA-256 of the
key) is *created* before the send: creation is atomic in Table Storage, so of two concurrent
duplicates exactly one proceeds; the other waits for the first one's result.

* same key + same body within 24 h → the first result, nothing sent again;
* same key + another body → 409 ``idempotency_key_reused``;
* the send failed and Microsoft certainly did not deliver (validation, 4xx, throttled) → the record
  is removed, so the caller may retry with the same key;
* the outcome is unknown (timeout, 5xx on sendMail) → the record stays ``unknown`` and a retry
  with the same key answers 409 ``send_outcome_unknown`` instead of risking a second delivery.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from shared.accounts import iso, owner_partition, parse_iso, utcnow
from shared.backoff import backoff_delay
from shared.errors import ConflictError, ConnectorError, ValidationError

if TYPE_CHECKING:
    from shared.storage import Row, Table

log = logging.getLogger("connector.idempotency")

TTL = dt.timedelta(hours=24)
WAIT_FOR_DUPLICATE_S = 60.0
# A send still "pending" after this long lost its process (crash, host recycled) or its result write:
# whether it was delivered is unknown, so it is treated like an unknown outcome, never re-sent.
PENDING_STALE = dt.timedelta(minutes=15)
_KEY_MAX = 255
SendResult = dict[str, str | None]


def _row(owner: str, account_id: str, key: str) -> tuple[str, str]:
    if not key or len(key) > _KEY_MAX or any(ord(c) < 0x21 or ord(c) > 0x7E for c in key):
        raise ValidationError("Idempotency-Key", "Idempotency-Key must be 1-255 visible ASCII characters.")
    return owner_partition(owner) + "-" + account_id, hashlib.sha256(key.encode()).hexdigest()


def run_once(table: Table, owner: str, account_id: str, key: str | None, body_hash: str,
             action: Callable[[], SendResult], *, sleep: Callable[[float], None] = time.sleep) -> SendResult:
    """Run ``action`` at most once per (owner, account, key); replay its result for duplicates."""
    if key is None:
        return action()
    pk, rk = _row(owner, account_id, key)
    claimed = _claim(table, pk, rk, body_hash, sleep)
    if isinstance(claimed, dict):
        return claimed  # a duplicate: the first request's result
    try:
        result = action()
    except ConnectorError as err:
        if err.extra.get("outcomeUnknown"):
            _best_effort(lambda: table.merge({"PartitionKey": pk, "RowKey": rk, "state": "unknown"}),
                         "mark the send unknown", sleep)
        else:
            _best_effort(lambda: table.delete_if_present(pk, rk, etag=claimed), "release the key", sleep)
        raise
    except BaseException:
        _best_effort(lambda: table.delete_if_present(pk, rk, etag=claimed), "release the key", sleep)
        raise
    # The message is sent: a failure to record that must not turn into an error for the caller
    # (who would retry a delivered message). A record left "pending" becomes "unknown" later.
    _best_effort(lambda: table.merge({"PartitionKey": pk, "RowKey": rk, "state": "done",
                                      "result": json.dumps(result)}), "record the result", sleep)
    return result


def _claim(table: Table, pk: str, rk: str, body_hash: str, sleep: Callable[[float], None]) -> str | SendResult:
    """Create our pending record (returns its ETag), or the result of the request that created it first."""
    now = utcnow()
    entity = {"PartitionKey": pk, "RowKey": rk, "bodyHash": body_hash, "state": "pending",
              "createdAt": iso(now), "expiresAt": iso(now + TTL)}
    deadline = time.monotonic() + WAIT_FOR_DUPLICATE_S

    def expired(row: Row) -> bool:
        expires = parse_iso(row.get("expiresAt"))
        return expires is not None and expires <= utcnow()

    while True:
        claim = table.claim(entity, take_over=expired)  # a failed first attempt removed its row: ours now
        if claim.etag is not None:
            return claim.etag
        done = _replay(claim.row, body_hash) if claim.row is not None else None  # None: contended, look again
        if done is not None:
            return done
        if time.monotonic() > deadline:
            raise ConflictError("A request with this Idempotency-Key is still in progress.",
                                code="idempotency_in_progress", hint="Retry in a few seconds.")
        sleep(0.2)  # a concurrent duplicate is sending: wait for its result


def _replay(existing: Row, body_hash: str) -> SendResult | None:
    """The first request's result, a 409 for a reused key or an unknown outcome, or None (still pending)."""
    if existing.get("bodyHash") != body_hash:
        raise ConflictError("This Idempotency-Key was already used with a different request body.",
                            code="idempotency_key_reused", hint="Use a new key for a different message.")
    state = existing.get("state")
    created = parse_iso(existing.get("createdAt"))
    if state == "pending" and created and utcnow() - created > PENDING_STALE:
        state = "unknown"
    if state == "done":
        result: SendResult = json.loads(str(existing["result"]))
        return result
    if state == "unknown":
        raise ConflictError(
            "An earlier request with this Idempotency-Key may or may not have been delivered (Microsoft did not "
            "answer). It is not sent again to avoid a duplicate.", code="send_outcome_unknown",
            hint="Check the recipient's mailbox or Sent Items; send with a new key if it did not arrive.")
    return None


def _best_effort(write: Callable[[], object], what: str, sleep: Callable[[float], None], attempts: int = 3) -> None:
    for i in range(1, attempts + 1):
        try:
            write()
            return
        except Exception as e:
            if i == attempts:
                log.error("idempotency: could not %s (%s)", what, type(e).__name__)
            else:
                sleep(backoff_delay(i, base=0.1, cap=1.0))
