"""Signing keys (a JWKS, RFC 7517) fetched through the app's injected HTTP session, for the caller tokens
(:mod:`shared.auth`) and Graph's notification validation tokens (:mod:`shared.rich_notifications`)."""

from __future__ import annotations

import logging
import time
from typing import Any

import jwt
import requests

JWKS_MIN_REFRESH_S = 60  # an unknown kid re-fetches the JWKS at most once a minute
JWKS_MAX_AGE_S = 3600  # and the set is re-read hourly, so a key the issuer withdrew stops being trusted
# An unreachable issuer: a failed re-read falls back to the last set read less than 2 h ago, which is then
# cached for one more JWKS_MAX_AGE_S (so at most ~3 h without a successful read), not a total outage.
JWKS_STALE_S = 2 * 3600
JWKS_TIMEOUT = (5, 10)  # (connect, read) seconds
log = logging.getLogger("connector.auth")


class SessionJWKClient(jwt.PyJWKClient):
    """``PyJWKClient`` fetching through the app's injected session.

    The stock client uses urllib, which honours ``*_PROXY`` from the environment and ignores
    ``MS_CA_BUNDLE``; the app's session does neither (see ``shared._http``)."""

    def __init__(self, uri: str, *, session: requests.Session) -> None:
        super().__init__(uri, lifespan=JWKS_MAX_AGE_S, cooldown_duration=JWKS_MIN_REFRESH_S)
        self._session = session
        self._last_good: tuple[float, dict[str, Any]] | None = None

    def fetch_data(self) -> dict[str, Any]:
        try:
            resp = self._session.get(self.uri, timeout=JWKS_TIMEOUT)
            resp.raise_for_status()
            data = self._as_jwk_set_payload(resp.json())
        except (requests.RequestException, ValueError, jwt.PyJWKClientError) as e:
            if self._last_good and time.monotonic() - self._last_good[0] < JWKS_STALE_S:
                log.warning("JWKS fetch from %s failed (%s); using the last set read", self.uri.split("?")[0],
                            type(e).__name__)
                return self._last_good[1]
            raise jwt.PyJWKClientConnectionError(f"JWKS fetch failed: {type(e).__name__}") from e
        self._last_good = (time.monotonic(), data)
        # The base class's fetch_data starts the unknown-kid cooldown on every successful fetch; do the same.
        self._last_successful_fetch = time.monotonic()
        return data
