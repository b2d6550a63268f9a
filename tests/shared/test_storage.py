"""The storage layer against real Azurite, a port nobody listens on, and a server that never answers:
every azure-core condition becomes part of the exception tree, within the call's budget."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from devstack.azurite import connection_string, free_port
from shared.backoff import backoff_delay, retry_after_from, retry_after_seconds
from shared.errors import ConflictError, NotFoundError, StorageUnavailableError, to_problem
from shared.storage import BACKGROUND, INTERACTIVE, Storage, Table, background_budget
from tests.conftest import storage_settings


@pytest.fixture()
def table(azurite: Any) -> Iterator[Table]:
    t = Storage(storage_settings(azurite.connection_string)).table("st" + uuid.uuid4().hex[:12])
    t.create_if_missing()
    yield t


def test_reads_writes_and_conflicts_map_to_the_exception_tree(table: Table) -> None:
    etag = table.create({"PartitionKey": "p", "RowKey": "r", "v": 1})
    with pytest.raises(ConflictError) as exists:
        table.create({"PartitionKey": "p", "RowKey": "r", "v": 2})
    assert exists.value.code == "already_exists"
    with pytest.raises(NotFoundError):
        table.get("p", "missing")
    new_etag = table.replace({"PartitionKey": "p", "RowKey": "r", "v": 3}, etag=etag)
    with pytest.raises(ConflictError) as stale:  # the old ETag lost the race
        table.replace({"PartitionKey": "p", "RowKey": "r", "v": 4}, etag=etag)
    assert stale.value.code == "etag_conflict"
    assert table.get("p", "r")["v"] == 3
    table.merge({"PartitionKey": "p", "RowKey": "r", "w": "x"}, etag=new_etag)
    assert dict(table.get("p", "r", select=["v", "w"])) == {"v": 3, "w": "x"}
    assert table.delete_if_present("p", "r", etag=new_etag) is False  # that version is gone
    assert table.delete_if_present("p", "r") is True
    with pytest.raises(NotFoundError):
        table.get("p", "r")


def test_purge_and_transactions(table: Table) -> None:
    table.submit([("upsert", {"PartitionKey": "b", "RowKey": f"r{i}", "exp": f"2020-01-0{i + 1}"})
                  for i in range(5)])
    assert table.purge("exp lt @c", parameters={"c": "2020-01-03"}) == 2
    assert sorted(str(e["RowKey"]) for e in table.query("PartitionKey eq 'b'")) == ["r2", "r3", "r4"]
    assert table.first("PartitionKey eq 'nothing'") is None


def _refused_storage() -> Storage:
    port = free_port()  # nothing listens there
    return Storage(storage_settings(connection_string(blob=port, queue=port, table=port)))


def test_refused_connections_are_storage_unavailable_with_retry_after() -> None:
    storage = _refused_storage()
    for call in (lambda: storage.table("accounts").get("p", "r"), lambda: storage.queue("q").send(b"x"),
                 lambda: storage.table("accounts").query("PartitionKey eq 'p'")):
        with pytest.raises(StorageUnavailableError) as err:
            call()
        problem = to_problem(err.value)
        assert problem.status == 503 and int(problem.headers["Retry-After"]) >= 1


class _Silent:
    """A TCP server that accepts connections and reads requests but never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_a_hanging_storage_answers_within_the_interactive_budget() -> None:
    silent = _Silent()
    try:
        storage = Storage(storage_settings(connection_string(blob=silent.port, queue=silent.port, table=silent.port)))
        started = time.monotonic()
        with pytest.raises(StorageUnavailableError):
            storage.table("accounts").get("p", "r")
        # Budget: the absolute timeout plus one read timeout of slack, never the SDK's minutes.
        assert time.monotonic() - started < INTERACTIVE.total_s + INTERACTIVE.read_timeout
    finally:
        silent.close()


def test_background_budget_is_longer_and_scoped() -> None:
    from shared import storage as st

    assert BACKGROUND.total_s > INTERACTIVE.total_s and BACKGROUND.read_timeout > INTERACTIVE.read_timeout
    with background_budget():
        assert st._budget.get() is BACKGROUND
    assert st._budget.get() is INTERACTIVE


def test_retry_after_and_backoff() -> None:
    assert retry_after_seconds("7") == 7
    assert retry_after_seconds("0") == 1  # never "retry at once"
    assert retry_after_seconds(None) == 5 and retry_after_seconds("soon") == 5
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 1  # a date in the past
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 120))
    assert 100 <= retry_after_seconds(future) <= 120
    assert retry_after_from({"retry-after": "3"}) == 3
    delays = [backoff_delay(3, base=1.0, cap=100) for _ in range(200)]
    assert all(4 <= d <= 12 for d in delays) and len({round(d, 3) for d in delays}) > 50  # 8 s ± 50 %, jittered
    assert backoff_delay(30, base=1.0, cap=60) <= 60


def test_refusals_map_to_connector_errors_not_raw_azure_errors(azurite: Any, table: Table) -> None:
    """A message over the queue's 64 KiB (base64) limit answers 413, an oversized property 400: both become
    ConnectorErrors (retrying cannot help), never a raw HttpResponseError that escapes a worker."""
    from shared.errors import ConnectorError, PayloadTooLargeError

    queue = Storage(storage_settings(azurite.connection_string)).queue("sq" + uuid.uuid4().hex[:12])
    queue.create_if_missing()
    with pytest.raises(PayloadTooLargeError) as big:
        queue.send(b"x" * 60_000)
    assert big.value.code == "storage_payload_too_large" and big.value.status == 500
    queue.send(b"x" * 40_000)  # within the limit
    with pytest.raises(ConnectorError) as bad:
        table.create({"PartitionKey": "p", "RowKey": "bad/key#?", "v": 1})
    assert type(bad.value) is ConnectorError and bad.value.code == "storage_rejected"


def test_a_merge_is_retried_like_a_replace(azurite: Any) -> None:
    """A MERGE is a PATCH, which azure-core retries only when told: the first attempt is refused
    (nothing sent), the retry lands, as a replace (PUT) would."""
    from azure.core.exceptions import ServiceRequestError

    from devstack.transport import WrappingTransport

    class _RefuseFirstPatch(WrappingTransport):
        refused = 0

        def send(self, request: Any, **kwargs: Any) -> Any:
            if request.method == "PATCH" and not self.refused:
                self.refused += 1
                raise ServiceRequestError("connection refused (test)")
            return super().send(request, **kwargs)

    transport = _RefuseFirstPatch()
    t = Storage(storage_settings(azurite.connection_string), transport=transport).table("mr" + uuid.uuid4().hex[:12])
    t.create_if_missing()
    etag = t.create({"PartitionKey": "p", "RowKey": "r", "v": 1})
    t.merge({"PartitionKey": "p", "RowKey": "r", "v": 2}, etag=etag)
    assert transport.refused == 1 and t.get("p", "r")["v"] == 2
