"""Timer and queue triggers: proactive refresh fan-out, refresh worker, webhooks, clean-up.

Each invocation runs in a span (shared.telemetry) whose parent is the host's trace context
(``context.trace_context.trace_parent``: https://learn.microsoft.com/azure/azure-functions/opentelemetry-howto);
queue invocations carry the message id and dequeue count, never the message body.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import azure.functions as func

from shared.logs import configure as _configure_logging

_configure_logging()
bp = func.Blueprint()


@contextmanager
def _invocation(name: str, context: func.Context, *, msg: func.QueueMessage | None = None) -> Iterator[None]:
    """The invocation's span and the storage budget of background work."""
    from shared.storage import background_budget
    from shared.telemetry import get_telemetry

    attrs: dict[str, str | int | None] = {"faas.invocation_id": context.invocation_id}
    if msg is not None:
        attrs.update({"messaging.message.id": msg.id, "messaging.system": "azure_storage_queue",
                      "messaging.message.delivery_attempt": msg.dequeue_count})
    with get_telemetry().invocation(name, trigger="timer" if msg is None else "pubsub",
                                    trace_parent=context.trace_context.trace_parent, attributes=attrs), \
            background_budget():
        yield


@bp.timer_trigger(schedule="%REFRESH_SCHEDULE%", arg_name="timer", run_on_startup=False)
def refresh_timer(timer: func.TimerRequest, context: func.Context) -> None:
    from shared.service import get_connector

    with _invocation("refresh_timer", context):
        get_connector().refresher.enqueue_due()


@bp.queue_trigger(arg_name="msg", queue_name="refresh-jobs", connection="AzureWebJobsStorage")
def refresh_worker(msg: func.QueueMessage, context: func.Context) -> None:
    from shared.service import get_connector

    with _invocation("refresh_worker", context, msg=msg):
        get_connector().refresher.process(msg.get_body())


@bp.timer_trigger(schedule="0 30 3 * * *", arg_name="timer", run_on_startup=False)
def refresh_reconcile(timer: func.TimerRequest, context: func.Context) -> None:
    from shared.service import get_connector

    with _invocation("refresh_reconcile", context):
        get_connector().refresher.reconcile()


@bp.queue_trigger(arg_name="msg", queue_name="webhook-deliveries", connection="AzureWebJobsStorage")
def webhook_delivery(msg: func.QueueMessage, context: func.Context) -> None:
    from shared.service import get_connector

    with _invocation("webhook_delivery", context, msg=msg):
        get_connector().webhooks.deliver(msg.get_body())


@bp.timer_trigger(schedule="%CLEANUP_SCHEDULE%", arg_name="timer", run_on_startup=False)
def cleanup_timer(timer: func.TimerRequest, context: func.Context) -> None:
    from shared.refresh import cleanup
    from shared.service import get_connector
    from shared.storage import IDEMPOTENCY_TABLE, STATES_TABLE

    storage = get_connector().storage
    with _invocation("cleanup_timer", context):
        cleanup(states=storage.table(STATES_TABLE), idempotency=storage.table(IDEMPOTENCY_TABLE))
