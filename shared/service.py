"""The composition root: :class:`Connector` builds each part once, lazily (importing ``function_app`` stays
cheap), and gives every part what it needs, typed and keyword-only. It runs no protocol itself: a blueprint
takes the part it needs (``connect``, ``mail``, ``account_ops``, ``notifications.intake`` …) and calls it,
one hop; parts never reach back into the connector. Tests and the operator CLI use the parts directly.
"""

from __future__ import annotations

import datetime as dt
import threading
from functools import cached_property
from typing import TYPE_CHECKING

from shared.accounts import AccountStore
from shared.config import Settings, get_settings
from shared.storage import (
    ACCOUNTS_TABLE,
    IDEMPOTENCY_TABLE,
    REFRESH_INDEX_TABLE,
    REFRESH_QUEUE,
    STATES_TABLE,
    WEBHOOK_QUEUE,
    Storage,
)

if TYPE_CHECKING:
    import requests

    from shared.account_ops import AccountOps
    from shared.app_credential import AppCredential
    from shared.auth import CallerAuth
    from shared.connect_flow import ConnectFlow, ConnectIdentity
    from shared.due_index import DueIndex
    from shared.graph import GraphClient
    from shared.mailbox import MailOps
    from shared.notification_parts import NotificationParts
    from shared.oauth import OAuthClient
    from shared.refresh import Refresher
    from shared.secret_store import SecretStore
    from shared.sent_marks import SentMarks
    from shared.team_mailboxes import TeamMailboxes
    from shared.telemetry import Telemetry
    from shared.tenant_access import TenantAccess
    from shared.tokens import TokenManager
    from shared.webhooks import Webhooks


class Connector:
    def __init__(self, settings: Settings, *, storage: Storage | None = None, secrets: SecretStore | None = None,
                 session: requests.Session | None = None) -> None:
        self.settings = settings
        self._given_storage = storage
        self._given_secrets = secrets
        self._given_session = session

    # -- infrastructure ---------------------------------------------------------------------
    @cached_property
    def storage(self) -> Storage:
        s = self._given_storage or Storage(self.settings)
        s.ensure()
        return s

    @cached_property
    def secrets(self) -> SecretStore:
        from shared.secret_store import SecretStore

        return self._given_secrets or SecretStore(self.settings)

    @cached_property
    def session(self) -> requests.Session:
        from shared._http import new_session

        return self._given_session or new_session(self.settings.ca_bundle, pool_size=64)

    @cached_property
    def app_credential(self) -> AppCredential:
        """The app's own credential towards Entra (MS_CLIENT_CREDENTIAL), chosen over the secret store."""
        from shared.app_credential import AppCredential

        return AppCredential(self.settings, vault=self.secrets)

    @cached_property
    def telemetry(self) -> Telemetry:
        """Spans and metrics (shared.telemetry): configured on first use, a no-op when off."""
        from shared.telemetry import get_telemetry

        return get_telemetry(self.settings)

    # -- core parts -----------------------------------------------------------------------------
    @cached_property
    def accounts(self) -> AccountStore:
        return AccountStore(self.storage.table(ACCOUNTS_TABLE), self.secrets.key_ring,
                            on_unknown_key=self.secrets.invalidate_key_ring)

    @cached_property
    def oauth(self) -> OAuthClient:
        from shared.oauth import OAuthClient

        token_http = None
        if self._given_session is None:  # a session given (tests, tools) carries MSAL's requests too
            from shared._http import ca_bundle_path
            from shared._token_http import TokenHttpClient

            token_http = TokenHttpClient(ca_file=ca_bundle_path(self.settings.ca_bundle))
        return OAuthClient(self.settings, credentials=self.app_credential, session=self.session,
                           states_table=self.storage.table(STATES_TABLE), token_http=token_http)

    @cached_property
    def graph(self) -> GraphClient:
        from shared.graph import GraphClient

        return GraphClient(self.settings.graph_base_url, self.session, telemetry=self.telemetry)

    @cached_property
    def webhooks(self) -> Webhooks:
        from shared.webhooks import Webhooks

        # The HMAC secret is read per delivery (Key Vault, TTL cache), never at start-up.
        return Webhooks(self.settings.webhook_url, self.secrets.webhook_secret,
                        queue=lambda: self.storage.queue(WEBHOOK_QUEUE), session=self.session,
                        telemetry=self.telemetry)

    @cached_property
    def refresh_index(self) -> DueIndex:
        from shared.due_index import DueIndex

        return DueIndex(self.storage.table(REFRESH_INDEX_TABLE))

    @cached_property
    def tokens(self) -> TokenManager:
        from shared.tokens import TokenManager

        webhooks = self.webhooks
        return TokenManager(self.accounts, self.oauth, index=self.refresh_index,
                            keepalive=dt.timedelta(days=self.settings.keepalive_days),
                            on_reauth=lambda acc, err: webhooks.emit("account.reauth_required", acc.to_public()),
                            telemetry=self.telemetry, app_tokens=self.tenant_access)

    @cached_property
    def tenant_access(self) -> TenantAccess:
        """Team mailboxes' application tokens (in memory) and their tenants' consent state."""
        from shared.storage import TENANTS_TABLE
        from shared.tenant_access import TenantAccess
        from shared.tenants import TenantStore

        return TenantAccess(oauth=self.oauth, tenants=TenantStore(self.storage.table(TENANTS_TABLE)),
                            accounts=self.accounts, webhooks=self.webhooks)

    @cached_property
    def refresher(self) -> Refresher:
        from shared.refresh import Refresher

        return Refresher(accounts=self.accounts, tokens=self.tokens, index=self.refresh_index,
                         queue=self.storage.queue(REFRESH_QUEUE), telemetry=self.telemetry)

    @cached_property
    def auth(self) -> CallerAuth:
        from shared.auth import CallerAuth

        return CallerAuth(self.settings, session=self.session)

    @property
    def graph_context(self) -> dict[str, str]:
        """What Graph error hints may mention (the scopes we ask for)."""
        return {"scopes": " ".join(self.oauth.resource_scopes)}

    # -- what the blueprints call ----------------------------------------------------------------
    @cached_property
    def connect(self) -> ConnectFlow:
        """Connect and callback."""
        from shared.connect_flow import ConnectFlow

        tokens, lifecycle = self.tokens, self.notifications.subscriptions
        return ConnectFlow(
            identity=self.connect_identity, oauth=self.oauth, key_ring=self.secrets.key_ring, accounts=self.accounts,
            graph=self.graph, index=self.refresh_index, claims=self.storage.table(STATES_TABLE),
            next_due=lambda t, now: tokens.next_due(t, now, active_use=False),
            on_connected=lambda acc, reconnected: lifecycle.on_connected(acc, reconnected=reconnected),
            webhooks=self.webhooks, telemetry=self.telemetry, admin_consent=self.team_mailboxes.complete)

    @property
    def connect_identity(self) -> ConnectIdentity:
        """Who signs the callback's ``result`` and for whom (connect and admin consent alike)."""
        from shared.connect_flow import ConnectIdentity

        return ConnectIdentity(issuer=self.settings.public_base_url, audience=self.settings.auth_issuer)

    @cached_property
    def team_mailboxes(self) -> TeamMailboxes:
        """Admin consent, tenant connections, and the team mailboxes added through them."""
        from shared.storage import TENANTS_TABLE
        from shared.team_mailboxes import TeamMailboxes
        from shared.tenants import TenantStore

        lifecycle = self.notifications.subscriptions
        return TeamMailboxes(
            oauth=self.oauth, key_ring=self.secrets.key_ring,
            identity=self.connect_identity,
            tenants=TenantStore(self.storage.table(TENANTS_TABLE)), access=self.tenant_access, accounts=self.accounts,
            graph=self.graph, app_roles=self.settings.app_roles,
            on_connected=lambda acc, reconnected: lifecycle.on_connected(acc, reconnected=reconnected),
            delete_account=self.account_ops.delete_account, webhooks=self.webhooks)

    @cached_property
    def mail(self) -> MailOps:
        """Everything done as an account: send, answer, organise, find, read, download."""
        from shared.mailbox import MailOps

        return MailOps(graph=self.graph, tokens=self.tokens, accounts=self.accounts,
                       idempotency=self.storage.table(IDEMPOTENCY_TABLE), key_ring=self.secrets.key_ring,
                       context=self.graph_context, telemetry=self.telemetry, sent_marks=self.sent_marks)

    @cached_property
    def sent_marks(self) -> SentMarks | None:
        """What the API sent, by Sent Items id: only with rich notifications and message.sent (shared.sent_marks)."""
        from shared.sent_marks import SentMarks
        from shared.storage import SEEN_TABLE

        on = self.settings.notifications_on and self.settings.notifications_resource_data
        return SentMarks(self.storage.table(SEEN_TABLE)) if on and "message.sent" in self.settings.mail_events else None

    @cached_property
    def account_ops(self) -> AccountOps:
        """List, get, disconnect, refresh now, diagnose."""
        from shared.account_ops import AccountOps

        return AccountOps(accounts=self.accounts, tokens=self.tokens, index=self.refresh_index, graph=self.graph,
                          oauth=self.oauth, graph_context=self.graph_context,
                          on_disconnect=self.notifications.subscriptions.on_disconnect,
                          notification_check=self.notifications.subscriptions.check,
                          telemetry=self.telemetry, webhooks=self.webhooks,
                          forced_coalesce_s=float(self.settings.forced_refresh_coalesce_seconds))

    def health(self) -> tuple[bool, dict[str, dict[str, object]]]:
        from shared.account_ops import health_checks

        # Parts are built inside each check: storage that cannot be reached on first use is a failed check,
        # not an exception instead of the report.
        return health_checks(storage=lambda: self.storage, secrets=lambda: self.secrets,
                             credential=lambda: self.app_credential, oauth=lambda: self.oauth)

    def cleanup(self) -> dict[str, int]:
        """The clean-up timer: expired OAuth states (and mailbox claims) and idempotency records."""
        from shared.refresh import cleanup

        return cleanup(states=self.storage.table(STATES_TABLE), idempotency=self.storage.table(IDEMPOTENCY_TABLE))

    # -- inbound mail -------------------------------------------------------------------
    @cached_property
    def notifications(self) -> NotificationParts:
        """The intake, worker, subscriptions and delivery of inbound mail (shared.notification_parts)."""
        from shared.notification_parts import NotificationParts
        from shared.rich_notifications import LocalCertificate, NotificationCertificates

        name = self.settings.notification_cert_name
        if self.settings.key_vault_url:  # Key Vault NOTIFICATION_CERT_NAME, every version
            certificates = NotificationCertificates(newest=lambda: self.secrets.newest_certificate(name),
                                                    version=lambda v: self.secrets.certificate_version(name, v))
        else:  # locally: NOTIFICATION_CERT_PATH
            local = LocalCertificate(self.settings.notification_cert_path)
            certificates = NotificationCertificates(newest=local.newest, version=local.version)
        return NotificationParts(self.settings, storage=self.storage, key_ring=self.secrets.key_ring,
                                 graph=self.graph, tokens=self.tokens, accounts=self.accounts,
                                 webhooks=self.webhooks, telemetry=self.telemetry, certificates=certificates,
                                 session=self.session, sent_marks=self.sent_marks)


_lock = threading.Lock()
_connector: Connector | None = None


def get_connector() -> Connector:
    global _connector
    if _connector is None:
        with _lock:
            if _connector is None:
                _connector = Connector(get_settings())
    return _connector
