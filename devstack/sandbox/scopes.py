"""Scope parsing the way the Microsoft identity platform treats Graph scopes.

https://learn.microsoft.com/en-us/entra/identity-platform/scopes-oidc : OIDC scopes (openid, profile,
email, offline_access); a scope without a resource prefix means Microsoft Graph;
``https://graph.microsoft.com/.default`` means the app's statically configured permissions.
"""

from __future__ import annotations

import re

OIDC_SCOPES = ("openid", "profile", "email", "offline_access")
GRAPH_RESOURCE = "https://graph.microsoft.com/"
GRAPH_DEFAULT_SCOPE = GRAPH_RESOURCE + ".default"  # the only scope the client-credentials grant accepts
# The permissions configured on the sandbox app registration (used for ".default").
APP_CONFIGURED_SCOPES = ("User.Read", "Mail.ReadWrite", "Mail.Send")
KNOWN_GRAPH_SCOPES = {
    s.lower(): s
    for s in (
        "User.Read", "User.ReadBasic.All", "Mail.Read", "Mail.ReadBasic", "Mail.ReadWrite", "Mail.Send",
        "Mail.Read.Shared", "Mail.ReadWrite.Shared", "Mail.Send.Shared", "MailboxSettings.Read",
        "MailboxSettings.ReadWrite", "Calendars.Read", "Calendars.ReadWrite", "Contacts.Read",
        "Contacts.ReadWrite", "Files.Read", "Files.ReadWrite", "People.Read", "IMAP.AccessAsUser.All",
        "SMTP.Send",
    )
}
_SCOPE_RE = re.compile(r"^[A-Za-z]+(\.[A-Za-z]+)+$")


class InvalidScopeError(ValueError):
    pass


def parse_scopes(raw: str | None) -> list[str]:
    """Canonical scope list (OIDC scopes lower-case, Graph scopes without prefix, deduplicated)."""
    out: list[str] = []
    for item in (raw or "").split():
        s = item
        if s.lower().startswith(GRAPH_RESOURCE) or s.lower().startswith("00000003-0000-0000-c000-000000000000/"):
            s = s.split("/", 3)[-1] if s.lower().startswith(GRAPH_RESOURCE) else s.split("/", 1)[1]
            if s == ".default":
                names = list(APP_CONFIGURED_SCOPES)
            else:
                names = [s]
        elif s.lower() in OIDC_SCOPES:
            names = [s.lower()]
        else:
            names = [s]
        for n in names:
            if n.lower() in OIDC_SCOPES:
                canon = n.lower()
            elif n.lower() in KNOWN_GRAPH_SCOPES:
                canon = KNOWN_GRAPH_SCOPES[n.lower()]
            elif _SCOPE_RE.match(n):
                canon = n
            else:
                raise InvalidScopeError(item)
            if canon.lower() not in {x.lower() for x in out}:
                out.append(canon)
    return out


def resource_scopes(scopes: list[str]) -> list[str]:
    return [s for s in scopes if s not in OIDC_SCOPES]


def has_any(scopes: list[str] | set[str], *wanted: str) -> bool:
    low = {s.lower() for s in scopes}
    return any(w.lower() in low for w in wanted)
