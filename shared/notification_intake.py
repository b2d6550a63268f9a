"""The notification endpoints' work: check a ``changeNotificationCollection`` and enqueue it.

Graph wants a 2xx within 3 s and throttles or drops slow endpoints; when the work could not be persisted
the endpoint answers 5xx so Graph retries
(https://learn.microsoft.com/graph/change-notifications-delivery-webhooks#processing-the-change-notification).
Each notification's subscription is found by its ``clientState`` (:class:`shared.subscriptions.SubscriptionStore`);
an unknown subscription or a wrong clientState is logged and dropped, and nothing tells the sender which it
was. A batch becomes at most one ``changes`` job per subscription and :data:`IDS_PER_JOB` ids, and at most
one lifecycle job per subscription however many lifecycle items it carries.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from shared import subscriptions
from shared.errors import ValidationError
from shared.messages import check_id
from shared.notifications import CHANGES, IDS_PER_JOB, LIFECYCLE_EVENTS, Job, resource_summary
from shared.rich_notifications import NotificationCertificates, RichNotificationError, ValidationTokens, decrypt
from shared.subscriptions import Pointer, SubscriptionStore

if TYPE_CHECKING:
    from shared.storage import Queue

log = logging.getLogger("connector.notifications")

MAX_BODY_BYTES = 1024 * 1024  # a notification batch; Graph's are a few KB
MAX_ITEMS = 1000
MAX_UNKNOWN_LOOKUPS = 4  # distinct unknown clientStates a batch may look up; the rest are dropped unread
#: Message ids per batch that become reads; past it a subscription's ids are left to one delta catch-up
#: instead (nothing is lost, and a batch costs at most this many Graph reads).
MAX_IDS_PER_BATCH = 200
POINTER_CACHE_S = 300.0
JOB_RESOURCE_BYTES = 36 * 1024
_SUBSCRIPTION_ID = re.compile(r"[A-Za-z0-9-]{1,128}")
# The lifecycle events of one subscription in one batch become one job: the first of these it carries
# (a removal recreates and catches up; a reauthorization reauthorizes, then catches up if one was missed).
_LIFECYCLE_RANK = {"subscriptionRemoved": 0, "reauthorizationRequired": 1, "missed": 2}


@dataclass(frozen=True)
class Change:
    """One item of a ``changeNotificationCollection``: a created message or a lifecycle event."""

    subscription_id: str
    client_state: str | None
    message_id: str | None = None
    lifecycle_event: str | None = None
    change_type: str = "created"  # created | updated | deleted
    tenant_id: str | None = None
    encrypted: object = None  # a rich notification's encryptedContent


def parse_batch(doc: object) -> list[Change]:
    """Graph's ``{"value":[…]}``; ValidationError for anything of the wrong shape or type.
    https://learn.microsoft.com/graph/api/resources/changenotificationcollection"""
    value = doc.get("value") if isinstance(doc, dict) else None
    if not isinstance(value, list) or not value:
        raise ValidationError("value", "The body must be a change notification collection: {\"value\": [...]}.")
    if len(value) > MAX_ITEMS:
        raise ValidationError("value", f"At most {MAX_ITEMS} notifications per request.")
    return [c for c in (_parse_item(i, item) for i, item in enumerate(value)) if c is not None]


def _parse_item(i: int, item: object) -> Change | None:
    if not isinstance(item, dict):
        raise ValidationError(f"value[{i}]", f"value[{i}] must be an object.")
    sid, cs = item.get("subscriptionId"), item.get("clientState")
    if not isinstance(sid, str) or not _SUBSCRIPTION_ID.fullmatch(sid):
        raise ValidationError(f"value[{i}].subscriptionId", "subscriptionId must be a subscription id.")
    if cs is not None and (not isinstance(cs, str) or len(cs) > 128):
        raise ValidationError(f"value[{i}].clientState", "clientState must be a string of at most 128 characters.")
    event = item.get("lifecycleEvent")
    if event is not None:
        if not isinstance(event, str) or len(event) > 64:
            raise ValidationError(f"value[{i}].lifecycleEvent", "lifecycleEvent must be a string.")
        return Change(sid, cs, lifecycle_event=event) if event in LIFECYCLE_EVENTS else None
    change_type, data = item.get("changeType"), item.get("resourceData")
    if not isinstance(change_type, str) or len(change_type) > 64:
        raise ValidationError(f"value[{i}].changeType", "changeType must be a string.")
    mid = data.get("id") if isinstance(data, dict) else None
    if not isinstance(mid, str):
        raise ValidationError(f"value[{i}].resourceData.id", "resourceData.id must be a message id.")
    check_id(mid, f"value[{i}].resourceData.id")  # the rule of ids in routes: no "/", no "..", no query
    kind = next((t for t in ("created", "updated", "deleted") if t in change_type.split(",")), None)
    tenant = item.get("tenantId")
    return Change(sid, cs, message_id=mid, change_type=kind, tenant_id=tenant if isinstance(tenant, str) else None,
                  encrypted=item.get("encryptedContent")) if kind else None


@dataclass(frozen=True)
class RichCheck:
    """What the intake needs for rich notifications: Graph's validation tokens and our certificates."""

    tokens: ValidationTokens
    certificates: NotificationCertificates


def _packed(ids: list[str], resources: dict[str, dict[str, object]]) -> list[list[str]]:
    """Ids in jobs of at most :data:`IDS_PER_JOB`, and of at most :data:`JOB_RESOURCE_BYTES` of resources (a
    queue message holds 48 KB before base64)."""
    parts: list[list[str]] = [[]]
    size = 0
    for mid in ids:
        n = len(json.dumps(resources[mid])) if mid in resources else 0
        if parts[-1] and (len(parts[-1]) >= IDS_PER_JOB or size + n > JOB_RESOURCE_BYTES):
            parts.append([])
            size = 0
        parts[-1].append(mid)
        size += n
    return parts


def _expected(feed: str, change_type: str) -> bool:
    """A folder feed announces created messages; the mailbox-wide feed, updates and deletions."""
    return (change_type == "created") != (feed == CHANGES)


@dataclass
class _Batch:
    """What one notification batch has looked up (each clientState is read at most once per batch)."""

    pointers: dict[str, Pointer | None] = field(default_factory=dict)
    unknown: int = 0


def _merge_lifecycle(held: Job | None, new: Job) -> Job:
    """Two lifecycle events of one subscription in one batch: the stronger event, a catch-up if either asks."""
    if held is None:
        return new
    first = held if _LIFECYCLE_RANK[held.event] <= _LIFECYCLE_RANK[new.event] else new
    return replace(first, catchup=held.catchup or new.catchup)


class NotificationIntake:
    """Behind the anonymous notification endpoints: parse, find each clientState's subscription, enqueue."""

    def __init__(self, *, enabled: bool, store: SubscriptionStore, queue: Callable[[], Queue],
                 rich: RichCheck | None = None) -> None:
        self.enabled = enabled
        self._store = store
        self._queue = queue
        self._rich = rich
        self._cache: dict[str, tuple[Pointer, float]] = {}
        self._cache_lock = threading.Lock()

    def accept(self, doc: object) -> tuple[int, int]:
        """Check and enqueue a notification batch. Returns (accepted, dropped); raises ValidationError
        for a malformed batch and StorageUnavailableError when the work could not be queued."""
        changes = parse_batch(doc)
        if not self.enabled:
            return 0, len(changes)
        try:
            resources = self._open_rich(doc, changes)
        except RichNotificationError as e:
            # Nothing in the batch is trusted; 202 all the same, so a sender learns nothing from the answer.
            log.warning(json.dumps({"event": "notifications.rich_rejected", "dropped": len(changes),
                                    "reason": str(e)}))
            return 0, len(changes)
        jobs: dict[tuple[str, str, str, str, str], dict[str, None]] = {}  # ids in arrival order, each once
        lifecycle: dict[str, Job] = {}
        dropped = 0
        batch = _Batch()
        for c in changes:
            ptr = self._pointer(c, batch)
            if ptr is None:
                dropped += 1
            elif c.lifecycle_event:
                lifecycle[c.subscription_id] = _merge_lifecycle(
                    lifecycle.get(c.subscription_id), Job("lifecycle", ptr.owner, ptr.account_id, c.subscription_id,
                                                          event=c.lifecycle_event,
                                                          catchup=c.lifecycle_event != "reauthorizationRequired",
                                                          feed=ptr.feed))
            elif c.message_id and _expected(ptr.feed, c.change_type):
                key = (ptr.owner, ptr.account_id, c.subscription_id, ptr.feed, c.change_type)
                jobs.setdefault(key, {})[c.message_id] = None
        budget = MAX_IDS_PER_BATCH
        for (owner, account_id, sid, feed, change), seen in jobs.items():
            ids = list(seen)
            if len(ids) > budget and feed != CHANGES:
                # A flood: one catch-up of the folder reads what these ids name, with delta's paging.
                lifecycle[sid] = _merge_lifecycle(lifecycle.get(sid), Job("lifecycle", owner, account_id, sid,
                                                                          event="missed", catchup=True, feed=feed))
                continue
            budget -= len(ids)
            for part in _packed(ids, resources):
                self._queue().send(Job("changes", owner, account_id, sid, tuple(part), feed=feed, change=change,
                                       resources={m: resources[m] for m in part if m in resources}).to_message())
        for job in lifecycle.values():
            self._queue().send(job.to_message())
        if dropped:
            log.warning(json.dumps({"event": "notifications.dropped", "dropped": dropped,
                                    "reason": "unknown subscription or wrong clientState"}))
        return len(changes) - dropped, dropped

    def _open_rich(self, doc: object, changes: list[Change]) -> dict[str, dict[str, object]]:
        """The validated, decrypted resources of a batch's rich notifications (message id → summary). Graph's
        validation tokens are checked before anything in the batch is trusted; any failure rejects the batch."""
        tokens = doc.get("validationTokens") if isinstance(doc, dict) else None
        rich = [c for c in changes if c.encrypted is not None]
        if tokens is None and not rich:
            return {}
        if self._rich is None:
            raise RichNotificationError("rich notifications are not configured")
        tenants = {c.tenant_id or "" for c in changes if c.message_id}
        if "" in tenants:
            raise RichNotificationError("a notification names no tenant")
        self._rich.tokens.check(tokens, tenants)
        opened: dict[str, dict[str, object]] = {}
        for c in rich:
            resource = decrypt(c.encrypted, self._rich.certificates.key_for)
            if resource.get("id") != c.message_id:
                raise RichNotificationError("the encrypted resource is another message")
            opened[str(c.message_id)] = resource_summary(resource)
        return opened

    def _pointer(self, c: Change, batch: _Batch) -> Pointer | None:
        """The subscription of a notification's clientState: from the batch, the process cache, or one
        storage read. After :data:`MAX_UNKNOWN_LOOKUPS` unknown clientStates a batch reads no more."""
        if not c.client_state:
            return None
        if c.client_state in batch.pointers:
            ptr = batch.pointers[c.client_state]
        elif batch.unknown >= MAX_UNKNOWN_LOOKUPS:
            return None
        else:
            ptr = batch.pointers[c.client_state] = self._lookup(c.client_state)
            batch.unknown += ptr is None
        if ptr is None or (ptr.subscription_id and ptr.subscription_id != c.subscription_id):
            return None
        return ptr

    def _lookup(self, client_state: str) -> Pointer | None:
        key = subscriptions.client_key(client_state)
        now = time.monotonic()
        with self._cache_lock:
            hit = self._cache.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        ptr = self._store.lookup(client_state)
        if ptr is not None and ptr.subscription_id:  # bound pointers only: an unbound one changes soon
            with self._cache_lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[key] = (ptr, now + POINTER_CACHE_S)
        return ptr
