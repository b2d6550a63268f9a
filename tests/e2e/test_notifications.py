"""Inbound mail end to end (SPEC §6a): connect → Graph subscription validated and created → mail lands in
the Inbox → one signed ``message.received`` webhook; duplicates suppressed; dropped notifications,
``missed`` and ``subscriptionRemoved`` recovered by delta catch-up; renewal; disconnect; forged and
malformed notifications."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

import pytest
from azure.data.tables import TableClient
from azure.storage.queue import QueueClient

from shared.webhooks import verify
from tests.conftest import Host, WebhookReceiver, connect, wait_for

ADELE = "adele@contoso.onmicrosoft.com"
MEGAN = "megan@contoso.onmicrosoft.com"
NOTIFY = "/api/notifications/microsoft"


@pytest.fixture()
def sandbox_http(control: Any) -> Iterator[None]:
    """A fresh sandbox that accepts the dev host's loopback http notification URL (Graph requires https;
    the session's sandbox is told so, like `make dev`'s)."""
    control.reset()
    control.notification_switches(allow_http=True, drop=0, duplicate=0)
    yield
    control.notification_switches(drop=0, duplicate=0)


def received(webhooks: WebhookReceiver, account_id: str) -> list[dict[str, Any]]:
    out = []
    with webhooks.lock:
        events = list(webhooks.events)
    for e in events:
        doc = json.loads(e["body"])
        if doc["type"] == "message.received" and doc["data"]["accountId"] == account_id:
            out.append({**e, "doc": doc})
    return out


def account(host: Host, owner: str, account_id: str) -> dict[str, Any]:
    r = host.api("GET", f"/api/accounts/{account_id}", sub=owner)
    assert r.status_code == 200, r.text
    return dict(r.json())


def connected(host: Host, browser: Any, owner: str, upn: str) -> str:
    """Connect and wait until the Inbox subscription is active."""
    account_id = str(connect(host, browser, sub=owner, login_hint=upn)["result"]["accountId"])
    wait_for(lambda: account(host, owner, account_id)["notifications"]["status"] == "active", timeout=60,
             what="the Inbox subscription")
    return account_id


def subscription_of(control: Any, upn: str) -> dict[str, Any]:
    [sub] = control.subscriptions(upn)
    return dict(sub)


def queues_idle(host: Host) -> bool:
    cs = host.env["AzureWebJobsStorage"]
    return all(QueueClient.from_connection_string(cs, q).get_queue_properties().approximate_message_count == 0
               for q in ("notification-jobs", "webhook-deliveries"))


def make_due(host: Host, account_id: str) -> None:
    """Move the account's maintenance row of the subscription index into the past."""
    table = TableClient.from_connection_string(host.env["AzureWebJobsStorage"], "subscriptionindex")
    rows = [r for r in table.list_entities() if str(r["RowKey"]).endswith("|" + account_id)]
    assert rows, "the account has no index row"
    for r in rows:
        table.upsert_entity({**r, "PartitionKey": "200001010000"})
        table.delete_entity(r["PartitionKey"], r["RowKey"])


def run_function(host: Host, name: str) -> None:
    r = host.http.post(f"{host.url}/admin/functions/{name}", json={"input": ""}, timeout=120)
    assert r.status_code == 202, r.text


def test_arrival_becomes_one_signed_message_received(host: Host, browser_session: Any, control: Any,
                                                     webhooks: WebhookReceiver, sandbox_http: None) -> None:
    owner = "owner-inbound"
    aid = connected(host, browser_session, owner, ADELE)
    sub = subscription_of(control, ADELE)
    assert sub["notificationUrl"] == host.url + NOTIFY
    assert sub["lifecycleNotificationUrl"] == host.url + NOTIFY + "/lifecycle"
    acc = account(host, owner, aid)
    assert acc["notifications"]["expiresAt"] and acc["notifications"]["status"] == "active"
    [mid] = control.seed_messages(ADELE, [{"subject": "Quarterly numbers", "body": {"contentType": "text",
                                                                                    "content": "See attached."}}])
    [event] = wait_for(lambda: received(webhooks, aid), timeout=20, what="message.received")
    doc = event["doc"]
    assert verify(host.env["WEBHOOK_SECRET"], event["body"], event["headers"]["X-Connector-Signature"])
    assert event["headers"]["X-Connector-Event"] == "message.received" and doc["id"].startswith("evt_")
    msg = doc["data"]["message"]
    assert msg["id"] == mid and msg["subject"] == "Quarterly numbers" and msg["bodyPreview"] == "See attached."
    assert set(msg) == {"id", "subject", "from", "toRecipients", "receivedDateTime", "conversationId",
                        "internetMessageId", "hasAttachments", "bodyPreview", "isRead"}
    assert "account" not in doc["data"]
    wait_for(lambda: account(host, owner, aid)["notifications"]["lastEventAt"], what="lastEventAt")
    checks = {c["name"]: c for c in host.api("GET", f"/api/accounts/{aid}/diagnose", sub=owner).json()["checks"]}
    assert checks["notifications"]["ok"] is True


def test_mail_sent_by_another_user_and_duplicates_suppressed(host: Host, browser_session: Any, control: Any,
                                                             webhooks: WebhookReceiver, sandbox_http: None) -> None:
    owner = "owner-dupes"
    aid = connected(host, browser_session, owner, ADELE)
    sender = str(connect(host, browser_session, sub=owner, login_hint=MEGAN)["result"]["accountId"])
    control.notification_switches(duplicate=-1)
    r = host.api("POST", f"/api/accounts/{sender}/send", sub=owner,
                 json={"to": [ADELE], "subject": "from megan", "bodyText": "hello adele"})
    assert r.status_code == 202, r.text
    wait_for(lambda: len([d for d in control.notifications()["deliveries"] if d["status"] == 202]) >= 2,
             what="the duplicated notification")
    wait_for(lambda: received(webhooks, aid) and queues_idle(host), what="processing to finish")
    [event] = received(webhooks, aid)
    assert event["doc"]["data"]["message"]["subject"] == "from megan"
    assert event["doc"]["data"]["message"]["from"]["address"] == MEGAN


def test_every_dropped_notification_is_recovered_by_the_safety_catch_up(
        host: Host, browser_session: Any, control: Any, webhooks: WebhookReceiver, sandbox_http: None) -> None:
    owner = "owner-dropped"
    aid = connected(host, browser_session, owner, ADELE)
    control.notification_switches(drop=-1)
    ids = control.seed_messages(ADELE, 5)
    assert sum(d["status"] == "dropped" for d in control.notifications()["deliveries"]) == 5
    make_due(host, aid)
    run_function(host, "notifications_timer")
    wait_for(lambda: len(received(webhooks, aid)) == 5, timeout=30, what="5 messages via delta")
    assert sorted(e["doc"]["data"]["message"]["id"] for e in received(webhooks, aid)) == sorted(ids)
    wait_for(lambda: queues_idle(host), what="processing to finish")
    assert len(received(webhooks, aid)) == 5


def test_missed_and_subscription_removed_are_recovered(host: Host, browser_session: Any, control: Any,
                                                       webhooks: WebhookReceiver, sandbox_http: None) -> None:
    owner = "owner-lifecycle"
    aid = connected(host, browser_session, owner, ADELE)
    first = subscription_of(control, ADELE)["id"]
    control.notification_switches(drop=-1)
    missed = control.seed_messages(ADELE, 2)
    control.lifecycle_event(first, "missed")
    wait_for(lambda: len(received(webhooks, aid)) == 2, timeout=30, what="catch-up after missed")
    [lost] = control.seed_messages(ADELE, 1)
    control.lifecycle_event(first, "subscriptionRemoved")
    second = wait_for(lambda: [s["id"] for s in control.subscriptions(ADELE) if s["id"] != first], timeout=30,
                      what="a new subscription")
    wait_for(lambda: len(received(webhooks, aid)) == 3, timeout=30, what="catch-up after subscriptionRemoved")
    assert sorted(e["doc"]["data"]["message"]["id"] for e in received(webhooks, aid)) == sorted([*missed, lost])
    control.notification_switches(drop=0)
    [fresh] = control.seed_messages(ADELE, 1)  # notifications flow on the new subscription
    wait_for(lambda: any(e["doc"]["data"]["message"]["id"] == fresh for e in received(webhooks, aid)), timeout=20,
             what="a notification on the new subscription")
    assert second and account(host, owner, aid)["notifications"]["status"] == "active"


def test_reauthorization_required_reauthorizes(host: Host, browser_session: Any, control: Any,
                                               sandbox_http: None) -> None:
    connected(host, browser_session, "owner-reauthz", ADELE)
    sid = subscription_of(control, ADELE)["id"]
    control.lifecycle_event(sid, "reauthorizationRequired")
    wait_for(lambda: subscription_of(control, ADELE)["reauthorizations"] == 1, timeout=30, what="/reauthorize")
    assert subscription_of(control, ADELE)["reauthorizationRequired"] is False


def test_renewal_timer_renews_through_the_index(host: Host, browser_session: Any, control: Any,
                                                sandbox_http: None) -> None:
    owner = "owner-renew"
    aid = connected(host, browser_session, owner, ADELE)
    assert subscription_of(control, ADELE)["renewals"] == 0
    # An hour before expiry, as the connector will see it on day 6 (it renews a day ahead).
    states = TableClient.from_connection_string(host.env["AzureWebJobsStorage"], "subscriptions")
    [row] = [r for r in states.list_entities() if r["RowKey"] == aid]
    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    states.upsert_entity({**row, "expiresAt": soon.isoformat().replace("+00:00", "Z")})
    make_due(host, aid)
    run_function(host, "notifications_timer")
    wait_for(lambda: subscription_of(control, ADELE)["renewals"] == 1, timeout=30, what="the renewal")
    wait_for(lambda: queues_idle(host), what="processing to finish")
    expires = account(host, owner, aid)["notifications"]["expiresAt"]
    assert expires > (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=6)).isoformat()
    table = TableClient.from_connection_string(host.env["AzureWebJobsStorage"], "subscriptionindex")
    buckets = [r["PartitionKey"] for r in table.list_entities() if str(r["RowKey"]).endswith("|" + aid)]
    assert len(buckets) == 1 and buckets[0] > "200001010000"  # moved on to the next due time, nothing left behind


def test_disconnect_deletes_the_subscription(host: Host, browser_session: Any, control: Any,
                                             sandbox_http: None) -> None:
    owner = "owner-disconnect"
    aid = connected(host, browser_session, owner, ADELE)
    assert len(control.subscriptions(ADELE)) == 1
    assert host.api("DELETE", f"/api/accounts/{aid}", sub=owner).status_code == 204
    assert control.subscriptions(ADELE) == []


def test_forged_notifications_are_ignored(host: Host, browser_session: Any, control: Any,
                                          webhooks: WebhookReceiver, sandbox_http: None) -> None:
    owner = "owner-forged"
    aid = connected(host, browser_session, owner, ADELE)
    sid = subscription_of(control, ADELE)["id"]
    [mid] = control.seed_messages(ADELE, [{"subject": "real"}])
    wait_for(lambda: received(webhooks, aid), what="the real notification")
    [other] = control.seed_messages(MEGAN, [{"subject": "forged target"}])
    for client_state in ("wrong-client-state-value", None):
        item = {"subscriptionId": sid, "changeType": "created", "resource": f"Users/x/Messages/{other}",
                "resourceData": {"id": other}, **({"clientState": client_state} if client_state else {})}
        r = host.http.post(host.url + NOTIFY, json={"value": [item]}, timeout=30)
        assert r.status_code == 202 and r.content == b""
    r = host.http.post(host.url + NOTIFY + "/lifecycle", json={"value": [
        {"subscriptionId": sid, "clientState": "nope", "lifecycleEvent": "subscriptionRemoved"}]}, timeout=30)
    assert r.status_code == 202
    wait_for(lambda: queues_idle(host), what="nothing left to process")
    assert [e["doc"]["data"]["message"]["id"] for e in received(webhooks, aid)] == [mid]
    assert subscription_of(control, ADELE)["id"] == sid  # the forged subscriptionRemoved changed nothing
    assert "wrong-client-state-value" not in host.log_text()


def test_validation_token_is_reflected_only_as_text_plain(host: Host) -> None:
    token = "Validation: Testing client application reachability for subscription Request-Id: 1f0e-42"
    for path in (NOTIFY, NOTIFY + "/lifecycle"):
        r = host.http.post(host.url + path, params={"validationToken": token}, timeout=30)
        assert r.status_code == 200 and r.text == token
        assert r.headers["Content-Type"].startswith("text/plain")
        assert r.headers["X-Content-Type-Options"] == "nosniff"
    for bad in ("<script>alert(1)</script>", "x" * 1025, "a\nb", ""):
        r = host.http.post(host.url + NOTIFY, params={"validationToken": bad}, timeout=30)
        assert r.status_code == 400 and r.headers["Content-Type"].startswith("application/problem+json"), bad
        assert "<script>" not in r.text
    assert host.http.get(host.url + NOTIFY, params={"validationToken": token}, timeout=30).status_code == 405


@pytest.mark.parametrize("body,status,field", [
    (b"{not json", 400, "body"),
    (b"", 400, "body"),
    (b"[]", 400, "value"),
    (b'{"value": {}}', 400, "value"),
    (b'{"value": []}', 400, "value"),
    (b'{"value": [42]}', 400, "value[0]"),
    (b'{"value": [{"subscriptionId": 7, "clientState": "x"}]}', 400, "value[0].subscriptionId"),
    (b'{"value": [{"subscriptionId": "s", "clientState": ["x"]}]}', 400, "value[0].clientState"),
    (b'{"value": [{"subscriptionId": "s", "clientState": "x", "changeType": "created", "resourceData": {"id": 5}}]}',
     400, "value[0].resourceData.id"),
    (b'{"value": [{"subscriptionId": "s", "lifecycleEvent": {"a": 1}}]}', 400, "value[0].lifecycleEvent"),
    (b'{"value": [{"subscriptionId": "s"}]}' + b" " * (1024 * 1024), 413, None),
    (b"[" * 100_000, 400, "body"),
    (json.dumps({"value": [{"subscriptionId": "s", "clientState": "x", "changeType": "created",
                            "resourceData": {"id": "AAMk"}}] * 1001}).encode(), 400, "value"),
])
def test_bad_input_gets_a_clear_4xx(host: Host, body: bytes, status: int, field: str | None) -> None:
    r = host.http.post(host.url + NOTIFY, data=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/problem+json")
    if field:
        assert r.json()["field"] == field
    assert host.http.get(host.url + "/api/health", timeout=30).status_code == 200


def test_reconnect_catches_up_what_arrived_meanwhile(host: Host, browser_session: Any, control: Any,
                                                     webhooks: WebhookReceiver, sandbox_http: None) -> None:
    owner = "owner-reconnect"
    aid = connected(host, browser_session, owner, ADELE)
    control.notification_switches(drop=-1)  # e.g. the grant was dead and Graph stopped notifying
    ids = control.seed_messages(ADELE, 3)
    again = connect(host, browser_session, sub=owner, login_hint=ADELE, accountId=aid)
    assert again["result"]["accountId"] == aid
    wait_for(lambda: len(received(webhooks, aid)) == 3, timeout=30, what="catch-up after the re-connect")
    assert sorted(e["doc"]["data"]["message"]["id"] for e in received(webhooks, aid)) == sorted(ids)
    assert len(control.subscriptions(ADELE)) == 1  # renewed, not duplicated
