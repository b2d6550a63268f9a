"""Proactive refresh: a due-time index, a timer that fans out, a queue worker.

* **Index**: :class:`shared.due_index.DueIndex`. A timer run reads only the due rows,
  never the accounts table.
* The account record stays the truth: the worker re-reads it and skips accounts that are no
  longer due (refreshed by a send meanwhile), deleted or already ``reauth_required``. Stale or
  duplicate index rows therefore cost one read, never a wrong refresh. A daily reconciliation
  re-creates index rows from the accounts table in case a write was lost.
* **Policy**: accounts used in the last day get their access token renewed before it expires;
  idle ones get a refresh-token keep-alive every ``KEEPALIVE_DAYS`` (default 7, far inside the
  90-day inactivity window). Due times carry random jitter so renewals do not synchronise.
* **Failures**: a dead grant → ``reauth_required`` + webhook, no retry (``TokenManager``);
  network / 5xx / 429 → re-enqueued with exponential backoff and jitter, status unchanged;
  ``invalid_client`` → ERROR log, health fails, account untouched, retried later.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from shared.accounts import ACTIVE, APPLICATION, Account, AccountStore, iso, utcnow
from shared.backoff import backoff_delay
from shared.due_index import BUCKET, REARM, DueIndex
from shared.errors import (
    NotFoundError,
    OperatorError,
    ReauthRequiredError,
    StorageUnavailableError,
    ThrottledError,
    UpstreamUnavailableError,
)
from shared.storage import Queue, Table
from shared.tokens import TokenManager

if TYPE_CHECKING:
    from shared.telemetry import Telemetry

log = logging.getLogger("connector.refresh")

MAX_TRANSIENT_ATTEMPTS = 6
OPERATOR_RETRY = dt.timedelta(minutes=15)
GIVE_UP_RETRY = dt.timedelta(minutes=30)


@dataclass(frozen=True)
class RefreshJob:
    owner: str
    account_id: str
    attempt: int = 0
    rearm: str | None = None

    def to_message(self) -> bytes:
        return json.dumps({"owner": self.owner, "accountId": self.account_id, "attempt": self.attempt,
                           "rearm": self.rearm}).encode()

    @classmethod
    def from_message(cls, message: bytes) -> RefreshJob:
        """Parse a queue message; ValueError when it is not one of ours."""
        try:
            job = json.loads(message)
            rearm = job.get("rearm")
            if rearm is not None and not (isinstance(rearm, str) and rearm.isdigit()):
                raise ValueError("rearm")
            return cls(str(job["owner"]), str(job["accountId"]), int(job.get("attempt", 0)), rearm)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(type(e).__name__) from None


class Refresher:
    """The timer's fan-out and the queue worker, over injected parts."""

    def __init__(self, *, accounts: AccountStore, tokens: TokenManager, index: DueIndex, queue: Queue,
                 telemetry: Telemetry | None = None) -> None:
        from shared.telemetry import OFF

        self._telemetry = telemetry or OFF
        self._accounts = accounts
        self._tokens = tokens
        self._index = index
        self._queue = queue

    def enqueue_due(self, now: dt.datetime | None = None) -> dict[str, int]:
        """Timer body: move every due index row into the refresh queue. Returns counts."""
        read, due, rearm = self._index.take_due(now or utcnow())
        # Rows are re-armed first: a job that fails to be sent brings its account back on a later run.
        self._queue.send_all([RefreshJob(d.owner, d.account_id, 0, rearm).to_message() for d in due])
        log.info(json.dumps({"event": "refresh.enqueued", "indexRowsRead": read, "enqueued": len(due)}))
        return {"read": read, "enqueued": len(due)}

    def process(self, message: bytes, *, now: dt.datetime | None = None) -> str:
        """Queue-worker body for one account. Returns what happened (for logs and tests)."""
        try:
            job = RefreshJob.from_message(message)
        except ValueError:
            log.error("dropping a malformed refresh message")
            return "malformed"
        outcome, acc = self._process(job, now or utcnow())
        # A retry keeps the re-arm row as its safety net; a refresh has moved it already.
        if job.rearm and outcome not in ("retry_scheduled", "refreshed"):
            self._index.finish(job.owner, job.account_id, rearm=job.rearm, account=acc)
        return outcome

    def _process(self, job: RefreshJob, now: dt.datetime) -> tuple[str, Account | None]:
        try:
            acc = self._accounts.get_account(job.owner, job.account_id)
        except NotFoundError:
            return "gone", None
        if acc.status != ACTIVE:
            return "inactive", acc
        if acc.access_type == APPLICATION:  # no grant to keep alive: its index row is simply not re-armed
            return "application", acc
        if acc.refresh_due_at is not None and acc.refresh_due_at > now + BUCKET:
            self._index.put(acc)  # refreshed meanwhile: make sure its next row exists
            return "not_due", acc
        try:
            # The timer moved this account's index row to the re-arm bucket: the refresh moves that
            # row on to the next due time, in the same round trip that writes the new row.
            return "refreshed", self._tokens.refresh(job.owner, job.account_id, force=True, account=acc,
                                                     indexed_at=job.rearm)
        except ReauthRequiredError:
            return "reauth_required", None
        except NotFoundError:  # disconnected while it was being refreshed: nothing left to do
            return "gone", None
        except OperatorError as e:
            log.error("refresh of %s skipped: the app registration is rejected (%s)", job.account_id, e.code)
            return "operator_error", self._reindex_at(acc, now + OPERATOR_RETRY)
        except (UpstreamUnavailableError, ThrottledError, StorageUnavailableError) as e:
            return self._retry_later(job, acc, e, now)

    def _retry_later(self, job: RefreshJob, acc: Account, e: UpstreamUnavailableError | ThrottledError
                     | StorageUnavailableError, now: dt.datetime) -> tuple[str, Account]:
        attempt = job.attempt + 1
        if attempt >= MAX_TRANSIENT_ATTEMPTS:
            log.warning("refresh of %s still failing after %d attempts (%s); back to the index", job.account_id,
                        attempt, e.code)
            return "deferred", self._reindex_at(acc, now + GIVE_UP_RETRY)
        delay = max(1, round(backoff_delay(attempt)))
        if isinstance(e, ThrottledError):
            delay = max(delay, e.retry_after)
        if delay >= REARM.total_seconds():
            # Longer than the re-arm row waits: let the index bring the account back instead of a
            # queued retry, or both would fire.
            return "deferred", self._reindex_at(acc, now + dt.timedelta(seconds=delay))
        self._queue.send(replace(job, attempt=attempt).to_message(), visibility_timeout=delay)
        log.warning("refresh of %s failed transiently (%s); retry %d in %d s", job.account_id, e.code, attempt, delay)
        return "retry_scheduled", acc

    def _reindex_at(self, acc: Account, when: dt.datetime) -> Account:
        later = replace(acc, refresh_due_at=when)
        self._index.put(later)
        return later

    def reconcile(self) -> int:
        """Daily: re-create index rows for every active account (repairs lost writes). Returns count."""
        rows = self._accounts.list_active_due_times()
        for owner, account_id, due in rows:
            self._index.put_row(owner, account_id, due or utcnow())
        self._report_accounts()
        return len(rows)

    def _report_accounts(self) -> None:
        """``connector.accounts`` by status (docs/operations.md); best effort, after the repair is done."""
        if not self._telemetry.enabled:
            return
        try:
            self._telemetry.accounts(self._accounts.count_by_status())
        except StorageUnavailableError as e:
            log.warning("accounts by status not reported (%s)", e.code)


def cleanup(*, states: Table, idempotency: Table, now: dt.datetime | None = None) -> dict[str, int]:
    """Purge expired OAuth states and idempotency records (Table Storage has no TTL)."""
    now = now or utcnow()
    n_states = states.purge("expiresAt lt @c", parameters={"c": now.isoformat()})
    n_idem = idempotency.purge("expiresAt lt @c", parameters={"c": iso(now) or ""})
    log.info(json.dumps({"event": "cleanup", "states": n_states, "idempotency": n_idem, "at": iso(now)}))
    return {"states": n_states, "idempotency": n_idem}
