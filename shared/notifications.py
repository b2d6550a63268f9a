"""Inbound mail (SPEC §6a): Graph change notifications become signed ``message.received`` webhooks.

The pieces, each following Microsoft's documented behaviour:

* **Intake** (:meth:`Notifications.accept`, behind the anonymous notification endpoints): parse
  Graph's ``changeNotificationCollection`` defensively, find each notification's subscription by its
  ``clientState`` (:class:`shared.subscriptions.SubscriptionStore`), enqueue the work and let the
  endpoint answer 202 at once: Graph wants a 2xx within 3 s and throttles or drops slow endpoints;
  when the work could not be persisted the endpoint answers 5xx so Graph retries
  (https://learn.microsoft.com/graph/change-notifications-delivery-webhooks#processing-the-change-notification).
  An unknown subscription or a wrong clientState is logged and dropped, and nothing tells the
  sender which it was.
* **Processing** (:meth:`Notifications.process`, a queue trigger): read the new message's summary
  and enqueue ``message.received`` on the signed webhook queue, at least once, de-duplicated by
  message id within :data:`DEDUP_WINDOW` (Graph may send a notification more than once).
* **Nothing lost**: a per-account Inbox delta link (:mod:`shared.delta`); a catch-up after a
  ``missed`` lifecycle event, after ``subscriptionRemoved`` (a new subscription first), after a
  re-connect and on the maintenance timer; ``reauthorizationRequired`` → ``/reauthorize``
  (https://learn.microsoft.com/graph/change-notifications-lifecycle-events).
* **Renewal at scale**: a due-time index (:class:`shared.refresh_index.RefreshIndex` over its own
  table) brings each subscription back before it expires and for the safety catch-up; a timer run
  reads only due rows. Failures are classified like refresh failures (:mod:`shared.refresh`): a dead
  grant → the account is ``reauth_required`` (TokenManager) and notifications ``failed`` until it is
  re-connected; throttling, Graph or storage unavailable → retried later with backoff; anything else
  → ``failed``, retried hourly.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from shared import delta, subscriptions
from shared.accounts import (
    ACTIVE,
    NOTIFY_ACTIVE,
    NOTIFY_FAILED,
    NOTIFY_OFF,
    NOTIFY_PENDING,
    Account,
    AccountStore,
    NotificationSummary,
    iso,
    parse_iso,
    utcnow,
)
from shared.backoff import backoff_delay
from shared.errors import (
    ConnectorError,
    MicrosoftError,
    NotFoundError,
    ReauthRequiredError,
    StorageUnavailableError,
    ThrottledError,
    UpstreamUnavailableError,
    ValidationError,
)
from shared.messages import check_id
from shared.refresh_index import REARM, RefreshIndex, bucket_of, row_key
from shared.subscriptions import Pointer, SubscriptionGoneError, SubscriptionState, SubscriptionStore
from shared.tokens import AccountTokenSource

if TYPE_CHECKING:
    from shared.config import Settings
    from shared.graph import GraphClient, TokenSource
    from shared.storage import Queue, Row, Table
    from shared.telemetry import Telemetry
    from shared.tokens import TokenManager
    from shared.webhooks import Webhooks

log = logging.getLogger("connector.notifications")

MAX_BODY_BYTES = 1024 * 1024  # a notification batch; Graph's are a few KB
MAX_ITEMS = 1000
MAX_UNKNOWN_LOOKUPS = 4  # distinct unknown clientStates a batch may look up; the rest are dropped unread
IDS_PER_JOB = 100  # message ids per queue message (64 KB queue limit)
MAX_RECIPIENTS = 50  # toRecipients in a message.received event (toRecipientsCount has the total)
MAX_TEXT = 1024  # characters kept of a text field of the event (subject, names, bodyPreview, …)
MAX_SUMMARY_JSON = 24 * 1024  # the event's message summary; a queue message holds 48 KB before base64
RENEW_BEFORE = dt.timedelta(days=1)
CATCHUP_EVERY = dt.timedelta(hours=6)  # the safety catch-up
BASELINE = dt.timedelta(days=1)  # a new delta round lists this much of the Inbox (not announced)
FAILED_RETRY = dt.timedelta(hours=1)
GIVE_UP_RETRY = dt.timedelta(minutes=30)
DEDUP_WINDOW = dt.timedelta(days=14)
CLAIM_STALE = dt.timedelta(minutes=2)  # a claim not marked sent by then was abandoned (worker crash)
LAST_EVENT_EVERY = dt.timedelta(seconds=60)  # lastEventAt is coarse: at most one account write a minute
MAX_TRANSIENT_ATTEMPTS = 6
POINTER_CACHE_S = 300.0
LIFECYCLE_EVENTS = ("reauthorizationRequired", "subscriptionRemoved", "missed")
_SUBSCRIPTION_ID = re.compile(r"[A-Za-z0-9-]{1,128}")
#: Message ids per batch that become reads; past it a subscription's ids are left to one delta catch-up
#: instead (nothing is lost, and a batch costs at most this many Graph reads).
MAX_IDS_PER_BATCH = 200
# The lifecycle events of one subscription in one batch become one job: the first of these it carries
# (a removal recreates and catches up; a reauthorization reauthorizes, then catches up if one was missed).
_LIFECYCLE_RANK = {"subscriptionRemoved": 0, "reauthorizationRequired": 1, "missed": 2}
_TRANSIENT = (ThrottledError, UpstreamUnavailableError, StorageUnavailableError)


@dataclass(frozen=True)
class NotificationConfig:
    enabled: bool
    notification_url: str
    lifecycle_url: str

    @classmethod
    def from_settings(cls, settings: Settings) -> NotificationConfig:
        url = f"{settings.public_base_url}/api/notifications/microsoft"
        return cls(settings.notifications_on, url, url + "/lifecycle")


@dataclass(frozen=True)
class Change:
    """One item of a ``changeNotificationCollection``: a created message or a lifecycle event."""

    subscription_id: str
    client_state: str | None
    message_id: str | None = None
    lifecycle_event: str | None = None


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
    return Change(sid, cs, message_id=mid) if "created" in change_type.split(",") else None


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

    def to_message(self) -> bytes:
        return json.dumps({"kind": self.kind, "owner": self.owner, "accountId": self.account_id,
                           "subscriptionId": self.subscription_id, "ids": list(self.ids), "event": self.event,
                           "catchup": self.catchup, "rearm": self.rearm, "attempt": self.attempt}).encode()

    @classmethod
    def from_message(cls, raw: bytes) -> Job:
        """ValueError when it is not one of ours."""
        try:
            d = json.loads(raw)
            ids = d.get("ids") or []
            if d["kind"] not in ("changes", "lifecycle", "ensure", "maintain", "disable") or not all(
                    isinstance(i, str) for i in ids):
                raise ValueError("kind")
            return cls(str(d["kind"]), str(d["owner"]), str(d["accountId"]), str(d.get("subscriptionId") or ""),
                       tuple(ids), str(d.get("event") or ""), bool(d.get("catchup")), str(d.get("rearm") or ""),
                       int(d.get("attempt") or 0))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(type(e).__name__) from None


@dataclass
class _Batch:
    """What one notification batch has looked up (each clientState is read at most once per batch)."""

    pointers: dict[str, Pointer | None] = field(default_factory=dict)
    unknown: int = 0


def message_summary(m: dict[str, object]) -> dict[str, object]:
    """The ``message`` of ``message.received``: Graph's fields, addresses flattened like the API's.

    Bounded so the event always fits a queue message (64 KiB of base64, JSON with non-ASCII escaped):
    the first :data:`MAX_RECIPIENTS` ``toRecipients`` (fewer when still too large) with
    ``toRecipientsCount`` telling how many there are, and text fields cut at :data:`MAX_TEXT` characters."""
    from shared.messages import map_summary

    s = map_summary(dict(m))
    recipients = [_address(r) for r in s.get("toRecipients") or []]
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


def _cut(value: object) -> object:
    return value[:MAX_TEXT] if isinstance(value, str) else value


def _address(value: object) -> object:
    return {k: _cut(v) for k, v in value.items()} if isinstance(value, dict) else value


class Notifications:
    """Intake, worker, timer and account hooks of inbound mail, over injected parts."""

    def __init__(self, config: NotificationConfig, *, graph: GraphClient, tokens: TokenManager,
                 accounts: AccountStore, store: SubscriptionStore, index_table: Table, seen: Table,
                 queue: Callable[[], Queue], webhooks: Webhooks, telemetry: Telemetry | None = None) -> None:
        from shared.telemetry import OFF

        self._telemetry = telemetry or OFF  # connector.notification.lag (docs/operations.md)
        self.config = config
        self._graph = graph
        self._tokens = tokens
        self._accounts = accounts
        self._store = store
        self._index_table = index_table
        self._index = RefreshIndex(index_table)
        self._seen = seen
        self._queue = queue
        self._webhooks = webhooks
        self._cache: dict[str, tuple[Pointer, float]] = {}
        self._cache_lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    # -- intake (the notification endpoints) --------------------------------------------------
    def accept(self, doc: object) -> tuple[int, int]:
        """Check and enqueue a notification batch. Returns (accepted, dropped); raises ValidationError
        for a malformed batch and StorageUnavailableError when the work could not be queued."""
        changes = parse_batch(doc)
        if not self.enabled:
            return 0, len(changes)
        jobs: dict[tuple[str, str, str], dict[str, None]] = {}  # ids in arrival order, each once
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
                                                          catchup=c.lifecycle_event != "reauthorizationRequired"))
            elif c.message_id:
                jobs.setdefault((ptr.owner, ptr.account_id, c.subscription_id), {})[c.message_id] = None
        budget = MAX_IDS_PER_BATCH
        for (owner, account_id, sid), seen in jobs.items():
            ids = list(seen)
            if len(ids) > budget:  # a flood: one catch-up reads what these ids name, with delta's paging
                lifecycle.setdefault(sid, Job("lifecycle", owner, account_id, sid, event="missed", catchup=True))
                continue
            budget -= len(ids)
            for i in range(0, len(ids), IDS_PER_JOB):
                self._queue().send(Job("changes", owner, account_id, sid, tuple(ids[i:i + IDS_PER_JOB])).to_message())
        for job in lifecycle.values():
            self._queue().send(job.to_message())
        if dropped:
            log.warning(json.dumps({"event": "notifications.dropped", "dropped": dropped,
                                    "reason": "unknown subscription or wrong clientState"}))
        return len(changes) - dropped, dropped

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

    # -- account hooks (called by the composition root) ---------------------------------------
    def on_connected(self, account: Account, *, reconnected: bool) -> Account:
        """Connect, re-connect or recovery: a subscription is (re)made in the background; after a
        re-connect the Inbox is caught up. Never raises (the connect has succeeded)."""
        if not self.enabled:
            return account
        try:
            saved = self._accounts.set_notifications(account, replace(account.notifications, status=NOTIFY_PENDING))
            self._queue().send(Job("ensure", account.owner, account.id, catchup=reconnected).to_message())
            return saved
        except ConnectorError as e:
            log.warning("notifications for %s not scheduled (%s); the daily reconciliation will", account.id, e.code)
            return account

    def on_disconnect(self, account: Account) -> None:
        """The account is about to be deleted: delete its Graph subscription while the grant still exists
        (one token refresh allowed), then our rows. Never raises: the deletion goes on regardless, and a
        subscription left behind expires by itself within days."""
        try:
            state = self._store.get(account.owner, account.id)
        except ConnectorError as e:
            log.warning("subscription of disconnected %s not deleted (%s); it expires by itself", account.id, e.code)
            return
        try:  # every subscription the account has, not only the state row's (a crashed creation left one)
            sids = {sid for _, sid in self._store.pointers_of(account.owner, account.id)}
        except ConnectorError as e:
            log.warning("subscriptions of disconnected %s not listed (%s)", account.id, e.code)
            sids = set()
        sids = (sids | {state.subscription_id if state else ""}) - {""}
        if state is None and not sids:
            return
        state = state or SubscriptionState(account.owner, account.id)
        token = AccountTokenSource(self._tokens, account)
        for sid in sorted(sids):
            try:
                subscriptions.delete(self._graph, token, account.mailbox_key, sid)
            except Exception as e:
                log.warning("subscription of disconnected %s not deleted (%s); it expires by itself", account.id,
                            e.code if isinstance(e, ConnectorError) else type(e).__name__)
        try:
            self._unindex(state)
            self._store.delete(state)
        except ConnectorError as e:
            log.warning("rows of disconnected %s not deleted (%s); the daily reconciliation will", account.id, e.code)

    def check(self, account: Account) -> tuple[bool, str, str | None]:
        """The diagnose check: (ok, detail, hint)."""
        n = account.notifications
        if not self.enabled:
            return True, "Inbound mail notifications are off (NOTIFICATIONS_ENABLED).", None
        if n.status == NOTIFY_ACTIVE and n.expires_at is not None and n.expires_at > utcnow():
            return True, f"Subscribed to new Inbox mail until {iso(n.expires_at)}; last event {iso(n.last_event_at)}.", None
        if n.status == NOTIFY_PENDING:
            return True, "The Inbox subscription is being created.", None
        state = self._store.get(account.owner, account.id)
        why = f" (last error: {state.last_error})" if state and state.last_error else ""
        return False, f"No live Inbox subscription: status {n.status}{why}.", (
            "Graph must reach PUBLIC_BASE_URL over https for /api/notifications/microsoft; the connector retries "
            "hourly, and a re-connect subscribes again. Messages that arrive meanwhile are caught up by delta.")

    # -- timers ---------------------------------------------------------------------------------
    def enqueue_due(self, now: dt.datetime | None = None) -> dict[str, int]:
        """Maintenance timer: every due index row becomes a ``maintain`` job (renewal, safety catch-up)."""
        if not self.enabled:
            return {"read": 0, "enqueued": 0}
        read, due, rearm = self._index.take_due(now or utcnow())
        for d in due:
            self._queue().send(Job("maintain", d.owner, d.account_id, rearm=rearm).to_message())
        log.info(json.dumps({"event": "notifications.enqueued", "indexRowsRead": read, "enqueued": len(due)}))
        return {"read": read, "enqueued": len(due)}

    def reconcile(self, now: dt.datetime | None = None) -> dict[str, int]:
        """Daily: subscribe active accounts that have none (existing accounts, lost jobs), re-create
        lost index rows, turn everything off when disabled, forget old de-duplication rows."""
        now = now or utcnow()
        states = {(s.owner, s.account_id): s for s in self._store.all_states()}
        queued = 0
        if self.enabled:
            queued += self._reconcile_active(states)
        for (owner, account_id), s in states.items():
            queued += self._reconcile_orphan(owner, account_id, s)
        purged = self._seen.purge("expiresAt lt @c", parameters={"c": iso(now) or ""})
        log.info(json.dumps({"event": "notifications.reconciled", "queued": queued, "seenPurged": purged}))
        return {"queued": queued, "seenPurged": purged}

    def _reconcile_active(self, states: dict[tuple[str, str], SubscriptionState]) -> int:
        queued = 0
        for owner, account_id, _ in self._accounts.list_active_due_times():
            s = states.pop((owner, account_id), None)
            if s is not None and s.subscription_id and s.due_at is not None:
                self._index.put_row(owner, account_id, s.due_at)
                continue
            self._queue().send(Job("ensure", owner, account_id, catchup=bool(s and s.delta_link)).to_message())
            queued += 1
        return queued

    def _reconcile_orphan(self, owner: str, account_id: str, s: SubscriptionState) -> int:
        """A state row of an account that is not active: gone → rows deleted; disabled → subscription deleted."""
        try:
            self._accounts.get_account(owner, account_id)
        except NotFoundError:
            self._unindex(s)
            self._store.delete(s)
            return 0
        if self.enabled or not s.subscription_id:
            return 0  # reauth_required: keep the delta link for the catch-up after recovery
        self._queue().send(Job("disable", owner, account_id).to_message())
        return 1

    # -- worker ---------------------------------------------------------------------------------
    def process(self, raw: bytes) -> str:
        """Queue-worker body. Returns what happened (for logs and tests)."""
        try:
            job = Job.from_message(raw)
        except ValueError:
            log.error("dropping a malformed notification job")
            return "malformed"
        try:
            outcome = self._run(job)
        except ReauthRequiredError:
            outcome = self._failed(job, "reauth_required", retry=None)
        except _TRANSIENT as e:
            outcome = self._retry_later(job, e)
        except Exception as e:  # ours, or e.g. a second DeltaExpiredError, a link outside Graph, a bad answer
            code = e.code if isinstance(e, ConnectorError) else "internal_error"
            log.warning("notification job %s for %s failed: %s (%s)", job.kind, job.account_id, code,
                        type(e).__name__)
            # One unreadable message is not a broken subscription; the safety catch-up tries it again.
            outcome = "failed" if job.kind == "changes" else self._failed(job, code, retry=FAILED_RETRY)
        log.info(json.dumps({"event": "notifications.job", "kind": job.kind, "accountId": job.account_id,
                             "outcome": outcome}))
        return outcome

    def _run(self, job: Job) -> str:
        loaded = self._load(job)
        if isinstance(loaded, str):
            return loaded
        acc, state = loaded
        if job.kind == "changes":
            return self._deliver_changes(acc, job)
        if job.kind == "disable":
            return self._disable(acc, state)
        if not self.enabled:
            return "disabled"
        token = AccountTokenSource(self._tokens, acc)
        now = utcnow()
        if job.kind == "lifecycle":
            if job.subscription_id != state.subscription_id:
                return "stale"
            state = self._on_lifecycle(acc, token, state, job, now)
        else:
            state = self._subscribe(acc, token, state, now, force=job.kind == "ensure")
            state = self._sync(acc, token, state, now)
        self._settle(token.account, state, now, rearm=job.rearm)
        return job.event or job.kind

    def _load(self, job: Job) -> tuple[Account, SubscriptionState] | str:
        try:
            acc = self._accounts.get_account(job.owner, job.account_id)
        except NotFoundError:
            state = self._store.get(job.owner, job.account_id)
            self._unindex(state or SubscriptionState(job.owner, job.account_id), job.rearm)
            if state is not None:
                self._store.delete(state)
            return "gone"
        if acc.status != ACTIVE:  # reauth_required: a re-connect subscribes again (on_connected)
            if job.rearm:
                self._unindex(SubscriptionState(job.owner, job.account_id), job.rearm)
            return "inactive"
        if job.kind == "changes":  # the hot path needs only the account (one read)
            return acc, SubscriptionState(job.owner, job.account_id)
        return acc, self._store.get(job.owner, job.account_id) or SubscriptionState(job.owner, job.account_id)

    def _on_lifecycle(self, acc: Account, token: TokenSource, state: SubscriptionState, job: Job,
                      now: dt.datetime) -> SubscriptionState:
        """One job per subscription and batch (:func:`_merge_lifecycle`): at most one catch-up however
        many lifecycle notifications the batch carried."""
        event = job.event
        if event == "reauthorizationRequired":
            try:
                subscriptions.reauthorize(self._graph, token, acc.mailbox_key, state.subscription_id)
                return self._sync(acc, token, state, now) if job.catchup else state
            except SubscriptionGoneError:
                event = "subscriptionRemoved"
        if event == "subscriptionRemoved":
            # Delete it first: a removal Graph did not send (a forged or replayed notification) must not leave
            # the old subscription live beside the new one. Gone already is the normal case.
            try:
                subscriptions.delete(self._graph, token, acc.mailbox_key, state.subscription_id)
            except (ThrottledError, ReauthRequiredError):
                raise
            except MicrosoftError as e:  # e.g. refused: it was not ours to delete; a new one is needed anyway
                log.warning("removed subscription of %s not deleted (%s)", acc.id, e.code)
            state = self._create(acc, token, state, now)  # recreate, then catch up
        return self._sync(acc, token, state, now)

    def _subscribe(self, acc: Account, token: TokenSource, state: SubscriptionState, now: dt.datetime, *,
                   force: bool) -> SubscriptionState:
        """Renew (which also reauthorizes) when forced or due; create when there is none or Graph lost it."""
        if state.subscription_id:
            if not force and state.expires_at is not None and state.expires_at - now > RENEW_BEFORE:
                return state
            try:
                expires = subscriptions.renew(self._graph, token, acc.mailbox_key, state.subscription_id, now=now)
                return replace(state, expires_at=expires)
            except SubscriptionGoneError:
                pass
        return self._create(acc, token, state, now)

    def _create(self, acc: Account, token: TokenSource, state: SubscriptionState,
                now: dt.datetime) -> SubscriptionState:
        """A new subscription in place of ``state``'s (none, or one Graph lost), made by one worker at a time:
        concurrent jobs of one account (several connects at once) would each make one, and only the last
        would be remembered."""
        held = self._store.claim_creation(acc.owner, acc.id)
        if held is None:
            raise UpstreamUnavailableError("Another worker is creating this account's subscription.",
                                           code="subscription_in_progress")
        try:
            stored = self._store.get(acc.owner, acc.id)
            if stored is not None and stored.subscription_id and stored.subscription_id != state.subscription_id:
                return stored  # made while we waited for the claim: that one is the account's
            return self._create_claimed(acc, token, stored or state, now)
        finally:
            try:
                self._store.release_creation(acc.owner, acc.id, held)
            except ConnectorError:
                pass  # the claim goes stale and is taken over after CREATION_STALE

    def _create_claimed(self, acc: Account, token: TokenSource, state: SubscriptionState,
                        now: dt.datetime) -> SubscriptionState:
        client_state, key = self._store.new_pointer(acc.owner, acc.id)
        try:
            sid, expires = subscriptions.create(self._graph, token, acc.mailbox_key, now=now, client_state=client_state,
                                                notification_url=self.config.notification_url,
                                                lifecycle_url=self.config.lifecycle_url)
        except Exception:
            self._store.drop_pointer(acc.owner, acc.id, key)
            raise
        self._store.bind_pointer(key, sid)
        if state.client_key and state.client_key != key:
            self._store.drop_pointer(acc.owner, acc.id, state.client_key)
        return self._store.save(replace(state, subscription_id=sid, client_key=key, expires_at=expires))

    def _sync(self, acc: Account, token: TokenSource, state: SubscriptionState,
              now: dt.datetime) -> SubscriptionState:
        """A delta round from the saved link. Without one (first sync, or Graph forgot the link) a new
        round starts: it lists the Inbox of the last day as a baseline and announces only what arrived
        after ``after`` (the connect, or the last complete sync)."""
        if state.delta_synced_at is not None:
            after = state.delta_synced_at - dt.timedelta(minutes=10)
        else:
            after = acc.connected_at if now - acc.connected_at < dt.timedelta(hours=1) else now

        announced = [0]

        def announcer(fresh: bool) -> Callable[[dict[str, object]], None]:
            def announce(item: dict[str, object]) -> None:
                received = _parse_time(item.get("receivedDateTime"))
                if not fresh or received is None or received >= after:
                    announced[0] += self._announce(acc, item, now)
            return announce

        since = min(after, now) - BASELINE
        try:
            result = delta.catch_up(self._graph, token, acc.mailbox_key, link=state.delta_link, since=since,
                                    on_message=announcer(not state.delta_link))
        except delta.DeltaExpiredError:
            result = delta.catch_up(self._graph, token, acc.mailbox_key, link="", since=since,
                                    on_message=announcer(True))
        if announced[0]:
            self._note_event(acc, now)
        return replace(state, delta_link=result.link,
                       delta_synced_at=now if result.complete else state.delta_synced_at)

    def _settle(self, acc: Account, state: SubscriptionState, now: dt.datetime, *, rearm: str) -> None:
        """Save the state, move the index row to the next maintenance, show the account as active."""
        expires = state.expires_at or now
        due = min(expires - RENEW_BEFORE * (1 - 0.1 * random.random()), now + CATCHUP_EVERY)
        self._reindex(state, due, rearm)
        self._store.save(replace(state, due_at=due, failures=0, last_error=""))
        self._summary(acc, NotificationSummary(NOTIFY_ACTIVE, state.expires_at, acc.notifications.last_event_at))

    def _disable(self, acc: Account, state: SubscriptionState) -> str:
        if state.subscription_id:
            subscriptions.delete(self._graph, AccountTokenSource(self._tokens, acc), acc.mailbox_key,
                                 state.subscription_id)
        self._unindex(state)
        self._store.delete(state)
        self._summary(acc, NotificationSummary(NOTIFY_OFF, None, acc.notifications.last_event_at))
        return "disabled"

    # -- delivering messages ----------------------------------------------------------------------
    def _deliver_changes(self, acc: Account, job: Job) -> str:
        token = AccountTokenSource(self._tokens, acc)
        now = utcnow()
        sent = 0
        for mid in job.ids:
            if not self._claim(acc.id, mid):
                continue
            try:
                msg = self._graph.get_json(f"me/messages/{mid}", mailbox=acc.mailbox_key, token=token,
                                           params={"$select": ",".join(delta.SUMMARY_FIELDS)})
            except MicrosoftError as e:
                if e.code != "message_not_found":
                    self._release(acc.id, mid)
                    raise
                self._mark(acc.id, mid, "gone")  # deleted or moved before we looked: nothing to announce
                continue
            except Exception:
                self._release(acc.id, mid)
                raise
            if _too_old(msg, now):  # e.g. old mail moved back into the Inbox: not new mail
                self._mark(acc.id, mid, "old")
                continue
            sent += self._emit(acc, mid, msg)
        if sent:
            self._note_event(token.account, now)
        return "delivered" if sent else "duplicate"

    def _announce(self, acc: Account, item: dict[str, object], now: dt.datetime) -> int:
        """A message found by delta: announced unless already announced (or too old to be new)."""
        mid = str(item["id"])
        if _too_old(item, now):
            return 0
        return self._emit(acc, mid, item, source="catch_up") if self._claim(acc.id, mid) else 0

    def _emit(self, acc: Account, mid: str, msg: dict[str, object], *, source: str = "notification") -> int:
        """Enqueue ``message.received``. A message the queue refuses (not a transient failure) is marked
        ``rejected`` and skipped, so it can never stop a catch-up; a transient failure releases the claim."""
        try:
            self._webhooks.enqueue_message_received(acc.id, message_summary(msg))
        except _TRANSIENT:
            self._release(acc.id, mid)
            raise
        except Exception as e:
            self._mark(acc.id, mid, "rejected")
            log.error(json.dumps({"event": "notifications.rejected", "accountId": acc.id,
                                  "reason": e.code if isinstance(e, ConnectorError) else type(e).__name__}))
            return 0
        self._mark(acc.id, mid, "sent")
        received = _parse_time(msg.get("receivedDateTime"))
        if received is not None:
            self._telemetry.notification_lag((dt.datetime.now(dt.UTC) - received).total_seconds(), source=source)
        return 1

    def _claim(self, account_id: str, mid: str) -> bool:
        """Claim a message id for announcing; False when it is (being) announced already. A claim whose
        worker died before announcing (``claimed`` for :data:`CLAIM_STALE`) is taken over. The claim's time
        is the clock's, not the job's start, so a long job's fresh claim never looks abandoned."""
        now = utcnow()
        row = {"PartitionKey": account_id, "RowKey": _seen_key(mid), "state": "claimed", "at": iso(now),
               "expiresAt": iso(now + DEDUP_WINDOW)}

        def abandoned(current: Row) -> bool:
            at = parse_iso(current.get("at"))
            return current.get("state") == "claimed" and (at is None or at <= now - CLAIM_STALE)

        return isinstance(self._seen.claim(row, take_over=abandoned), str)

    def _mark(self, account_id: str, mid: str, state: str) -> None:
        self._seen.merge({"PartitionKey": account_id, "RowKey": _seen_key(mid), "state": state})

    def _release(self, account_id: str, mid: str) -> None:
        try:
            self._seen.delete_if_present(account_id, _seen_key(mid))
        except ConnectorError:
            pass  # the claim goes stale and is taken over after CLAIM_STALE

    def _note_event(self, acc: Account, now: dt.datetime) -> None:
        last = acc.notifications.last_event_at
        if last is not None and now - last < LAST_EVENT_EVERY:
            return
        try:  # best effort, and only lastEventAt: this copy's status may be stale (pending → active meanwhile)
            self._accounts.set_last_event(acc, now)
        except ConnectorError as e:
            log.debug("lastEventAt of %s not written: %s", acc.id, e.code)

    def _summary(self, acc: Account, summary: NotificationSummary) -> None:
        if summary == acc.notifications:
            return
        try:  # best effort: the account JSON's view of what the state rows say
            self._accounts.set_notifications(acc, summary)
        except ConnectorError as e:
            log.debug("notifications summary of %s not written: %s", acc.id, e.code)

    # -- failures and the index -------------------------------------------------------------------
    def _failed(self, job: Job, code: str, *, retry: dt.timedelta | None) -> str:
        """A permanent failure (or a dead grant, ``retry`` None): status ``failed``; retried via the index."""
        state = self._store.get(job.owner, job.account_id) or SubscriptionState(job.owner, job.account_id)
        now = utcnow()
        due = now + retry if retry is not None else None
        if due is not None:
            self._reindex(state, due, job.rearm)
        else:
            self._unindex(state, job.rearm)
        self._store.save(replace(state, due_at=due, failures=state.failures + 1, last_error=code))
        try:
            acc = self._accounts.get_account(job.owner, job.account_id)
            self._summary(acc, replace(acc.notifications, status=NOTIFY_FAILED))
        except ConnectorError:
            pass
        return "failed"

    def _retry_later(self, job: Job, e: ConnectorError) -> str:
        attempt = job.attempt + 1
        delay = max(1, round(backoff_delay(attempt)))
        if isinstance(e, ThrottledError):
            delay = max(delay, e.retry_after)
        if attempt >= MAX_TRANSIENT_ATTEMPTS or delay >= REARM.total_seconds():
            state = self._store.get(job.owner, job.account_id) or SubscriptionState(job.owner, job.account_id)
            self._reindex(state, utcnow() + GIVE_UP_RETRY, job.rearm)
            self._store.save(replace(state, due_at=utcnow() + GIVE_UP_RETRY, last_error=e.code))
            return "deferred"
        self._queue().send(replace(job, attempt=attempt).to_message(), visibility_timeout=delay)
        log.warning("notification job %s for %s failed transiently (%s); retry %d in %d s", job.kind, job.account_id,
                    e.code, attempt, delay)
        return "retry_scheduled"

    def _reindex(self, state: SubscriptionState, due: dt.datetime, rearm: str = "") -> None:
        self._index.put_row(state.owner, state.account_id, due)
        self._unindex(state, rearm, keep=bucket_of(due))

    def _unindex(self, state: SubscriptionState, rearm: str = "", *, keep: str = "") -> None:
        rk = row_key(state.owner, state.account_id)
        for bucket in {bucket_of(state.due_at) if state.due_at else "", rearm} - {"", keep}:
            self._index_table.delete_if_present(bucket, rk)


def _merge_lifecycle(held: Job | None, new: Job) -> Job:
    """Two lifecycle events of one subscription in one batch: the stronger event, a catch-up if either asks."""
    if held is None:
        return new
    first = held if _LIFECYCLE_RANK[held.event] <= _LIFECYCLE_RANK[new.event] else new
    return replace(first, catchup=held.catchup or new.catchup)


def _seen_key(mid: str) -> str:
    return hashlib.sha256(mid.encode()).hexdigest()[:48]


def _too_old(msg: dict[str, object], now: dt.datetime) -> bool:
    """Received before the de-duplication window (less a day of margin): never announced as new, since its
    de-duplication row may be gone already."""
    received = _parse_time(msg.get("receivedDateTime"))
    return received is not None and received < now - DEDUP_WINDOW + dt.timedelta(days=1)


def _parse_time(value: object) -> dt.datetime | None:
    try:
        return parse_iso(value) if isinstance(value, str) else None
    except ValueError:
        return None
