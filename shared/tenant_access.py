"""Application access to team mailboxes: a tenant's application token, and what happens when its consent goes.

* Tokens come from the client-credentials grant with the app's own credential (``MS_CLIENT_CREDENTIAL``) for one
  tenant (https://learn.microsoft.com/entra/identity-platform/v2-oauth2-client-creds-grant-flow). They are kept in
  this process's memory until :data:`EXPIRY_MARGIN` before they expire, and never written to storage or logs:
  there is no refresh token to keep, a new one is one request away.
* Consent removed (the administrator deleted the app's service principal, AADSTS 7000229 / 700016, or revoked
  the grant, 65001): the tenant connection becomes ``consent_required`` and its mailboxes ``reauth_required``,
  with one ``tenant.consent_required`` webhook (and ``account.reauth_required`` per mailbox). Consenting again
  restores them (:meth:`TenantAccess.consent_restored`): ids, subscriptions state and history are kept.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from shared.accounts import ACTIVE, APPLICATION, REAUTH_REQUIRED, Account, AccountStore, iso, utcnow
from shared.errors import ConnectorError, ConsentRequiredError, NotFoundError
from shared.keyed import PerKey
from shared.tenants import CONSENT_REQUIRED, TENANT_ACTIVE, TenantConnection, TenantStore

if TYPE_CHECKING:
    from shared.oauth import OAuthClient
    from shared.webhooks import Webhooks

log = logging.getLogger("connector.tenants")
EXPIRY_MARGIN = dt.timedelta(minutes=5)
#: What to do about a mailbox outside the administrator's scope (403 ErrorAccessDenied to an application token).
SCOPE_HINT = ("The tenant administrator scoped the app to some mailboxes and this one is outside the scope: add it "
              "to the management scope of the app's Exchange Online RBAC for Applications role assignment (or to "
              "the group of its Application Access Policy); docs/team-mailboxes.md has the PowerShell.")


@dataclass(frozen=True)
class AppToken:
    access_token: str = field(repr=False)
    expires_at: dt.datetime
    roles: tuple[str, ...]  # the application permissions the tenant granted (the token's ``roles``)
    tenant_id: str  # the token's ``tid``: the tenant that issued it


def app_token_of(access_token: str, expires_at: dt.datetime) -> AppToken:
    """``roles`` and ``tid`` of an application token, read without verification: the token is ours, just issued
    by Entra, and Graph validates it; we only report what it grants and for which tenant
    (https://learn.microsoft.com/entra/identity-platform/access-token-claims-reference)."""
    import jwt

    try:
        claims = jwt.decode(access_token, options={"verify_signature": False})
    except jwt.PyJWTError:
        claims = {}
    roles = claims.get("roles")
    return AppToken(access_token, expires_at, tuple(str(r) for r in roles) if isinstance(roles, list) else (),
                    str(claims.get("tid") or ""))


class TenantToken:
    """The :class:`shared.graph.TokenSource` of one mailbox of a tenant, before it is an account (a probe)."""

    def __init__(self, access: TenantAccess, tenant: str, root: str) -> None:
        self._access = access
        self._tenant = tenant
        self.root = root

    def get(self) -> str:
        return self._access.token_for(self._tenant).access_token

    def refresh(self, stale: str) -> str:
        return self._access.token_for(self._tenant, stale=stale).access_token


class TenantAccess:
    def __init__(self, *, oauth: OAuthClient, tenants: TenantStore, accounts: AccountStore, webhooks: Webhooks,
                 clock: Callable[[], dt.datetime] = utcnow) -> None:
        self._oauth = oauth
        self._tenants = tenants
        self._accounts = accounts
        self._webhooks = webhooks
        self._clock = clock
        self._cache: dict[str, AppToken] = {}
        # One lock per tenant: concurrent callers of one tenant make one token request.
        self._locks: PerKey[threading.Lock] = PerKey(threading.Lock, idle=lambda lock: not lock.locked())

    def token_for(self, tenant_id: str, *, stale: str | None = None, fresh: bool = False) -> AppToken:
        """The tenant's application token: the cached one unless it is about to expire, is ``stale`` (Graph
        refused it) or ``fresh`` is asked for (proving consent). :class:`ConsentRequiredError` when it is gone."""
        with self._locks.get(tenant_id):
            cached = self._cache.get(tenant_id)
            usable = (cached is not None and not fresh and cached.access_token != stale
                      and cached.expires_at - EXPIRY_MARGIN > self._clock())
            if usable and cached is not None:
                return cached
            self._cache.pop(tenant_id, None)
            result = self._oauth.app_token(tenant_id)
            token = app_token_of(result.access_token, result.expires_at)
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[tenant_id] = token
            return token

    def app_token(self, account: Account, *, stale: str | None = None) -> str:
        """A team mailbox's access token (shared.tokens.AppTokens); a lost consent is recorded before it is raised."""
        try:
            return self.token_for(account.tenant_id, stale=stale).access_token
        except ConsentRequiredError as err:
            self.consent_lost(account.owner, account.tenant_connection_id or "", err)
            raise

    # -- consent state ----------------------------------------------------------------------------------------------
    def consent_lost(self, owner: str, connection_id: str, err: ConsentRequiredError) -> None:
        """The connection becomes ``consent_required`` (one ``tenant.consent_required``), its mailboxes
        ``reauth_required`` (``account.reauth_required`` each). Best effort: the caller raises ``err`` anyway."""
        last_error = {"code": err.code, "message": err.detail[:300], "at": iso(self._clock()) or ""}
        wrote = [False]  # set by the attempt whose write landed: a lost ETag race re-reads and decides again

        def required(c: TenantConnection) -> TenantConnection | None:
            wrote[0] = c.status != CONSENT_REQUIRED
            return replace(c, status=CONSENT_REQUIRED, last_error=last_error) if wrote[0] else None

        try:
            conn = self._tenants.update_with(self._tenants.get_connection(owner, connection_id), required)
            self._cache.pop(conn.tenant_id, None)
            moved = self._set_mailboxes(conn, REAUTH_REQUIRED, last_error)
            if wrote[0]:
                log.warning("tenant connection %s lost its admin consent (%s)", conn.id, err.microsoft.codes
                            if err.microsoft else "")
                self._webhooks.emit_tenant("tenant.consent_required",
                                           conn.to_public(mailbox_count=len(self.mailboxes(conn))),
                                           [a.id for a in moved])
            for acc in moved:
                self._webhooks.emit("account.reauth_required", acc.to_public())
        except NotFoundError:
            return  # disconnected meanwhile
        except ConnectorError as e:  # storage trouble: the next call finds the consent gone again
            log.warning("lost consent of tenant connection %s not recorded (%s)", connection_id, e.code)

    def consent_restored(self, conn: TenantConnection) -> tuple[TenantConnection, list[Account]]:
        """Admin consent granted again: the connection is ``active`` (``tenant.recovered`` if this call changed it)
        and its mailboxes that lost access are ``active`` again (``account.recovered`` each); returns those."""
        wrote = [False]

        def active(c: TenantConnection) -> TenantConnection | None:
            wrote[0] = c.status != TENANT_ACTIVE
            return replace(c, status=TENANT_ACTIVE, last_error=None) if wrote[0] or c.last_error else None

        saved = self._tenants.update_with(conn, active)
        recovered = self._set_mailboxes(saved, ACTIVE, None)
        if wrote[0]:
            self._webhooks.emit_tenant("tenant.recovered", saved.to_public(mailbox_count=len(self.mailboxes(saved))),
                                       [a.id for a in recovered])
        for acc in recovered:
            self._webhooks.emit("account.recovered", acc.to_public())
        return saved, recovered

    def mailboxes(self, conn: TenantConnection) -> list[Account]:
        """The team mailboxes added through ``conn`` (one read of the owner's accounts)."""
        return [a for a in self._accounts.list_accounts(conn.owner)
                if a.access_type == APPLICATION and a.tenant_connection_id == conn.id]

    def _set_mailboxes(self, conn: TenantConnection, status: str, last_error: dict[str, str] | None) -> list[Account]:
        """Move the connection's mailboxes that are not ``status`` to it; returns the ones moved."""
        moved = []
        for acc in self.mailboxes(conn):
            if acc.status == status:
                continue
            wrote = [False]
            try:
                saved = self._accounts.update_with(acc, _moving(status, last_error, wrote))
            except NotFoundError:
                continue
            if wrote[0]:
                moved.append(saved)
        return moved


def _moving(status: str, last_error: dict[str, str] | None, wrote: list[bool]) -> Callable[[Account], Account | None]:
    """The change of an account to ``status``; ``wrote[0]`` says whether the attempt that ran last changed it."""

    def change(cur: Account) -> Account | None:
        wrote[0] = cur.status != status
        return replace(cur, status=status, last_error=last_error) if wrote[0] else None

    return change
