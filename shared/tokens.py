"""Access tokens for an account: use the stored one while fresh, refresh safely when not.

Rotation safety: each refresh returns a new refresh token that must replace the
stored one, and with strict rotation the old one dies at once. Two refreshers that both use the
same refresh token would lose the grant, so a refresh first takes a short **lease** on the
account row with an ETag-conditional write (Table Storage ETags are per-entity optimistic
concurrency: https://learn.microsoft.com/rest/api/storageservices/update-entity2). Only the lease
holder calls the token endpoint; others wait for the lease to clear and use what it stored. A
per-account lock in the process spares the table when many local callers collide. The final
write is conditional too and retried while the lease is still ours, so a concurrent
``lastUsedAt`` merge never drops a rotated token.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

from shared.accounts import ACTIVE, APPLICATION, REAUTH_REQUIRED, Account, AccountStore, Tokens, iso, utcnow
from shared.backoff import backoff_delay
from shared.due_index import bucket_of
from shared.errors import (
    ConflictError,
    ConnectorError,
    ConsentRequiredError,
    NotFoundError,
    ReauthRequiredError,
    StorageUnavailableError,
    UpstreamUnavailableError,
)
from shared.keyed import PerKey

if TYPE_CHECKING:
    from shared.due_index import DueIndex
    from shared.oauth import OAuthClient
    from shared.telemetry import Telemetry

log = logging.getLogger("connector.tokens")

REFRESH_MARGIN = dt.timedelta(minutes=5)  # renew an access token this long before it expires
# Longer than the slowest token request a holder can make (two attempts of (5 s, 30 s) when Entra
# says the client secret is stale and the vault is re-read), so a live holder keeps its lease.
LEASE = dt.timedelta(seconds=120)
WAIT_FOR_LEASE_S = 45.0
STORE_ROTATED_ATTEMPTS = 12  # writes of a rotated token through a storage outage (within the lease)
RECORD_DUE = "record-due"  # ``refresh(indexed_at=)``: the index row of the record's own due time
ACTIVE_USE = dt.timedelta(days=1)  # used within this window: keep its access token renewed ahead of expiry
USE_RECORD_INTERVAL = dt.timedelta(hours=1)  # lastUsedAt is coarse: at most one write an hour per account


class AppTokens(Protocol):
    """Application tokens of a team mailbox's tenant (shared.tenant_access): never stored with the account."""

    def app_token(self, account: Account, *, stale: str | None = None) -> str: ...


class TokenManager:
    def __init__(self, store: AccountStore, oauth: OAuthClient, *, index: DueIndex, keepalive: dt.timedelta,
                 on_reauth: Callable[[Account, ReauthRequiredError], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep, lease: dt.timedelta = LEASE,
                 telemetry: Telemetry | None = None, app_tokens: AppTokens | None = None) -> None:
        from shared.telemetry import OFF

        self._app_tokens = app_tokens
        self._store = store
        self._telemetry = telemetry or OFF
        self._oauth = oauth
        self._index = index
        self._keepalive = keepalive
        self._on_reauth = on_reauth
        self._sleep = sleep
        self._lease = lease
        # One lock per account: refreshes of one account in this process queue behind each other.
        self._locks: PerKey[threading.Lock] = PerKey(threading.Lock, idle=lambda lock: not lock.locked())

    def _local_lock(self, account_id: str) -> threading.Lock:
        return self._locks.get(account_id)

    @staticmethod
    def _fresh(tokens: Tokens, now: dt.datetime) -> bool:
        return tokens.expires_at - now > REFRESH_MARGIN

    def next_due(self, tokens: Tokens, now: dt.datetime, *, active_use: bool) -> dt.datetime:
        """When the refresher should next look at this account."""
        # Jitter moves due times earlier by a random amount so that accounts connected together
        # do not renew together.
        keepalive = tokens.refresh_token_issued_at + self._keepalive - self._keepalive / 14 * _jitter()
        if active_use:
            return min(tokens.expires_at - REFRESH_MARGIN * (2 + _jitter()), keepalive)
        return keepalive

    def current_access_token(self, account: Account) -> str:
        """The access token stored on this record, as it is (no freshness check)."""
        if account.status != ACTIVE:  # e.g. the record a concurrent refresher marked reauth_required
            raise reauth_error(account)
        if account.access_type == APPLICATION:
            return self.application_token(account)
        return self._store.open_tokens(account).access_token

    def application_token(self, account: Account, *, stale: str | None = None) -> str:
        """A team mailbox's token: its tenant's application token (``stale``: Graph refused that one)."""
        if self._app_tokens is None or account.status != ACTIVE:
            raise reauth_error(account)
        return self._app_tokens.app_token(account, stale=stale)

    def access_token(self, account: Account) -> tuple[str, Account]:
        """A valid access token; refreshing only when it is about to expire (no write otherwise)."""
        if account.status != ACTIVE:
            raise reauth_error(account)
        if account.access_type == APPLICATION:
            return self.application_token(account), account
        tokens = self._store.open_tokens(account)
        if self._fresh(tokens, utcnow()):
            return tokens.access_token, account
        account = self.refresh(account.owner, account.id, force=False)
        return self.current_access_token(account), account

    def note_use(self, account: Account, now: dt.datetime | None = None) -> Account:
        """Record active use: ``lastUsedAt``, and move the due time ahead of the access
        token's expiry so the timer renews it before the next use needs it."""
        now = now or utcnow()
        if account.last_used_at and now - account.last_used_at < USE_RECORD_INTERVAL:
            return account
        try:  # best effort: the call it follows (a send, a read) has already succeeded
            due = account.refresh_due_at
            if account.status == ACTIVE and account.sealed_tokens:
                wanted = self.next_due(self._store.open_tokens(account), now, active_use=True)
                due = wanted if due is None or wanted < due else None
            else:
                due = None
            saved = self._store.record_use(account, now, due=due)
            if saved is None:
                return account
            if due is not None:
                self._index.put(saved, previous_bucket=bucket_of(account.refresh_due_at)
                                if account.refresh_due_at else None)
            return saved
        except ConnectorError as e:  # a lost index row is repaired by the daily reconciliation
            log.warning("usage of %s not recorded (%s)", account.id, e.code)
            return account

    def refresh(self, owner: str, account_id: str, *, force: bool = True, stale_access_token: str | None = None,
                account: Account | None = None, indexed_at: str | None = RECORD_DUE) -> Account:
        """Refresh the account's tokens now (or only if needed when ``force`` is False).

        ``account``: the record as the caller just read it, which spares one read; its ETag makes
        the lease write fail (and the loop re-read) if it is no longer current.
        ``indexed_at``: the bucket of the index row that stands for the account now (the refresh
        worker's re-armed row), which moves to the next due time whoever refreshed; None when no
        row stands for it. By default (:data:`RECORD_DUE`) the row of the record's own due time
        moves, and only after our own refresh.
        """
        return self.refresh_reporting(owner, account_id, force=force, stale_access_token=stale_access_token,
                                      account=account, indexed_at=indexed_at)[0]

    def refresh_reporting(self, owner: str, account_id: str, *, force: bool = True,
                          stale_access_token: str | None = None, account: Account | None = None,
                          indexed_at: str | None = RECORD_DUE) -> tuple[Account, bool]:
        """:meth:`refresh`, and whether this call redeemed the refresh token itself (False when it took
        tokens another writer stored: those may predate a revocation that also hit the caller's)."""
        with self._local_lock(account_id):
            return self._refresh_locked(owner, account_id, force=force, stale_access_token=stale_access_token,
                                        account=account, indexed_at=indexed_at)

    def _refresh_locked(self, owner: str, account_id: str, *, force: bool, stale_access_token: str | None,
                        account: Account | None, indexed_at: str | None) -> tuple[Account, bool]:
        leased = self._take_lease(owner, account_id, force=force, stale_access_token=stale_access_token,
                                  account=account)
        explicit_row = indexed_at not in (None, RECORD_DUE)
        if isinstance(leased, Account):  # someone else's refresh is as good as ours
            if explicit_row:
                self._index_quietly(leased, indexed_at)
            return leased, False
        acc, tokens, lease = leased
        previous = indexed_at
        if indexed_at == RECORD_DUE:
            previous = bucket_of(acc.refresh_due_at) if acc.refresh_due_at else None
        saved, ours = self._refresh_with_lease(acc, tokens, lease)
        if ours or explicit_row:
            self._index_quietly(saved, previous)
        return saved, ours

    def _take_lease(self, owner: str, account_id: str, *, force: bool, stale_access_token: str | None,
                    account: Account | None) -> Account | tuple[Account, Tokens, str]:
        """Lease the row for one refresh, or return the record when no refresh is needed any more."""
        deadline = time.monotonic() + WAIT_FOR_LEASE_S
        delay = 0.05
        while True:
            acc = account if account is not None else self._store.get_account(owner, account_id)
            account = None  # any further round reads the record afresh
            if acc.status != ACTIVE:
                raise reauth_error(acc)
            tokens = self._store.open_tokens(acc)
            now = utcnow()
            if stale_access_token is not None and tokens.access_token != stale_access_token \
                    and self._fresh(tokens, now):
                return acc  # someone refreshed since the caller's token was rejected
            if not force and stale_access_token is None and self._fresh(tokens, now):
                return acc
            if acc.lease_id and acc.lease_until and acc.lease_until > now:
                if time.monotonic() > deadline:
                    raise UpstreamUnavailableError("Another refresh of this account is taking too long.",
                                                   hint="Retry shortly.")
                self._sleep(delay)  # another instance holds the lease: wait for its result
                delay = min(delay * 2, 1.0)
                if force:
                    force = False  # the holder's refresh is as good as ours
                    stale_access_token = tokens.access_token
                continue
            lease = secrets.token_hex(8)
            mine = self._write_lease(acc, lease, now)
            if mine is not None:
                return mine, tokens, lease

    def _write_lease(self, acc: Account, lease: str, now: dt.datetime) -> Account | None:
        """Take the lease with an ETag-conditional write; None when another writer came first."""
        try:
            return self._store.set_lease(acc, lease, now + self._lease)
        except StorageUnavailableError:
            # The write may have landed before the failure: never leave a lease nobody will use.
            try:
                self._release(self._store.get_account(acc.owner, acc.id), lease)
            except StorageUnavailableError:
                pass  # the lease expires by itself
            raise
        except ConflictError:
            # The SDK retries a write whose response was lost; the retry then fails its ETag
            # check although the first attempt took the lease. A row carrying our lease is ours.
            current = self._store.get_account(acc.owner, acc.id)
            return current if current.lease_id == lease else None

    def _refresh_with_lease(self, acc: Account, tokens: Tokens, lease: str) -> tuple[Account, bool]:
        """Redeem the refresh token under our lease and store the result: (the record, whether we wrote it)."""
        try:
            # Load the key ring first (it may come from Key Vault): once the old refresh token is
            # spent, nothing that could have been done before may stand between the answer and its write.
            ring = self._store.key_ring()
            result = self._oauth.refresh(tokens.refresh_token, acc.scopes or None)
        except ReauthRequiredError as err:
            return self._on_dead_grant(acc, tokens, lease, err), False
        except Exception as e:
            self._telemetry.refresh(refresh_outcome(e), code=getattr(e, "code", type(e).__name__))
            self._release(acc, lease)
            raise
        self._telemetry.refresh("ok")
        now = utcnow()
        new_tokens = Tokens(
            access_token=result.access_token,
            refresh_token=result.refresh_token or tokens.refresh_token,
            expires_at=result.expires_at,
            scopes=result.scopes or tokens.scopes,
            refresh_token_issued_at=now if result.refresh_token else tokens.refresh_token_issued_at,
        )
        sealed = self._store.seal_tokens(acc.owner, acc.id, new_tokens, ring=ring)

        def store(current: Account) -> Account | None:
            if current is not acc and current.lease_id != lease and not self._still_ours_to_write(current, tokens):
                # Our lease expired and someone else stored newer tokens: never overwrite them.
                log.warning("lost the refresh lease on %s; keeping the other writer's tokens", acc.id)
                return None
            return replace(current, sealed_tokens=sealed, lease_id=None, lease_until=None, last_refreshed_at=now,
                           access_token_expires_at=new_tokens.expires_at, scopes=new_tokens.scopes or current.scopes,
                           last_error=None,
                           refresh_due_at=self.next_due(new_tokens, now, active_use=_recently_used(current, now)))

        saved = self._store_rotated(acc, lease, store, landed=lambda cur: cur.sealed_tokens == sealed)
        return saved, saved.sealed_tokens == sealed

    def _index_quietly(self, account: Account, previous_bucket: str | None) -> None:
        """Move the index row; the record is already stored, so a failure here must not fail the call
        (a missing row is repaired by the daily reconciliation, a stale one costs one read)."""
        try:
            self._index.put(account, previous_bucket=previous_bucket)
        except ConnectorError as e:
            log.warning("refresh index not updated for %s (%s)", account.id, e.code)

    def _store_rotated(self, acc: Account, lease: str, store: Callable[[Account], Account | None], *,
                       landed: Callable[[Account], bool]) -> Account:
        """Write the rotated tokens. The new refresh token exists only in this process now: keep trying
        through storage outages while the lease is ours (the storage layer has retried each attempt),
        at most 2 s apart, so the write lands soon after storage is back: until it does, a crash of this
        process loses the token (with strict rotation, the account with it)."""
        for failures in range(1, STORE_ROTATED_ATTEMPTS + 1):
            try:
                return self._store.update_with(acc, store, landed=landed, attempts=50)
            except StorageUnavailableError:
                if failures == STORE_ROTATED_ATTEMPTS or (acc.lease_until and utcnow() > acc.lease_until):
                    log.error("could not store the rotated tokens of %s: storage unavailable", acc.id)
                    self._release(acc, lease)
                    raise
                self._sleep(backoff_delay(failures, base=0.25, cap=2.0))
        raise AssertionError("unreachable")  # pragma: no cover

    def _still_ours_to_write(self, acc: Account, used: Tokens) -> bool:
        """After losing the lease: may we still store our fresh tokens?

        Yes while the row still holds the refresh token we redeemed. Then nobody has stored a newer
        one, and with rotation ours is the live one: a later holder of the lease that redeems the
        old token gets ``invalid_grant`` and, re-reading, finds ours (:meth:`_on_dead_grant`).
        """
        if acc.status != ACTIVE or not acc.sealed_tokens:
            return False
        return self._store.open_tokens(acc).refresh_token == used.refresh_token

    def _release(self, acc: Account, lease: str) -> None:
        """Best effort: a lease that cannot be cleared now expires by itself (``LEASE``)."""
        try:
            self._store.update_with(
                acc, lambda cur: replace(cur, lease_id=None, lease_until=None) if cur.lease_id == lease else None,
                attempts=5)
        except (StorageUnavailableError, ConflictError, NotFoundError) as e:
            log.warning("could not release the refresh lease on %s (%s)", acc.id, e.code)

    def _on_dead_grant(self, acc: Account, used: Tokens, lease: str, err: ReauthRequiredError) -> Account:
        """``invalid_grant`` for the refresh token we used: a dead grant, or a lost rotation race.

        If another writer stored a different refresh token meanwhile (our lease ran out and it
        rotated first, or the account was re-connected), the grant is alive: use what it stored
       .
        """
        current = self._store.get_account(acc.owner, acc.id)
        if current.status == ACTIVE and current.sealed_tokens and current.lease_id != lease:
            if self._store.open_tokens(current).refresh_token != used.refresh_token:
                log.info("lost a rotation race on %s; using the tokens the other refresher stored", acc.id)
                return current
        return self._mark_reauth(current if current.lease_id == lease else acc, lease, err)

    def _mark_reauth(self, acc: Account, lease: str, err: ReauthRequiredError) -> Account:
        now = utcnow()
        reason = str(err.extra.get("reason") or err.code)
        last_error = {"code": reason, "message": err.detail[:300], "at": iso(now) or ""}

        def dead(current: Account) -> Account | None:
            if current is not acc and current.lease_id != lease:
                return None  # someone else owns the row now
            return replace(current, status=REAUTH_REQUIRED, sealed_tokens=None, lease_id=None, lease_until=None,
                           refresh_due_at=None, last_error=last_error)

        saved = self._store.update_with(acc, dead, landed=lambda cur: cur.status == REAUTH_REQUIRED
                                        and not cur.sealed_tokens and cur.last_error == last_error)
        if saved.last_error != last_error:
            return saved  # not our write: whoever owns the row now decided its state
        log.warning("account %s needs re-authentication: %s", acc.id, reason)
        self._telemetry.refresh("invalid_grant", code=reason)
        self._telemetry.account_status(REAUTH_REQUIRED, event="refresh_rejected")
        if self._on_reauth:
            self._on_reauth(saved, err)
        self._index_quietly(saved, bucket_of(acc.refresh_due_at) if acc.refresh_due_at else None)
        raise err


def refresh_outcome(error: BaseException) -> str:
    """The ``connector.refresh`` outcome of a failed token request."""
    from shared.errors import OperatorError, ThrottledError

    if isinstance(error, ReauthRequiredError):
        return "invalid_grant"
    if isinstance(error, OperatorError):
        return "invalid_client"
    return "throttled" if isinstance(error, ThrottledError) else "transient"


def _jitter() -> float:
    import random

    return random.random()


def _recently_used(acc: Account, now: dt.datetime) -> bool:
    return bool(acc.last_used_at and now - acc.last_used_at < ACTIVE_USE)


def reauth_error(acc: Account) -> ReauthRequiredError:
    if acc.access_type == APPLICATION:
        return ConsentRequiredError(
            "The tenant no longer grants this app access to the mailbox.",
            hint="A tenant administrator must grant admin consent again (GET /api/connect/microsoft/admin); the "
                 "mailbox keeps its id and its subscriptions.",
            extra={"accountId": acc.id, "tenantConnectionId": acc.tenant_connection_id or ""})
    return ReauthRequiredError("The mailbox must be re-connected before it can be used.",
                               hint="Start the connect flow again with accountId to keep the account id.",
                               extra={"accountId": acc.id})


class AccountTokenSource:
    """The :class:`shared.graph.TokenSource` for one account."""

    def __init__(self, manager: TokenManager, account: Account) -> None:
        self._m = manager
        self.account = account
        self.adopted = False  # the last refresh() took another writer's tokens instead of redeeming (graph.py)

    @property
    def root(self) -> str:
        return self.account.graph_root

    def get(self) -> str:
        token, self.account = self._m.access_token(self.account)
        return token

    def refresh(self, stale: str) -> str:
        if self.account.access_type == APPLICATION:  # a new application token for the tenant
            return self._m.application_token(self.account, stale=stale)
        # adopted: this call took tokens another writer stored instead of redeeming. Their access token
        # may have been issued before the revocation that rejected ``stale`` (a time comparison cannot
        # tell: the other writer may store it after this call began), so Graph gets one more refresh.
        self.account, redeemed = self._m.refresh_reporting(self.account.owner, self.account.id, force=False,
                                                           stale_access_token=stale)
        self.adopted = not redeemed
        return self._m.current_access_token(self.account)
