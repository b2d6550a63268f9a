"""Rich notifications end to end: with ``NOTIFICATIONS_RESOURCE_DATA`` the subscriptions carry our certificate, the
sandbox sends each message's selected properties encrypted to it with signed validation tokens, and the host
announces ``message.received`` without reading the message from Graph. Forged or tampered batches produce
nothing and are answered 202."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from shared.notifications import Job
from tests.conftest import Host, WebhookReceiver, wait_for
from tests.e2e.test_mail_events import events, one
from tests.e2e.test_notifications import (  # noqa: F401 - sandbox_http is a fixture
    ADELE,
    NOTIFY,
    connected,
    in_process,
    inbox_subscriptions,
    queues_idle,
    received,
    sandbox_http,
)
from tests.e2e.test_probe_findings import _client_state

pytestmark = pytest.mark.usefixtures("sandbox_http")


def rich_connector(host: Host) -> Any:
    return in_process(Host(host.url, {**host.env, "NOTIFICATIONS_RESOURCE_DATA": "true"}, host.log_path, host.proc))


def made_rich(host: Host, control: Any, owner: str, aid: str) -> Any:
    """The account's subscriptions remade with resource data (what the next maintenance does after the setting is
    turned on); the host, which opens rich batches whatever its own setting, receives them."""
    c = rich_connector(host)
    assert c.notifications.worker.process(Job("maintain", owner, aid).to_message()) == "maintain"
    subs = control.subscriptions(ADELE)
    assert subs and all(s["includeResourceData"] for s in subs)
    cert = c.notifications.rich.certificates.current()
    assert {s["encryptionCertificateId"] for s in subs} == {cert.id}
    return c


def graph_calls(control: Any) -> int:
    return int(control.counters().get(f"graph_user:{ADELE}", 0))


def test_rich_notifications_need_no_graph_read(host: Host, browser_session: Any, control: Any,
                                               webhooks: WebhookReceiver) -> None:
    owner = "owner-rich"
    aid = connected(host, browser_session, owner, ADELE)
    c = made_rich(host, control, owner, aid)
    state = c.notifications.store.get(owner, aid)
    assert state.rich and state.expires_at is not None  # a day at most: Graph's limit with resource data
    wait_for(lambda: queues_idle(host), what="earlier jobs")

    before = graph_calls(control)
    [mid] = control.seed_messages(ADELE, [{"subject": "Rich and encrypted", "body": {"content": "Hello"}}])
    event = one(webhooks, aid, "message.received", "the rich message.received", id=mid)
    assert event["message"]["subject"] == "Rich and encrypted" and event["message"]["bodyPreview"] == "Hello"
    wait_for(lambda: queues_idle(host), what="the job")
    assert graph_calls(control) == before  # the summary came in the notification: no Graph read

    control.outlook(ADELE, "flag", mid)
    updated = one(webhooks, aid, "message.updated", "the rich message.updated", id=mid)
    assert updated["message"]["flag"]["flagStatus"] == "flagged" and updated["message"]["folder"] == "inbox"
    assert host.api("DELETE", f"/api/accounts/{aid}", sub=owner).status_code == 204


def test_turning_resource_data_off_remakes_plain_subscriptions(host: Host, browser_session: Any,
                                                              control: Any) -> None:
    owner = "owner-rich-off"
    aid = connected(host, browser_session, owner, ADELE)
    made_rich(host, control, owner, aid)
    plain = in_process(host)  # the host's settings: resource data off
    assert plain.notifications.worker.process(Job("maintain", owner, aid).to_message()) == "maintain"
    assert not any(s["includeResourceData"] for s in control.subscriptions(ADELE))
    assert not plain.notifications.store.get(owner, aid).rich
    assert host.api("DELETE", f"/api/accounts/{aid}", sub=owner).status_code == 204


def test_forged_and_tampered_rich_batches_produce_nothing(host: Host, browser_session: Any, control: Any,
                                                         webhooks: WebhookReceiver) -> None:
    owner = "owner-rich-forged"
    aid = connected(host, browser_session, owner, ADELE)
    made_rich(host, control, owner, aid)
    [sub] = inbox_subscriptions(control, ADELE)
    cs = _client_state(host, owner, aid)
    [mid] = control.seed_messages(ADELE, 1, immutable=True)
    one(webhooks, aid, "message.received", "the genuine event", id=mid)
    wait_for(lambda: queues_idle(host), what="the job")
    tenant = "aaaabbbb-0000-cccc-1111-dddd2222eeee"
    rejected_before = host.log_text().count("notifications.rich_rejected")

    def item(message_id: str, content: dict[str, Any]) -> dict[str, Any]:
        return {"subscriptionId": sub["id"], "clientState": cs, "changeType": "created", "tenantId": tenant,
                "resourceData": {"id": message_id}, "encryptedContent": content}

    garbage = {"data": base64.b64encode(b"x" * 32).decode(), "dataSignature": base64.b64encode(b"s" * 32).decode(),
               "dataKey": base64.b64encode(b"k" * 256).decode(), "encryptionCertificateId": "local-x"}
    header = base64.urlsafe_b64encode(json.dumps({"alg": "RS256", "kid": "nope"}).encode()).decode().rstrip("=")
    claims = base64.urlsafe_b64encode(json.dumps({"aud": "x", "tid": tenant}).encode()).decode().rstrip("=")
    forged_token = f"{header}.{claims}.c2ln"
    fake_id = "AAMkForgedMessage000000000000"
    batches = [
        {"value": [item(fake_id, garbage)]},  # no validation tokens
        {"value": [item(fake_id, garbage)], "validationTokens": [forged_token]},  # not Microsoft's key
        {"value": [item(fake_id, garbage)], "validationTokens": "not a list"},
        {"value": [{**item(fake_id, garbage), "encryptedContent": "text"}], "validationTokens": [forged_token]},
    ]
    for batch in batches:
        r = host.http.post(host.url + NOTIFY, json=batch, timeout=30)
        assert r.status_code == 202, r.text
    wait_for(lambda: host.log_text().count("notifications.rich_rejected") >= rejected_before + len(batches),
             what="every forged batch rejected")
    wait_for(lambda: queues_idle(host), what="no job")
    assert [e for e in events(webhooks, aid, "message.received") if e["doc"]["data"]["message"]["id"] == fake_id] == []
    assert len(received(webhooks, aid)) == 1
    assert host.api("DELETE", f"/api/accounts/{aid}", sub=owner).status_code == 204


def test_a_busy_mailbox_costs_one_account_read_per_reuse_window(host: Host, browser_session: Any,
                                                                 control: Any) -> None:
    """Rich Inbox jobs make no Graph call, so a worker reuses its answer to "is the account still connected?"
    for ACCOUNT_REUSE_S instead of reading the account row for every event."""
    from shared.notifications import SUMMARY_FIELDS
    from tests.e2e.test_notifications import _CountingTransport

    owner = "owner-rich-reuse"
    aid = connected(host, browser_session, owner, ADELE)
    reads = _CountingTransport("accounts")
    c = in_process(host, reads)
    summary = {k: None for k in SUMMARY_FIELDS}
    for i in range(5):
        mid = f"AAkALgRichReuse{i:04d}xxxxxxxx"
        job = Job("changes", owner, aid, "sid", (mid,), resources={mid: {**summary, "id": mid, "subject": f"r{i}"}})
        assert c.notifications.worker.process(job.to_message()) == "delivered"
    assert reads.reads == 1
    assert host.api("DELETE", f"/api/accounts/{aid}", sub=owner).status_code == 204


def test_rich_message_sent_knows_its_origin_without_a_graph_read(host: Host, browser_session: Any,
                                                                 control: Any, webhooks: WebhookReceiver) -> None:
    """With rich notifications and message.sent, the API sends through a draft whose immutable id is its Sent
    Items copy's, marking it first; a rich message.sent then needs no Graph read for its origin."""
    from shared.mail import parse_send_request
    from shared.notifications import SUMMARY_FIELDS

    owner = "owner-rich-sent"
    aid = connected(host, browser_session, owner, ADELE)
    c = rich_connector(host)
    wait_for(lambda: queues_idle(host), what="the connect's jobs")
    control.notification_switches(drop=-1)  # the jobs below are run here, not by the host from notifications
    request = parse_send_request({"to": ["x@example.com"], "subject": "Tracked rich", "trackingId": "crm-rich-1"},
                                 max_total=1024)
    assert c.mail.send(owner, aid, request, idempotency_key=None, body_hash="h")["status"] == "sent"
    [api_sent] = [m for m in c.mail.find(owner, aid, _query("sentitems"), None)["messages"]
                  if m["subject"] == "Tracked rich"]
    from shared.mail import parse_answer_request

    [inbox] = control.seed_messages(ADELE, [{"subject": "Answer me"}])
    reply = parse_answer_request("reply", {"comment": "Sure", "trackingId": "crm-rich-2"}, max_total=1024)
    assert c.mail.answer(owner, aid, inbox, reply, idempotency_key=None, body_hash="r")["messageId"]
    [replied] = [m for m in c.mail.find(owner, aid, _query("sentitems"), None)["messages"]
                 if m["subject"] == "RE: Answer me"]
    typed = control.outlook(ADELE, "send", message={"subject": "Typed rich", "body": {"content": "x"},
                                                    "toRecipients": [{"emailAddress": {"address": "y@example.com"}}]})
    summary = {k: None for k in SUMMARY_FIELDS}
    before = graph_calls(control)
    for mid, subject in ((api_sent["id"], "Tracked rich"), (typed["immutableId"], "Typed rich"),
                         (replied["id"], "RE: Answer me")):
        job = Job("changes", owner, aid, "sid", (mid,), feed="sent",
                  resources={mid: {**summary, "id": mid, "subject": subject}})
        assert c.notifications.worker.process(job.to_message()) == "delivered"
    assert graph_calls(control) == before  # neither origin needed Graph
    mine = one(webhooks, aid, "message.sent", "the API's", id=api_sent["id"])
    assert mine["origin"] == "api" and mine["trackingId"] == "crm-rich-1"
    answered = one(webhooks, aid, "message.sent", "the API's reply", id=replied["id"])
    assert answered["origin"] == "api" and answered["trackingId"] == "crm-rich-2"
    other = one(webhooks, aid, "message.sent", "Outlook's", id=typed["immutableId"])
    assert other["origin"] == "mailbox" and other["trackingId"] is None
    assert host.api("DELETE", f"/api/accounts/{aid}", sub=owner).status_code == 204


def _query(folder: str) -> Any:
    from shared.messages import MessageQuery

    return MessageQuery(folder=folder, top=10)
