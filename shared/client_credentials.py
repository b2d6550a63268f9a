"""The app's own credential towards Entra (``MS_CLIENT_CREDENTIAL``), as MSAL takes it.

Three kinds, each handed to ``msal.ConfidentialClientApplication(client_credential=...)``:

* ``secret``: the client secret string (Key Vault secret ``MS_CLIENT_SECRET_NAME``).
* ``certificate``: a Key Vault certificate ``MS_CLIENT_CERT_NAME``. Key Vault exposes a certificate's
  private key as the *secret* of the same name, either PEM (``application/x-pem-file``: key and
  certificate chain) or base64 PKCS#12 (``application/x-pkcs12``)
  (https://learn.microsoft.com/azure/key-vault/certificates/about-certificates#composition-of-a-certificate).
  :func:`parse_certificate` turns either into :class:`ClientCertificate`; MSAL gets
  ``{"private_key", "public_certificate"}`` and signs the client assertion (RFC 7523) itself: header
  ``x5t#S256`` (the SHA-256 thumbprint it computes from the certificate) and ``x5c``, claims
  ``aud`` = token endpoint, ``iss`` = ``sub`` = client id, ``jti``, ``exp``
  (https://learn.microsoft.com/entra/identity-platform/certificate-credentials). MSAL documents its
  SHA-1 ``"thumbprint"`` form as deprecated, so it is not used; ``x5c`` also makes subject name +
  issuer authentication work where the app registration is set up for it.
* ``managed_identity``: no secret at all. The app registration has a federated identity credential
  that trusts the function app's user-assigned managed identity; :class:`ManagedIdentityAssertion`
  is the ``client_assertion`` callable MSAL invokes per token request: the identity's token for
  ``api://AzureADTokenExchange`` from azure-identity's ``ManagedIdentityCredential``, cached until
  shortly before it expires
  (https://learn.microsoft.com/entra/workload-id/workload-identity-federation-config-app-trust-managed-identity).

Nothing here logs, prints or puts into an exception a key, a secret or an assertion.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shared.errors import SecretUnavailableError

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

#: What MSAL takes as ``client_credential``: the secret, ``{"private_key", "public_certificate"}`` (it signs
#: the assertion), or ``{"client_assertion": callable}``.
MsalCredential = str | dict[str, str] | dict[str, "ManagedIdentityAssertion"]

#: Refresh the managed identity's token when it has less than this left (seconds).
ASSERTION_REFRESH_MARGIN_S = 300
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\s.*?-----END \1-----", re.S)


@dataclass(frozen=True)
class ClientCertificate:
    """A certificate credential: the private key (never in repr) and its public certificate."""

    private_key_pem: str = field(repr=False)
    certificate_pem: str
    thumbprint_sha1: str  # hex, what the Entra portal shows as "Thumbprint"
    thumbprint_sha256: str  # hex; base64url of its bytes is the assertion's x5t#S256
    not_after: float  # epoch seconds


@dataclass(frozen=True)
class ClientCredential:
    """What MSAL takes as ``client_credential``, plus ``version``: it changes when the credential does."""

    kind: str
    version: str
    msal: MsalCredential = field(repr=False)


class CertificateError(ValueError):
    """The stored value is not a usable certificate credential (the message never quotes it)."""


def _load_pem(raw: str) -> tuple[PrivateKeyTypes | None, list[x509.Certificate]]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key: PrivateKeyTypes | None = None
    certs: list[x509.Certificate] = []
    for match in _PEM_BLOCK.finditer(raw):
        tag, block = match.group(1), match.group(0).encode()
        if tag == "CERTIFICATE":
            certs.append(x509.load_pem_x509_certificate(block))
        elif tag == "ENCRYPTED PRIVATE KEY":
            raise CertificateError("the private key is encrypted; store it without a password")
        elif tag.endswith("PRIVATE KEY") and key is None:
            key = serialization.load_pem_private_key(block, password=None)
    return key, certs


def _load_pkcs12(raw: str) -> tuple[PrivateKeyTypes | None, list[x509.Certificate]]:
    from cryptography.hazmat.primitives.serialization import pkcs12

    try:
        data = base64.b64decode("".join(raw.split()), validate=True)
    except (binascii.Error, ValueError):
        raise CertificateError("it is neither PEM nor base64 PKCS#12") from None
    key, cert, extra = pkcs12.load_key_and_certificates(data, None)
    return key, ([cert] if cert is not None else []) + list(extra or [])


def parse_certificate(raw: str) -> ClientCertificate:
    """The key and the matching (leaf) certificate of a Key Vault certificate's secret value."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    try:
        key, certs = _load_pem(raw) if "-----BEGIN" in raw else _load_pkcs12(raw)
    except CertificateError:
        raise
    except (ValueError, TypeError):
        raise CertificateError("the key or certificate could not be parsed") from None
    if key is None or not certs:
        raise CertificateError("it must hold both the private key and the certificate")
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CertificateError("Entra client certificates must have an RSA key")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    mine = key.public_key().public_bytes(serialization.Encoding.DER, spki)
    leaf = next((c for c in certs if c.public_key().public_bytes(serialization.Encoding.DER, spki) == mine), None)
    if leaf is None:
        raise CertificateError("no certificate in it matches the private key")
    pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode("ascii")
    return ClientCertificate(
        private_key_pem=pkcs8,
        certificate_pem=leaf.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        thumbprint_sha1=leaf.fingerprint(hashes.SHA1()).hex(),  # noqa: S303 (an identifier Entra displays)
        thumbprint_sha256=leaf.fingerprint(hashes.SHA256()).hex(),
        not_after=leaf.not_valid_after_utc.timestamp(),
    )


def secret_credential(secret: str) -> ClientCredential:
    return ClientCredential("secret", hashlib.sha256(secret.encode()).hexdigest()[:16], secret)


def certificate_credential(cert: ClientCertificate) -> ClientCredential:
    return ClientCredential("certificate", cert.thumbprint_sha256,
                            {"private_key": cert.private_key_pem, "public_certificate": cert.certificate_pem})


class ManagedIdentityAssertion:
    """MSAL ``client_assertion`` callable: the managed identity's token for the token-exchange audience.

    ``credential_factory()`` builds the azure-identity credential on first use (imports stay lazy). The
    token is reused until :data:`ASSERTION_REFRESH_MARGIN_S` before ``expires_on``; :meth:`invalidate`
    (after Entra rejected an assertion) forces a new one. Thread-safe; failures raise
    :class:`SecretUnavailableError` naming the identity, never a token.
    """

    def __init__(self, credential_factory: Callable[[], TokenCredential], audience: str, *,
                 clock: Callable[[], float] = time.time, margin_s: float = ASSERTION_REFRESH_MARGIN_S) -> None:
        self._factory = credential_factory
        self._scope = audience.rstrip("/") + "/.default"
        self._audience = audience
        self._clock = clock
        self._margin = margin_s
        self._lock = threading.Lock()
        self._credential: TokenCredential | None = None
        self._token: str | None = None
        self._expires_on = 0.0

    def __repr__(self) -> str:
        return f"ManagedIdentityAssertion(audience={self._audience!r})"

    def __call__(self) -> str:
        with self._lock:
            if self._token is None or self._clock() >= self._expires_on - self._margin:
                self._token, self._expires_on = self._fetch()
            return self._token

    def invalidate(self) -> None:
        # A new credential too: azure-identity caches the token it returned, and Entra just refused it.
        with self._lock:
            self._token, self._expires_on = None, 0.0
            stale, self._credential = self._credential, None
        close = getattr(stale, "close", None)
        if callable(close):
            close()

    def _fetch(self) -> tuple[str, float]:
        from azure.core.exceptions import AzureError

        try:
            if self._credential is None:
                self._credential = self._factory()
            token = self._credential.get_token(self._scope)
        except AzureError as exc:
            raise _identity_unavailable(exc, self._audience) from None
        return token.token, float(token.expires_on)


def _identity_unavailable(exc: Exception, audience: str) -> SecretUnavailableError:
    from azure.identity import CredentialUnavailableError

    what = f"a managed identity token for {audience}"
    if isinstance(exc, CredentialUnavailableError):
        return SecretUnavailableError(
            f"Could not get {what}: no managed identity is available.", secret_name="managed identity",
            vault=None, reason="no_identity",
            hint="MS_CLIENT_CREDENTIAL=managed_identity needs the function app's user-assigned identity "
                 "(AZURE_CLIENT_ID = its client id); locally run the managed-identity double (docs/deploy.md).")
    return SecretUnavailableError(
        f"Could not get {what} ({type(exc).__name__}).", secret_name="managed identity", vault=None,
        reason="unauthenticated",
        hint="Check AZURE_CLIENT_ID names a user-assigned identity assigned to the function app.")
