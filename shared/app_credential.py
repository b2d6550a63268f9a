"""The app's own credential towards Entra (``MS_CLIENT_CREDENTIAL``): which one to present, and what to
present instead when Entra rejects it.

* ``secret``: the client secret (Key Vault secret ``MS_CLIENT_SECRET_NAME``, or ``MS_CLIENT_SECRET`` locally);
* ``certificate``: the Key Vault certificate ``MS_CLIENT_CERT_NAME`` read as its secret, presented with its
  thumbprint; while Entra rejects the newest version (AADSTS700027: not uploaded to the app registration
  yet) the previous enabled, unexpired version is presented, and the newest is tried again every
  ``MS_CLIENT_CERT_RETRY_SECONDS`` (:mod:`shared.certificate_rotation`);
* ``managed_identity``: the user-assigned identity's token for ``MS_CLIENT_ASSERTION_AUDIENCE`` as
  ``client_assertion`` (a federated identity credential on the app registration; no secret exists).

When Entra rejects the credential (AADSTS7000215 / 7000222 for a secret, 700027 for a certificate, 700024 /
70021 for an assertion) :meth:`AppCredential.reject` re-reads it, so a secret or certificate rotated in the
vault is picked up without a restart, and says whether a retry can present another one. The vault is
re-read at most once per re-read interval while nothing is accepted (:meth:`shared.secret_store.SecretStore.reread`):
a credential that stays rejected costs one vault read per interval, not one per token request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from shared.certificate_rotation import CertificateRotation, CertificateVersion
from shared.client_credentials import (
    ClientCredential,
    ManagedIdentityAssertion,
    certificate_credential,
    secret_credential,
)

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential

    from shared.config import Settings
    from shared.secret_store import SecretStore


class AppCredential:
    """Thread-safe enough: every field is replaced whole; the vault reads are the store's single flight."""

    def __init__(self, settings: Settings, *, vault: SecretStore,
                 assertion_credential: TokenCredential | None = None, cert_retry_seconds: float | None = None,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time) -> None:
        self._kind = settings.client_credential
        self._secret_name = settings.client_secret_name
        self._cert_name = settings.client_cert_name
        self._vault = vault
        self._clock = clock
        self._wall = wall_clock
        retry = settings.client_cert_retry_seconds if cert_retry_seconds is None else cert_retry_seconds
        self._rotation = CertificateRotation(retry, clock=clock, wall_clock=wall_clock)
        self._accepted_at = float("-inf")  # when Entra last accepted the app's credential (clock)
        self._searched_at: float | None = None  # when earlier certificate versions were last looked up
        self._assertion = ManagedIdentityAssertion(
            lambda: assertion_credential if assertion_credential is not None else _managed_identity(settings),
            settings.client_assertion_audience)

    def current(self) -> ClientCredential:
        """The app's credential as MSAL takes it."""
        if self._kind == "certificate":
            return certificate_credential(self._rotation.choose(self._vault.newest_certificate()).cert)
        if self._kind == "managed_identity":
            return ClientCredential("managed_identity", "managed-identity", {"client_assertion": self._assertion})
        return secret_credential(self._vault.client_secret())

    def reject(self, credential: ClientCredential, code: str) -> ClientCredential | None:
        """Entra rejected ``credential`` (product error ``code``): the credential to present instead, or None.

        Re-reads it (throttled); for a certificate Entra does not know (``invalid_client_certificate``,
        AADSTS700027) falls back to the previous version."""
        if self._kind == "managed_identity":
            self._assertion.invalidate()  # a new token from the identity endpoint: worth one retry
            return self.current()
        if self._kind == "certificate":
            cert = self._certificate_rejected(credential, code)
            return None if cert is None else certificate_credential(cert.cert)
        if not self._vault.reread(self._secret_name, accepted_at=self._accepted_at):
            return None
        fresh = self.current()
        return fresh if fresh.version != credential.version else None

    def accept(self, credential: ClientCredential) -> None:
        """Entra accepted ``credential``: a later rejection re-reads at once; a newest certificate ends the fallback."""
        self._accepted_at = self._clock()
        if credential.kind == "certificate":
            self._rotation.accepted(credential.version)

    def warning(self) -> dict[str, str] | None:
        """An operator hint while the previous certificate is presented because Entra rejects the newest."""
        status = self._rotation.status() if self._kind == "certificate" else None
        return None if status is None else status.health(self._cert_name)

    def check(self) -> None:
        """Raise :class:`shared.errors.SecretUnavailableError` unless the credential can be read (``/api/health``).

        Served from the store's cache like any read, so a vault that stops answering (or an identity that loses
        access) fails the health check within the cache's TTL. For ``managed_identity`` it gets (or reuses) the
        identity's token for the assertion."""
        if self.current().kind == "managed_identity":
            self._assertion()

    # -- certificate rotation --------------------------------------------------------------------
    def _certificate_rejected(self, credential: ClientCredential, code: str) -> CertificateVersion | None:
        if self._rotation.is_fallback(credential.version):
            self._rotation.fallback_rejected(credential.version)
            return self._vault.newest_certificate()  # the previous version is gone from Entra: the newest again
        if self._vault.reread(self._cert_name, accepted_at=self._accepted_at):
            newest = self._vault.newest_certificate()
            if newest.thumbprint != credential.version:
                return newest  # rotated in the vault to a version Entra may know
        if code != "invalid_client_certificate":
            return None
        return self._fall_back(credential)

    def _fall_back(self, rejected: ClientCredential) -> CertificateVersion | None:
        """Entra does not know the newest version: present the previous one (looked up at most once per
        re-read interval while nothing is accepted; else the one known from before)."""
        newest = self._vault.newest_certificate()
        if newest.thumbprint != rejected.version:
            return newest  # another version is the newest by now
        if self._search_allowed():
            self._searched_at = self._clock()
            previous = self._vault.earlier_certificate(newest, skip=self._rotation.excluded() | {newest.thumbprint},
                                                        valid_at=self._wall())
        else:
            previous = self._rotation.held()
        if previous is not None:
            self._rotation.engage(newest, previous)
        return previous

    def _search_allowed(self) -> bool:
        at = self._searched_at
        return at is None or self._clock() - at >= self._vault.reread_interval_s or self._accepted_at > at


def _managed_identity(settings: Settings) -> TokenCredential:
    """The user-assigned identity (``AZURE_CLIENT_ID``) whose token is the federated client assertion."""
    from azure.identity import ManagedIdentityCredential

    return ManagedIdentityCredential(client_id=settings.azure_client_id)
