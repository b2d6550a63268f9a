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
