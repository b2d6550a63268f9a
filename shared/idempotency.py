"""``Idempotency-Key`` for sends (SPEC §4), in the spirit of draft-ietf-httpapi-idempotency-key-header.

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
from typing import Any

from shared.accounts import iso, owner_partition, parse_iso, utcnow
from shared.errors import ConflictError, ConnectorError, ValidationError

log = logging.getLogger("connector.idempotency")

TTL = dt.timedelta(hours=24)
WAIT_FOR_DUPLICATE_S = 60.0
# A send still "pending" after this long lost its process (crash, host recycled) or its result write:
# whether it was delivered is unknown, so it is treated like an unknown outcome, never re-sent.
PENDING_STALE = dt.timedelta(minutes=15)
_KEY_MAX = 255


def _row(owner: str, account_id: str, key: str) -> tuple[str, str]:
    if not key or len(key) > _KEY_MAX or any(ord(c) < 0x21 or ord(c) > 0x7E for c in key):
        raise ValidationError("Idempotency-Key", "Idempotency-Key must be 1-255 visible ASCII characters.")
    return owner_partition(owner) + "-" + account_id, hashlib.sha256(key.encode()).hexdigest()


def run_once(table: Any, owner: str, account_id: str, key: str | None, body_hash: str,
             action: Callable[[], dict[str, Any]], *, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Run ``action`` at most once per (owner, account, key); replay its result for duplicates."""
    if key is None:
        return action()
    from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError

    pk, rk = _row(owner, account_id, key)
    now = utcnow()
    entity = {"PartitionKey": pk, "RowKey": rk, "bodyHash": body_hash, "state": "pending",
              "createdAt": iso(now), "expiresAt": iso(now + TTL)}
    deadline = time.monotonic() + WAIT_FOR_DUPLICATE_S
    while True:
        try:
            claimed = table.create_entity(entity)
            break
        except ResourceExistsError:
            pass
        try:
            existing = table.get_entity(pk, rk)
        except ResourceNotFoundError:
            continue  # removed meanwhile (failed first attempt): try to claim it again
        expires = parse_iso(existing.get("expiresAt"))
        if expires and expires <= utcnow():
            try:
                table.delete_entity(pk, rk, etag=existing.metadata["etag"], match_condition=_if_not_modified())
            except ResourceModifiedError:
                pass  # someone else replaced the expired record; look again
            continue
        if existing.get("bodyHash") != body_hash:
            raise ConflictError("This Idempotency-Key was already used with a different request body.",
                                code="idempotency_key_reused", hint="Use a new key for a different message.")
        state = existing.get("state")
        created = parse_iso(existing.get("createdAt"))
        if state == "pending" and created and utcnow() - created > PENDING_STALE:
            state = "unknown"
        if state == "done":
            result: dict[str, Any] = json.loads(existing["result"])
            return result
        if state == "unknown":
            raise ConflictError(
                "An earlier request with this Idempotency-Key may or may not have been delivered (Microsoft did not "
                "answer). It is not sent again to avoid a duplicate.", code="send_outcome_unknown",
                hint="Check the recipient's mailbox or Sent Items; send with a new key if it did not arrive.")
        if time.monotonic() > deadline:
            raise ConflictError("A request with this Idempotency-Key is still in progress.",
                                code="idempotency_in_progress", hint="Retry in a few seconds.")
        sleep(0.2)  # a concurrent duplicate is sending: wait for its result
    try:
        result = action()
    except ConnectorError as err:
        if err.extra.get("outcomeUnknown"):
            _best_effort(lambda: table.update_entity({"PartitionKey": pk, "RowKey": rk, "state": "unknown"},
                                                     mode=_merge()), "mark the send unknown")
        else:
            _best_effort(lambda: _release(table, pk, rk, claimed), "release the key")
        raise
    except BaseException:
        _best_effort(lambda: _release(table, pk, rk, claimed), "release the key")
        raise
    # The message is sent: a failure to record that must not turn into an error for the caller
    # (who would retry a delivered message). A record left "pending" becomes "unknown" later.
    _best_effort(lambda: table.update_entity({"PartitionKey": pk, "RowKey": rk, "state": "done",
                                              "result": json.dumps(result)}, mode=_merge()), "record the result")
    return result


def _release(table: Any, pk: str, rk: str, claimed: Any) -> None:
    """Remove *our* pending record (ETag-conditional: never a record a later request claimed)."""
    from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

    try:
        table.delete_entity(pk, rk, etag=claimed.get("etag"), match_condition=_if_not_modified())
    except (ResourceNotFoundError, ResourceModifiedError):
        pass  # already gone, or no longer ours


def _best_effort(write: Callable[[], Any], what: str, attempts: int = 3) -> None:
    for i in range(attempts):
        try:
            write()
            return
        except Exception as e:  # storage trouble; the SDK has retried already
            if i == attempts - 1:
                log.error("idempotency: could not %s (%s)", what, type(e).__name__)
            else:
                time.sleep(0.2 * (i + 1))


def purge_expired(table: Any, now: dt.datetime | None = None) -> int:
    """Delete records past their 24 h window (Table Storage has no TTL). Returns the count."""
    cutoff = iso(now or utcnow())
    n = 0
    for e in table.query_entities("expiresAt lt @c", parameters={"c": cutoff}, select=["PartitionKey", "RowKey"]):
        table.delete_entity(e["PartitionKey"], e["RowKey"])
        n += 1
    return n


def _merge() -> Any:
    from azure.data.tables import UpdateMode

    return UpdateMode.MERGE


def _if_not_modified() -> Any:
    from azure.core import MatchConditions

    return MatchConditions.IfNotModified
