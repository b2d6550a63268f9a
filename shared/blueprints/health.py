"""GET /api/health — anonymous; 200 when storage and the client secret are reachable, else 503."""

from __future__ import annotations

from typing import Any

import azure.functions as func

from shared.blueprints._http import Context, handle, json_response

bp = func.Blueprint()


@bp.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def health(req: func.HttpRequest) -> func.HttpResponse:
    def run(c: Any, ctx: Context) -> func.HttpResponse:
        ok, checks = c.health()
        return json_response({"status": "ok" if ok else "unhealthy", "checks": checks}, 200 if ok else 503)

    return handle(req, "health", run, auth=False)
