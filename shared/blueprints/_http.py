"""HTTP plumbing shared by the blueprints: auth, correlation id, problem+json, one log line."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, cast

import azure.functions as func

from shared.logs import configure as _configure_logging

if TYPE_CHECKING:
    from shared.service import Connector
    from shared.telemetry import Invocation

JsonBody = Mapping[str, object] | Sequence[object]
#: The default of an HTTP function's ``context: func.Context`` parameter when it is called directly (tests,
#: benchmarks): the worker always passes the real one. The annotation must stay exactly ``func.Context``,
#: the worker's test for the parameter (https://learn.microsoft.com/azure/azure-functions/functions-reference-python#context).
NO_CONTEXT = cast("func.Context", None)
_configure_logging()
log = logging.getLogger("connector.http")
# Always fullmatch: "$" also matches before a trailing newline ("abc\n" would pass).
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: How deep a request's JSON may nest. Our bodies nest 3 levels; 32 leaves room and keeps every
#: recursive walk (validation, canonical JSON for idempotency) far from Python's recursion limit.
MAX_JSON_DEPTH = 32


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
    m = _TRACEPARENT.fullmatch(req.headers.get("traceparent", "").strip().lower())
    if m:
        return m.group(1)
    cid = req.headers.get("x-ms-client-request-id", "").strip()
    if _SAFE_ID.fullmatch(cid):
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


def handle(req: func.HttpRequest, function: str, fn: Handler, *, auth: bool = True,
           context: func.Context | None = None) -> func.HttpResponse:
    """Run ``fn(connector, ctx)``; JSON bodies become 200, errors become problem+json.

    ``context``: the host's invocation context; its ``trace_context.trace_parent`` is the parent of
    the invocation span (shared.telemetry), else the caller's ``traceparent`` header."""
    started = time.perf_counter()
    cid = correlation_id(req)
    ctx = Context(function, account_id=req.route_params.get("accountId"))
    with _invocation(req, function, cid, context) as span:
        error: BaseException | None = None
        try:
            from shared.service import get_connector

            connector = get_connector()
            if auth:
                ctx.caller = connector.auth.authenticate(req.headers.get("Authorization"))
            result = fn(connector, ctx)
            resp = result if isinstance(result, func.HttpResponse) else json_response(result)
        except Exception as e:
            error = e
            resp = problem_response(e)
        resp.headers["x-correlation-id"] = cid
        # Answers carry accounts, message bodies and connect states: never cached by a browser or a proxy,
        # never sniffed into another type (RFC 9111 §5.2.2.5; https://fetch.spec.whatwg.org/#x-content-type-options-header).
        resp.headers.setdefault("Cache-Control", "no-store")
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        span.set("connector.account_id", ctx.account_ref)
        span.outcome(status=resp.status_code, code=_code_of(error), error=error if resp.status_code >= 500 else None)
        _log_line(req, ctx, cid, resp.status_code, started, error, trace_id=span.trace_id)
    return resp


def _invocation(req: func.HttpRequest, function: str, cid: str,
                context: func.Context | None) -> AbstractContextManager[Invocation]:
    """The invocation span: child of the host's trace context, tagged with the correlation id we return."""
    from shared.telemetry import get_telemetry

    parent = context.trace_context.trace_parent if context is not None else None
    if not parent:
        header = req.headers.get("traceparent", "").strip().lower()
        parent = header if _TRACEPARENT.fullmatch(header) else None
    attrs: dict[str, str | None] = {"connector.correlation_id": cid, "http.request.method": req.method,
                                    "url.path": _route_of(req.url),
                                    "faas.invocation_id": context.invocation_id if context is not None else None}
    return get_telemetry().invocation(function, trigger="http", trace_parent=parent, attributes=attrs)


@contextmanager
def background_invocation(name: str, context: func.Context, *, msg: func.QueueMessage | None = None) -> Iterator[None]:
    """A timer or queue invocation's span (child of the host's trace context; a queue message's id and dequeue
    count, never its body) and the storage budget of background work."""
    from shared.storage import background_budget
    from shared.telemetry import get_telemetry

    attrs: dict[str, str | int | None] = {"faas.invocation_id": context.invocation_id}
    if msg is not None:
        attrs.update({"messaging.message.id": msg.id, "messaging.system": "azure_storage_queue",
                      "messaging.message.delivery_attempt": msg.dequeue_count})
    with get_telemetry().invocation(name, trigger="timer" if msg is None else "pubsub",
                                    trace_parent=context.trace_context.trace_parent, attributes=attrs), \
            background_budget():
        yield


def _code_of(error: BaseException | None) -> str | None:
    from shared.errors import ConnectorError

    if error is None:
        return None
    return error.code if isinstance(error, ConnectorError) else "internal_error"


def _log_line(req: func.HttpRequest, ctx: Context, cid: str, status: int, started: float,
              error: BaseException | None, *, trace_id: str | None = None) -> None:
    from shared.errors import ConnectorError

    line: dict[str, object] = {
        "correlationId": cid, "function": ctx.function, "method": req.method,
        "route": _route_of(req.url), "status": status, "durationMs": round((time.perf_counter() - started) * 1e3, 1),
    }
    if trace_id and trace_id != cid:
        line["traceId"] = trace_id  # the OpenTelemetry trace (operation_Id in Application Insights)
    if ctx.caller:
        line["owner"] = ctx.caller
    if ctx.account_ref:
        line["accountId"] = ctx.account_ref
    if isinstance(error, ConnectorError):
        line["code"] = error.code
        if error.microsoft is not None:
            line["microsoft"] = error.microsoft.to_json()
    elif error is not None:
        from shared.logs import safe

        line["code"] = "internal_error"
        line["exception"] = type(error).__name__
        # The message only, on this line: an exception message can quote request input.
        log.error("unhandled %s in %s: %s", type(error).__name__, ctx.function, safe(error, 300))
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


def capped_body(req: func.HttpRequest, cap: int, what: str) -> bytes:
    """The request body, refused with 413 when its declared ``Content-Length`` exceeds ``cap``, before it
    is read, and again when what arrived is larger. A host that reads bodies lazily (the dev host's
    ``read_body_up_to``) never buffers more than ``cap`` + 1 bytes of it, declared or chunked."""
    from shared.errors import PayloadTooLargeError, ValidationError

    declared = (req.headers.get("Content-Length") or "").strip()
    if declared:
        if not (declared.isascii() and declared.isdigit()) or len(declared) > 18:  # "²".isdigit() is True
            raise ValidationError("Content-Length", "Content-Length must be a whole number of bytes.")
        if int(declared) > cap:
            raise PayloadTooLargeError(f"{what} is at most {cap} bytes.", extra={"field": "body"})
    # A host that reads the body lazily can stop at the cap (a chunked body declares no length); the
    # Functions host hands the body over whole.
    read_up_to = getattr(req, "read_body_up_to", None)
    body = read_up_to(cap + 1) if callable(read_up_to) else req.get_body()
    if len(body) > cap:
        raise PayloadTooLargeError(f"{what} is at most {cap} bytes.", extra={"field": "body"})
    return body


def json_body(raw: bytes | str, field: str) -> object:
    """Parse a request's JSON; 400 naming ``field`` when it is not JSON or nests deeper than
    :data:`MAX_JSON_DEPTH` (``[`` x 100,000 must not become a RecursionError and a 500)."""
    from shared.errors import ValidationError

    try:
        value: object = json.loads(raw)
    except RecursionError:
        value = None
        depth_ok = False
    except (ValueError, UnicodeDecodeError):
        raise ValidationError(field, f"The {field} is not valid JSON.") from None
    else:
        depth_ok = _depth_within(value, MAX_JSON_DEPTH)
    if not depth_ok:
        raise ValidationError(field, f"The {field} nests deeper than {MAX_JSON_DEPTH} levels.")
    where = lone_surrogate_at(value)
    if where is not None:
        name = where or field
        raise ValidationError(name, f"{name} holds text that is not Unicode (a lone surrogate such as \\ud800).")
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_at(value: object) -> str | None:
    """The path (``to[0].name``; ``""`` for the document itself) of the first string, key or value, that holds
    a lone surrogate: JSON's ``\\ud800`` escape parses into one, and no UTF-8 encoder (Graph's, a hash's, a
    log's) can encode it. None when there is none. Iterative; ASCII strings are skipped at C speed."""
    stack: list[tuple[object, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                return path
        elif isinstance(item, dict):
            for k, v in item.items():
                key = f"{path}.{k}" if path else str(k)
                if isinstance(k, str) and not k.isascii() and _SURROGATE.search(k):
                    return path or "body"
                stack.append((v, key))
        elif isinstance(item, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(item))
    return None


def _depth_within(value: object, limit: int) -> bool:
    """Iterative (no recursion): True when no container in ``value`` is nested deeper than ``limit``."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return True


def query_bool(req: func.HttpRequest, name: str) -> bool:
    """An optional boolean query parameter: ``true``/``false`` (also ``1``/``0``); else 400 naming it."""
    from shared.messages import parse_bool

    return parse_bool(query(req, name, max_len=8), name)


# Bidi controls and other invisible format characters (Unicode category Cf: U+202E RIGHT-TO-LEFT
# OVERRIDE and kin, zero-width joiners) make "invoice\u202Efdp.exe" display as "invoiceexe.pdf".
def _visible(name: str) -> str:
    import unicodedata

    return "".join(ch for ch in name if unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp"))


def content_disposition(name: str) -> str:
    """``attachment`` with an ASCII ``filename`` and the UTF-8 name as ``filename*`` (RFC 6266 §4.3,
    RFC 8187), so non-Latin file names survive and nothing can break out of the header; controls and
    bidi/format characters are dropped from both."""
    from urllib.parse import quote

    name = _visible(name)
    ascii_name = "".join(ch for ch in name if ch.isascii() and (ch.isalnum() or ch in " ._-()"))[:200].strip()
    value = f'attachment; filename="{ascii_name or "attachment"}"'
    if name and ascii_name != name:
        value += "; filename*=UTF-8''" + quote(name[:200], safe="")
    return value
