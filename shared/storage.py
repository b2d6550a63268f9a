"""Table and queue clients: a connection string locally (Azurite), managed identity in Azure.

Identity-based settings follow the Functions convention ``AzureWebJobsStorage__accountName`` (or
``__tableServiceUri`` / ``__queueServiceUri``) with ``__clientId`` for a user-assigned identity:
https://learn.microsoft.com/azure/azure-functions/functions-reference#connecting-to-host-storage-with-an-identity
SDK imports are lazy so that importing ``function_app`` stays cheap (cold start, SPEC §9).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from shared.config import Settings

if TYPE_CHECKING:
    from azure.data.tables import TableClient
    from azure.storage.queue import QueueClient

ACCOUNTS_TABLE = "accounts"
STATES_TABLE = "oauthstates"
REFRESH_INDEX_TABLE = "refreshindex"
IDEMPOTENCY_TABLE = "idempotency"
TABLES = (ACCOUNTS_TABLE, STATES_TABLE, REFRESH_INDEX_TABLE, IDEMPOTENCY_TABLE)
REFRESH_QUEUE = "refresh-jobs"
WEBHOOK_QUEUE = "webhook-deliveries"
QUEUES = (REFRESH_QUEUE, WEBHOOK_QUEUE)

# Every storage call has a timeout (seconds); the SDK's own retry policy handles transient faults.
_CLIENT_KW: dict[str, Any] = {"connection_timeout": 5, "read_timeout": 20, "retry_total": 3}


class Storage:
    """Lazily created, cached clients for the app's tables and queues (thread-safe)."""

    def __init__(self, settings: Settings, *, credential: Any = None, transport: Any = None) -> None:
        self._settings = settings
        self._credential = credential
        self._transport = transport
        self._lock = threading.Lock()
        self._tables: dict[str, TableClient] = {}
        self._queues: dict[str, QueueClient] = {}
        self._ensured = False

    def _get_credential(self) -> Any:
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

    def _client_kw(self) -> dict[str, Any]:
        """Client options: timeouts, retries, and one shared HTTP transport for every table and queue.

        The transport's session comes from :func:`shared._http.new_session`: ``trust_env`` off (azure-core's
        default session reads proxy settings and REQUESTS_CA_BUNDLE from the environment on every request,
        which costs measurable CPU per call and lets the environment change what TLS trusts) and a pooled
        connection set shared by all clients.
        """
        if self._transport is None:
            from azure.core.pipeline.transport import RequestsTransport

            from shared._http import new_session

            self._transport = RequestsTransport(session=new_session(None, pool_size=64), session_owner=False)
        return dict(_CLIENT_KW, transport=self._transport)

    def table(self, name: str) -> TableClient:
        client = self._tables.get(name)
        if client is None:
            from azure.data.tables import TableClient

            with self._lock:
                client = self._tables.get(name)
                if client is None:
                    cs = self._settings.storage_connection_string
                    if cs:
                        client = TableClient.from_connection_string(cs, name, **self._client_kw())
                    else:
                        client = TableClient(self._endpoint("table"), name, credential=self._get_credential(),
                                             **self._client_kw())
                    self._tables[name] = client
        return client

    def queue(self, name: str) -> QueueClient:
        client = self._queues.get(name)
        if client is None:
            from azure.storage.queue import BinaryBase64DecodePolicy, BinaryBase64EncodePolicy, QueueClient

            # The Functions queue trigger expects base64 messages by default (host.json messageEncoding).
            kw = dict(self._client_kw(), message_encode_policy=BinaryBase64EncodePolicy(),
                      message_decode_policy=BinaryBase64DecodePolicy())
            with self._lock:
                client = self._queues.get(name)
                if client is None:
                    cs = self._settings.storage_connection_string
                    if cs:
                        client = QueueClient.from_connection_string(cs, name, **kw)
                    else:
                        client = QueueClient(self._endpoint("queue"), name, credential=self._get_credential(), **kw)
                    self._queues[name] = client
        return client

    def ensure(self) -> None:
        """Create missing tables and queues when running on a connection string (Azurite starts empty).

        In Azure, Bicep provisions them and the app's identity holds data-plane roles only, so
        nothing is created (or attempted) there.
        """
        if self._ensured or not self._settings.storage_connection_string:
            self._ensured = True
            return
        from azure.core.exceptions import ResourceExistsError

        for t in TABLES:
            try:
                self.table(t).create_table()
            except ResourceExistsError:
                pass
        for q in QUEUES:
            try:
                self.queue(q).create_queue()
            except ResourceExistsError:
                pass
        self._ensured = True

    def check(self) -> None:
        """Raise if the accounts table cannot be read (health check)."""
        self.ensure()
        next(iter(self.table(ACCOUNTS_TABLE).query_entities("PartitionKey eq 'health'", results_per_page=1)), None)
