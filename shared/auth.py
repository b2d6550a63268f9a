"""Caller authentication: a bearer JWT issued by the integrating product (SPEC §3).

Validated with PyJWT against ``AUTH_JWKS_URL`` (RS256/ES256; keys cached, re-fetched when an
unknown ``kid`` appears so the issuer can rotate keys) or ``AUTH_HS256_SECRET``. ``iss``,
``aud``, ``exp`` and ``nbf`` are required and checked (RFC 7519 §4.1). The owner is ``sub``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import jwt

from shared.config import Settings
from shared.errors import AuthenticationError

_ALGS_JWKS = ["RS256", "ES256"]
_LEEWAY_S = 60  # clock skew tolerated on exp/nbf
_JWKS_MIN_REFRESH_S = 60  # an unknown kid re-fetches the JWKS at most once a minute
_JWKS_MAX_AGE_S = 3600  # and the set is re-read hourly, so a key the issuer withdrew stops being trusted


class CallerAuth:
    def __init__(self, settings: Settings, *, session: Any = None) -> None:
        self._s = settings
        self._session = session
        self._lock = threading.Lock()
        self._keys: dict[str, Any] = {}
        self._fetched_at = 0.0

    def _fetch_jwks(self) -> None:
        if not self._s.auth_jwks_url:
            raise AuthenticationError("No AUTH_JWKS_URL is configured.")
        resp = self._session.get(self._s.auth_jwks_url, timeout=(5, 10))
        resp.raise_for_status()
        keys = {}
        for jwk in resp.json().get("keys", []):
            try:
                keys[jwk.get("kid", "")] = jwt.PyJWK(jwk).key
            except (jwt.PyJWTError, ValueError, KeyError):
                continue  # an unsupported key type in the set is not our problem
        self._keys = keys
        self._fetched_at = time.monotonic()

    def _jwks_key(self, kid: str) -> Any:
        with self._lock:
            age = time.monotonic() - self._fetched_at
            if age > _JWKS_MAX_AGE_S or (kid not in self._keys and age > _JWKS_MIN_REFRESH_S):
                try:
                    self._fetch_jwks()
                except Exception:
                    if kid not in self._keys or age > 2 * _JWKS_MAX_AGE_S:
                        raise AuthenticationError("The caller token's signing keys could not be fetched.") from None
                    # The issuer is briefly unreachable: keep trusting the set read less than 2 h ago.
            key = self._keys.get(kid)
        if key is None:
            raise AuthenticationError("The caller token is signed with an unknown key.")
        return key

    def authenticate(self, authorization: str | None) -> str:
        """Return the owner (``sub``) of a valid ``Authorization: Bearer`` header, else raise."""
        if not authorization:
            raise AuthenticationError("Send a bearer token: Authorization: Bearer <JWT>.")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("The Authorization header must use the Bearer scheme.")
        token = token.strip()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationError("The caller token is not a JWT.") from None
        alg = header.get("alg")
        if self._s.auth_jwks_url and alg in _ALGS_JWKS:
            key, algs = self._jwks_key(str(header.get("kid", ""))), [str(alg)]
        elif self._s.auth_hs256_secret and alg == "HS256":
            key, algs = self._s.auth_hs256_secret, ["HS256"]
        else:
            raise AuthenticationError("The caller token's algorithm is not accepted.")
        try:
            claims = jwt.decode(
                token, key, algorithms=algs, audience=self._s.auth_audience, issuer=self._s.auth_issuer,
                leeway=_LEEWAY_S, options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("The caller token has expired.") from None
        except jwt.ImmatureSignatureError:
            raise AuthenticationError("The caller token is not valid yet (nbf).") from None
        except jwt.InvalidAudienceError:
            raise AuthenticationError("The caller token is for another audience.") from None
        except jwt.InvalidIssuerError:
            raise AuthenticationError("The caller token is from another issuer.") from None
        except (jwt.PyJWTError, TypeError, ValueError) as e:
            # TypeError: the header's algorithm does not fit the key type (an ES256 header over an RSA
            # key); PyJWT raises it outside its own exception tree.
            raise AuthenticationError(f"The caller token is invalid: {type(e).__name__}.") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 256:
            raise AuthenticationError("The caller token has no usable sub claim.")
        return sub


def issue_dev_token(settings: Settings, sub: str, *, lifetime_s: int = 12 * 3600) -> str:
    """A development caller token signed with AUTH_HS256_SECRET (the devstack and tests use it)."""
    if not settings.auth_hs256_secret:
        raise ValueError("AUTH_HS256_SECRET is not set")
    now = int(time.time())
    claims = {"sub": sub, "iss": settings.auth_issuer, "aud": settings.auth_audience,
              "iat": now, "nbf": now, "exp": now + lifetime_s}
    return jwt.encode(claims, settings.auth_hs256_secret, algorithm="HS256")
