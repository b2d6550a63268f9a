"""Mailbox events: Graph change notifications become signed ``message.received``, ``message.sent``,
``message.updated`` and ``message.deleted`` webhooks (``MAIL_EVENTS`` chooses; one subscription per :class:`Feed`).

Three parts, each following Microsoft's documented behaviour, share the queue ``notification-jobs``:

* **Intake** (:mod:`shared.notification_intake`): the anonymous endpoints check a notification batch (rich ones:
  validation tokens and decryption, :mod:`shared.rich_notifications`), find each notification's subscription by
  its ``clientState`` and enqueue jobs; the endpoint answers 202.
* **Subscriptions** (:mod:`shared.subscription_lifecycle`): create, renew, reauthorize, recreate and delete
  Graph subscriptions; the maintenance timer and the daily reconciliation.
* **Delivery** (:mod:`shared.notification_delivery`): read each message's summary (unless a rich notification
  carried it) and emit its event once per change; the per-folder delta catch-up.

This module holds what they share: the queue message (:class:`Job`), the event's summary and the time
constants. The queue worker (:mod:`shared.notification_worker`) runs each job on its part.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shared.accounts import parse_iso
from shared.errors import (
    StorageUnavailableError,
    ThrottledError,
    UpstreamUnavailableError,
)

if TYPE_CHECKING:
    from shared.config import Settings

log = logging.getLogger("connector.notifications")

IDS_PER_JOB = 100  # message ids per queue message (64 KB queue limit)
MAX_RECIPIENTS = 50  # toRecipients in a message.received event (toRecipientsCount has the total)
MAX_TEXT = 1024  # characters kept of a text field of the event (subject, names, bodyPreview, …)
MAX_SUMMARY_JSON = 24 * 1024  # the event's message summary; a queue message holds 48 KB before base64
RENEW_BEFORE = dt.timedelta(days=1)
RICH_RENEW_BEFORE = dt.timedelta(hours=6)  # a rich subscription lives a day
CATCHUP_EVERY = dt.timedelta(hours=6)  # the safety catch-up
BASELINE = dt.timedelta(days=1)  # a new delta round lists this much of the Inbox (not announced)
FAILED_RETRY = dt.timedelta(hours=1)
GIVE_UP_RETRY = dt.timedelta(minutes=30)
DEDUP_WINDOW = dt.timedelta(days=14)
CLAIM_STALE = dt.timedelta(minutes=2)  # a claim not marked sent by then was abandoned (worker crash)
LAST_EVENT_EVERY = dt.timedelta(seconds=60)  # lastEventAt is coarse: at most one account write a minute
MAX_TRANSIENT_ATTEMPTS = 6
LIFECYCLE_EVENTS = ("reauthorizationRequired", "subscriptionRemoved", "missed")
TRANSIENT = (ThrottledError, UpstreamUnavailableError, StorageUnavailableError)


#: The message summary of ``message.received`` / ``message.sent``; ``message.updated`` adds where the message is and
#: its flag and categories, and the ``changeKey`` it is de-duplicated by.
SUMMARY_FIELDS = ("id", "subject", "from", "toRecipients", "receivedDateTime", "conversationId",
                  "internetMessageId", "hasAttachments", "bodyPreview", "isRead")
UPDATED_FIELDS = (*SUMMARY_FIELDS, "parentFolderId", "flag", "categories", "changeKey")

#: Feeds: one Graph subscription each (https://learn.microsoft.com/graph/api/resources/subscription).
INBOX, SENT, CHANGES = "inbox", "sent", "changes"
FEED_NAMES = (INBOX, SENT, CHANGES)
RECEIVED, SENT_EVENT, UPDATED, DELETED = "message.received", "message.sent", "message.updated", "message.deleted"


@dataclass(frozen=True)
class Feed:
    """What one subscription of a mailbox watches: a resource, its change types and (for a folder) its delta."""

    name: str  # inbox | sent | changes
    resource: str
    change_types: tuple[str, ...]
    folder: str = ""  # well-known folder caught up by delta ("" for the mailbox-wide feed, which has none)
    select: tuple[str, ...] = SUMMARY_FIELDS  # what its events need of a message (rich notifications carry it)


def feeds_for(events: tuple[str, ...]) -> tuple[Feed, ...]:
    """The subscriptions ``MAIL_EVENTS`` needs: Inbox ``created``, Sent Items ``created``, and one mailbox-wide
    ``updated``/``deleted`` subscription (Graph allows 1,000 per mailbox across all apps)."""
    feeds = []
    if RECEIVED in events:
        feeds.append(Feed(INBOX, "me/mailFolders('Inbox')/messages", ("created",), "inbox"))
    if SENT_EVENT in events:
        feeds.append(Feed(SENT, "me/mailFolders('SentItems')/messages", ("created",), "sentitems"))
    changes = tuple(t for t, e in (("updated", UPDATED), ("deleted", DELETED)) if e in events)
    if changes:
        feeds.append(Feed(CHANGES, "me/messages", changes, select=UPDATED_FIELDS))
    return tuple(feeds)


@dataclass(frozen=True)
class NotificationConfig:
    enabled: bool
    notification_url: str
    lifecycle_url: str
    feeds: tuple[Feed, ...] = feeds_for((RECEIVED, SENT_EVENT))
    rich: bool = False  # NOTIFICATIONS_RESOURCE_DATA: subscriptions include the resource, encrypted to us

    @classmethod
    def from_settings(cls, settings: Settings) -> NotificationConfig:
        url = f"{settings.public_base_url}/api/notifications/microsoft"
        return cls(settings.notifications_on, url, url + "/lifecycle", feeds_for(settings.mail_events),
                   settings.notifications_resource_data)

    def feed(self, name: str) -> Feed | None:
        return next((f for f in self.feeds if f.name == name), None)


@dataclass(frozen=True)
class Job:
    """A queue message of ``notification-jobs``."""

    kind: str  # changes | lifecycle | ensure | maintain | disable
    owner: str
    account_id: str
    subscription_id: str = ""
    ids: tuple[str, ...] = ()
    event: str = ""
    catchup: bool = False
    rearm: str = ""
    attempt: int = 0
    feed: str = INBOX  # the subscription's feed (changes and lifecycle jobs)
    change: str = "created"  # a changes job: created | updated | deleted
    # Rich notifications: message id → what Graph sent of it (its bounded summary and, for updates, its folder
    # id, flag, categories and changeKey), checked and decrypted by the intake, so no Graph read is needed.
    resources: dict[str, dict[str, object]] = field(default_factory=dict)

    def to_message(self) -> bytes:
        return json.dumps({"kind": self.kind, "owner": self.owner, "accountId": self.account_id,
                           "subscriptionId": self.subscription_id, "ids": list(self.ids), "event": self.event,
                           "catchup": self.catchup, "rearm": self.rearm, "attempt": self.attempt,
                           "feed": self.feed, "change": self.change, "resources": self.resources}).encode()

    @classmethod
    def from_message(cls, raw: bytes) -> Job:
        """ValueError when it is not one of ours."""
        try:
            d = json.loads(raw)
            ids = d.get("ids") or []
            if d["kind"] not in ("changes", "lifecycle", "ensure", "maintain", "disable") or not all(
                    isinstance(i, str) for i in ids):
                raise ValueError("kind")
            feed, change = str(d.get("feed") or INBOX), str(d.get("change") or "created")
            if feed not in FEED_NAMES or change not in ("created", "updated", "deleted"):
                raise ValueError("feed")
            resources = d.get("resources") or {}
            if not isinstance(resources, dict) or not all(isinstance(v, dict) for v in resources.values()):
                raise ValueError("resources")
            return cls(str(d["kind"]), str(d["owner"]), str(d["accountId"]), str(d.get("subscriptionId") or ""),
                       tuple(ids), str(d.get("event") or ""), bool(d.get("catchup")), str(d.get("rearm") or ""),
                       int(d.get("attempt") or 0), feed, change, {str(k): v for k, v in resources.items()})
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(type(e).__name__) from None


def message_summary(m: dict[str, object]) -> dict[str, object]:
    """The ``message`` of ``message.received``: Graph's fields, addresses flattened like the API's.

    Bounded so the event always fits a queue message (64 KiB of base64, JSON with non-ASCII escaped):
    the first :data:`MAX_RECIPIENTS` ``toRecipients`` (fewer when still too large) with
    ``toRecipientsCount`` telling how many there are, and text fields cut at :data:`MAX_TEXT` characters."""
    from shared.messages import items, map_summary

    s = map_summary(dict(m))
    recipients = [_address(r) for r in items(s.get("toRecipients"))]
    out: dict[str, object] = {k: _cut(s.get(k)) for k in ("id", "subject", "receivedDateTime", "conversationId",
                                                          "hasAttachments", "bodyPreview", "isRead")}
    out["from"] = _address(s.get("from"))
    out["internetMessageId"] = _cut(m.get("internetMessageId"))
    out["toRecipientsCount"] = len(recipients)
    kept = recipients[:MAX_RECIPIENTS]
    while kept and len(json.dumps({**out, "toRecipients": kept})) > MAX_SUMMARY_JSON:
        kept = kept[:len(kept) // 2]
    out["toRecipients"] = kept
    return out


def resource_summary(resource: dict[str, object]) -> dict[str, object]:
    """What a job keeps of a rich notification's resource: the event's bounded summary, and for updates where the
    message is, its flag, categories and changeKey (each bounded too)."""
    out = message_summary(resource)
    for k in ("parentFolderId", "changeKey"):
        if isinstance(resource.get(k), str):
            out[k] = str(resource[k])[:MAX_TEXT]
    if isinstance(resource.get("flag"), dict):
        out["flag"] = resource["flag"]
    if isinstance(resource.get("categories"), list):
        out["categories"] = bounded_categories(resource["categories"])
    return out


def bounded_categories(value: object) -> list[str]:
    """At most 50 categories of at most 255 characters (an event always fits a queue message)."""
    return [c[:255] for c in value[:50] if isinstance(c, str)] if isinstance(value, list) else []


def _cut(value: object) -> object:
    return value[:MAX_TEXT] if isinstance(value, str) else value


def _address(value: object) -> object:
    return {k: _cut(v) for k, v in value.items()} if isinstance(value, dict) else value


def seen_key(mid: str) -> str:
    return hashlib.sha256(mid.encode()).hexdigest()[:48]


def too_old(msg: dict[str, object], now: dt.datetime) -> bool:
    """Received before the de-duplication window (less a day of margin): never announced as new, since its
    de-duplication row may be gone already."""
    received = parse_time(msg.get("receivedDateTime"))
    return received is not None and received < now - DEDUP_WINDOW + dt.timedelta(days=1)


def parse_time(value: object) -> dt.datetime | None:
    try:
        return parse_iso(value) if isinstance(value, str) else None
    except ValueError:
        return None
