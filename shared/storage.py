"""The one storage layer: tables and queues behind small typed wrappers, errors mapped once.

* **Errors.** Every azure-core error becomes part of the exception tree (:mod:`shared.errors`):
  404 → :class:`~shared.errors.NotFoundError`, 409 → :class:`~shared.errors.ConflictError`
  (``already_exists``), 412 → :class:`~shared.errors.ConflictError` (``etag_conflict``), and
  anything that means "storage is not answering" (connection refused or reset, timeouts, 408,
  429, 5xx) → :class:`~shared.errors.StorageUnavailableError` (503 with ``Retry-After``); any
  other refusal (413 a record or message too large, 400 …) → a :class:`~shared.errors.ConnectorError`
  (``storage_payload_too_large`` / ``storage_rejected``, 500: our request was wrong), never a raw
  azure-core error.
* **Budgets.** Each call has connect/read timeouts and a bounded retry budget, so an HTTP request
  gets its 503 within about 15 s when storage hangs (``INTERACTIVE``). Timers and queue workers
  may wait longer: their entry points run inside :func:`background_budget`.
* **Identity.** A connection string locally (Azurite); in Azure the identity-based settings
  ``AzureWebJobsStorage__accountName`` (or ``__tableServiceUri`` / ``__queueServiceUri``) with
  ``__clientId`` for a user-assigned identity:
  https://learn.microsoft.com/azure/azure-functions/functions-reference#connecting-to-host-storage-with-an-identity

SDK imports are lazy so that importing ``function_app`` stays cheap (cold start, bench/cold_start.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict, TypeVar

from shared._table_rows import EntityValue, Row
from shared.errors import ConflictError, ConnectorError, NotFoundError, PayloadTooLargeError, StorageUnavailableError

if TYPE_CHECKING:
    from azure.core.credentials import AzureNamedKeyCredential, TokenCredential
    from azure.core.pipeline import Pipeline
    from azure.core.pipeline.transport import HttpTransport
    from azure.core.rest import HttpRequest, HttpResponse
    from azure.data.tables import TableClient, TableEntity
    from azure.storage.queue import QueueClient

    from shared._queue_rest import QueueRest
    from shared._table_rest import TableRest
    from shared.config import Settings

ACCOUNTS_TABLE = "accounts"
STATES_TABLE = "oauthstates"
REFRESH_INDEX_TABLE = "refreshindex"
IDEMPOTENCY_TABLE = "idempotency"
SUBSCRIPTIONS_TABLE = "subscriptions"  # Graph subscriptions per account, and their clientState pointers
SUBSCRIPTION_INDEX_TABLE = "subscriptionindex"  # due-time index of subscription renewal / safety catch-up
SEEN_TABLE = "seenmessages"  # message ids already announced (message.received de-duplication)
TENANTS_TABLE = "tenants"  # team mailboxes' tenant connections (admin consent)
TABLES = (ACCOUNTS_TABLE, STATES_TABLE, REFRESH_INDEX_TABLE, IDEMPOTENCY_TABLE, SUBSCRIPTIONS_TABLE, TENANTS_TABLE,
          SUBSCRIPTION_INDEX_TABLE, SEEN_TABLE)
REFRESH_QUEUE = "refresh-jobs"
WEBHOOK_QUEUE = "webhook-deliveries"
NOTIFICATION_QUEUE = "notification-jobs"
QUEUES = (REFRESH_QUEUE, WEBHOOK_QUEUE, NOTIFICATION_QUEUE)

Entity = Mapping[str, EntityValue]
T = TypeVar("T")


class CallOptions(TypedDict, total=False):
    """azure-core per-call options: transport timeouts and the retry policy's budget."""

    connection_timeout: float
    read_timeout: float
    retry_total: int


class TableCallOptions(CallOptions, total=False):
    # Only azure-core's retry policy (Tables) reads these per call; the Queue SDK's own policy would
    # pass them on to the transport. (A per-call ``timeout`` would be sent as the server-side timeout.)
    retry_backoff_factor: float
    retry_backoff_max: float


@dataclass(frozen=True)
class Budget:
    """Timeouts and retries of one storage call (azure-core transport and retry options)."""

    connection_timeout: float
    read_timeout: float
    retry_total: int
    total_s: float  # the whole call, retries included: read_timeout * (retry_total + 1) + backoff

    def call_kw(self) -> CallOptions:
        return {"connection_timeout": self.connection_timeout, "read_timeout": self.read_timeout,
                "retry_total": self.retry_total}

    def table_kw(self) -> TableCallOptions:
        return {"connection_timeout": self.connection_timeout, "read_timeout": self.read_timeout,
                "retry_total": self.retry_total, "retry_backoff_factor": 0.4, "retry_backoff_max": 2}


# An HTTP request's worst case when storage hangs: 4 s + 0.4 + 4 s + 0.8 + 4 s ≈ 13 s, then 503.
INTERACTIVE = Budget(connection_timeout=3, read_timeout=4, retry_total=2, total_s=13)
BACKGROUND = Budget(connection_timeout=5, read_timeout=20, retry_total=3, total_s=60)
_budget: contextvars.ContextVar[Budget] = contextvars.ContextVar("storage_budget", default=INTERACTIVE)
RETRY_AFTER_S = 5
# azure-core's default retryable methods, plus PATCH for MERGE writes (see Table.merge).
_MERGE_RETRY = frozenset({"HEAD", "GET", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH"})


@contextlib.contextmanager
def background_budget() -> Iterator[None]:
    """Storage calls inside may wait longer (timers and queue workers: nobody is waiting on them)."""
    token = _budget.set(BACKGROUND)
    try:
        yield
    finally:
        _budget.reset(token)


def unavailable(what: str) -> StorageUnavailableError:
    return StorageUnavailableError(f"Table or queue storage is unavailable ({what}).", retry_after=RETRY_AFTER_S,
                                   hint="Retry after the given delay; nothing was changed by this request.")


def rejected(status: int) -> ConnectorError:
    """Storage refused the request itself (4xx): retrying the same call cannot succeed."""
    if status == 413:
        return PayloadTooLargeError("The storage service refused the record as too large (413).",
                                    code="storage_payload_too_large", status=500)
    return ConnectorError(f"The storage service refused the request ({status}).", code="storage_rejected")


def mapped(call: Callable[[], T]) -> T:
    """Run one storage call; translate azure-core's errors into the exception tree."""
    from azure.core.exceptions import (
        AzureError,
        ClientAuthenticationError,
        HttpResponseError,
        ResourceExistsError,
        ResourceModifiedError,
        ResourceNotFoundError,
    )

    try:
        return call()
    except ResourceNotFoundError:
        raise NotFoundError("The storage record does not exist.", code="not_found") from None
    except ResourceModifiedError:
        raise ConflictError("The record changed concurrently.", code="etag_conflict") from None
    except ResourceExistsError:
        raise ConflictError("The record already exists.", code="already_exists") from None
    except ClientAuthenticationError as e:  # the app's identity could not get a token, or was refused
        raise unavailable(f"its credential failed: {type(e).__name__}") from None
    except HttpResponseError as e:
        status = e.status_code or 0
        if status == 404:  # e.g. a transaction naming a row that is gone
            raise NotFoundError("The storage record does not exist.", code="not_found") from None
        if status == 409:
            raise ConflictError("The record already exists.", code="already_exists") from None
        if status == 412:
            raise ConflictError("The record changed concurrently.", code="etag_conflict") from None
        if status in (408, 429) or status >= 500:
            raise unavailable(f"answered {status}") from None
        raise rejected(status) from None
    except AzureError as e:  # ServiceRequestError, ServiceResponseError, timeouts: nothing answered
        raise unavailable(type(e).__name__) from None


_CLAIM_ID = "claimId"  # the claimer's nonce on a claimed row (Table.claim)


@dataclass(frozen=True)
class Claim:
    """What :meth:`Table.claim` got: our row's ETag when we hold it, and the row as it was read (None when
    we created it)."""

    etag: str | None
    row: Row | None

    @property
    def held(self) -> bool:
        return self.etag is not None


class Table:
    """One table: typed calls, errors mapped, every call within the current :class:`Budget`.

    Single-row calls go over :class:`shared._table_rest.TableRest` (the same transport, retry policy
    and credential, a fraction of the SDK's CPU); queries, transactions and table creation over
    azure-data-tables' ``TableClient``. Every row comes back as a :class:`Row`.
    """

    def __init__(self, client: TableClient, rest: TableRest) -> None:
        self._client = client
        self._rest = rest
        self.name = client.table_name

    def get(self, pk: str, rk: str, *, select: Sequence[str] | None = None) -> Row:
        kw = _budget.get().table_kw()
        return mapped(lambda: self._rest.get(pk, rk, select=list(select) if select else None, **kw))

    def query(self, query_filter: str, *, parameters: Mapping[str, str] | None = None,
              select: Sequence[str] | None = None, page_size: int | None = None) -> list[Row]:
        """All rows matching the filter (the pages are read inside the error mapping)."""
        def run() -> list[Row]:
            return [_row(e) for e in self._client.query_entities(
                query_filter, parameters=dict(parameters or {}), select=list(select) if select else None,
                results_per_page=page_size, **_budget.get().table_kw())]
        return mapped(run)

    def scan(self) -> list[Row]:
        """Every row (operator commands only: a request or timer never scans a table)."""
        return mapped(lambda: [_row(e) for e in self._client.list_entities(**_budget.get().table_kw())])

    def first(self, query_filter: str, *, parameters: Mapping[str, str] | None = None) -> Row | None:
        def run() -> Row | None:
            pages = self._client.query_entities(query_filter, parameters=dict(parameters or {}), results_per_page=1,
                                                **_budget.get().table_kw())
            e = next(iter(pages), None)
            return None if e is None else _row(e)
        return mapped(run)

    def create(self, entity: Entity) -> str:
        """Insert; :class:`ConflictError` (``already_exists``) if the row exists. Returns the ETag."""
        return mapped(lambda: self._rest.insert(entity, **_budget.get().table_kw()))

    def replace(self, entity: Entity, *, etag: str | None) -> str:
        """Replace the row, conditional on ``etag`` when given (else an upsert). Returns the new ETag."""
        kw = _budget.get().table_kw()
        if etag:
            return mapped(lambda: self._rest.update(entity, merge=False, etag=etag, **kw))
        return mapped(lambda: self._rest.upsert(entity, merge=False, **kw))

    def merge(self, entity: Entity, *, etag: str | None = None) -> str:
        """Merge the given properties into an existing row (conditional on ``etag`` when given;
        :class:`NotFoundError` when the row does not exist). Returns the new ETag."""
        # A MERGE is a PATCH, which azure-core does not retry after a lost answer unless told: replaying
        # it is safe (the same columns again; a conditional one fails its ETag check, which the callers'
        # ``landed`` checks recognise), so it gets the same retries as a replace (PUT).
        kw = _budget.get().table_kw()
        return mapped(lambda: self._rest.update(entity, merge=True, etag=etag, retry_on_methods=_MERGE_RETRY, **kw))

    def upsert(self, entity: Entity) -> str:
        """Insert the row, or merge these properties into it. Returns the new ETag."""
        kw = _budget.get().table_kw()
        return mapped(lambda: self._rest.upsert(entity, merge=True, retry_on_methods=_MERGE_RETRY, **kw))

    def delete_if_present(self, pk: str, rk: str, *, etag: str | None = None) -> bool:
        """Delete the row; False if it was already gone (or, with ``etag``, is no longer that version)."""
        try:
            mapped(lambda: self._rest.delete(pk, rk, etag=etag, **_budget.get().table_kw()))
        except NotFoundError:
            return False
        except ConflictError:
            if etag:
                return False
            raise
        return True

    def claim(self, entity: Entity, *, take_over: Callable[[Row], bool], create: bool = True,
              merge: bool = False) -> Claim:
        """Claim a row: create ``entity`` (unless ``create`` is False); when a row is there already, read it and,
        if ``take_over(row)`` says it is free (abandoned, expired, not yet used), write ``entity`` over it
        conditionally on the ETag just read (a merge with ``merge``). Of any number of concurrent claimers
        exactly one holds the row: an insert and an ETag-conditional write are atomic in Table Storage
        (https://learn.microsoft.com/rest/api/storageservices/update-entity2).

        Each attempt writes a random ``claimId``: a write that landed but whose answer was lost (its retry
        then fails with 409 or 412) is recognised as ours when the row is read back. A claim still contended
        after three rounds is "not held" (the row as last read), never an error."""
        pk, rk = str(entity["PartitionKey"]), str(entity["RowKey"])
        mine: dict[str, EntityValue] = {**entity, _CLAIM_ID: secrets.token_hex(8)}
        current: Row | None = None
        for _ in range(3):  # a row deleted between our insert and our read, or taken over first: look again
            if create:
                try:
                    return Claim(self.create(mine), None)
                except ConflictError:
                    pass
            try:
                current = self.get(pk, rk)
            except NotFoundError:
                if not create:
                    return Claim(None, None)
                current = None
                continue
            if current.get(_CLAIM_ID) == mine[_CLAIM_ID]:
                return Claim(etag_of(current) or "*", current)  # ours: the answer to our write was lost
            if not take_over(current):
                return Claim(None, current)
            try:
                etag = etag_of(current) or "*"
                return Claim(self.merge(mine, etag=etag) if merge else self.replace(mine, etag=etag), current)
            except (ConflictError, NotFoundError):
                continue  # another claimer took it over (or released it), or our own write landed: look again
        return Claim(None, current)

    def submit(self, operations: Iterable[tuple[str, Entity]]) -> None:
        """One entity-group transaction (≤ 100 operations, one partition)."""
        ops = list(operations)
        if ops:
            mapped(lambda: self._client.submit_transaction(ops, **_budget.get().table_kw()))

    def purge(self, query_filter: str, *, parameters: Mapping[str, str] | None = None) -> int:
        """Delete every row matching the filter, row by row (rows removed meanwhile are skipped)."""
        rows = self.query(query_filter, parameters=parameters, select=["PartitionKey", "RowKey"])
        return sum(self.delete_if_present(str(e["PartitionKey"]), str(e["RowKey"])) for e in rows)

    def create_if_missing(self) -> None:
        try:
            mapped(lambda: self._client.create_table(**_budget.get().table_kw()))
        except ConflictError:
            pass


class Queue:
    """One queue (base64 messages, as the Functions queue trigger expects by default). Sends go over
    :class:`shared._queue_rest.QueueRest`; the rest over the SDK client."""

    def __init__(self, client: QueueClient, rest: QueueRest) -> None:
        self._client = client
        self._rest = rest
        self.name = client.queue_name

    def send(self, message: bytes, *, visibility_timeout: int | None = None) -> None:
        kw = _budget.get().table_kw()
        mapped(lambda: self._rest.put(message, visibility_timeout=visibility_timeout or None, **kw))

    def send_all(self, messages: list[bytes], *, workers: int = 16) -> int:
        """Send every message, ``workers`` at a time (Queue Storage has no batch send): a timer that fans out
        tens of thousands of jobs must fit in its schedule. Returns how many were sent; raises the first failure
        once every message has been tried."""
        import contextvars
        from concurrent.futures import ThreadPoolExecutor

        if len(messages) <= 1:
            for m in messages:
                self.send(m)
            return len(messages)
        with ThreadPoolExecutor(min(workers, len(messages)), thread_name_prefix=f"send-{self.name}") as pool:
            # each task runs in a copy of the caller's context: the storage call budget travels with it
            futures = [pool.submit(contextvars.copy_context().run, self.send, m) for m in messages]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]  # type: ignore[misc]
        return len(messages)

    def create_if_missing(self) -> None:
        try:
            mapped(lambda: self._client.create_queue(**_budget.get().call_kw()))
        except ConflictError:
            pass


def etag_of(row: Row) -> str | None:
    return row.etag or None


def _row(e: TableEntity) -> Row:
    """A ``TableEntity`` from the SDK as a :class:`Row` (typed values as plain Python values)."""
    from azure.data.tables import EntityProperty

    props: dict[str, EntityValue] = {}
    for name, value in e.items():
        if isinstance(value, EntityProperty):
            value = value.value
        props[name] = value if value is None or isinstance(value, (str, int, float, bool, bytes)) else str(value)
    etag = e.metadata.get("etag")
    return Row(props, str(etag) if etag else None)


def _rest_pipeline(transport: HttpTransport, credential: AzureNamedKeyCredential | TokenCredential | None, *,
                   queue: bool = False) -> Pipeline[HttpRequest, HttpResponse]:
    """The pipeline of :class:`~shared._table_rest.TableRest` (or, ``queue``, :class:`~shared._queue_rest.QueueRest`):
    azure-core's retry policy with the budget options (as the SDK client has), the version and date headers, then
    Shared Key (the service's own form) or a bearer token (``https://storage.azure.com/.default``) or nothing (a SAS
    in the URL)."""
    from azure.core.credentials import AzureNamedKeyCredential
    from azure.core.pipeline import Pipeline
    from azure.core.pipeline.policies import (
        BearerTokenCredentialPolicy,
        DistributedTracingPolicy,
        RetryPolicy,
        UserAgentPolicy,
    )

    from shared._queue_rest import QueueHeaders, QueueSharedKeyPolicy
    from shared._table_rest import USER_AGENT, RequestId, SharedKeyPolicy, StorageHeaders

    # As the SDK's pipeline: an x-ms-client-request-id per call (what Azure support traces), a User-Agent,
    # and a span per attempt when tracing is on (shared/telemetry.py).
    policies: list[object] = [RequestId(), UserAgentPolicy(sdk_moniker=USER_AGENT),
                              RetryPolicy(timeout=BACKGROUND.total_s, **INTERACTIVE.table_kw()),
                              DistributedTracingPolicy(), QueueHeaders() if queue else StorageHeaders()]
    if isinstance(credential, AzureNamedKeyCredential):
        policies.append(QueueSharedKeyPolicy(credential) if queue else SharedKeyPolicy(credential))
    elif credential is not None:
        policies.append(BearerTokenCredentialPolicy(credential, "https://storage.azure.com/.default"))
    return Pipeline(transport=transport, policies=policies)  # type: ignore[arg-type]


class Storage:
    """Lazily created, cached table and queue wrappers (thread-safe); one shared HTTP transport."""

    def __init__(self, settings: Settings, *, credential: TokenCredential | None = None,
                 transport: HttpTransport | None = None) -> None:
        self._settings = settings
        self._credential = credential
        self._transport = transport
        self._lock = threading.Lock()
        self._tables: dict[str, Table] = {}
        self._rest_pipeline: Pipeline[HttpRequest, HttpResponse] | None = None
        self._queue_pipeline: Pipeline[HttpRequest, HttpResponse] | None = None
        self._queues: dict[str, Queue] = {}
        self._ensured = False

    def _get_credential(self) -> TokenCredential:
        if self._credential is None:
            from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

            client_id = self._settings.storage_client_id
            self._credential = (
                ManagedIdentityCredential(client_id=client_id) if client_id else DefaultAzureCredential()
            )
        return self._credential

    def _endpoint(self, kind: str) -> str:
        explicit = self._settings.storage_table_uri if kind == "table" else self._settings.storage_queue_uri
        if explicit:
            return explicit
        return f"https://{self._settings.storage_account_name}.{kind}.core.windows.net"

    def _shared_transport(self) -> HttpTransport:
        """One HTTP transport for every table and queue client: :class:`shared._storage_transport.StorageTransport`
        (``http.client`` with a keep-alive pool; it never reads proxy or CA settings from the environment)."""
        if self._transport is None:
            from shared._storage_transport import StorageTransport

            self._transport = StorageTransport(pool_size=64)
        return self._transport

    def table(self, name: str) -> Table:
        with self._lock:
            table = self._tables.get(name)
            if table is None:
                from azure.data.tables import TableClient

                cs = self._settings.storage_connection_string
                # The client-wide absolute limit (azure-core RetryPolicy ``timeout``) is the longest budget's;
                # each call's own timeouts and retries keep an interactive call within its budget.
                kw = INTERACTIVE.table_kw()
                total = BACKGROUND.total_s
                transport = self._shared_transport()
                client = (TableClient.from_connection_string(cs, name, transport=transport, timeout=total, **kw)
                          if cs else
                          TableClient(self._endpoint("table"), name, credential=self._get_credential(),
                                      transport=transport, timeout=total, **kw))
                table = self._tables[name] = Table(client, self._table_rest(client))
        return table

    def _table_rest(self, client: TableClient) -> TableRest:
        """Single-row calls on the same endpoint, credential and transport as ``client``."""
        from azure.core.credentials import AzureSasCredential

        from shared._table_rest import TableRest

        credential = client.credential  # a shared key, a SAS, or the token credential the client was given
        sas = credential.signature if isinstance(credential, AzureSasCredential) else ""
        if self._rest_pipeline is None:
            self._rest_pipeline = _rest_pipeline(
                self._shared_transport(), None if isinstance(credential, AzureSasCredential) else credential)
        return TableRest(pipeline=self._rest_pipeline, endpoint=client.url, table=client.table_name, sas=sas)

    def queue(self, name: str) -> Queue:
        with self._lock:
            queue = self._queues.get(name)
            if queue is None:
                from azure.storage.queue import (
                    BinaryBase64DecodePolicy,
                    BinaryBase64EncodePolicy,
                    LinearRetry,
                    QueueClient,
                )

                # The Functions queue trigger expects base64 messages by default (host.json messageEncoding).
                enc, dec = BinaryBase64EncodePolicy(), BinaryBase64DecodePolicy()
                # The Queue SDK's default retry waits 15 s before its first retry: far beyond the budget.
                retry = LinearRetry(backoff=1, random_jitter_range=1, retry_total=INTERACTIVE.retry_total)
                cs = self._settings.storage_connection_string
                kw = INTERACTIVE.call_kw()
                transport = self._shared_transport()
                client = (QueueClient.from_connection_string(cs, name, message_encode_policy=enc,
                                                             message_decode_policy=dec, transport=transport,
                                                             retry_policy=retry, **kw)
                          if cs else
                          QueueClient(self._endpoint("queue"), name, credential=self._get_credential(),
                                      message_encode_policy=enc, message_decode_policy=dec, transport=transport,
                                      retry_policy=retry, **kw))
                queue = self._queues[name] = Queue(client, self._queue_rest(client))
        return queue

    def _queue_rest(self, client: QueueClient) -> QueueRest:
        """Put Message on the same endpoint, credential and transport as ``client``."""
        from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential

        from shared._queue_rest import QueueRest

        credential = client.credential
        sas = credential.signature if isinstance(credential, AzureSasCredential) else ""
        if hasattr(credential, "account_key"):  # the Queue SDK's own shared-key credential class
            credential = AzureNamedKeyCredential(credential.account_name, credential.account_key)
        if self._queue_pipeline is None:
            self._queue_pipeline = _rest_pipeline(
                self._shared_transport(), None if isinstance(credential, AzureSasCredential) else credential,
                queue=True)
        return QueueRest(pipeline=self._queue_pipeline, queue_url=client.url, sas=sas)

    def ensure(self) -> None:
        """Create missing tables and queues when running on a connection string (Azurite starts empty).

        In Azure, Bicep provisions them and the app's identity holds data-plane roles only, so
        nothing is created (or attempted) there. Not marked done until it succeeded, so a start
        while storage is down recovers by itself.
        """
        if self._ensured:
            return
        if self._settings.storage_connection_string:
            for t in TABLES:
                self.table(t).create_if_missing()
            for q in QUEUES:
                self.queue(q).create_if_missing()
        self._ensured = True

    def check(self) -> None:
        """Raise if the accounts table cannot be read (health check)."""
        self.ensure()
        self.table(ACCOUNTS_TABLE).first("PartitionKey eq 'health'")
