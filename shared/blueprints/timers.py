"""Timer and queue triggers: proactive refresh fan-out, refresh worker, webhooks, clean-up.

Each invocation runs in a span (shared.telemetry) whose parent is the host's trace context
(``context.trace_context.trace_parent``: https://learn.microsoft.com/azure/azure-functions/opentelemetry-howto);
queue invocations carry the message id and dequeue count, never the message body.
"""

from __future__ import annotations

import azure.functions as func

from shared.blueprints._http import background_invocation

bp = func.Blueprint()


@bp.timer_trigger(schedule="%REFRESH_SCHEDULE%", arg_name="timer", run_on_startup=False)
def refresh_timer(timer: func.TimerRequest, context: func.Context) -> None:
    from shared.service import get_connector

    with background_invocation("refresh_timer", context):
        get_connector().refresher.enqueue_due()


@bp.queue_trigger(arg_name="msg", queue_name="refresh-jobs", connection="AzureWebJobsStorage")
def refresh_worker(msg: func.QueueMessage, context: func.Context) -> None:
    from shared.service import get_connector

    with background_invocation("refresh_worker", context, msg=msg):
        get_connector().refresher.process(msg.get_body())


@bp.timer_trigger(schedule="0 30 3 * * *", arg_name="timer", run_on_startup=False)
def refresh_reconcile(timer: func.TimerRequest, context: func.Context) -> None:
    from shared.service import get_connector

    with background_invocation("refresh_reconcile", context):
        get_connector().refresher.reconcile()


@bp.queue_trigger(arg_name="msg", queue_name="webhook-deliveries", connection="AzureWebJobsStorage")
def webhook_delivery(msg: func.QueueMessage, context: func.Context) -> None:
    from shared.service import get_connector

    with background_invocation("webhook_delivery", context, msg=msg):
        get_connector().webhooks.deliver(msg.get_body())


@bp.timer_trigger(schedule="%CLEANUP_SCHEDULE%", arg_name="timer", run_on_startup=False)
def cleanup_timer(timer: func.TimerRequest, context: func.Context) -> None:
    from shared.service import get_connector

    with background_invocation("cleanup_timer", context):
        get_connector().cleanup()
