"""Working with mail: reply, reply-all and forward in the thread; mark, flag, categorise,
move and delete; read a whole conversation. The operations are :class:`shared.mailbox.MailOps`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import azure.functions as func

from shared.blueprints._http import NO_CONTEXT, Context, JsonBody, handle, json_body, json_response, query

if TYPE_CHECKING:
    from shared.service import Connector

bp = func.Blueprint()
_MESSAGE = "accounts/{accountId}/messages/{messageId}"


def _answer(req: func.HttpRequest, kind: str, function: str, context: func.Context | None) -> func.HttpResponse:
    """JSON or multipart/form-data (a JSON part ``message`` and raw file parts), exactly as a send."""

    def run(c: Connector, ctx: Context) -> func.HttpResponse:
        from shared.blueprints.send import read_mail_body
        from shared.mail import answer_fingerprint, parse_answer_request

        body, files = read_mail_body(req)
        request = parse_answer_request(kind, body, files=files, max_total=c.settings.send_max_total_bytes)
        key = req.headers.get("Idempotency-Key")
        mid = req.route_params.get("messageId") or ""
        fingerprint = answer_fingerprint(kind, mid, body, request.attachments) if key and isinstance(body, dict) else ""
        result = c.mail.answer(ctx.owner, ctx.account_id, mid, request, idempotency_key=key, body_hash=fingerprint)
        return json_response(result, 202)

    return handle(req, function, run, context=context)


@bp.route(route=_MESSAGE + "/reply", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def reply_message(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    return _answer(req, "reply", "reply_message", context)


@bp.route(route=_MESSAGE + "/replyAll", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def reply_all_message(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    return _answer(req, "replyAll", "reply_all_message", context)


@bp.route(route=_MESSAGE + "/forward", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def forward_message(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    return _answer(req, "forward", "forward_message", context)


@bp.route(route=_MESSAGE, methods=["PATCH"], auth_level=func.AuthLevel.ANONYMOUS)
def update_message(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    def run(c: Connector, ctx: Context) -> JsonBody:
        from shared.messages import parse_update

        changes = parse_update(json_body(req.get_body(), "body"))
        return c.mail.update(ctx.owner, ctx.account_id, req.route_params.get("messageId") or "", changes)

    return handle(req, "update_message", run, context=context)


@bp.route(route=_MESSAGE + "/move", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def move_message(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    def run(c: Connector, ctx: Context) -> JsonBody:
        from shared.errors import ValidationError
        from shared.messages import move_destination

        body = json_body(req.get_body(), "body")
        if not isinstance(body, dict):
            raise ValidationError("body", "The request body must be a JSON object like {\"folder\": \"archive\"}.")
        unknown = sorted(set(body) - {"folder"})
        if unknown:
            raise ValidationError(unknown[0], f"Unknown field {unknown[0]!r}; give folder.")
        folder = move_destination(body.get("folder"))
        return c.mail.move(ctx.owner, ctx.account_id, req.route_params.get("messageId") or "", folder)

    return handle(req, "move_message", run, context=context)


@bp.route(route=_MESSAGE, methods=["DELETE"], auth_level=func.AuthLevel.ANONYMOUS)
def delete_message(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    def run(c: Connector, ctx: Context) -> func.HttpResponse:
        c.mail.delete(ctx.owner, ctx.account_id, req.route_params.get("messageId") or "")
        return func.HttpResponse(status_code=204)

    return handle(req, "delete_message", run, context=context)


@bp.route(route="accounts/{accountId}/conversations/{conversationId}", methods=["GET"],
          auth_level=func.AuthLevel.ANONYMOUS)
def get_conversation(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    def run(c: Connector, ctx: Context) -> JsonBody:
        from shared.messages import parse_top

        return c.mail.conversation(ctx.owner, ctx.account_id, req.route_params.get("conversationId") or "",
                                       top=parse_top(query(req, "top", max_len=8)),
                                       cursor=query(req, "cursor", max_len=8192))

    return handle(req, "get_conversation", run, context=context)
