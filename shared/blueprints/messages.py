"""Reading mail and diagnosing a mailbox: messages, one message, one attachment, folders, diagnose."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import azure.functions as func

from shared.blueprints._http import Context, JsonBody, content_disposition, handle, query

if TYPE_CHECKING:
    from shared.service import Connector

bp = func.Blueprint()

_MIME = re.compile(r"^[A-Za-z0-9!#$&^_.+-]{1,127}/[A-Za-z0-9!#$&^_.+-]{1,127}(?:;[ -~]{0,200})?$")


@bp.route(route="accounts/{accountId}/messages", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def list_messages(req: func.HttpRequest) -> func.HttpResponse:
    def run(c: Connector, ctx: Context) -> JsonBody:
        from shared.messages import parse_bool, parse_top

        return c.list_messages(ctx.owner, ctx.account_id, folder=query(req, "folder", max_len=512),
                               top=parse_top(query(req, "top", max_len=8)), cursor=query(req, "cursor", max_len=8192),
                               unread_only=parse_bool(query(req, "unreadOnly", max_len=8), "unreadOnly"))

    return handle(req, "list_messages", run)


@bp.route(route="accounts/{accountId}/messages/{messageId}", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def get_message(req: func.HttpRequest) -> func.HttpResponse:
    return handle(req, "get_message",
                  lambda c, ctx: c.get_message(ctx.owner, ctx.account_id, req.route_params.get("messageId")))


@bp.route(route="accounts/{accountId}/messages/{messageId}/attachments/{attachmentId}", methods=["GET"],
          auth_level=func.AuthLevel.ANONYMOUS)
def get_attachment(req: func.HttpRequest) -> func.HttpResponse:
    def run(c: Connector, ctx: Context) -> func.HttpResponse:
        data, ctype, name = c.get_attachment(ctx.owner, ctx.account_id, req.route_params.get("messageId"),
                                             req.route_params.get("attachmentId"))
        if not _MIME.match(ctype or ""):  # the type comes from the sender of the mail: never trust it into a header
            ctype = "application/octet-stream"
        return func.HttpResponse(data, status_code=200, headers={
            "Content-Type": ctype, "Content-Disposition": content_disposition(name),
            "X-Content-Type-Options": "nosniff", "Cache-Control": "private, no-store"})

    return handle(req, "get_attachment", run)


@bp.route(route="accounts/{accountId}/folders", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def list_folders(req: func.HttpRequest) -> func.HttpResponse:
    return handle(req, "list_folders", lambda c, ctx: c.list_folders(ctx.owner, ctx.account_id))


@bp.route(route="accounts/{accountId}/diagnose", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def diagnose(req: func.HttpRequest) -> func.HttpResponse:
    return handle(req, "diagnose", lambda c, ctx: c.diagnose(ctx.owner, ctx.account_id))
