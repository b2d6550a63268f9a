"""Inbound mail end to end: connect → Graph subscription validated and created → mail lands in
the Inbox → one signed ``message.received`` webhook; duplicates suppressed; dropped notifications,
``missed`` and ``subscriptionRemoved`` recovered by delta catch-up; renewal; disconnect; forged and
malformed notifications."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from azure.data.tables import TableClient
from azure.storage.queue import QueueClient

from devstack.transport import WrappingTransport
from shared.webhooks import verify
from tests.conftest import FEEDS, Host, WebhookReceiver, connect, wait_for

ADELE = "adele@contoso.onmicrosoft.com"
MEGAN = "megan@contoso.onmicrosoft.com"
NOTIFY = "/api/notifications/microsoft"


@pytest.fixture()
def sandbox_http(host: Host, control: Any) -> Iterator[None]:
    """A fresh sandbox that accepts the dev host's loopback http notification URL (Graph requires https;
    the session's sandbox is told so, like `make dev`'s). Earlier tests' background jobs finish first:
    one still running would create its subscription in the fresh sandbox."""
    wait_for(lambda: queues_idle(host), timeout=120, what="earlier tests' background jobs")
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


def inbox_subscriptions(control: Any, upn: str) -> list[dict[str, Any]]:
    """The mailbox's live subscriptions on its Inbox (the default MAIL_EVENTS also subscribe to Sent Items)."""
    return [dict(s) for s in control.subscriptions(upn) if "('Inbox')" in s["resource"]]


def subscription_of(control: Any, upn: str) -> dict[str, Any]:
    [sub] = inbox_subscriptions(control, upn)
    return sub


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
    assert set(msg) == {"id", "subject", "from", "toRecipients", "toRecipientsCount", "receivedDateTime",
                        "conversationId", "internetMessageId", "hasAttachments", "bodyPreview", "isRead"}
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
    second = wait_for(lambda: [s["id"] for s in inbox_subscriptions(control, ADELE) if s["id"] != first], timeout=30,
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
    assert len(inbox_subscriptions(control, ADELE)) == 1 and len(control.subscriptions(ADELE)) == FEEDS
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
    assert len(inbox_subscriptions(control, ADELE)) == 1  # renewed, not duplicated
    assert len(control.subscriptions(ADELE)) == FEEDS  # and the other feeds


# -- review regressions: in-process parts on the host's settings (same Azurite, same sandbox) -----------


class _CountingTransport(WrappingTransport):
    """The real azure-core transport, counting reads of one table (by default ``subscriptions``: the intake's
    lookups)."""

    def __init__(self, table: str = "subscriptions") -> None:
        super().__init__()
        self._marker = f"/{table}("
        self.reads = 0

    def send(self, request: Any, **kwargs: Any) -> Any:
        if request.method == "GET" and self._marker in request.url:
            self.reads += 1
        return self._inner.send(request, **kwargs)


def in_process(host: Host, transport: WrappingTransport | None = None) -> Any:
    from shared.config import load_settings
    from shared.service import Connector
    from shared.storage import Storage

    settings = load_settings(host.env)
    return Connector(settings, storage=Storage(settings, transport=transport)) if transport else Connector(settings)


def job(kind: str, owner: str, account_id: str, **kw: Any) -> bytes:
    from shared.notifications import Job

    return Job(kind, owner, account_id, **kw).to_message()


def index_buckets(host: Host, account_id: str) -> list[str]:
    from shared.due_index import bucket_of_partition

    table = TableClient.from_connection_string(host.env["AzureWebJobsStorage"], "subscriptionindex")
    return [bucket_of_partition(r["PartitionKey"]) for r in table.list_entities()
            if str(r["RowKey"]).endswith("|" + account_id)]


def test_a_message_with_hundreds_of_recipients_is_announced_bounded_and_catch_up_goes_on(
        host: Host, browser_session: Any, control: Any, webhooks: WebhookReceiver, sandbox_http: None) -> None:
    owner = "owner-oversized"
    aid = connected(host, browser_session, owner, ADELE)
    control.notification_switches(drop=-1)
    name = "Zoë Ångström-Müller 日本語 " * 3
    crowd = [{"emailAddress": {"address": f"person{i}@example.com", "name": name}} for i in range(400)]
    [big, after] = control.seed_messages(ADELE, [{"subject": "all hands", "toRecipients": crowd},
                                                 {"subject": "after the big one"}])
    assert in_process(host).notifications.worker.process(job("maintain", owner, aid)) == "maintain"
    events = wait_for(lambda: len(received(webhooks, aid)) == 2 and received(webhooks, aid), timeout=30,
                      what="both messages via the catch-up")
    by_id = {e["doc"]["data"]["message"]["id"]: e["doc"]["data"]["message"] for e in events}
    assert set(by_id) == {big, after}
    assert by_id[big]["toRecipientsCount"] == 400 and 0 < len(by_id[big]["toRecipients"]) <= 50
    assert by_id[after]["toRecipientsCount"] == len(by_id[after]["toRecipients"])


@pytest.mark.parametrize("why", ["gone", "inactive"])
def test_maintenance_of_a_deleted_or_reauth_account_leaves_no_index_row(
        host: Host, browser_session: Any, control: Any, sandbox_http: None, why: str) -> None:
    from shared.due_index import DueIndex
    from shared.storage import SUBSCRIPTION_INDEX_TABLE

    owner = f"owner-rearm-{why}"
    aid = connected(host, browser_session, owner, ADELE)
    c = in_process(host)
    make_due(host, aid)
    _, due, rearm = DueIndex(c.storage.table(SUBSCRIPTION_INDEX_TABLE)).take_due(dt.datetime.now(dt.UTC))
    assert aid in [d.account_id for d in due] and index_buckets(host, aid) == [rearm]  # the re-armed row
    acc = c.accounts.get_account(owner, aid)
    if why == "gone":
        c.accounts.delete_account(owner, aid)
    else:
        c.accounts.update_with(acc, lambda a: replace(a, status="reauth_required"))
    assert c.notifications.worker.process(job("maintain", owner, aid, rearm=rearm)) == why
    assert index_buckets(host, aid) == []  # not back every 30 minutes forever


def test_a_claim_is_timed_by_the_clock_not_by_the_jobs_start(host: Host, browser_session: Any,
                                                              sandbox_http: None) -> None:
    from shared.notifications import CLAIM_STALE
    from shared.notifications import seen_key as _seen_key
    from shared.storage import SEEN_TABLE

    owner = "owner-claim"
    aid = connected(host, browser_session, owner, ADELE)
    n = in_process(host).notifications.delivery
    seen = in_process(host).storage.table(SEEN_TABLE)
    assert n._claim(aid, "AAMk-claim") is True
    row = seen.get(aid, _seen_key("AAMk-claim"))
    assert abs((dt.datetime.fromisoformat(str(row["at"])) - dt.datetime.now(dt.UTC)).total_seconds()) < 30
    assert n._claim(aid, "AAMk-claim") is False  # a parallel duplicate job does not take it over
    abandoned = (dt.datetime.now(dt.UTC) - CLAIM_STALE - dt.timedelta(seconds=5)).isoformat()
    seen.replace({**row, "at": abandoned}, etag=None)
    assert n._claim(aid, "AAMk-claim") is True  # an abandoned claim is taken over


def test_the_intake_reads_storage_once_per_clientstate_and_refreshes_its_cache(
        host: Host, browser_session: Any, control: Any, sandbox_http: None) -> None:
    from shared.crypto import account_aad
    from shared.notification_intake import MAX_UNKNOWN_LOOKUPS
    from shared.storage import SUBSCRIPTIONS_TABLE
    from shared.subscriptions import client_key

    owner = "owner-intake"
    aid = connected(host, browser_session, owner, ADELE)
    sid = subscription_of(control, ADELE)["id"]
    transport = _CountingTransport()
    c = in_process(host, transport)
    n = c.notifications.intake

    def item(client_state: str, i: int) -> dict[str, Any]:
        return {"subscriptionId": sid, "clientState": client_state, "changeType": "created",
                "resourceData": {"id": f"AAMkIntake{i}"}}

    assert n.accept({"value": [item(f"forged-{i}", i) for i in range(1000)]}) == (0, 1000)
    assert transport.reads <= MAX_UNKNOWN_LOOKUPS  # not one read per forged clientState
    [state] = [s for s in c.notifications.store.all_states() if s.account_id == aid and s.feed == "inbox"]
    sealed = str(c.storage.table(SUBSCRIPTIONS_TABLE).get(state.client_key, "cs")["clientState"])
    real = c.secrets.key_ring().open(sealed, aad=account_aad(owner, aid, "clientState")).decode()
    before = transport.reads
    assert n.accept({"value": [item(real, i) for i in range(3)]}) == (3, 0)
    assert transport.reads == before + 1
    key = client_key(real)
    n._cache[key] = (n._cache[key][0], 0.0)  # the cached entry expired
    assert n.accept({"value": [item(real, 9)]}) == (1, 0)
    assert n.accept({"value": [item(real, 10)]}) == (1, 0)
    assert transport.reads == before + 2  # re-cached after one read, not read on every batch
    wait_for(lambda: queues_idle(host), what="the intake's jobs to finish")


def test_disconnect_deletes_the_subscription_after_refreshing_an_expired_token(
        host: Host, browser_session: Any, control: Any, sandbox_http: None) -> None:
    owner = "owner-disconnect-expired"
    aid = connected(host, browser_session, owner, ADELE)
    control.expire_access_tokens(ADELE)  # the stored access token no longer works: one refresh is needed
    assert host.api("DELETE", f"/api/accounts/{aid}", sub=owner).status_code == 204
    assert control.subscriptions(ADELE) == []


def test_disconnect_deletes_the_account_even_when_the_subscription_delete_fails(
        host: Host, browser_session: Any, control: Any, sandbox_http: None) -> None:
    owner = "owner-disconnect-fails"
    aid = connected(host, browser_session, owner, ADELE)
    control.inject("/v1.0/subscriptions/", status=403, count=1, user=ADELE)
    assert host.api("DELETE", f"/api/accounts/{aid}", sub=owner).status_code == 204
    assert host.api("GET", f"/api/accounts/{aid}", sub=owner).status_code == 404
    assert len(control.subscriptions(ADELE)) == 1  # left to expire by itself
    assert control.clear_injections() == 0


def test_last_event_does_not_write_back_a_stale_status(host: Host, browser_session: Any,
                                                       sandbox_http: None) -> None:
    owner = "owner-last-event"
    aid = connected(host, browser_session, owner, ADELE)
    c = in_process(host)
    fresh = c.accounts.get_account(owner, aid)
    stale = replace(fresh, notifications=replace(fresh.notifications, status="pending", last_event_at=None))
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    c.notifications.delivery._note_event(stale, now)
    n = account(host, owner, aid)["notifications"]
    assert n["status"] == "active" and n["expiresAt"] and n["lastEventAt"] >= now.isoformat()[:19]


def test_unexpected_errors_fail_the_job_instead_of_escaping(host: Host, browser_session: Any, control: Any,
                                                            sandbox_http: None) -> None:
    owner = "owner-unexpected"
    aid = connected(host, browser_session, owner, ADELE)
    wait_for(lambda: queues_idle(host), what="the connect's jobs to finish")
    c = in_process(host)
    gone = {"error": {"code": "SyncStateNotFound", "message": "The sync state is not found."}}
    control.inject("/v1.0/me/mailFolders/inbox/messages/delta", status=410, count=2, body=gone, user=ADELE)
    assert c.notifications.worker.process(job("maintain", owner, aid)) == "failed"  # the second 410 as well
    state = c.notifications.store.get(owner, aid)
    c.notifications.store.save(replace(state, delta_link="https://elsewhere.example/v1.0/delta?token=x"))
    assert c.notifications.worker.process(job("maintain", owner, aid)) == "failed"  # a link outside GRAPH_BASE_URL
    assert account(host, owner, aid)["notifications"]["status"] == "failed"


def test_old_mail_moved_back_into_the_inbox_is_not_announced(host: Host, browser_session: Any, control: Any,
                                                             sandbox_http: None) -> None:
    owner = "owner-old-mail"
    aid = connected(host, browser_session, owner, ADELE)
    sid = subscription_of(control, ADELE)["id"]
    control.notification_switches(drop=-1)
    old = (dt.datetime.now(dt.UTC) - dt.timedelta(days=20)).isoformat().replace("+00:00", "Z")
    [mid] = control.seed_messages(ADELE, [{"subject": "from the archive", "receivedDateTime": old}])
    c = in_process(host)
    assert c.notifications.worker.process(job("changes", owner, aid, subscription_id=sid, ids=(mid,))) == "duplicate"


def test_without_a_webhook_receiver_a_job_says_so_and_claims_nothing(host: Host, browser_session: Any,
                                                                     control: Any, sandbox_http: None,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """WEBHOOK_URL unset: the log must not say "delivered", and no message id is claimed (nothing was sent)."""
    from shared.config import load_settings
    from shared.notifications import seen_key
    from shared.service import Connector
    from shared.storage import SEEN_TABLE

    owner = "owner-no-receiver"
    aid = connected(host, browser_session, owner, ADELE)
    sid = subscription_of(control, ADELE)["id"]
    control.notification_switches(drop=-1)
    [mid] = control.seed_messages(ADELE, [{"subject": "nobody listens"}])
    quiet = Connector(load_settings({**host.env, "WEBHOOK_URL": "", "WEBHOOK_SECRET": ""}))
    with caplog.at_level("INFO", logger="connector.notifications"):
        outcome = quiet.notifications.worker.process(job("changes", owner, aid, subscription_id=sid, ids=(mid,)))
    assert outcome == "no_receiver"
    assert not any('"delivered"' in r.getMessage() for r in caplog.records)
    assert any('"outcome": "no_receiver"' in r.getMessage() for r in caplog.records)
    from azure.core.exceptions import ResourceNotFoundError

    with pytest.raises(ResourceNotFoundError):  # not claimed: a receiver configured later may still be told
        TableClient.from_connection_string(host.env["AzureWebJobsStorage"], SEEN_TABLE).get_entity(aid, seen_key(mid))


def test_a_subscription_made_before_immutable_ids_is_replaced(host: Host, browser_session: Any, control: Any,
                                                              webhooks: WebhookReceiver, sandbox_http: None) -> None:
    """Graph keeps the id type a subscription was created with: one made by an earlier version (regular ids)
    is deleted and created anew at its next maintenance, after which notifications name immutable ids."""
    from shared.notifications import Job

    owner = "owner-id-upgrade"
    aid = connected(host, browser_session, owner, ADELE)
    first = subscription_of(control, ADELE)["id"]
    c = in_process(host)
    state = c.notifications.store.get(owner, aid)
    assert state.id_type == "immutable"
    c.notifications.store.save(replace(state, id_type=""))  # as an earlier version stored it
    assert c.notifications.worker.process(Job("maintain", owner, aid).to_message()) == "maintain"
    [sub] = inbox_subscriptions(control, ADELE)
    assert sub["id"] != first and c.notifications.store.get(owner, aid).id_type == "immutable"
    [mid] = control.seed_messages(ADELE, [{"subject": "after the upgrade"}])  # immutable ids
    wait_for(lambda: [e for e in received(webhooks, aid) if e["doc"]["data"]["message"]["id"] == mid], timeout=30,
             what="the event named by the immutable id")
