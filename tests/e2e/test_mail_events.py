"""Mailbox events end to end, on the test host, whose ``MAIL_EVENTS`` asks for all four: mail sent through the API and
in Outlook (``message.sent`` with its origin), read / flag / categories / move (``message.updated`` with the same
immutable id), deletions (``message.deleted``), duplicates from Graph dropped per ``changeKey``, Sent Items caught
up by delta when every notification was lost, and a narrower ``MAIL_EVENTS`` removing what it no longer needs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.webhooks import verify
from tests.conftest import Host, WebhookReceiver, wait_for
from tests.e2e.test_notifications import (  # noqa: F401 - sandbox_http is a fixture
    ADELE,
    MEGAN,
    account,
    connected,
    in_process,
    queues_idle,
    received,
    sandbox_http,
)

pytestmark = pytest.mark.usefixtures("sandbox_http")


def events(webhooks: WebhookReceiver, account_id: str, kind: str) -> list[dict[str, Any]]:
    with webhooks.lock:
        bodies = [(e["body"], e["headers"]) for e in webhooks.events]
    out = []
    for body, headers in bodies:
        doc = json.loads(body)
        if doc["type"] == kind and doc["data"]["accountId"] == account_id:
            out.append({"doc": doc, "body": body, "headers": headers})
    return out


def one(webhooks: WebhookReceiver, account_id: str, kind: str, what: str, **match: Any) -> dict[str, Any]:
    """Wait for the event of ``kind`` whose ``data.message`` has these values; return its ``data``."""
    def found() -> list[dict[str, Any]]:
        return [e for e in events(webhooks, account_id, kind)
                if all(e["doc"]["data"]["message"].get(k) == v for k, v in match.items())]
    return dict(wait_for(found, timeout=30, what=what)[0]["doc"]["data"])


def test_a_mailbox_gets_one_subscription_per_feed(host: Host, browser_session: Any, control: Any) -> None:
    owner = "owner-feeds"
    aid = connected(host, browser_session, owner, ADELE)
    subs = control.subscriptions(ADELE)
    assert sorted((s["resource"], s["changeType"]) for s in subs) == [
        ("me/mailFolders('Inbox')/messages", "created"), ("me/mailFolders('SentItems')/messages", "created"),
        ("me/messages", "updated,deleted")]
    assert account(host, owner, aid)["notifications"]["status"] == "active"
    assert host.api("DELETE", f"/api/accounts/{aid}", sub=owner).status_code == 204
    assert control.subscriptions(ADELE) == []


def test_sent_mail_says_whether_the_api_or_outlook_sent_it(host: Host, browser_session: Any, control: Any,
                                                          webhooks: WebhookReceiver) -> None:
    owner = "owner-sent"
    aid = connected(host, browser_session, owner, ADELE)
    r = host.api("POST", f"/api/accounts/{aid}/send", sub=owner,
                        json={"to": ["someone@example.com"], "subject": "From the CRM", "bodyText": "Hello",
                              "trackingId": "crm-4711"})
    assert r.status_code == 202, r.text
    api = one(webhooks, aid, "message.sent", "message.sent of the API's mail", subject="From the CRM")
    assert api["origin"] == "api" and api["trackingId"] == "crm-4711"

    typed = control.outlook(ADELE, "send", message={"subject": "Typed in Outlook", "body": {"content": "Hi"},
                                                    "toRecipients": [{"emailAddress": {"address": "x@example.com"}}]})
    mine = one(webhooks, aid, "message.sent", "message.sent of mail sent in Outlook", subject="Typed in Outlook")
    assert mine["origin"] == "mailbox" and mine["trackingId"] is None
    assert mine["message"]["id"] == typed["immutableId"]
    for e in events(webhooks, aid, "message.sent"):
        matches_openapi(e["doc"])
    event = events(webhooks, aid, "message.sent")[-1]
    assert verify(host.env["WEBHOOK_SECRET"], event["body"], event["headers"]["X-Connector-Signature"])
    wait_for(lambda: queues_idle(host), what="the jobs")
    assert len(events(webhooks, aid, "message.sent")) == 2  # one each
    assert received(webhooks, aid) == []  # Sent Items copies are not received mail


def test_changes_in_outlook_become_updated_and_deleted_events(host: Host, browser_session: Any,
                                                             control: Any, webhooks: WebhookReceiver) -> None:
    owner = "owner-changes"
    aid = connected(host, browser_session, owner, ADELE)
    [mid] = control.seed_messages(ADELE, [{"subject": "Quote request"}])
    wait_for(lambda: received(webhooks, aid), what="message.received")

    control.outlook(ADELE, "read", mid)
    read = one(webhooks, aid, "message.updated", "the read", id=mid, isRead=True)["message"]
    assert read["folder"] == "inbox" and read["flag"] == {"flagStatus": "notFlagged"} and read["categories"] == []
    control.outlook(ADELE, "flag", mid)
    one(webhooks, aid, "message.updated", "the flag", id=mid, flag={"flagStatus": "flagged"})
    control.outlook(ADELE, "categorize", mid, categories=["Customer"])
    one(webhooks, aid, "message.updated", "the category", id=mid, categories=["Customer"])
    moved = control.outlook(ADELE, "move", mid, folder="archive")
    assert moved["immutableId"] == mid
    one(webhooks, aid, "message.updated", "the move", id=mid, folder="archive")

    r = host.api("PATCH", f"/api/accounts/{aid}/messages/{mid}", sub=owner, json={"isRead": False})
    assert r.status_code == 200, r.text  # a change through the API is a change of the mailbox too
    one(webhooks, aid, "message.updated", "the API's change", id=mid, isRead=False)

    control.outlook(ADELE, "delete", mid)
    deleted = one(webhooks, aid, "message.deleted", "the deletion", id=mid)
    assert deleted["message"] == {"id": mid}
    wait_for(lambda: queues_idle(host), what="the jobs")
    assert len(events(webhooks, aid, "message.updated")) == 5  # one per change, none for the deletion
    assert len(events(webhooks, aid, "message.deleted")) == 1
    for kind in ("message.received", "message.updated", "message.deleted"):
        for e in events(webhooks, aid, kind):
            matches_openapi(e["doc"])


def matches_openapi(doc: dict[str, Any]) -> None:
    """The event is what the OpenAPI document's ``webhooks`` entry for its type describes."""
    import jsonschema

    from shared.openapi import document

    spec = document()
    schema = spec["webhooks"][doc["type"]]["post"]["requestBody"]["content"]["application/json"]["schema"]
    jsonschema.validate(doc, {**schema, "components": spec["components"]})


def test_duplicate_notifications_of_one_change_make_one_event(host: Host, browser_session: Any,
                                                              control: Any, webhooks: WebhookReceiver) -> None:
    owner = "owner-change-dupes"
    aid = connected(host, browser_session, owner, MEGAN)
    [mid] = control.seed_messages(MEGAN, [{"subject": "Twice"}])
    wait_for(lambda: received(webhooks, aid), what="message.received")
    control.notification_switches(duplicate=-1)
    control.outlook(MEGAN, "read", mid)
    one(webhooks, aid, "message.updated", "the read", id=mid, isRead=True)
    control.outlook(MEGAN, "delete", mid)
    one(webhooks, aid, "message.deleted", "the deletion", id=mid)
    wait_for(lambda: queues_idle(host), what="the jobs")
    control.notification_switches(duplicate=0)
    assert len(events(webhooks, aid, "message.updated")) == 1
    assert len(events(webhooks, aid, "message.deleted")) == 1


def test_sent_items_are_caught_up_when_every_notification_is_lost(host: Host, browser_session: Any,
                                                                  control: Any, webhooks: WebhookReceiver) -> None:
    owner = "owner-sent-catchup"
    aid = connected(host, browser_session, owner, ADELE)
    [sent_sub] = [s for s in control.subscriptions(ADELE) if "SentItems" in s["resource"]]
    control.notification_switches(drop=-1)
    ids = [control.outlook(ADELE, "send", message={
        "subject": f"Lost {i}", "body": {"content": "x"},
        "toRecipients": [{"emailAddress": {"address": "x@example.com"}}]})["immutableId"] for i in range(3)]
    control.notification_switches(drop=0)
    control.lifecycle_event(sent_sub["id"], "missed")
    wait_for(lambda: len(events(webhooks, aid, "message.sent")) == 3, what="the catch-up of Sent Items")
    got = [e["doc"]["data"] for e in events(webhooks, aid, "message.sent")]
    assert sorted(d["message"]["id"] for d in got) == sorted(ids)
    assert {d["origin"] for d in got} == {"mailbox"}


def test_a_narrower_mail_events_removes_the_subscriptions_it_no_longer_needs(
        host: Host, browser_session: Any, control: Any) -> None:
    from shared.notifications import Job

    owner = "owner-narrower"
    aid = connected(host, browser_session, owner, ADELE)
    assert len(control.subscriptions(ADELE)) == 3

    def maintained_with(env: dict[str, str]) -> list[str]:
        c = in_process(Host(host.url, env, host.log_path, host.proc))
        assert c.notifications.worker.process(Job("maintain", owner, aid).to_message()) == "maintain"
        assert set(c.notifications.store.states_of(owner, aid)) == {f.name for f in c.notifications.config.feeds}
        return sorted(s["resource"] for s in control.subscriptions(ADELE))

    default = {k: v for k, v in host.env.items() if k != "MAIL_EVENTS"}  # message.received,message.sent
    assert maintained_with(default) == ["me/mailFolders('Inbox')/messages", "me/mailFolders('SentItems')/messages"]
    assert maintained_with({**host.env, "MAIL_EVENTS": "message.received"}) == ["me/mailFolders('Inbox')/messages"]
    assert host.api("DELETE", f"/api/accounts/{aid}", sub=owner).status_code == 204
    assert control.subscriptions(ADELE) == []
