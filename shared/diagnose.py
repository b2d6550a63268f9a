"""``GET /api/accounts/{id}/diagnose``: the checks that explain a mailbox that authenticates but
cannot be used, each ``{"name","ok","detail","hint"}``.

Why this exists: ``/me`` can work while ``/me/messages`` fails — the account is personal (its
access tokens are opaque, not JWTs), unlicensed or on-premises (``MailboxNotEnabledForRESTAPI``,
https://learn.microsoft.com/graph/api/resources/mail-api-overview), a guest, or ``Mail.Send`` was
never consented. Scopes are read from the access token's ``scp`` claim when it is a JWT
(https://learn.microsoft.com/entra/identity-platform/access-token-claims-reference), else from
the token response's ``scope``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import TYPE_CHECKING

from shared.accounts import ACTIVE, APPLICATION, CONSUMER_TENANT_ID, Account, Tokens, iso, utcnow
from shared.errors import ConnectorError, OperatorError, ReauthRequiredError
from shared.tokens import AccountTokenSource

if TYPE_CHECKING:
    from shared.graph import GraphClient
    from shared.tokens import TokenManager

FEATURES = {
    "profile": ({"User.Read", "User.ReadBasic.All", "User.Read.All"}, "read the user's profile (/me)"),
    "read mail": ({"Mail.Read", "Mail.ReadWrite"}, "list and read messages"),
    "send mail": ({"Mail.Send"}, "send mail as the user"),
}
RT_INACTIVITY_LIMIT = dt.timedelta(days=90)
NO_MAILBOX_HINT = (
    "This account has no Exchange Online mailbox that Graph can reach. For a work account: assign an Exchange "
    "Online licence (or move an on-premises mailbox to Exchange Online); guests have no mailbox in this tenant — "
    "connect their home account. For a personal account: sign in once at outlook.com to provision the mailbox.")
Check = dict[str, str | bool | None]


def scopes_from_jwt(token: str) -> set[str] | None:
    """The ``scp`` claim of a JWT access token, unverified: we only read what Entra gave us, and a
    token for Graph is Graph's to validate. Personal accounts get opaque (non-JWT) tokens: None."""
    import jwt

    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    scp = claims.get("scp")
    return set(str(scp).split()) if scp else None


class Diagnosis:
    """The checks for one account, from public parts only."""

    def __init__(self, *, tokens: TokenManager, open_tokens: Callable[[Account], Tokens], graph: GraphClient,
                 admin_consent_url: Callable[[str], str], graph_context: dict[str, str],
                 notifications: Callable[[Account], tuple[bool, str, str | None]] | None = None) -> None:
        self._tokens = tokens
        self._open_tokens = open_tokens
        self._graph = graph
        self._admin_consent_url = admin_consent_url
        self._context = graph_context
        self._notifications = notifications  # the inbound-mail check, when wired
        self.checks: list[Check] = []

    def add(self, name: str, ok: bool, detail: str, hint: str | None = None) -> None:
        self.checks.append({"name": name, "ok": ok, "detail": detail, "hint": None if ok else hint})

    def result(self, account_id: str) -> dict[str, object]:
        return {"accountId": account_id, "healthy": all(ch["ok"] for ch in self.checks), "checks": self.checks}

    def run(self, acc: Account, *, probe: str | None = None) -> dict[str, object]:
        """``probe``: for a team mailbox, a mailbox of its tenant that was not added, to tell whether the
        administrator scoped the app."""
        self._record_checks(acc)
        if self._notifications is not None:
            ok, detail, hint = self._notifications(acc)
            self.add("notifications", ok, detail, hint)
        if acc.status != ACTIVE:
            return self.result(acc.id)
        got = self._token(acc)
        if got is None:
            return self.result(acc.id)
        token, acc = got
        if acc.access_type == APPLICATION:
            self._application_checks(acc, token, probe)
            return self.result(acc.id)
        tokens = self._open_tokens(acc)
        self._freshness(tokens)
        granted, consent_hint = self._scopes(acc, token, tokens)
        self._graph_checks(acc)
        send_ok = "Mail.Send" in granted
        self.add("sendPermission", send_ok,
                 "Mail.Send is granted; sending as this mailbox is allowed." if send_ok else
                 "Mail.Send is not granted: sending will fail with ErrorAccessDenied.", consent_hint)
        return self.result(acc.id)

    def _application_checks(self, acc: Account, token: str, probe: str | None) -> None:
        """A team mailbox: the application permissions in the token's ``roles``, the mailbox, and whether the
        tenant administrator scoped the app (a mailbox that was not added must be refused)."""
        from shared.tenant_access import SCOPE_HINT, app_token_of

        roles = set(app_token_of(token, utcnow()).roles)
        hint = (f"Declare the application permission on the app registration, then ask a tenant administrator to "
                f"consent again: {self._admin_consent_url(acc.tenant_id)}")
        for feature, any_of, what in (("read mail", {"Mail.Read", "Mail.ReadWrite"}, "list and read messages"),
                                      ("send mail", {"Mail.Send"}, "send mail as the mailbox")):
            have = sorted(any_of & roles)
            self.add(f"role:{feature}", bool(have), f"Application permission {', '.join(have)} (token roles)." if have
                     else f"None of {', '.join(sorted(any_of))} is granted (token roles): cannot {what}.", hint)
        source = AccountTokenSource(self._tokens, acc)
        try:
            self._graph.get_json("me/mailFolders/inbox", mailbox=acc.mailbox_key, token=source, context=self._context,
                                 params={"$select": "id"})
            self.add("mailbox", True, f"{acc.email} is reachable with the tenant's application token.")
        except ConnectorError as e:
            self.add("mailbox", False, f"The mailbox is not reachable: {e.code}: {e.detail}", e.hint)
        if not roles & {"Mail.Read", "Mail.ReadBasic", "Mail.ReadWrite"}:
            self.add("adminScope", True, "Not checked: the token grants no mail permission of its own (a refusal "
                     "would not tell whether the administrator scoped the app).")
            return
        if not probe:
            self.add("adminScope", True, "Not checked: no mailbox of this tenant outside the ones added is known. "
                     "Pass ?probe=<address of a mailbox the app must not reach> to check the administrator's scope.")
            return
        from urllib.parse import quote

        try:
            # One read of a folder id (no mail), under a limiter key of the tenant, not of the probed mailbox.
            self._graph.get_json(f"users/{quote(probe, safe='@.')}/mailFolders/inbox",
                                 mailbox=f"probe.{acc.tenant_id}", token=source, params={"$select": "id"})
            self.add("adminScope", False, f"Not scoped: the app also reads {probe}, a mailbox that was not added, so "
                     "it can read every mailbox of the tenant.", SCOPE_HINT.replace("this one is outside the scope",
                                                                                    "it is not"))
        except ConnectorError as e:
            code = e.microsoft.error if e.microsoft else ""
            if code == "ErrorAccessDenied":
                self.add("adminScope", True, f"Scoped: the administrator limited the app to some mailboxes ({probe} "
                         "is refused).")
            else:
                self.add("adminScope", False, f"Could not tell whether the app is scoped: {probe} answered {e.code}.",
                         "Probe an existing mailbox of this tenant that the app must not reach.")

    def _record_checks(self, acc: Account) -> None:
        personal = acc.tenant_id == CONSUMER_TENANT_ID
        self.add("accountType", True,
                 f"Personal Microsoft account ({acc.email}); Outlook.com mailbox." if personal else
                 f"Work or school account ({acc.email}) in tenant {acc.tenant_id}.")
        self.add("status", acc.status == ACTIVE, f"Account status is {acc.status}.",
                 "A tenant administrator must grant admin consent again (the id is kept)."
                 if acc.access_type == APPLICATION else
                 "Start the connect flow again with accountId to re-connect (the id is kept).")
        if acc.last_error:
            err = acc.last_error
            self.add("lastError", False, f"Last error {err.get('code')} at {err.get('at')}: {err.get('message')}",
                     "See the status check for the fix.")
        else:
            self.add("lastError", True, "No error recorded.")

    def _token(self, acc: Account) -> tuple[str, Account] | None:
        try:
            return self._tokens.access_token(acc)
        except ReauthRequiredError as e:
            self.add("token", False, e.detail, e.hint or "Re-connect the mailbox.")
        except OperatorError as e:
            self.add("appRegistration", False, e.detail, e.hint)
        except ConnectorError as e:  # Entra unreachable or throttling: say so rather than fail the whole call
            self.add("token", False, f"A fresh access token could not be obtained: {e.code}: {e.detail}",
                     e.hint or "Retry the diagnosis shortly.")
        return None

    def _freshness(self, tokens: Tokens) -> None:
        rt_age = utcnow() - tokens.refresh_token_issued_at
        self.add("tokenFreshness", rt_age < RT_INACTIVITY_LIMIT - dt.timedelta(days=14),
                 f"Access token valid until {iso(tokens.expires_at)}; refresh token issued {rt_age.days} day(s) ago "
                 f"(Microsoft expires it after 90 days without use).",
                 "The proactive refresher should renew it; check that the refresh timer runs.")

    def _scopes(self, acc: Account, token: str, tokens: Tokens) -> tuple[set[str], str]:
        from_jwt = scopes_from_jwt(token)
        granted = from_jwt if from_jwt is not None else set(tokens.scopes or acc.scopes)
        source = "access token (scp)" if from_jwt is not None else "token response (opaque access token)"
        consent_hint = ("Re-connect with prompt=consent so the user grants it." if acc.tenant_id == CONSUMER_TENANT_ID
                        else f"Ask a tenant administrator to grant consent: {self._admin_consent_url(acc.tenant_id)} "
                        "— or re-connect with prompt=consent.")
        for feature, (any_of, what) in FEATURES.items():
            have = sorted(any_of & granted)
            self.add(f"scope:{feature}", bool(have),
                     f"Granted {', '.join(have)} ({source})." if have else
                     f"None of {', '.join(sorted(any_of))} is granted ({source}): cannot {what}.", consent_hint)
        return granted, consent_hint

    def _graph_checks(self, acc: Account) -> None:
        source = AccountTokenSource(self._tokens, acc)
        try:
            me = self._graph.get_json("me", mailbox=acc.mailbox_key, token=source, context=self._context,
                                      params={"$select": "id,displayName,mail,userPrincipalName"})
            self.add("profile", True, f"/me answered for {me.get('userPrincipalName') or me.get('mail')}.")
        except ConnectorError as e:
            self.add("profile", False, f"/me failed: {e.code}: {e.detail}", e.hint)
        try:
            inbox = self._graph.get_json("me/mailFolders/inbox", mailbox=acc.mailbox_key, token=source,
                                         context=self._context)
            self.add("mailbox", True, f"Inbox reachable ({inbox.get('totalItemCount', '?')} messages).")
        except ConnectorError as e:
            no_mailbox = e.microsoft is not None and e.microsoft.error == "MailboxNotEnabledForRESTAPI"
            self.add("mailbox", False, f"The mailbox is not reachable: {e.code}: {e.detail}",
                     NO_MAILBOX_HINT if no_mailbox else e.hint)
