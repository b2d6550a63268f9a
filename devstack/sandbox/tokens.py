"""Signing keys, JWKS and token minting.

ID tokens are RS256 JWTs with a ``kid`` published at ``/{tenant}/discovery/v2.0/keys``
(https://learn.microsoft.com/en-us/entra/identity-platform/id-token-claims-reference).
Access tokens for work accounts are RS256 JWTs whose audience is Microsoft Graph's app id; Graph
tokens are v1.0 tokens with ``scp``/``appid``/``upn``
(https://learn.microsoft.com/en-us/entra/identity-platform/access-token-claims-reference).
Access tokens for personal accounts are opaque (not JWTs), as Microsoft documents: "tokens issued
for personal accounts ... are not guaranteed to be JWTs"
(https://learn.microsoft.com/en-us/entra/identity-platform/access-tokens).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from .users import TestUser

GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
# Entra built-in role template ids: https://learn.microsoft.com/entra/identity/role-based-access-control/permissions-reference
GLOBAL_ADMINISTRATOR = "62e90394-69f5-4237-9190-012177145e10"
DEFAULT_USER_ROLE = "b79fbf4d-3ef9-4689-8143-76b194e85509"  # "User" (every member)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(obj: dict[str, Any]) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def _int_b64(n: int) -> str:
    return b64url(n.to_bytes((n.bit_length() + 7) // 8, "big"))


class SigningKey:
    """One RSA key pair per sandbox instance (regenerated at each start)."""

    def __init__(self) -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pub = self._key.public_key().public_numbers()
        self.kid = b64url(hashlib.sha256(_int_b64(pub.n).encode()).digest()[:20])
        self._jwk = {
            "kty": "RSA", "use": "sig", "kid": self.kid, "x5t": self.kid,
            "n": _int_b64(pub.n), "e": _int_b64(pub.e),
        }

    def jwks(self, issuer: str) -> dict[str, Any]:
        return {"keys": [dict(self._jwk, issuer=issuer)]}

    def sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid, "typ": "JWT"})

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self._key.public_key()


def pairwise_sub(user: TestUser, client_id: str) -> str:
    """``sub`` is unique per user per application."""
    return b64url(hashlib.sha256(f"{user.oid}|{client_id}".encode()).digest())[:43]


def client_info(user: TestUser) -> str:
    # client_info: base64url of {"uid": oid, "utid": tid}; MSAL builds the account id from it.
    # https://learn.microsoft.com/en-us/entra/identity-platform/msal-client-applications
    return b64url_json({"uid": user.oid, "utid": user.tid})


def id_token(
    key: SigningKey, *, host: str, user: TestUser, client_id: str, nonce: str | None, now: int,
    scopes: set[str],
) -> str:
    claims: dict[str, Any] = {
        "aud": client_id,
        "iss": f"{host}/{user.tid}/v2.0",
        "iat": now, "nbf": now, "exp": now + 3600,
        "name": user.display_name,
        "oid": user.oid,
        "preferred_username": user.upn,
        "rh": "0.sandbox." + b64url(secrets.token_bytes(6)),
        "sub": pairwise_sub(user, client_id),
        "tid": user.tid,
        "uti": b64url(secrets.token_bytes(16)),
        "ver": "2.0",
    }
    if nonce:
        claims["nonce"] = nonce
    if "email" in scopes:
        claims["email"] = user.upn
    if user.admin:
        # Directory roles (the app registration's groupMembershipClaims includes DirectoryRole): role template ids.
        # https://learn.microsoft.com/entra/identity-platform/id-token-claims-reference
        claims["wids"] = [GLOBAL_ADMINISTRATOR, DEFAULT_USER_ROLE]
    elif user.shared is False and not user.personal:
        claims["wids"] = [DEFAULT_USER_ROLE]
    return key.sign(claims)


def access_token(
    key: SigningKey, *, user: TestUser, client_id: str, app_name: str, scopes: list[str], now: int,
    expires_in: int,
) -> str:
    if user.personal:
        # Opaque compact token, like the "EwB..." tokens MSA issues.
        return "EwB" + b64url(secrets.token_bytes(96))
    given, _, family = user.display_name.partition(" ")
    claims: dict[str, Any] = {
        "aud": GRAPH_APP_ID,
        "iss": f"https://sts.windows.net/{user.tid}/",
        "iat": now, "nbf": now, "exp": now + expires_in,
        "acct": 0, "acr": "1", "amr": ["pwd"],
        "app_displayname": app_name,
        "appid": client_id, "appidacr": "1",
        "family_name": family, "given_name": given,
        "idtyp": "user",
        "name": user.display_name,
        "oid": user.oid,
        "scp": " ".join(scopes),
        "sub": pairwise_sub(user, GRAPH_APP_ID),
        "tid": user.tid,
        "unique_name": user.upn,
        "upn": user.upn,
        "uti": b64url(secrets.token_bytes(16)),
        "ver": "1.0",
        "xms_tcdt": 1600000000,
    }
    return key.sign(claims)


def app_token(key: SigningKey, *, client_id: str, app_name: str, tenant_id: str, principal_id: str,
              roles: list[str], now: int, expires_in: int) -> str:
    """An application (app-only) Graph token from the client-credentials grant: ``roles`` instead of ``scp``,
    ``idtyp`` = ``app``, ``oid``/``sub`` = the app's service principal in that tenant
    (https://learn.microsoft.com/entra/identity-platform/access-token-claims-reference)."""
    claims: dict[str, Any] = {
        "aud": GRAPH_APP_ID,
        "iss": f"https://sts.windows.net/{tenant_id}/",
        "iat": now, "nbf": now, "exp": now + expires_in,
        "app_displayname": app_name,
        "appid": client_id, "appidacr": "1",
        "idp": f"https://sts.windows.net/{tenant_id}/",
        "idtyp": "app",
        "oid": principal_id,
        "roles": roles,
        "sub": principal_id,
        "tid": tenant_id,
        "uti": b64url(secrets.token_bytes(16)),
        "ver": "1.0",
    }
    return key.sign(claims)


def refresh_token(user: TestUser) -> str:
    # Refresh tokens are opaque to clients ("0.A..." for work accounts, "M.C..." for MSA).
    prefix = "M.C5" if user.personal else "0.AX"
    return prefix + b64url(secrets.token_bytes(64))


def opaque_code() -> str:
    return "1.AX" + b64url(secrets.token_bytes(48))


def new_guid() -> str:
    return str(uuid.uuid4())


def managed_identity_token(key: SigningKey, *, host: str, client_id: str, principal_id: str, tenant_id: str,
                           audience: str, now: int, expires_in: int) -> str:
    """An app-only token of a user-assigned managed identity, as Entra issues it through the platform's
    local identity endpoint: ``sub`` / ``oid`` = the identity's object (principal) id, ``azp`` = its client
    id, ``idtyp`` = ``app``. For ``api://AzureADTokenExchange`` it is the federated client assertion
    (https://learn.microsoft.com/entra/workload-id/workload-identity-federation-config-app-trust-managed-identity).
    """
    claims: dict[str, Any] = {
        "aud": audience,
        "iss": f"{host}/{tenant_id}/v2.0",
        "iat": now, "nbf": now, "exp": now + expires_in,
        "azp": client_id, "azpacr": "2",
        "idtyp": "app",
        "oid": principal_id,
        "sub": principal_id,
        "tid": tenant_id,
        "uti": b64url(secrets.token_bytes(16)),
        "ver": "2.0",
    }
    return key.sign(claims)
