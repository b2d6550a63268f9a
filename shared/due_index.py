"""A due-time index: find the accounts due for work without scanning all accounts.

Two tables use it: ``refreshindex`` (proactive token refresh) and ``subscriptionindex`` (subscription
renewal and the safety catch-up). PartitionKey = the 5-minute bucket of the due time (``yyyyMMddHHmm``) and one of
:data:`SHARDS` shards (``yyyyMMddHHmm-ss``, ``ss`` from a CRC-32 of the RowKey), RowKey = ``<owner partition>|<account
id>``. A timer run reads only partitions before the next bucket — the due rows — never the accounts table.

Why shards: Table Storage serves at most 2,000 entities/s per partition
(https://learn.microsoft.com/azure/storage/tables/scalability-targets). With a million mailboxes, one 5-minute bucket
holds tens of thousands of rows, and the timer re-arms all of them at once: in one partition that is well past the
limit; over :data:`SHARDS` partitions each takes a sixteenth (``python -m bench scale`` shows the peak). Rows written
before shards existed (PartitionKey = the bucket alone) sort before the bucket's shards and are read, moved and
removed like the others. The account record stays the truth: a stale or
duplicate row costs one read of the account, never a wrong refresh.

Rows *move* with the due time (the row of the previous due time is removed), so refreshes outside
the timer (a send, refresh-now, a re-connect) leave nothing behind for the timer to read. A row
taken by the timer is re-armed ``REARM`` ahead rather than deleted; the worker removes the re-armed
row when it is done, so a queue message lost to a crash brings the account back on a later run.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import zlib
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from shared.accounts import ACTIVE, Account, owner_partition
from shared.errors import ConflictError, NotFoundError

if TYPE_CHECKING:
    from shared.storage import EntityValue, Row, Table

T = TypeVar("T")
BUCKET = dt.timedelta(minutes=5)
SHARDS = 16  # partitions per bucket
REARM = dt.timedelta(minutes=30)  # an enqueued account comes back this much later unless its worker finishes
_BATCH = 100  # entity-group transactions: at most 100 operations, one partition


def bucket_of(t: dt.datetime) -> str:
    t = t.astimezone(dt.timezone.utc)
    return t.replace(minute=t.minute - t.minute % 5, second=0, microsecond=0).strftime("%Y%m%d%H%M")


def row_key(owner: str, account_id: str) -> str:
    return f"{owner_partition(owner)}|{account_id}"


def partition_key(bucket: str, row: str) -> str:
    """The row's partition in ``bucket``: one of :data:`SHARDS`, fixed by the RowKey."""
    return f"{bucket}-{zlib.crc32(row.encode()) % SHARDS:02d}"


def bucket_of_partition(pk: str) -> str:
    return pk[:12]


@dataclass(frozen=True)
class DueAccount:
    owner: str
    account_id: str


class DueIndex:
    """One due-time index table: rows keyed by (bucket, owner and account), moved, taken and removed here only."""

    def __init__(self, table: Table) -> None:
        self._table = table

    def put(self, account: Account, *, previous_bucket: str | None = None) -> None:
        """Index the account at its due time; remove its row at ``previous_bucket`` if that differs.

        Two calls, not one entity-group transaction: the rows are in different partitions, and
        the SDK spends more than twice the CPU of a single write on a two-operation transaction.
        """
        due = account.refresh_due_at if account.status == ACTIVE else None
        if due is not None:
            self.put_row(account.owner, account.id, due)
        if previous_bucket is not None and (due is None or previous_bucket != bucket_of(due)):
            self.remove_row(previous_bucket, account.owner, account.id)

    def put_row(self, owner: str, account_id: str, due: dt.datetime) -> None:
        self._table.upsert(_row(bucket_of(due), owner, account_id))

    def move_row(self, owner: str, account_id: str, due: dt.datetime | None, *, stale: set[str]) -> None:
        """Index the account at ``due`` (None: nowhere) and remove its rows in the ``stale`` buckets (the
        previous due time, a re-armed row), except the new one."""
        keep = bucket_of(due) if due is not None else ""
        if due is not None:
            self.put_row(owner, account_id, due)
        for bucket in stale - {"", keep}:
            self.remove_row(bucket, owner, account_id)

    def remove_row(self, bucket: str, owner: str, account_id: str) -> None:
        rk = row_key(owner, account_id)
        self._table.delete_if_present(partition_key(bucket, rk), rk)

    def remove(self, account: Account) -> None:
        if account.refresh_due_at is not None:
            self.remove_row(bucket_of(account.refresh_due_at), account.owner, account.id)

    def take_due(self, now: dt.datetime) -> tuple[int, list[DueAccount], str]:
        """Re-arm every row due at ``now`` and remove it from its bucket.

        Returns (rows read, the distinct due accounts, the re-arm bucket).
        """
        # Every shard of every bucket up to now, and rows from before shards: all sort before the next bucket.
        rows = self._table.query("PartitionKey lt @b", parameters={"b": bucket_of(now + BUCKET)},
                                 select=["PartitionKey", "RowKey", "owner", "accountId"])
        rearm = bucket_of(now + REARM)
        unique = list({str(r["RowKey"]): r for r in rows}.values())
        shards: dict[str, list[dict[str, EntityValue]]] = defaultdict(list)
        for r in unique:
            row = _row(rearm, str(r["owner"]), str(r["accountId"]))
            shards[str(row["PartitionKey"])].append(row)
        # An entity-group transaction stays within one partition; the shards' batches run side by side (a bucket of
        # a million mailboxes' tens of thousands of rows must be done within the 5-minute schedule), each shard's one
        # after the other, so no partition takes more than its share of the timer's write rate.
        _side_by_side([[partial(self._table.submit, [("upsert", row) for row in part]) for part in _chunks(batch_rows)]
                       for batch_rows in shards.values()])
        self._delete_rows(rows)
        return len(rows), [DueAccount(str(r["owner"]), str(r["accountId"])) for r in unique], rearm

    def _delete_rows(self, rows: list[Row]) -> None:
        by_partition: dict[str, list[str]] = defaultdict(list)
        for r in rows:  # all ≤ now, so never the re-arm bucket
            by_partition[str(r["PartitionKey"])].append(str(r["RowKey"]))

        def delete(pk: str, batch: list[str]) -> None:
            try:
                self._table.submit([("delete", {"PartitionKey": pk, "RowKey": rk}) for rk in batch])
            except (NotFoundError, ConflictError):  # a row removed meanwhile fails the whole batch
                for rk in batch:
                    self._table.delete_if_present(pk, rk)

        _side_by_side([[partial(delete, pk, part) for part in _chunks(keys)] for pk, keys in by_partition.items()])

    def finish(self, owner: str, account_id: str, *, rearm: str, account: Account | None) -> None:
        """The worker is done with the account: drop the re-armed row unless it is the next due row."""
        due = account.refresh_due_at if account is not None and account.status == ACTIVE else None
        if due is None or bucket_of(due) != rearm:
            self.remove_row(rearm, owner, account_id)


def _chunks(items: list[T]) -> list[list[T]]:
    return [items[i:i + _BATCH] for i in range(0, len(items), _BATCH)]


def _side_by_side(lanes: list[list[Callable[[], object]]], workers: int = SHARDS) -> None:
    """Run each lane's calls in order, up to ``workers`` lanes at once (each in a copy of the caller's context: the
    storage call budget travels with it); the first failure is raised once every lane has stopped."""
    lanes = [lane for lane in lanes if lane]
    if len(lanes) <= 1:
        for call in (lanes[0] if lanes else []):
            call()
        return

    def run(lane: list[Callable[[], object]]) -> None:
        for call in lane:
            call()

    with ThreadPoolExecutor(min(workers, len(lanes)), thread_name_prefix="due-index") as pool:
        futures = [pool.submit(contextvars.copy_context().run, run, lane) for lane in lanes]
    for f in futures:
        f.result()


def _row(bucket: str, owner: str, account_id: str) -> dict[str, EntityValue]:
    rk = row_key(owner, account_id)
    return {"PartitionKey": partition_key(bucket, rk), "RowKey": rk, "owner": owner, "accountId": account_id}
