"""Graph subscriptions of connected accounts: create, renew, reauthorize, recreate, delete.

Each active account has one subscription on its Inbox, made in the background on connect, re-connect
and recovery (:meth:`SubscriptionLifecycle.on_connected`) and deleted on disconnect. The queue worker's
``ensure``, ``maintain``, ``lifecycle`` and ``disable`` jobs run here (:meth:`SubscriptionLifecycle.run`):

* **Renewal at scale**: a due-time index (:class:`shared.due_index.DueIndex` over ``subscriptionindex``)
  brings each subscription back before it expires and for the safety catch-up; a timer run reads only
  due rows.
* **Nothing lost**: a catch-up (:meth:`shared.notification_delivery.NotificationDelivery.catch_up`) after a
  ``missed`` lifecycle event, after ``subscriptionRemoved`` (a new subscription first, the old one deleted),
  after a re-connect and on the maintenance timer; ``reauthorizationRequired`` → ``/reauthorize``
  (https://learn.microsoft.com/graph/change-notifications-lifecycle-events).
* **Failures are classified like refresh failures** (:mod:`shared.refresh`): a dead grant → the account is
  ``reauth_required`` (TokenManager) and notifications ``failed`` until it is re-connected; throttling,
  Graph or storage unavailable → retried later with backoff; anything else → ``failed``, retried hourly.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from shared import subscriptions
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
    utcnow,
)
from shared.backoff import backoff_delay
from shared.due_index import REARM, DueIndex, bucket_of
from shared.errors import (
    ConnectorError,
    MicrosoftError,
    NotFoundError,
    ReauthRequiredError,
    ThrottledError,
    UpstreamUnavailableError,
)
from shared.notifications import (
    CATCHUP_EVERY,
    GIVE_UP_RETRY,
    MAX_TRANSIENT_ATTEMPTS,
    RENEW_BEFORE,
    Job,
    NotificationConfig,
)
from shared.subscriptions import IMMUTABLE_IDS, SubscriptionGoneError, SubscriptionState, SubscriptionStore
from shared.tokens import AccountTokenSource

if TYPE_CHECKING:
    from shared.graph import GraphClient, TokenSource
    from shared.notification_delivery import NotificationDelivery
    from shared.storage import Queue, Table
    from shared.tokens import TokenManager

log = logging.getLogger("connector.notifications")
DISCONNECT_WAIT_S = 25.0  # Graph validates both notification URLs (10 s each) before it answers a creation


class SubscriptionLifecycle:
    def __init__(self, config: NotificationConfig, *, graph: GraphClient, tokens: TokenManager,
                 accounts: AccountStore, store: SubscriptionStore, index: DueIndex, queue: Callable[[], Queue],
                 delivery: NotificationDelivery) -> None:
        self.config = config
        self._graph = graph
        self._tokens = tokens
        self._accounts = accounts
        self._store = store
        self._index = index
        self._queue = queue
        self._delivery = delivery

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    # -- account hooks --------------------------------------------------------------------------
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
        subscription left behind expires by itself within days.

        It first waits (briefly) for a creation in flight: holding the creation claim, it sees every
        subscription that creation made, and no creator writes rows back after it."""
        self._wait_for_creation(account)
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

    def _wait_for_creation(self, account: Account) -> None:
        """Take the account's creation claim (kept: the rows' deletion removes it), waiting up to
        :data:`DISCONNECT_WAIT_S` for a worker that is creating a subscription now."""
        deadline = time.monotonic() + DISCONNECT_WAIT_S
        while True:
            try:
                if self._store.claim_creation(account.owner, account.id) is not None:
                    return
            except ConnectorError:
                return  # storage trouble: go on; the deletion below says what it could not do
            if time.monotonic() > deadline:
                log.warning("a subscription of %s is still being created; disconnecting anyway", account.id)
                return
            time.sleep(0.2)  # the creator holds the claim for one Graph call (validation included)

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

    def enqueue_due(self, now: dt.datetime | None = None) -> dict[str, int]:
        """Maintenance timer: every due index row becomes a ``maintain`` job (renewal, safety catch-up)."""
        if not self.enabled:
            return {"read": 0, "enqueued": 0}
        read, due, rearm = self._index.take_due(now or utcnow())
        for d in due:
            self._queue().send(Job("maintain", d.owner, d.account_id, rearm=rearm).to_message())
        log.info(json.dumps({"event": "notifications.enqueued", "indexRowsRead": read, "enqueued": len(due)}))
        return {"read": read, "enqueued": len(due)}

    # -- the worker's jobs -----------------------------------------------------------------------
    def run(self, job: Job) -> str:
        """An ``ensure``, ``maintain``, ``lifecycle`` or ``disable`` job."""
        loaded = self._load(job)
        if isinstance(loaded, str):
            return loaded
        acc, state = loaded
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
            state = self._delivery.catch_up(acc, token, state, now)
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
        return acc, self._store.get(job.owner, job.account_id) or SubscriptionState(job.owner, job.account_id)

    def _on_lifecycle(self, acc: Account, token: TokenSource, state: SubscriptionState, job: Job,
                      now: dt.datetime) -> SubscriptionState:
        """One job per subscription and batch (:func:`_merge_lifecycle`): at most one catch-up however
        many lifecycle notifications the batch carried."""
        event = job.event
        if event == "reauthorizationRequired":
            try:
                subscriptions.reauthorize(self._graph, token, acc.mailbox_key, state.subscription_id)
                return self._delivery.catch_up(acc, token, state, now) if job.catchup else state
            except SubscriptionGoneError:
                event = "subscriptionRemoved"
        if event == "subscriptionRemoved":
            # Deleted first: a removal Graph did not send (a forged or replayed notification) must not leave
            # the old subscription live beside the new one. Gone already is the normal case.
            state = self._replace(acc, token, state, now)  # recreate, then catch up
        return self._delivery.catch_up(acc, token, state, now)

    def _replace(self, acc: Account, token: TokenSource, state: SubscriptionState,
                 now: dt.datetime) -> SubscriptionState:
        """Delete the subscription at Graph (gone already is fine), then create a new one."""
        try:
            subscriptions.delete(self._graph, token, acc.mailbox_key, state.subscription_id)
        except (ThrottledError, ReauthRequiredError):
            raise
        except MicrosoftError as e:  # e.g. refused: it was not ours to delete; a new one is needed anyway
            log.warning("subscription of %s not deleted before its replacement (%s)", acc.id, e.code)
        return self._create(acc, token, state, now)

    def _subscribe(self, acc: Account, token: TokenSource, state: SubscriptionState, now: dt.datetime, *,
                   force: bool) -> SubscriptionState:
        """Renew (which also reauthorizes) when forced or due; create when there is none or Graph lost it.
        A subscription made before immutable ids is replaced: Graph keeps the id type a subscription was
        created with (https://learn.microsoft.com/graph/outlook-immutable-id)."""
        if state.subscription_id and state.id_type != IMMUTABLE_IDS:
            return self._replace(acc, token, state, now)
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
        return self._store.save(replace(state, subscription_id=sid, client_key=key, expires_at=expires,
                                        id_type=IMMUTABLE_IDS))

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

    def _summary(self, acc: Account, summary: NotificationSummary) -> None:
        if summary == acc.notifications:
            return
        try:  # best effort: the account JSON's view of what the state rows say
            self._accounts.set_notifications(acc, summary)
        except ConnectorError as e:
            log.debug("notifications summary of %s not written: %s", acc.id, e.code)

    # -- failures and the index -------------------------------------------------------------------
    def failed(self, job: Job, code: str, *, retry: dt.timedelta | None) -> str:
        """A job failed for good (or a dead grant, ``retry`` None): status ``failed``; retried via the index."""
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

    def retry_later(self, job: Job, e: ConnectorError) -> str:
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
        self._index.move_row(state.owner, state.account_id, due, stale={_bucket(state), rearm})

    def _unindex(self, state: SubscriptionState, rearm: str = "") -> None:
        self._index.move_row(state.owner, state.account_id, None, stale={_bucket(state), rearm})

class SubscriptionReconciler:
    """Daily: subscribe active accounts that have none (existing accounts, lost jobs), re-create lost index
    rows, turn everything off when disabled, forget old de-duplication rows."""

    def __init__(self, *, enabled: bool, accounts: AccountStore, store: SubscriptionStore, index: DueIndex,
                 seen: Table, queue: Callable[[], Queue]) -> None:
        self.enabled = enabled
        self._accounts = accounts
        self._store = store
        self._index = index
        self._seen = seen
        self._queue = queue

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
            self._index.move_row(s.owner, s.account_id, None, stale={_bucket(s)})
            self._store.delete(s)
            return 0
        if self.enabled or not s.subscription_id:
            return 0  # reauth_required: keep the delta link for the catch-up after recovery
        self._queue().send(Job("disable", owner, account_id).to_message())
        return 1


def _bucket(state: SubscriptionState) -> str:
    return bucket_of(state.due_at) if state.due_at else ""

