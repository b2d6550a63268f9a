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

import base64
import datetime as dt
import json
from typing import Any

from shared.accounts import ACTIVE, CONSUMER_TENANT_ID, iso, utcnow
from shared.errors import ConnectorError, OperatorError, ReauthRequiredError

FEATURES = {
    "profile": ({"User.Read", "User.ReadBasic.All", "User.Read.All"}, "read the user's profile (/me)"),
    "read mail": ({"Mail.Read", "Mail.ReadWrite"}, "list and read messages"),
    "send mail": ({"Mail.Send"}, "send mail as the user"),
}
RT_INACTIVITY_LIMIT = dt.timedelta(days=90)


def scopes_from_jwt(token: str) -> set[str] | None:
    """The ``scp`` claim of a JWT access token, unverified (we only read what we were given)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return None
    scp = claims.get("scp") if isinstance(claims, dict) else None
    return set(str(scp).split()) if scp else None


def run_diagnosis(c: Any, owner: str, account_id: str) -> dict[str, Any]:
    acc = c.accounts.get_account(owner, account_id)
    checks: list[dict[str, Any]] = []

    def add(name: str, ok: bool, detail: str, hint: str | None = None) -> None:
        checks.append({"name": name, "ok": ok, "detail": detail, "hint": None if ok else hint})

    personal = acc.tenant_id == CONSUMER_TENANT_ID
    add("accountType", True,
        f"Personal Microsoft account ({acc.email}); Outlook.com mailbox." if personal else
        f"Work or school account ({acc.email}) in tenant {acc.tenant_id}.")
    add("status", acc.status == ACTIVE, f"Account status is {acc.status}.",
        "Start the connect flow again with accountId to re-connect (the id is kept).")
    if acc.last_error:
        add("lastError", False, f"Last error {acc.last_error.get('code')} at {acc.last_error.get('at')}: "
                                f"{acc.last_error.get('message')}", "See the status check for the fix.")
    else:
        add("lastError", True, "No error recorded.")
    if acc.status != ACTIVE:
        return _result(acc.id, checks)

    try:
        token, acc = c.tokens.access_token(acc)
    except ReauthRequiredError as e:
        add("token", False, e.detail, e.hint or "Re-connect the mailbox.")
        return _result(acc.id, checks)
    except OperatorError as e:
        add("appRegistration", False, e.detail, e.hint)
        return _result(acc.id, checks)
    except ConnectorError as e:  # Entra unreachable or throttling: say so rather than fail the whole call
        add("token", False, f"A fresh access token could not be obtained: {e.code}: {e.detail}",
            e.hint or "Retry the diagnosis shortly.")
        return _result(acc.id, checks)
    tokens = c.accounts.open_tokens(acc)
    now = utcnow()
    rt_age = now - tokens.refresh_token_issued_at
    add("tokenFreshness", rt_age < RT_INACTIVITY_LIMIT - dt.timedelta(days=14),
        f"Access token valid until {iso(tokens.expires_at)}; refresh token issued {rt_age.days} day(s) ago "
        f"(Microsoft expires it after 90 days without use).",
        "The proactive refresher should renew it; check that the refresh timer runs.")

    from_jwt = scopes_from_jwt(token)
    granted = from_jwt if from_jwt is not None else set(tokens.scopes or acc.scopes)
    source = "access token (scp)" if from_jwt is not None else "token response (opaque access token)"
    consent_hint = ("Re-connect with prompt=consent so the user grants it." if personal else
                    f"Ask a tenant administrator to grant consent: {c.oauth.admin_consent_url(acc.tenant_id)} "
                    "— or re-connect with prompt=consent.")
    for feature, (any_of, what) in FEATURES.items():
        have = sorted(any_of & granted)
        add(f"scope:{feature}", bool(have),
            f"Granted {', '.join(have)} ({source})." if have else
            f"None of {', '.join(sorted(any_of))} is granted ({source}): cannot {what}.", consent_hint)

    token_source = c._token_source(acc)
    ctx = c._graph_context()
    try:
        me = c.graph.request("GET", "me", mailbox=acc.mailbox_key, token=token_source, context=ctx,
                             params={"$select": "id,displayName,mail,userPrincipalName"}).json()
        add("profile", True, f"/me answered for {me.get('userPrincipalName') or me.get('mail')}.")
    except ConnectorError as e:
        add("profile", False, f"/me failed: {e.code}: {e.detail}", e.hint)
    try:
        inbox = c.graph.request("GET", "me/mailFolders/inbox", mailbox=acc.mailbox_key, token=token_source,
                                context=ctx).json()
        add("mailbox", True, f"Inbox reachable ({inbox.get('totalItemCount', '?')} messages).")
    except ConnectorError as e:
        hint = e.hint
        if e.microsoft and e.microsoft.error == "MailboxNotEnabledForRESTAPI":
            hint = ("This account has no Exchange Online mailbox that Graph can reach. For a work account: assign "
                    "an Exchange Online licence (or move an on-premises mailbox to Exchange Online); guests have no "
                    "mailbox in this tenant — connect their home account. For a personal account: sign in once at "
                    "outlook.com to provision the mailbox.")
        add("mailbox", False, f"The mailbox is not reachable: {e.code}: {e.detail}", hint)
    send_ok = "Mail.Send" in granted
    add("sendPermission", send_ok,
        "Mail.Send is granted; sending as this mailbox is allowed." if send_ok else
        "Mail.Send is not granted: sending will fail with ErrorAccessDenied.", consent_hint)
    return _result(acc.id, checks)


def _result(account_id: str, checks: list[dict[str, Any]]) -> dict[str, Any]:
    return {"accountId": account_id, "healthy": all(ch["ok"] for ch in checks), "checks": checks}
