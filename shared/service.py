"""The connector's operations as plain calls (framework-agnostic core behind the blueprints).

:func:`get_connector` builds one :class:`Connector` per process from the settings; everything
is created lazily so importing ``function_app`` stays cheap. Blueprints translate HTTP to these
methods and back; tests and the operator CLI use them directly.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

from shared.accounts import (
    ACTIVE,
    REAUTH_REQUIRED,
    Account,
    AccountStore,
    Tokens,
    account_type_for,
    new_account_id,
    utcnow,
)
from shared.config import Settings, get_settings
from shared.errors import (
    ConflictError,
    ConnectorError,
    NotFoundError,
    OAuthError,
    ReauthRequiredError,
    to_problem,
)
from shared.storage import ACCOUNTS_TABLE, STATES_TABLE, WEBHOOK_QUEUE, Storage

log = logging.getLogger("connector")


@dataclass(frozen=True)
class CallbackOutcome:
    """Where the callback sends the browser, and what it tells the caller's page."""

    return_url: str | None
    status: str  # "connected" | "error"
    account_id: str | None = None
    code: str | None = None
    message: str | None = None
    hint: str | None = None


class Connector:
    def __init__(self, settings: Settings, *, storage: Storage | None = None, secrets: Any = None,
                 session: Any = None) -> None:
        self.settings = settings
        self._storage = storage
        self._secrets = secrets
        self._session = session

    # -- parts (lazy) -------------------------------------------------------------------------
    @cached_property
    def storage(self) -> Storage:
        s = self._storage or Storage(self.settings)
        s.ensure()
        return s

    @cached_property
    def secrets(self) -> Any:
        if self._secrets is None:
            from shared.secret_store import SecretStore

            self._secrets = SecretStore(self.settings)
        return self._secrets

    @cached_property
    def session(self) -> Any:
        if self._session is None:
            from shared._http import new_session

            self._session = new_session(self.settings.ca_bundle, pool_size=64)
        return self._session

    @cached_property
    def accounts(self) -> AccountStore:
        return AccountStore(self.storage.table(ACCOUNTS_TABLE), self.secrets.key_ring,
                            on_unknown_key=self.secrets.invalidate_key_ring)

    @cached_property
    def oauth(self) -> Any:
        from shared.oauth import OAuthClient

        return OAuthClient(self.settings, secrets_store=self.secrets, session=self.session,
                           states_table=self.storage.table(STATES_TABLE))

    @cached_property
    def graph(self) -> Any:
        from shared.graph import GraphClient

        return GraphClient(self.settings.graph_base_url, self.session)

    @cached_property
    def webhooks(self) -> Any:
        from shared.webhooks import Webhooks

        return Webhooks(self.settings.webhook_url, self.settings.webhook_secret,
                        queue=lambda: self.storage.queue(WEBHOOK_QUEUE), session=self.session)

    @cached_property
    def tokens(self) -> Any:
        from shared.tokens import TokenManager

        return TokenManager(self.accounts, self.oauth, keepalive=dt.timedelta(days=self.settings.keepalive_days),
                            on_reauth=lambda acc, err: self.webhooks.emit("account.reauth_required", acc.to_public()),
                            on_refreshed=self._index_refresh)

    @cached_property
    def auth(self) -> Any:
        from shared.auth import CallerAuth

        return CallerAuth(self.settings, session=self.session)

    def _index_refresh(self, account: Account, previous_due: dt.datetime | None = None) -> None:
        """Keep the refresh due-time index in step with the account (see shared.refresh)."""
        from shared.refresh import index_account

        index_account(self, account, previous_due=previous_due)

    # -- callers ------------------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> str:
        owner: str = self.auth.authenticate(authorization)
        return owner

    # -- connect ------------------------------------------------------------------------------
    def start_connect(self, owner: str, *, return_url: str | None, login_hint: str | None = None,
                      domain_hint: str | None = None, prompt: str | None = None,
                      account_id: str | None = None) -> dict[str, Any]:
        if account_id:
            self.accounts.get_account(owner, account_id)  # 404 for an unknown or foreign id
        ring = self.secrets.key_ring()
        result: dict[str, Any] = self.oauth.start_connect(
            owner, return_url=return_url, login_hint=login_hint, domain_hint=domain_hint, prompt=prompt,
            account_id=account_id, seal=lambda data, aad: ring.seal(data, aad=aad))
        return result

    def complete_connect(self, params: dict[str, str]) -> CallbackOutcome:
        """Consume ``state`` once; redeem the code; store the account. Raises only for a bad state."""
        ring = self.secrets.key_ring()
        pending = self.oauth.consume_state(params.get("state"),
                                           open_sealed=lambda sealed, aad: ring.open(sealed, aad=aad))
        try:
            account = self._store_connection(pending, params)
        except ConnectorError as err:
            log.warning("connect failed for owner's pending flow: %s", err.code)
            return CallbackOutcome(pending.return_url, "error", account_id=pending.account_id, code=err.code,
                                   message=err.detail, hint=err.hint)
        return CallbackOutcome(pending.return_url, "connected", account_id=account.id)

    def _store_connection(self, pending: Any, params: dict[str, str]) -> Account:
        result = self.oauth.redeem_code(pending, params)
        if not result.refresh_token:
            raise OAuthError("Microsoft returned no refresh token (offline_access was not granted).",
                             code="no_refresh_token", hint="Consent to offline access when connecting.")
        claims = result.id_token_claims
        tid = str(claims.get("tid") or "")
        oid = str(claims.get("oid") or claims.get("sub") or "")
        home = f"{oid}.{tid}"
        me = self._read_me(result.access_token, mailbox=home)
        email = me.get("mail") or me.get("userPrincipalName") or claims.get("preferred_username") or ""
        now = utcnow()
        tokens = Tokens(result.access_token, result.refresh_token, result.expires_at, result.scopes, now)
        owner = pending.owner
        existing: Account | None = None
        if pending.account_id:
            try:
                existing = self.accounts.get_account(owner, pending.account_id)
            except NotFoundError:
                raise OAuthError("The account to re-connect no longer exists.", code="account_not_found") from None
            if existing.home_account_id and existing.home_account_id != home:
                raise OAuthError(
                    f"You signed in as {email}, but this account is {existing.email}.", code="account_mismatch",
                    hint=f"Sign in with {existing.email} to re-connect it, or connect the other mailbox separately.")
        else:
            existing = self.accounts.find_by_home_account(owner, home)
        account_id = existing.id if existing else new_account_id()
        record = Account(
            owner=owner, id=account_id, home_account_id=home, email=email,
            display_name=me.get("displayName") or claims.get("name") or "", tenant_id=tid,
            account_type=account_type_for(tid), status=ACTIVE, scopes=result.scopes,
            connected_at=existing.connected_at if existing else now, last_refreshed_at=now,
            access_token_expires_at=result.expires_at, last_used_at=existing.last_used_at if existing else None,
            last_error=None, sealed_tokens=self.accounts.seal_tokens(owner, account_id, tokens),
            refresh_due_at=self.tokens.next_due(tokens, now, active_use=False),
        )
        if existing:
            saved = self._replace_connection(record, existing)
            event = "account.recovered" if existing.status == REAUTH_REQUIRED else "account.connected"
        else:
            saved = self.accounts.create_account(record)
            event = "account.connected"
        self._index_refresh(saved, existing.refresh_due_at if existing else None)
        self.webhooks.emit(event, saved.to_public())
        return saved

    def _replace_connection(self, record: Account, existing: Account) -> Account:
        """Store a re-connection over the existing record, conditional on its ETag.

        The new grant's tokens are the newest, so a concurrent refresh loses to them; but a record
        deleted meanwhile (the user disconnected) is not brought back.
        """
        current = existing
        for _ in range(5):
            try:
                return self.accounts.update_account(replace(record, etag=None), etag=current.etag)
            except ConflictError:
                current = self.accounts.get_account(record.owner, record.id)  # NotFoundError if deleted
        raise ConflictError("The account kept changing while it was re-connected.", hint="Connect again.")

    def _read_me(self, access_token: str, *, mailbox: str) -> dict[str, Any]:
        class _Fixed:
            def get(self) -> str:
                return access_token

            def refresh(self, stale: str) -> str:
                raise ReauthRequiredError("Graph rejected a token that was just issued.")

        me: dict[str, Any] = self.graph.get_json("me", mailbox=mailbox, token=_Fixed(),
                                                  params={"$select": "id,displayName,mail,userPrincipalName"})
        return me

    # -- accounts -----------------------------------------------------------------------------
    def list_accounts(self, owner: str) -> list[dict[str, Any]]:
        return [a.to_public() for a in self.accounts.list_accounts(owner)]

    def get_account(self, owner: str, account_id: str) -> dict[str, Any]:
        return self.accounts.get_account(owner, account_id).to_public()

    def delete_account(self, owner: str, account_id: str) -> None:
        acc = self.accounts.delete_account(owner, account_id)
        from shared.refresh import unindex_account

        unindex_account(self, acc)
        self.webhooks.emit("account.disconnected", replace(acc, status="disconnected").to_public())

    def refresh_account(self, owner: str, account_id: str) -> dict[str, Any]:
        acc = self.accounts.get_account(owner, account_id)
        if acc.status != ACTIVE:
            from shared.tokens import _reauth_error

            raise _reauth_error(acc)
        return self.tokens.refresh(owner, account_id, force=True, account=acc).to_public()

    # -- mail ---------------------------------------------------------------------------------
    def _token_source(self, account: Account) -> Any:
        from shared.tokens import AccountTokenSource

        return AccountTokenSource(self.tokens, account)

    def _graph_context(self) -> dict[str, Any]:
        return {"scopes": " ".join(self.oauth.resource_scopes)}

    def send_mail(self, owner: str, account_id: str, request: Any, *, idempotency_key: str | None,
                  body_hash: str) -> dict[str, Any]:
        from shared.idempotency import run_once
        from shared.send import send
        from shared.storage import IDEMPOTENCY_TABLE

        account = self.accounts.get_account(owner, account_id)

        def action() -> dict[str, Any]:
            token = self._token_source(account)
            result = send(self.graph, token, account.mailbox_key, request, context=self._graph_context())
            self.accounts.touch_last_used(token.account, utcnow())
            return result

        return run_once(self.storage.table(IDEMPOTENCY_TABLE), owner, account_id, idempotency_key, body_hash, action)

    def _mail_call(self, owner: str, account_id: str, path: str, **kw: Any) -> tuple[Any, Account]:
        account = self.accounts.get_account(owner, account_id)
        token = self._token_source(account)
        resp = self.graph.request("GET", path, mailbox=account.mailbox_key, token=token, context=self._graph_context(), **kw)
        self.accounts.touch_last_used(token.account, utcnow())
        return resp, token.account

    def list_messages(self, owner: str, account_id: str, *, folder: str | None, top: int, cursor: str | None,
                      unread_only: bool) -> dict[str, Any]:
        from shared import messages as m

        ring = self.secrets.key_ring()
        if cursor:
            path, params = m.open_cursor(ring, owner, account_id, cursor), None
        else:
            path = f"me/mailFolders/{m.folder_segment(folder)}/messages"
            params = {"$top": str(top), "$select": ",".join(m.LIST_FIELDS), "$orderby": "receivedDateTime desc"}
            if unread_only:
                params["$filter"] = "isRead eq false"
        resp, _ = self._mail_call(owner, account_id, path, params=params)
        body = resp.json()
        next_link = body.get("@odata.nextLink")
        return {"messages": [m.map_summary(x) for x in body.get("value", [])],
                "nextCursor": m.seal_cursor(ring, owner, account_id, next_link) if next_link else None}

    def get_message(self, owner: str, account_id: str, message_id: str) -> dict[str, Any]:
        from shared import messages as m

        mid = m.check_id(message_id, "messageId")
        msg, _ = self._mail_call(owner, account_id, f"me/messages/{mid}",
                                 params={"$select": ",".join(m.DETAIL_FIELDS)})
        atts, _ = self._mail_call(owner, account_id, f"me/messages/{mid}/attachments",
                                  params={"$select": "id,name,contentType,size,isInline"})
        return m.map_detail(msg.json(), atts.json().get("value", []))

    def get_attachment(self, owner: str, account_id: str, message_id: str,
                       attachment_id: str) -> tuple[bytes, str, str]:
        from shared import messages as m

        mid = m.check_id(message_id, "messageId")
        aid = m.check_id(attachment_id, "attachmentId")
        meta, _ = self._mail_call(owner, account_id, f"me/messages/{mid}/attachments/{aid}",
                                  params={"$select": "id,name,contentType,size"})
        info = meta.json()
        raw, _ = self._mail_call(owner, account_id, f"me/messages/{mid}/attachments/{aid}/$value")
        return raw.content, str(info.get("contentType") or "application/octet-stream"), str(info.get("name") or "")

    def list_folders(self, owner: str, account_id: str) -> dict[str, Any]:
        from shared import messages as m

        resp, _ = self._mail_call(owner, account_id, "me/mailFolders", params={"$top": "100"})
        return {"folders": [m.map_folder(f) for f in resp.json().get("value", [])]}

    def diagnose(self, owner: str, account_id: str) -> dict[str, Any]:
        from shared.diagnose import run_diagnosis

        return run_diagnosis(self, owner, account_id)

    # -- health -------------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {}
        for name, fn in (("storage", lambda: self.storage.check()), ("clientSecret", lambda: self.secrets.check()),
                         ("tokenKeys", lambda: self.secrets.key_ring())):
            try:
                fn()
                checks[name] = {"ok": True}
            except Exception as e:
                p = to_problem(e)
                checks[name] = {"ok": False, "code": p.body["code"], "detail": p.body["detail"]}
        alert = self.oauth.operator_alert if "oauth" in self.__dict__ else None
        checks["appRegistration"] = ({"ok": True} if alert is None else
                                     {"ok": False, "code": alert.code, "detail": alert.detail, "hint": alert.hint})
        return all(c["ok"] for c in checks.values()), checks


_lock = threading.Lock()
_connector: Connector | None = None


def get_connector() -> Connector:
    global _connector
    if _connector is None:
        with _lock:
            if _connector is None:
                _connector = Connector(get_settings())
    return _connector
