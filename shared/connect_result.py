"""The ``result`` token of a successful connect and the public keys that verify it.

A connect link (``authUrl``) is a bearer capability while its state lives: forwarded to someone
else, it attaches *their* mailbox to the owner who asked for it. RFC 9700 §4.7 (OAuth 2.0 Security
BCP, CSRF) asks the client to bind the flow to the user agent that started it; the integrating
product, not this service, holds that user agent's session. So the success redirect carries
``result``, a short-lived signed statement of *whose* flow completed:

* a JWT (RFC 7519) signed ES256 (ECDSA P-256 / SHA-256, RFC 7518 §3.4), header ``typ``
  ``connect-result+jwt`` (RFC 8725 §3.11, explicit typing) and ``kid``;
* claims ``iss`` (PUBLIC_BASE_URL), ``aud`` (AUTH_ISSUER: the product that issued the caller's JWT),
  ``sub`` (the owner), ``accountId`` (or, for an admin consent, ``tenantConnectionId``), ``stateHash``
  (base64url SHA-256 of ``state``, no padding),
  ``iat``, ``exp`` (+ :data:`RESULT_TTL_S`) and ``jti``.

The integrator's back end verifies it with the public keys served at
``GET /api/connect/microsoft/keys`` (a JWK Set, RFC 7517 §5) and compares ``sub`` and ``stateHash``
with the session that started the connect (docs/connect-security.md).

The signing keys are derived from the token key ring (HKDF, :meth:`shared.crypto.KeyRing.derive`):
one P-256 key per key-ring key id, private scalar from 40 derived bytes reduced as in FIPS 186-5
A.2.1 ("extra random bits"). No new secret exists; a key-ring rotation rotates them, and every key
still in the ring keeps its public key published so tokens signed just before a rotation verify.
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from typing import TYPE_CHECKING

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

if TYPE_CHECKING:
    from shared.crypto import KeyRing

RESULT_TTL_S = 300
ALGORITHM = "ES256"
TOKEN_TYPE = "connect-result+jwt"
_PURPOSE = "connect-result-signing/v1"
# The order n of the P-256 group (SEC 2 §2.4.2; FIPS 186-5 / SP 800-186 §3.2.1.3).
_P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
JwkSet = dict[str, list[dict[str, str]]]


def state_hash(state: str) -> str:
    """base64url (RFC 4648 §5, no padding) of SHA-256 of the state string's UTF-8 bytes."""
    return base64.urlsafe_b64encode(hashlib.sha256(state.encode("utf-8")).digest()).rstrip(b"=").decode()


def _jwk_kid(ring_kid: str) -> str:
    return f"connect-result-{ring_kid}"


def _private_key(ring: KeyRing, ring_kid: str) -> ec.EllipticCurvePrivateKey:
    # FIPS 186-5 A.2.1: 64 more bits than the order's 256, reduced mod n-1, plus 1 (bias < 2^-64).
    seed = ring.derive(_PURPOSE, kid=ring_kid, length=40)
    d = int.from_bytes(seed, "big") % (_P256_N - 1) + 1
    return ec.derive_private_key(d, ec.SECP256R1())


def sign(ring: KeyRing, *, issuer: str, audience: str, owner: str, account_id: str | None = None, state: str,
         tenant_connection_id: str | None = None, now: int | None = None) -> str:
    """The ``result`` token for one completed connect (``account_id``) or admin consent (``tenant_connection_id``),
    signed with the active key's derived key."""
    iat = int(time.time()) if now is None else now
    what: dict[str, object] = ({"tenantConnectionId": tenant_connection_id} if tenant_connection_id
                               else {"accountId": account_id})
    claims: dict[str, object] = {"iss": issuer, "aud": audience, "sub": owner, **what, "stateHash": state_hash(state),
              "iat": iat, "exp": iat + RESULT_TTL_S, "jti": uuid.uuid4().hex}
    key = _private_key(ring, ring.active_kid)
    return jwt.encode(claims, key, algorithm=ALGORITHM,
                      headers={"kid": _jwk_kid(ring.active_kid), "typ": TOKEN_TYPE})


def jwks(ring: KeyRing) -> JwkSet:
    """The public keys of every key-ring key (RFC 7517 §5), active first."""
    keys: list[dict[str, str]] = []
    for ring_kid in [ring.active_kid] + [k for k in ring.kids if k != ring.active_kid]:
        public = _private_key(ring, ring_kid).public_key()
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        keys.append({"kty": str(jwk["kty"]), "crv": str(jwk["crv"]), "x": str(jwk["x"]), "y": str(jwk["y"]),
                     "kid": _jwk_kid(ring_kid), "use": "sig", "alg": ALGORITHM})
    return {"keys": keys}
