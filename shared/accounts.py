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
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from shared.crypto import KeyRing, account_aad, kid_of
from shared.errors import ConflictError, NotFoundError, StorageUnavailableError
from shared.storage import EntityValue, Row, Table, etag_of

CONSUMER_TENANT_ID = "9188040d-6c67-4c5b-b112-36a304b66dad"  # personal Microsoft accounts
ACTIVE = "active"
REAUTH_REQUIRED = "reauth_required"
#: ``accessType``: a user who signed in (``/me``), or a mailbox reached with the app's own application permissions
#: granted by a tenant administrator (``/users/{address}``, no tokens stored: shared.tenant_access).
DELEGATED, APPLICATION = "delegated", "application"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iso(t: dt.datetime | None) -> str | None:
    return t.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z") if t else None


def parse_iso(s: object) -> dt.datetime | None:
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


#: ``notifications.status`` values.
NOTIFY_ACTIVE, NOTIFY_PENDING, NOTIFY_FAILED, NOTIFY_OFF = "active", "pending", "failed", "off"


@dataclass(frozen=True)
class NotificationSummary:
    """The account's inbound-mail subscription as the Account JSON shows it; the
    subscription itself lives in :mod:`shared.subscriptions`."""

    status: str = NOTIFY_OFF
    expires_at: dt.datetime | None = None
    last_event_at: dt.datetime | None = None

    def to_json(self) -> dict[str, str | None]:
        return {"status": self.status, "expiresAt": iso(self.expires_at), "lastEventAt": iso(self.last_event_at)}


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
    last_error: dict[str, str] | None
    sealed_tokens: str | None = field(default=None, repr=False)
    refresh_due_at: dt.datetime | None = None
    lease_id: str | None = field(default=None, repr=False)
    lease_until: dt.datetime | None = None
    etag: str | None = field(default=None, repr=False)
    notifications: NotificationSummary = NotificationSummary()
    access_type: str = DELEGATED
    tenant_connection_id: str | None = None  # application access: the tenant connection it was added through

    @property
    def graph_root(self) -> str:
        """The Graph path of this mailbox: ``me`` for a signed-in user; ``users/{address}`` for a team mailbox
        (application permissions cannot use ``/me``: https://learn.microsoft.com/graph/api/user-get)."""
        if self.access_type == APPLICATION:
            from urllib.parse import quote

            return "users/" + quote(self.email, safe="@.")
        return "me"

    @property
    def mailbox_key(self) -> str:
        """The Microsoft mailbox behind this record (oid.tid): Graph's per-mailbox limits count per
        mailbox, whichever owners connected it."""
        return self.home_account_id or self.id

    def to_public(self) -> dict[str, object]:
        """The Account JSON of the API (docs: GET /api/openapi.json). Never a token."""
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
            "notifications": self.notifications.to_json(),
            "accessType": self.access_type,
            **({"tenantConnectionId": self.tenant_connection_id} if self.access_type == APPLICATION else {}),
        }


def account_type_for(tenant_id: str) -> str:
    return "personal" if tenant_id == CONSUMER_TENANT_ID else "work"


class AccountStore:
    """Account records in the ``accounts`` table (errors mapped by :mod:`shared.storage`)."""

    def __init__(self, table: Table, key_ring: Callable[[], KeyRing], *,
                 on_unknown_key: Callable[[], None] | None = None) -> None:
        self._table = table
        self._key_ring = key_ring  # the current KeyRing (Key Vault backed, cached)
        self._on_unknown_key = on_unknown_key  # forget the cached ring: a key was added in the vault

    # -- encryption ---------------------------------------------------------------------------
    def key_ring(self) -> KeyRing:
        """The current key ring (Key Vault backed, cached): load it before spending a refresh token."""
        return self._key_ring()

    def seal_tokens(self, owner: str, account_id: str, tokens: Tokens, *, ring: KeyRing | None = None) -> str:
        return (ring or self._key_ring()).seal(tokens.to_json(), aad=account_aad(owner, account_id, "tokens"))

    def open_tokens(self, account: Account) -> Tokens:
        if not account.sealed_tokens:
            raise NotFoundError("The account has no tokens.", code="no_tokens")
        aad = account_aad(account.owner, account.id, "tokens")
        ring = self._key_ring()
        if self._on_unknown_key is not None and kid_of(account.sealed_tokens) not in ring.kids:
            # Another instance sealed with a key this one has not loaded yet: re-read the ring once.
            self._on_unknown_key()
            ring = self._key_ring()
        return Tokens.from_json(ring.open(account.sealed_tokens, aad=aad))

    # -- reads --------------------------------------------------------------------------------
    def get_account(self, owner: str, account_id: str) -> Account:
        if not account_id or len(account_id) > 64 or any(c in account_id for c in "/\\#?'"):
            raise _no_account()
        try:
            e = self._table.get(owner_partition(owner), account_id)
        except NotFoundError:
            raise _no_account() from None
        if e.get("owner") != owner:  # a hash collision would be astronomically unlikely; still check
            raise _no_account()
        return _from_entity(e)

    def list_accounts(self, owner: str) -> list[Account]:
        rows = self._table.query("PartitionKey eq @pk", parameters={"pk": owner_partition(owner)})
        return sorted((_from_entity(e) for e in rows if e.get("owner") == owner), key=lambda a: a.connected_at)

    def find_by_home_account(self, owner: str, home_account_id: str) -> Account | None:
        rows = self._table.query("PartitionKey eq @pk and homeAccountId eq @h",
                                 parameters={"pk": owner_partition(owner), "h": home_account_id})
        return next((_from_entity(e) for e in rows if e.get("owner") == owner), None)

    def list_all(self) -> list[Account]:
        return [_from_entity(e) for e in self._table.scan()]

    def list_active_due_times(self) -> list[tuple[str, str, dt.datetime | None]]:
        """(owner, account id, due time) of every active account with a grant to keep alive: the daily index
        reconciliation (team mailboxes hold no grant: application tokens are obtained when needed)."""
        rows = self._table.query("status eq 'active'", select=["owner", "RowKey", "refreshDueAt", "accessType"])
        return [(str(e["owner"]), str(e["RowKey"]), parse_iso(e.get("refreshDueAt"))) for e in rows
                if e.get("accessType") != APPLICATION]

    def count_by_status(self) -> dict[str, int]:
        """Accounts per status, from one scan projected to ``status`` (the daily ``connector.accounts`` metric)."""
        counts: dict[str, int] = {}
        for e in self._table.query("RowKey ne ''", select=["status"]):
            status = str(e.get("status") or "unknown")
            counts[status] = counts.get(status, 0) + 1
        return counts

    # -- writes -------------------------------------------------------------------------------
    def create_account(self, account: Account) -> Account:
        return replace(account, etag=self._table.create(_to_entity(account)))

    def update_account(self, account: Account, *, etag: str | None) -> Account:
        """Replace the record; conditional on ``etag`` when given (412 → ConflictError ``etag_conflict``)."""
        try:
            return replace(account, etag=self._table.replace(_to_entity(account), etag=etag))
        except NotFoundError:
            raise _no_account() from None

    def _write_changes(self, current: Account, wanted: Account) -> Account:
        """Write ``wanted`` over ``current`` (the record as stored at ``current.etag``).

        With an ETag the write is a MERGE of the columns that differ, conditional on it: the stored
        entity is ``current`` then, so the result equals a replace, and only a few columns are
        serialised and sent instead of every one (the refresher writes twice per refresh). Without one:
        a replace.
        """
        if current.etag is None:
            return self.update_account(replace(wanted, etag=None), etag=None)
        before, after = _to_entity(current), _to_entity(wanted)
        fields = {k: v for k, v in after.items() if k in ("PartitionKey", "RowKey") or before.get(k) != v}
        try:
            etag = self._table.merge(fields, etag=current.etag)
        except NotFoundError:
            raise _no_account() from None
        return replace(wanted, etag=etag)

    def set_lease(self, account: Account, lease_id: str, until: dt.datetime) -> Account:
        """Take the refresh lease: a MERGE of the two lease columns, conditional on ``account.etag``
        (412 → ConflictError ``etag_conflict``)."""
        return self._write_changes(account, replace(account, lease_id=lease_id, lease_until=until))

    def update_with(self, account: Account, change: Callable[[Account], Account | None], *,
                    landed: Callable[[Account], bool] | None = None, attempts: int = 8) -> Account:
        """The one ETag read-modify-write loop (optimistic concurrency:
        https://learn.microsoft.com/rest/api/storageservices/update-entity2).

        ``change(current)`` returns the record to write, or None to leave ``current`` as it is (the
        change no longer applies). On a lost race the record is re-read and ``change`` asked again.
        ``landed(current)`` recognises our own write whose response was lost (the SDK's retry of it
        then fails the ETag check). Raises :class:`ConflictError` when the record keeps changing.
        """
        current = account
        for _ in range(attempts):
            wanted = change(current)
            if wanted is None:
                return current
            try:
                return self._write_changes(current, wanted)
            except ConflictError:
                current = self.get_account(account.owner, account.id)
                if landed is not None and landed(current):
                    return current
        raise ConflictError("The account kept changing; try again.", code="etag_conflict", hint="Retry shortly.")

    def record_use(self, account: Account, now: dt.datetime, *, due: dt.datetime | None) -> Account | None:
        """Coarse ``lastUsedAt`` (and an earlier due time for active use) as a MERGE of two fields.

        Conditional on the ETag the caller read: a refresher that wrote meanwhile wins, and token
        writers re-read on the ETag change, so usage tracking can never drop a rotated token.
        Returns the updated record, or None when the write did not happen (best effort).
        """
        fields: dict[str, EntityValue] = {"PartitionKey": owner_partition(account.owner), "RowKey": account.id,
                                          "lastUsedAt": iso(now)}
        if due is not None:
            fields["refreshDueAt"] = iso(due)
        try:
            etag = self._table.merge(fields, etag=account.etag)
        except (ConflictError, NotFoundError, StorageUnavailableError) as e:  # usage tracking never fails a call
            logging.getLogger("connector.accounts").debug("lastUsedAt not updated: %s", e.code)
            return None
        return replace(account, last_used_at=now, refresh_due_at=due or account.refresh_due_at, etag=etag)

    def set_notifications(self, account: Account, summary: NotificationSummary) -> Account:
        """MERGE only the ``notifications`` columns (unconditional: token writers are ETag-conditional,
        so they re-read and keep these). NotFoundError when the account is gone; never re-creates it."""
        fields: dict[str, EntityValue] = {"PartitionKey": owner_partition(account.owner), "RowKey": account.id,
                                          **_notification_columns(summary)}
        try:
            etag = self._table.merge(fields)
        except NotFoundError:
            raise _no_account() from None
        return replace(account, notifications=summary, etag=etag)

    def set_last_event(self, account: Account, at: dt.datetime) -> Account:
        """MERGE only ``notifications.lastEventAt`` (the status and expiry columns belong to the worker
        that maintains the subscription: a stale copy must not write them back). NotFoundError when gone."""
        fields: dict[str, EntityValue] = {"PartitionKey": owner_partition(account.owner), "RowKey": account.id,
                                          "notifLastEventAt": iso(at) or ""}
        try:
            etag = self._table.merge(fields)
        except NotFoundError:
            raise _no_account() from None
        return replace(account, notifications=replace(account.notifications, last_event_at=at), etag=etag)

    def delete_account(self, owner: str, account_id: str) -> Account:
        """Destroy the tokens at once, then delete the record."""
        acc = self.get_account(owner, account_id)
        if not self._table.delete_if_present(owner_partition(owner), account_id):
            raise _no_account()
        return acc

    def reencrypt_all(self, *, on_progress: Callable[[int, int, int], None] | None = None,
                      every: int = 100) -> tuple[int, int]:
        """Re-seal every record not under the active key. Returns (examined, rewritten); ``on_progress``
        (examined, total, rewritten) is told every ``every`` records and at the end."""
        ring = self._key_ring()
        accounts = self.list_all()
        rewritten = 0

        def reseal(acc: Account) -> Account | None:
            if not acc.sealed_tokens or not ring.needs_reencrypt(acc.sealed_tokens):
                return None
            return replace(acc, sealed_tokens=self.seal_tokens(acc.owner, acc.id, self.open_tokens(acc), ring=ring))

        for n, acc in enumerate(accounts, 1):
            if reseal(acc) is not None:
                try:
                    saved = self.update_with(acc, reseal)
                    rewritten += saved.sealed_tokens != acc.sealed_tokens
                except NotFoundError:
                    pass  # deleted meanwhile
            if on_progress is not None and (n % every == 0 or n == len(accounts)):
                on_progress(n, len(accounts), rewritten)
        return len(accounts), rewritten


def _no_account() -> NotFoundError:
    return NotFoundError("No such account.", code="account_not_found")


def _to_entity(a: Account) -> dict[str, EntityValue]:
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
        **_notification_columns(a.notifications),
        # Delegated accounts (the many) carry no access columns: absent means delegated.
        **({"accessType": a.access_type, "tenantConnectionId": a.tenant_connection_id or ""}
           if a.access_type == APPLICATION else {}),
    }


def _notification_columns(n: NotificationSummary) -> dict[str, EntityValue]:
    return {"notifStatus": n.status, "notifExpiresAt": iso(n.expires_at) or "",
            "notifLastEventAt": iso(n.last_event_at) or ""}


def _from_entity(e: Row) -> Account:
    def s(name: str, default: str = "") -> str:
        value = e.get(name)
        return str(value) if value else default

    return Account(
        owner=s("owner"),
        id=s("RowKey"),
        home_account_id=s("homeAccountId"),
        email=s("email"),
        display_name=s("displayName"),
        tenant_id=s("tenantId"),
        account_type=s("accountType", "work"),
        status=s("status", ACTIVE),
        scopes=tuple(s("scopes").split()),
        connected_at=parse_iso(e.get("connectedAt")) or utcnow(),
        last_refreshed_at=parse_iso(e.get("lastRefreshedAt")),
        access_token_expires_at=parse_iso(e.get("accessTokenExpiresAt")),
        last_used_at=parse_iso(e.get("lastUsedAt")),
        last_error=json.loads(s("lastError")) if e.get("lastError") else None,
        sealed_tokens=s("tokens") or None,
        refresh_due_at=parse_iso(e.get("refreshDueAt")),
        lease_id=s("leaseId") or None,
        lease_until=parse_iso(e.get("leaseUntil")),
        etag=etag_of(e),
        notifications=NotificationSummary(s("notifStatus", NOTIFY_OFF), parse_iso(e.get("notifExpiresAt")),
                                          parse_iso(e.get("notifLastEventAt"))),
        access_type=s("accessType", DELEGATED),
        tenant_connection_id=s("tenantConnectionId") or None,
    )
