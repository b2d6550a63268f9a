"""Delivering mailbox events: a change Graph notifies becomes one signed webhook.

The queue worker's ``changes`` jobs (:meth:`NotificationDelivery.run`) read each message Graph named and
enqueue its event on the webhook queue, at least once, de-duplicated within
:data:`shared.notifications.DEDUP_WINDOW` (Graph may send a notification more than once):

* ``message.received`` (Inbox ``created``) and ``message.sent`` (Sent Items ``created``): by message id;
* ``message.updated`` (``updated``): by message id and ``changeKey``, which Exchange changes on every change of
  the item, so the same change notified twice is announced once and a new change is announced again;
* ``message.deleted`` (``deleted``): by message id, after Graph confirms the message is gone.

A key is *claimed* first (:meth:`shared.storage.Table.claim`), so of two workers only one announces it. The delta
catch-up (:meth:`NotificationDelivery.catch_up`) announces what notifications missed in each subscribed folder
through the same claims.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from shared import delta
from shared.accounts import ACTIVE, Account, AccountStore, iso, parse_iso, utcnow
from shared.errors import ConnectorError, MicrosoftError, NotFoundError
from shared.mail import TRACKING_PROPERTY
from shared.messages import WELL_KNOWN_FOLDERS
from shared.notifications import (
    BASELINE,
    CLAIM_STALE,
    DEDUP_WINDOW,
    DELETED,
    INBOX,
    LAST_EVENT_EVERY,
    RECEIVED,
    SENT,
    SENT_EVENT,
    SUMMARY_FIELDS,
    TRANSIENT,
    UPDATED,
    UPDATED_FIELDS,
    Feed,
    Job,
    bounded_categories,
    message_summary,
    parse_time,
    seen_key,
    too_old,
)
from shared.subscriptions import SubscriptionState
from shared.tokens import AccountTokenSource

if TYPE_CHECKING:
    from shared.graph import GraphClient, TokenSource
    from shared.sent_marks import SentMarks
    from shared.storage import Row, Table
    from shared.telemetry import Telemetry
    from shared.tokens import TokenManager
    from shared.webhooks import Webhooks

log = logging.getLogger("connector.notifications")

#: ``message.sent``: the summary and our trackingId property
#: (https://learn.microsoft.com/graph/api/singlevaluelegacyextendedproperty-get).
SENT_EXPAND = f"singleValueExtendedProperties($filter=id eq '{TRACKING_PROPERTY}')"
_JOB_ONLY = ("parentFolderId", "changeKey", "flag", "categories")  # in a rich job's summary, not in the event's
FOLDER_CACHE_MAX = 10_000  # mailboxes whose well-known folder ids a worker process remembers
# A rich created job needs the account only to know it is still connected and active: that answer is reused for
# this long by a worker process (one table read per account and 30 s, not per event). A disconnect or a dead
# grant is therefore seen up to this late, like an event already queued when it happened.
ACCOUNT_REUSE_S = 30.0
ACCOUNT_CACHE_MAX = 10_000


class NotificationDelivery:
    def __init__(self, *, graph: GraphClient, tokens: TokenManager, accounts: AccountStore, seen: Table,
                 webhooks: Webhooks, telemetry: Telemetry, sent_marks: SentMarks | None = None) -> None:
        self._graph = graph
        self._tokens = tokens
        self._accounts = accounts
        self._seen = seen
        self._webhooks = webhooks
        self._telemetry = telemetry  # connector.notification.lag (docs/operations.md)
        self._sent_marks = sent_marks  # rich message.sent: the origin without a Graph read
        self._folders: dict[str, dict[str, str]] = {}  # mailbox → {folder id: well-known name}
        self._folders_lock = threading.Lock()
        self._recent: dict[str, tuple[Account, float]] = {}  # account id → (account, reusable until)
        self._recent_lock = threading.Lock()

    def run(self, job: Job) -> str:
        """A ``changes`` job: the hot path needs only the account (one read; none for a rich created job whose
        account was read in the last :data:`ACCOUNT_REUSE_S`, since it makes no Graph call)."""
        graph_free = (job.change == "created" and all(m in job.resources for m in job.ids)
                      and (job.feed == INBOX or self._sent_marks is not None))
        try:
            acc = self._recent_account(job) if graph_free else self._accounts.get_account(job.owner, job.account_id)
        except NotFoundError:
            return "gone"  # disconnected: its rows went with it
        if acc.status != ACTIVE:  # reauth_required: a re-connect catches up what arrives meanwhile
            return "inactive"
        if not self._webhooks.enabled:  # WEBHOOK_URL unset: nobody to tell, so nothing is read or claimed
            return "no_receiver"
        token = AccountTokenSource(self._tokens, acc)
        now = utcnow()
        given = job.resources  # a rich notification's data: no Graph read for it
        if job.change == "updated":
            sent = sum(self._updated(acc, token, mid, now, given.get(mid)) for mid in job.ids)
        elif job.change == "deleted":
            sent = sum(self._deleted(acc, token, mid) for mid in job.ids)
        else:
            sent = sum(self._created(acc, token, job.feed, mid, now, given.get(mid)) for mid in job.ids)
        if sent:
            self._note_event(token.account, now)
        return "delivered" if sent else "duplicate"

    def _recent_account(self, job: Job) -> Account:
        now = time.monotonic()
        with self._recent_lock:
            hit = self._recent.get(job.account_id)
        if hit is not None and hit[1] > now and hit[0].owner == job.owner:
            return hit[0]
        acc = self._accounts.get_account(job.owner, job.account_id)
        self._remember(acc, now + ACCOUNT_REUSE_S)
        return acc

    def _remember(self, acc: Account, until: float | None = None) -> None:
        with self._recent_lock:
            if until is None:  # a newer copy of a remembered account (lastEventAt written)
                if acc.id not in self._recent:
                    return
                until = self._recent[acc.id][1]
            if len(self._recent) >= ACCOUNT_CACHE_MAX:
                self._recent.clear()
            self._recent[acc.id] = (acc, until)

    # -- one message each --------------------------------------------------------------------------
    def _created(self, acc: Account, token: TokenSource, feed: str, mid: str, now: dt.datetime,
                 given: dict[str, object] | None = None) -> int:
        """``message.received`` (Inbox) or ``message.sent`` (Sent Items) of a created message. A message Graph sent
        the summary of (rich notifications) is not read: a sent one's origin comes from :mod:`shared.sent_marks`
        (our trackingId is an extended property, which Graph returns only through ``$expand``, not in resource
        data); without marks (rich notifications turned on just now) it is read once."""
        key = mid if feed == INBOX else f"{feed}|{mid}"
        if not self._claim(acc.id, key):
            return 0
        summarized = given is not None and (feed == INBOX or self._sent_marks is not None)
        tracking: str | None = None
        try:
            msg = given if summarized else self._read(acc, token, mid, sent=feed == SENT)
            if feed == SENT and msg is not None:
                tracking = (self._sent_marks.tracking_id(acc.id, mid) if summarized and self._sent_marks is not None
                            else _tracking_id(msg))
        except Exception:
            self._release(acc.id, key)
            raise
        if msg is None:
            self._mark(acc.id, key, "gone")  # deleted or moved before we looked: nothing to announce
            return 0
        if too_old(msg, now):  # e.g. old mail moved back into the Inbox: not new mail
            self._mark(acc.id, key, "old")
            return 0
        return self._emit(acc, key, msg, event=SENT_EVENT if feed == SENT else RECEIVED, summarized=summarized,
                          tracking=tracking)

    def _updated(self, acc: Account, token: TokenSource, mid: str, now: dt.datetime,
                 given: dict[str, object] | None = None) -> int:
        """``message.updated``: the message as it is now (as Graph sent it, or read), once per ``changeKey``."""
        msg = given if given is not None else self._get(acc, token, mid, {"$select": ",".join(UPDATED_FIELDS)})
        if msg is None:
            return 0  # deleted since: its deletion is its own event
        key = f"updated|{mid}|{msg.get('changeKey') or ''}"
        if not self._claim(acc.id, key):
            return 0
        return self._emit(acc, key, msg, event=UPDATED, folders=self._folder_names(acc, token),
                          summarized=msg is given)

    def _deleted(self, acc: Account, token: TokenSource, mid: str) -> int:
        """``message.deleted``, once Graph confirms the message is gone (a notification is not proof enough:
        it may be late, or name a message restored since)."""
        key = f"deleted|{mid}"
        if not self._claim(acc.id, key):
            return 0
        try:
            still_there = self._get(acc, token, mid, {"$select": "id"}) is not None
        except Exception:
            self._release(acc.id, key)
            raise
        if still_there:
            self._release(acc.id, key)
            return 0
        return self._emit(acc, key, {"id": mid}, event=DELETED)

    def _read(self, acc: Account, token: TokenSource, mid: str, *, sent: bool) -> dict[str, object] | None:
        params = {"$select": ",".join(SUMMARY_FIELDS)}
        if sent:
            params["$expand"] = SENT_EXPAND
        return self._get(acc, token, mid, params)

    def _get(self, acc: Account, token: TokenSource, mid: str, params: dict[str, str]) -> dict[str, object] | None:
        """The message, or None when Graph no longer has it."""
        try:
            return self._graph.get_json(f"me/messages/{mid}", mailbox=acc.mailbox_key, token=token, params=params)
        except MicrosoftError as e:
            if e.code == "message_not_found":
                return None
            raise

    def _folder_names(self, acc: Account, token: TokenSource) -> dict[str, str]:
        """{folder id: well-known name} of the mailbox, read once per worker process (folder ids do not change).
        https://learn.microsoft.com/graph/api/resources/mailfolder#well-known-folder-names"""
        with self._folders_lock:
            known = self._folders.get(acc.mailbox_key)
        if known is not None:
            return known
        names: dict[str, str] = {}
        for name in WELL_KNOWN_FOLDERS:
            try:
                folder = self._graph.get_json(f"me/mailFolders/{name}", mailbox=acc.mailbox_key, token=token,
                                              params={"$select": "id"})
            except MicrosoftError as e:
                if e.status == 404:
                    continue  # e.g. no archive folder in this mailbox
                raise
            if isinstance(folder.get("id"), str):
                names[str(folder["id"])] = name
        with self._folders_lock:
            if len(self._folders) >= FOLDER_CACHE_MAX:
                self._folders.clear()
            self._folders[acc.mailbox_key] = names
        return names

    # -- catch-up ----------------------------------------------------------------------------------
    def catch_up(self, acc: Account, token: TokenSource, feed: Feed, state: SubscriptionState,
                 now: dt.datetime) -> SubscriptionState:
        """A delta round of the feed's folder from the saved link (the mailbox-wide feed has no folder and
        no delta). Without a link (first sync, or Graph forgot it) a new round starts: it lists the folder's
        last day as a baseline and announces only what arrived after ``after`` (the connect, or the last
        complete sync)."""
        if not feed.folder:
            return state
        if state.delta_synced_at is not None:
            after = state.delta_synced_at - dt.timedelta(minutes=10)
        else:
            after = acc.connected_at if now - acc.connected_at < dt.timedelta(hours=1) else now

        announced = [0]

        def announcer(fresh: bool) -> Callable[[dict[str, object]], None]:
            def announce(item: dict[str, object]) -> None:
                received = parse_time(item.get("receivedDateTime"))
                if not fresh or received is None or received >= after:
                    announced[0] += self._announce(acc, token, feed, item, now)
            return announce

        since = min(after, now) - BASELINE
        try:
            result = delta.catch_up(self._graph, token, acc.mailbox_key, link=state.delta_link, since=since,
                                    folder=feed.folder, on_message=announcer(not state.delta_link))
        except delta.DeltaExpiredError:
            result = delta.catch_up(self._graph, token, acc.mailbox_key, link="", since=since, folder=feed.folder,
                                    on_message=announcer(True))
        if announced[0]:
            self._note_event(acc, now)
        return replace(state, delta_link=result.link,
                       delta_synced_at=now if result.complete else state.delta_synced_at)

    def _announce(self, acc: Account, token: TokenSource, feed: Feed, item: dict[str, object],
                  now: dt.datetime) -> int:
        """A message found by delta: announced unless already announced (or too old to be new)."""
        mid = str(item["id"])
        if too_old(item, now):
            return 0
        if feed.name == SENT:  # the origin needs our property, which a delta page does not carry
            return self._created(acc, token, SENT, mid, now)
        return self._emit(acc, mid, item, event=RECEIVED, source="catch_up") if self._claim(acc.id, mid) else 0

    # -- emitting ----------------------------------------------------------------------------------
    def _emit(self, acc: Account, key: str, msg: dict[str, object], *, event: str, source: str = "notification",
              folders: dict[str, str] | None = None, summarized: bool = False, tracking: str | None = None) -> int:
        """Enqueue the event (``summarized``: ``msg`` is a job's summary already, not Graph's message;
        ``tracking``: a ``message.sent``'s trackingId when this API sent it). A message the queue refuses (not a
        transient failure) is marked ``rejected`` and skipped, so it can never stop a catch-up; a transient
        failure releases the claim."""
        try:
            if self._enqueue(acc, msg, event, folders, summarized, tracking) is None:
                self._release(acc.id, key)  # webhooks off: nothing was announced
                return 0
        except TRANSIENT:
            self._release(acc.id, key)
            raise
        except Exception as e:
            self._mark(acc.id, key, "rejected")
            log.error(json.dumps({"event": "notifications.rejected", "accountId": acc.id,
                                  "reason": e.code if isinstance(e, ConnectorError) else type(e).__name__}))
            return 0
        self._mark(acc.id, key, "sent")
        received = parse_time(msg.get("receivedDateTime"))
        if received is not None and event in (RECEIVED, SENT_EVENT):
            self._telemetry.notification_lag((dt.datetime.now(dt.UTC) - received).total_seconds(), source=source)
        return 1

    def _enqueue(self, acc: Account, msg: dict[str, object], event: str, folders: dict[str, str] | None,
                 summarized: bool, tracking: str | None) -> str | None:
        if event == DELETED:
            return self._webhooks.enqueue_message_event(event, acc.id, {"id": msg["id"]})
        summary = ({k: v for k, v in msg.items() if k not in _JOB_ONLY} if summarized else message_summary(msg))
        if event == UPDATED:
            folder = str(msg.get("parentFolderId") or "")
            summary.update({"folder": (folders or {}).get(folder, folder), "flag": _flag(msg.get("flag")),
                            "categories": bounded_categories(msg.get("categories"))})
        if event == SENT_EVENT:
            return self._webhooks.enqueue_message_event(event, acc.id, summary, origin="api" if tracking else "mailbox",
                                                        trackingId=tracking)
        return self._webhooks.enqueue_message_event(event, acc.id, summary)

    def _claim(self, account_id: str, mid: str) -> bool:
        """Claim a de-duplication key (a message id, or a change of it) for announcing; False when it is (being)
        announced already. A claim whose
        worker died before announcing (``claimed`` for :data:`CLAIM_STALE`) is taken over. The claim's time
        is the clock's, not the job's start, so a long job's fresh claim never looks abandoned."""
        now = utcnow()
        row = {"PartitionKey": account_id, "RowKey": seen_key(mid), "state": "claimed", "at": iso(now),
               "expiresAt": iso(now + DEDUP_WINDOW)}

        def abandoned(current: Row) -> bool:
            at = parse_iso(current.get("at"))
            return current.get("state") == "claimed" and (at is None or at <= now - CLAIM_STALE)

        return self._seen.claim(row, take_over=abandoned).held

    def _mark(self, account_id: str, mid: str, state: str) -> None:
        self._seen.merge({"PartitionKey": account_id, "RowKey": seen_key(mid), "state": state})

    def _release(self, account_id: str, mid: str) -> None:
        try:
            self._seen.delete_if_present(account_id, seen_key(mid))
        except ConnectorError:
            pass  # the claim goes stale and is taken over after CLAIM_STALE

    def _note_event(self, acc: Account, now: dt.datetime) -> None:
        last = acc.notifications.last_event_at
        if last is not None and now - last < LAST_EVENT_EVERY:
            return
        try:  # best effort, and only lastEventAt: this copy's status may be stale (pending → active meanwhile)
            self._remember(self._accounts.set_last_event(acc, now))
        except ConnectorError as e:
            log.debug("lastEventAt of %s not written: %s", acc.id, e.code)


def _flag(value: object) -> dict[str, object]:
    """``flag.flagStatus`` and its dates (https://learn.microsoft.com/graph/api/resources/followupflag)."""
    if not isinstance(value, dict):
        return {"flagStatus": "notFlagged"}
    out: dict[str, object] = {"flagStatus": str(value.get("flagStatus") or "notFlagged")}
    for k in ("startDateTime", "dueDateTime", "completedDateTime"):
        when = value.get(k)
        if isinstance(when, dict) and isinstance(when.get("dateTime"), str):
            out[k] = {"dateTime": when["dateTime"][:40], "timeZone": str(when.get("timeZone") or "UTC")[:64]}
    return out


def _tracking_id(msg: dict[str, object]) -> str | None:
    """Our trackingId property on the message, if this API sent it."""
    props = msg.get("singleValueExtendedProperties")
    for p in props if isinstance(props, list) else []:
        if isinstance(p, dict) and str(p.get("id", "")).lower() == TRACKING_PROPERTY.lower():
            value = p.get("value")
            return value[:128] if isinstance(value, str) and value else None
    return None
