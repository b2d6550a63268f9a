"""HTTP plumbing shared by the blueprints: auth, correlation id, problem+json, one log line."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import azure.functions as func

from shared.logs import configure as _configure_logging

if TYPE_CHECKING:
    from shared.service import Connector

JsonBody = Mapping[str, object] | Sequence[object]
_configure_logging()
log = logging.getLogger("connector.http")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class Context:
    """What a handler knows about its invocation: the caller and the account it names (for logging too)."""

    def __init__(self, function: str, *, account_id: str | None = None) -> None:
        self.function = function
        self.caller: str | None = None  # the authenticated ``sub``
        self.account_ref: str | None = account_id

    @property
    def owner(self) -> str:
        if self.caller is None:  # handle() authenticates before it calls a handler that needs an owner
            from shared.errors import AuthenticationError

            raise AuthenticationError("Send a bearer token: Authorization: Bearer <JWT>.")
        return self.caller

    @property
    def account_id(self) -> str:
        if not self.account_ref:
            from shared.errors import NotFoundError

            raise NotFoundError("No such account.", code="account_not_found")
        return self.account_ref


def correlation_id(req: func.HttpRequest) -> str:
    # W3C Trace Context (https://www.w3.org/TR/trace-context/#traceparent-header) or Graph's header.
    m = _TRACEPARENT.match(req.headers.get("traceparent", "").strip().lower())
    if m:
        return m.group(1)
    cid = req.headers.get("x-ms-client-request-id", "").strip()
    if _SAFE_ID.match(cid):
        return cid
    return uuid.uuid4().hex


def json_response(body: JsonBody, status: int = 200, headers: dict[str, str] | None = None) -> func.HttpResponse:
    return func.HttpResponse(json.dumps(body), status_code=status, headers=headers or {},
                             mimetype="application/json", charset="utf-8")


def problem_response(exc: BaseException) -> func.HttpResponse:
    from shared.errors import to_problem

    p = to_problem(exc)
    return func.HttpResponse(json.dumps(p.body), status_code=p.status, headers=p.headers,
                             mimetype="application/problem+json", charset="utf-8")


Handler = Callable[["Connector", Context], "func.HttpResponse | JsonBody"]


def handle(req: func.HttpRequest, function: str, fn: Handler, *, auth: bool = True) -> func.HttpResponse:
    """Run ``fn(connector, ctx)``; JSON bodies become 200, errors become problem+json."""
    started = time.perf_counter()
    cid = correlation_id(req)
    ctx = Context(function, account_id=req.route_params.get("accountId"))
    error: BaseException | None = None
    try:
        from shared.service import get_connector

        connector = get_connector()
        if auth:
            ctx.caller = connector.authenticate(req.headers.get("Authorization"))
        result = fn(connector, ctx)
        resp = result if isinstance(result, func.HttpResponse) else json_response(result)
    except Exception as e:
        error = e
        resp = problem_response(e)
    resp.headers["x-correlation-id"] = cid
    _log_line(req, ctx, cid, resp.status_code, started, error)
    return resp


def _log_line(req: func.HttpRequest, ctx: Context, cid: str, status: int, started: float,
              error: BaseException | None) -> None:
    from shared.errors import ConnectorError

    line: dict[str, object] = {
        "correlationId": cid, "function": ctx.function, "method": req.method,
        "route": _route_of(req.url), "status": status, "durationMs": round((time.perf_counter() - started) * 1e3, 1),
    }
    if ctx.caller:
        line["owner"] = ctx.caller
    if ctx.account_ref:
        line["accountId"] = ctx.account_ref
    if isinstance(error, ConnectorError):
        line["code"] = error.code
        if error.microsoft is not None:
            line["microsoft"] = error.microsoft.to_json()
    elif error is not None:
        line["code"] = "internal_error"
        line["exception"] = type(error).__name__
        log.error("unhandled %s in %s", type(error).__name__, ctx.function, exc_info=(type(error), error, None))
    level = logging.ERROR if status >= 500 else logging.WARNING if status >= 400 else logging.INFO
    log.log(level, json.dumps(line))


def _route_of(url: str) -> str:
    # The path only: query strings carry codes and states, which must never reach a log.
    path = url.split("?", 1)[0]
    return "/" + path.split("://", 1)[-1].split("/", 1)[-1] if "://" in path else path


def query(req: func.HttpRequest, name: str, *, max_len: int = 2048) -> str | None:
    value = req.params.get(name)
    if value is None:
        return None
    if len(value) > max_len:
        from shared.errors import ValidationError

        raise ValidationError(name, f"{name} is too long.")
    return value


def content_disposition(name: str) -> str:
    """``attachment`` with an ASCII ``filename`` and the exact UTF-8 name as ``filename*`` (RFC 6266 §4.3,
    RFC 8187), so non-Latin file names survive and nothing can break out of the header."""
    from urllib.parse import quote

    ascii_name = "".join(ch for ch in name if ch.isascii() and (ch.isalnum() or ch in " ._-()"))[:200].strip()
    value = f'attachment; filename="{ascii_name or "attachment"}"'
    if name and ascii_name != name:
        value += "; filename*=UTF-8''" + quote(name[:200], safe="")
    return value
