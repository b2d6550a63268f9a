"""Proactive refresh (SPEC §6): a due-time index, a timer that fans out, a queue worker.

* **Index** (table ``refreshindex``): PartitionKey = the 5-minute bucket of the due time
  (``yyyyMMddHHmm``), RowKey = ``<owner partition>|<account id>``. A timer run reads only
  partitions ``<=`` the current bucket — the due rows — never the accounts table.
* The account record stays the truth: the worker re-reads it and skips accounts that are no
  longer due (refreshed by a send meanwhile), deleted or already ``reauth_required``. Stale or
  duplicate index rows therefore cost one read, never a wrong refresh. A daily reconciliation
  re-creates index rows from the accounts table in case a write was lost.
* **Policy**: accounts used in the last day get their access token renewed before it expires;
  idle ones get a refresh-token keep-alive every ``KEEPALIVE_DAYS`` (default 7, far inside the
  90-day inactivity window). Due times carry random jitter so renewals do not synchronise.
* **Failures**: a dead grant → ``reauth_required`` + webhook, no retry (``TokenManager``);
  network / 5xx / 429 → re-enqueued with exponential backoff and jitter, status unchanged;
  ``invalid_client`` → ERROR log, health fails, account untouched, retried later.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
from collections import defaultdict
from typing import Any

from shared.accounts import ACTIVE, Account, owner_partition, parse_iso, utcnow
from shared.errors import (
    NotFoundError,
    OperatorError,
    ReauthRequiredError,
    StorageUnavailableError,
    ThrottledError,
    UpstreamUnavailableError,
)
from shared.storage import ACCOUNTS_TABLE, REFRESH_INDEX_TABLE, REFRESH_QUEUE

log = logging.getLogger("connector.refresh")

BUCKET = dt.timedelta(minutes=5)
REARM = dt.timedelta(minutes=30)  # an enqueued account comes back this much later unless its worker finishes
MAX_TRANSIENT_ATTEMPTS = 6
OPERATOR_RETRY = dt.timedelta(minutes=15)


def bucket_of(t: dt.datetime) -> str:
    t = t.astimezone(dt.timezone.utc)
    return t.replace(minute=t.minute - t.minute % 5, second=0, microsecond=0).strftime("%Y%m%d%H%M")


def _row_key(account: Account) -> str:
    return f"{owner_partition(account.owner)}|{account.id}"


def index_account(connector: Any, account: Account, *, previous_due: dt.datetime | None = None) -> None:
    """Write the index row for the account's next due time (idempotent upsert).

    ``previous_due`` is the due time the row was indexed under before: its row is removed, so that
    refreshes outside the timer (a send, refresh-now, a re-connect) leave no stale row for the
    timer to read (SPEC §9: entities read ≈ accounts due).
    """
    if account.status == ACTIVE and account.refresh_due_at is not None:
        connector.storage.table(REFRESH_INDEX_TABLE).upsert_entity(
            {"PartitionKey": bucket_of(account.refresh_due_at), "RowKey": _row_key(account),
             "owner": account.owner, "accountId": account.id})
    if previous_due is not None and (account.refresh_due_at is None or account.status != ACTIVE
                                     or bucket_of(previous_due) != bucket_of(account.refresh_due_at)):
        _delete_row(connector, bucket_of(previous_due), _row_key(account))


def unindex_account(connector: Any, account: Account) -> None:
    if account.refresh_due_at is not None:
        _delete_row(connector, bucket_of(account.refresh_due_at), _row_key(account))


def _delete_row(connector: Any, bucket: str, row_key: str) -> None:
    from azure.core.exceptions import ResourceNotFoundError

    try:
        connector.storage.table(REFRESH_INDEX_TABLE).delete_entity(bucket, row_key)
    except ResourceNotFoundError:
        pass


def enqueue_due(connector: Any, now: dt.datetime | None = None) -> dict[str, int]:
    """Timer body: move every due index row into the refresh queue. Returns counts.

    Each due row moves to a *re-arm* bucket ``REARM`` ahead rather than being deleted: the worker
    deletes it when it is done with the account, so a message lost to a crash or the poison queue
    brings the account back on a later timer run instead of waiting for the daily reconciliation.
    """
    now = now or utcnow()
    table = connector.storage.table(REFRESH_INDEX_TABLE)
    queue = connector.storage.queue(REFRESH_QUEUE)
    rows = list(table.query_entities("PartitionKey le @b", parameters={"b": bucket_of(now)},
                                     select=["PartitionKey", "RowKey", "owner", "accountId"]))
    rearm = bucket_of(now + REARM)
    by_partition: dict[str, list[Any]] = defaultdict(list)
    for r in rows:
        by_partition[r["PartitionKey"]].append(r)
    # Entity group transactions: ≤ 100 operations, all in one partition.
    unique = list({r["RowKey"]: r for r in rows}.values())
    for i in range(0, len(unique), 100):
        table.submit_transaction([("upsert", {"PartitionKey": rearm, "RowKey": e["RowKey"], "owner": e["owner"],
                                              "accountId": e["accountId"]}) for e in unique[i:i + 100]])
    for r in unique:
        queue.send_message(json.dumps({"owner": r["owner"], "accountId": r["accountId"], "attempt": 0,
                                       "rearm": rearm}).encode())
    for pk, items in by_partition.items():  # all ≤ now, so never the re-arm bucket
        for i in range(0, len(items), 100):
            batch = items[i:i + 100]
            try:
                table.submit_transaction([("delete", {"PartitionKey": pk, "RowKey": e["RowKey"]}) for e in batch])
            except Exception:  # a row removed meanwhile (a refresh moved it) fails the whole transaction
                for e in batch:
                    _delete_row(connector, pk, e["RowKey"])
    log.info(json.dumps({"event": "refresh.enqueued", "indexRowsRead": len(rows), "enqueued": len(unique)}))
    return {"read": len(rows), "enqueued": len(unique)}


def process(connector: Any, message: bytes, *, now: dt.datetime | None = None) -> str:
    """Queue-worker body for one account. Returns what happened (for logs and tests)."""
    try:
        job = json.loads(message)
        owner, account_id, attempt = str(job["owner"]), str(job["accountId"]), int(job.get("attempt", 0))
        rearm = job.get("rearm")
        if rearm is not None and not (isinstance(rearm, str) and rearm.isdigit()):
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError):
        log.error("dropping a malformed refresh message")
        return "malformed"
    now = now or utcnow()
    outcome, acc = _process(connector, owner, account_id, attempt, rearm, now)
    if rearm and outcome != "retry_scheduled":  # a retry keeps the re-arm row as its safety net
        due = acc.refresh_due_at if acc is not None and acc.status == ACTIVE else None
        if due is None or bucket_of(due) != rearm:
            _delete_row(connector, rearm, f"{owner_partition(owner)}|{account_id}")
    return outcome


def _process(connector: Any, owner: str, account_id: str, attempt: int, rearm: str | None,
             now: dt.datetime) -> tuple[str, Account | None]:
    try:
        acc = connector.accounts.get_account(owner, account_id)
    except NotFoundError:
        return "gone", None
    if acc.status != ACTIVE:
        return "inactive", acc
    due = acc.refresh_due_at
    if due is not None and due > now + BUCKET:
        index_account(connector, acc)  # refreshed meanwhile: make sure its next row exists
        return "not_due", acc
    try:
        # The timer already moved this account's index row to the re-arm bucket (removed below), so
        # the refresh need not delete the row of its previous due time.
        return "refreshed", connector.tokens.refresh(owner, account_id, force=True, account=acc,
                                                     previous_row_consumed=True)
    except ReauthRequiredError:
        return "reauth_required", None
    except OperatorError as e:
        log.error("refresh of %s skipped: the app registration is rejected (%s)", account_id, e.code)
        return "operator_error", _reindex_at(connector, acc, now + OPERATOR_RETRY)
    except (UpstreamUnavailableError, ThrottledError, StorageUnavailableError) as e:
        attempt += 1
        if attempt >= MAX_TRANSIENT_ATTEMPTS:
            log.warning("refresh of %s still failing after %d attempts (%s); back to the index", account_id,
                        attempt, e.code)
            return "deferred", _reindex_at(connector, acc, now + dt.timedelta(minutes=30))
        delay = min(3600, max(1, round(2 ** attempt * (0.5 + random.random()))))
        if isinstance(e, ThrottledError):
            delay = max(delay, e.retry_after)
        if delay >= REARM.total_seconds():
            # Longer than the re-arm row waits: let the index bring the account back instead of a
            # queued retry, or both would fire.
            return "deferred", _reindex_at(connector, acc, now + dt.timedelta(seconds=delay))
        connector.storage.queue(REFRESH_QUEUE).send_message(
            json.dumps({"owner": owner, "accountId": account_id, "attempt": attempt, "rearm": rearm}).encode(),
            visibility_timeout=delay)
        log.warning("refresh of %s failed transiently (%s); retry %d in %d s", account_id, e.code, attempt, delay)
        return "retry_scheduled", acc


def _reindex_at(connector: Any, acc: Account, when: dt.datetime) -> Account:
    from dataclasses import replace

    later = replace(acc, refresh_due_at=when)
    index_account(connector, later)
    return later


def reconcile(connector: Any) -> int:
    """Daily: re-create index rows for every active account (repairs lost writes). Returns count."""
    table = connector.storage.table(ACCOUNTS_TABLE)
    n = 0
    for e in table.query_entities("status eq 'active'", select=["PartitionKey", "RowKey", "owner", "refreshDueAt",
                                                                  "status"]):
        due = parse_iso(e.get("refreshDueAt")) or utcnow()
        connector.storage.table(REFRESH_INDEX_TABLE).upsert_entity(
            {"PartitionKey": bucket_of(due), "RowKey": f"{e['PartitionKey']}|{e['RowKey']}", "owner": e["owner"],
             "accountId": e["RowKey"]})
        n += 1
    return n


def cleanup(connector: Any, now: dt.datetime | None = None) -> dict[str, int]:
    """Purge expired OAuth states and idempotency records (Table Storage has no TTL)."""
    from shared.accounts import iso
    from shared.idempotency import purge_expired
    from shared.storage import IDEMPOTENCY_TABLE, STATES_TABLE

    now = now or utcnow()
    states = connector.storage.table(STATES_TABLE)
    n_states = 0
    for e in states.query_entities("expiresAt lt @c", parameters={"c": now.isoformat()},
                                   select=["PartitionKey", "RowKey"]):
        states.delete_entity(e["PartitionKey"], e["RowKey"])
        n_states += 1
    n_idem = purge_expired(connector.storage.table(IDEMPOTENCY_TABLE), now)
    log.info(json.dumps({"event": "cleanup", "states": n_states, "idempotency": n_idem, "at": iso(now)}))
    return {"states": n_states, "idempotency": n_idem}
