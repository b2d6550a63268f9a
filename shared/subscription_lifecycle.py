"""Graph subscriptions of connected accounts: create, renew, reauthorize, recreate, delete.

Each active account has one subscription per feed ``MAIL_EVENTS`` needs (:func:`shared.notifications.feeds_for`:
Inbox, Sent Items, mailbox-wide changes), made in the background on connect, re-connect and recovery
(:meth:`SubscriptionLifecycle.on_connected`) and deleted on disconnect; a feed no longer configured is deleted
at its next maintenance. The queue worker's
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
from collections.abc import Callable, Iterable
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
    FEED_NAMES,
    GIVE_UP_RETRY,
    INBOX,
    MAX_TRANSIENT_ATTEMPTS,
    RENEW_BEFORE,
    RICH_RENEW_BEFORE,
    Feed,
    Job,
    NotificationConfig,
)
from shared.subscriptions import IMMUTABLE_IDS, SubscriptionGoneError, SubscriptionState, SubscriptionStore
from shared.tokens import AccountTokenSource

if TYPE_CHECKING:
    from shared.graph import GraphClient, TokenSource
    from shared.notification_delivery import NotificationDelivery
    from shared.rich_notifications import EncryptionCertificate, NotificationCertificates
    from shared.storage import Queue, Table
    from shared.tokens import TokenManager

log = logging.getLogger("connector.notifications")
DISCONNECT_WAIT_S = 25.0  # Graph validates both notification URLs (10 s each) before it answers a creation


class SubscriptionLifecycle:
    def __init__(self, config: NotificationConfig, *, graph: GraphClient, tokens: TokenManager,
                 accounts: AccountStore, store: SubscriptionStore, index: DueIndex, queue: Callable[[], Queue],
                 delivery: NotificationDelivery, certificates: NotificationCertificates | None = None) -> None:
        self.config = config
        self._certificates = certificates  # rich notifications (config.rich)
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
        """Connect, re-connect or recovery: the subscriptions are (re)made in the background; after a
        re-connect the folders are caught up. Never raises (the connect has succeeded)."""
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
        """The account is about to be deleted: delete its Graph subscriptions while the grant still exists
        (one token refresh allowed), then our rows. Never raises: the deletion goes on regardless, and a
        subscription left behind expires by itself within days.

        It first waits (briefly) for creations in flight: holding the creation claims, it sees every
        subscription those creations made, and no creator writes rows back after it."""
        self._wait_for_creation(account)
        try:
            states = self._store.states_of(account.owner, account.id)
        except ConnectorError as e:
            log.warning("subscriptions of disconnected %s not deleted (%s); they expire by themselves", account.id,
                        e.code)
            return
        try:  # every subscription the account has, not only the state rows' (a crashed creation left one)
            pointers = self._store.pointers_of(account.owner, account.id)
        except ConnectorError as e:
            log.warning("subscriptions of disconnected %s not listed (%s)", account.id, e.code)
            pointers = []
        sids = ({sid for _, sid in pointers} | {s.subscription_id for s in states.values()}) - {""}
        if not states and not pointers:
            return
        token = AccountTokenSource(self._tokens, account)
        for sid in sorted(sids):
            try:
                subscriptions.delete(self._graph, token, account.mailbox_key, sid)
            except Exception as e:
                log.warning("subscription of disconnected %s not deleted (%s); it expires by itself", account.id,
                            e.code if isinstance(e, ConnectorError) else type(e).__name__)
        try:
            self._unindex(account.owner, account.id, states)
            self._store.delete_account(account.owner, account.id, states=states.values(),
                                       keys={key for key, _ in pointers})
        except ConnectorError as e:
            log.warning("rows of disconnected %s not deleted (%s); the daily reconciliation will", account.id, e.code)

    def _wait_for_creation(self, account: Account) -> None:
        """Take every feed's creation claim (kept: the rows' deletion removes them), waiting up to
        :data:`DISCONNECT_WAIT_S` for a worker that is creating a subscription now."""
        deadline = time.monotonic() + DISCONNECT_WAIT_S
        for feed in FEED_NAMES:
            while True:
                try:
                    if self._store.claim_creation(account.owner, account.id, feed) is not None:
                        break
                except ConnectorError:
                    return  # storage trouble: go on; the deletion below says what it could not do
                if time.monotonic() > deadline:
                    log.warning("a subscription of %s is still being created; disconnecting anyway", account.id)
                    return
                time.sleep(0.2)  # the creator holds the claim for one Graph call (validation included)

    def check(self, account: Account) -> tuple[bool, str, str | None]:
        """The diagnose check: (ok, detail, hint)."""
        n = account.notifications
        feeds = ", ".join(f.name for f in self.config.feeds)
        if not self.enabled:
            return True, "Mailbox notifications are off (NOTIFICATIONS_ENABLED).", None
        if n.status == NOTIFY_ACTIVE and n.expires_at is not None and n.expires_at > utcnow():
            return True, (f"Subscribed ({feeds}) until {iso(n.expires_at)}; last event {iso(n.last_event_at)}."), None
        if n.status == NOTIFY_PENDING:
            return True, f"The subscriptions ({feeds}) are being created.", None
        states = self._store.states_of(account.owner, account.id)
        errors = sorted({s.last_error for s in states.values() if s.last_error})
        why = f" (last error: {', '.join(errors)})" if errors else ""
        return False, f"No live subscriptions: status {n.status}{why}.", (
            "Graph must reach PUBLIC_BASE_URL over https for /api/notifications/microsoft; the connector retries "
            "hourly, and a re-connect subscribes again. Messages that arrive meanwhile are caught up by delta.")

    def enqueue_due(self, now: dt.datetime | None = None) -> dict[str, int]:
        """Maintenance timer: every due index row becomes a ``maintain`` job (renewal, safety catch-up)."""
        if not self.enabled:
            return {"read": 0, "enqueued": 0}
        read, due, rearm = self._index.take_due(now or utcnow())
        self._queue().send_all([Job("maintain", d.owner, d.account_id, rearm=rearm).to_message() for d in due])
        log.info(json.dumps({"event": "notifications.enqueued", "indexRowsRead": read, "enqueued": len(due)}))
        return {"read": read, "enqueued": len(due)}

    # -- the worker's jobs -----------------------------------------------------------------------
    def run(self, job: Job) -> str:
        """An ``ensure``, ``maintain``, ``lifecycle`` or ``disable`` job."""
        loaded = self._load(job)
        if isinstance(loaded, str):
            return loaded
        acc, states = loaded
        if job.kind == "disable":
            return self._disable(acc, states)
        if not self.enabled:
            return "disabled"
        token = AccountTokenSource(self._tokens, acc)
        now = utcnow()
        if job.kind == "lifecycle":
            state = next((s for s in states.values() if s.subscription_id == job.subscription_id), None)
            feed = self.config.feed(state.feed) if state is not None else None
            if state is None or feed is None:
                return "stale"
            states[feed.name] = self._on_lifecycle(acc, token, feed, state, job, now)
        else:
            for name in set(states) - {f.name for f in self.config.feeds}:  # MAIL_EVENTS no longer needs it
                self._drop_feed(acc, token, states.pop(name))
            for feed in self.config.feeds:
                state = states.get(feed.name) or SubscriptionState(acc.owner, acc.id, feed=feed.name)
                state = self._subscribe(acc, token, feed, state, now, force=job.kind == "ensure")
                states[feed.name] = self._delivery.catch_up(acc, token, feed, state, now)
        self._settle(token.account, states, now, rearm=job.rearm)
        return job.event or job.kind

    def _load(self, job: Job) -> tuple[Account, dict[str, SubscriptionState]] | str:
        try:
            acc = self._accounts.get_account(job.owner, job.account_id)
        except NotFoundError:
            states = self._store.states_of(job.owner, job.account_id)
            self._unindex(job.owner, job.account_id, states, job.rearm)
            if states:
                self._store.delete_account(job.owner, job.account_id, states=states.values())
            return "gone"
        if acc.status != ACTIVE:  # reauth_required: a re-connect subscribes again (on_connected)
            if job.rearm:
                self._unindex(job.owner, job.account_id, {}, job.rearm)
            return "inactive"
        return acc, self._store.states_of(job.owner, job.account_id)

    def _on_lifecycle(self, acc: Account, token: TokenSource, feed: Feed, state: SubscriptionState, job: Job,
                      now: dt.datetime) -> SubscriptionState:
        """One job per subscription and batch (:func:`_merge_lifecycle`): at most one catch-up however
        many lifecycle notifications the batch carried."""
        event = job.event
        if event == "reauthorizationRequired":
            try:
                subscriptions.reauthorize(self._graph, token, acc.mailbox_key, state.subscription_id)
                return self._delivery.catch_up(acc, token, feed, state, now) if job.catchup else state
            except SubscriptionGoneError:
                event = "subscriptionRemoved"
        if event == "subscriptionRemoved":
            # Deleted first: a removal Graph did not send (a forged or replayed notification) must not leave
            # the old subscription live beside the new one. Gone already is the normal case.
            state = self._replace(acc, token, feed, state, now)  # recreate, then catch up
        return self._delivery.catch_up(acc, token, feed, state, now)

    def _replace(self, acc: Account, token: TokenSource, feed: Feed, state: SubscriptionState,
                 now: dt.datetime) -> SubscriptionState:
        """Delete the subscription at Graph (gone already is fine), then create a new one."""
        try:
            subscriptions.delete(self._graph, token, acc.mailbox_key, state.subscription_id)
        except (ThrottledError, ReauthRequiredError):
            raise
        except MicrosoftError as e:  # e.g. refused: it was not ours to delete; a new one is needed anyway
            log.warning("subscription of %s not deleted before its replacement (%s)", acc.id, e.code)
        return self._create(acc, token, feed, state, now)

    def _drop_feed(self, acc: Account, token: TokenSource, state: SubscriptionState) -> None:
        if state.subscription_id:
            subscriptions.delete(self._graph, token, acc.mailbox_key, state.subscription_id)
        self._store.delete(state)

    def _subscribe(self, acc: Account, token: TokenSource, feed: Feed, state: SubscriptionState, now: dt.datetime,
                   *, force: bool) -> SubscriptionState:
        """Renew (which also reauthorizes) when forced or due; create when there is none or Graph lost it.
        A subscription made before immutable ids is replaced: Graph keeps the id type a subscription was
        created with (https://learn.microsoft.com/graph/outlook-immutable-id). So is one whose resource data setting
        or encryption certificate is not the current one: a new certificate version is used from the next renewal on
        (the old version still opens what Graph sends until the old subscription is gone)."""
        if state.subscription_id and (state.id_type != IMMUTABLE_IDS or self._outdated(state)):
            return self._replace(acc, token, feed, state, now)
        if state.subscription_id:
            if not force and state.expires_at is not None and state.expires_at - now > _renew_before(state):
                return state
            try:
                expires = subscriptions.renew(self._graph, token, acc.mailbox_key, state.subscription_id, now=now,
                                              rich=state.rich)
                return replace(state, expires_at=expires)
            except SubscriptionGoneError:
                pass
        return self._create(acc, token, feed, state, now)

    def _encryption(self) -> EncryptionCertificate | None:
        if not self.config.rich:
            return None
        if self._certificates is None:
            raise ConnectorError("Rich notifications are on but no certificate source is configured.",
                                 code="notification_certificate_missing")
        return self._certificates.current()

    def _outdated(self, state: SubscriptionState) -> bool:
        encryption = self._encryption()
        return state.rich != (encryption is not None) or (encryption is not None and state.cert_id != encryption.id)

    def _create(self, acc: Account, token: TokenSource, feed: Feed, state: SubscriptionState,
                now: dt.datetime) -> SubscriptionState:
        """A new subscription in place of ``state``'s (none, or one Graph lost), made by one worker at a time:
        concurrent jobs of one account (several connects at once) would each make one, and only the last
        would be remembered."""
        held = self._store.claim_creation(acc.owner, acc.id, feed.name)
        if held is None:
            raise UpstreamUnavailableError("Another worker is creating this account's subscription.",
                                           code="subscription_in_progress")
        try:
            stored = self._store.get(acc.owner, acc.id, feed.name)
            if stored is not None and stored.subscription_id and stored.subscription_id != state.subscription_id:
                return stored  # made while we waited for the claim: that one is the account's
            return self._create_claimed(acc, token, feed, stored or state, now)
        finally:
            try:
                self._store.release_creation(acc.owner, acc.id, held, feed.name)
            except ConnectorError:
                pass  # the claim goes stale and is taken over after CREATION_STALE

    def _create_claimed(self, acc: Account, token: TokenSource, feed: Feed, state: SubscriptionState,
                        now: dt.datetime) -> SubscriptionState:
        encryption = self._encryption()
        client_state, key = self._store.new_pointer(acc.owner, acc.id, feed.name)
        try:
            sid, expires = subscriptions.create(self._graph, token, acc.mailbox_key, feed, now=now,
                                                client_state=client_state,
                                                notification_url=self.config.notification_url,
                                                lifecycle_url=self.config.lifecycle_url, encryption=encryption)
        except Exception:
            self._store.drop_pointer(acc.owner, acc.id, key)
            raise
        self._store.bind_pointer(key, sid)
        if state.client_key and state.client_key != key:
            self._store.drop_pointer(acc.owner, acc.id, state.client_key)
        return self._store.save(replace(state, subscription_id=sid, client_key=key, expires_at=expires,
                                        id_type=IMMUTABLE_IDS, rich=encryption is not None,
                                        cert_id=encryption.id if encryption is not None else ""))

    def _settle(self, acc: Account, states: dict[str, SubscriptionState], now: dt.datetime, *, rearm: str) -> None:
        """Save the states, move the account's index row to the next maintenance (the earliest renewal of its
        feeds, or the safety catch-up), show the account as active."""
        expiries = [s.expires_at or now for s in states.values()] or [now]
        renewals = [(s.expires_at or now) - _renew_before(s) * (1 - 0.1 * random.random()) for s in states.values()]
        due = min([*renewals, now + CATCHUP_EVERY])
        self._reindex(acc.owner, acc.id, states, due, rearm)
        for s in states.values():
            self._store.save(replace(s, due_at=due, failures=0, last_error=""))
        self._summary(acc, NotificationSummary(NOTIFY_ACTIVE, min(expiries), acc.notifications.last_event_at))

    def _disable(self, acc: Account, states: dict[str, SubscriptionState]) -> str:
        token = AccountTokenSource(self._tokens, acc)
        for state in states.values():
            self._drop_feed(acc, token, state)
        self._unindex(acc.owner, acc.id, states)
        self._summary(acc, NotificationSummary(NOTIFY_OFF, None, acc.notifications.last_event_at))
        return "disabled"

    def _summary(self, acc: Account, summary: NotificationSummary) -> None:
        _write_summary(self._accounts, acc, summary)

    def _reindex(self, owner: str, account_id: str, states: dict[str, SubscriptionState], due: dt.datetime,
                 rearm: str = "") -> None:
        _move(self._index, owner, account_id, states, due, rearm)

    def _unindex(self, owner: str, account_id: str, states: dict[str, SubscriptionState], rearm: str = "") -> None:
        _move(self._index, owner, account_id, states, None, rearm)


class SubscriptionFailures:
    """A subscription job that failed (the queue worker's failure classes): retried with backoff, or status
    ``failed`` with the next attempt in the due-time index."""

    def __init__(self, config: NotificationConfig, *, accounts: AccountStore, store: SubscriptionStore,
                 index: DueIndex, queue: Callable[[], Queue]) -> None:
        self.config = config
        self._accounts = accounts
        self._store = store
        self._index = index
        self._queue = queue

    def _states_for_bookkeeping(self, job: Job) -> dict[str, SubscriptionState]:
        """The account's feed states (the first configured feed's, new, when it has none): where a failure and
        the next due time are written."""
        states = self._store.states_of(job.owner, job.account_id)
        if not states:
            first = self.config.feeds[0].name if self.config.feeds else INBOX
            states = {first: SubscriptionState(job.owner, job.account_id, feed=first)}
        return states

    def failed(self, job: Job, code: str, *, retry: dt.timedelta | None) -> str:
        """A job failed for good (or a dead grant, ``retry`` None): status ``failed``; retried via the index."""
        states = self._states_for_bookkeeping(job)
        now = utcnow()
        due = now + retry if retry is not None else None
        _move(self._index, job.owner, job.account_id, states, due, job.rearm)
        for state in states.values():
            self._store.save(replace(state, due_at=due, failures=state.failures + 1, last_error=code))
        try:
            acc = self._accounts.get_account(job.owner, job.account_id)
            _write_summary(self._accounts, acc, replace(acc.notifications, status=NOTIFY_FAILED))
        except ConnectorError:
            pass
        return "failed"

    def retry_later(self, job: Job, e: ConnectorError) -> str:
        attempt = job.attempt + 1
        delay = max(1, round(backoff_delay(attempt)))
        if isinstance(e, ThrottledError):
            delay = max(delay, e.retry_after)
        if attempt >= MAX_TRANSIENT_ATTEMPTS or delay >= REARM.total_seconds():
            states = self._states_for_bookkeeping(job)
            due = utcnow() + GIVE_UP_RETRY
            _move(self._index, job.owner, job.account_id, states, due, job.rearm)
            for state in states.values():
                self._store.save(replace(state, due_at=due, last_error=e.code))
            return "deferred"
        self._queue().send(replace(job, attempt=attempt).to_message(), visibility_timeout=delay)
        log.warning("notification job %s for %s failed transiently (%s); retry %d in %d s", job.kind, job.account_id,
                    e.code, attempt, delay)
        return "retry_scheduled"


def _move(index: DueIndex, owner: str, account_id: str, states: dict[str, SubscriptionState],
          due: dt.datetime | None, rearm: str = "") -> None:
    """The account's index row to ``due`` (None: removed), wherever its feeds' rows say it may be now."""
    index.move_row(owner, account_id, due, stale=_buckets(states.values()) | {rearm})


def _write_summary(accounts: AccountStore, acc: Account, summary: NotificationSummary) -> None:
    if summary == acc.notifications:
        return
    try:  # best effort: the account JSON's view of what the state rows say
        accounts.set_notifications(acc, summary)
    except ConnectorError as e:
        log.debug("notifications summary of %s not written: %s", acc.id, e.code)


class SubscriptionReconciler:
    """Daily: subscribe active accounts that lack a feed's subscription (existing accounts, lost jobs, a changed
    ``MAIL_EVENTS``), re-create lost index rows, turn everything off when disabled, forget old de-duplication
    rows."""

    def __init__(self, *, enabled: bool, feeds: tuple[str, ...], accounts: AccountStore, store: SubscriptionStore,
                 index: DueIndex, seen: Table, queue: Callable[[], Queue]) -> None:
        self.enabled = enabled
        self._feeds = set(feeds)
        self._accounts = accounts
        self._store = store
        self._index = index
        self._seen = seen
        self._queue = queue

    def reconcile(self, now: dt.datetime | None = None) -> dict[str, int]:
        """Daily: subscribe active accounts that lack a subscription, re-create lost index rows, turn
        everything off when disabled, forget old de-duplication rows."""
        now = now or utcnow()
        states: dict[tuple[str, str], dict[str, SubscriptionState]] = {}
        for s in self._store.all_states():
            states.setdefault((s.owner, s.account_id), {})[s.feed] = s
        queued = 0
        if self.enabled:
            queued += self._reconcile_active(states)
        for (owner, account_id), feeds in states.items():
            queued += self._reconcile_orphan(owner, account_id, feeds)
        purged = self._seen.purge("expiresAt lt @c", parameters={"c": iso(now) or ""})
        log.info(json.dumps({"event": "notifications.reconciled", "queued": queued, "seenPurged": purged}))
        return {"queued": queued, "seenPurged": purged}

    def _reconcile_active(self, states: dict[tuple[str, str], dict[str, SubscriptionState]]) -> int:
        queued = 0
        for owner, account_id, _ in self._accounts.list_active_due_times():
            feeds = states.pop((owner, account_id), {})
            dues = [s.due_at for s in feeds.values() if s.due_at is not None]
            if set(feeds) == self._feeds and all(s.subscription_id for s in feeds.values()) and dues:
                self._index.put_row(owner, account_id, min(dues))
                continue
            catchup = any(s.delta_link for s in feeds.values())
            self._queue().send(Job("ensure", owner, account_id, catchup=catchup).to_message())
            queued += 1
        return queued

    def _reconcile_orphan(self, owner: str, account_id: str, feeds: dict[str, SubscriptionState]) -> int:
        """State rows of an account that is not active: gone → rows deleted; disabled → subscriptions deleted."""
        try:
            self._accounts.get_account(owner, account_id)
        except NotFoundError:
            self._index.move_row(owner, account_id, None, stale=_buckets(feeds.values()))
            self._store.delete_account(owner, account_id)
            return 0
        if self.enabled or not any(s.subscription_id for s in feeds.values()):
            return 0  # reauth_required: keep the delta links for the catch-up after recovery
        self._queue().send(Job("disable", owner, account_id).to_message())
        return 1


def _renew_before(state: SubscriptionState) -> dt.timedelta:
    """How long before it expires a subscription is renewed: a day, or a quarter of a rich one's day."""
    return RICH_RENEW_BEFORE if state.rich else RENEW_BEFORE


def _buckets(states: Iterable[SubscriptionState]) -> set[str]:
    """The index buckets the account's row may be in (every feed row carries the account's due time)."""
    return {bucket_of(s.due_at) for s in states if s.due_at is not None}

