"""Delivering inbound mail: a created message becomes one signed ``message.received`` webhook.

The queue worker's ``changes`` jobs (:meth:`NotificationDelivery.run`) read each message's summary and
enqueue ``message.received`` on the webhook queue, at least once, de-duplicated by message id within
:data:`shared.notifications.DEDUP_WINDOW` (Graph may send a notification more than once): a message id is
*claimed* first (:meth:`shared.storage.Table.claim`), so of two workers only one announces it. The delta
catch-up (:meth:`NotificationDelivery.catch_up`) announces what notifications missed through the same claim.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from shared import delta
from shared.accounts import ACTIVE, Account, AccountStore, iso, parse_iso, utcnow
from shared.errors import ConnectorError, MicrosoftError, NotFoundError
from shared.notifications import (
    BASELINE,
    CLAIM_STALE,
    DEDUP_WINDOW,
    LAST_EVENT_EVERY,
    TRANSIENT,
    Job,
    message_summary,
    parse_time,
    seen_key,
    too_old,
)
from shared.subscriptions import SubscriptionState
from shared.tokens import AccountTokenSource

if TYPE_CHECKING:
    from shared.graph import GraphClient, TokenSource
    from shared.storage import Row, Table
    from shared.telemetry import Telemetry
    from shared.tokens import TokenManager
    from shared.webhooks import Webhooks

log = logging.getLogger("connector.notifications")


class NotificationDelivery:
    def __init__(self, *, graph: GraphClient, tokens: TokenManager, accounts: AccountStore, seen: Table,
                 webhooks: Webhooks, telemetry: Telemetry) -> None:
        self._graph = graph
        self._tokens = tokens
        self._accounts = accounts
        self._seen = seen
        self._webhooks = webhooks
        self._telemetry = telemetry  # connector.notification.lag (docs/operations.md)

    def run(self, job: Job) -> str:
        """A ``changes`` job: the hot path needs only the account (one read)."""
        try:
            acc = self._accounts.get_account(job.owner, job.account_id)
        except NotFoundError:
            return "gone"  # disconnected: its rows went with it
        if acc.status != ACTIVE:  # reauth_required: a re-connect catches up what arrives meanwhile
            return "inactive"
        return self._deliver_changes(acc, job)

    def _deliver_changes(self, acc: Account, job: Job) -> str:
        if not self._webhooks.enabled:  # WEBHOOK_URL unset: nobody to tell, so nothing is read or claimed
            return "no_receiver"
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
            if too_old(msg, now):  # e.g. old mail moved back into the Inbox: not new mail
                self._mark(acc.id, mid, "old")
                continue
            sent += self._emit(acc, mid, msg)
        if sent:
            self._note_event(token.account, now)
        return "delivered" if sent else "duplicate"

    def catch_up(self, acc: Account, token: TokenSource, state: SubscriptionState,
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
                received = parse_time(item.get("receivedDateTime"))
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

    def _announce(self, acc: Account, item: dict[str, object], now: dt.datetime) -> int:
        """A message found by delta: announced unless already announced (or too old to be new)."""
        mid = str(item["id"])
        if too_old(item, now):
            return 0
        return self._emit(acc, mid, item, source="catch_up") if self._claim(acc.id, mid) else 0

    def _emit(self, acc: Account, mid: str, msg: dict[str, object], *, source: str = "notification") -> int:
        """Enqueue ``message.received``. A message the queue refuses (not a transient failure) is marked
        ``rejected`` and skipped, so it can never stop a catch-up; a transient failure releases the claim."""
        try:
            if self._webhooks.enqueue_message_received(acc.id, message_summary(msg)) is None:
                self._release(acc.id, mid)  # webhooks off: nothing was announced
                return 0
        except TRANSIENT:
            self._release(acc.id, mid)
            raise
        except Exception as e:
            self._mark(acc.id, mid, "rejected")
            log.error(json.dumps({"event": "notifications.rejected", "accountId": acc.id,
                                  "reason": e.code if isinstance(e, ConnectorError) else type(e).__name__}))
            return 0
        self._mark(acc.id, mid, "sent")
        received = parse_time(msg.get("receivedDateTime"))
        if received is not None:
            self._telemetry.notification_lag((dt.datetime.now(dt.UTC) - received).total_seconds(), source=source)
        return 1

    def _claim(self, account_id: str, mid: str) -> bool:
        """Claim a message id for announcing; False when it is (being) announced already. A claim whose
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
            self._accounts.set_last_event(acc, now)
        except ConnectorError as e:
            log.debug("lastEventAt of %s not written: %s", acc.id, e.code)
