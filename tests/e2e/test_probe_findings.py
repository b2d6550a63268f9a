"""An attacker's probe of a running connector, replayed against the stack (dev host + Azurite + the HTTPS
sandbox, real MSAL): each test sends the request that reproduced a finding and checks the answer now."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.conftest import FEEDS, Host, authorize, connect, wait_for
from tests.e2e.test_hardening import _sign_in_as, _without_login_hint
from tests.e2e.test_notifications import (  # noqa: F401 - sandbox_http is a fixture
    ADELE,
    NOTIFY,
    account,
    connected,
    in_process,
    inbox_subscriptions,
    queues_idle,
    sandbox_http,
    subscription_of,
)

APP = "https://app.example.com/connected"


def _problem(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["Content-Type"].startswith("application/problem+json")
    return dict(r.json())


# -- 1. duplicate multipart boundaries --------------------------------------------------------------

def test_a_second_boundary_parameter_is_refused_before_parsing(host: Host) -> None:
    parts = b"".join(b"--b\r\nContent-Disposition: form-data; name=\"f%d\"\r\n\r\nx\r\n" % i for i in range(20_000))
    started = time.monotonic()
    r = host.api("POST", "/api/accounts/acct-any/send", data=parts + b"--b--\r\n",
                 headers={"Content-Type": "multipart/form-data; boundary=a; boundary=b"})
    assert _problem(r, 400)["field"] == "Content-Type"
    one = host.api("POST", "/api/accounts/acct-any/send", data=parts + b"--b--\r\n",
                   headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert _problem(one, 413)["field"] == "files"  # counted by the boundary the parser would use
    assert time.monotonic() - started < 30


# -- 2. lone surrogates ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "body", "field"), [
    ("send", '{"to": ["a@b.com"], "subject": "\\ud800"}', "subject"),
    ("send", '{"to": ["a@b.com"], "bodyHtml": "<p>\\ud800</p>"}', "bodyHtml"),
    ("send", '{"to": [{"address": "a@b.com", "name": "\\udc00"}]}', "to[0].name"),
    ("send", '{"to": ["a@b.com"], "attachments": [{"name": "\\ud800.txt", "contentType": "text/plain", '
             '"contentBytes": "eA=="}]}', "attachments[0].name"),
    ("messages/AAMkAGI2/reply", '{"comment": "\\ud800"}', "comment"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(host: Host, path: str, body: str, field: str) -> None:
    r = host.api("POST", f"/api/accounts/acct-any/{path}", data=body.encode(),
                 headers={"Content-Type": "application/json", "Idempotency-Key": "surrogate-1"})
    assert _problem(r, 400)["field"] == field


def test_a_lone_surrogate_in_a_multipart_part_is_a_400(host: Host) -> None:
    files = {"message": (None, '{"to": ["a@b.com"], "subject": "\\ud800"}', "application/json"),
             "file": ("a.txt", b"x", "text/plain")}
    r = host.api("POST", "/api/accounts/acct-any/send", files=files, headers={"Idempotency-Key": "surrogate-2"})
    assert _problem(r, 400)["field"] == "subject"


# -- 3. requireLoginHint and Unicode look-alikes -----------------------------------------------------

def test_a_long_s_in_the_login_hint_does_not_match_another_address(host: Host, browser_session: Any) -> None:
    owner = "owner-long-s"
    r = host.api("GET", "/api/connect/microsoft", sub=owner, params={
        "returnUrl": APP, "loginHint": "megan@conto\u017fo.onmicrosoft.com", "requireLoginHint": "true"})
    assert r.status_code == 200, r.text
    form = _sign_in_as(browser_session, _without_login_hint(r.json()["authUrl"]), "megan@contoso.onmicrosoft.com")
    cb = form.submit(host.http)
    result = {k: v[0] for k, v in parse_qs(urlsplit(cb.headers["Location"]).query).items()}
    assert result["status"] == "error" and result["code"] == "account_mismatch"
    assert host.api("GET", "/api/accounts", sub=owner).json()["accounts"] == []


# -- 4. declared bodies over an anonymous endpoint's cap ---------------------------------------------

@pytest.mark.parametrize(("path", "ctype"), [
    (NOTIFY, "application/json"), (NOTIFY + "/lifecycle", "application/json"),
    ("/api/connect/microsoft/callback", "application/x-www-form-urlencoded"),
])
def test_a_declared_length_over_the_cap_is_refused_before_the_body_is_read(host: Host, path: str,
                                                                            ctype: str) -> None:
    u = urlsplit(host.url)
    head = (f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {99 * 1024 * 1024}\r\nConnection: close\r\n\r\n")
    with socket.create_connection((u.hostname or "127.0.0.1", u.port or 80), timeout=10) as s:
        s.sendall(head.encode() + b"{")  # 99 MB announced, one byte sent: the answer must not wait for the rest
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"application/problem+json" in answer


# -- 5. lifecycle storms, forged removals, notification ids -------------------------------------------

def _client_state(host: Host, owner: str, aid: str) -> str:
    from shared.crypto import account_aad
    from shared.storage import SUBSCRIPTIONS_TABLE

    c = in_process(host)
    state = c.notifications.store.get(owner, aid)
    sealed = str(c.storage.table(SUBSCRIPTIONS_TABLE).get(state.client_key, "cs")["clientState"])
    return str(c.secrets.key_ring().open(sealed, aad=account_aad(owner, aid, "clientState")).decode())


def _subscribed(host: Host, browser: Any, control: Any, owner: str) -> tuple[str, str, str]:
    """A connected account with its live subscription, once the connect's own jobs are done:
    (account id, subscription id, its clientState)."""
    aid = connected(host, browser, owner, ADELE)
    sid = str(subscription_of(control, ADELE)["id"])
    cs = _client_state(host, owner, aid)
    wait_for(lambda: queues_idle(host), what="the connect's own jobs")
    return aid, sid, cs


def test_a_lifecycle_storm_does_one_catch_up(host: Host, browser_session: Any, control: Any,
                                             sandbox_http: None) -> None:  # noqa: F811
    _, sid, cs = _subscribed(host, browser_session, control, "owner-storm")
    before = control.counters()["delta_requests"]
    storm = [{"subscriptionId": sid, "clientState": cs, "lifecycleEvent": "missed"}] * 200
    assert host.http.post(host.url + NOTIFY + "/lifecycle", json={"value": storm}, timeout=30).status_code == 202
    wait_for(lambda: control.counters()["delta_requests"] > before, timeout=30, what="the catch-up")
    wait_for(lambda: queues_idle(host), what="the storm's jobs")
    assert control.counters()["delta_requests"] - before <= 2  # one round (a page or two), not 200


def test_a_forged_subscription_removed_leaves_one_live_subscription(host: Host, browser_session: Any,
                                                                     control: Any, sandbox_http: None) -> None:  # noqa: F811
    owner = "owner-forged-removal"
    aid = connected(host, browser_session, owner, ADELE)
    first = subscription_of(control, ADELE)["id"]
    cs = _client_state(host, owner, aid)  # e.g. read off a misrouted notification
    r = host.http.post(host.url + NOTIFY + "/lifecycle", json={"value": [
        {"subscriptionId": first, "clientState": cs, "lifecycleEvent": "subscriptionRemoved"}]}, timeout=30)
    assert r.status_code == 202
    wait_for(lambda: [s for s in inbox_subscriptions(control, ADELE) if s["id"] != first], timeout=30,
             what="the recreated subscription")
    wait_for(lambda: queues_idle(host), what="the job")
    subs = inbox_subscriptions(control, ADELE)
    assert len(subs) == 1 and subs[0]["id"] != first  # the old one is gone at Graph, not left live beside it
    assert account(host, owner, aid)["notifications"]["status"] == "active"


def test_a_flood_of_ids_becomes_one_catch_up_not_one_read_each(host: Host, browser_session: Any, control: Any,
                                                               sandbox_http: None) -> None:  # noqa: F811
    from shared.notification_intake import MAX_IDS_PER_BATCH

    _, sid, cs = _subscribed(host, browser_session, control, "owner-id-flood")
    before = control.counters()
    items = [{"subscriptionId": sid, "clientState": cs, "changeType": "created",
              "resourceData": {"id": f"AAMkFlood{i}"}} for i in range(MAX_IDS_PER_BATCH + 50)]
    # A lifecycle item in the same batch (Graph posts lifecycle events to the lifecycle URL; a batch that
    # mixes them must still not lose the flood's catch-up).
    items.append({"subscriptionId": sid, "clientState": cs, "lifecycleEvent": "reauthorizationRequired"})
    assert host.http.post(host.url + NOTIFY, json={"value": items}, timeout=30).status_code == 202
    wait_for(lambda: control.counters()["delta_requests"] > before["delta_requests"], timeout=30,
             what="the catch-up")
    wait_for(lambda: queues_idle(host), what="the flood's jobs")
    after = control.counters()
    reads = after["graph_requests_by_user"].get(ADELE, 0) - before["graph_requests_by_user"].get(ADELE, 0)
    assert reads < 20, reads
    assert subscription_of(control, ADELE)["reauthorizations"] == 1  # one job did both


def test_notification_ids_with_a_slash_are_refused(host: Host) -> None:
    item = {"subscriptionId": "s", "clientState": "x", "changeType": "created",
            "resourceData": {"id": "AAMk/../../me/mailFolders"}}
    r = host.http.post(host.url + NOTIFY, json={"value": [item]}, timeout=30)
    assert _problem(r, 400)["field"] == "value[0].resourceData.id"


# -- 7. concurrent connects: one subscription, all gone on disconnect -------------------------------

def test_concurrent_subscription_jobs_of_one_account_make_one_subscription(host: Host, browser_session: Any,
                                                                          control: Any,
                                                                          sandbox_http: None) -> None:  # noqa: F811
    from shared.notifications import Job

    owner = "owner-concurrent"
    control.inject("/v1.0/subscriptions", latency_ms=1500, count=3)  # creations overlap, as under load
    aid = str(connect(host, browser_session, sub=owner, login_hint=ADELE)["result"]["accountId"])
    c = in_process(host)
    outcomes: list[str] = []
    workers = [threading.Thread(target=lambda: outcomes.append(
        c.notifications.worker.process(Job("ensure", owner, aid).to_message()))) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    wait_for(lambda: queues_idle(host), timeout=120, what="the retried jobs")
    wait_for(lambda: account(host, owner, aid)["notifications"]["status"] == "active", timeout=60,
             what="an active subscription")
    assert len(inbox_subscriptions(control, ADELE)) == 1, (outcomes, control.subscriptions(ADELE))
    assert len(control.subscriptions(ADELE)) == FEEDS, (outcomes, control.subscriptions(ADELE))
    assert host.api("DELETE", f"/api/accounts/{aid}", sub=owner).status_code == 204
    assert control.subscriptions(ADELE) == []
    from azure.data.tables import TableClient

    rows = TableClient.from_connection_string(host.env["AzureWebJobsStorage"], "subscriptions").list_entities()
    assert [r for r in rows if r.get("accountId") == aid or str(r["RowKey"]).startswith(aid)] == []


def test_concurrent_callbacks_of_one_mailbox_store_one_account(host: Host, browser_session: Any,
                                                                control: Any, sandbox_http: None) -> None:  # noqa: F811
    """Four connect flows of one mailbox by one owner, completed at once: one account (the others update it),
    one subscription, and after the disconnect none."""
    owner = "owner-four-connects"
    forms = []
    for _ in range(4):
        start = host.api("GET", "/api/connect/microsoft", sub=owner,
                         params={"returnUrl": APP, "loginHint": ADELE}).json()
        forms.append(authorize(browser_session, start["authUrl"]))
    answers: list[int] = []
    threads = [threading.Thread(target=lambda f=f: answers.append(f.submit(host.http).status_code)) for f in forms]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answers == [302] * 4
    [acc] = host.api("GET", "/api/accounts", sub=owner).json()["accounts"]
    wait_for(lambda: queues_idle(host), timeout=120, what="the connects' jobs")
    wait_for(lambda: account(host, owner, acc["id"])["notifications"]["status"] == "active", timeout=60,
             what="an active subscription")
    assert len(inbox_subscriptions(control, ADELE)) == 1 and len(control.subscriptions(ADELE)) == FEEDS
    assert host.api("DELETE", f"/api/accounts/{acc['id']}", sub=owner).status_code == 204
    assert control.subscriptions(ADELE) == []


# -- 8. pending states under concurrency; forced refreshes coalesce ---------------------------------

def test_the_pending_state_cap_holds_under_concurrency(host: Host) -> None:
    from azure.data.tables import TableClient

    from shared.oauth import MAX_PENDING_STATES_PER_OWNER, state_partition

    owner = "owner-state-flood"
    codes: list[int] = []

    def start() -> None:
        r = host.api("GET", "/api/connect/microsoft", sub=owner, params={"returnUrl": APP})
        codes.append(r.status_code)

    threads = [threading.Thread(target=start) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert codes.count(200) == 40
    c = in_process(host)
    from shared.oauth import STATE_MAC_PURPOSE

    pk = state_partition(c.secrets.key_ring().derive(STATE_MAC_PURPOSE), owner)
    table = TableClient.from_connection_string(host.env["AzureWebJobsStorage"], "oauthstates")
    live = list(table.query_entities("PartitionKey eq @pk", parameters={"pk": pk}))
    assert len(live) <= MAX_PENDING_STATES_PER_OWNER, len(live)


def test_forced_refreshes_in_a_burst_cost_one_grant(host: Host, browser_session: Any, control: Any) -> None:
    owner = "owner-refresh-burst"
    aid = connect(host, browser_session, sub=owner, login_hint="megan@contoso.onmicrosoft.com")["result"]["accountId"]
    first = host.api("POST", f"/api/accounts/{aid}/refresh", sub=owner)
    assert first.status_code == 200, first.text
    before = control.counters()["token_requests_by_grant_type"].get("refresh_token", 0)
    answers: list[int] = []
    threads = [threading.Thread(target=lambda: answers.append(
        host.api("POST", f"/api/accounts/{aid}/refresh", sub=owner).status_code)) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answers == [200] * 30
    assert control.counters()["token_requests_by_grant_type"].get("refresh_token", 0) == before


# -- 9, 10. the callback: fixed messages, a code in the URL burns its state --------------------------

def test_the_callback_never_shows_the_error_description(host: Host) -> None:
    r = host.api("GET", "/api/connect/microsoft", sub="owner-phish", params={"returnUrl": APP})
    state = r.json()["state"]
    phish = "AADSTS65001: Your mailbox is locked. Call +1 555 0100 to unlock it."
    cb = host.http.post(host.url + "/api/connect/microsoft/callback", allow_redirects=False, timeout=30,
                        data={"state": state, "error": "consent_required", "error_description": phish})
    assert cb.status_code == 302
    loc = cb.headers["Location"]
    result = {k: v[0] for k, v in parse_qs(urlsplit(loc).query).items()}
    assert result["code"] == "consent_required" and "555" not in loc and "locked" not in loc
    page_state = host.api("GET", "/api/connect/microsoft", sub="owner-phish").json()["state"]
    page = host.http.post(host.url + "/api/connect/microsoft/callback", timeout=30,
                          data={"state": page_state, "error": "access_denied", "error_description": phish})
    assert page.status_code == 400 and "555" not in page.text and "locked" not in page.text


def test_a_code_in_the_query_burns_its_state(host: Host, browser_session: Any) -> None:
    start = host.api("GET", "/api/connect/microsoft", sub="owner-query-code",
                     params={"returnUrl": APP, "loginHint": ADELE}).json()
    form = authorize(browser_session, start["authUrl"])
    tampered = host.http.get(host.url + "/api/connect/microsoft/callback", params=form.fields, timeout=30,
                             allow_redirects=False)
    assert _problem(tampered, 400)["field"] == "code"
    late = form.submit(host.http)  # the same code and state, now as Entra would have posted them
    assert late.status_code == 400 and late.headers["Content-Type"].startswith("application/problem+json")
    assert late.json()["code"] == "invalid_state"
    assert host.api("GET", "/api/accounts", sub="owner-query-code").json()["accounts"] == []


# -- 11. no caching, no sniffing ------------------------------------------------------------------------

def test_every_api_json_answer_is_no_store_and_nosniff(host: Host, browser_session: Any) -> None:
    owner = "owner-cache"
    aid = connect(host, browser_session, sub=owner, login_hint=ADELE)["result"]["accountId"]
    answers = [
        host.api("GET", "/api/connect/microsoft", sub=owner, params={"returnUrl": APP}),
        host.api("GET", f"/api/accounts/{aid}", sub=owner),
        host.api("GET", f"/api/accounts/{aid}/messages", sub=owner),
        host.api("GET", "/api/accounts/nope", sub=owner),  # a problem too
        host.api("GET", "/api/health", sub=None),
        host.api("GET", "/api/connect/microsoft/keys", sub=None),
    ]
    msgs = answers[2].json()["messages"]
    if msgs:
        answers.append(host.api("GET", f"/api/accounts/{aid}/messages/{msgs[0]['id']}", sub=owner))
    for r in answers:
        assert r.headers.get("Cache-Control") == "no-store", (r.url, r.headers.get("Cache-Control"))
        assert r.headers.get("X-Content-Type-Options") == "nosniff", r.url


# -- 13. PKCE: our flow always sends a challenge -------------------------------------------------------

def test_our_authorization_request_always_carries_an_s256_challenge(host: Host) -> None:
    for params in ({"returnUrl": APP}, {"returnUrl": APP, "loginHint": ADELE, "prompt": "consent"}):
        auth_url = host.api("GET", "/api/connect/microsoft", sub="owner-pkce", params=params).json()["authUrl"]
        q = parse_qs(urlsplit(auth_url).query)
        assert q["code_challenge_method"] == ["S256"] and len(q["code_challenge"][0]) == 43


# -- 14. caller token lifetime ----------------------------------------------------------------------------

def test_a_year_long_caller_token_is_refused(host: Host) -> None:
    now = int(time.time())
    token = host.token("owner-long-token", iat=now, exp=now + 365 * 86400)
    r = host.http.get(host.url + "/api/accounts", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert _problem(r, 401)["code"] == "unauthorized"
    assert "AUTH_MAX_TOKEN_LIFETIME_SECONDS" in json.dumps(r.json())

