"""Connect journey end to end: dev host + Azurite + sandbox over HTTPS with real MSAL inside."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest

from tests.conftest import FormPost, Host, authorize, connect

WORK = "adele@contoso.onmicrosoft.com"
WORK2 = "megan@contoso.onmicrosoft.com"
PERSONAL = "pat@outlook.com"
CONSENT = "user@fabrikam.onmicrosoft.com"
BLOCKED = "blocked@contoso.onmicrosoft.com"
CONSUMER_TID = "9188040d-6c67-4c5b-b112-36a304b66dad"
ACCOUNT_FIELDS = {"id", "provider", "email", "displayName", "tenantId", "accountType", "status", "scopes",
                  "connectedAt", "lastRefreshedAt", "accessTokenExpiresAt", "lastUsedAt", "lastError", "notifications",
                  "accessType"}


def _states(host: Host) -> list[dict[str, Any]]:
    from azure.data.tables import TableClient

    t = TableClient.from_connection_string(host.env["AzureWebJobsStorage"], "oauthstates")
    return list(t.list_entities())


def _account_rows(host: Host) -> int:
    from azure.data.tables import TableClient

    t = TableClient.from_connection_string(host.env["AzureWebJobsStorage"], "accounts")
    return len(list(t.list_entities()))


def test_work_account_connects_and_is_listed(host: Host, browser_session: Any) -> None:
    out = connect(host, browser_session, sub="owner-work", login_hint=WORK)
    assert out["location"].startswith("https://app.example.com/connected?")
    assert out["result"]["status"] == "connected"
    account_id = out["result"]["accountId"]
    assert "no-referrer" in out["response"].headers.get("Referrer-Policy", "")
    r = host.api("GET", "/api/accounts", sub="owner-work")
    assert r.status_code == 200
    accounts = r.json()["accounts"]
    assert [a["id"] for a in accounts] == [account_id]
    acc = accounts[0]
    assert set(acc) == ACCOUNT_FIELDS
    assert acc["email"] == WORK and acc["accountType"] == "work" and acc["status"] == "active"
    assert acc["tenantId"] and acc["tenantId"] != CONSUMER_TID
    assert {"Mail.Send", "Mail.ReadWrite", "User.Read"} <= set(acc["scopes"])
    assert acc["provider"] == "microsoft" and acc["lastError"] is None
    one = host.api("GET", f"/api/accounts/{account_id}", sub="owner-work")
    # notifications changes in the background (the Inbox subscription is made after the connect)
    assert one.status_code == 200 and {**one.json(), "notifications": None} == {**acc, "notifications": None}
    assert one.headers["x-correlation-id"]


def test_personal_account_is_told_apart(host: Host, browser_session: Any) -> None:
    out = connect(host, browser_session, sub="owner-personal", login_hint=PERSONAL)
    assert out["result"]["status"] == "connected", out
    acc = host.api("GET", f"/api/accounts/{out['result']['accountId']}", sub="owner-personal").json()
    assert acc["accountType"] == "personal" and acc["tenantId"] == CONSUMER_TID and acc["email"] == PERSONAL


def test_reconnect_keeps_id_and_same_mailbox_is_not_duplicated(host: Host, browser_session: Any) -> None:
    first = connect(host, browser_session, sub="owner-re", login_hint=WORK2)["result"]["accountId"]
    again = connect(host, browser_session, sub="owner-re", login_hint=WORK2)["result"]["accountId"]
    assert again == first
    kept = connect(host, browser_session, sub="owner-re", login_hint=WORK2, accountId=first)["result"]
    assert kept == {"status": "connected", "accountId": first}
    assert [a["id"] for a in host.api("GET", "/api/accounts", sub="owner-re").json()["accounts"]] == [first]
    # Re-connecting an account id with another Microsoft account is refused, and changes nothing.
    wrong = connect(host, browser_session, sub="owner-re", login_hint=WORK, accountId=first)["result"]
    assert wrong["status"] == "error" and wrong["code"] == "account_mismatch"
    assert host.api("GET", f"/api/accounts/{first}", sub="owner-re").json()["email"] == WORK2


def test_delete_destroys_the_record(host: Host, browser_session: Any) -> None:
    acc_id = connect(host, browser_session, sub="owner-del", login_hint=WORK)["result"]["accountId"]
    assert host.api("DELETE", f"/api/accounts/{acc_id}", sub="owner-del").status_code == 204
    assert host.api("GET", f"/api/accounts/{acc_id}", sub="owner-del").status_code == 404
    assert host.api("DELETE", f"/api/accounts/{acc_id}", sub="owner-del").status_code == 404
    from azure.data.tables import TableClient

    t = TableClient.from_connection_string(host.env["AzureWebJobsStorage"], "accounts")
    assert not [e for e in t.list_entities() if e["RowKey"] == acc_id]


def test_refresh_now_rotates_and_updates_account(host: Host, browser_session: Any, control: Any) -> None:
    acc_id = connect(host, browser_session, sub="owner-rn", login_hint=WORK2)["result"]["accountId"]
    before = host.api("GET", f"/api/accounts/{acc_id}", sub="owner-rn").json()
    r = host.api("POST", f"/api/accounts/{acc_id}/refresh", sub="owner-rn")
    assert r.status_code == 200, r.text
    after = r.json()
    assert after["status"] == "active" and after["lastRefreshedAt"] >= before["lastRefreshedAt"]
    assert control.live_refresh_tokens(WORK2) >= 1


@pytest.mark.parametrize(("hint", "codes"), [
    (CONSENT, {"consent_required", "admin_consent_required"}),
    (BLOCKED, {"blocked_by_conditional_access"}),
])
def test_failure_users_end_in_clear_error_redirect(host: Host, browser_session: Any, hint: str,
                                                   codes: set[str]) -> None:
    sub = "owner-fail-" + hint.split("@")[0]
    r = host.api("GET", "/api/connect/microsoft", sub=sub,
                 params={"loginHint": hint, "returnUrl": "https://app.example.com/connected"})
    form = authorize(browser_session, r.json()["authUrl"])  # Entra form_posts errors like codes
    assert form.action.startswith(host.url) and "error" in form.fields, form.fields
    cb = form.submit(host.http)
    assert cb.status_code == 302
    result = {k: v[0] for k, v in parse_qs(urlsplit(cb.headers["Location"]).query).items()}
    assert result["status"] == "error" and result["code"] in codes, result
    # Our fixed message for the code: the redirect's error_description came through the browser.
    from shared.ms_errors import callback_message

    assert result["message"] == callback_message(result["code"]) and "AADSTS" not in result["message"], result
    assert form.fields.get("error_description", "")[:20] not in cb.headers["Location"]
    assert "result" not in result  # no signed result for a failure
    if "consent_required" in codes:  # the product gets the link to send to a tenant administrator
        assert "/v2.0/adminconsent?client_id=" in result["hint"], result
    assert host.api("GET", "/api/accounts", sub=sub).json()["accounts"] == []


def test_callback_without_return_url_renders_page_for_opener(host: Host, browser_session: Any) -> None:
    out = connect(host, browser_session, sub="owner-popup", login_hint=WORK, return_url=None)
    page = out["response"]
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "Mailbox connected" in page.text and "window.opener" in page.text and "messageParent" in page.text
    assert "script-src 'nonce-" in page.headers["Content-Security-Policy"]
    assert '"*"' not in page.text  # postMessage is aimed at allowed origins only


# -- attacks ----------------------------------------------------------------------------------------

def test_forged_state_is_rejected(host: Host) -> None:
    before = _account_rows(host)
    for state in ("forged", "A" * 43 + "." + "0" * 40, "", "x" * 500):
        r = host.http.post(host.url + "/api/connect/microsoft/callback", data={"state": state, "code": "abc"},
                           timeout=30, allow_redirects=False)
        assert r.status_code == 400 and r.headers["Content-Type"].startswith("application/problem+json")
        assert r.json()["code"] == "invalid_state"
    assert _account_rows(host) == before


def _authorize(host: Host, browser: Any, sub: str, hint: str = WORK) -> tuple[dict[str, Any], FormPost]:
    start = host.api("GET", "/api/connect/microsoft", sub=sub,
                     params={"loginHint": hint, "returnUrl": "https://app.example.com/connected"}).json()
    return start, authorize(browser, start["authUrl"])


def test_replayed_state_is_rejected(host: Host, browser_session: Any) -> None:
    _, callback = _authorize(host, browser_session, "owner-replay")
    assert callback.submit(host.http).status_code == 302
    before = _account_rows(host)
    again = callback.submit(host.http)
    assert again.status_code == 400 and again.json()["code"] == "invalid_state"
    assert _account_rows(host) == before


def test_two_concurrent_callbacks_with_one_state_one_wins(host: Host, browser_session: Any) -> None:
    _, callback = _authorize(host, browser_session, "owner-race", WORK2)
    results: list[int] = []
    locations: list[str] = []
    barrier = threading.Barrier(2)

    def hit() -> None:
        barrier.wait()
        r = callback.submit(host.http)
        results.append(r.status_code)
        locations.append(r.headers.get("Location", ""))

    threads = [threading.Thread(target=hit) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [302, 400], locations
    assert len(host.api("GET", "/api/accounts", sub="owner-race").json()["accounts"]) == 1


def test_expired_state_is_rejected(host: Host, browser_session: Any) -> None:
    from azure.data.tables import TableClient, UpdateMode

    start, callback = _authorize(host, browser_session, "owner-expired")
    t = TableClient.from_connection_string(host.env["AzureWebJobsStorage"], "oauthstates")
    import hashlib

    rk = hashlib.sha256(start["state"].encode()).hexdigest()
    row = next(e for e in t.list_entities() if e["RowKey"] == rk)
    past = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)).isoformat()
    t.update_entity({"PartitionKey": row["PartitionKey"], "RowKey": rk, "expiresAt": past}, mode=UpdateMode.MERGE)
    r = callback.submit(host.http)
    assert r.status_code == 400 and r.json()["code"] == "expired_state"
    assert host.api("GET", "/api/accounts", sub="owner-expired").json()["accounts"] == []


def test_replayed_code_is_rejected(host: Host, browser_session: Any) -> None:
    _, first = _authorize(host, browser_session, "owner-code")
    assert first.submit(host.http).status_code == 302
    code = first.fields["code"]
    rows_after_first = _account_rows(host)
    start2, _ = _authorize(host, browser_session, "owner-code")
    r = host.http.post(host.url + "/api/connect/microsoft/callback", data={"state": start2["state"], "code": code},
                       allow_redirects=False, timeout=60)
    result = parse_qs(urlsplit(r.headers["Location"]).query)
    assert result["status"] == ["error"]
    assert result["code"][0] in ("code_already_redeemed", "pkce_mismatch")
    assert _account_rows(host) == rows_after_first  # nothing stored by the replay
    assert len(host.api("GET", "/api/accounts", sub="owner-code").json()["accounts"]) == 1


def test_pkce_mismatch_code_injection_is_rejected(host: Host, browser_session: Any) -> None:
    """A code obtained for flow A, injected into flow B (another verifier), must not redeem."""
    _, cb_a = _authorize(host, browser_session, "owner-pkce")
    code_a = cb_a.fields["code"]
    start_b, _ = _authorize(host, browser_session, "owner-pkce")
    r = host.http.post(host.url + "/api/connect/microsoft/callback", data={"state": start_b["state"], "code": code_a},
                       allow_redirects=False, timeout=60)
    result = parse_qs(urlsplit(r.headers["Location"]).query)
    assert result["status"] == ["error"] and result["code"] == ["pkce_mismatch"], result
    assert host.api("GET", "/api/accounts", sub="owner-pkce").json()["accounts"] == []


@pytest.mark.parametrize("url", [
    "https://evil.example.com/connected", "https://app.example.com/other", "https://app.example.com/connectedX",
    "https://app.example.com.evil.com/connected", "http://app.example.com/connected", "//evil.com/connected",
    "javascript:alert(1)", "https://user@app.example.com/connected", "https://app.example.com:444/connected",
    "https://app.example.com/connected/../admin", "https://app.example.com/connected/%2e%2e/admin",
    "https://app.example.com/connected/%2E%2E%2Fadmin", "https://app.example.com/connected\\..\\admin",
])
def test_open_redirect_is_refused(host: Host, url: str) -> None:
    states_before = len(_states(host))
    r = host.api("GET", "/api/connect/microsoft", sub="owner-redirect", params={"returnUrl": url})
    assert r.status_code == 400 and r.headers["Content-Type"].startswith("application/problem+json")
    assert r.json()["field"] == "returnUrl"
    assert len(_states(host)) == states_before  # no pending flow was stored


def test_return_url_below_allowed_prefix_is_accepted(host: Host) -> None:
    r = host.api("GET", "/api/connect/microsoft", sub="owner-redirect",
                 params={"returnUrl": "https://app.example.com/connected/team?x=1"})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"authUrl", "state", "expiresAt"} and len(body["state"]) >= 43
    q = parse_qs(urlsplit(body["authUrl"]).query)
    assert q["code_challenge_method"] == ["S256"] and q["code_challenge"]
    assert "offline_access" in q["scope"][0].split()


def test_bad_prompt_names_the_field(host: Host) -> None:
    r = host.api("GET", "/api/connect/microsoft", sub="o", params={"prompt": "none"})
    assert r.status_code == 400 and r.json()["field"] == "prompt"


def test_cross_owner_access_is_404(host: Host, browser_session: Any) -> None:
    from azure.data.tables import TableClient

    from shared.accounts import owner_partition

    acc_id = connect(host, browser_session, sub="owner-x", login_hint=WORK)["result"]["accountId"]
    table = TableClient.from_connection_string(host.env["AzureWebJobsStorage"], "accounts")
    etag_before = table.get_entity(owner_partition("owner-x"), acc_id).metadata["etag"]
    for method, path in (("GET", f"/api/accounts/{acc_id}"), ("DELETE", f"/api/accounts/{acc_id}"),
                         ("POST", f"/api/accounts/{acc_id}/refresh")):
        r = host.api(method, path, sub="owner-y")
        assert r.status_code == 404, (method, r.text)
        assert r.json()["code"] == "account_not_found"
    r = host.api("GET", "/api/connect/microsoft", sub="owner-y", params={"accountId": acc_id})
    assert r.status_code == 404
    assert table.get_entity(owner_partition("owner-x"), acc_id).metadata["etag"] == etag_before  # untouched
    assert host.api("GET", f"/api/accounts/{acc_id}", sub="owner-x").status_code == 200
    assert host.api("GET", "/api/accounts", sub="owner-y").json()["accounts"] == []


@pytest.mark.parametrize("case", ["missing", "garbage", "expired", "audience", "issuer", "signature", "nbf",
                                  "basic"])
def test_caller_jwt_is_required_and_checked(host: Host, case: str) -> None:
    import time

    import jwt

    headers: dict[str, str] = {}
    if case == "garbage":
        headers["Authorization"] = "Bearer not.a.jwt"
    elif case == "expired":
        headers["Authorization"] = "Bearer " + host.token("o", exp=int(time.time()) - 3600, iat=int(time.time()) - 7200,
                                                          nbf=int(time.time()) - 7200)
    elif case == "audience":
        headers["Authorization"] = "Bearer " + host.token("o", aud="someone-else")
    elif case == "issuer":
        headers["Authorization"] = "Bearer " + host.token("o", iss="https://evil.test")
    elif case == "signature":
        headers["Authorization"] = "Bearer " + jwt.encode(
            {"sub": "o", "iss": host.env["AUTH_ISSUER"], "aud": host.env["AUTH_AUDIENCE"],
             "exp": int(time.time()) + 60}, "another-secret-of-at-least-32-bytes!!", algorithm="HS256")
    elif case == "nbf":
        headers["Authorization"] = "Bearer " + host.token("o", nbf=int(time.time()) + 3600)
    elif case == "basic":
        headers["Authorization"] = "Basic b3duZXI6cGFzcw=="
    states_before = len(_states(host))
    for method, path in (("GET", "/api/accounts"), ("GET", "/api/connect/microsoft?returnUrl=https%3A%2F%2Fapp."
                                                           "example.com%2Fconnected")):
        r = host.api(method, path, sub=None, headers=headers)
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        # RFC 6750 §3.1: no credentials at all → the scheme only; a bad token → error="invalid_token".
        assert ("error=" in r.headers["WWW-Authenticate"]) == ("Authorization" in headers), (case, r.headers)
        assert r.headers["Content-Type"].startswith("application/problem+json")
    assert len(_states(host)) == states_before  # connect stored no pending flow for an unauthenticated caller


def test_a_problem_type_resolves_to_its_description(host: Host) -> None:
    r = host.api("GET", "/api/accounts", sub=None)
    assert r.status_code == 401
    # RFC 9457 §3.1.1: `type` is a URI reference, resolved against the request's URL (RFC 3986 §5).
    page = host.http.get(urljoin(r.url, r.json()["type"]), timeout=30)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert 'id="unauthorized"' in page.text
    assert "script-src" not in page.headers["Content-Security-Policy"]  # default-src 'none': no script at all


def test_pending_states_per_owner_are_bounded(host: Host) -> None:
    for _ in range(15):
        assert host.api("GET", "/api/connect/microsoft", sub="owner-flood").status_code == 200
    mine = [e for e in _states(host) if e["owner"] == "owner-flood"]
    assert 0 < len(mine) <= 10
    assert len({e["PartitionKey"] for e in mine}) == 1  # one partition per owner
