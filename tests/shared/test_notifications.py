"""Inbound mail, the pure parts: Graph notification parsing, jobs, the NOTIFICATIONS_ENABLED default."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from shared.config import load_settings
from shared.errors import ConfigurationError, ValidationError
from shared.notification_intake import MAX_ITEMS, Change, parse_batch
from shared.notifications import MAX_RECIPIENTS, Job, NotificationConfig, message_summary
from tests.shared.test_config import GOOD


def _item(**over: Any) -> dict[str, Any]:
    item = {"subscriptionId": "7f1b4c2e-0000-4000-8000-000000000001", "clientState": "cs", "changeType": "created",
            "resource": "Users/u/Messages/AAMk1", "resourceData": {"id": "AAMk1="}}
    item.update(over)
    return item


def test_parses_graphs_change_and_lifecycle_notifications() -> None:
    changes = parse_batch({"value": [
        _item(), _item(changeType="updated"), _item(changeType="created,updated", resourceData={"id": "AAMk2"}),
        {"subscriptionId": "s-1", "clientState": "cs", "lifecycleEvent": "missed"},
        {"subscriptionId": "s-1", "clientState": "cs", "lifecycleEvent": "somethingNew"}]})
    assert changes == [Change("7f1b4c2e-0000-4000-8000-000000000001", "cs", message_id="AAMk1="),
                       Change("7f1b4c2e-0000-4000-8000-000000000001", "cs", message_id="AAMk1=",
                              change_type="updated"),
                       Change("7f1b4c2e-0000-4000-8000-000000000001", "cs", message_id="AAMk2"),
                       Change("s-1", "cs", lifecycle_event="missed")]


@pytest.mark.parametrize("doc,field", [
    (None, "value"), ([], "value"), ({"value": "x"}, "value"), ({"value": []}, "value"),
    ({"value": [_item()] * (MAX_ITEMS + 1)}, "value"), ({"value": ["x"]}, "value[0]"),
    ({"value": [_item(subscriptionId=None)]}, "value[0].subscriptionId"),
    ({"value": [_item(subscriptionId="a/b")]}, "value[0].subscriptionId"),
    ({"value": [_item(clientState="x" * 129)]}, "value[0].clientState"),
    ({"value": [_item(clientState=1)]}, "value[0].clientState"),
    ({"value": [_item(changeType=["created"])]}, "value[0].changeType"),
    ({"value": [_item(resourceData=None)]}, "value[0].resourceData.id"),
    ({"value": [_item(resourceData={"id": "../../x"})]}, "value[0].resourceData.id"),
    ({"value": [{"subscriptionId": "s", "lifecycleEvent": 3}]}, "value[0].lifecycleEvent"),
])
def test_wrong_shapes_and_types_are_validation_errors(doc: Any, field: str) -> None:
    with pytest.raises(ValidationError) as e:
        parse_batch(doc)
    assert e.value.status == 400 and e.value.field == field


def test_job_round_trip_and_malformed_jobs() -> None:
    job = Job("changes", "owner", "acc_1", "sid", ("m1", "m2"), attempt=2)
    assert Job.from_message(job.to_message()) == job
    for raw in (b"{}", b"[]", b'{"kind": "evil", "owner": "o", "accountId": "a"}',
                b'{"kind": "changes", "owner": "o", "accountId": "a", "ids": [1]}'):
        with pytest.raises(ValueError):
            Job.from_message(raw)


@pytest.mark.parametrize("env,on", [
    ({}, False),  # GOOD: http PUBLIC_BASE_URL, Graph in the cloud
    ({"PUBLIC_BASE_URL": "https://connector.example.com"}, True),
    ({"GRAPH_BASE_URL": "https://localhost:8443/v1.0"}, True),  # the local sandbox
    ({"PUBLIC_BASE_URL": "https://connector.example.com", "NOTIFICATIONS_ENABLED": "false"}, False),
    ({"NOTIFICATIONS_ENABLED": "true"}, True),
    ({"NOTIFICATIONS_ENABLED": "auto", "PUBLIC_BASE_URL": "https://c.example.com"}, True),
])
def test_notifications_enabled_default(env: dict[str, str], on: bool) -> None:
    settings = load_settings({**GOOD, "PUBLIC_BASE_URL": "http://connector.example.com", **env})
    cfg = NotificationConfig.from_settings(settings)
    assert cfg.enabled is on
    assert cfg.lifecycle_url == cfg.notification_url + "/lifecycle"
    assert cfg.notification_url.endswith("/api/notifications/microsoft")


def test_notifications_enabled_refuses_nonsense() -> None:
    with pytest.raises(ConfigurationError) as e:
        load_settings({**GOOD, "NOTIFICATIONS_ENABLED": "sometimes"})
    assert e.value.setting == "NOTIFICATIONS_ENABLED"


def test_message_summary_has_exactly_the_spec_fields() -> None:
    summary = message_summary({"id": "m", "subject": "s", "from": {"emailAddress": {"address": "a@b.c", "name": "A"}},
                               "toRecipients": [], "receivedDateTime": "2026-01-01T00:00:00Z", "conversationId": "c",
                               "internetMessageId": "<i@x>", "hasAttachments": False, "bodyPreview": "p",
                               "isRead": False, "body": {"content": "secret body"}})
    assert set(summary) == {"id", "subject", "from", "toRecipients", "toRecipientsCount", "receivedDateTime",
                            "conversationId", "internetMessageId", "hasAttachments", "bodyPreview", "isRead"}
    assert summary["from"] == {"address": "a@b.c", "name": "A"} and summary["toRecipientsCount"] == 0


def test_message_summary_always_fits_a_queue_message() -> None:
    """Hundreds of recipients with non-ASCII names (6 bytes each once JSON-escaped) and huge text fields:
    the event stays well within a queue message (64 KiB of base64), the count tells what was left out."""
    name = "Zoë Ångström-Müller 日本語 " * 8
    many = [{"emailAddress": {"address": f"user{i}@example.com", "name": name}} for i in range(900)]
    summary = message_summary({"id": "m", "subject": "Ü" * 100_000, "toRecipients": many,
                               "from": {"emailAddress": {"address": "a@b.c", "name": "Ö" * 50_000}},
                               "bodyPreview": "é" * 10_000, "internetMessageId": "<" + "x" * 10_000 + ">"})
    event = json.dumps({"attempt": 0, "event": {"id": "evt_x", "type": "message.received",
                                                "createdAt": "2026-01-01T00:00:00Z",
                                                "data": {"accountId": "acc_x", "message": summary}}})
    assert len(base64.b64encode(event.encode())) < 64 * 1024
    assert summary["toRecipientsCount"] == 900
    recipients = summary["toRecipients"]
    assert isinstance(recipients, list) and 0 < len(recipients) <= MAX_RECIPIENTS
    assert recipients[0] == {"address": "user0@example.com", "name": name}
    plain = [{"emailAddress": {"address": f"user{i}@example.com", "name": f"Zoë {i}"}} for i in range(60)]
    small = message_summary({"id": "m", "toRecipients": plain})
    assert isinstance(small["toRecipients"], list) and len(small["toRecipients"]) == MAX_RECIPIENTS
