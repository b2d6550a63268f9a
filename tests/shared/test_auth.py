"""Caller JWT validation with PyJWT: the JWKS path (RS256, ES256; rotation; withdrawn keys) against a
real JWKS endpoint on loopback, and the HS256 path. Only claims and keys vary; the code is the app's."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from shared._http import new_session
from shared.auth import CallerAuth
from shared.config import load_settings
from shared.errors import AuthenticationError
from tests.shared.test_config import GOOD

ISS, AUD = "https://product.example.com", "outlook-connector"


class JwksServer:
    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        self.status = 200  # 503: the issuer is down
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                body = json.dumps({"keys": outer.keys}).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/.well-known/jwks.json"

    def publish(self, kid: str, private_key: Any) -> None:
        jwk = json.loads(jwt.algorithms.get_default_algorithms()[
            "RS256" if isinstance(private_key, rsa.RSAPrivateKey) else "ES256"].to_jwk(private_key.public_key()))
        self.keys.append({**jwk, "kid": kid, "use": "sig"})


@pytest.fixture()
def jwks() -> Iterator[JwksServer]:
    s = JwksServer()
    yield s
    s.server.shutdown()


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Seconds to add to ``time.monotonic()``: ages the JWKS cache without waiting."""
    offset = [0.0]
    real = time.monotonic
    monkeypatch.setattr(time, "monotonic", lambda: real() + offset[0])
    return offset


def _auth(jwks: JwksServer) -> CallerAuth:
    env = {**GOOD, "AUTH_ISSUER": ISS, "AUTH_AUDIENCE": AUD, "AUTH_JWKS_URL": jwks.url}
    env.pop("AUTH_HS256_SECRET")
    return CallerAuth(load_settings(env), session=new_session(None))


def _token(key: Any, alg: str, kid: str, **claims: Any) -> str:
    now = int(time.time())
    body = {"sub": "user-1", "iss": ISS, "aud": AUD, "iat": now, "nbf": now, "exp": now + 600, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=alg, headers={"kid": kid})


RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC = ec.generate_private_key(ec.SECP256R1())


@pytest.mark.parametrize(("key", "alg"), [(RSA, "RS256"), (EC, "ES256")])
def test_jwks_signed_tokens_are_accepted(jwks: JwksServer, key: Any, alg: str) -> None:
    jwks.publish("k1", key)
    a = _auth(jwks)
    assert a.authenticate("Bearer " + _token(key, alg, "k1")) == "user-1"
    assert a.authenticate("Bearer " + _token(key, alg, "k1", sub="user-2")) == "user-2"
    assert jwks.fetches == 1  # keys are cached


@pytest.mark.parametrize(("claims", "says"), [
    ({"aud": "someone-else"}, "another audience"),
    ({"iss": "https://evil.example.com"}, "another issuer"),
    ({"exp": int(time.time()) - 3600}, "expired"),
    ({"nbf": int(time.time()) + 3600}, "not valid yet"),
    ({"exp": None}, "invalid"),
    ({"sub": None}, "invalid"),
])
def test_bad_claims_are_rejected(jwks: JwksServer, claims: dict[str, Any], says: str) -> None:
    jwks.publish("k1", RSA)
    with pytest.raises(AuthenticationError) as e:
        _auth(jwks).authenticate("Bearer " + _token(RSA, "RS256", "k1", **claims))
    assert says in e.value.detail and e.value.status == 401


def test_forged_and_confused_tokens_are_rejected(jwks: JwksServer) -> None:
    jwks.publish("k1", RSA)
    a = _auth(jwks)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(AuthenticationError):  # right kid, wrong key
        a.authenticate("Bearer " + _token(other, "RS256", "k1"))
    with pytest.raises(AuthenticationError, match="algorithm"):  # HS256 is off when only a JWKS is configured
        a.authenticate("Bearer " + _token("x" * 32, "HS256", "k1"))
    unsigned = jwt.encode({"sub": "u", "iss": ISS, "aud": AUD, "exp": int(time.time()) + 60}, None, algorithm="none")
    with pytest.raises(AuthenticationError, match="algorithm"):
        a.authenticate("Bearer " + unsigned)
    with pytest.raises(AuthenticationError):  # ES256 header over an RSA key: no algorithm confusion
        a.authenticate("Bearer " + _token(EC, "ES256", "k1"))


def test_issuer_key_rotation_and_withdrawal(jwks: JwksServer, clock: list[float]) -> None:
    jwks.publish("old", RSA)
    a = _auth(jwks)
    assert a.authenticate("Bearer " + _token(RSA, "RS256", "old")) == "user-1"
    # The issuer adds a key: an unknown kid re-reads the set, but at most once a minute.
    jwks.publish("new", EC)
    with pytest.raises(AuthenticationError, match="unknown key"):
        a.authenticate("Bearer " + _token(EC, "ES256", "new"))
    assert jwks.fetches == 1
    clock[0] += 61
    assert a.authenticate("Bearer " + _token(EC, "ES256", "new")) == "user-1"
    assert jwks.fetches == 2
    # A flood of unknown kids right after that re-read does not reach the issuer.
    for i in range(20):
        with pytest.raises(AuthenticationError, match="unknown key"):
            a.authenticate("Bearer " + _token(EC, "ES256", f"bogus-{i}"))
    assert jwks.fetches == 2
    # The issuer withdraws the old key: once the cached set is an hour old it is re-read and the key is gone.
    jwks.keys = [k for k in jwks.keys if k["kid"] != "old"]
    assert a.authenticate("Bearer " + _token(RSA, "RS256", "old")) == "user-1"  # still cached
    clock[0] += 3601
    with pytest.raises(AuthenticationError, match="unknown key"):
        a.authenticate("Bearer " + _token(RSA, "RS256", "old"))
    assert jwks.fetches == 3
    assert a.authenticate("Bearer " + _token(EC, "ES256", "new")) == "user-1"


def test_issuer_outage_keeps_a_recent_set_then_fails_closed(jwks: JwksServer, clock: list[float]) -> None:
    jwks.publish("k1", RSA)
    a = _auth(jwks)
    assert a.authenticate("Bearer " + _token(RSA, "RS256", "k1")) == "user-1"
    jwks.status = 503
    clock[0] += 3601  # the hourly re-read fails: the set read an hour ago still serves
    assert a.authenticate("Bearer " + _token(RSA, "RS256", "k1")) == "user-1"
    assert jwks.fetches == 2
    clock[0] += 2 * 3600  # no successful read for three hours: stop trusting it
    with pytest.raises(AuthenticationError, match="could not be fetched") as e:
        a.authenticate("Bearer " + _token(RSA, "RS256", "k1"))
    assert e.value.status == 401


def test_jwks_fetch_uses_the_injected_session_with_a_timeout(jwks: JwksServer) -> None:
    jwks.publish("k1", RSA)
    calls: list[dict[str, Any]] = []
    session = new_session(None)
    real_get = session.get

    def spy(url: str, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_get(url, **kwargs)

    session.get = spy  # type: ignore[method-assign]
    env = {**GOOD, "AUTH_ISSUER": ISS, "AUTH_AUDIENCE": AUD, "AUTH_JWKS_URL": jwks.url}
    a = CallerAuth(load_settings(env), session=session)
    assert a.authenticate("Bearer " + _token(RSA, "RS256", "k1")) == "user-1"
    assert len(calls) == 1 and calls[0]["timeout"]


def test_missing_or_malformed_authorization(jwks: JwksServer) -> None:
    a = _auth(jwks)
    for header in (None, "", "Basic dXNlcjpwdw==", "Bearer ", "Bearer not-a-jwt"):
        with pytest.raises(AuthenticationError):
            a.authenticate(header)


def test_the_production_issuer_sample_of_the_docs_is_accepted(jwks: JwksServer) -> None:
    """docs/caller-tokens.md's signing code, run as written: its JWKS and its tokens pass the connector's checks."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "caller-tokens.md").read_text(encoding="utf-8")
    [code] = re.findall(r"```python\n(.*?)```", text, re.S)
    sample: dict[str, Any] = {}
    exec(compile(code, "docs/caller-tokens.md", "exec"), sample)
    old, new = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    jwks.keys = sample["public_jwks"]({"2026-11": old, "2026-12": new})["keys"]
    env = {**GOOD, "AUTH_ISSUER": sample["ISSUER"], "AUTH_AUDIENCE": sample["AUDIENCE"], "AUTH_JWKS_URL": jwks.url}
    env.pop("AUTH_HS256_SECRET")
    a = CallerAuth(load_settings(env), session=new_session(None))
    assert a.authenticate("Bearer " + sample["caller_token"](new, "2026-12", "tenant-42")) == "tenant-42"
    assert a.authenticate("Bearer " + sample["caller_token"](old, "2026-11", "tenant-7")) == "tenant-7"
    with pytest.raises(AuthenticationError, match="InvalidSignature"):  # a key id naming another key
        a.authenticate("Bearer " + sample["caller_token"](old, "2026-12", "tenant-42"))
    with pytest.raises(AuthenticationError, match="longer than"):
        a.authenticate("Bearer " + sample["caller_token"](new, "2026-12", "tenant-42", lifetime_s=7 * 86400))
