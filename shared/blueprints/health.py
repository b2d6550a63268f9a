"""GET /api/health (200 when storage and the client secret are reachable, else 503), the OpenAPI document and
the page every problem's ``type`` points to."""

from __future__ import annotations

from typing import TYPE_CHECKING

import azure.functions as func

from shared.blueprints._http import NO_CONTEXT, Context, JsonBody, handle, json_response

if TYPE_CHECKING:
    from shared.service import Connector

bp = func.Blueprint()


@bp.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def health(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    def run(c: Connector, ctx: Context) -> func.HttpResponse:
        ok, checks = c.health()
        return json_response({"status": "ok" if ok else "unhealthy", "checks": checks}, 200 if ok else 503)

    return handle(req, "health", run, auth=False, context=context)


@bp.route(route="openapi.json", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def openapi(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    def run(c: Connector, ctx: Context) -> JsonBody:
        from shared.openapi import document

        return document()

    return handle(req, "openapi", run, auth=False, context=context)


@bp.route(route="problems", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def problems(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    def run(c: Connector, ctx: Context) -> func.HttpResponse:
        from shared.problems import page

        # A static page of text: no script, no frames (CSP), so serving it anonymously exposes nothing.
        return func.HttpResponse(page(), status_code=200, mimetype="text/html", charset="utf-8", headers={
            "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'"})

    return handle(req, "problems", run, auth=False, context=context)
