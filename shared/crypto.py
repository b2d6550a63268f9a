"""Token encryption at rest: AES-256-GCM with a key ring and associated data.

Sealed format (ASCII, safe in a Table Storage string property)::

    v1.<kid>.<b64url(nonce)>.<b64url(ciphertext || tag)>

* AES-256-GCM (NIST SP 800-38D) through ``cryptography``'s ``AESGCM``: 256-bit keys, a 96-bit
  nonce drawn from ``os.urandom`` for every seal (SP 800-38D §8.2.2 "RBG-based construction"; with
  random nonces one key must stay below 2^32 seals, §8.3 — rotate the active key well before that),
  and the full 128-bit tag.
* ``b64url`` is RFC 4648 §5 base64url without padding; decoding is strict and canonical, so no two
  strings open to the same record and any changed character fails.
* The associated data is ``"v1.<kid>."`` followed by the caller's ``aad``. The header is therefore
  authenticated too, and :func:`account_aad` binds a ciphertext to its owner, account and purpose:
  a ciphertext copied onto another row, owner or field fails to open.
* The key id (``kid``) names the key that sealed the record; :class:`KeyRing` keeps older keys so
  that records sealed before a rotation still open, and :meth:`KeyRing.needs_reencrypt` tells the
  re-encryption command which records to rewrite under the active key.

Keys are never in a repr, log line or exception message. Key ids are not secret.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from shared.errors import CryptoError

if TYPE_CHECKING:
    from shared.config import KeyRingConfig

VERSION = "v1"
NONCE_BYTES = 12  # 96 bits, NIST SP 800-38D §5.2.1.1 recommends 96-bit IVs
KEY_BYTES = 32  # AES-256
TAG_BYTES = 16
_KID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]+")
_AAD_LABEL = b"outlook-connector/token-aad/v1"
_DERIVE_SALT = b"outlook-connector/derived-key/v1"


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    """Strict, canonical RFC 4648 §5 decoding (no padding, no stray characters, no slack bits)."""
    if not _B64URL_RE.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None
    if _b64url_encode(data) != text:  # unused low bits of the last character must be zero
        raise ValueError("not canonical base64url")
    return data


def account_aad(owner: str, account_id: str, purpose: str) -> bytes:
    """Associated data binding a ciphertext to (owner, account, purpose).

    Each field is UTF-8 and prefixed with its 4-byte big-endian length after a fixed label, so the
    encoding is injective: ``("a:b", "c")`` and ``("a", "b:c")`` give different bytes.
    """
    out = [_AAD_LABEL]
    for part in (owner, account_id, purpose):
        raw = part.encode("utf-8")
        out.append(struct.pack(">I", len(raw)))
        out.append(raw)
    return b"".join(out)


def _split(sealed: str) -> tuple[str, str, str, str]:
    if not isinstance(sealed, str):
        raise CryptoError("The stored token is not a sealed string.")
    parts = sealed.split(".")
    if len(parts) != 4:
        raise CryptoError("The stored token is malformed.")
    version, kid, nonce, body = parts
    if version != VERSION:
        raise CryptoError("The stored token uses an unsupported format version.")
    if not _KID_RE.fullmatch(kid):
        raise CryptoError("The stored token has a malformed key id.")
    return version, kid, nonce, body


class RingSource(Protocol):
    """The current key ring; given a sealed value, one that knows the value's key id (re-read once if
    another instance sealed it with a key this one has not loaded yet)."""

    def __call__(self, sealed: str | None = None) -> KeyRing: ...


def kid_of(sealed: str) -> str:
    """The key id a sealed value was encrypted with (no key needed)."""
    return _split(sealed)[1]


class KeyRing:
    """The token encryption keys: one active key (seals) and any number of older ones (open only)."""

    __slots__ = ("_active", "_aeads", "_keys")

    def __init__(self, active_kid: str, keys: Mapping[str, bytes]) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # lazy: cold start

        if active_kid not in keys:
            raise ValueError(f"the active key id {active_kid!r} is not in the key ring")
        aeads = {}
        for kid, key in keys.items():
            if not _KID_RE.fullmatch(kid):
                raise ValueError(f"key id {kid!r} must be 1-64 characters of A-Z a-z 0-9 _ -")
            if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
                raise ValueError(f"key {kid!r} must be {KEY_BYTES} bytes (AES-256)")
            aeads[kid] = AESGCM(bytes(key))
        self._active = active_kid
        self._aeads = aeads
        self._keys = {kid: bytes(key) for kid, key in keys.items()}

    @classmethod
    def from_config(cls, config: KeyRingConfig) -> KeyRing:
        return cls(config.active, config.keys)

    @classmethod
    def from_json(cls, raw: str, *, setting: str = "TOKEN_ENCRYPTION_KEYS") -> KeyRing:
        """Parse ``{"active":"kid","keys":{"kid":"base64"}}``; raises ConfigurationError naming ``setting``."""
        from shared.config import parse_key_ring
        from shared.errors import ConfigurationError

        config = parse_key_ring(raw, setting=setting)
        try:
            return cls.from_config(config)
        except ValueError as exc:
            raise ConfigurationError(f"{setting}: {exc}", setting=setting) from None

    @property
    def active_kid(self) -> str:
        return self._active

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(sorted(self._aeads))

    def __repr__(self) -> str:
        return f"KeyRing(active_kid={self._active!r}, kids={list(self.kids)!r})"

    def __contains__(self, kid: object) -> bool:
        return kid in self._aeads

    def derive(self, purpose: str, *, kid: str | None = None, length: int = KEY_BYTES) -> bytes:
        """Key material for another purpose (a MAC or signing key), from key ``kid`` (default: active).

        HKDF-SHA256 (RFC 5869) with a fixed salt and ``purpose`` as ``info``: each purpose gets a key
        independent of the AES key and of every other purpose, so no new secret setting is needed, and
        derived keys rotate with the ring."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        key = self._keys[kid or self._active]
        hkdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=_DERIVE_SALT, info=purpose.encode("utf-8"))
        return hkdf.derive(key)

    def seal(self, plaintext: bytes, *, aad: bytes) -> str:
        """Encrypt under the active key with a fresh random 96-bit nonce."""
        if not isinstance(plaintext, (bytes, bytearray)) or not isinstance(aad, (bytes, bytearray)):
            raise TypeError("seal() takes bytes plaintext and bytes aad")
        header = f"{VERSION}.{self._active}."
        nonce = os.urandom(NONCE_BYTES)
        body = self._aeads[self._active].encrypt(nonce, bytes(plaintext), header.encode("ascii") + bytes(aad))
        return f"{header}{_b64url_encode(nonce)}.{_b64url_encode(body)}"

    def open(self, sealed: str, *, aad: bytes) -> bytes:
        """Decrypt with the key named in the record; :class:`CryptoError` on any failure."""
        from cryptography.exceptions import InvalidTag

        version, kid, nonce_text, body_text = _split(sealed)
        aead = self._aeads.get(kid)
        if aead is None:
            raise CryptoError(
                f"The stored token was encrypted with key id {kid!r}, which is not in the key ring.",
                hint=f"Restore key {kid!r} to the token key ring: keep retired keys until the "
                "re-encryption command has rewritten every record under the active key.",
            )
        try:
            nonce = _b64url_decode(nonce_text)
            body = _b64url_decode(body_text)
        except ValueError:
            raise CryptoError("The stored token is malformed.") from None
        if len(nonce) != NONCE_BYTES or len(body) < TAG_BYTES:
            raise CryptoError("The stored token is malformed.")
        try:
            return aead.decrypt(nonce, body, f"{version}.{kid}.".encode("ascii") + bytes(aad))
        except InvalidTag:
            raise CryptoError(
                "The stored token failed authentication: it was altered, or it belongs to another record."
            ) from None

    def needs_reencrypt(self, sealed: str) -> bool:
        """True when the record was sealed under a key other than the active one."""
        return kid_of(sealed) != self._active

    def reencrypt(self, sealed: str, *, aad: bytes) -> str:
        """Open and re-seal under the active key; returns ``sealed`` unchanged when already active."""
        if not self.needs_reencrypt(sealed):
            return sealed
        return self.seal(self.open(sealed, aad=aad), aad=aad)

    #: ``ring.kid_of(sealed)`` is the module-level :func:`kid_of` (reading a kid needs no key).
    kid_of = staticmethod(kid_of)
