"""Account records in Table Storage; tokens sealed with AES-GCM; ETag-conditional token writes.

Layout (table ``accounts``): PartitionKey = ``o-`` + SHA-256(owner) (Table keys forbid ``/ \\ # ?``
and owners are opaque ``sub`` strings), RowKey = account id. The sealed token blob's associated
data is (owner, account id, "tokens"), so a blob copied to another row does not decrypt.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from shared.crypto import KeyRing, account_aad, kid_of
from shared.errors import ConflictError, NotFoundError, StorageUnavailableError

CONSUMER_TENANT_ID = "9188040d-6c67-4c5b-b112-36a304b66dad"  # personal Microsoft accounts (SPEC §2)
ACTIVE = "active"
REAUTH_REQUIRED = "reauth_required"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iso(t: dt.datetime | None) -> str | None:
    return t.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z") if t else None


def parse_iso(s: Any) -> dt.datetime | None:
    if not s:
        return None
    if isinstance(s, dt.datetime):
        return s if s.tzinfo else s.replace(tzinfo=dt.timezone.utc)
    return dt.datetime.fromisoformat(str(s).replace("Z", "+00:00"))


def owner_partition(owner: str) -> str:
    return "o-" + hashlib.sha256(owner.encode()).hexdigest()[:40]


def new_account_id() -> str:
    return "acc_" + secrets.token_hex(12)


@dataclass(frozen=True)
class Tokens:
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_at: dt.datetime
    scopes: tuple[str, ...]
    refresh_token_issued_at: dt.datetime

    def to_json(self) -> bytes:
        return json.dumps({"at": self.access_token, "rt": self.refresh_token, "exp": iso(self.expires_at),
                           "scp": list(self.scopes), "rti": iso(self.refresh_token_issued_at)}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Tokens:
        d = json.loads(raw)
        return cls(d["at"], d["rt"], parse_iso(d["exp"]) or utcnow(), tuple(d.get("scp") or ()),
                   parse_iso(d.get("rti")) or utcnow())


@dataclass(frozen=True)
class Account:
    owner: str
    id: str
    home_account_id: str
    email: str
    display_name: str
    tenant_id: str
    account_type: str
    status: str
    scopes: tuple[str, ...]
    connected_at: dt.datetime
    last_refreshed_at: dt.datetime | None
    access_token_expires_at: dt.datetime | None
    last_used_at: dt.datetime | None
    last_error: dict[str, Any] | None
    sealed_tokens: str | None = field(default=None, repr=False)
    refresh_due_at: dt.datetime | None = None
    lease_id: str | None = field(default=None, repr=False)
    lease_until: dt.datetime | None = None
    etag: str | None = field(default=None, repr=False)

    @property
    def mailbox_key(self) -> str:
        """The Microsoft mailbox behind this record (oid.tid): Graph's per-mailbox limits count per
        mailbox, whichever owners connected it."""
        return self.home_account_id or self.id

    def to_public(self) -> dict[str, Any]:
        """Account JSON exactly as SPEC §3. Never a token."""
        return {
            "id": self.id,
            "provider": "microsoft",
            "email": self.email,
            "displayName": self.display_name,
            "tenantId": self.tenant_id,
            "accountType": self.account_type,
            "status": self.status,
            "scopes": list(self.scopes),
            "connectedAt": iso(self.connected_at),
            "lastRefreshedAt": iso(self.last_refreshed_at),
            "accessTokenExpiresAt": iso(self.access_token_expires_at),
            "lastUsedAt": iso(self.last_used_at),
            "lastError": self.last_error,
        }


def account_type_for(tenant_id: str) -> str:
    return "personal" if tenant_id == CONSUMER_TENANT_ID else "work"


class AccountStore:
    def __init__(self, table: Any, key_ring: Any, *, on_unknown_key: Any = None) -> None:
        self._table = table
        self._key_ring = key_ring  # callable returning the current KeyRing (Key Vault backed, cached)
        self._on_unknown_key = on_unknown_key  # forget the cached ring: a key was added in the vault

    # -- encryption ---------------------------------------------------------------------------
    def _ring(self) -> KeyRing:
        ring: KeyRing = self._key_ring()
        return ring

    def key_ring(self) -> KeyRing:
        """The current key ring (Key Vault backed, cached): load it before spending a refresh token."""
        return self._ring()

    def seal_tokens(self, owner: str, account_id: str, tokens: Tokens, *, ring: KeyRing | None = None) -> str:
        return (ring or self._ring()).seal(tokens.to_json(), aad=account_aad(owner, account_id, "tokens"))

    def open_tokens(self, account: Account) -> Tokens:
        if not account.sealed_tokens:
            raise NotFoundError("The account has no tokens.", code="no_tokens")
        aad = account_aad(account.owner, account.id, "tokens")
        ring = self._ring()
        if self._on_unknown_key is not None and kid_of(account.sealed_tokens) not in ring.kids:
            # Another instance sealed with a key this one has not loaded yet: re-read the ring once.
            self._on_unknown_key()
            ring = self._ring()
        return Tokens.from_json(ring.open(account.sealed_tokens, aad=aad))

    # -- mapping ------------------------------------------------------------------------------
    @staticmethod
    def _to_entity(a: Account) -> dict[str, Any]:
        return {
            "PartitionKey": owner_partition(a.owner),
            "RowKey": a.id,
            "owner": a.owner,
            "homeAccountId": a.home_account_id,
            "email": a.email,
            "displayName": a.display_name,
            "tenantId": a.tenant_id,
            "accountType": a.account_type,
            "status": a.status,
            "scopes": " ".join(a.scopes),
            "connectedAt": iso(a.connected_at),
            "lastRefreshedAt": iso(a.last_refreshed_at) or "",
            "accessTokenExpiresAt": iso(a.access_token_expires_at) or "",
            "lastUsedAt": iso(a.last_used_at) or "",
            "lastError": json.dumps(a.last_error) if a.last_error else "",
            "tokens": a.sealed_tokens or "",
            "tokensKid": a.sealed_tokens.split(".")[1] if a.sealed_tokens else "",
            "refreshDueAt": iso(a.refresh_due_at) or "",
            "leaseId": a.lease_id or "",
            "leaseUntil": iso(a.lease_until) or "",
        }

    @staticmethod
    def _from_entity(e: Any) -> Account:
        return Account(
            owner=e["owner"],
            id=e["RowKey"],
            home_account_id=e.get("homeAccountId", ""),
            email=e.get("email", ""),
            display_name=e.get("displayName", ""),
            tenant_id=e.get("tenantId", ""),
            account_type=e.get("accountType", "work"),
            status=e.get("status", ACTIVE),
            scopes=tuple((e.get("scopes") or "").split()),
            connected_at=parse_iso(e.get("connectedAt")) or utcnow(),
            last_refreshed_at=parse_iso(e.get("lastRefreshedAt")),
            access_token_expires_at=parse_iso(e.get("accessTokenExpiresAt")),
            last_used_at=parse_iso(e.get("lastUsedAt")),
            last_error=json.loads(e["lastError"]) if e.get("lastError") else None,
            sealed_tokens=e.get("tokens") or None,
            refresh_due_at=parse_iso(e.get("refreshDueAt")),
            lease_id=e.get("leaseId") or None,
            lease_until=parse_iso(e.get("leaseUntil")),
            etag=e.metadata.get("etag") if hasattr(e, "metadata") else None,
        )

    # -- reads --------------------------------------------------------------------------------
    def get_account(self, owner: str, account_id: str) -> Account:
        from azure.core.exceptions import ResourceNotFoundError

        if not account_id or len(account_id) > 64 or any(c in account_id for c in "/\\#?'"):
            raise NotFoundError("No such account.", code="account_not_found")
        try:
            e = self._table.get_entity(owner_partition(owner), account_id)
        except ResourceNotFoundError:
            raise NotFoundError("No such account.", code="account_not_found") from None
        if e.get("owner") != owner:  # a hash collision would be astronomically unlikely; still check
            raise NotFoundError("No such account.", code="account_not_found")
        return self._from_entity(e)

    def list_accounts(self, owner: str) -> list[Account]:
        pk = owner_partition(owner)
        rows = self._table.query_entities("PartitionKey eq @pk", parameters={"pk": pk})
        return sorted((self._from_entity(e) for e in rows if e.get("owner") == owner), key=lambda a: a.connected_at)

    def find_by_home_account(self, owner: str, home_account_id: str) -> Account | None:
        rows = self._table.query_entities("PartitionKey eq @pk and homeAccountId eq @h",
                                          parameters={"pk": owner_partition(owner), "h": home_account_id})
        for e in rows:
            if e.get("owner") == owner:
                return self._from_entity(e)
        return None

    def iter_all(self, select: list[str] | None = None) -> Iterator[Account]:
        for e in self._table.list_entities():
            yield self._from_entity(e)

    # -- writes -------------------------------------------------------------------------------
    def create_account(self, account: Account) -> Account:
        from azure.core.exceptions import ResourceExistsError

        try:
            meta = self._table.create_entity(self._to_entity(account))
        except ResourceExistsError:
            raise ConflictError("The account already exists.") from None
        return replace(account, etag=meta.get("etag"))

    def update_account(self, account: Account, *, etag: str | None) -> Account:
        """Replace the record; conditional on ``etag`` when given (412 → ConflictError)."""
        from azure.core import MatchConditions
        from azure.core.exceptions import (
            HttpResponseError,
            ResourceModifiedError,
            ResourceNotFoundError,
            ServiceRequestError,
            ServiceResponseError,
        )
        from azure.data.tables import UpdateMode

        try:
            if etag:
                meta = self._table.update_entity(self._to_entity(account), mode=UpdateMode.REPLACE, etag=etag,
                                                 match_condition=MatchConditions.IfNotModified)
            else:
                meta = self._table.upsert_entity(self._to_entity(account), mode=UpdateMode.REPLACE)
        except ResourceModifiedError:
            raise ConflictError("The account changed concurrently.", code="etag_conflict") from None
        except ResourceNotFoundError:
            raise NotFoundError("No such account.", code="account_not_found") from None
        except (ServiceRequestError, ServiceResponseError) as e:
            raise StorageUnavailableError(f"Table storage could not be reached ({type(e).__name__}).") from None
        except HttpResponseError as e:
            if (e.status_code or 0) >= 500:
                raise StorageUnavailableError(f"Table storage answered {e.status_code}.") from None
            raise
        return replace(account, etag=meta.get("etag"))

    def touch_last_used(self, account: Account, now: dt.datetime) -> None:
        """Coarse ``lastUsedAt``: a MERGE of one field, at most once an hour per account.

        A merge without ETag changes no token field, so it cannot lose a rotated refresh token;
        token writers re-read on the resulting ETag change.
        """
        from azure.data.tables import UpdateMode

        if account.last_used_at and now - account.last_used_at < dt.timedelta(hours=1):
            return
        try:
            self._table.update_entity({"PartitionKey": owner_partition(account.owner), "RowKey": account.id,
                                       "lastUsedAt": iso(now)}, mode=UpdateMode.MERGE)
        except Exception as e:  # best effort: usage tracking never fails a send
            logging.getLogger("connector.accounts").debug("lastUsedAt not updated: %s", type(e).__name__)

    def delete_account(self, owner: str, account_id: str) -> Account:
        """Destroy the tokens at once, then delete the record."""
        acc = self.get_account(owner, account_id)
        from azure.core.exceptions import ResourceNotFoundError

        try:
            self._table.delete_entity(owner_partition(owner), account_id)
        except ResourceNotFoundError:
            raise NotFoundError("No such account.", code="account_not_found") from None
        return acc

    def reencrypt_all(self) -> tuple[int, int]:
        """Re-seal every record not under the active key. Returns (examined, rewritten)."""
        ring = self._ring()
        seen = rewritten = 0
        for acc in self.iter_all():
            seen += 1
            if not acc.sealed_tokens or not ring.needs_reencrypt(acc.sealed_tokens):
                continue
            while True:
                tokens = self.open_tokens(acc)
                fresh = replace(acc, sealed_tokens=self.seal_tokens(acc.owner, acc.id, tokens))
                try:
                    self.update_account(fresh, etag=acc.etag)
                    rewritten += 1
                    break
                except ConflictError:
                    acc = self.get_account(acc.owner, acc.id)
                    if not acc.sealed_tokens or not ring.needs_reencrypt(acc.sealed_tokens):
                        break
        return seen, rewritten
