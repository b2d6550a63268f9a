"""The connector's operations as plain calls (framework-agnostic core behind the blueprints).

:class:`Connector` is the composition root and the facade: it builds each part once, lazily
(importing ``function_app`` stays cheap), and gives every part what it needs, typed and
keyword-only. Parts never reach back into the connector. Blueprints translate HTTP to these
methods and back; tests and the operator CLI use them directly.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING

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
from shared.errors import ConnectorError, NotFoundError, OAuthError, ReauthRequiredError, to_problem
from shared.storage import (
    ACCOUNTS_TABLE,
    IDEMPOTENCY_TABLE,
    NOTIFICATION_QUEUE,
    REFRESH_INDEX_TABLE,
    REFRESH_QUEUE,
    SEEN_TABLE,
    STATES_TABLE,
    SUBSCRIPTION_INDEX_TABLE,
    SUBSCRIPTIONS_TABLE,
    WEBHOOK_QUEUE,
    Storage,
)

if TYPE_CHECKING:
    import requests

    from shared.auth import CallerAuth
    from shared.graph import GraphClient
    from shared.mail import SendRequest
    from shared.mailbox import MailOps
    from shared.notifications import Notifications
    from shared.oauth import OAuthClient, PendingConnect, TokenResult
    from shared.refresh import Refresher
    from shared.refresh_index import RefreshIndex
    from shared.secret_store import SecretStore
    from shared.telemetry import Telemetry
    from shared.tokens import TokenManager
    from shared.webhooks import Webhooks

log = logging.getLogger("connector")
Json = dict[str, object]


@dataclass(frozen=True)
class CallbackOutcome:
    """Where the callback sends the browser, and what it tells the caller's page."""

    return_url: str | None
    status: str  # "connected" | "error"
    account_id: str | None = None
    code: str | None = None
    message: str | None = None
    hint: str | None = None
    result: str | None = None  # the signed result token (shared.connect_result), on success only


class _IssuedToken:
    """A :class:`shared.graph.TokenSource` for a token Entra just issued (the callback's ``/me``)."""

    def __init__(self, access_token: str) -> None:
        self._token = access_token

    def get(self) -> str:
        return self._token

    def refresh(self, stale: str) -> str:
        raise ReauthRequiredError("Graph rejected a token that was just issued.")


class Connector:
    def __init__(self, settings: Settings, *, storage: Storage | None = None, secrets: SecretStore | None = None,
                 session: requests.Session | None = None) -> None:
        self.settings = settings
        self._given_storage = storage
        self._given_secrets = secrets
        self._given_session = session

    # -- parts (lazy, each built once) --------------------------------------------------------
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
    def accounts(self) -> AccountStore:
        return AccountStore(self.storage.table(ACCOUNTS_TABLE), self.secrets.key_ring,
                            on_unknown_key=self.secrets.invalidate_key_ring)

    @cached_property
    def oauth(self) -> OAuthClient:
        from shared.oauth import OAuthClient

        return OAuthClient(self.settings, secrets_store=self.secrets, session=self.session,
                           states_table=self.storage.table(STATES_TABLE))

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
    def refresh_index(self) -> RefreshIndex:
        from shared.refresh_index import RefreshIndex

        return RefreshIndex(self.storage.table(REFRESH_INDEX_TABLE))

    @cached_property
    def tokens(self) -> TokenManager:
        from shared.tokens import TokenManager

        webhooks = self.webhooks
        return TokenManager(self.accounts, self.oauth, index=self.refresh_index,
                            keepalive=dt.timedelta(days=self.settings.keepalive_days),
                            on_reauth=lambda acc, err: webhooks.emit("account.reauth_required", acc.to_public()),
                            telemetry=self.telemetry,
                            forced_coalesce_s=float(self.settings.forced_refresh_coalesce_seconds))

    @cached_property
    def refresher(self) -> Refresher:
        from shared.refresh import Refresher

        return Refresher(accounts=self.accounts, tokens=self.tokens, index=self.refresh_index,
                         queue=self.storage.queue(REFRESH_QUEUE), telemetry=self.telemetry)

    @cached_property
    def telemetry(self) -> Telemetry:
        """Spans and metrics (shared.telemetry): configured on first use, a no-op when off."""
        from shared.telemetry import get_telemetry

        return get_telemetry(self.settings)

    @cached_property
    def notifications(self) -> Notifications:
        """Inbound mail (SPEC §6a): Graph subscriptions, the notification intake and worker, delta catch-up."""
        from shared.notifications import NotificationConfig, Notifications
        from shared.subscriptions import SubscriptionStore

        return Notifications(NotificationConfig.from_settings(self.settings), graph=self.graph, tokens=self.tokens,
                             accounts=self.accounts,
                             store=SubscriptionStore(self.storage.table(SUBSCRIPTIONS_TABLE), self.secrets.key_ring),
                             index_table=self.storage.table(SUBSCRIPTION_INDEX_TABLE),
                             seen=self.storage.table(SEEN_TABLE),
                             queue=lambda: self.storage.queue(NOTIFICATION_QUEUE), webhooks=self.webhooks,
                             telemetry=self.telemetry)

    @cached_property
    def mail_ops(self) -> MailOps:
        """Reply/forward, organise, find and download (SPEC §3, §4a); listing and downloads live there too."""
        from shared.mailbox import MailOps

        return MailOps(graph=self.graph, tokens=self.tokens, accounts=self.accounts,
                       idempotency=self.storage.table(IDEMPOTENCY_TABLE), key_ring=self.secrets.key_ring,
                       context=self.graph_context())

    @cached_property
    def auth(self) -> CallerAuth:
        from shared.auth import CallerAuth

        return CallerAuth(self.settings, session=self.session)

    # -- callers ------------------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> str:
        return self.auth.authenticate(authorization)

    # -- connect ------------------------------------------------------------------------------
    def start_connect(self, owner: str, *, return_url: str | None, login_hint: str | None = None,
                      domain_hint: str | None = None, prompt: str | None = None,
                      account_id: str | None = None, require_login_hint: bool = False) -> Json:
        from shared.oauth import STATE_MAC_PURPOSE

        if account_id:
            self.accounts.get_account(owner, account_id)  # 404 for an unknown or foreign id
        ring = self.secrets.key_ring()
        return self.oauth.start_connect(
            owner, return_url=return_url, login_hint=login_hint, domain_hint=domain_hint, prompt=prompt,
            account_id=account_id, require_login_hint=require_login_hint,
            seal=lambda data, aad: ring.seal(data, aad=aad), mac_key=ring.derive(STATE_MAC_PURPOSE))

    def complete_connect(self, params: dict[str, str]) -> CallbackOutcome:
        """Consume ``state`` once; redeem the code; store the account. Raises only for a bad state."""
        from shared import connect_result
        from shared.logs import safe

        ring = self.secrets.key_ring()
        state = params.get("state")
        pending = self.oauth.consume_state(
            state, open_sealed=lambda sealed, aad: self.secrets.key_ring(sealed).open(sealed, aad=aad))
        try:
            account = self._store_connection(pending, params)
        except ConnectorError as err:
            log.warning("connect failed for owner's pending flow: %s", safe(err.code, 64))
            return CallbackOutcome(pending.return_url, "error", account_id=pending.account_id, code=err.code,
                                   message=err.detail, hint=err.hint)
        token = connect_result.sign(ring, issuer=self.settings.public_base_url, audience=self.settings.auth_issuer,
                                    owner=pending.owner, account_id=account.id, state=state or "")
        return CallbackOutcome(pending.return_url, "connected", account_id=account.id, result=token)

    def refuse_code_in_url(self, state: str | None) -> None:
        """A code in the callback's URL, though ``response_mode=form_post`` was asked for (RFC 9700 §4.3.1):
        a tampered flow, and the code may sit in history and logs. Its state is burnt, so neither it nor
        the code can be redeemed later, then 400."""
        from shared.errors import ValidationError

        self.oauth.burn_state(state)
        raise ValidationError("code", "The authorization code must arrive by POST (response_mode=form_post), "
                              "not in the URL. Start the connect flow again.")

    def _store_connection(self, pending: PendingConnect, params: dict[str, str]) -> Account:
        result = self.oauth.redeem_code(pending, params)
        if not result.refresh_token:
            raise OAuthError("Microsoft returned no refresh token (offline_access was not granted).",
                             code="no_refresh_token", hint="Consent to offline access when connecting.")
        claims = result.id_token_claims
        tid = str(claims.get("tid") or "")
        home = f"{claims.get('oid') or claims.get('sub') or ''}.{tid}"
        me = self.graph.get_json("me", mailbox=home, token=_IssuedToken(result.access_token),
                                 params={"$select": "id,displayName,mail,userPrincipalName"})
        email = str(me.get("mail") or me.get("userPrincipalName") or claims.get("preferred_username") or "")
        if pending.require_login_hint:
            _check_login_hint(pending.login_hint or "", (me.get("mail"), me.get("userPrincipalName")))
        existing = self._existing_for(pending, home, email)
        record = self._connected_record(pending.owner, existing, result, home=home, tid=tid, email=email,
                                        display_name=str(me.get("displayName") or claims.get("name") or ""))
        if existing:
            saved = self.accounts.update_with(existing, lambda current: record)  # NotFoundError if deleted
            event = "account.recovered" if existing.status == REAUTH_REQUIRED else "account.connected"
        else:
            saved = self.accounts.create_account(record)
            event = "account.connected"
        from shared.refresh_index import bucket_of

        previous = bucket_of(existing.refresh_due_at) if existing and existing.refresh_due_at else None
        self.refresh_index.put(saved, previous_bucket=previous)
        saved = self.notifications.on_connected(saved, reconnected=existing is not None)  # never raises
        self.telemetry.account_status(ACTIVE, event=event.removeprefix("account."))
        self.webhooks.emit(event, saved.to_public())
        return saved

    def _existing_for(self, pending: PendingConnect, home: str, email: str) -> Account | None:
        """The record a connection replaces: the re-connected account, or the same mailbox connected before."""
        if not pending.account_id:
            return self.accounts.find_by_home_account(pending.owner, home)
        try:
            existing = self.accounts.get_account(pending.owner, pending.account_id)
        except NotFoundError:
            raise OAuthError("The account to re-connect no longer exists.", code="account_not_found") from None
        if existing.home_account_id and existing.home_account_id != home:
            raise OAuthError(
                f"You signed in as {email}, but this account is {existing.email}.", code="account_mismatch",
                hint=f"Sign in with {existing.email} to re-connect it, or connect the other mailbox separately.")
        return existing

    def _connected_record(self, owner: str, existing: Account | None, result: TokenResult, *, home: str, tid: str,
                          email: str, display_name: str) -> Account:
        """The new grant's tokens are the newest, so the record replaces whatever a refresher stored."""
        now = utcnow()
        tokens = Tokens(result.access_token, result.refresh_token or "", result.expires_at, result.scopes, now)
        account_id = existing.id if existing else new_account_id()
        return Account(
            owner=owner, id=account_id, home_account_id=home, email=email, display_name=display_name, tenant_id=tid,
            account_type=account_type_for(tid), status=ACTIVE, scopes=result.scopes,
            connected_at=existing.connected_at if existing else now, last_refreshed_at=now,
            access_token_expires_at=result.expires_at, last_used_at=existing.last_used_at if existing else None,
            last_error=None, sealed_tokens=self.accounts.seal_tokens(owner, account_id, tokens),
            refresh_due_at=self.tokens.next_due(tokens, now, active_use=False),
        )

    # -- accounts -----------------------------------------------------------------------------
    def list_accounts(self, owner: str) -> list[Json]:
        return [a.to_public() for a in self.accounts.list_accounts(owner)]

    def get_account(self, owner: str, account_id: str) -> Json:
        return self.accounts.get_account(owner, account_id).to_public()

    def delete_account(self, owner: str, account_id: str) -> None:
        # The Graph subscription goes first, while the grant exists (a refresh may be needed); never raises,
        # so the record (and with it the tokens) is deleted even when Graph could not be reached.
        self.notifications.on_disconnect(self.accounts.get_account(owner, account_id))
        acc = self.accounts.delete_account(owner, account_id)
        self.refresh_index.remove(acc)
        self.telemetry.account_status("disconnected", event="disconnected")
        self.webhooks.emit("account.disconnected", replace(acc, status="disconnected").to_public())

    def refresh_account(self, owner: str, account_id: str) -> Json:
        from shared.tokens import reauth_error

        acc = self.accounts.get_account(owner, account_id)
        if acc.status != ACTIVE:
            raise reauth_error(acc)
        return self.tokens.refresh_requested(acc).to_public()

    # -- mail ---------------------------------------------------------------------------------
    def graph_context(self) -> dict[str, str]:
        """What Graph error hints may mention (the scopes we ask for)."""
        return {"scopes": " ".join(self.oauth.resource_scopes)}

    def send_mail(self, owner: str, account_id: str, request: SendRequest, *, idempotency_key: str | None,
                  body_hash: str) -> dict[str, str | None]:
        from shared.idempotency import run_once
        from shared.send import send
        from shared.tokens import AccountTokenSource

        account = self.accounts.get_account(owner, account_id)

        def action() -> dict[str, str | None]:
            token = AccountTokenSource(self.tokens, account)
            with self._measured_send(request.attachment_bytes):
                result = send(self.graph, token, account.mailbox_key, request, context=self.graph_context())
            self.tokens.note_use(token.account)
            return result

        return run_once(self.storage.table(IDEMPOTENCY_TABLE), owner, account_id, idempotency_key, body_hash, action)

    @contextmanager
    def _measured_send(self, nbytes: int) -> Iterator[None]:
        """``connector.send``: outcome (``sent`` or our error code), size class and duration of one send."""
        started = time.perf_counter()
        outcome = "sent"
        try:
            yield
        except Exception as e:
            outcome = e.code if isinstance(e, ConnectorError) else "internal_error"
            raise
        finally:
            self.telemetry.send(outcome, nbytes=nbytes, seconds=time.perf_counter() - started)

    def mail_get(self, owner: str, account_id: str, path: str, *,
                 params: dict[str, str] | None = None) -> requests.Response:
        """One Graph GET as the account (refresh on 401, limiter, Retry-After), recording active use."""
        from shared.tokens import AccountTokenSource

        account = self.accounts.get_account(owner, account_id)
        token = AccountTokenSource(self.tokens, account)
        resp = self.graph.request("GET", path, mailbox=account.mailbox_key, token=token,
                                  context=self.graph_context(), params=params)
        self.tokens.note_use(token.account)
        return resp

    def get_message(self, owner: str, account_id: str, message_id: str) -> Json:
        from shared import messages as m

        mid = m.check_id(message_id, "messageId")
        msg = self.mail_get(owner, account_id, f"me/messages/{mid}", params={"$select": ",".join(m.DETAIL_FIELDS)})
        atts = self.mail_get(owner, account_id, f"me/messages/{mid}/attachments",
                             params={"$select": "id,name,contentType,size,isInline"})
        return m.map_detail(msg.json(), atts.json().get("value", []))

    def list_folders(self, owner: str, account_id: str) -> Json:
        from shared import messages as m

        resp = self.mail_get(owner, account_id, "me/mailFolders", params={"$top": "100"})
        return {"folders": [m.map_folder(f) for f in resp.json().get("value", [])]}

    def diagnose(self, owner: str, account_id: str) -> Json:
        from shared.diagnose import Diagnosis

        acc = self.accounts.get_account(owner, account_id)
        return Diagnosis(tokens=self.tokens, open_tokens=self.accounts.open_tokens, graph=self.graph,
                         admin_consent_url=self.oauth.admin_consent_url, graph_context=self.graph_context(),
                         notifications=self.notifications.check).run(acc)

    # -- health -------------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, Json]]:
        checks: dict[str, Json] = {}
        for name, fn in (("storage", lambda: self.storage.check()), ("clientSecret", lambda: self.secrets.check()),
                         ("tokenKeys", lambda: self.secrets.key_ring())):
            try:
                fn()
                checks[name] = {"ok": True}
            except Exception as e:
                p = to_problem(e)
                checks[name] = {"ok": False, "code": p.body["code"], "detail": p.body["detail"]}
        try:
            alert = self.oauth.operator_alert
        except ConnectorError:  # storage down: the storage check above already says so
            alert = None
        checks["appRegistration"] = ({"ok": True} if alert is None else
                                     {"ok": False, "code": alert.code, "detail": alert.detail, "hint": alert.hint})
        if alert is None:  # working, but on the previous certificate: the operator has something to do
            checks["appRegistration"].update(self.secrets.client_credential_warning() or {})
        return all(c["ok"] for c in checks.values()), checks


def _check_login_hint(login_hint: str, names: tuple[object, object]) -> None:
    """``requireLoginHint``: the signed-in account's UPN or mail must be ``loginHint``, compared with only
    A-Z folded to a-z. Unicode case folding would let a long s (U+017F) in ``contoso`` or a Kelvin sign (U+212A)
    stand for another address; mailbox domains compare ASCII-case-insensitively (RFC 5321 §2.4).

    The message does not name the account that signed in: the link's owner may not be that person."""
    wanted = ascii_lower(login_hint.strip())
    if any(isinstance(n, str) and ascii_lower(n.strip()) == wanted for n in names):
        return
    raise OAuthError(f"The account that signed in is not {login_hint}, which this connect link is for.",
                     code="account_mismatch",
                     hint=f"Sign in with {login_hint}, or ask for a new connect link for the other mailbox.")


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(value: str) -> str:
    """``value`` with A-Z lowered and every other character (non-ASCII included) left as it is."""
    return value.translate(_ASCII_LOWER)


_lock = threading.Lock()
_connector: Connector | None = None


def get_connector() -> Connector:
    global _connector
    if _connector is None:
        with _lock:
            if _connector is None:
                _connector = Connector(get_settings())
    return _connector
