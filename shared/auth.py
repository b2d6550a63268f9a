"""Caller authentication: a bearer JWT issued by the integrating product.

Validated with PyJWT against ``AUTH_JWKS_URL`` (RS256/ES256; keys cached by ``jwt.PyJWKClient``,
re-fetched when an unknown ``kid`` appears so the issuer can rotate keys) or ``AUTH_HS256_SECRET``.
``iss``, ``aud``, ``exp`` and ``sub`` are required and checked (RFC 7519 §4.1); ``nbf`` is checked
when present (RFC 7519 §4.1.5 makes it optional, and many identity providers issue access tokens
without it). The owner is ``sub``: 1-256 characters, valid Unicode (no lone surrogates), no control,
format or separator characters, so it can be hashed, stored and logged as it is.
"""

from __future__ import annotations

import logging
import time
import unicodedata

import jwt
import requests

from shared.config import Settings
from shared.errors import AuthenticationError
from shared.jwks import SessionJWKClient

_ALGS_JWKS = ["RS256", "ES256"]
_LEEWAY_S = 60  # clock skew tolerated on exp/nbf
log = logging.getLogger("connector.auth")


class CallerAuth:
    def __init__(self, settings: Settings, *, session: requests.Session | None = None) -> None:
        self._s = settings
        self._jwks: SessionJWKClient | None = None
        if settings.auth_jwks_url:
            if session is None:
                from shared._http import new_session

                session = new_session(settings.ca_bundle)
            self._jwks = SessionJWKClient(settings.auth_jwks_url, session=session)

    @staticmethod
    def _jwks_key(jwks: SessionJWKClient, kid: str) -> jwt.PyJWK:
        try:
            return jwks.get_signing_key(kid)
        except jwt.PyJWKClientConnectionError:
            raise AuthenticationError("The caller token's signing keys could not be fetched.") from None
        except (jwt.PyJWKClientError, jwt.PyJWKSetError):
            # PyJWKClient re-read the set for an unknown kid (at most once a minute) and still has none.
            raise AuthenticationError("The caller token is signed with an unknown key.") from None

    def authenticate(self, authorization: str | None) -> str:
        """Return the owner (``sub``) of a valid ``Authorization: Bearer`` header, else raise."""
        if not authorization:
            # RFC 6750 §3.1: a request with no authentication at all gets no error code, only the scheme.
            raise AuthenticationError("Send a bearer token: Authorization: Bearer <JWT>.",
                                      headers={"WWW-Authenticate": "Bearer"})
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("The Authorization header must use the Bearer scheme.")
        token = token.strip()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationError("The caller token is not a JWT.") from None
        alg = header.get("alg")
        key: jwt.PyJWK | str
        if self._jwks is not None and alg in _ALGS_JWKS:
            # A PyJWK is bound to its key type's algorithm: an ES256 header over an RSA key is rejected.
            key, algs = self._jwks_key(self._jwks, str(header.get("kid", ""))), [str(alg)]
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
            # TypeError/ValueError: a key PyJWT cannot use raises outside its own exception tree.
            raise AuthenticationError(f"The caller token is invalid: {type(e).__name__}.") from None
        self._check_lifetime(claims)
        sub = claims.get("sub")
        if not isinstance(sub, str) or not _usable_sub(sub):
            raise AuthenticationError("The caller token has no usable sub claim.")
        return sub


    def _check_lifetime(self, claims: dict[str, object]) -> None:
        """``exp`` - ``iat`` (or, without ``iat``, the time left) within AUTH_MAX_TOKEN_LIFETIME_SECONDS: a
        token minted to live for a year stays a bearer credential for a year if it leaks (RFC 8725 §3.10)."""
        cap = self._s.auth_max_token_lifetime_seconds
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool):
            raise AuthenticationError("The caller token's exp is not a number.")
        if iat is not None and (not isinstance(iat, (int, float)) or isinstance(iat, bool)):
            raise AuthenticationError("The caller token's iat is not a number.")
        start = float(iat) if iat is not None else time.time()
        if exp - start > cap + _LEEWAY_S:
            raise AuthenticationError(f"The caller token lives longer than {cap} seconds "
                                      "(AUTH_MAX_TOKEN_LIFETIME_SECONDS); issue shorter-lived tokens.")


# Unicode general categories a subject identifier never needs: controls, format characters (bidi
# overrides, zero-width), surrogates, private use, unassigned, and line/paragraph separators.
_BAD_SUB_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))


def _usable_sub(sub: str) -> bool:
    if not 1 <= len(sub) <= 256 or sub != sub.strip():
        return False
    return all(unicodedata.category(c) not in _BAD_SUB_CATEGORIES for c in sub)


def issue_dev_token(settings: Settings, sub: str, *, lifetime_s: int = 12 * 3600) -> str:
    """A development caller token signed with AUTH_HS256_SECRET (the devstack and tests use it)."""
    if not settings.auth_hs256_secret:
        raise ValueError("AUTH_HS256_SECRET is not set")
    now = int(time.time())
    claims = {"sub": sub, "iss": settings.auth_issuer, "aud": settings.auth_audience,
              "iat": now, "nbf": now, "exp": now + lifetime_s}
    return jwt.encode(claims, settings.auth_hs256_secret, algorithm="HS256")
