"""Test users of the sandbox and the failure mode each one reproduces.

Tenant ids are fixed GUIDs so that tests and fixtures can assert on them. The personal-account
tenant id is Microsoft's real one for consumer (MSA) accounts:
https://learn.microsoft.com/en-us/entra/identity-platform/id-token-claims-reference (``tid`` claim:
"9188040d-6c67-4c5b-b112-36a304b66dad" for personal Microsoft accounts).
"""

from __future__ import annotations

from dataclasses import dataclass

CONSUMER_TENANT_ID = "9188040d-6c67-4c5b-b112-36a304b66dad"
CONTOSO_TENANT_ID = "72f988bf-0000-4000-8000-00000000c057"
FABRIKAM_TENANT_ID = "b6a1c2d3-0000-4000-8000-0000000fab01"

# Tenant domains accepted as the tenant segment of an authority (like "contoso.onmicrosoft.com").
TENANT_DOMAINS: dict[str, str] = {
    "contoso.onmicrosoft.com": CONTOSO_TENANT_ID,
    "fabrikam.onmicrosoft.com": FABRIKAM_TENANT_ID,
}
TENANT_NAMES: dict[str, str] = {
    CONTOSO_TENANT_ID: "Contoso",
    FABRIKAM_TENANT_ID: "Fabrikam",
    CONSUMER_TENANT_ID: "Microsoft Accounts",
}

# Tenants whose policy forbids user consent: users there need an administrator to consent
# (AADSTS90094 on the sign-in page, AADSTS65001 back to the app).
ADMIN_CONSENT_TENANTS = frozenset({FABRIKAM_TENANT_ID})


@dataclass(frozen=True)
class TestUser:
    upn: str
    display_name: str
    oid: str
    tid: str
    personal: bool = False
    has_mailbox: bool = True
    ca_blocked: bool = False
    # Scopes this user/tenant will never consent to (e.g. an admin policy that removed Mail.Send).
    denied_scopes: frozenset[str] = frozenset()
    # Graph /me id: the oid for work accounts, a 16-hex-digit CID for personal accounts.
    graph_id: str = ""
    description: str = ""
    # A Global Administrator of the tenant (may grant admin consent).
    admin: bool = False
    # A shared mailbox: its account is disabled for sign-in (AADSTS50057); reached only with application
    # permissions through /users/{id|upn} (https://learn.microsoft.com/exchange/collaboration/shared-mailboxes).
    shared: bool = False

    __test__ = False  # not a pytest test class

    @property
    def me_id(self) -> str:
        return self.graph_id or self.oid


_USERS = [
    TestUser(
        upn="adele@contoso.onmicrosoft.com", display_name="Adele Vance",
        oid="a1de1e00-0000-4000-8000-00000000a001", tid=CONTOSO_TENANT_ID,
        description="Work account with an Exchange Online mailbox (the happy path).",
    ),
    TestUser(
        upn="megan@contoso.onmicrosoft.com", display_name="Megan Bowen",
        oid="3e9a0000-0000-4000-8000-00000000a002", tid=CONTOSO_TENANT_ID,
        description="Second work account in the same tenant (separate mailbox, separate throttling).",
    ),
    TestUser(
        upn="pat@outlook.com", display_name="Pat Personal",
        oid="00000000-0000-0000-5a7e-0123456789ab", tid=CONSUMER_TENANT_ID, personal=True,
        graph_id="5a7e0123456789ab",
        description="Personal Microsoft account: consumer tid, opaque access tokens.",
    ),
    TestUser(
        upn="nomailbox@contoso.onmicrosoft.com", display_name="No Mailbox",
        oid="0b0b0000-0000-4000-8000-00000000a004", tid=CONTOSO_TENANT_ID, has_mailbox=False,
        description="Work account without an Exchange Online licence: /me works, mail answers "
                    "MailboxNotEnabledForRESTAPI.",
    ),
    TestUser(
        upn="user@fabrikam.onmicrosoft.com", display_name="Fabrikam User",
        oid="fab00000-0000-4000-8000-00000000f001", tid=FABRIKAM_TENANT_ID,
        description="Tenant that disallows user consent: AADSTS90094 page, AADSTS65001 to the app "
                    "until an admin consents via /{tenant}/v2.0/adminconsent.",
    ),
    TestUser(
        upn="blocked@contoso.onmicrosoft.com", display_name="Blocked User",
        oid="b10c0000-0000-4000-8000-00000000a006", tid=CONTOSO_TENANT_ID, ca_blocked=True,
        description="Blocked by a Conditional Access policy (AADSTS53003).",
    ),
    TestUser(
        upn="nosend@contoso.onmicrosoft.com", display_name="No Send",
        oid="505e0000-0000-4000-8000-00000000a007", tid=CONTOSO_TENANT_ID,
        denied_scopes=frozenset({"mail.send"}),
        description="Consent granted for everything except Mail.Send: tokens lack Mail.Send, "
                    "sendMail answers 403 ErrorAccessDenied.",
    ),
    TestUser(
        upn="admin@contoso.onmicrosoft.com", display_name="Contoso Admin",
        oid="ad000000-0000-4000-8000-00000000a008", tid=CONTOSO_TENANT_ID, admin=True,
        description="Global Administrator of Contoso: may grant admin consent at /{tenant}/v2.0/adminconsent.",
    ),
    TestUser(
        upn="support@contoso.onmicrosoft.com", display_name="Contoso Support",
        oid="5a990000-0000-4000-8000-00000000a009", tid=CONTOSO_TENANT_ID, shared=True,
        description="Shared mailbox: cannot sign in (AADSTS50057); reached with application permissions.",
    ),
    TestUser(
        upn="sales@contoso.onmicrosoft.com", display_name="Contoso Sales",
        oid="5a1e0000-0000-4000-8000-00000000a010", tid=CONTOSO_TENANT_ID, shared=True,
        description="Second shared mailbox (use it outside an admin scope: 403 ErrorAccessDenied).",
    ),
    TestUser(
        upn="admin@fabrikam.onmicrosoft.com", display_name="Fabrikam Admin",
        oid="fab00000-0000-4000-8000-00000000f002", tid=FABRIKAM_TENANT_ID, admin=True,
        description="Global Administrator of Fabrikam (the tenant that disallows user consent).",
    ),
]

TEST_USERS: dict[str, TestUser] = {u.upn: u for u in _USERS}


def find_user(login: str | None) -> TestUser | None:
    if not login:
        return None
    return TEST_USERS.get(login.strip().lower())


def find_in_tenant(tid: str, ref: str) -> TestUser | None:
    """A user of tenant ``tid`` by UPN or object id, as ``/users/{id | userPrincipalName}`` addresses one."""
    r = ref.strip().lower()
    for u in _USERS:
        if u.tid == tid and r in (u.upn, u.oid, u.me_id.lower()):
            return u
    return None


def resolve_tenant(segment: str) -> str | None:
    """Map an authority tenant segment to a tenant id, or the segment itself for the
    multi-tenant aliases (common / organizations / consumers). None when unknown."""
    s = segment.lower()
    if s in ("common", "organizations", "consumers"):
        return s
    if s in TENANT_DOMAINS:
        return TENANT_DOMAINS[s]
    if s in TENANT_NAMES:
        return s
    return None
