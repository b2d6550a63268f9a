"""Hardening against the running stack (dev host + Azurite + the HTTPS sandbox, real MSAL): a forwarded
connect link, log forging, hostile bodies and headers, form_post, the result page, attachments, the
dev host's token and admin endpoints, webhook redirects. Each test fails on the code before the fix."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import jwt
import pytest
import requests

from tests.conftest import FormPost, Host, authorize, connect, read_form_post, wait_for

WORK = "adele@contoso.onmicrosoft.com"
OTHER = "megan@contoso.onmicrosoft.com"
APP = "https://app.example.com/connected"


def _start(host: Host, sub: str, **params: str) -> dict[str, Any]:
    r = host.api("GET", "/api/connect/microsoft", sub=sub, params={"returnUrl": APP, **params})
    assert r.status_code == 200, r.text
    return dict(r.json())


def _accounts(host: Host, sub: str) -> list[dict[str, Any]]:
    return list(host.api("GET", "/api/accounts", sub=sub).json()["accounts"])


def _query(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def _without_login_hint(auth_url: str) -> str:
    """What a user does on Entra's page with "Use another account": the hint no longer decides who signs in."""
    parts = urlsplit(auth_url)
    q = [(k, v) for k, vs in parse_qs(parts.query).items() for v in vs if k != "login_hint"]
    return urlunsplit(parts._replace(query=urlencode(q)))


def _sign_in_as(browser: requests.Session, auth_url: str, upn: str) -> FormPost:
    """Through the sandbox's account picker and permissions page, as a person would."""
    picker = browser.get(auth_url, allow_redirects=False, timeout=30)
    assert "Pick an account" in picker.text, picker.text[:300]
    base = f"{urlsplit(auth_url).scheme}://{urlsplit(auth_url).netloc}"
    action = re.search(r"action='([^']+)'", picker.text)
    ctx = re.search(r"name='ctx' value='([^']+)'", picker.text)
    assert action and ctx
    consent = browser.post(base + action.group(1), data={"ctx": ctx.group(1), "user": upn}, timeout=30)
    assert "Permissions requested" in consent.text, consent.text[:300]
    consent_action = re.search(r"action='([^']+)'", consent.text)
    assert consent_action
    done = browser.post(base + consent_action.group(1), data={"ctx": ctx.group(1), "decision": "accept"},
                        allow_redirects=False, timeout=30)
    return read_form_post(done)


# -- 1. a forwarded connect link -----------------------------------------------------------------------

def test_forwarded_link_with_require_login_hint_stores_nothing(host: Host, browser_session: Any) -> None:
    owner = "owner-forwarded"
    start = _start(host, owner, loginHint=WORK, requireLoginHint="true")
    # The link reaches someone else, who signs in with their own account.
    form = _sign_in_as(browser_session, _without_login_hint(start["authUrl"]), OTHER)
    cb = form.submit(host.http)
    assert cb.status_code == 302
    result = _query(cb.headers["Location"])
    assert result["status"] == "error" and result["code"] == "account_mismatch", result
    assert OTHER not in cb.headers["Location"]  # the link's owner does not learn who signed in
    assert "result" not in result and "accountId" not in result
    assert _accounts(host, owner) == []


def test_require_login_hint_matches_upn_case_insensitively(host: Host, browser_session: Any) -> None:
    out = connect(host, browser_session, sub="owner-hint-case", login_hint=WORK.upper(), requireLoginHint="true")
    assert out["result"]["status"] == "connected", out["result"]
    assert [a["email"] for a in _accounts(host, "owner-hint-case")] == [WORK]


@pytest.mark.parametrize(("params", "field"), [
    ({"requireLoginHint": "true"}, "loginHint"), ({"requireLoginHint": "true", "loginHint": " "}, "loginHint"),
    ({"requireLoginHint": "yes", "loginHint": WORK}, "requireLoginHint"),
])
def test_require_login_hint_input_is_checked(host: Host, params: dict[str, str], field: str) -> None:
    r = host.api("GET", "/api/connect/microsoft", sub="owner-hint-input", params=params)
    assert r.status_code == 400 and r.headers["Content-Type"].startswith("application/problem+json")
    assert r.json()["field"] == field


def test_success_redirect_carries_a_signed_result_the_integrator_can_verify(host: Host,
                                                                             browser_session: Any) -> None:
    owner = "owner-result"
    before = dt.datetime.now(dt.timezone.utc)
    out = connect(host, browser_session, sub=owner, login_hint=WORK)
    start, token = out["start"], out["result_token"]
    expires = dt.datetime.fromisoformat(start["expiresAt"].replace("Z", "+00:00"))
    assert expires - before <= dt.timedelta(minutes=5, seconds=5)  # the state lives as long as a sign-in needs
    keys = host.http.get(host.url + "/api/connect/microsoft/keys", timeout=30)
    assert keys.status_code == 200 and keys.headers["Content-Type"].startswith("application/json")
    jwk_set = jwt.PyJWKSet.from_dict(keys.json())
    header = jwt.get_unverified_header(token)
    key = next(k for k in jwk_set.keys if k.key_id == header["kid"])
    claims = jwt.decode(token, key, algorithms=["ES256"], audience=host.env["AUTH_ISSUER"], issuer=host.url,
                        options={"require": ["exp", "iat", "sub", "aud", "iss"]})
    digest = base64.urlsafe_b64encode(hashlib.sha256(start["state"].encode()).digest()).rstrip(b"=").decode()
    assert claims["sub"] == owner and claims["accountId"] == out["result"]["accountId"]
    assert claims["stateHash"] == digest and header["typ"] == "connect-result+jwt"
    assert 0 < claims["exp"] - claims["iat"] <= 300
    with pytest.raises(jwt.InvalidSignatureError):  # altered claims do not verify
        head, body, sig = token.split(".")
        forged = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        forged["sub"] = "someone-else"
        body2 = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
        jwt.decode(f"{head}.{body2}.{sig}", key, algorithms=["ES256"], audience=host.env["AUTH_ISSUER"])


# -- 2. log forging ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["POST", "GET"])
def test_a_forged_error_value_does_not_become_a_log_line(host: Host, method: str) -> None:
    marker = f"forged-{method.lower()}-{time.monotonic_ns()}"
    start = _start(host, "owner-logforge")
    injected = 'x\n{"correlationId": "' + marker + '", "function": "send_mail", "status": 200}'
    fields = {"state": start["state"], "error": injected, "error_description": "AADSTS1: a\nb"}
    url = host.url + "/api/connect/microsoft/callback"
    if method == "POST":
        r = host.http.post(url, data=fields, allow_redirects=False, timeout=60)
    else:
        r = host.http.get(url, params=fields, allow_redirects=False, timeout=60)
    assert r.status_code == 302
    result = _query(r.headers["Location"])
    assert result["status"] == "error" and result["code"] == "authorization_error", result  # not the raw value
    wait_for(lambda: "connect_microsoft_callback" in host.log_text(), what="the callback's log line")
    for line in host.log_text().splitlines():
        assert not line.lstrip().startswith('{"correlationId": "' + marker), line
        assert "\u2028" not in line


# -- 3, 5, 6. hostile bodies -----------------------------------------------------------------------------

@pytest.mark.parametrize("body", ["[" * 100_000, '{"a":' * 5000 + "1" + "}" * 5000])
def test_deeply_nested_json_is_a_400(host: Host, body: str) -> None:
    r = host.api("POST", "/api/accounts/acc_any/send", data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["field"] == "body", r.text


def test_deeply_nested_multipart_message_is_a_400(host: Host) -> None:
    r = host.api("POST", "/api/accounts/acc_any/send", files={"message": (None, "[" * 100_000)})
    assert r.status_code == 400 and r.json()["field"] == "message", r.text


def test_many_multipart_parts_are_refused_before_parsing(host: Host) -> None:
    boundary = "b0undary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="message"\r\n\r\n{{"to":["a@example.com"]}}\r\n']
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="f"; filename="{i}.txt"\r\n'
              f"Content-Type: text/plain\r\n\r\nx\r\n" for i in range(20_000)]
    body = ("".join(parts) + f"--{boundary}--\r\n").encode()
    t0 = time.monotonic()
    r = host.api("POST", "/api/accounts/acc_any/send", data=body,
                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and r.json()["field"] == "files", r.text
    assert time.monotonic() - t0 < 10


def test_many_json_attachments_and_recipients_are_refused(host: Host) -> None:
    att = {"name": "a.txt", "contentType": "text/plain", "contentBytes": "aGk="}
    r = host.api("POST", "/api/accounts/acc_any/send", json={"to": ["a@example.com"], "attachments": [att] * 3000})
    assert r.status_code == 413 and r.json()["field"] == "attachments", r.text
    many = [f"u{i}@example.com" for i in range(300)]
    r = host.api("POST", "/api/accounts/acc_any/send", json={"to": many, "cc": many, "bcc": many})
    assert r.status_code == 400 and r.json()["field"] == "cc", r.text


@pytest.fixture(scope="module")
def mailbox(host: Host, browser_session: Any) -> str:
    return str(connect(host, browser_session, sub="owner-harden", login_hint=OTHER)["result"]["accountId"])


def test_values_ending_in_a_newline_are_refused(host: Host, mailbox: str, control: Any) -> None:
    before = len(control.sent(OTHER))
    r = host.api("POST", f"/api/accounts/{mailbox}/send", sub="owner-harden",
                 json={"to": ["a@example.com"], "trackingId": "abc\n"})
    assert r.status_code == 400 and r.json()["field"] == "trackingId", r.text
    r = host.api("GET", f"/api/accounts/{mailbox}/messages/AAMkAGI%0A", sub="owner-harden")
    assert r.status_code == 400 and r.json()["field"] == "messageId", r.text
    assert len(control.sent(OTHER)) == before


# -- 4. a lone surrogate in sub --------------------------------------------------------------------------

@pytest.mark.parametrize("sub", ["\ud800", "own\u202eer", "a\nb"])
def test_malformed_sub_is_401(host: Host, sub: str) -> None:
    for path in ("/api/accounts", "/api/connect/microsoft"):
        r = host.api("GET", path, sub=None, headers={"Authorization": "Bearer " + host.token(sub)})
        assert r.status_code == 401 and r.headers["Content-Type"].startswith("application/problem+json"), r.text


# -- 8. the result page -----------------------------------------------------------------------------------

def test_result_page_cannot_be_framed_and_cleans_its_url_before_office_js(host: Host, browser_session: Any) -> None:
    page = connect(host, browser_session, sub="owner-page", login_hint=WORK, return_url=None)["response"]
    assert page.status_code == 200
    assert page.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert page.headers["Referrer-Policy"] == "no-referrer"
    clean, office = page.text.find("history.replaceState"), page.text.find("appsforoffice.microsoft.com")
    assert 0 < clean < office, "the URL is cleaned before any third-party script loads"
    assert '"result": "' in page.text  # the signed result travels to the opener too


# -- 10. attachment names and sandboxing ------------------------------------------------------------------

def test_attachment_download_drops_bidi_controls_and_is_sandboxed(host: Host, mailbox: str, control: Any) -> None:
    name = "invoice\u202efdp.exe"
    [mid] = control.seed_messages(OTHER, [{"subject": "bidi", "attachments": [
        {"name": name, "contentType": "text/html", "contentBytes": base64.b64encode(b"<script>1</script>").decode()}]}])
    detail = host.api("GET", f"/api/accounts/{mailbox}/messages/{mid}", sub="owner-harden").json()
    att = detail["attachments"][0]["id"]
    r = host.api("GET", f"/api/accounts/{mailbox}/messages/{mid}/attachments/{att}", sub="owner-harden")
    assert r.status_code == 200
    assert r.headers["Content-Security-Policy"] == "sandbox" and r.headers["X-Content-Type-Options"] == "nosniff"
    disposition = r.headers["Content-Disposition"]
    assert "%E2%80%AE" not in disposition.upper() and "\u202e" not in disposition, disposition


# -- 11. the state suffix ---------------------------------------------------------------------------------

def test_state_suffix_does_not_link_a_state_to_its_owner(host: Host) -> None:
    a1, a2, b = (_start(host, s)["state"] for s in ("owner-link-a", "owner-link-a", "owner-link-b"))
    suffix = a1.rpartition(".")[2]
    assert suffix == a2.rpartition(".")[2] != b.rpartition(".")[2]  # still routes to the owner's partition
    assert suffix != hashlib.sha256(b"owner-link-a").hexdigest()[:40]


# -- 12. the dev host's token endpoint ------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{"Host": "evil.example"}, {"Host": "attacker.test:7071"},
                                     {"Origin": "http://evil.example"}])
def test_demo_token_refuses_foreign_host_or_origin(host: Host, headers: dict[str, str]) -> None:
    r = host.http.post(host.url + "/demo/token", json={"sub": "demo-user"}, headers=headers, timeout=30)
    assert r.status_code == 403 and "token" not in r.json()


def test_demo_token_on_loopback_still_works_and_checks_sub(host: Host) -> None:
    ok = host.http.post(host.url + "/demo/token", json={"sub": "demo-user"},
                        headers={"Origin": host.url}, timeout=30)
    assert ok.status_code == 200 and ok.json()["token"]
    assert ok.json()["sandbox"] == host.env["MS_AUTHORITY_HOST"]  # the demo page's instructions use this port
    assert host.http.post(host.url + "/demo/token", json={"sub": "demo\n"}, timeout=30).status_code == 400
    assert host.http.post(host.url + "/demo/token", data="[" * 100_000, timeout=30).status_code == 400


def test_admin_call_with_a_foreign_host_needs_the_master_key(host: Host) -> None:
    r = host.http.post(host.url + "/admin/functions/cleanup_timer", json={}, headers={"Host": "evil.example"},
                       timeout=30)
    assert r.status_code == 401


# -- 13. form_post -------------------------------------------------------------------------------------------

def test_code_arrives_by_form_post_and_never_in_a_url(host: Host, browser_session: Any) -> None:
    start = _start(host, "owner-formpost", loginHint=WORK)
    assert parse_qs(urlsplit(start["authUrl"]).query)["response_mode"] == ["form_post"]
    form = authorize(browser_session, start["authUrl"])
    assert urlsplit(form.action).query == "" and form.fields["code"] and form.fields["state"] == start["state"]
    # A code in the callback's query string was not sent by the flow we started: refused, nothing stored,
    # and its state is burnt: the same code posted afterwards connects nothing.
    r = host.http.get(host.url + "/api/connect/microsoft/callback", params=form.fields, allow_redirects=False,
                      timeout=60)
    assert r.status_code == 400 and r.json()["field"] == "code"
    assert _accounts(host, "owner-formpost") == []
    cb = form.submit(host.http)
    assert cb.status_code == 400 and cb.json()["code"] == "invalid_state"
    assert _accounts(host, "owner-formpost") == []
    again = _start(host, "owner-formpost", loginHint=WORK)  # a new flow connects
    assert authorize(browser_session, again["authUrl"]).submit(host.http).status_code == 302


def test_error_redirect_by_get_still_works(host: Host) -> None:
    start = _start(host, "owner-get-error")
    r = host.http.get(host.url + "/api/connect/microsoft/callback", allow_redirects=False, timeout=60,
                      params={"state": start["state"], "error": "access_denied",
                              "error_description": "AADSTS65004: User declined to consent to access the app."})
    assert r.status_code == 302
    result = _query(r.headers["Location"])
    assert result["status"] == "error" and result["code"] == "consent_declined"  # AADSTS65004


def test_callback_post_must_be_a_form(host: Host) -> None:
    r = host.http.post(host.url + "/api/connect/microsoft/callback", json={"state": "x"}, timeout=30)
    assert r.status_code == 400 and r.json()["field"] == "Content-Type"


# -- 9. webhook delivery does not follow redirects ------------------------------------------------------

class _Redirecting:
    def __init__(self) -> None:
        self.hits: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.hits.append(self.path)
                if self.path == "/hook":
                    self.send_response(307)
                    self.send_header("Location", "/elsewhere")
                else:
                    self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"


def test_webhook_delivery_does_not_follow_a_redirect(host: Host) -> None:
    from shared._http import new_session
    from shared.storage import Storage
    from shared.webhooks import Webhooks

    receiver = _Redirecting()
    try:
        queue = Storage(host.settings()).queue("webhook-redirect-test")
        queue.create_if_missing()
        hooks = Webhooks(receiver.url, "whsec-test", queue=lambda: queue, session=new_session(None))
        event = {"id": "evt_redirect", "type": "account.connected", "createdAt": "2026-01-01T00:00:00Z",
                 "data": {"account": {}}}
        hooks.deliver(json.dumps({"attempt": 0, "event": event}).encode())
        assert receiver.hits == ["/hook"]  # the signed body was not re-posted to /elsewhere
    finally:
        receiver.server.shutdown()
