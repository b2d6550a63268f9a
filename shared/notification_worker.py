"""The queue trigger of inbound mail (``notification-jobs``): each job runs on its part, and its failure is
classified like a refresh failure (:mod:`shared.refresh`): a dead grant → ``failed`` until re-connected;
throttling, Graph or storage unavailable → retried later with backoff; anything else → ``failed``."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from shared.errors import ConnectorError, ReauthRequiredError
from shared.notifications import FAILED_RETRY, TRANSIENT, Job

if TYPE_CHECKING:
    from shared.notification_delivery import NotificationDelivery
    from shared.subscription_lifecycle import SubscriptionFailures, SubscriptionLifecycle

log = logging.getLogger("connector.notifications")


class NotificationWorker:
    """The queue trigger's body: a ``changes`` job goes to delivery, every other job to the subscriptions."""

    def __init__(self, *, lifecycle: SubscriptionLifecycle, delivery: NotificationDelivery,
                 failures: SubscriptionFailures) -> None:
        self._lifecycle = lifecycle
        self._delivery = delivery
        self._failures = failures

    def process(self, raw: bytes) -> str:
        """Run one job. Returns what happened (for logs and tests)."""
        try:
            job = Job.from_message(raw)
        except ValueError:
            log.error("dropping a malformed notification job")
            return "malformed"
        try:
            outcome = self._delivery.run(job) if job.kind == "changes" else self._lifecycle.run(job)
        except ReauthRequiredError:
            outcome = self._failures.failed(job, "reauth_required", retry=None)
        except TRANSIENT as e:
            outcome = self._failures.retry_later(job, e)
        except Exception as e:  # ours, or e.g. a second DeltaExpiredError, a link outside Graph, a bad answer
            code = e.code if isinstance(e, ConnectorError) else "internal_error"
            log.warning("notification job %s for %s failed: %s (%s)", job.kind, job.account_id, code,
                        type(e).__name__)
            # One unreadable message is not a broken subscription; the safety catch-up tries it again.
            outcome = "failed" if job.kind == "changes" else self._failures.failed(job, code, retry=FAILED_RETRY)
        log.info(json.dumps({"event": "notifications.job", "kind": job.kind, "accountId": job.account_id,
                             "outcome": outcome}))
        return outcome
