"""Timer and queue triggers: proactive refresh fan-out, refresh worker, webhooks, clean-up."""

from __future__ import annotations

import azure.functions as func

from shared.logs import configure as _configure_logging

_configure_logging()
bp = func.Blueprint()


@bp.timer_trigger(schedule="%REFRESH_SCHEDULE%", arg_name="timer", run_on_startup=False)
def refresh_timer(timer: func.TimerRequest) -> None:
    from shared.service import get_connector
    from shared.storage import background_budget

    with background_budget():
        get_connector().refresher.enqueue_due()


@bp.queue_trigger(arg_name="msg", queue_name="refresh-jobs", connection="AzureWebJobsStorage")
def refresh_worker(msg: func.QueueMessage) -> None:
    from shared.service import get_connector
    from shared.storage import background_budget

    with background_budget():
        get_connector().refresher.process(msg.get_body())


@bp.timer_trigger(schedule="0 30 3 * * *", arg_name="timer", run_on_startup=False)
def refresh_reconcile(timer: func.TimerRequest) -> None:
    from shared.service import get_connector
    from shared.storage import background_budget

    with background_budget():
        get_connector().refresher.reconcile()


@bp.queue_trigger(arg_name="msg", queue_name="webhook-deliveries", connection="AzureWebJobsStorage")
def webhook_delivery(msg: func.QueueMessage) -> None:
    from shared.service import get_connector
    from shared.storage import background_budget

    with background_budget():
        get_connector().webhooks.deliver(msg.get_body())


@bp.timer_trigger(schedule="%CLEANUP_SCHEDULE%", arg_name="timer", run_on_startup=False)
def cleanup_timer(timer: func.TimerRequest) -> None:
    from shared.refresh import cleanup
    from shared.service import get_connector
    from shared.storage import IDEMPOTENCY_TABLE, STATES_TABLE, background_budget

    storage = get_connector().storage
    with background_budget():
        cleanup(states=storage.table(STATES_TABLE), idempotency=storage.table(IDEMPOTENCY_TABLE))
