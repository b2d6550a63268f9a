"""Timer and queue triggers: proactive refresh fan-out, refresh worker, webhooks, clean-up."""

from __future__ import annotations

import azure.functions as func

from shared.logs import configure as _configure_logging

_configure_logging()
bp = func.Blueprint()


@bp.timer_trigger(schedule="%REFRESH_SCHEDULE%", arg_name="timer", run_on_startup=False)
def refresh_timer(timer: func.TimerRequest) -> None:
    from shared.refresh import enqueue_due
    from shared.service import get_connector

    enqueue_due(get_connector())


@bp.queue_trigger(arg_name="msg", queue_name="refresh-jobs", connection="AzureWebJobsStorage")
def refresh_worker(msg: func.QueueMessage) -> None:
    from shared.refresh import process
    from shared.service import get_connector

    process(get_connector(), msg.get_body())


@bp.timer_trigger(schedule="0 30 3 * * *", arg_name="timer", run_on_startup=False)
def refresh_reconcile(timer: func.TimerRequest) -> None:
    from shared.refresh import reconcile
    from shared.service import get_connector

    reconcile(get_connector())


@bp.queue_trigger(arg_name="msg", queue_name="webhook-deliveries", connection="AzureWebJobsStorage")
def webhook_delivery(msg: func.QueueMessage) -> None:
    from shared.service import get_connector

    get_connector().webhooks.deliver(msg.get_body())


@bp.timer_trigger(schedule="%CLEANUP_SCHEDULE%", arg_name="timer", run_on_startup=False)
def cleanup_timer(timer: func.TimerRequest) -> None:
    from shared.refresh import cleanup
    from shared.service import get_connector

    cleanup(get_connector())
