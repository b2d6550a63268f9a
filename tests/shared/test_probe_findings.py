"""Pure-logic guards of an attacker's findings: lone surrogates, ASCII-only address comparison, duplicate
multipart boundaries, the callback's fixed messages, notification ids and lifecycle merging, caller token
lifetime. Each asserts what the fix changed (it fails on the code before it)."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from shared.auth import CallerAuth
from shared.blueprints._http import json_body, lone_surrogate_at
from shared.blueprints.send import check_multipart_parts
from shared.config import load_settings
from shared.connect_flow import ascii_lower
from shared.connect_flow import check_login_hint as _check_login_hint
from shared.errors import AuthenticationError, PayloadTooLargeError, ValidationError
from shared.ms_errors import AUTHORIZE_ERRORS, callback_message, from_authorize_error
from shared.notification_intake import _merge_lifecycle, parse_batch
from shared.notifications import Job
from tests.shared.test_config import GOOD

# -- lone surrogates -------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "field"), [
    (b'{"to": ["a@b.com"], "subject": "\\ud800"}', "subject"),
    (b'{"to": ["a@b.com"], "bodyText": "ok \\udfff"}', "bodyText"),
    (b'{"to": [{"address": "a@b.com", "name": "x\\ud800"}]}', "to[0].name"),
    (b'{"to": ["a@b.com"], "attachments": [{"name": "f\\ud83d.txt", "contentBytes": ""}]}', "attachments[0].name"),
    (b'{"comment": "\\ud800"}', "comment"),
])
def test_a_lone_surrogate_is_a_400_naming_its_field(raw: bytes, field: str) -> None:
    with pytest.raises(ValidationError) as e:
        json_body(raw, "body")
    assert e.value.field == field and e.value.status == 400


def test_a_surrogate_pair_is_text_and_passes() -> None:
    doc = json_body('{"subject": "\\ud83d\\ude00 \u00e9", "to": ["a@b.com"]}', "body")
    assert isinstance(doc, dict) and doc["subject"] == "\U0001F600 \u00e9"
    assert lone_surrogate_at({"k": ["fine", {"x": "ok"}]}) is None
    assert lone_surrogate_at({"\ud800": 1}) == "body"


def test_a_lone_surrogate_in_a_multipart_file_name_is_refused() -> None:
    from shared.mail import make_attachment

    with pytest.raises(ValidationError) as e:
        make_attachment("a\udc80.txt", "text/plain", b"x", "files[0]")
    assert e.value.field == "files[0].name"


# -- requireLoginHint: ASCII case only --------------------------------------------------------------

@pytest.mark.parametrize("hint", [
    "megan@conto\u017fo.onmicrosoft.com",  # LATIN SMALL LETTER LONG S: casefold() makes it "s"
    "megan@contoso.onmicroso\u212at.com",  # KELVIN SIGN: lower() makes it "k"... in no real address
    "MEGAN@CONTO\u017fO.ONMICROSOFT.COM",
])
def test_unicode_look_alikes_do_not_match_an_address(hint: str) -> None:
    with pytest.raises(Exception) as e:
        _check_login_hint(hint, ("megan@contoso.onmicrosoft.com", "megan@contoso.onmicrosoft.com"))
    assert getattr(e.value, "code", None) == "account_mismatch"


def test_ascii_case_still_matches() -> None:
    _check_login_hint(" Megan@Contoso.OnMicrosoft.com ", (None, "megan@contoso.onmicrosoft.com"))
    assert ascii_lower("AbC\u017f\u212a") == "abc\u017f\u212a"


# -- multipart: one boundary ------------------------------------------------------------------------

def test_a_content_type_naming_two_boundaries_is_refused_before_parsing() -> None:
    body = b"--b\r\n" * 5000 + b"--b--\r\n"
    with pytest.raises(ValidationError) as e:
        check_multipart_parts(body, "multipart/form-data; boundary=a; boundary=b")
    assert e.value.field == "Content-Type"
    with pytest.raises(ValidationError):
        check_multipart_parts(body, 'multipart/form-data; boundary="a"; BOUNDARY=b')


def test_parts_are_counted_by_the_boundary_the_parser_uses() -> None:
    body = b"--b\r\n" * 5000 + b"--b--\r\n"
    with pytest.raises(PayloadTooLargeError):
        check_multipart_parts(body, 'multipart/form-data; boundary="b"')
    check_multipart_parts(b"--b\r\nx\r\n--b--\r\n", "multipart/form-data; boundary=b")


# -- the callback never shows error_description ----------------------------------------------------

def test_the_callback_error_message_is_ours_not_the_redirects() -> None:
    phish = "AADSTS65001: Your account is locked. Call +1 555 0100 to unlock it."
    err = from_authorize_error({"error": "consent_required", "error_description": phish})
    assert err.code == "consent_required" and err.detail == callback_message("consent_required")
    assert "555" not in err.detail and "555" not in str(err) and "locked" not in (err.hint or "")
    odd = from_authorize_error({"error": "call_555_0100_now", "error_description": "x"})
    assert odd.code == "authorization_error" and odd.detail == "Microsoft sign-in did not complete."
    assert "access_denied" in AUTHORIZE_ERRORS
    assert from_authorize_error({"error": "access_denied"}).detail == callback_message("access_denied")


# -- notification ids and lifecycle ----------------------------------------------------------------

def test_notification_ids_follow_the_rule_of_route_ids() -> None:
    item = {"subscriptionId": "s", "clientState": "x", "changeType": "created",
            "resourceData": {"id": "AAMk/../../users/other"}}
    with pytest.raises(ValidationError) as e:
        parse_batch({"value": [item]})
    assert e.value.field == "value[0].resourceData.id"


def test_lifecycle_events_of_one_subscription_merge_into_one_job() -> None:
    def job(event: str) -> Job:
        return Job("lifecycle", "o", "a", "s", event=event, catchup=event != "reauthorizationRequired")

    merged = None
    for event in ["missed"] * 20 + ["reauthorizationRequired"]:
        merged = _merge_lifecycle(merged, job(event))
    assert merged is not None and merged.event == "reauthorizationRequired" and merged.catchup
    merged = _merge_lifecycle(merged, job("subscriptionRemoved"))
    assert merged.event == "subscriptionRemoved" and merged.catchup
    assert not _merge_lifecycle(None, job("reauthorizationRequired")).catchup


# -- caller token lifetime -------------------------------------------------------------------------

def _auth(**env: str) -> CallerAuth:
    return CallerAuth(load_settings({**GOOD, **env}))


def _token(**claims: Any) -> str:
    now = int(time.time())
    body = {"sub": "u", "iss": "i", "aud": "a", "iat": now, "exp": now + 3600, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, "x" * 32, algorithm="HS256")


def test_a_caller_token_longer_lived_than_the_cap_is_refused() -> None:
    now = int(time.time())
    a = _auth()
    assert a.authenticate("Bearer " + _token(exp=now + 23 * 3600)) == "u"
    with pytest.raises(AuthenticationError, match="AUTH_MAX_TOKEN_LIFETIME_SECONDS"):
        a.authenticate("Bearer " + _token(exp=now + 365 * 86400))
    with pytest.raises(AuthenticationError, match="lives longer"):  # without iat: the time it has left
        a.authenticate("Bearer " + _token(iat=None, exp=now + 2 * 86400))
    with pytest.raises(AuthenticationError, match="IssuedAt"):
        a.authenticate("Bearer " + _token(iat="yesterday"))
    short = _auth(AUTH_MAX_TOKEN_LIFETIME_SECONDS="600")
    with pytest.raises(AuthenticationError):
        short.authenticate("Bearer " + _token())
    assert short.authenticate("Bearer " + _token(exp=now + 300)) == "u"


def test_health_reports_storage_that_cannot_be_reached_on_first_use() -> None:
    """The parts are built inside their checks: storage refusing connections from the start is a failed
    check in the report (503 with checks), not an exception in place of it."""
    from shared.service import Connector
    from tests.conftest import storage_settings

    dead = ("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=" + "A" * 86 + "==;"
            "TableEndpoint=http://127.0.0.1:9/devstoreaccount1;QueueEndpoint=http://127.0.0.1:9/devstoreaccount1;")
    ok, checks = Connector(storage_settings(dead)).health()
    assert ok is False and checks["storage"]["ok"] is False and checks["storage"]["code"] == "storage_unavailable"
    assert checks["tokenKeys"]["ok"] is True and "appRegistration" in checks
