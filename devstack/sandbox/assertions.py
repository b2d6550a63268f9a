"""Client authentication with a JWT ``client_assertion`` at ``/token``, checked as Entra checks it.

Two kinds of assertion (``client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer``,
RFC 7523):

* **Certificate** (``iss`` = ``sub`` = the client id): signed by the app with the private key of a
  certificate uploaded to its registration; the header names it by ``x5t#S256`` (SHA-256 thumbprint,
  PS256 or RS256) or ``x5t`` (SHA-1); ``aud`` is the token endpoint; ``exp`` (and ``nbf`` when present)
  bound its validity; ``jti`` is required.
  https://learn.microsoft.com/entra/identity-platform/certificate-credentials
* **Federated** (any other issuer): a token from an issuer a federated identity credential on the
  app trusts, matched on issuer + subject + audience. Only the sandbox's own issuer
  (``{host}/{tenant id}/v2.0``, the managed-identity tokens it mints) can be verified here: its key
  signs them (RS256, app-only tokens).
  https://learn.microsoft.com/entra/workload-id/workload-identity-federation-config-app-trust-managed-identity

Failures carry the AADSTS code and text Entra uses: 50027 (invalid JWT), 700021 (assertion's app id
is not the client id), 700027 (signature / key not registered / key expired), 700024 (outside its
valid time range), 70021 (no matching federated identity record), 700229 (a user token as a
federated credential).
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from typing import Any

import jwt

from .state import ClientApp, FederatedCredential, RegisteredCertificate
from .tokens import SigningKey

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CLOCK_SKEW_S = 300  # Entra tolerates five minutes of clock skew
_CERT_ALGS = ("RS256", "PS256")
_DOCS = "https://learn.microsoft.com/entra/identity-platform/certificate-credentials"


@dataclass(frozen=True)
class AuthFailure:
    status: int
    error: str
    code: int
    text: str


def _invalid_jwt(reason: str) -> AuthFailure:
    return AuthFailure(401, "invalid_client", 50027, f"Invalid JWT token. {reason}")


def _iso(ts: float) -> str:
    return time.strftime("%m/%d/%Y %H:%M:%S", time.gmtime(ts))


def _time_failure(claims: dict[str, Any], now: float) -> AuthFailure | None:
    exp, nbf = claims.get("exp"), claims.get("nbf")
    if not isinstance(exp, (int, float)) or (nbf is not None and not isinstance(nbf, (int, float))):
        return _invalid_jwt("The token has no valid 'exp' / 'nbf' claim.")
    if exp + CLOCK_SKEW_S <= now or (nbf is not None and nbf - CLOCK_SKEW_S > now):
        start = f", assertion valid from {_iso(nbf)}" if nbf is not None else ""
        return AuthFailure(401, "invalid_client", 700024,
                           f"Client assertion is not within its valid time range. Current time: {_iso(now)}"
                           f"{start}, expiry time of assertion {_iso(exp)}. Review the documentation at {_DOCS} .")
    return None


def _unverified(assertion: str) -> tuple[dict[str, Any], dict[str, Any]] | AuthFailure:
    try:
        header = jwt.get_unverified_header(assertion)
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        return _invalid_jwt("Token format not valid.")
    for name in ("aud", "iss", "sub", "exp"):
        if not claims.get(name):
            return _invalid_jwt(f"The token has no '{name}' claim.")
    return header, claims


def _thumbprint(header: dict[str, Any]) -> tuple[str, str] | None:
    """('sha256' | 'sha1', hex) from the x5t#S256 / x5t header (base64url of the digest)."""
    for name, kind in (("x5t#S256", "sha256"), ("x5t", "sha1")):
        value = header.get(name)
        if isinstance(value, str) and value:
            try:
                return kind, base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()
            except (binascii.Error, ValueError):
                return None
    return None


def _find_certificate(client: ClientApp, kind: str, digest: str) -> RegisteredCertificate | None:
    attr = "thumbprint_sha256" if kind == "sha256" else "thumbprint_sha1"
    return next((c for c in client.certificates.values() if getattr(c, attr) == digest), None)


def _key_failure(client_id: str, thumbprint: str, reason: str) -> AuthFailure:
    return AuthFailure(
        401, "invalid_client", 700027,
        f"Client assertion contains an invalid signature. [Reason - {reason}, Thumbprint of key used by client: "
        f"'{thumbprint.upper()}', Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see "
        f"configured keys for app Id '{client_id}'. Review the documentation at {_DOCS} .]")


def _check_certificate(client: ClientApp, header: dict[str, Any], claims: dict[str, Any], assertion: str, *,
                       audiences: set[str], now: float) -> AuthFailure | None:
    if claims["sub"] != client.client_id:
        return AuthFailure(401, "invalid_client", 700021, "Client assertion application identifier doesn't match "
                           f"'client_id' parameter. Review the documentation at {_DOCS} .")
    if not claims.get("jti"):
        return _invalid_jwt("The token has no 'jti' claim.")
    if str(claims["aud"]).rstrip("/") not in audiences:
        return _invalid_jwt(f"Unexpected audience '{claims['aud']}': it must be the token endpoint.")
    if header.get("alg") not in _CERT_ALGS:
        return _invalid_jwt(f"'{header.get('alg')}' is not a supported signature algorithm.")
    found = _thumbprint(header)
    if found is None:
        return _invalid_jwt("The token header has no valid 'x5t' or 'x5t#S256'.")
    cert = _find_certificate(client, *found)
    if cert is None:
        return _key_failure(client.client_id, found[1], "The key was not found.")
    if not cert.valid:
        return _key_failure(client.client_id, found[1], "The key used is expired.")
    try:
        jwt.decode(assertion, cert.public_key, algorithms=[header["alg"]],
                   options={"verify_aud": False, "verify_exp": False, "verify_nbf": False, "verify_iat": False})
    except jwt.PyJWTError:
        return _key_failure(client.client_id, found[1],
                            "The provided signature value did not match the expected signature value.")
    return _time_failure(claims, now)


def _federated_failure(claims: dict[str, Any]) -> AuthFailure:
    return AuthFailure(
        400, "invalid_request", 70021,
        f"No matching federated identity record found for presented assertion. Assertion Issuer: '{claims['iss']}'. "
        f"Assertion Subject: '{claims['sub']}'. Assertion Audience: '{claims['aud']}'. "
        "https://learn.microsoft.com/entra/workload-id/workload-identity-federation")


def _matching_fic(client: ClientApp, claims: dict[str, Any]) -> FederatedCredential | None:
    auds = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    return next((f for f in client.federated if f.issuer == claims["iss"] and f.subject == claims["sub"]
                 and any(a in f.audiences for a in auds)), None)


def _check_federated(client: ClientApp, header: dict[str, Any], claims: dict[str, Any], assertion: str, *,
                     key: SigningKey, own_issuer_prefix: str, now: float) -> AuthFailure | None:
    if _matching_fic(client, claims) is None:
        return _federated_failure(claims)
    if not str(claims["iss"]).startswith(own_issuer_prefix) or header.get("alg") != "RS256":
        # Only tokens this sandbox signed can be verified (an external issuer's keys are not fetched).
        return _invalid_jwt("External ID token from issuer failed signature verification.")
    try:
        jwt.decode(assertion, key.public_key, algorithms=["RS256"],
                   options={"verify_aud": False, "verify_exp": False, "verify_nbf": False, "verify_iat": False})
    except jwt.PyJWTError:
        return _invalid_jwt("External ID token from issuer failed signature verification.")
    if claims.get("idtyp") == "user" or claims.get("scp"):
        return AuthFailure(400, "invalid_request", 700229,
                           "Only app-only tokens can be used as Federated Identity Credentials for Microsoft Entra "
                           "issuer. Use an app-only access token instead of a user-delegated access token.")
    return _time_failure(claims, now)


def check_client_assertion(client: ClientApp, assertion: str, assertion_type: str | None, *, key: SigningKey,
                           host: str, tenant: str, now: float) -> tuple[str, AuthFailure | None]:
    """Authenticate ``client`` by its assertion: ("certificate" | "federated", None) or the failure."""
    if not assertion_type:
        return "assertion", AuthFailure(400, "invalid_request", 900144, "The request body must contain the "
                                        "following parameter: 'client_assertion_type'.")
    if assertion_type != JWT_BEARER:
        return "assertion", _invalid_jwt(f"The client_assertion_type '{assertion_type}' is not supported.")
    parsed = _unverified(assertion)
    if isinstance(parsed, AuthFailure):
        return "assertion", parsed
    header, claims = parsed
    if claims["iss"] == client.client_id:
        audiences = {f"{host}/{tenant}/oauth2/v2.0/token", f"{host}/{tenant}/oauth2/token"}
        return "certificate", _check_certificate(client, header, claims, assertion, audiences=audiences, now=now)
    if claims["sub"] == client.client_id:  # signed as the app, but with a different issuer
        return "certificate", AuthFailure(401, "invalid_client", 700021, "Client assertion application identifier "
                                          f"doesn't match 'client_id' parameter. Review the documentation at {_DOCS} .")
    return "federated", _check_federated(client, header, claims, assertion, key=key, own_issuer_prefix=f"{host}/",
                                         now=now)
