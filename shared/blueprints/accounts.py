"""GET/DELETE /api/accounts[/{accountId}] and POST /api/accounts/{accountId}/refresh."""

from __future__ import annotations

from typing import TYPE_CHECKING

import azure.functions as func

from shared.blueprints._http import NO_CONTEXT, Context, handle

if TYPE_CHECKING:
    from shared.service import Connector

bp = func.Blueprint()


@bp.route(route="accounts", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def list_accounts(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    return handle(req, "list_accounts", lambda c, ctx: {"accounts": c.account_ops.list_accounts(ctx.owner)}, context=context)


@bp.route(route="accounts/{accountId}", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def get_account(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    return handle(req, "get_account", lambda c, ctx: c.account_ops.get_account(ctx.owner, ctx.account_id), context=context)


@bp.route(route="accounts/{accountId}", methods=["DELETE"], auth_level=func.AuthLevel.ANONYMOUS)
def delete_account(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    def run(c: Connector, ctx: Context) -> func.HttpResponse:
        c.account_ops.delete_account(ctx.owner, ctx.account_id)
        return func.HttpResponse(status_code=204)

    return handle(req, "delete_account", run, context=context)


@bp.route(route="accounts/{accountId}/refresh", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def refresh_account(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    return handle(req, "refresh_account", lambda c, ctx: c.account_ops.refresh_account(ctx.owner, ctx.account_id),
                  context=context)
