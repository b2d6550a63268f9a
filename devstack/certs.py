"""A throw-away certificate authority for the local HTTPS stand-ins.

MSAL refuses any authority that is not https, so the sandbox (and the Key Vault double) must
serve TLS on loopback. We generate one CA per checkout, kept in the git-ignored ``.devstack/``
folder, and a leaf certificate for ``localhost`` / ``127.0.0.1`` / ``::1`` signed by it.
Clients trust the CA through ``MS_CA_BUNDLE`` (see ``shared.config``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_DIR = Path(__file__).resolve().parent.parent / ".devstack" / "certs"


@dataclass(frozen=True)
class CertPaths:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def ensure_certs(directory: Path | str | None = None) -> CertPaths:
    """Return the CA and server certificate paths, generating them on first use."""
    d = Path(directory or os.environ.get("DEVSTACK_CERT_DIR") or DEFAULT_DIR)
    paths = CertPaths(d / "ca.pem", d / "server.pem", d / "server-key.pem")
    if all(p.exists() for p in (paths.ca_cert, paths.server_cert, paths.server_key)):
        return paths
    d.mkdir(parents=True, exist_ok=True)
    print(f"devstack: generating a local certificate authority in {d} (one time)", flush=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Outlook connector devstack CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(
            x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    _write_private(
        paths.server_key,
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    paths.server_cert.write_bytes(leaf.public_bytes(pem))
    # The CA key is not kept: nothing else is ever signed with it.
    paths.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    return paths


def new_client_certificate(common_name: str = "mailbox-connector", *, days: int = 365) -> tuple[str, str]:
    """A self-signed RSA certificate for an app registration's certificate credential: (key PEM, cert PEM).

    What ``az ad app credential reset --create-cert`` or a Key Vault self-signed policy gives you; the
    key is unencrypted PKCS#8 (Key Vault's PEM form).
    """
    from cryptography.hazmat.primitives.asymmetric import rsa

    now = dt.datetime.now(dt.timezone.utc)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode("ascii")
    return key_pem, cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def ensure_notification_certificate(directory: Path | str | None = None) -> Path:
    """The local stand-in for the Key Vault certificate rich notifications are encrypted to
    (``NOTIFICATION_CERT_PATH``): a PEM file with an RSA key and its self-signed certificate, made once."""
    base = Path(directory) if directory is not None else ensure_certs().ca_cert.parent
    path = base / "notification-cert.pem"
    if not path.exists():
        key_pem, cert_pem = new_client_certificate("mailbox-connector notifications", days=3650)
        _write_private(path, (key_pem + cert_pem).encode("ascii"))
    return path
