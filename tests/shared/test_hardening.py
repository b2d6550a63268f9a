"""Hardening, the parts that need no running host: hostile values against the app's own functions
(log lines, caller JWT subjects, webhook signatures and the docs' receiver sample, Entra error
bodies, JSON depth, header values, signed connect results)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import azure.functions as func
import jwt
import pytest

from shared.auth import CallerAuth
from shared.config import load_settings
from shared.errors import AuthenticationError, ValidationError
from tests.shared.test_config import GOOD

ROOT = Path(__file__).resolve().parents[2]


# -- 2. log forging ---------------------------------------------------------------------------------

def _capture(logger: logging.Logger) -> tuple[io.StringIO, logging.Handler]:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))  # a plain formatter, not ours
    logger.addHandler(handler)
    return buf, handler


def test_a_request_value_with_line_breaks_stays_on_one_log_line() -> None:
    from shared.logs import configure

    configure()
    logger = logging.getLogger("connector.test-forging")
    buf, handler = _capture(logger)
    forged = 'x\n{"correlationId": "0", "function": "send_mail", "status": 200}\r\u2028more'
    try:
        logger.warning("connect failed: %s", forged)
        logger.warning(forged)
    finally:
        logger.removeHandler(handler)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert all(line.startswith("WARNING ") for line in lines), lines
    assert "\\n{" in lines[0] and "\\u2028" in lines[0]


def test_safe_formatter_keeps_a_traceback_on_one_line() -> None:
    from shared.logs import SafeFormatter

    try:
        raise ValueError("bad\ninput")
    except ValueError:
        record = logging.LogRecord("connector", logging.ERROR, __file__, 1, "boom\nline", None, True)
        import sys

        record.exc_info = sys.exc_info()
    out = SafeFormatter("%(message)s").format(record)
    assert "\n" not in out and "boom\\nline" in out and "bad\\ninput" in out


def test_entra_error_values_from_a_callback_are_reduced_to_their_alphabet() -> None:
    from shared.ms_errors import from_token_error

    err = from_token_error({"error": 'x\n{"status":200}', "error_description": "AADSTS99999: a\u202eb\x00c",
                            "trace_id": "t\nforged", "correlation_id": "5c1a2b3c-0000-4000-8000-000000000000"})
    assert err.code == "unknown_error" and err.microsoft is not None
    assert err.microsoft.error == "unknown_error" and err.microsoft.trace_id is None
    assert err.microsoft.correlation_id == "5c1a2b3c-0000-4000-8000-000000000000"
    assert "\u202e" not in err.detail and "\x00" not in err.detail


# -- 11. error_codes as a string --------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "codes"), [
    ("50173", (50173,)), ([50173, "70008"], (50173, 70008)), (50173, (50173,)), ({"a": 1}, ()),
    ([True, None, "x"], ()), (list(range(100)), tuple(range(8))),
])
def test_error_codes_of_any_shape_are_read_as_whole_numbers(raw: Any, codes: tuple[int, ...]) -> None:
    from shared.ms_errors import from_token_error

    err = from_token_error({"error": "invalid_grant", "error_codes": raw})
    assert err.microsoft is not None and err.microsoft.codes == codes


# -- 4 and 7. caller JWT: sub alphabet, nbf when present -------------------------------------------

def _hs(claims: dict[str, Any]) -> str:
    now = int(time.time())
    base = {"sub": "owner", "iss": GOOD["AUTH_ISSUER"], "aud": GOOD["AUTH_AUDIENCE"], "iat": now, "exp": now + 60}
    base.update(claims)
    return "Bearer " + jwt.encode({k: v for k, v in base.items() if v is not None}, GOOD["AUTH_HS256_SECRET"],
                                  algorithm="HS256")


@pytest.mark.parametrize("sub", ["\ud800", "a\udfffb", "owner\n", "own\u202eer", "\u2028", "", " owner",
                                 "x" * 257, "a\x00b", "zero\u200bwidth"])
def test_malformed_sub_is_401_not_500(sub: str) -> None:
    auth = CallerAuth(load_settings(GOOD))
    with pytest.raises(AuthenticationError, match="sub"):
        auth.authenticate(_hs({"sub": sub}))


@pytest.mark.parametrize("sub", ["auth0|5f7c8ec7c33c6c004bbafe82", "00u1abcd", "müller@example.com", "用户-42",
                                 "5c1a2b3c-0000-4000-8000-000000000000"])
def test_ordinary_subjects_are_accepted(sub: str) -> None:
    assert CallerAuth(load_settings(GOOD)).authenticate(_hs({"sub": sub})) == sub


def test_nbf_is_optional_and_checked_when_present() -> None:
    auth = CallerAuth(load_settings(GOOD))
    assert auth.authenticate(_hs({"nbf": None})) == "owner"  # many IdPs issue access tokens without nbf
    with pytest.raises(AuthenticationError, match="nbf"):
        auth.authenticate(_hs({"nbf": int(time.time()) + 3600}))
    with pytest.raises(AuthenticationError):
        auth.authenticate(_hs({"nbf": "soon"}))


def test_docs_say_nbf_is_checked_when_present_not_required() -> None:
    import shared.auth

    doc = shared.auth.__doc__ or ""
    assert "``nbf`` are required" not in doc and "``nbf`` is checked\nwhen present" in doc


# -- 9. webhook signatures: verify never raises; the docs' receiver sample -------------------------

@pytest.mark.parametrize("header", ["t=1,v1=é", "t=1,v1=\ud800", "", "garbage", "t=abc,v1=00", "t=,v1=",
                                    "t=1" + "0" * 40 + ",v1=00", "t=-5,v1=aa", "v1=x", ",,,=", "t=1=2,v1=1"])
def test_verify_answers_false_for_any_malformed_header(header: str) -> None:
    from shared.webhooks import verify

    assert verify("secret", b"{}", header) is False


def test_verify_rejects_future_timestamps_beyond_a_small_skew() -> None:
    from shared.webhooks import FUTURE_SKEW_S, sign, verify

    now = 1_800_000_000
    assert verify("s", b"{}", sign("s", b"{}", now + FUTURE_SKEW_S), now=now)
    assert not verify("s", b"{}", sign("s", b"{}", now + FUTURE_SKEW_S + 1), now=now)
    assert not verify("s", b"{}", sign("s", b"{}", now - 301), now=now)
    assert verify("s", b"{}", sign("s", b"{}", now - 299), now=now)


def _docs_sample() -> dict[str, Any]:
    text = (ROOT / "docs" / "webhooks.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    scope: dict[str, Any] = {}
    exec(compile("\n".join(blocks).replace("    ...  ", "    pass  "), "docs/webhooks.md", "exec"), scope)
    return scope


def test_docs_receiver_sample_never_raises_and_rejects_replays_and_future_timestamps() -> None:
    from shared.webhooks import sign

    sample = _docs_sample()
    secret = "whsec"
    body = json.dumps({"id": "evt_1", "type": "account.connected", "data": {"account": {}}}).encode()
    now = int(time.time())
    for header in ("t=1,v1=é", "", "garbage", "t=abc", "t=1" + "0" * 40, ",,=", "t=1,v1=\ud800"):
        assert sample["verify"](secret, body, header) is False
        assert sample["handle"](secret, body, {"X-Connector-Signature": header}) == 401
    assert sample["handle"](secret, body, {}) == 401
    good = {"X-Connector-Signature": sign(secret, body, now)}
    assert sample["handle"](secret, body, good) == 204
    assert sample["handle"](secret, body, good) == 200  # the same event again: a replay, nothing done
    future = {"X-Connector-Signature": sign(secret, b'{"id":"evt_2"}', now + 3600)}
    assert sample["handle"](secret, b'{"id":"evt_2"}', future) == 401
    old = {"X-Connector-Signature": sign(secret, b'{"id":"evt_3"}', now - 3600)}
    assert sample["handle"](secret, b'{"id":"evt_3"}', old) == 401
    not_json = b"[not json"
    assert sample["handle"](secret, not_json, {"X-Connector-Signature": sign(secret, not_json, now)}) == 400
    # Header names are case-insensitive: a framework that lower-cases them (ASGI, Node) gets the same answers.
    lower = json.dumps({"id": "evt_4", "type": "account.connected"}).encode()
    assert sample["handle"](secret, lower, {"x-connector-signature": sign(secret, lower, now)}) == 204
    assert sample["handle"](secret, lower, {"X-CONNECTOR-SIGNATURE": sign(secret, lower, now)}) == 200
    assert sample["handle"](secret, lower, {"x-connector-signature": "t=1,v1=00"}) == 401


# -- 3. JSON depth ----------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", ["[" * 100_000, '{"a":' * 5000 + "1" + "}" * 5000, "[" * 33 + "]" * 33])
def test_deep_json_is_a_400_naming_the_field(raw: str) -> None:
    from shared.blueprints._http import json_body

    with pytest.raises(ValidationError) as e:
        json_body(raw, "body")
    assert e.value.field == "body" and e.value.status == 400


def test_json_at_the_depth_limit_is_accepted() -> None:
    from shared.blueprints._http import MAX_JSON_DEPTH, json_body

    assert json_body("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH, "body") is not None


# -- 6. trailing newlines ---------------------------------------------------------------------------

def _req(headers: dict[str, str]) -> func.HttpRequest:
    return func.HttpRequest(method="GET", url="http://h/api/x", headers=headers, body=b"")


def test_header_values_with_a_trailing_newline_are_not_trusted() -> None:
    from shared.blueprints._http import correlation_id

    assert correlation_id(_req({"x-ms-client-request-id": "abc"})) == "abc"
    assert correlation_id(_req({"x-ms-client-request-id": "abc\n"})) == "abc"  # .strip() first, then fullmatch
    tp = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    assert correlation_id(_req({"traceparent": tp})) == "a" * 32


@pytest.mark.parametrize(("call", "field"), [
    (lambda: __import__("shared.messages", fromlist=["check_id"]).check_id("AAMk\n", "messageId"), "messageId"),
    (lambda: __import__("shared.mail", fromlist=["x"]).parse_send_request(
        {"to": ["a@example.com"], "trackingId": "abc\n"}, max_total=10), "trackingId"),
    (lambda: __import__("shared.mail", fromlist=["x"]).parse_send_request(
        {"to": ["a@example.com\n"]}, max_total=10), "to[0]"),
    (lambda: __import__("shared.mail", fromlist=["x"]).make_attachment("a.txt", "text/plain\n", b"", "f"),
     "f.contentType"),
])
def test_ids_and_values_ending_in_a_newline_are_refused(call: Any, field: str) -> None:
    with pytest.raises(ValidationError) as e:
        call()
    assert e.value.field == field


# -- 5. caps ----------------------------------------------------------------------------------------

def test_recipients_are_capped_in_total_and_attachments_per_message() -> None:
    from shared.errors import PayloadTooLargeError
    from shared.mail import MAX_ATTACHMENTS, MAX_RECIPIENTS, parse_send_request

    many = [f"u{i}@example.com" for i in range(300)]
    with pytest.raises(ValidationError) as e:
        parse_send_request({"to": many, "cc": many}, max_total=10)
    assert e.value.field == "cc" and MAX_RECIPIENTS == 500
    att = {"name": "a.txt", "contentType": "text/plain", "contentBytes": "aGk="}
    with pytest.raises(PayloadTooLargeError) as big:
        parse_send_request({"to": ["a@example.com"], "attachments": [att] * (MAX_ATTACHMENTS + 1)}, max_total=10**6)
    assert big.value.extra["field"] == "attachments" and big.value.status == 413


# -- 10. attachment names ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["invoice\u202efdp.exe", "a\u2066b\u2069.txt", "x\u200b\u200d.pdf", "n\r\nX: y.txt"])
def test_content_disposition_drops_bidi_and_control_characters(name: str) -> None:
    from urllib.parse import unquote

    from shared.blueprints._http import content_disposition

    value = content_disposition(name)
    decoded = unquote(value)
    for bad in ("\u202e", "\u2066", "\u2069", "\u200b", "\u200d", "\r", "\n"):
        assert bad not in decoded, value
    assert "\n" not in value and "\r" not in value


# -- 1b and 11. signed result, keyed state partition ------------------------------------------------

def _ring() -> Any:
    from shared.crypto import KeyRing

    return KeyRing("k2", {"k1": os.urandom(32), "k2": os.urandom(32)})


def test_result_token_verifies_with_the_published_keys_and_names_owner_account_and_state() -> None:
    from shared import connect_result
    from shared.crypto import KeyRing

    material = {"k1": os.urandom(32), "k2": os.urandom(32)}
    ring = KeyRing("k2", dict(material))
    token = connect_result.sign(ring, issuer="https://connector.example", audience="https://product.example",
                                owner="owner-1", account_id="acc_1", state="the-state")
    keys = jwt.PyJWKSet.from_dict(connect_result.jwks(ring))
    header = jwt.get_unverified_header(token)
    assert header["typ"] == "connect-result+jwt" and header["alg"] == "ES256"
    key = next(k for k in keys.keys if k.key_id == header["kid"])
    claims = jwt.decode(token, key, algorithms=["ES256"], audience="https://product.example",
                        issuer="https://connector.example")
    assert claims["sub"] == "owner-1" and claims["accountId"] == "acc_1"
    assert claims["stateHash"] == connect_result.state_hash("the-state")
    assert claims["exp"] - claims["iat"] == connect_result.RESULT_TTL_S <= 300
    assert {k.key_id for k in keys.keys} == {"connect-result-k1", "connect-result-k2"}  # every ring key published
    # Derived from the ring, not generated: another instance (a ring built anew from the same keys) publishes
    # the same keys and verifies this instance's token.
    other = KeyRing("k2", dict(material))
    assert other is not ring and connect_result.jwks(other) == connect_result.jwks(ring)
    other_key = next(k for k in jwt.PyJWKSet.from_dict(connect_result.jwks(other)).keys if k.key_id == header["kid"])
    assert jwt.decode(token, other_key, algorithms=["ES256"], audience="https://product.example",
                      issuer="https://connector.example")["sub"] == "owner-1"


def test_state_partition_is_a_keyed_mac_not_a_hash_of_the_owner() -> None:
    import hashlib

    from shared.oauth import STATE_MAC_PURPOSE, state_partition

    ring = _ring()
    key = ring.derive(STATE_MAC_PURPOSE)
    p = state_partition(key, "owner-1")
    assert p == state_partition(key, "owner-1") != state_partition(key, "owner-2")
    assert p[2:] != hashlib.sha256(b"owner-1").hexdigest()[:40]
    assert p != state_partition(_ring().derive(STATE_MAC_PURPOSE), "owner-1")
    assert key != ring.derive("connect-result-signing/v1")  # one key per purpose
