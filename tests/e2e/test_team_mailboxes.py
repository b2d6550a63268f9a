"""Team mailboxes end to end: admin consent, a tenant connection, a shared mailbox added and used through every
account route (send, read, reply, organise, search, events), beside a personal mailbox of the same owner; the
administrator's scope, consent removed and restored, and the bad inputs."""

from __future__ import annotations

import base64
import json
import os
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
import requests

from tests.conftest import Host, WebhookReceiver, authorize, wait_for
from tests.e2e.test_mail_events import matches_openapi
from tests.e2e.test_notifications import (  # noqa: F401 - sandbox_http is a fixture
    ADELE,
    account,
    connected,
    queues_idle,
    sandbox_http,
)

pytestmark = pytest.mark.usefixtures("sandbox_http")

CONTOSO = "72f988bf-0000-4000-8000-00000000c057"
FABRIKAM = "b6a1c2d3-0000-4000-8000-0000000fab01"
ADMIN = "admin@contoso.onmicrosoft.com"
SUPPORT = "support@contoso.onmicrosoft.com"
SALES = "sales@contoso.onmicrosoft.com"
RETURN = "https://app.example.com/connected"


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def admin_consent(host: Host, browser: requests.Session, owner: str, *, admin: str = ADMIN,
                  tenant: str | None = None) -> dict[str, str]:
    """The admin-consent journey: our route → the administrator signs in (form_post to our callback) → Entra's
    adminconsent page (the sandbox signs ``admin`` in) → our callback → the redirect to returnUrl."""
    consent_url = signed_in(host, browser, owner, admin=admin, tenant=tenant)
    assert consent_url.startswith(host.env["MS_AUTHORITY_HOST"] + "/"), consent_url
    back = browser.get(consent_url + "&login_hint=" + admin, allow_redirects=False, timeout=30)
    assert back.status_code == 302, back.text[:300]
    assert back.headers["Location"].startswith(host.url + "/api/connect/microsoft/callback?")
    done = host.http.get(back.headers["Location"], allow_redirects=False, timeout=60)
    assert done.status_code == 302, done.text[:500]
    assert done.headers["Location"].startswith(RETURN + "?")
    return {"callback": back.headers["Location"], **query_of(done.headers["Location"])}


def signed_in(host: Host, browser: requests.Session, owner: str, *, admin: str = ADMIN,
              tenant: str | None = None) -> str:
    """The first leg: start, sign in as ``admin``; returns where the callback sends the browser next."""
    params = {"returnUrl": RETURN, **({"tenant": tenant} if tenant else {})}
    start = host.api("GET", "/api/connect/microsoft/admin", sub=owner, params=params)
    assert start.status_code == 200, start.text
    assert "/oauth2/v2.0/authorize?" in start.json()["authUrl"]
    form = authorize(browser, start.json()["authUrl"] + "&login_hint=" + admin)
    assert form.action == host.url + "/api/connect/microsoft/callback", form.action
    leg = form.submit(host.http)
    assert leg.status_code == 302, leg.text[:500]
    return str(leg.headers["Location"])


def tenant_events(webhooks: WebhookReceiver, kind: str, connection_id: str) -> list[dict[str, Any]]:
    with webhooks.lock:
        docs = [json.loads(e["body"]) for e in webhooks.events]
    return [d for d in docs if d["type"] == kind and d["data"]["tenantConnection"]["id"] == connection_id]


def account_events(webhooks: WebhookReceiver, kind: str, account_id: str) -> list[dict[str, Any]]:
    with webhooks.lock:
        docs = [json.loads(e["body"]) for e in webhooks.events]
    return [d for d in docs if d["type"] == kind and d["data"].get("account", {}).get("id") == account_id]


def add(host: Host, owner: str, connection_id: str, address: object) -> requests.Response:
    return host.api("POST", f"/api/tenants/{connection_id}/mailboxes", sub=owner, json={"address": address})


def test_a_shared_mailbox_works_beside_a_personal_one(host: Host, browser_session: requests.Session, control: Any,
                                                     webhooks: WebhookReceiver) -> None:
    owner = "owner-team"
    personal = connected(host, browser_session, owner, ADELE)
    result = admin_consent(host, browser_session, owner)
    assert result["status"] == "connected" and result["tenantConnectionId"].startswith("tc_"), result
    claims = jwt.decode(result["result"], options={"verify_signature": False})  # the signed result, like a connect's
    assert claims["tenantConnectionId"] == result["tenantConnectionId"] and "accountId" not in claims
    tc = result["tenantConnectionId"]
    [listed] = host.api("GET", "/api/tenants", sub=owner).json()["tenants"]
    assert listed == {"id": tc, "tenantId": CONTOSO, "status": "active", "connectedAt": listed["connectedAt"],
                      "mailboxCount": 0, "lastError": None}

    r = add(host, owner, tc, SUPPORT)
    assert r.status_code == 201, r.text
    team = r.json()
    assert team["accessType"] == "application" and team["tenantConnectionId"] == tc
    assert team["email"] == SUPPORT and team["tenantId"] == CONTOSO and team["status"] == "active"
    assert sorted(team["scopes"]) == ["Mail.ReadWrite", "Mail.Send"]  # the application token's roles
    assert add(host, owner, tc, SUPPORT.upper()).json()["id"] == team["id"]  # the same mailbox once
    tid = team["id"]
    assert host.api("GET", f"/api/tenants/{tc}", sub=owner).json()["mailboxCount"] == 1
    # Inbound mail: the same subscriptions, on users/{address}, with the application token
    wait_for(lambda: account(host, owner, tid)["notifications"]["status"] == "active", timeout=60,
             what="the shared mailbox's subscriptions")
    resources = sorted(s["resource"] for s in control.subscriptions(SUPPORT))
    assert resources == [f"users/{SUPPORT}/mailFolders('Inbox')/messages",
                         f"users/{SUPPORT}/mailFolders('SentItems')/messages", f"users/{SUPPORT}/messages"]

    # The personal mailbox sends to the shared one: an event on each side, each on its own account.
    sent = host.api("POST", f"/api/accounts/{personal}/send", sub=owner,
                    json={"to": [SUPPORT], "subject": "Help please", "bodyText": "My printer is on fire"})
    assert sent.status_code == 202, sent.text

    def arrived() -> list[dict[str, Any]]:
        with webhooks.lock:
            docs = [json.loads(e["body"]) for e in webhooks.events]
        return [d for d in docs if d["type"] == "message.received" and d["data"]["accountId"] == tid
                and d["data"]["message"]["subject"] == "Help please"]

    [event] = wait_for(arrived, timeout=60, what="message.received on the shared mailbox")
    mid = event["data"]["message"]["id"]

    # the tenant's application token is cached in memory: reads make no token request
    grants = control.counters()["token_requests_by_grant_type"].get("client_credentials", 0)
    for _ in range(3):
        assert host.api("GET", f"/api/accounts/{tid}/messages", sub=owner).status_code == 200
    assert control.counters()["token_requests_by_grant_type"].get("client_credentials", 0) == grants
    listed_msgs = host.api("GET", f"/api/accounts/{tid}/messages", sub=owner, params={"top": "5"})
    assert listed_msgs.status_code == 200 and mid in [m["id"] for m in listed_msgs.json()["messages"]]
    one = host.api("GET", f"/api/accounts/{tid}/messages/{mid}", sub=owner).json()
    assert "printer" in one["body"]["content"]
    reply = host.api("POST", f"/api/accounts/{tid}/messages/{mid}/reply", sub=owner,
                     json={"bodyText": "We are on it", "trackingId": "ticket-1"})
    assert reply.status_code == 202, reply.text
    assert [s["message"]["subject"] for s in control.sent(SUPPORT)] == ["RE: Help please"]
    flagged = host.api("PATCH", f"/api/accounts/{tid}/messages/{mid}", sub=owner, json={"flag": "flagged",
                                                                                        "isRead": True})
    assert flagged.status_code == 200 and flagged.json()["isRead"] is True
    moved = host.api("POST", f"/api/accounts/{tid}/messages/{mid}/move", sub=owner, json={"folder": "archive"})
    assert moved.status_code == 200 and moved.json()["id"] == mid, moved.text
    found = host.api("GET", f"/api/accounts/{tid}/messages", sub=owner, params={"q": "printer"})
    assert found.status_code == 200 and [m["id"] for m in found.json()["messages"]] == [mid]
    data = os.urandom(5000)
    [invoice] = control.seed_messages(SUPPORT, [{"subject": "Invoice", "attachments": [{
        "name": "invoice.pdf", "contentType": "application/pdf", "contentBytes": base64.b64encode(data).decode()}]}])
    msg = host.api("GET", f"/api/accounts/{tid}/messages/{invoice}", sub=owner).json()
    raw = host.api("GET", f"/api/accounts/{tid}/messages/{invoice}/attachments/{msg['attachments'][0]['id']}",
                   sub=owner)
    assert raw.status_code == 200 and raw.content == data
    fwd = host.api("POST", f"/api/accounts/{tid}/messages/{invoice}/forward", sub=owner,
                   json={"to": [ADELE], "comment": "FYI"})
    assert fwd.status_code == 202, fwd.text
    thread = host.api("GET", f"/api/accounts/{tid}/conversations/{msg['conversationId']}", sub=owner)
    assert thread.status_code == 200 and invoice in [m["id"] for m in thread.json()["messages"]], thread.text
    big = host.api("POST", f"/api/accounts/{tid}/send", sub=owner, files={
        "message": (None, json.dumps({"to": [ADELE], "subject": "Big file"}), "application/json"),
        "file": ("report.bin", b"\x01" * (3 * 1024 * 1024 + 10), "application/octet-stream")})
    assert big.status_code == 202, big.text  # a draft and an upload session, as the shared mailbox
    assert control.sent(SUPPORT)[-1]["message"]["subject"] == "Big file"
    assert host.api("POST", f"/api/accounts/{tid}/refresh", sub=owner).status_code == 200
    # ... and the personal mailbox still works on /me beside it
    assert host.api("GET", f"/api/accounts/{personal}/messages", sub=owner).status_code == 200
    assert [a["accessType"] for a in host.api("GET", "/api/accounts", sub=owner).json()["accounts"]] == [
        "delegated", "application"]

    # another owner sees none of it
    other = "owner-team-other"
    assert host.api("GET", f"/api/tenants/{tc}", sub=other).status_code == 404
    assert add(host, other, tc, SUPPORT).status_code == 404
    assert host.api("DELETE", f"/api/tenants/{tc}", sub=other).status_code == 404
    assert host.api("GET", "/api/tenants", sub=other).json() == {"tenants": []}

    # disconnecting the tenant removes its mailboxes and their subscriptions; the personal one stays
    wait_for(lambda: queues_idle(host), timeout=60, what="the event jobs")
    assert host.api("DELETE", f"/api/tenants/{tc}", sub=owner).status_code == 204
    assert host.api("GET", f"/api/accounts/{tid}", sub=owner).status_code == 404
    assert control.subscriptions(SUPPORT) == []
    assert host.api("GET", f"/api/tenants/{tc}", sub=owner).status_code == 404
    assert host.api("GET", f"/api/accounts/{personal}", sub=owner).status_code == 200


def test_the_administrators_scope_and_diagnose(host: Host, browser_session: requests.Session, control: Any) -> None:
    owner = "owner-scope"
    client_id = host.env["MS_CLIENT_ID"]
    connected(host, browser_session, owner, ADELE)  # a mailbox of the tenant that is not a team mailbox: the probe
    tc = admin_consent(host, browser_session, owner)["tenantConnectionId"]
    control.set_app_scope(CONTOSO, client_id, [SUPPORT])
    team = add(host, owner, tc, SUPPORT).json()
    outside = add(host, owner, tc, SALES)
    assert outside.status_code == 409 and outside.json()["code"] == "mailbox_access_denied", outside.text
    assert "RBAC for Applications" in outside.json()["hint"]
    assert outside.headers["Content-Type"].startswith("application/problem+json")
    unknown = add(host, owner, tc, "nobody@contoso.onmicrosoft.com")
    assert unknown.status_code == 422 and unknown.json()["code"] == "mailbox_not_found", unknown.text
    assert host.api("GET", f"/api/tenants/{tc}", sub=owner).json()["mailboxCount"] == 1  # nothing stored

    def check(name: str, **params: str) -> dict[str, Any]:
        r = host.api("GET", f"/api/accounts/{team['id']}/diagnose", sub=owner, params=params)
        assert r.status_code == 200, r.text
        return next(c for c in r.json()["checks"] if c["name"] == name)

    scoped = check("adminScope")
    assert scoped["ok"] is True and "Scoped" in scoped["detail"] and ADELE in scoped["detail"]
    assert check("role:send mail")["ok"] is True and check("role:read mail")["ok"] is True
    assert check("mailbox")["ok"] is True
    control.set_app_scope(CONTOSO, client_id, None)
    unscoped = check("adminScope", probe=SALES)
    assert unscoped["ok"] is False and "every mailbox of the tenant" in unscoped["detail"]
    assert "RBAC for Applications" in unscoped["hint"]
    bad = host.api("GET", f"/api/accounts/{team['id']}/diagnose", sub=owner, params={"probe": "Sales <s@x.com>"})
    assert bad.status_code == 400 and bad.json()["field"] == "probe"


def test_consent_removed_then_restored_keeps_every_id(host: Host, browser_session: requests.Session, control: Any,
                                                      webhooks: WebhookReceiver) -> None:
    owner = "owner-consent"
    client_id = host.env["MS_CLIENT_ID"]
    tc = admin_consent(host, browser_session, owner)["tenantConnectionId"]
    tid = add(host, owner, tc, SUPPORT).json()["id"]
    wait_for(lambda: account(host, owner, tid)["notifications"]["status"] == "active", timeout=60,
             what="the shared mailbox's subscriptions")
    subscriptions = sorted(s["id"] for s in control.subscriptions(SUPPORT))

    control.remove_admin_consent(CONTOSO, client_id)  # and the application tokens issued before run out
    for _ in range(2):
        r = host.api("GET", f"/api/accounts/{tid}/messages", sub=owner)
        assert r.status_code == 409 and r.json()["code"] == "tenant_consent_required", r.text
        assert "adminconsent" in r.json()["hint"] or "admin consent" in r.json()["hint"]
    tenant = host.api("GET", f"/api/tenants/{tc}", sub=owner).json()
    assert tenant["status"] == "consent_required" and tenant["lastError"]["code"] == "tenant_consent_required"
    assert account(host, owner, tid)["status"] == "reauth_required"
    wait_for(lambda: tenant_events(webhooks, "tenant.consent_required", tc), timeout=30, what="tenant.consent_required")
    wait_for(lambda: account_events(webhooks, "account.reauth_required", tid), timeout=30, what="reauth_required")
    blocked = add(host, owner, tc, SALES)
    assert blocked.status_code == 409 and blocked.json()["code"] == "tenant_consent_required"

    again = admin_consent(host, browser_session, owner)
    assert again["tenantConnectionId"] == tc  # the same connection
    assert host.api("GET", f"/api/tenants/{tc}", sub=owner).json()["status"] == "active"
    assert account(host, owner, tid)["status"] == "active"
    assert host.api("GET", f"/api/accounts/{tid}/messages", sub=owner).status_code == 200
    wait_for(lambda: tenant_events(webhooks, "tenant.recovered", tc), timeout=30, what="tenant.recovered")
    wait_for(lambda: account_events(webhooks, "account.recovered", tid), timeout=30, what="account.recovered")
    assert len(tenant_events(webhooks, "tenant.consent_required", tc)) == 1  # once
    for doc in (tenant_events(webhooks, "tenant.consent_required", tc) + tenant_events(webhooks, "tenant.recovered", tc)
                + account_events(webhooks, "account.recovered", tid)):
        matches_openapi(doc)  # what the OpenAPI document's webhooks say
    assert account_events(webhooks, "account.recovered", tid)[0]["data"]["account"]["accessType"] == "application"
    assert sorted(s["id"] for s in control.subscriptions(SUPPORT)) == subscriptions  # still the same ones
    wait_for(lambda: queues_idle(host), timeout=60, what="the event jobs")


def test_admin_consent_failures_store_nothing(host: Host, browser_session: requests.Session, control: Any) -> None:
    owner = "owner-consent-bad"
    # not an administrator: refused after the sign-in, before any consent page
    not_admin = signed_in(host, browser_session, owner, admin=ADELE)
    result = query_of(not_admin)
    assert not_admin.startswith(RETURN) and result["status"] == "error" and result["code"] == "admin_required", result
    # the admin-consent page refuses a user who is not an administrator (AADSTS90093): our words, not Entra's
    consent_url = signed_in(host, browser_session, owner)
    back = browser_session.get(consent_url + "&login_hint=" + ADELE, allow_redirects=False, timeout=30)
    done = host.http.get(back.headers["Location"], allow_redirects=False, timeout=60)
    result = query_of(done.headers["Location"])
    assert result["status"] == "error" and result["code"] == "admin_required", result
    assert "AADSTS" not in result["message"]
    # replayed: the state was consumed
    replay = host.http.get(back.headers["Location"], allow_redirects=False, timeout=60)
    assert replay.status_code == 400 and replay.json()["code"] == "invalid_state"
    # forged or unknown state
    forged = host.http.get(host.url + "/api/connect/microsoft/callback", params={
        "admin_consent": "True", "tenant": CONTOSO, "state": "x" * 43 + "." + "0" * 40}, allow_redirects=False,
        timeout=30)
    assert forged.status_code == 400
    # another caller cannot claim a tenant by skipping the sign-in: the first leg's state wants a code
    thief = host.api("GET", "/api/connect/microsoft/admin", sub="owner-thief", params={"returnUrl": RETURN}).json()
    skipped = host.http.get(host.url + "/api/connect/microsoft/callback", params={
        "admin_consent": "True", "tenant": CONTOSO, "state": thief["state"]}, allow_redirects=False, timeout=30)
    assert query_of(skipped.headers["Location"])["status"] == "error"
    assert host.api("GET", "/api/tenants", sub="owner-thief").json() == {"tenants": []}
    # ... nor by changing the tenant of the consent answer: the signed-in administrator's tenant is kept
    consent_url = signed_in(host, browser_session, owner)
    state = parse_qs(urlsplit(consent_url).query)["state"][0]
    swapped = host.http.get(host.url + "/api/connect/microsoft/callback", params={
        "admin_consent": "True", "tenant": FABRIKAM, "state": state}, allow_redirects=False, timeout=30)
    assert query_of(swapped.headers["Location"])["code"] == "tenant_mismatch"
    # a link for Fabrikam, signed in with Contoso's administrator: Entra refuses the account (AADSTS50020)
    mismatch = query_of(signed_in(host, browser_session, owner, tenant="fabrikam.onmicrosoft.com"))
    assert mismatch["status"] == "error" and mismatch["code"] == "account_not_allowed", mismatch
    assert host.api("GET", "/api/tenants", sub=owner).json() == {"tenants": []}
    # bad input on the start route and the mailbox route
    for params, field in (({"returnUrl": "https://evil.example/"}, "returnUrl"),
                          ({"returnUrl": RETURN, "tenant": "common"}, "tenant"),
                          ({"returnUrl": RETURN, "tenant": "bad tenant"}, "tenant")):
        r = host.api("GET", "/api/connect/microsoft/admin", sub=owner, params=params)
        assert r.status_code == 400 and r.json()["field"] == field, (params, r.text)
    assert host.api("GET", "/api/connect/microsoft/admin", sub=None, params={"returnUrl": RETURN}).status_code == 401
    tc = admin_consent(host, browser_session, owner, tenant=CONTOSO)["tenantConnectionId"]
    for address in ("Support <support@contoso.onmicrosoft.com>", "a@b.com, c@d.com", "x@contoso.com\r\nBcc: y@z",
                    "a" * 250 + "@contoso.com", "", 42, None):
        r = add(host, owner, tc, address)
        assert r.status_code == 400 and r.json()["field"] == "address", (address, r.text)
    assert host.api("GET", f"/api/tenants/{tc}", sub=owner).json()["mailboxCount"] == 0
    assert add(host, owner, "tc_nope", SUPPORT).status_code == 404


def test_concurrent_adds_and_consents_store_one_of_each(host: Host, browser_session: requests.Session) -> None:
    from concurrent.futures import ThreadPoolExecutor

    owner = "owner-races"
    first = admin_consent(host, browser_session, owner)["tenantConnectionId"]
    assert admin_consent(host, browser_session, owner)["tenantConnectionId"] == first
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: add(host, owner, first, SUPPORT), range(4)))
    assert sorted(r.status_code for r in answers).count(201) <= 1, [r.text for r in answers]
    assert len({r.json()["id"] for r in answers}) == 1
    assert [a["email"] for a in host.api("GET", "/api/accounts", sub=owner).json()["accounts"]] == [SUPPORT]
    assert len(host.api("GET", "/api/tenants", sub=owner).json()["tenants"]) == 1
    wait_for(lambda: queues_idle(host), timeout=60, what="the event jobs")
