"""shared.crypto: AES-256-GCM seal/open, associated data, key rotation, failure modes."""

from __future__ import annotations

import base64
import json
import os

import pytest

from shared.config import KeyRingConfig, parse_key_ring
from shared.crypto import CryptoError, KeyRing, account_aad, kid_of
from shared.errors import ConfigurationError, ConnectorError, to_problem

KEY_A = os.urandom(32)
KEY_B = os.urandom(32)
AAD = account_aad("owner-1", "acct-1", "refresh_token")
TOKEN = b"0.AXYA-refresh-token-\x00\xff-bytes"


def ring(active="A", **keys):
    return KeyRing(active, keys or {"A": KEY_A})


def test_round_trip_and_format():
    r = ring()
    sealed = r.seal(TOKEN, aad=AAD)
    version, kid, nonce, _body = sealed.split(".")
    assert (version, kid) == ("v1", "A")
    assert len(base64.urlsafe_b64decode(nonce + "==")) == 12
    assert "=" not in sealed and TOKEN.decode("latin-1") not in sealed
    assert r.open(sealed, aad=AAD) == TOKEN
    assert kid_of(sealed) == "A" == r.kid_of(sealed)
    assert r.open(r.seal(b"", aad=b""), aad=b"") == b""


def test_tampering_any_character_fails():
    r = ring()
    sealed = r.seal(TOKEN, aad=AAD)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for i, ch in enumerate(sealed):
        for replacement in {alphabet[(alphabet.find(ch) + 1) % 64], alphabet[(alphabet.find(ch) + 33) % 64], "."}:
            if replacement == ch:
                continue
            tampered = sealed[:i] + replacement + sealed[i + 1:]
            with pytest.raises(CryptoError):
                r.open(tampered, aad=AAD)
    # truncation / extension
    for tampered in (sealed[:-1], sealed + "A", sealed + "AA", sealed.rsplit(".", 1)[0]):
        with pytest.raises(CryptoError):
            r.open(tampered, aad=AAD)


def test_tampering_any_decoded_byte_fails():
    r = ring()
    sealed = r.seal(TOKEN, aad=AAD)
    head, nonce, body = sealed.rsplit(".", 2)
    raw = bytearray(base64.urlsafe_b64decode(nonce + "==") + base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    for i in range(len(raw)):
        flipped = bytearray(raw)
        flipped[i] ^= 0x01
        n, b = bytes(flipped[:12]), bytes(flipped[12:])
        enc = lambda x: base64.urlsafe_b64encode(x).rstrip(b"=").decode()  # noqa: E731
        with pytest.raises(CryptoError):
            r.open(f"{head}.{enc(n)}.{enc(b)}", aad=AAD)


@pytest.mark.parametrize(
    "other",
    [
        account_aad("owner-2", "acct-1", "refresh_token"),  # another owner
        account_aad("owner-1", "acct-2", "refresh_token"),  # another account row
        account_aad("owner-1", "acct-1", "access_token"),  # another field
        b"",
    ],
)
def test_wrong_associated_data_fails(other):
    r = ring()
    with pytest.raises(CryptoError):
        r.open(r.seal(TOKEN, aad=AAD), aad=other)


def test_account_aad_is_unambiguous():
    assert account_aad("a:b", "c", "p") != account_aad("a", "b:c", "p")
    assert account_aad("ab", "", "p") != account_aad("a", "b", "p")
    assert account_aad("é", "x", "p") != account_aad("e", "x", "p")


def test_rotation_old_key_still_opens_and_needs_reencrypt():
    old = KeyRing("A", {"A": KEY_A})
    sealed = old.seal(TOKEN, aad=AAD)
    rotated = KeyRing("B", {"A": KEY_A, "B": KEY_B})
    assert rotated.open(sealed, aad=AAD) == TOKEN
    assert rotated.needs_reencrypt(sealed) is True
    resealed = rotated.reencrypt(sealed, aad=AAD)
    assert kid_of(resealed) == "B" and not rotated.needs_reencrypt(resealed)
    assert rotated.open(resealed, aad=AAD) == TOKEN
    assert rotated.reencrypt(resealed, aad=AAD) is resealed
    assert rotated.needs_reencrypt(rotated.seal(TOKEN, aad=AAD)) is False


def test_ring_without_old_key_names_the_kid():
    sealed = KeyRing("A", {"A": KEY_A}).seal(TOKEN, aad=AAD)
    only_b = KeyRing("B", {"B": KEY_B})
    with pytest.raises(CryptoError) as ei:
        only_b.open(sealed, aad=AAD)
    err = ei.value
    assert "'A'" in err.detail and err.code == "token_decrypt_failed" and err.status == 500
    assert isinstance(err, ConnectorError)
    assert KEY_A.hex() not in repr(err) and KEY_B.hex() not in str(err.hint)


def test_same_kid_different_key_fails():
    sealed = KeyRing("A", {"A": KEY_A}).seal(TOKEN, aad=AAD)
    with pytest.raises(CryptoError):
        KeyRing("A", {"A": KEY_B}).open(sealed, aad=AAD)


def test_nonces_unique_across_10k_seals():
    r = ring()
    nonces = {r.seal(b"x", aad=b"").split(".")[2] for _ in range(10_000)}
    assert len(nonces) == 10_000


def test_malformed_inputs_raise_crypto_error():
    r = ring()
    for bad in ("", "v1", "v1.A.x", "v2.A.AAAAAAAAAAAAAAAA.AAAA", "v1.A.!!!!.????", "v1.A.AAAA.AAAAAAAAAAAAAAAAAAAAAAAA",
                "v1.A B.AAAAAAAAAAAAAAAA.AAAA", 12345):
        with pytest.raises(CryptoError):
            r.open(bad, aad=b"")  # type: ignore[arg-type]
    with pytest.raises(CryptoError):
        kid_of("garbage")


def test_keys_never_in_repr_or_problem():
    r = KeyRing("B", {"A": KEY_A, "B": KEY_B})
    text = repr(r) + str(r)
    assert "A" in text and "B" in text
    for key in (KEY_A, KEY_B):
        assert key.hex() not in text and base64.b64encode(key).decode() not in text and repr(key) not in text
    try:
        r.open("v1.C.AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA", aad=b"")
    except CryptoError as exc:
        body = json.dumps(to_problem(exc).body)
        assert "token_decrypt_failed" in body and base64.b64encode(KEY_A).decode() not in body


def test_constructor_validation():
    with pytest.raises(ValueError):
        KeyRing("X", {"A": KEY_A})
    with pytest.raises(ValueError):
        KeyRing("A", {"A": b"short"})
    with pytest.raises(ValueError):
        KeyRing("a.b", {"a.b": KEY_A})  # '.' is the sealed format's separator


def test_build_from_config_and_json():
    raw = json.dumps({"active": "k2", "keys": {"k1": base64.b64encode(KEY_A).decode(),
                                               "k2": base64.b64encode(KEY_B).decode()}})
    cfg = parse_key_ring(raw, setting="TOKEN_ENCRYPTION_KEYS")
    assert isinstance(cfg, KeyRingConfig)
    a = KeyRing.from_config(cfg)
    b = KeyRing.from_json(raw)
    assert a.active_kid == b.active_kid == "k2" and a.kids == ("k1", "k2")
    assert b.open(a.seal(TOKEN, aad=AAD), aad=AAD) == TOKEN
    with pytest.raises(ConfigurationError) as ei:
        KeyRing.from_json('{"active":"x"}', setting="TOKEN_ENCRYPTION_KEYS")
    assert ei.value.setting == "TOKEN_ENCRYPTION_KEYS"
    dotted = json.dumps({"active": "a.b", "keys": {"a.b": base64.b64encode(KEY_A).decode()}})
    with pytest.raises(ConfigurationError):
        KeyRing.from_json(dotted)


def test_type_errors():
    r = ring()
    with pytest.raises(TypeError):
        r.seal("text", aad=b"")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        r.seal(b"x", aad="text")  # type: ignore[arg-type]
