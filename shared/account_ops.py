"""Account routes: list, get, disconnect, refresh now, diagnose; and the health checks.

:class:`AccountOps` takes its parts keyword-only; the inbound-mail hooks come in as callables, so it never
reaches back into the connector or the notification parts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from shared.accounts import ACTIVE, APPLICATION, Account, AccountStore
from shared.errors import ConnectorError, to_problem

if TYPE_CHECKING:
    from shared.app_credential import AppCredential
    from shared.due_index import DueIndex
    from shared.graph import GraphClient
    from shared.oauth import OAuthClient
    from shared.secret_store import SecretStore
    from shared.storage import Storage
    from shared.telemetry import Telemetry
    from shared.tokens import TokenManager
    from shared.webhooks import Webhooks

Json = dict[str, object]
NotificationCheck = Callable[[Account], tuple[bool, str, str | None]]


class AccountOps:
    def __init__(self, *, accounts: AccountStore, tokens: TokenManager, index: DueIndex, graph: GraphClient,
                 oauth: OAuthClient, graph_context: dict[str, str], on_disconnect: Callable[[Account], None],
                 notification_check: NotificationCheck, telemetry: Telemetry, webhooks: Webhooks,
                 forced_coalesce_s: float = 10.0) -> None:
        """``forced_coalesce_s``: a refresh asked for within this long of the last one this instance ran for the
        account answers that refresh's result: a burst of them costs one grant (and one rotation of the
        refresh token), not one each. 0: off."""
        self._accounts = accounts
        self._tokens = tokens
        self._index = index
        self._graph = graph
        self._oauth = oauth
        self._graph_context = graph_context
        self._on_disconnect = on_disconnect
        self._notification_check = notification_check
        self._telemetry = telemetry
        self._webhooks = webhooks
        self._forced_coalesce_s = forced_coalesce_s
        self._forced_at: dict[str, float] = {}  # account id → monotonic time of its last forced refresh here
        self._forced_lock = threading.Lock()

    def list_accounts(self, owner: str) -> list[Json]:
        return [a.to_public() for a in self._accounts.list_accounts(owner)]

    def get_account(self, owner: str, account_id: str) -> Json:
        return self._accounts.get_account(owner, account_id).to_public()

    def delete_account(self, owner: str, account_id: str) -> None:
        # The Graph subscriptions go first, while the grant exists (a refresh may be needed); the hook never
        # raises, so the record (and with it the tokens) is deleted even when Graph could not be reached.
        self._on_disconnect(self._accounts.get_account(owner, account_id))
        acc = self._accounts.delete_account(owner, account_id)
        self._index.remove(acc)
        self._telemetry.account_status("disconnected", event="disconnected")
        self._webhooks.emit("account.disconnected", replace(acc, status="disconnected").to_public())

    def refresh_account(self, owner: str, account_id: str) -> Json:
        from shared.tokens import reauth_error

        acc = self._accounts.get_account(owner, account_id)
        if acc.status != ACTIVE:
            raise reauth_error(acc)
        if acc.access_type == APPLICATION:  # no grant of its own: prove the tenant's application token
            self._tokens.application_token(acc)
            return acc.to_public()
        with self._forced_lock:
            at = self._forced_at.get(account_id)
        if at is not None and time.monotonic() - at < self._forced_coalesce_s:
            return acc.to_public()  # the tokens that refresh stored, seconds old
        # Concurrent requests read the same access token: the first one's refresh replaces it, and the others
        # (waiting on the account's lock or another instance's lease) take that result instead of a new grant.
        stale = self._accounts.open_tokens(acc).access_token
        saved = self._tokens.refresh(owner, account_id, force=True, account=acc, stale_access_token=stale)
        with self._forced_lock:
            if len(self._forced_at) > 10_000:
                self._forced_at.clear()
            self._forced_at[account_id] = time.monotonic()
        return saved.to_public()

    def diagnose(self, owner: str, account_id: str, *, probe: str | None = None) -> Json:
        """``probe`` (team mailboxes): a mailbox of the tenant that was not added; by default one of the owner's
        signed-in mailboxes of that tenant, if any."""
        from shared.diagnose import Diagnosis

        acc = self._accounts.get_account(owner, account_id)
        if acc.access_type == APPLICATION and probe is None:
            probe = next((a.email for a in self._accounts.list_accounts(owner) if a.tenant_id == acc.tenant_id
                          and a.access_type != APPLICATION and a.email.lower() != acc.email.lower()), None)
        return Diagnosis(tokens=self._tokens, open_tokens=self._accounts.open_tokens, graph=self._graph,
                         admin_consent_url=self._oauth.admin_consent_url, graph_context=self._graph_context,
                         notifications=self._notification_check).run(acc, probe=probe)


def health_checks(*, storage: Callable[[], Storage], secrets: Callable[[], SecretStore],
                  credential: Callable[[], AppCredential],
                  oauth: Callable[[], OAuthClient]) -> tuple[bool, dict[str, Json]]:
    """``GET /api/health``: storage, the app's credential, the key ring, and what Entra last said of the app.
    Each part is got inside its check, so one that cannot be built fails that check only."""
    checks: dict[str, Json] = {}
    for name, fn in (("storage", lambda: storage().check()), ("clientSecret", lambda: credential().check()),
                     ("tokenKeys", lambda: secrets().key_ring())):
        try:
            fn()
            checks[name] = {"ok": True}
        except Exception as e:
            p = to_problem(e)
            checks[name] = {"ok": False, "code": p.body["code"], "detail": p.body["detail"]}
    try:
        alert = oauth().operator_alert
    except ConnectorError:  # storage down: the storage check above already says so
        alert = None
    checks["appRegistration"] = ({"ok": True} if alert is None else
                                 {"ok": False, "code": alert.code, "detail": alert.detail, "hint": alert.hint})
    if alert is None:  # working, but on the previous certificate: the operator has something to do
        try:
            checks["appRegistration"].update(credential().warning() or {})
        except ConnectorError:
            pass  # the credential check above says why
    return all(c["ok"] for c in checks.values()), checks
