"""Team mailboxes: admin consent for a tenant, then shared (or user, or room) mailboxes of that tenant reached
with the app's application permissions, without anyone signing in to them.

* ``GET /api/connect/microsoft/admin`` → Entra's v2.0 admin-consent URL with a state like the connect flow's
  (https://learn.microsoft.com/entra/identity-platform/v2-admin-consent). The callback route recognises the state
  and comes here: the consent is proved by obtaining an application token for the tenant (never by the redirect's
  ``tenant`` alone, which the browser carries), and a **tenant connection** is stored, owned like an account.
  Consenting again for a tenant the owner already connected restores that connection and its mailboxes.
* ``POST /api/tenants/{id}/mailboxes {"address"}``: the mailbox is added only after the application token has
  read its Inbox (``Mail.*`` application permissions do not include reading the user object). Outside the
  administrator's scope (Exchange Online RBAC for Applications, or an Application Access Policy) Graph answers
  403 ``ErrorAccessDenied``: 409 ``mailbox_access_denied``. Only mailboxes added here are ever touched; the
  product never lists a tenant's users.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from shared.accounts import ACTIVE, APPLICATION, Account, AccountStore, utcnow
from shared.connect_flow import CallbackOutcome, ConnectIdentity
from shared.errors import ConflictError, ConnectorError, ConsentRequiredError, MicrosoftError, NotFoundError, OAuthError
from shared.mail import mailbox_address
from shared.oauth import STATE_MAC_PURPOSE
from shared.tenant_access import SCOPE_HINT, TenantAccess, TenantToken
from shared.tenants import TENANT_ACTIVE, TenantConnection, TenantStore

if TYPE_CHECKING:
    from shared.crypto import RingSource
    from shared.graph import GraphClient
    from shared.oauth import OAuthClient, PendingConnect
    from shared.webhooks import Webhooks

log = logging.getLogger("connector.tenants")
Json = dict[str, object]
_GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: Entra roles that may grant application permissions on Microsoft Graph (tenant-wide admin consent), by role
#: template id as the id token's ``wids`` names them: Global Administrator, Privileged Role Administrator
#: (https://learn.microsoft.com/entra/identity/enterprise-apps/grant-admin-consent).
CONSENT_ROLES = frozenset({"62e90394-69f5-4237-9190-012177145e10", "e8611ab8-c189-46e8-94e1-60213ab1f814"})
ADMIN_HINT = ("Sign in as a Global Administrator or Privileged Role Administrator of the tenant. The app registration "
              "must put directory roles in its tokens (Token configuration: groups claim with directory roles; "
              "docs/team-mailboxes.md).")
CONSENT_PROPAGATION_WAITS: tuple[float | None, ...] = (1.0, 3.0, None)
CONNECTION_ID_PURPOSE = "tenant-connection-id/v1"
ACCOUNT_ID_PURPOSE = "team-mailbox-account-id/v1"
#: Graph's answers that mean "no such mailbox in this tenant" to an application token.
_NO_MAILBOX = ("ErrorInvalidUser", "ResourceNotFound", "MailboxNotEnabledForRESTAPI", "ErrorNonExistentMailbox")


class TeamMailboxes:
    def __init__(self, *, oauth: OAuthClient, key_ring: RingSource, identity: ConnectIdentity, tenants: TenantStore,
                 access: TenantAccess, accounts: AccountStore, graph: GraphClient, app_roles: tuple[str, ...],
                 on_connected: Callable[[Account, bool], Account], delete_account: Callable[[str, str], None],
                 webhooks: Webhooks, sleep: Callable[[float], None] = time.sleep) -> None:
        """``on_connected(account, reconnected)``: the inbound-mail hook (never raises). ``delete_account(owner,
        id)``: disconnect one mailbox as ``DELETE /api/accounts/{id}`` does (subscriptions first)."""
        self._oauth = oauth
        self._key_ring = key_ring
        self._identity = identity
        self._tenants = tenants
        self._access = access
        self._accounts = accounts
        self._graph = graph
        self._roles = app_roles
        self._on_connected = on_connected
        self._delete_account = delete_account
        self._webhooks = webhooks
        self._sleep = sleep

    # -- admin consent --------------------------------------------------------------------------------------------
    def start(self, owner: str, *, return_url: str | None, tenant: str | None) -> dict[str, str]:
        """The administrator's sign-in, then Entra's admin-consent page (two legs through the callback)."""
        ring = self._key_ring()
        return self._oauth.start_admin_signin(owner, return_url=return_url, tenant=tenant,
                                              seal=lambda data, aad: ring.seal(data, aad=aad),
                                              mac_key=ring.derive(STATE_MAC_PURPOSE))

    def complete(self, pending: PendingConnect, params: dict[str, str], state: str) -> CallbackOutcome:
        """The callback of an admin state (consumed already): after the sign-in, on to the admin-consent page;
        after the consent, store or restore the tenant connection."""
        from shared import connect_result
        from shared.logs import safe

        try:
            if pending.kind == "admin_signin":
                return CallbackOutcome(pending.return_url, "continue", next_url=self._consent_leg(pending, params))
            conn = self._store_consent(pending, params)
        except ConnectorError as err:
            log.warning("admin consent failed for owner's pending flow: %s", safe(err.code, 64))
            return CallbackOutcome(pending.return_url, "error", code=err.code, message=err.detail, hint=err.hint)
        token = connect_result.sign(self._key_ring(), issuer=self._identity.issuer, audience=self._identity.audience,
                                    owner=pending.owner, tenant_connection_id=conn.id, state=state)
        return CallbackOutcome(pending.return_url, "connected", tenant_connection_id=conn.id, result=token)

    def _consent_leg(self, pending: PendingConnect, params: dict[str, str]) -> str:
        """Check who signed in: an administrator who may grant application permissions, of the tenant the link
        named. Then the admin-consent URL for that tenant, with a state that remembers it."""
        claims = self._oauth.redeem_admin_signin(pending, params)
        tenant = str(claims.get("tid") or "").lower()
        if not _GUID.fullmatch(tenant) or not self._named_tenant_is(pending.tenant, tenant):
            raise OAuthError("The administrator who signed in belongs to another tenant than the one this link "
                             "was for.", code="tenant_mismatch",
                             hint="Sign in with an administrator of the intended tenant.")
        roles = claims.get("wids")
        if not isinstance(roles, list) or not CONSENT_ROLES.intersection(str(r) for r in roles):
            raise OAuthError("The account that signed in may not grant application permissions for the tenant.",
                             code="admin_required", hint=ADMIN_HINT)
        ring = self._key_ring()
        return self._oauth.admin_consent_url_for(pending.owner, tenant_id=tenant, return_url=pending.return_url,
                                                 seal=lambda data, aad: ring.seal(data, aad=aad),
                                                 mac_key=ring.derive(STATE_MAC_PURPOSE))

    def _store_consent(self, pending: PendingConnect, params: dict[str, str]) -> TenantConnection:
        from shared.ms_errors import from_authorize_error

        if params.get("error"):
            raise from_authorize_error(params, context={"admin_consent_url": self._oauth.admin_consent_url(
                pending.tenant)})
        tenant = (params.get("tenant") or "").lower()
        if (params.get("admin_consent") or "").lower() != "true" or not _GUID.fullmatch(tenant):
            raise OAuthError("The admin-consent answer carries no granted consent for a tenant.",
                             code="invalid_callback", hint="Start the admin consent again.")
        if tenant != (pending.tenant or "").lower():  # the signed-in administrator's tenant (first leg)
            raise OAuthError("The consent was granted for another tenant than the administrator's who signed in.",
                             code="tenant_mismatch", hint="Ask an administrator of the intended tenant to consent.")
        roles = self._granted_roles(tenant)
        missing = [r for r in self._roles if roles is not None and r.lower() not in {x.lower() for x in roles}]
        if missing:
            raise OAuthError(f"The tenant granted the app without {', '.join(missing)}.", code="app_roles_missing",
                             hint="Declare the application permissions of MS_APP_ROLES on the app registration "
                                  "(docs/team-mailboxes.md), then ask the administrator to consent again.")
        conn_id = self._connection_id(pending.owner, tenant)
        try:
            existing: TenantConnection | None = self._tenants.get_connection(pending.owner, conn_id)
        except NotFoundError:
            existing = None
        if existing is None:
            try:
                return self._tenants.create_connection(TenantConnection(
                    owner=pending.owner, id=conn_id, tenant_id=tenant, status=TENANT_ACTIVE, connected_at=utcnow()))
            except ConflictError:  # a concurrent callback of the same owner and tenant stored it first
                existing = self._tenants.get_connection(pending.owner, conn_id)
        conn, recovered = self._access.consent_restored(existing)
        for acc in recovered:
            self._on_connected(acc, True)  # subscriptions renewed or re-created, missed mail caught up
        return conn

    def _granted_roles(self, tenant: str) -> tuple[str, ...] | None:
        """Prove the consent with an application token for the tenant (retried briefly: a new consent takes a few
        seconds to reach the token service). Its roles; None when the token does not say (not a readable JWT)."""
        for wait in CONSENT_PROPAGATION_WAITS:
            try:
                token = self._access.token_for(tenant, fresh=True)
                return token.roles if token.tenant_id else None
            except ConsentRequiredError:
                if wait is None:
                    raise
                self._sleep(wait)
        raise AssertionError("the last wait is None")  # pragma: no cover

    def _connection_id(self, owner: str, tenant: str) -> str:
        """One connection per owner and tenant, whatever the number of concurrent callbacks: its id is a keyed MAC
        of both (HMAC-SHA256 under a key derived from the token key ring)."""
        mac = hmac.new(self._key_ring().derive(CONNECTION_ID_PURPOSE), f"{owner}\n{tenant}".encode(), hashlib.sha256)
        return "tc_" + mac.hexdigest()[:24]

    def _named_tenant_is(self, named: str | None, tenant: str) -> bool:
        """The tenant the link was started for (an id or a verified domain) is ``tenant``."""
        if not named or named.lower() == "organizations":
            return True
        if _GUID.fullmatch(named.lower()):
            return named.lower() == tenant
        return self._oauth.tenant_id_of(named) == tenant  # a domain: Entra's public metadata names its tenant

    # -- tenant connections --------------------------------------------------------------------------------------
    def list_tenants(self, owner: str) -> list[Json]:
        accounts = self._accounts.list_accounts(owner)
        return [c.to_public(mailbox_count=sum(1 for a in accounts if a.tenant_connection_id == c.id))
                for c in self._tenants.list_connections(owner)]

    def get_tenant(self, owner: str, connection_id: str) -> Json:
        conn = self._tenants.get_connection(owner, connection_id)
        return conn.to_public(mailbox_count=len(self._access.mailboxes(conn)))

    def delete_tenant(self, owner: str, connection_id: str) -> None:
        """Remove the connection and every mailbox added through it (their subscriptions first)."""
        conn = self._tenants.get_connection(owner, connection_id)
        for acc in self._access.mailboxes(conn):
            self._delete_account(owner, acc.id)
        self._tenants.delete_connection(conn)
        for acc in self._access.mailboxes(conn):  # added while the connection was being deleted
            self._delete_account(owner, acc.id)

    # -- mailboxes -----------------------------------------------------------------------------------------------
    def add_mailbox(self, owner: str, connection_id: str, body: Json) -> tuple[Json, bool]:
        """Add a mailbox of the tenant after proving the application token reaches it; (Account, created)."""
        address = mailbox_address(body.get("address"))
        conn = self._tenants.get_connection(owner, connection_id)
        if conn.status != TENANT_ACTIVE:
            raise ConsentRequiredError("The tenant no longer grants this app its application permissions.",
                                       hint="A tenant administrator must consent again: "
                                            f"{self._oauth.admin_consent_url(conn.tenant_id)}")
        home = f"{address.lower()}.{conn.tenant_id}"  # the mailbox key: Graph's limits count per mailbox
        # One account per owner and mailbox, however many concurrent adds: its id is a keyed MAC of both.
        mac = hmac.new(self._key_ring().derive(ACCOUNT_ID_PURPOSE), f"{owner}\n{home}".encode(), hashlib.sha256)
        account_id = "acc_" + mac.hexdigest()[:24]
        try:
            return self._accounts.get_account(owner, account_id).to_public(), False
        except NotFoundError:
            pass
        roles = self._probe(conn, address, home)
        try:
            acc = self._accounts.create_account(Account(
                owner=owner, id=account_id, home_account_id=home, email=address, display_name=address,
                tenant_id=conn.tenant_id, account_type="work", status=ACTIVE, scopes=roles, connected_at=utcnow(),
                last_refreshed_at=None, access_token_expires_at=None, last_used_at=None, last_error=None,
                access_type=APPLICATION, tenant_connection_id=conn.id))
        except ConflictError:  # a concurrent add of the same mailbox stored it first
            return self._accounts.get_account(owner, account_id).to_public(), False
        acc = self._on_connected(acc, False)  # subscriptions (never raises)
        self._webhooks.emit("account.connected", acc.to_public())
        return acc.to_public(), True

    def _probe(self, conn: TenantConnection, address: str, home: str) -> tuple[str, ...]:
        """Read the mailbox's Inbox id with the tenant's application token; the token's roles when it works."""
        from urllib.parse import quote

        source = TenantToken(self._access, conn.tenant_id, "users/" + quote(address, safe="@."))
        try:
            self._graph.get_json("me/mailFolders/inbox", mailbox=home, token=source, params={"$select": "id"})
            return self._access.token_for(conn.tenant_id).roles
        except ConsentRequiredError as err:
            self._access.consent_lost(conn.owner, conn.id, err)
            raise
        except MicrosoftError as e:
            graph_code = e.microsoft.error if e.microsoft else ""
            if graph_code == "ErrorAccessDenied":
                raise MicrosoftError(f"The app may not reach {address}: the tenant administrator's scope does not "
                                     "include it.", code="mailbox_access_denied", status=409, microsoft=e.microsoft,
                                     hint=SCOPE_HINT) from None
            if graph_code in _NO_MAILBOX:
                raise MicrosoftError(f"The tenant has no Exchange Online mailbox {address}.", code="mailbox_not_found",
                                     status=422, microsoft=e.microsoft,
                                     hint="Check the address: a user, shared or room mailbox of this tenant.") from None
            raise
