"""Team mailboxes: GET /api/tenants, GET/DELETE /api/tenants/{tenantConnectionId} and
POST /api/tenants/{tenantConnectionId}/mailboxes. The operations are :class:`shared.team_mailboxes.TeamMailboxes`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import azure.functions as func

from shared.blueprints._http import NO_CONTEXT, Context, capped_body, handle, json_body, json_response

if TYPE_CHECKING:
    from shared.service import Connector

bp = func.Blueprint()
_TENANT = "tenants/{tenantConnectionId}"
_MAX_BODY = 4096  # {"address": …}


def _connection_id(req: func.HttpRequest) -> str:
    return req.route_params.get("tenantConnectionId") or ""


@bp.route(route="tenants", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def list_tenants(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    return handle(req, "list_tenants", lambda c, ctx: {"tenants": c.team_mailboxes.list_tenants(ctx.owner)},
                  context=context)


@bp.route(route=_TENANT, methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def get_tenant(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    return handle(req, "get_tenant", lambda c, ctx: c.team_mailboxes.get_tenant(ctx.owner, _connection_id(req)),
                  context=context)


@bp.route(route=_TENANT, methods=["DELETE"], auth_level=func.AuthLevel.ANONYMOUS)
def delete_tenant(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    def run(c: Connector, ctx: Context) -> func.HttpResponse:
        c.team_mailboxes.delete_tenant(ctx.owner, _connection_id(req))
        return func.HttpResponse(status_code=204)

    return handle(req, "delete_tenant", run, context=context)


@bp.route(route=_TENANT + "/mailboxes", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def add_mailbox(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    def run(c: Connector, ctx: Context) -> func.HttpResponse:
        body = json_body(capped_body(req, _MAX_BODY, "The body"), "body")
        if not isinstance(body, dict):
            from shared.errors import ValidationError

            raise ValidationError("body", 'The body must be a JSON object: {"address": "support@contoso.com"}.')
        account, created = c.team_mailboxes.add_mailbox(ctx.owner, _connection_id(req), body)
        ctx.account_ref = str(account["id"])
        return json_response(account, 201 if created else 200)

    return handle(req, "add_mailbox", run, context=context)
