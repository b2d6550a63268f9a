"""Reading mail and diagnosing a mailbox: messages, one message, one attachment, folders, diagnose."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import azure.functions as func

from shared.blueprints._http import NO_CONTEXT, Context, JsonBody, content_disposition, handle, query

if TYPE_CHECKING:
    from shared.messages import MessageQuery
    from shared.service import Connector

bp = func.Blueprint()

_MIME = re.compile(r"^[A-Za-z0-9!#$&^_.+-]{1,127}/[A-Za-z0-9!#$&^_.+-]{1,127}(?:;[ -~]{0,200})?$")


@bp.route(route="accounts/{accountId}/messages", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def list_messages(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    def run(c: Connector, ctx: Context) -> JsonBody:
        return c.mail.find(ctx.owner, ctx.account_id, message_query(req), query(req, "cursor", max_len=8192))

    return handle(req, "list_messages", run, context=context)


def message_query(req: func.HttpRequest) -> MessageQuery:
    """The listing's query parameters, each validated and named when wrong (combinations: shared.messages)."""
    from shared.mail import parse_recipient
    from shared.messages import MessageQuery, check_id, parse_bool, parse_datetime, parse_search, parse_top

    sender = query(req, "from", max_len=320)
    conversation = query(req, "conversationId", max_len=512)
    return MessageQuery(
        folder=query(req, "folder", max_len=512), top=parse_top(query(req, "top", max_len=8)),
        unread_only=parse_bool(query(req, "unreadOnly", max_len=8), "unreadOnly"),
        q=parse_search(query(req, "q", max_len=512)),
        conversation_id=check_id(conversation, "conversationId") if conversation else None,
        sender=parse_recipient(sender, "from").address.lower() if sender else None,
        received_after=parse_datetime(query(req, "receivedAfter", max_len=40), "receivedAfter"),
        received_before=parse_datetime(query(req, "receivedBefore", max_len=40), "receivedBefore"))


@bp.route(route="accounts/{accountId}/messages/{messageId}", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def get_message(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    return handle(req, "get_message",
                  lambda c, ctx: c.mail.get_message(ctx.owner, ctx.account_id, req.route_params.get("messageId")),
                  context=context)


@bp.route(route="accounts/{accountId}/messages/{messageId}/attachments/{attachmentId}", methods=["GET"],
          auth_level=func.AuthLevel.ANONYMOUS)
def get_attachment(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    def run(c: Connector, ctx: Context) -> func.HttpResponse:
        from shared.messages import parse_range

        got = c.mail.download(ctx.owner, ctx.account_id, req.route_params.get("messageId"),
                                  req.route_params.get("attachmentId"), parse_range(req.headers.get("Range")))
        data, ctype, name = got.content, got.content_type, got.name
        ranged = {"Content-Range": got.content_range} if got.content_range else {}
        if not _MIME.fullmatch(ctype or ""):  # the type comes from the sender of the mail: never trust it into a header
            ctype = "application/octet-stream"
        return func.HttpResponse(data, status_code=got.status, headers={**ranged, "Accept-Ranges": "bytes",
            "Content-Type": ctype, "Content-Disposition": content_disposition(name),
            # CSP sandbox: opened in a browser tab, the file gets a unique opaque origin and no script.
            "X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox",
            "Cache-Control": "private, no-store"})

    return handle(req, "get_attachment", run, context=context)


@bp.route(route="accounts/{accountId}/folders", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def list_folders(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    return handle(req, "list_folders", lambda c, ctx: c.mail.list_folders(ctx.owner, ctx.account_id), context=context)


@bp.route(route="accounts/{accountId}/diagnose", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def diagnose(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    def run(c: Connector, ctx: Context) -> JsonBody:
        from shared.mail import mailbox_address

        raw = query(req, "probe", max_len=254)
        probe = mailbox_address(raw, "probe") if raw is not None else None
        return c.account_ops.diagnose(ctx.owner, ctx.account_id, probe=probe)

    return handle(req, "diagnose", run, context=context)
