"""Mailbox events: Graph's notification endpoints, the processing queue trigger and the timers.

``POST /api/notifications/microsoft`` and ``…/lifecycle`` are anonymous (Graph calls them). They:

* answer the validation handshake — ``?validationToken=…`` → 200, ``text/plain``, the URL-decoded
  token and nothing else, within Graph's 10 s
  (https://learn.microsoft.com/graph/change-notifications-delivery-webhooks#notificationurl-validation).
  The token is echoed only as text/plain with ``nosniff`` and only when it holds no markup
  characters, so the endpoint cannot be used to reflect a script;
* acknowledge a notification batch with 202 as soon as it is checked (clientState) and enqueued —
  Graph wants a 2xx within 3 s and throttles slow endpoints; 503 when it could not be queued, so
  Graph retries; 400/413 problem+json for a body that is not a notification collection.

The queue worker and the timers run like those of :mod:`shared.blueprints.timers`: in a span whose parent
is the host's trace context, with the storage budget of background work.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import azure.functions as func

from shared.blueprints._http import Context, background_invocation, capped_body, handle, json_body

if TYPE_CHECKING:
    from shared.service import Connector

bp = func.Blueprint()
MAX_VALIDATION_TOKEN = 1024
# Printable ASCII without markup or quoting characters (Graph's tokens are plain text, e.g.
# "Validation: Testing client application reachability for subscription Request-Id: …").
_TOKEN = re.compile(r"[ !#$%()*+,\-./0-9:;=?@A-Z\[\]^_a-z{|}~]{1," + str(MAX_VALIDATION_TOKEN) + "}")


def _validation(token: str) -> func.HttpResponse:
    if not _TOKEN.fullmatch(token):
        from shared.errors import ValidationError

        raise ValidationError("validationToken", "validationToken must be 1-1024 printable characters without markup.")
    return func.HttpResponse(token, status_code=200, mimetype="text/plain", charset="utf-8",
                             headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})


def _endpoint(req: func.HttpRequest, function: str) -> func.HttpResponse:
    token = req.params.get("validationToken")
    if token is not None:
        return handle(req, function, lambda c, ctx: _validation(token), auth=False)

    def run(c: Connector, ctx: Context) -> func.HttpResponse:
        from shared.notification_intake import MAX_BODY_BYTES

        c.notifications.intake.accept(json_body(capped_body(req, MAX_BODY_BYTES, "A notification batch"), "body"))
        return func.HttpResponse(status_code=202)

    return handle(req, function, run, auth=False)


@bp.route(route="notifications/microsoft", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def graph_notifications(req: func.HttpRequest) -> func.HttpResponse:
    return _endpoint(req, "graph_notifications")


@bp.route(route="notifications/microsoft/lifecycle", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def graph_lifecycle_notifications(req: func.HttpRequest) -> func.HttpResponse:
    return _endpoint(req, "graph_lifecycle_notifications")


@bp.queue_trigger(arg_name="msg", queue_name="notification-jobs", connection="AzureWebJobsStorage")
def notification_worker(msg: func.QueueMessage, context: func.Context) -> None:
    from shared.service import get_connector

    with background_invocation("notification_worker", context, msg=msg):
        get_connector().notifications.worker.process(msg.get_body())


@bp.timer_trigger(schedule="%REFRESH_SCHEDULE%", arg_name="timer", run_on_startup=False)
def notifications_timer(timer: func.TimerRequest, context: func.Context) -> None:
    """Subscription renewal and the safety catch-up, from the due-time index (same cadence as refresh)."""
    from shared.service import get_connector

    with background_invocation("notifications_timer", context):
        get_connector().notifications.subscriptions.enqueue_due()


@bp.timer_trigger(schedule="0 45 3 * * *", arg_name="timer", run_on_startup=False)
def notifications_reconcile(timer: func.TimerRequest, context: func.Context) -> None:
    """Daily: subscribe existing accounts, repair the index, switch off cleanly, purge old de-duplication rows."""
    from shared.service import get_connector

    with background_invocation("notifications_reconcile", context):
        get_connector().notifications.reconciler.reconcile()
