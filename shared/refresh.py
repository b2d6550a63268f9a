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
    ThrottledError,
    UpstreamUnavailableError,
)
from shared.storage import ACCOUNTS_TABLE, REFRESH_INDEX_TABLE, REFRESH_QUEUE

log = logging.getLogger("connector.refresh")

BUCKET = dt.timedelta(minutes=5)
MAX_TRANSIENT_ATTEMPTS = 6
OPERATOR_RETRY = dt.timedelta(minutes=15)


def bucket_of(t: dt.datetime) -> str:
    t = t.astimezone(dt.timezone.utc)
    return t.replace(minute=t.minute - t.minute % 5, second=0, microsecond=0).strftime("%Y%m%d%H%M")


def _row_key(account: Account) -> str:
    return f"{owner_partition(account.owner)}|{account.id}"


def index_account(connector: Any, account: Account) -> None:
    """Write the index row for the account's next due time (idempotent upsert)."""
    if account.status != ACTIVE or account.refresh_due_at is None:
        return
    table = connector.storage.table(REFRESH_INDEX_TABLE)
    table.upsert_entity({"PartitionKey": bucket_of(account.refresh_due_at), "RowKey": _row_key(account),
                         "owner": account.owner, "accountId": account.id})


def unindex_account(connector: Any, account: Account) -> None:
    if account.refresh_due_at is None:
        return
    from azure.core.exceptions import ResourceNotFoundError

    try:
        connector.storage.table(REFRESH_INDEX_TABLE).delete_entity(bucket_of(account.refresh_due_at),
                                                                   _row_key(account))
    except ResourceNotFoundError:
        pass


def enqueue_due(connector: Any, now: dt.datetime | None = None) -> dict[str, int]:
    """Timer body: move every due index row into the refresh queue. Returns counts."""
    now = now or utcnow()
    table = connector.storage.table(REFRESH_INDEX_TABLE)
    queue = connector.storage.queue(REFRESH_QUEUE)
    rows = list(table.query_entities("PartitionKey le @b", parameters={"b": bucket_of(now)},
                                     select=["PartitionKey", "RowKey", "owner", "accountId"]))
    by_partition: dict[str, list[Any]] = defaultdict(list)
    for r in rows:
        queue.send_message(json.dumps({"owner": r["owner"], "accountId": r["accountId"], "attempt": 0}).encode())
        by_partition[r["PartitionKey"]].append(r)
    for pk, items in by_partition.items():
        for i in range(0, len(items), 100):  # entity group transactions: ≤ 100 ops, one partition
            table.submit_transaction([("delete", {"PartitionKey": pk, "RowKey": e["RowKey"]}) for e in items[i:i + 100]])
    log.info(json.dumps({"event": "refresh.enqueued", "indexRowsRead": len(rows), "enqueued": len(rows)}))
    return {"read": len(rows), "enqueued": len(rows)}


def process(connector: Any, message: bytes, *, now: dt.datetime | None = None) -> str:
    """Queue-worker body for one account. Returns what happened (for logs and tests)."""
    try:
        job = json.loads(message)
        owner, account_id, attempt = str(job["owner"]), str(job["accountId"]), int(job.get("attempt", 0))
    except (ValueError, KeyError, TypeError):
        log.error("dropping a malformed refresh message")
        return "malformed"
    now = now or utcnow()
    try:
        acc = connector.accounts.get_account(owner, account_id)
    except NotFoundError:
        return "gone"
    if acc.status != ACTIVE:
        return "inactive"
    due = acc.refresh_due_at
    if due is not None and due > now + BUCKET:
        index_account(connector, acc)  # refreshed meanwhile: make sure its next row exists
        return "not_due"
    try:
        connector.tokens.refresh(owner, account_id, force=True)
    except ReauthRequiredError:
        return "reauth_required"
    except OperatorError as e:
        log.error("refresh of %s skipped: the app registration is rejected (%s)", account_id, e.code)
        _reindex_at(connector, acc, now + OPERATOR_RETRY)
        return "operator_error"
    except (UpstreamUnavailableError, ThrottledError) as e:
        attempt += 1
        if attempt >= MAX_TRANSIENT_ATTEMPTS:
            log.warning("refresh of %s still failing after %d attempts (%s); back to the index", account_id,
                        attempt, e.code)
            _reindex_at(connector, acc, now + dt.timedelta(minutes=30))
            return "deferred"
        delay = min(3600, max(1, round(2 ** attempt * (0.5 + random.random()))))
        if isinstance(e, ThrottledError):
            delay = max(delay, e.retry_after)
        connector.storage.queue(REFRESH_QUEUE).send_message(
            json.dumps({"owner": owner, "accountId": account_id, "attempt": attempt}).encode(),
            visibility_timeout=delay)
        log.warning("refresh of %s failed transiently (%s); retry %d in %d s", account_id, e.code, attempt, delay)
        return "retry_scheduled"
    return "refreshed"


def _reindex_at(connector: Any, acc: Account, when: dt.datetime) -> None:
    from dataclasses import replace

    index_account(connector, replace(acc, refresh_due_at=when))


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
