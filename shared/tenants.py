"""Tenant connections: a tenant whose administrator granted the app's application permissions (admin consent),
owned by the caller who started the consent, like an account. No token is stored: application tokens are
obtained when needed and kept in memory only (shared.tenant_access).

Layout (table ``tenants``): PartitionKey = the owner's partition (as in ``accounts``), RowKey = connection id.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from shared.accounts import iso, owner_partition, parse_iso, utcnow
from shared.errors import ConflictError, NotFoundError
from shared.storage import EntityValue, Row, Table, etag_of

TENANT_ACTIVE, CONSENT_REQUIRED = "active", "consent_required"


@dataclass(frozen=True)
class TenantConnection:
    owner: str
    id: str
    tenant_id: str
    status: str
    connected_at: dt.datetime
    last_error: dict[str, str] | None = None
    etag: str | None = field(default=None, repr=False)

    def to_public(self, *, mailbox_count: int) -> dict[str, object]:
        """The TenantConnection JSON of the API (docs: GET /api/openapi.json)."""
        return {"id": self.id, "tenantId": self.tenant_id, "status": self.status,
                "connectedAt": iso(self.connected_at), "mailboxCount": mailbox_count, "lastError": self.last_error}


def _no_connection() -> NotFoundError:
    return NotFoundError("No such tenant connection.", code="tenant_not_found")


class TenantStore:
    def __init__(self, table: Table) -> None:
        self._table = table

    def get_connection(self, owner: str, connection_id: str) -> TenantConnection:
        """The owner's connection, else 404 (another owner's connections do not exist for this one)."""
        if not connection_id.startswith("tc_") or len(connection_id) > 64:
            raise _no_connection()
        try:
            row = self._table.get(owner_partition(owner), connection_id)
        except NotFoundError:
            raise _no_connection() from None
        if row.get("owner") != owner:
            raise _no_connection()
        return _from_entity(row)

    def list_connections(self, owner: str) -> list[TenantConnection]:
        rows = self._table.query("PartitionKey eq @pk", parameters={"pk": owner_partition(owner)})
        return sorted((_from_entity(e) for e in rows if e.get("owner") == owner), key=lambda c: c.connected_at)

    def find_by_tenant(self, owner: str, tenant_id: str) -> TenantConnection | None:
        rows = self._table.query("PartitionKey eq @pk and tenantId eq @t",
                                 parameters={"pk": owner_partition(owner), "t": tenant_id})
        return next((_from_entity(e) for e in rows if e.get("owner") == owner), None)

    def create_connection(self, connection: TenantConnection) -> TenantConnection:
        return replace(connection, etag=self._table.create(_to_entity(connection)))

    def update_with(self, connection: TenantConnection,
                    change: Callable[[TenantConnection], TenantConnection | None]) -> TenantConnection:
        """ETag read-modify-write: ``change(current)`` returns what to write, or None to leave it."""
        current = connection
        for _ in range(8):
            wanted = change(current)
            if wanted is None:
                return current
            try:
                return replace(wanted, etag=self._table.replace(_to_entity(wanted), etag=current.etag))
            except ConflictError:
                current = self.get_connection(connection.owner, connection.id)
            except NotFoundError:
                raise _no_connection() from None
        raise ConflictError("The tenant connection kept changing; try again.", code="etag_conflict",
                            hint="Retry shortly.")

    def delete_connection(self, connection: TenantConnection) -> None:
        self._table.delete_if_present(owner_partition(connection.owner), connection.id)


def _to_entity(c: TenantConnection) -> dict[str, EntityValue]:
    return {"PartitionKey": owner_partition(c.owner), "RowKey": c.id, "owner": c.owner, "tenantId": c.tenant_id,
            "status": c.status, "connectedAt": iso(c.connected_at),
            "lastError": json.dumps(c.last_error) if c.last_error else ""}


def _from_entity(e: Row) -> TenantConnection:
    return TenantConnection(
        owner=str(e.get("owner") or ""), id=str(e["RowKey"]), tenant_id=str(e.get("tenantId") or ""),
        status=str(e.get("status") or TENANT_ACTIVE), connected_at=parse_iso(e.get("connectedAt")) or utcnow(),
        last_error=json.loads(str(e["lastError"])) if e.get("lastError") else None, etag=etag_of(e))
