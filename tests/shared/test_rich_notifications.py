"""Rich notifications' checks, against Graph's documented formats: validation tokens (signature, audience,
issuer, expiry, the change-tracking app) and encrypted content (RSA-OAEP SHA-1 key, HMAC-SHA256 over the
ciphertext, AES-CBC with the key's first 16 bytes as IV). The content is encrypted here the way Microsoft's
documentation describes, independently of the code under test."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric import padding as asym
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from devstack.certs import new_client_certificate
from shared.certificate_rotation import CertificateVersion
from shared.client_credentials import parse_certificate
from shared.jwks import SessionJWKClient
from shared.rich_notifications import (
    GRAPH_CHANGE_TRACKING_APP,
    NotificationCertificates,
    RichNotificationError,
    ValidationTokens,
    decrypt,
)
from tests.shared.test_auth import JwksServer

APP = "5a1b0c3d-0000-4000-8000-00000000c0de"
TENANT = "aaaabbbb-0000-cccc-1111-dddd2222eeee"
AUTHORITY = "https://login.microsoftonline.com"


@pytest.fixture()
def microsoft() -> Iterator[tuple[JwksServer, rsa.RSAPrivateKey]]:
    server = JwksServer()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server.publish("ms-1", key)
    yield server, key
    server.server.shutdown()


def tokens_checker(server: JwksServer) -> ValidationTokens:
    session = requests.Session()
    session.trust_env = False
    return ValidationTokens(client_id=APP, authority_host=AUTHORITY,
                            jwks=SessionJWKClient(server.url, session=session))


def token(key: rsa.RSAPrivateKey, kid: str = "ms-1", **overrides: Any) -> str:
    now = int(time.time())
    claims = {"aud": APP, "iss": f"https://sts.windows.net/{TENANT}/", "tid": TENANT, "iat": now, "nbf": now,
              "exp": now + 3600, "appid": GRAPH_CHANGE_TRACKING_APP, **overrides}
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, key, algorithm="RS256",
                      headers={"kid": kid})


def test_microsofts_tokens_are_accepted(microsoft: tuple[JwksServer, rsa.RSAPrivateKey]) -> None:
    server, key = microsoft
    check = tokens_checker(server)
    check.check([token(key)], {TENANT})
    v2 = token(key, iss=f"{AUTHORITY}/{TENANT}/v2.0", appid=None, azp=GRAPH_CHANGE_TRACKING_APP)
    check.check([v2], {TENANT})


@pytest.mark.parametrize(("overrides", "why"), [
    ({"aud": "another-app"}, "invalid"),
    ({"exp": int(time.time()) - 3600}, "invalid"),
    ({"iss": "https://sts.windows.net/ffffffff-0000-0000-0000-000000000000/"}, "another issuer"),
    ({"iss": "https://evil.example.com/"}, "another issuer"),
    ({"appid": "11111111-2222-3333-4444-555555555555"}, "change tracking"),
    ({"appid": None}, "change tracking"),
    ({"tid": None}, "invalid"),
])
def test_a_token_failing_any_check_rejects_the_batch(microsoft: tuple[JwksServer, rsa.RSAPrivateKey],
                                                     overrides: dict[str, Any], why: str) -> None:
    server, key = microsoft
    with pytest.raises(RichNotificationError, match=why):
        tokens_checker(server).check([token(key, **overrides)], {TENANT})


def test_tokens_must_be_microsofts_and_cover_every_tenant(microsoft: tuple[JwksServer, rsa.RSAPrivateKey]) -> None:
    server, key = microsoft
    check = tokens_checker(server)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(RichNotificationError, match="unknown key"):
        check.check([token(stranger, kid="forged")], {TENANT})
    with pytest.raises(RichNotificationError, match="invalid"):
        check.check([token(stranger, kid="ms-1")], {TENANT})  # Microsoft's kid, another key's signature
    with pytest.raises(RichNotificationError, match="tenant"):
        check.check([token(key)], {TENANT, "99999999-0000-0000-0000-000000000000"})
    for bad in (None, [], "token", [7], [token(key)] * 17):
        with pytest.raises(RichNotificationError):
            check.check(bad, {TENANT})
    bad_then_good = [token(key, aud="x"), token(key)]
    with pytest.raises(RichNotificationError):
        check.check(bad_then_good, {TENANT})  # every token must be valid, not just one


def graph_encrypts(resource: dict[str, Any], public: rsa.RSAPublicKey, cert_id: str) -> dict[str, str]:
    """What Graph sends (https://learn.microsoft.com/graph/change-notifications-with-resource-data)."""
    key = secrets.token_bytes(32)
    padder = padding.PKCS7(128).padder()
    plain = padder.update(json.dumps(resource).encode()) + padder.finalize()
    enc = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    data = enc.update(plain) + enc.finalize()
    oaep = asym.OAEP(mgf=asym.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    return {"data": base64.b64encode(data).decode(),
            "dataSignature": base64.b64encode(hmac.new(key, data, hashlib.sha256).digest()).decode(),
            "dataKey": base64.b64encode(public.encrypt(key, oaep)).decode(), "encryptionCertificateId": cert_id}


def test_decrypts_what_graph_encrypts_and_refuses_anything_altered() -> None:
    ours = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys = {"v1": ours}
    resource = {"id": "AAkALg", "subject": "Héllo", "isRead": False}
    content = graph_encrypts(resource, ours.public_key(), "v1")
    assert decrypt(content, keys.get) == resource

    data = bytearray(base64.b64decode(content["data"]))
    data[5] ^= 1
    with pytest.raises(RichNotificationError, match="dataSignature"):
        decrypt({**content, "data": base64.b64encode(bytes(data)).decode()}, keys.get)
    with pytest.raises(RichNotificationError, match="dataSignature"):
        decrypt({**content, "dataSignature": base64.b64encode(b"0" * 32).decode()}, keys.get)
    with pytest.raises(RichNotificationError, match="certificate"):
        decrypt({**content, "encryptionCertificateId": "v2"}, keys.get)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(RichNotificationError, match="dataKey"):
        decrypt(graph_encrypts(resource, other.public_key(), "v1"), keys.get)
    for broken in ("x", {}, {**content, "data": "%%%"}, {**content, "data": "A" * 300_000},
                   {k: v for k, v in content.items() if k != "dataKey"}):
        with pytest.raises(RichNotificationError):
            decrypt(broken, keys.get)


def test_a_new_certificate_version_is_used_while_the_old_one_still_decrypts() -> None:
    versions = {}
    for name in ("v1", "v2"):
        key_pem, cert_pem = new_client_certificate(f"notifications {name}")
        versions[name] = CertificateVersion(name, parse_certificate(key_pem + cert_pem))
    newest = ["v1"]
    certs = NotificationCertificates(newest=lambda: versions[newest[0]], version=versions.get)
    first = certs.current()
    assert first.id == "v1"
    newest[0] = "v2"  # rotated in the vault
    assert certs.current().id == "v2"
    old_key = certs.key_for("v1")
    assert old_key is not None
    content = graph_encrypts({"id": "m"}, first.private_key.public_key(), "v1")
    assert decrypt(content, certs.key_for) == {"id": "m"}  # a subscription made with v1 is still opened
    assert certs.key_for("v3") is None and certs.key_for("") is None
