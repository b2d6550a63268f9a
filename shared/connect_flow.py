"""Connecting a mailbox: start the flow, complete it at the callback.

:class:`ConnectFlow` takes its parts keyword-only and never reaches back into the connector that built it.
Completing a connect consumes the ``state`` once (:mod:`shared.oauth`), redeems the code with the PKCE
verifier, reads ``/me`` with the token Entra just issued, and stores the account: a new one, the one
being re-connected (``accountId``), or the record of the same mailbox connected before. Concurrent
callbacks of one mailbox for one owner store one account: the first claims the mailbox (a row keyed by a
MAC of owner and home account), the others wait for it and then update what it stored.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.accounts import (
    ACTIVE,
    REAUTH_REQUIRED,
    Account,
    AccountStore,
    Tokens,
    account_type_for,
    iso,
    new_account_id,
    parse_iso,
    utcnow,
)
from shared.errors import ConflictError, ConnectorError, NotFoundError, OAuthError, ReauthRequiredError, ValidationError

if TYPE_CHECKING:
    from shared.crypto import RingSource
    from shared.due_index import DueIndex
    from shared.graph import GraphClient
    from shared.oauth import OAuthClient, PendingConnect, TokenResult
    from shared.storage import Row, Table
    from shared.telemetry import Telemetry
    from shared.webhooks import Webhooks

log = logging.getLogger("connector.connect")
Json = dict[str, object]
#: A mailbox claim not released by then was abandoned (the callback's process died).
MAILBOX_CLAIM_STALE = dt.timedelta(seconds=30)
MAILBOX_CLAIM_WAIT_S = 20.0
MAILBOX_CLAIM_PURPOSE = "connect-mailbox-claim/v1"


@dataclass(frozen=True)
class CallbackOutcome:
    """Where the callback sends the browser, and what it tells the caller's page."""

    return_url: str | None
    status: str  # "connected" | "error" | "continue" (on to ``next_url``: admin consent's second leg)
    account_id: str | None = None
    code: str | None = None
    message: str | None = None
    hint: str | None = None
    result: str | None = None  # the signed result token (shared.connect_result), on success only
    tenant_connection_id: str | None = None  # admin consent (shared.team_mailboxes)
    next_url: str | None = None  # "continue": where the browser goes next (Entra's admin-consent page)


@dataclass(frozen=True)
class ConnectIdentity:
    """Who the connector is to the integrator: the ``result`` token's issuer and audience."""

    issuer: str  # PUBLIC_BASE_URL
    audience: str  # AUTH_ISSUER: the integrator's own caller-JWT issuer


class _IssuedToken:
    """A :class:`shared.graph.TokenSource` for a token Entra just issued (the callback's ``/me``)."""

    root = "me"

    def __init__(self, access_token: str) -> None:
        self._token = access_token

    def get(self) -> str:
        return self._token

    def refresh(self, stale: str) -> str:
        raise ReauthRequiredError("Graph rejected a token that was just issued.")


class ConnectFlow:
    def __init__(self, *, identity: ConnectIdentity, oauth: OAuthClient, key_ring: RingSource,
                 accounts: AccountStore, graph: GraphClient, index: DueIndex, claims: Table,
                 next_due: Callable[[Tokens, dt.datetime], dt.datetime],
                 on_connected: Callable[[Account, bool], Account], webhooks: Webhooks,
                 telemetry: Telemetry,
                 admin_consent: Callable[[PendingConnect, dict[str, str], str], CallbackOutcome] | None = None) -> None:
        """``key_ring(sealed=None)``: the token key ring (re-read once for a value sealed under an unknown key).
        ``next_due(tokens, now)``: the refresh due time of fresh tokens. ``on_connected(account, reconnected)``:
        the inbound-mail hook (never raises). ``claims``: the table of mailbox claims (the OAuth states').
        ``admin_consent(pending, params, state)``: completes the callback of an admin-consent state."""
        self._admin_consent = admin_consent
        self._identity = identity
        self._oauth = oauth
        self._key_ring = key_ring
        self._accounts = accounts
        self._graph = graph
        self._index = index
        self._claims = claims
        self._next_due = next_due
        self._on_connected = on_connected
        self._webhooks = webhooks
        self._telemetry = telemetry

    def start(self, owner: str, *, return_url: str | None, login_hint: str | None = None,
              domain_hint: str | None = None, prompt: str | None = None, account_id: str | None = None,
              require_login_hint: bool = False) -> dict[str, str]:
        from shared.oauth import STATE_MAC_PURPOSE

        if account_id:
            self._accounts.get_account(owner, account_id)  # 404 for an unknown or foreign id
        ring = self._key_ring()
        return self._oauth.start_connect(
            owner, return_url=return_url, login_hint=login_hint, domain_hint=domain_hint, prompt=prompt,
            account_id=account_id, require_login_hint=require_login_hint,
            seal=lambda data, aad: ring.seal(data, aad=aad), mac_key=ring.derive(STATE_MAC_PURPOSE))

    def refuse_code_in_url(self, state: str | None) -> None:
        """A code in the callback's URL, though ``response_mode=form_post`` was asked for (RFC 9700 §4.3.1):
        a tampered flow, and the code may sit in history and logs. Its state is burnt, so neither it nor
        the code can be redeemed later, then 400."""
        self._oauth.burn_state(state)
        raise ValidationError("code", "The authorization code must arrive by POST (response_mode=form_post), "
                              "not in the URL. Start the connect flow again.")

    def complete(self, params: dict[str, str]) -> CallbackOutcome:
        """Consume ``state`` once; redeem the code; store the account. Raises only for a bad state."""
        from shared import connect_result
        from shared.logs import safe

        state = params.get("state")
        pending = self._oauth.consume_state(
            state, open_sealed=lambda sealed, aad: self._key_ring(sealed).open(sealed, aad=aad))
        if pending.kind in ("admin", "admin_signin") and self._admin_consent is not None:
            return self._admin_consent(pending, params, state or "")
        try:
            account = self._store_connection(pending, params)
        except ConnectorError as err:
            log.warning("connect failed for owner's pending flow: %s", safe(err.code, 64))
            return CallbackOutcome(pending.return_url, "error", account_id=pending.account_id, code=err.code,
                                   message=err.detail, hint=err.hint)
        token = connect_result.sign(self._key_ring(), issuer=self._identity.issuer,
                                    audience=self._identity.audience, owner=pending.owner, account_id=account.id,
                                    state=state or "")
        return CallbackOutcome(pending.return_url, "connected", account_id=account.id, result=token)

    def _store_connection(self, pending: PendingConnect, params: dict[str, str]) -> Account:
        result = self._oauth.redeem_code(pending, params)
        if not result.refresh_token:
            raise OAuthError("Microsoft returned no refresh token (offline_access was not granted).",
                             code="no_refresh_token", hint="Consent to offline access when connecting.")
        claims = result.id_token_claims
        tid = str(claims.get("tid") or "")
        home = f"{claims.get('oid') or claims.get('sub') or ''}.{tid}"
        me = self._graph.get_json("me", mailbox=home, token=_IssuedToken(result.access_token),
                                  params={"$select": "id,displayName,mail,userPrincipalName"})
        email = str(me.get("mail") or me.get("userPrincipalName") or claims.get("preferred_username") or "")
        if pending.require_login_hint:
            check_login_hint(pending.login_hint or "", (me.get("mail"), me.get("userPrincipalName")))
        display_name = str(me.get("displayName") or claims.get("name") or "")
        with self._mailbox_claim(pending.owner, home):
            existing = self._existing_for(pending, home, email)
            record = self._connected_record(pending.owner, existing, result, home=home, tid=tid, email=email,
                                            display_name=display_name)
            return self._save(existing, record)

    def _save(self, existing: Account | None, record: Account) -> Account:
        from shared.due_index import bucket_of

        if existing:
            saved = self._accounts.update_with(existing, lambda current: record)  # NotFoundError if deleted
            event = "account.recovered" if existing.status == REAUTH_REQUIRED else "account.connected"
        else:
            saved = self._accounts.create_account(record)
            event = "account.connected"
        previous = bucket_of(existing.refresh_due_at) if existing and existing.refresh_due_at else None
        self._index.put(saved, previous_bucket=previous)
        saved = self._on_connected(saved, existing is not None)  # never raises
        self._telemetry.account_status(ACTIVE, event=event.removeprefix("account."))
        self._webhooks.emit(event, saved.to_public())
        return saved

    @contextmanager
    def _mailbox_claim(self, owner: str, home: str) -> Iterator[None]:
        """Hold the (owner, mailbox) claim while the account is looked up and stored: of concurrent callbacks
        of one mailbox the first creates the account and the others, waiting here, update it."""
        mac = hmac.new(self._key_ring().derive(MAILBOX_CLAIM_PURPOSE), f"{owner}\n{home}".encode(),
                       hashlib.sha256).hexdigest()
        pk = "m-" + mac[:40]
        deadline = time.monotonic() + MAILBOX_CLAIM_WAIT_S

        def abandoned(current: Row) -> bool:
            try:
                at = parse_iso(current.get("at")) if isinstance(current.get("at"), str) else None
            except ValueError:
                at = None  # not a time we wrote: nobody's live claim
            return at is None or at <= utcnow() - MAILBOX_CLAIM_STALE

        while True:
            now = utcnow()  # the claim's time is when it is taken, not when we started waiting for it
            row = {"PartitionKey": pk, "RowKey": "connect", "at": iso(now),
                   "expiresAt": iso(now + MAILBOX_CLAIM_STALE)}  # the clean-up timer's format (expiresAt lt …)
            held = self._claims.claim(row, take_over=abandoned).etag
            if held is not None:
                break
            if time.monotonic() > deadline:
                raise ConflictError("Another sign-in of this mailbox is being stored.", code="connect_in_progress",
                                    hint="Retry the connect in a few seconds.")
            time.sleep(0.1)  # another callback of the same mailbox is storing it: wait for its account
        try:
            yield
        finally:
            try:
                self._claims.delete_if_present(pk, "connect", etag=held)
            except ConnectorError:
                pass  # goes stale, then is taken over; the clean-up timer purges it

    def _existing_for(self, pending: PendingConnect, home: str, email: str) -> Account | None:
        """The record a connection replaces: the re-connected account, or the same mailbox connected before."""
        if not pending.account_id:
            return self._accounts.find_by_home_account(pending.owner, home)
        try:
            existing = self._accounts.get_account(pending.owner, pending.account_id)
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
            last_error=None, sealed_tokens=self._accounts.seal_tokens(owner, account_id, tokens),
            refresh_due_at=self._next_due(tokens, now),
        )


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(value: str) -> str:
    """``value`` with A-Z lowered and every other character (non-ASCII included) left as it is."""
    return value.translate(_ASCII_LOWER)


def check_login_hint(login_hint: str, names: tuple[object, object]) -> None:
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
