"""Which version of the Key Vault certificate the app presents to Entra (``MS_CLIENT_CREDENTIAL=certificate``).

Key Vault renews a certificate by creating a new version with a **new key pair** (auto-renewal at ~80%
of its lifetime, or an operator's ``az keyvault certificate create``). Entra only accepts keys uploaded
to the app registration, and the new public certificate cannot be uploaded before it exists, so for a
while the newest version is unknown to Entra (AADSTS700027). Presenting only the newest would stop
every sign-in and refresh until someone uploads it.

:class:`CertificateRotation` keeps the app working meanwhile: after Entra rejects the newest version
(and a re-read of the vault still gives that version), ``shared.secret_store`` finds the previous
enabled, unexpired version of the certificate's secret and :meth:`CertificateRotation.engage` makes
it the one presented. The newest is tried again every ``retry_seconds`` and at once when Entra
rejects the previous version too; the first time Entra accepts the newest, the fallback ends.
:meth:`status` is the operator hint ``/api/health`` shows.

Only thumbprints (public identifiers of certificates) are logged or reported, never key material.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.client_credentials import ClientCertificate

log = logging.getLogger("connector.credentials")

#: How often the newest version is tried again while the previous one is in use (seconds).
DEFAULT_RETRY_SECONDS = 900


@dataclass(frozen=True)
class CertificateVersion:
    """One version of the certificate's secret: its Key Vault version id and the parsed certificate."""

    version: str
    cert: ClientCertificate

    @property
    def thumbprint(self) -> str:
        """SHA-256 thumbprint (hex): also the ``ClientCredential.version`` MSAL's app is keyed on."""
        return self.cert.thumbprint_sha256


@dataclass(frozen=True)
class FallbackStatus:
    """The newest version Entra rejects and the previous one presented instead (for health and logs)."""

    newest: CertificateVersion
    fallback: CertificateVersion
    since: float  # epoch seconds
    retry_in_seconds: float

    def health(self, cert_name: str) -> dict[str, str]:
        since = dt.datetime.fromtimestamp(self.since, dt.timezone.utc).isoformat(timespec="seconds")
        return {
            "warning": "certificate_not_registered",
            "detail": (f"Entra rejects the newest version of Key Vault certificate '{cert_name}' (SHA-1 thumbprint "
                       f"{self.newest.cert.thumbprint_sha1.upper()}, AADSTS700027) since {since}; the app uses "
                       f"the previous version (SHA-1 thumbprint {self.fallback.cert.thumbprint_sha1.upper()}) "
                       "meanwhile."),
            "hint": (f"Upload the new public certificate of '{cert_name}' to the app registration (Certificates & "
                     "secrets, or az ad app credential reset --append; docs/deploy.md). The app tries the newest "
                     f"version again within {int(self.retry_in_seconds)} s and switches without a restart."),
        }


class CertificateRotation:
    """Thread-safe state: the fallback version in use, if any, and when to try the newest again."""

    def __init__(self, retry_seconds: float = DEFAULT_RETRY_SECONDS, *, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._retry_s = retry_seconds
        self._clock = clock
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._fallback: FallbackStatus | None = None
        self._retry_at = 0.0
        self._rejected: dict[str, float] = {}  # thumbprint -> when Entra last rejected it (monotonic)

    def choose(self, newest: CertificateVersion) -> CertificateVersion:
        """The version to present: the fallback while Entra rejects ``newest`` and no retry is due, else ``newest``."""
        with self._lock:
            state = self._fallback
            if state is None or state.newest.thumbprint != newest.thumbprint:
                return newest  # no fallback, or the vault has an even newer version: try that one
            if self._clock() >= self._retry_at or state.fallback.cert.not_after <= self._wall():
                return newest
            return state.fallback

    def is_fallback(self, thumbprint: str) -> bool:
        with self._lock:
            return self._fallback is not None and self._fallback.fallback.thumbprint == thumbprint

    def held(self) -> CertificateVersion | None:
        """The fallback known from before, unless Entra rejected it since or it has expired."""
        with self._lock:
            state = self._fallback
            if state is None or state.fallback.thumbprint in self._recently_rejected():
                return None
            return state.fallback if state.fallback.cert.not_after > self._wall() else None

    def excluded(self) -> set[str]:
        """Thumbprints Entra rejected within the retry interval: not worth presenting as a fallback."""
        with self._lock:
            return self._recently_rejected()

    def engage(self, newest: CertificateVersion, fallback: CertificateVersion) -> None:
        """Entra rejects ``newest``: present ``fallback`` until the next retry of the newest."""
        with self._lock:
            now = self._clock()
            self._rejected[newest.thumbprint] = now
            previous = self._fallback
            since = previous.since if previous is not None and previous.newest == newest else self._wall()
            self._fallback = FallbackStatus(newest, fallback, since, self._retry_s)
            self._retry_at = now + self._retry_s
        log.warning(
            "Entra rejects the newest version of the Key Vault certificate (thumbprint %s, AADSTS700027): the app "
            "registration does not have it yet. Using the previous version (thumbprint %s) meanwhile; upload the "
            "new certificate to the app registration. The newest is tried again in %d s.",
            newest.cert.thumbprint_sha1.upper(), fallback.cert.thumbprint_sha1.upper(), int(self._retry_s))

    def fallback_rejected(self, thumbprint: str) -> None:
        """Entra rejects the fallback too (removed or expired there): present the newest again."""
        with self._lock:
            self._rejected[thumbprint] = self._clock()
            self._fallback = None
        log.warning("Entra rejects the previous version of the Key Vault certificate too (AADSTS700027); "
                    "trying the newest version again.")

    def accepted(self, thumbprint: str) -> None:
        """Entra accepted the certificate with ``thumbprint``: the newest one ends the fallback."""
        with self._lock:
            self._rejected.pop(thumbprint, None)
            state = self._fallback
            if state is None or state.newest.thumbprint != thumbprint:
                return
            self._fallback = None
        log.info("Entra accepts the newest version of the Key Vault certificate (thumbprint %s) now; the "
                    "previous version is no longer used.", state.newest.cert.thumbprint_sha1.upper())

    def status(self) -> FallbackStatus | None:
        with self._lock:
            return self._fallback

    def _recently_rejected(self) -> set[str]:
        horizon = self._clock() - self._retry_s
        return {t for t, at in self._rejected.items() if at > horizon}
