"""Rich change notifications: Graph's ``validationTokens`` checked, ``encryptedContent`` decrypted.

Microsoft's contract (https://learn.microsoft.com/graph/change-notifications-with-resource-data):

* A subscription with ``includeResourceData: true`` names the properties it wants (``$select`` on the resource,
  required for Outlook), an ``encryptionCertificate`` (base64 DER of our certificate) and an
  ``encryptionCertificateId`` (ours: it comes back on each notification, so we know which key to use). Such an
  Outlook subscription lives at most 1,440 minutes.
* Each notification batch carries ``validationTokens``: JWTs issued by the Microsoft identity platform, one per
  app and tenant in the batch. Before anything in the batch is trusted, each must be signed by one of
  Microsoft's published keys (``{authority}/common/discovery/keys``), unexpired, with ``aud`` our client id, an
  issuer of the notification's tenant (``https://sts.windows.net/{tid}/`` for v1 tokens,
  ``{authority}/{tid}/v2.0`` for v2) and ``appid`` / ``azp`` the Microsoft Graph Change Tracking app
  (:data:`GRAPH_CHANGE_TRACKING_APP`), which proves Graph, and no other app, sent it.
* Each item's ``encryptedContent``: ``dataKey`` is a random symmetric key encrypted with RSA-OAEP (SHA-1, MGF1
  SHA-1) under our certificate's public key; ``dataSignature`` is HMAC-SHA256 of the base64-decoded ``data``
  under that key; ``data`` is AES-CBC with PKCS7 padding, key = the symmetric key, IV = its first 16 bytes.
  The signature is checked before anything is decrypted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import jwt

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

    from shared.certificate_rotation import CertificateVersion
    from shared.jwks import SessionJWKClient

log = logging.getLogger("connector.notifications")

GRAPH_CHANGE_TRACKING_APP = "0bf30f3b-4a52-48df-9a82-234910c4a086"  # Microsoft Graph Change Tracking
RICH_LIFETIME_MINUTES = 1_440  # an Outlook subscription with resource data
MAX_VALIDATION_TOKENS = 16
MAX_TOKEN_CHARS = 16 * 1024
MAX_ENCRYPTED_CHARS = 192 * 1024  # base64 of one message's selected properties; Graph's are a few KB
_LEEWAY_S = 60


class RichNotificationError(Exception):
    """A rich notification (or its batch) failed a check: it is dropped, never trusted. The message names the
    check, never a value from the notification."""


@dataclass(frozen=True)
class EncryptionCertificate:
    """Our certificate as Graph gets it, and the private key that opens what Graph encrypts to it."""

    id: str  # encryptionCertificateId: the Key Vault version (or the local file's thumbprint)
    certificate_b64: str  # encryptionCertificate: base64 of the DER certificate
    not_after: float  # epoch seconds
    private_key: RSAPrivateKey = field(repr=False)


def encryption_certificate(cert_id: str, private_key_pem: str, certificate_pem: str,
                           not_after: float) -> EncryptionCertificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("the notification certificate needs an RSA key")
    der = x509.load_pem_x509_certificate(certificate_pem.encode()).public_bytes(serialization.Encoding.DER)
    return EncryptionCertificate(cert_id, base64.b64encode(der).decode("ascii"), not_after, key)


def decrypt(content: object, key_for: Callable[[str], RSAPrivateKey | None]) -> dict[str, object]:
    """The resource of one notification's ``encryptedContent``; RichNotificationError on any failure."""
    from cryptography.hazmat.primitives import hashes, padding
    from cryptography.hazmat.primitives.asymmetric import padding as asym
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if not isinstance(content, dict):
        raise RichNotificationError("encryptedContent is not an object")
    parts = {k: content.get(k) for k in ("data", "dataSignature", "dataKey", "encryptionCertificateId")}
    if not all(isinstance(v, str) and v for v in parts.values()) or len(str(parts["data"])) > MAX_ENCRYPTED_CHARS:
        raise RichNotificationError("encryptedContent is incomplete or too large")
    key = key_for(str(parts["encryptionCertificateId"]))
    if key is None:
        raise RichNotificationError("encryptedContent names a certificate we do not have")
    try:
        data = base64.b64decode(str(parts["data"]), validate=True)
        signature = base64.b64decode(str(parts["dataSignature"]), validate=True)
        wrapped = base64.b64decode(str(parts["dataKey"]), validate=True)
    except (binascii.Error, ValueError):
        raise RichNotificationError("encryptedContent is not base64") from None
    # RSA-OAEP with SHA-1 is what Graph uses to wrap the key (not a choice of ours; OAEP-SHA1 stays sound).
    oaep = asym.OAEP(mgf=asym.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)  # noqa: S303
    try:
        symmetric = key.decrypt(wrapped, oaep)
    except ValueError:
        raise RichNotificationError("dataKey does not open with our key") from None
    if len(symmetric) not in (16, 24, 32):
        raise RichNotificationError("dataKey is not an AES key")
    expected = hmac.new(symmetric, data, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, signature):
        raise RichNotificationError("dataSignature does not match")
    if not data or len(data) % 16:
        raise RichNotificationError("data is not whole AES blocks")
    decryptor = Cipher(algorithms.AES(symmetric), modes.CBC(symmetric[:16])).decryptor()
    padded = decryptor.update(data) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        plain = unpadder.update(padded) + unpadder.finalize()
        doc = json.loads(plain)
    except ValueError:
        raise RichNotificationError("data is not padded JSON") from None
    if not isinstance(doc, dict):
        raise RichNotificationError("data is not a JSON object")
    return doc


class NotificationCertificates:
    """Our encryption certificate's versions as the notification code needs them: the newest for new and renewed
    subscriptions, any version a live subscription was made with for decryption. Parsed keys are cached."""

    def __init__(self, *, newest: Callable[[], CertificateVersion],
                 version: Callable[[str], CertificateVersion | None]) -> None:
        self._newest = newest
        self._version = version
        self._parsed: dict[tuple[str, str], EncryptionCertificate] = {}
        self._lock = threading.Lock()

    def current(self) -> EncryptionCertificate:
        return self._parse(self._newest())

    def key_for(self, cert_id: str) -> RSAPrivateKey | None:
        found = self._version(cert_id) if 0 < len(cert_id) <= 128 else None
        return self._parse(found).private_key if found is not None else None

    def _parse(self, v: CertificateVersion) -> EncryptionCertificate:
        key = (v.version, v.thumbprint)
        with self._lock:
            hit = self._parsed.get(key)
        if hit is None:
            hit = encryption_certificate(v.version, v.cert.private_key_pem, v.cert.certificate_pem, v.cert.not_after)
            with self._lock:
                if len(self._parsed) >= 16:
                    self._parsed.clear()
                self._parsed[key] = hit
        return hit


class LocalCertificate:
    """The local stand-in for the Key Vault certificate: a PEM file with an RSA key and its certificate
    (``NOTIFICATION_CERT_PATH``; ``make dev`` makes one). One version, named by its thumbprint."""

    def __init__(self, path: str | None) -> None:
        self._path = path
        self._cert: CertificateVersion | None = None

    def newest(self) -> CertificateVersion:
        from shared.errors import SecretUnavailableError

        if self._cert is not None:
            return self._cert
        if not self._path:
            raise SecretUnavailableError(
                "Rich notifications need a certificate: KEY_VAULT_URL is not configured and NOTIFICATION_CERT_PATH "
                "is not set.", secret_name="NOTIFICATION_CERT_PATH", vault=None, reason="not_set",
                hint="Set KEY_VAULT_URL (Azure) or NOTIFICATION_CERT_PATH (local development: make dev makes one).")
        from shared.certificate_rotation import CertificateVersion
        from shared.client_credentials import CertificateError, parse_certificate

        try:
            with open(self._path, encoding="utf-8") as f:
                cert = parse_certificate(f.read())
        except (OSError, CertificateError) as exc:
            raise SecretUnavailableError(
                f"NOTIFICATION_CERT_PATH is not a usable certificate ({type(exc).__name__}).",
                secret_name="NOTIFICATION_CERT_PATH", vault=None, reason="malformed",
                hint="A PEM file with an RSA private key and its certificate.") from None
        self._cert = CertificateVersion("local-" + cert.thumbprint_sha256[:32], cert)
        return self._cert

    def version(self, version: str) -> CertificateVersion | None:
        newest = self.newest()
        return newest if version == newest.version else None


class ValidationTokens:
    """Checks a batch's ``validationTokens`` against Microsoft's published signing keys."""

    def __init__(self, *, client_id: str, authority_host: str, jwks: SessionJWKClient) -> None:
        self._client_id = client_id
        self._authority = authority_host.rstrip("/")
        self._jwks = jwks

    def check(self, tokens: object, tenants: set[str]) -> None:
        """Every token valid, and one for each tenant the batch's items name; RichNotificationError otherwise."""
        if not isinstance(tokens, list) or not tokens or len(tokens) > MAX_VALIDATION_TOKENS:
            raise RichNotificationError("validationTokens missing or too many")
        valid_for: set[str] = set()
        for token in tokens:
            if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
                raise RichNotificationError("a validation token is not a string")
            valid_for.add(self._tenant_of(token))
        if not tenants <= valid_for:
            raise RichNotificationError("no validation token for a tenant of the batch")

    def _tenant_of(self, token: str) -> str:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            if not isinstance(kid, str):
                raise RichNotificationError("a validation token names no key")
            key = self._jwks.get_signing_key(kid)
            claims = jwt.decode(token, key.key, algorithms=["RS256"], audience=self._client_id, leeway=_LEEWAY_S,
                                options={"require": ["exp", "iss", "aud", "tid"]})
        except RichNotificationError:
            raise
        except jwt.PyJWKClientConnectionError:
            raise RichNotificationError("Microsoft's signing keys could not be fetched") from None
        except (jwt.PyJWKClientError, jwt.PyJWKSetError):
            raise RichNotificationError("a validation token is signed with an unknown key") from None
        except jwt.PyJWTError as e:
            raise RichNotificationError(f"a validation token is invalid ({type(e).__name__})") from None
        tid = claims.get("tid")
        if not isinstance(tid, str) or not tid:
            raise RichNotificationError("a validation token has no tenant")
        if claims.get("iss") not in (f"https://sts.windows.net/{tid}/", f"{self._authority}/{tid}/v2.0"):
            raise RichNotificationError("a validation token has another issuer")
        if (claims.get("appid") or claims.get("azp")) != GRAPH_CHANGE_TRACKING_APP:
            raise RichNotificationError("a validation token was not issued to Microsoft Graph change tracking")
        return tid
