"""DueIndex against real Azurite: rows move with the due time, the timer takes only due rows and
re-arms them, and a finished worker removes the re-armed row."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import replace
from typing import Any

import pytest

from shared.accounts import ACTIVE, REAUTH_REQUIRED, Account
from shared.due_index import REARM, SHARDS, DueIndex, bucket_of, bucket_of_partition, partition_key, row_key
from shared.storage import Table
from tests.conftest import storage_settings

NOW = dt.datetime(2026, 12, 1, 12, 2, tzinfo=dt.timezone.utc)


@pytest.fixture()
def index(azurite: Any) -> tuple[DueIndex, Table]:
    from shared.storage import Storage

    table = Storage(storage_settings(azurite.connection_string)).table("ri" + uuid.uuid4().hex[:12])
    table.create_if_missing()
    return DueIndex(table), table


def _account(i: int, due: dt.datetime | None) -> Account:
    return Account(owner=f"owner-{i}", id=f"acc_{i}", home_account_id="", email="", display_name="", tenant_id="",
                   account_type="work", status=ACTIVE, scopes=(), connected_at=NOW, last_refreshed_at=None,
                   access_token_expires_at=None, last_used_at=None, last_error=None, refresh_due_at=due)


def _rows(table: Table) -> set[tuple[str, str]]:
    """(bucket, RowKey) of every row; each row is in its bucket's shard for its RowKey."""
    rows = {(str(e["PartitionKey"]), str(e["RowKey"])) for e in table.scan()}
    assert all(pk == partition_key(bucket_of_partition(pk), rk) for pk, rk in rows), rows
    return {(bucket_of_partition(pk), rk) for pk, rk in rows}


def test_rows_move_with_the_due_time_and_leave_with_the_account(index: tuple[DueIndex, Table]) -> None:
    idx, table = index
    a = _account(1, NOW + dt.timedelta(days=7))
    idx.put(a)
    moved = replace(a, refresh_due_at=NOW + dt.timedelta(minutes=40))
    idx.put(moved, previous_bucket=bucket_of(NOW + dt.timedelta(days=7)))
    assert _rows(table) == {(bucket_of(NOW + dt.timedelta(minutes=40)), row_key("owner-1", "acc_1"))}
    idx.put(replace(moved, status=REAUTH_REQUIRED, refresh_due_at=None),
            previous_bucket=bucket_of(NOW + dt.timedelta(minutes=40)))
    assert _rows(table) == set()  # a dead grant is not refreshed again
    idx.put(moved)
    idx.remove(moved)
    assert _rows(table) == set()


def test_take_due_reads_only_due_rows_and_rearms_them(index: tuple[DueIndex, Table]) -> None:
    idx, table = index
    due = [_account(i, NOW - dt.timedelta(minutes=5 * i)) for i in range(1, 4)]
    later = _account(9, NOW + dt.timedelta(hours=2))
    for a in due + [later]:
        idx.put(a)
    idx.put_row("owner-1", "acc_1", NOW - dt.timedelta(minutes=30))  # a duplicate (stale) row
    read, accounts, rearm = idx.take_due(NOW)
    assert read == 4  # the four due rows; the later one is not read
    assert sorted(a.account_id for a in accounts) == ["acc_1", "acc_2", "acc_3"]
    assert rearm == bucket_of(NOW + REARM)
    assert _rows(table) == {(rearm, row_key(a.owner, a.id)) for a in due} | {
        (bucket_of(later.refresh_due_at or NOW), row_key("owner-9", "acc_9"))}
    # A worker that finished keeps only the account's next row; one whose next due time falls in the
    # re-arm bucket keeps that row.
    idx.finish("owner-1", "acc_1", rearm=rearm, account=replace(due[0], refresh_due_at=NOW + dt.timedelta(days=1)))
    idx.finish("owner-2", "acc_2", rearm=rearm, account=replace(due[1], refresh_due_at=NOW + REARM))
    idx.finish("owner-3", "acc_3", rearm=rearm, account=None)  # deleted meanwhile
    assert (rearm, row_key("owner-1", "acc_1")) not in _rows(table)
    assert (rearm, row_key("owner-2", "acc_2")) in _rows(table)
    assert (rearm, row_key("owner-3", "acc_3")) not in _rows(table)


def test_take_due_spans_more_than_one_transaction(index: tuple[DueIndex, Table]) -> None:
    idx, table = index
    accounts = [_account(i, NOW - dt.timedelta(minutes=1)) for i in range(150)]  # > one 100-row transaction
    for a in accounts:
        idx.put(a)
    read, due, _ = idx.take_due(NOW)
    assert read == 150 and len(due) == 150
    assert all(pk == bucket_of(NOW + REARM) for pk, _ in _rows(table))
    # re-armed over the bucket's shards (entity-group transactions per partition), not into one partition
    assert len({str(e["PartitionKey"]) for e in table.scan()}) == SHARDS


def test_rows_written_before_shards_are_still_taken(index: tuple[DueIndex, Table]) -> None:
    idx, table = index
    table.upsert({"PartitionKey": bucket_of(NOW - dt.timedelta(minutes=10)), "RowKey": row_key("owner-old", "acc_old"),
                  "owner": "owner-old", "accountId": "acc_old"})
    read, due, rearm = idx.take_due(NOW)
    assert read == 1 and [d.account_id for d in due] == ["acc_old"]
    assert _rows(table) == {(rearm, row_key("owner-old", "acc_old"))}
