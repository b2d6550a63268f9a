"""Microsoft Graph v1.0 mail endpoints the connector uses, plus Outlook upload sessions.

References (cited next to each behaviour):
- Errors: https://learn.microsoft.com/en-us/graph/errors
- Throttling / Outlook service limits: https://learn.microsoft.com/en-us/graph/throttling-limits#outlook-service-limits
- sendMail: https://learn.microsoft.com/en-us/graph/api/user-sendmail
- Large attachments: https://learn.microsoft.com/en-us/graph/outlook-large-attachments and
  https://learn.microsoft.com/en-us/graph/api/attachment-createuploadsession
- Paging: https://learn.microsoft.com/en-us/graph/paging
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, current_app, request

from .errors import GraphError, graph_error_body
from .mailbox import (
    MESSAGE_PROPERTIES,
    Mailbox,
    email,
    iso,
    new_attachment_id,
    new_message_id,
    synthetic_chunks,
)
from .scopes import has_any
from .state import AccessTokenRecord, SandboxState
from .tokens import GRAPH_APP_ID
from .users import TestUser, find_in_tenant

bp = Blueprint("graph", __name__)

MAX_REQUEST_BYTES = 4 * 1024 * 1024  # sendMail / JSON request limit (4 MB)
MAX_CHUNK_BYTES = 4 * 1024 * 1024  # upload-session ranges: "up to 4 MB each time"
MAX_ATTACHMENT_BYTES = 150 * 1024 * 1024  # attachments up to 150 MB via upload sessions
MAX_MESSAGE_BYTES = 150 * 1024 * 1024  # per-mailbox send limit (admin-raised from the 35 MB default)
UPLOAD_SESSION_LIFETIME_S = 15 * 60
MIN_UPLOAD_SESSION_BYTES = 2 * 1024 * 1024  # smaller files: ErrorAttachmentSizeShouldNotBeLessThanMinimumSize
JSON_CT = "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8"

READ_SCOPES = ("Mail.ReadBasic", "Mail.Read", "Mail.ReadWrite")
WRITE_SCOPES = ("Mail.ReadWrite",)
SEND_SCOPES = ("Mail.Send",)
ME_SCOPES = ("User.Read", "User.ReadWrite", "User.ReadBasic.All", "User.Read.All")


@dataclass
class UploadSession:
    token: str
    client_id: str
    upn: str
    message_id: str
    name: str
    size: int
    content_type: str
    is_inline: bool
    content_id: str | None
    expires_at: float
    next_offset: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)
    data: bytearray | None = None


def _sb() -> SandboxState:
    return current_app.extensions["sandbox"]["state"]


def _host() -> str:
    return request.host_url.rstrip("/")


# ---------------------------------------------------------------------------------------------
# Request pipeline: request ids, bearer authentication, per-mailbox throttling, injections
# ---------------------------------------------------------------------------------------------
class _Ctx:
    def __init__(self, rec: AccessTokenRecord | None, request_id: str, client_request_id: str):
        self.rec = rec
        self.request_id = request_id
        self.client_request_id = client_request_id
        self.target: TestUser | None = None  # the mailbox addressed (/me or /users/{id}); else the caller

    @property
    def user(self) -> TestUser:
        """The user whose mailbox the request addresses."""
        if self.target is not None:
            return self.target
        assert self.rec is not None
        return self.rec.user


# Outside an administrator's scope (Exchange Online RBAC for Applications / Application Access Policy).
# https://learn.microsoft.com/graph/auth-limit-mailbox-access
APP_SCOPE_DENIED = ("Access to OData is disabled: [RAOP] : Blocked by tenant configured AppOnly AccessPolicy "
                    "settings.")


def resolve_target(rec: AccessTokenRecord, uid: str | None) -> TestUser:
    """The mailbox a request addresses: ``/me`` is the signed-in user (never valid with an application token);
    ``/users/{id | userPrincipalName}`` is any user of the token's tenant for an application token within the
    administrator's scope, and only the signed-in user for a delegated token without ``.Shared`` permissions."""
    state = _sb()
    if uid is None:
        if rec.app:
            raise GraphError(400, "BadRequest", "/me request is only valid with delegated authentication flow.")
        return rec.user
    user = find_in_tenant(rec.user.tid, uid)
    if user is None:
        raise GraphError(404, "ErrorInvalidUser", f"The requested user '{uid}' is invalid.")
    if not rec.app:
        if user.upn != rec.user.upn:
            raise GraphError(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")
        return user
    with state.lock:
        scope = state.app_scopes.get((rec.user.tid, rec.client_id))
    if scope is not None and user.upn not in scope:
        raise GraphError(403, "ErrorAccessDenied", APP_SCOPE_DENIED)
    return user


def _json_response(status: int, body: Any, ctx: _Ctx, headers: dict[str, str] | None = None) -> Response:
    resp = Response("" if body is None else json.dumps(body), status=status,
                    content_type=None if body is None else JSON_CT)
    _stamp(resp, ctx)
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _stamp(resp: Response, ctx: _Ctx) -> None:
    # Every Graph response carries request-id and client-request-id (echoed when the caller sent one).
    # https://learn.microsoft.com/en-us/graph/best-practices-concept#reliability-and-support
    resp.headers["request-id"] = ctx.request_id
    resp.headers["client-request-id"] = ctx.client_request_id
    resp.headers["x-ms-ags-diagnostic"] = json.dumps({"ServerInfo": {"DataCenter": "Sandbox", "Slice": "E"}})
    resp.headers["Cache-Control"] = "no-cache"


def _error(ctx: _Ctx, exc: GraphError) -> Response:
    return _json_response(exc.status, graph_error_body(exc.code, exc.message, ctx.request_id,
                                                       ctx.client_request_id), ctx, exc.headers)


def _www_authenticate() -> dict[str, str]:
    # Graph's 401 challenge, e.g. Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/
    # oauth2/authorize", client_id="00000003-0000-0000-c000-000000000000"
    return {"WWW-Authenticate": f'Bearer realm="", authorization_uri="{_host()}/common/oauth2/authorize", '
                                f'client_id="{GRAPH_APP_ID}"'}


def _authenticate(state: SandboxState) -> AccessTokenRecord:
    header = request.headers.get("Authorization", "")
    if not header.strip():
        raise GraphError(401, "InvalidAuthenticationToken", "Access token is empty.", _www_authenticate())
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise GraphError(401, "InvalidAuthenticationToken", "Access token validation failure.", _www_authenticate())
    with state.lock:
        rec = state.access_tokens.get(token)
        now = state.now()
    if rec is None:
        if "." in token:
            msg = "Access token validation failure. Invalid audience."
        else:
            msg = "CompactToken parsing failed with error code: 80049217"
        raise GraphError(401, "InvalidAuthenticationToken", msg, _www_authenticate())
    if rec.expired or now >= rec.expires_at:
        msg = ("Access token has expired or is not yet valid." if rec.user.personal
               else "Lifetime validation failed, the token is expired.")
        raise GraphError(401, "InvalidAuthenticationToken", msg, _www_authenticate())
    return rec


def _throttled(reason: str) -> GraphError:
    # Outlook limits per app per mailbox: 4 concurrent requests, 10,000 requests / 10 minutes;
    # 429 with Retry-After. Body as Outlook returns it: ApplicationThrottled / "Application is over its
    # MailboxConcurrency limit." https://learn.microsoft.com/en-us/graph/throttling-limits#outlook-service-limits
    return GraphError(429, "ApplicationThrottled", f"Application is over its {reason} limit.",
                      {"Retry-After": "1" if reason == "MailboxConcurrency" else "60"})


def _injected_error(status: int, retry_after: int | None, body: Any) -> GraphError:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    if isinstance(body, dict) and "code" in body:
        return GraphError(status, str(body["code"]), str(body.get("message", "")), headers)
    if status == 429:
        # https://learn.microsoft.com/en-us/graph/throttling#sample-response
        return GraphError(429, "TooManyRequests", "Please retry again later.", headers)
    if status == 503:
        return GraphError(503, "ServiceNotAvailable", "The service is temporarily unavailable. Please retry "
                          "after the delay given in the Retry-After header.", headers)
    if status == 504:
        return GraphError(504, "GatewayTimeout", "The server, while acting as a proxy, did not receive a "
                          "timely response from the upstream server.", headers)
    if status >= 500:
        return GraphError(status, "InternalServerError", "An internal server error occurred.", headers)
    return GraphError(status, "BadRequest", "Injected error.", headers)


def graph_call(*, scopes: tuple[str, ...] | None = None, mailbox: bool = True,
               scope_error: tuple[str, str] | None = None) -> Callable[..., Any]:
    """Wrap a Graph handler: auth, scope check, mailbox existence, throttling, injection, errors."""

    def decorator(fn: Callable[..., Any]) -> Callable[..., Response]:
        def wrapper(**kwargs: Any) -> Response:
            state = _sb()
            ctx = _Ctx(None, str(uuid.uuid4()), "")
            ctx.client_request_id = request.headers.get("client-request-id") or ctx.request_id
            with state.lock:
                state.counters["graph"] += 1
            entered = False
            try:
                ctx.rec = _authenticate(state)
                if "uid" in kwargs or request.path.rstrip("/") == "/v1.0/me" or request.path.startswith("/v1.0/me/"):
                    ctx.target = resolve_target(ctx.rec, kwargs.pop("uid", None))
                upn = ctx.user.upn
                with state.lock:
                    state.counters[f"graph_user:{upn}"] += 1
                reason = state.enter_mailbox(ctx.rec.client_id, upn)
                if reason:
                    with state.lock:
                        state.counters["throttled_429"] += 1
                    raise _throttled(reason)
                entered = True
                inj = state.take_injection(request.path, upn)
                if inj is not None:
                    if inj.latency_ms:
                        state.injected_sleep(inj.latency_ms / 1000)
                    if inj.status:
                        if inj.status == 429:
                            with state.lock:
                                state.counters["throttled_429"] += 1
                        raise _injected_error(inj.status, inj.retry_after, inj.body)
                if scopes is not None and not has_any(ctx.rec.scopes, *scopes):
                    code, msg = scope_error or ("ErrorAccessDenied", "Access is denied. Check credentials and try "
                                                "again.")
                    raise GraphError(403, code, msg)
                if mailbox and not ctx.user.has_mailbox:
                    # No Exchange Online mailbox (unlicensed, guest, on-premises).
                    # https://learn.microsoft.com/en-us/troubleshoot/exchange/user-and-shared-mailboxes/rest-api-is-not-yet-supported-for-this-mailbox-error
                    raise GraphError(404, "MailboxNotEnabledForRESTAPI",
                                     "The mailbox is either inactive, soft-deleted, or is hosted on-premise.")
                result = fn(ctx, **kwargs)
                if isinstance(result, Response):
                    _stamp(result, ctx)
                    return result
                status, body, *rest = result
                return _json_response(status, body, ctx, rest[0] if rest else None)
            except GraphError as exc:
                return _error(ctx, exc)
            finally:
                if entered and ctx.rec is not None:
                    state.leave_mailbox(ctx.rec.client_id, ctx.user.upn)

        wrapper.__name__ = fn.__name__
        return wrapper

    return decorator


def _mailbox(ctx: _Ctx) -> Mailbox:
    return _sb().mailboxes[ctx.user.upn]


def _body_json() -> Any:
    if request.content_length and request.content_length > MAX_REQUEST_BYTES:
        # Graph refuses requests over 4 MB with 413.
        # https://learn.microsoft.com/en-us/graph/api/user-sendmail (attachments over 3 MB need upload sessions)
        raise GraphError(413, "BadRequest", "The maximum request length supported is 4MB.")
    raw = request.get_data(cache=False)
    if len(raw) > MAX_REQUEST_BYTES:
        raise GraphError(413, "BadRequest", "The maximum request length supported is 4MB.")
    if not raw.strip():
        raise GraphError(400, "BadRequest", "Empty Payload. JSON content expected.")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise GraphError(400, "BadRequest", "Unable to read JSON request payload. Please ensure Content-Type "
                         "header is set and payload is of valid JSON format.") from None


def _request_body_read(message: str) -> GraphError:
    return GraphError(400, "RequestBodyRead", message)


# ---------------------------------------------------------------------------------------------
# /me and folders
# ---------------------------------------------------------------------------------------------
@bp.get("/v1.0/me")
@graph_call(scopes=ME_SCOPES, mailbox=False,
            scope_error=("Authorization_RequestDenied", "Insufficient privileges to complete the operation."))
def me(ctx: _Ctx) -> tuple[int, Any]:
    # https://learn.microsoft.com/en-us/graph/api/user-get
    u = ctx.user
    given, _, family = u.display_name.partition(" ")
    return 200, {
        "@odata.context": f"{_host()}/v1.0/$metadata#users/$entity",
        "businessPhones": [],
        "displayName": u.display_name,
        "givenName": given,
        "jobTitle": None,
        "mail": u.upn if (u.has_mailbox or u.personal) else None,
        "mobilePhone": None,
        "officeLocation": None,
        "preferredLanguage": "en-US",
        "surname": family,
        "userPrincipalName": u.upn,
        "id": u.me_id,
    }


@bp.get("/v1.0/me/mailFolders")
@bp.get("/v1.0/users/<uid>/mailFolders")
@graph_call(scopes=READ_SCOPES)
def list_folders(ctx: _Ctx) -> tuple[int, Any]:
    state = _sb()
    with state.lock:
        mb = _mailbox(ctx)
        value = [mb.folder_resource(fid) for fid in mb.folders]
    return 200, {"@odata.context": f"{_host()}/v1.0/$metadata#users('{ctx.user.me_id}')/mailFolders",
                 "value": value}


def _folder_or_404(mb: Mailbox, ref: str) -> str:
    fid = mb.folder_id(ref)
    if fid is None:
        raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
    return fid


@bp.get("/v1.0/me/mailFolders/<folder>")
@bp.get("/v1.0/users/<uid>/mailFolders/<folder>")
@graph_call(scopes=READ_SCOPES)
def get_folder(ctx: _Ctx, folder: str) -> tuple[int, Any]:
    state = _sb()
    with state.lock:
        mb = _mailbox(ctx)
        res = mb.folder_resource(_folder_or_404(mb, folder))
    return 200, {"@odata.context": f"{_host()}/v1.0/$metadata#users('{ctx.user.me_id}')/mailFolders/$entity",
                 **res}


# ---------------------------------------------------------------------------------------------
# Listing messages: $top, $skip, $select, $filter, $orderby, @odata.nextLink
# ---------------------------------------------------------------------------------------------
def _q(name: str) -> str | None:
    # OData system query options with or without "$". https://learn.microsoft.com/en-us/graph/query-parameters
    return request.args.get(f"${name}", request.args.get(name))


def _int_option(name: str, default: int, maximum: int) -> int:
    raw = _q(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise GraphError(400, "BadRequest", f"Invalid value '{raw}' for ${name} query option found.") from None
    if value < 0 or (name == "top" and value == 0):
        raise GraphError(400, "BadRequest", f"Invalid value '{raw}' for ${name} query option found.")
    return min(value, maximum)


def _select() -> list[str] | None:
    raw = _q("select")
    if not raw:
        return None
    fields = [f.strip() for f in raw.split(",") if f.strip()]
    for f in fields:
        if f not in MESSAGE_PROPERTIES:
            raise GraphError(400, "RequestBroker--ParseUri",
                             f"Could not find a property named '{f}' on type 'microsoft.graph.message'.")
    return fields


_CLAUSE = re.compile(
    r"^\s*(isRead|hasAttachments|isDraft|importance|subject|receivedDateTime|sentDateTime|conversationId|"
    r"from/emailAddress/address)\s+(eq|ne|ge|gt|le|lt)\s+(true|false|'(?:[^']|'')*'|\d{4}-\d\d-\d\dT[\d:.]+Z?)\s*$"
)
_ORDERABLE = r"receivedDateTime|sentDateTime|subject|lastModifiedDateTime"


def _prop(m: dict[str, Any], prop: str) -> Any:
    if prop == "from/emailAddress/address":
        return str(((m.get("from") or {}).get("emailAddress") or {}).get("address", "")).lower()
    return m.get(prop)


def _clauses(raw: str) -> list[tuple[str, str, Any]]:
    clauses = []
    for part in re.split(r"\s+and\s+", raw.strip()):
        match = _CLAUSE.match(part)
        if not match:
            raise GraphError(400, "BadRequest", "Invalid filter clause")
        prop, op, lit = match.groups()
        value: Any = {"true": True, "false": False}.get(lit, lit[1:-1].replace("''", "'") if lit[:1] == "'" else lit)
        want = "Edm.Boolean" if prop in ("isRead", "hasAttachments", "isDraft") else (
            "Edm.DateTimeOffset" if prop.endswith("DateTime") else "Edm.String")
        got = "Edm.Boolean" if isinstance(value, bool) else (
            "Edm.String" if lit.startswith("'") else "Edm.DateTimeOffset")
        if want != got:
            # https://learn.microsoft.com/en-us/graph/filter-query-parameter — the OData parser refuses it
            raise GraphError(400, "BadRequest", f"A binary operator with incompatible types was detected. Found "
                             f"operand types '{want}' and '{got}' for operator kind '{op}'.")
        if want == "Edm.Boolean" and op not in ("eq", "ne"):
            raise GraphError(400, "BadRequest", f"The operator '{op}' is not supported for '{prop}'.")
        if prop == "from/emailAddress/address":
            value = str(value).lower()
        clauses.append((prop, op, value))
    return clauses


def _filter_fn(raw: str | None, order_prop: str | None = None) -> Callable[[dict[str, Any]], bool]:
    if not raw:
        return lambda m: True
    clauses = _clauses(raw)
    if order_prop is not None and clauses[0][0] != order_prop:
        # $filter with $orderby on messages: the $orderby property must also be in $filter, first.
        # https://learn.microsoft.com/en-us/graph/api/user-list-messages#using-filter-and-orderby-in-the-same-query
        raise GraphError(400, "InefficientFilter", "The restriction or sort order is too complex for this operation.")
    ops: dict[str, Callable[[Any, Any], bool]] = {
        "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "ge": lambda a, b: a >= b,
        "gt": lambda a, b: a > b, "le": lambda a, b: a <= b, "lt": lambda a, b: a < b,
    }
    return lambda m: all(ops[op](_prop(m, prop), v) for prop, op, v in clauses)


_KQL_TERM = re.compile(r'(?:(\w+):)?(?:"((?:[^"\\]|\\.)*)"|(\S+))')
_KQL_PROPS = {"from": ("from",), "to": ("toRecipients",), "cc": ("ccRecipients",), "subject": ("subject",),
              "body": ("body",), "participants": ("from", "toRecipients", "ccRecipients", "bccRecipients")}


def _kql_text(m: dict[str, Any], fields: tuple[str, ...]) -> str:
    parts: list[str] = []
    for f in fields:
        v = m.get(f)
        if f == "body":
            parts.append(str((v or {}).get("content", "")))
        elif isinstance(v, (dict, list)):
            for r in v if isinstance(v, list) else [v]:
                ea = r.get("emailAddress") or {} if isinstance(r, dict) else {}
                parts.append(f"{ea.get('name') or ''} {ea.get('address') or ''}")
        else:
            parts.append(str(v or ""))
    return " ".join(parts).lower()


def _search_fn(raw: str) -> Callable[[dict[str, Any]], bool]:
    """A small KQL subset: terms (AND implied), ``prop:value`` for from/to/cc/subject/body/participants;
    bare terms search from, subject and body, as Graph does
    (https://learn.microsoft.com/en-us/graph/search-query-parameter#using-search-on-message-collections)."""
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].replace('\\"', '"')
    terms: list[tuple[tuple[str, ...], str]] = []
    for m in _KQL_TERM.finditer(text):
        prop, quoted, bare = m.groups()
        word = (quoted if quoted is not None else (bare or "").strip("()")).replace('\\"', '"').lower()
        if not word or (prop is None and quoted is None and word in ("and",)):
            continue
        fields = _KQL_PROPS.get((prop or "").lower(), ("from", "subject", "body")) if prop else ("from", "subject",
                                                                                              "body")
        terms.append((fields, word))
    return lambda msg: all(word in _kql_text(msg, fields) for fields, word in terms)


SEARCH_MAX_RESULTS = 1000  # "A $search request returns up to 1,000 results" for messages


def _list_messages(ctx: _Ctx, folder: str | None) -> tuple[int, Any]:
    state = _sb()
    search = _q("search")
    if search is not None:
        return _search_messages(ctx, folder, search)
    top = _int_option("top", 10, 1000)
    skip = _int_option("skip", 0, 10**9)
    select = _select()
    order = (_q("orderby") or "").strip()
    om = re.match(rf"^({_ORDERABLE})(\s+(asc|desc))?$", order or "receivedDateTime desc")
    if not om:
        raise GraphError(400, "BadRequest", f"The $orderby expression '{order}' is not supported.")
    pred = _filter_fn(_q("filter"), om.group(1) if order else None)
    with state.lock:
        mb = _mailbox(ctx)
        fid = _folder_or_404(mb, folder) if folder else None
        msgs = [m for m in mb.messages.values() if (fid is None or m["parentFolderId"] == fid) and pred(m)]
        msgs.sort(key=lambda m: (m[om.group(1)], m["id"]), reverse=(om.group(3) != "asc"))
        page = msgs[skip: skip + top]
        immutable = immutable_ids()
        value = [mb.message_resource(m, select, expand_attachments=_expands_attachments(), immutable=immutable)
                 for m in page]
    body = _page_body(ctx, folder, select, value)
    if skip + top < len(msgs):
        args = {k: v for k, v in request.args.items() if k not in ("$skip", "skip", "$top", "top")}
        args["$top"] = str(top)
        args["$skip"] = str(skip + top)
        body["@odata.nextLink"] = f"{_host()}{request.path}?{urlencode(args)}"
    return 200, body


def _page_body(ctx: _Ctx, folder: str | None, select: list[str] | None, value: list[Any]) -> dict[str, Any]:
    ctx_path = f"mailFolders('{folder}')/messages" if folder else "messages"
    return {"@odata.context": f"{_host()}/v1.0/$metadata#users('{ctx.user.me_id}')/{ctx_path}"
                              + (f"({','.join(select)})" if select else ""), "value": value}


def _search_messages(ctx: _Ctx, folder: str | None, search: str) -> tuple[int, Any]:
    """$search on messages: no $orderby, no $filter; newest sent first; paged with $skiptoken; ≤ 1,000 results.
    https://learn.microsoft.com/en-us/graph/search-query-parameter#using-search-on-message-collections"""
    if _q("orderby") is not None:
        raise GraphError(400, "SearchWithOrderBy", "The query parameter '$orderBy' is not supported with '$search'.")
    if _q("filter") is not None:
        raise GraphError(400, "SearchWithFilter", "The query parameter '$filter' is not supported with '$search'.")
    top = _int_option("top", 10, 1000)
    token = request.args.get("$skiptoken") or request.args.get("skiptoken")
    offset = _skiptoken_offset(token) if token else 0
    select = _select()
    state = _sb()
    match = _search_fn(search)
    with state.lock:
        mb = _mailbox(ctx)
        fid = _folder_or_404(mb, folder) if folder else None
        hits = [m for m in mb.messages.values() if (fid is None or m["parentFolderId"] == fid) and match(m)]
        hits.sort(key=lambda m: (m["sentDateTime"], m["id"]), reverse=True)
        hits = hits[:SEARCH_MAX_RESULTS]
        value = [mb.message_resource(m, select, immutable=immutable_ids()) for m in hits[offset: offset + top]]
    body = _page_body(ctx, folder, select, value)
    if offset + top < len(hits):
        args = {k: v for k, v in request.args.items() if k not in ("$skiptoken", "skiptoken")}
        args["$skiptoken"] = base64.urlsafe_b64encode(f"search:{offset + top}".encode()).decode()
        body["@odata.nextLink"] = f"{_host()}{request.path}?{urlencode(args)}"
    return 200, body


def _skiptoken_offset(token: str) -> int:
    try:
        kind, _, n = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind == "search" and n.isdigit():
            return int(n)
    except (ValueError, UnicodeDecodeError):
        pass
    raise GraphError(400, "BadRequest", "The $skiptoken is invalid.")


def _expands_attachments() -> bool:
    return "attachments" in [e.strip() for e in (_q("expand") or "").split(",")]


_EXPAND_PROPERTY = re.compile(r"^singleValueExtendedProperties\(\$filter=id eq '([^']+)'\)$", re.I)


def _expanded_property() -> str | None:
    """The id in ``$expand=singleValueExtendedProperties($filter=id eq '{id}')``, the documented way to read
    one extended property (https://learn.microsoft.com/graph/api/singlevaluelegacyextendedproperty-get)."""
    for part in (_q("expand") or "").split(","):
        m = _EXPAND_PROPERTY.match(part.strip())
        if m:
            return m.group(1)
    return None


@bp.get("/v1.0/me/messages")
@bp.get("/v1.0/users/<uid>/messages")
@graph_call(scopes=READ_SCOPES)
def list_messages(ctx: _Ctx) -> tuple[int, Any]:
    return _list_messages(ctx, None)


@bp.get("/v1.0/me/mailFolders/<folder>/messages")
@bp.get("/v1.0/users/<uid>/mailFolders/<folder>/messages")
@graph_call(scopes=READ_SCOPES)
def list_folder_messages(ctx: _Ctx, folder: str) -> tuple[int, Any]:
    return _list_messages(ctx, folder)


_ID_RE = re.compile(r"^[A-Za-z0-9_\-+/=]{20,}$")


def immutable_ids() -> bool:
    """``Prefer: IdType="ImmutableId"`` on this request: message ids in answers (and in the notifications of a
    subscription created with it) are immutable ids. https://learn.microsoft.com/graph/outlook-immutable-id"""
    return any(_IMMUTABLE_PREFER.search(v) for v in request.headers.getlist("Prefer"))


_IMMUTABLE_PREFER = re.compile(r'(?:^|[,;\s])IdType\s*=\s*"?ImmutableId"?(?:$|[,;\s])', re.I)


def _message_or_404(mb: Mailbox, mid: str) -> dict[str, Any]:
    if not _ID_RE.match(mid):
        raise GraphError(400, "ErrorInvalidIdMalformed", "Id is malformed.")
    msg = mb.find(mid)
    if msg is None:
        raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
    return msg


@bp.get("/v1.0/me/messages/<mid>")
@bp.get("/v1.0/users/<uid>/messages/<mid>")
@graph_call(scopes=READ_SCOPES)
def get_message(ctx: _Ctx, mid: str) -> tuple[int, Any]:
    state = _sb()
    select = _select()
    with state.lock:
        mb = _mailbox(ctx)
        msg = _message_or_404(mb, mid)
        res = mb.message_resource(msg, select, expand_attachments=_expands_attachments(),
                                  immutable=immutable_ids())
        wanted = _expanded_property()
        if wanted is not None and mb.extended_properties(msg, wanted):
            res["singleValueExtendedProperties"] = mb.extended_properties(msg, wanted)
    return 200, {"@odata.context": f"{_host()}/v1.0/$metadata#users('{ctx.user.me_id}')/messages/$entity", **res}


@bp.patch("/v1.0/me/messages/<mid>")
@bp.patch("/v1.0/users/<uid>/messages/<mid>")
@graph_call(scopes=WRITE_SCOPES)
def update_message(ctx: _Ctx, mid: str) -> tuple[int, Any]:
    body = _body_json()
    state = _sb()
    with state.lock:
        mb = _mailbox(ctx)
        msg = _message_or_404(mb, mid)
        fields = _validate_message(body, for_send=False)
        mb.update(msg, {k: v for k, v in fields.items() if k != "attachments"}, state.now())
        res = mb.message_resource(msg, immutable=immutable_ids())
    return 200, res


@bp.delete("/v1.0/me/messages/<mid>")
@bp.delete("/v1.0/users/<uid>/messages/<mid>")
@graph_call(scopes=WRITE_SCOPES)
def delete_message(ctx: _Ctx, mid: str) -> tuple[int, Any]:
    state = _sb()
    with state.lock:
        mb = _mailbox(ctx)
        mb.remove(_message_or_404(mb, mid))
    return 204, None


# ---------------------------------------------------------------------------------------------
# Attachments
# ---------------------------------------------------------------------------------------------
def _attachment_or_404(msg: dict[str, Any], aid: str) -> dict[str, Any]:
    for att in msg["_attachments"]:
        if att["id"] == aid:
            return att
    raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")


@bp.get("/v1.0/me/messages/<mid>/attachments")
@bp.get("/v1.0/users/<uid>/messages/<mid>/attachments")
@graph_call(scopes=READ_SCOPES)
def list_attachments(ctx: _Ctx, mid: str) -> tuple[int, Any]:
    state = _sb()
    with state.lock:
        mb = _mailbox(ctx)
        msg = _message_or_404(mb, mid)
        value = [Mailbox.attachment_resource(a) for a in msg["_attachments"]]
    return 200, {"@odata.context": f"{_host()}/v1.0/$metadata#users('{ctx.user.me_id}')/messages('{mid}')"
                                   "/attachments", "value": value}


@bp.get("/v1.0/me/messages/<mid>/attachments/<aid>")
@bp.get("/v1.0/users/<uid>/messages/<mid>/attachments/<aid>")
@graph_call(scopes=READ_SCOPES)
def get_attachment(ctx: _Ctx, mid: str, aid: str) -> tuple[int, Any]:
    state = _sb()
    with state.lock:
        att = _attachment_or_404(_message_or_404(_mailbox(ctx), mid), aid)
        return 200, Mailbox.attachment_resource(att)


@bp.get("/v1.0/me/messages/<mid>/attachments/<aid>/$value")
@bp.get("/v1.0/users/<uid>/messages/<mid>/attachments/<aid>/$value")
@graph_call(scopes=READ_SCOPES)
def get_attachment_value(ctx: _Ctx, mid: str, aid: str) -> Response:
    # Raw bytes of a file attachment. https://learn.microsoft.com/en-us/graph/api/attachment-get#request-2
    state = _sb()
    with state.lock:
        att = _attachment_or_404(_message_or_404(_mailbox(ctx), mid), aid)
        data = att.get("_bytes")
        synthetic = att.get("_synthetic")
    if synthetic is not None:  # streamed, never held whole
        seed, size = synthetic
        return Response(synthetic_chunks(seed, size), status=200, content_type=att["contentType"],
                        headers={"Content-Length": str(size)})
    if data is None:
        raise GraphError(501, "NotImplemented", "The sandbox keeps only the size and SHA-256 of attachments "
                         "larger than 16 MB.")
    return Response(data, status=200, content_type=att["contentType"])


@bp.post("/v1.0/me/messages/<mid>/attachments")
@bp.post("/v1.0/users/<uid>/messages/<mid>/attachments")
@graph_call(scopes=WRITE_SCOPES)
def add_attachment(ctx: _Ctx, mid: str) -> tuple[int, Any]:
    body = _body_json()
    state = _sb()
    with state.lock:
        msg = _message_or_404(_mailbox(ctx), mid)
        att = _make_attachments([body], state.now())[0]
        msg["_attachments"].append(att)
        msg["hasAttachments"] = True
        return 201, Mailbox.attachment_resource(att)


def check_file_attachment(att: dict[str, Any], *, synthetic_ok: bool = True) -> None:
    """A fileAttachment as Graph checks it. ``synthetic_ok`` (control API seeding only): ``{"name", "size",
    "seed"}`` stands for a large attachment whose content the sandbox generates (see synthetic_chunks)."""
    if synthetic_ok and "contentBytes" not in att and isinstance(att.get("seed"), str):
        size = att.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_ATTACHMENT_BYTES:
            raise GraphError(400, "ErrorInvalidRequest", "A synthetic attachment needs a size of 1 to 150 MB.")
    elif not isinstance(att.get("contentBytes"), str):
        raise GraphError(400, "ErrorInvalidRequest", "The property 'contentBytes' is required for a file "
                         "attachment.")
    if not att.get("name"):
        raise GraphError(400, "ErrorInvalidRequest", "The attachment name is required.")
    for prop in ("name", "contentType"):
        val = att.get(prop)
        if val is not None and not isinstance(val, str):
            raise _cannot_convert(val, "Edm.String")
        if isinstance(val, str) and any(c in val for c in "\r\n\x00"):
            raise GraphError(400, "ErrorInvalidRequest", f"The attachment {prop} contains invalid characters.")


def _make_attachments(items: Any, now: float) -> list[dict[str, Any]]:
    if not isinstance(items, list):
        raise _request_body_read("An unexpected 'StartObject' node was found when reading from the JSON reader. "
                                 "A 'StartArray' node was expected.")
    out = []
    for att in items:
        if not isinstance(att, dict):
            raise _request_body_read("An unexpected 'PrimitiveValue' node was found when reading from the JSON "
                                     "reader. A 'StartObject' node was expected.")
        otype = att.get("@odata.type")
        if otype is None:
            raise _request_body_read("Cannot create an abstract class.")
        if otype != "#microsoft.graph.fileAttachment":
            raise GraphError(400, "ErrorInvalidRequest", f"The attachment type '{otype}' is not supported by "
                             "the sandbox.")
        check_file_attachment(att, synthetic_ok=False)
        try:
            out.append(Mailbox.make_attachment(att, now))
        except (binascii.Error, ValueError, TypeError):
            raise _request_body_read("The value of property 'contentBytes' is not a valid base64 string.") from None
    return out


# ---------------------------------------------------------------------------------------------
# Message validation (sendMail, drafts)
# ---------------------------------------------------------------------------------------------
_ADDRESS_RE = re.compile(r"^[^@\s<>(),;:\"\[\]]+@[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9\-]+)+$")
_RECIPIENT_FIELDS = ("toRecipients", "ccRecipients", "bccRecipients", "replyTo")


def _validate_recipients(name: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _request_body_read(f"An unexpected '{type(value).__name__}' node was found when reading the "
                                 f"property '{name}'. A 'StartArray' node was expected.")
    out = []
    for r in value:
        ea = r.get("emailAddress") if isinstance(r, dict) else None
        if not isinstance(ea, dict) or not isinstance(ea.get("address", ""), str):
            raise _request_body_read(f"Invalid recipient in property '{name}': each item must be "
                                     "{\"emailAddress\": {\"address\": ..., \"name\": ...}}.")
        unknown = set(ea) - {"address", "name", "@odata.type"}
        if unknown:
            raise _request_body_read(f"The property '{sorted(unknown)[0]}' does not exist on type "
                                     "'microsoft.graph.emailAddress'.")
        if not isinstance(ea.get("name", ""), str):
            raise _cannot_convert(ea.get("name"), "Edm.String")
        out.append({"emailAddress": {k: v for k, v in ea.items() if k in ("address", "name")}})
    return out


# Types of the writable message properties, as the OData reader checks them against the Edm model
# (https://learn.microsoft.com/en-us/graph/api/resources/message#properties).
_BOOL_PROPS = {"isRead", "isDraft", "isDeliveryReceiptRequested", "isReadReceiptRequested", "hasAttachments"}
_STR_PROPS = {"subject", "bodyPreview", "conversationId", "internetMessageId", "webLink", "changeKey",
              "parentFolderId", "id", "conversationIndex"}
_DATE_PROPS = {"receivedDateTime", "sentDateTime", "createdDateTime", "lastModifiedDateTime"}
_ENUM_PROPS = {"importance": ("low", "normal", "high"), "inferenceClassification": ("focused", "other")}
_DATE_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:\d\d)?$")
_EDM = {bool: "Edm.Boolean", str: "Edm.String"}


def _cannot_convert(value: Any, edm: str) -> GraphError:
    shown = json.dumps(value)[:60] if not isinstance(value, str) else value[:60]
    return _request_body_read(f"Cannot convert the literal '{shown}' to the expected type '{edm}'.")


def _typed(k: str, v: Any) -> Any:
    if k in _BOOL_PROPS and not isinstance(v, bool):
        raise _cannot_convert(v, "Edm.Boolean")
    if k in _STR_PROPS and not isinstance(v, str):
        raise _cannot_convert(v, "Edm.String")
    if k in _DATE_PROPS and not (isinstance(v, str) and _DATE_RE.match(v)):
        raise _cannot_convert(v, "Edm.DateTimeOffset")
    if k in _ENUM_PROPS:
        if not isinstance(v, str) or v.lower() not in _ENUM_PROPS[k]:
            raise _request_body_read(f"Requested value '{v}' was not found.")
        return v.lower()
    if k == "categories" and not (isinstance(v, list) and all(isinstance(c, str) for c in v)):
        raise _cannot_convert(v, "Collection(Edm.String)")
    if k == "flag":
        return _followup_flag(v)
    return v


_FLAG_STATUS = ("notFlagged", "complete", "flagged")


def _followup_flag(v: Any) -> dict[str, Any]:
    # https://learn.microsoft.com/en-us/graph/api/resources/followupflag
    if not isinstance(v, dict):
        raise _request_body_read("An unexpected 'PrimitiveValue' node was found when reading the property 'flag'. "
                                 "A 'StartObject' node was expected.")
    unknown = set(v) - {"flagStatus", "startDateTime", "dueDateTime", "completedDateTime", "@odata.type"}
    if unknown:
        raise _request_body_read(f"The property '{sorted(unknown)[0]}' does not exist on type "
                                 "'microsoft.graph.followupFlag'.")
    status = v.get("flagStatus", "notFlagged")
    match = next((s for s in _FLAG_STATUS if isinstance(status, str) and s.lower() == status.lower()), None)
    if match is None:
        raise _request_body_read(f"Requested value '{status}' was not found.")
    return {**{k: v[k] for k in v if k != "@odata.type"}, "flagStatus": match}


def _validate_message(msg: Any, *, for_send: bool) -> dict[str, Any]:
    """Structural validation as Graph's OData reader does it (RequestBodyRead on bad shapes)."""
    if not isinstance(msg, dict):
        raise _request_body_read("An unexpected 'PrimitiveValue' node was found when reading from the JSON "
                                 "reader. A 'StartObject' node was expected.")
    fields: dict[str, Any] = {}
    for k, v in msg.items():
        if k == "@odata.type":
            continue
        if k not in MESSAGE_PROPERTIES:
            raise _request_body_read(f"The property '{k}' does not exist on type 'microsoft.graph.message'. Make "
                                     "sure to only use property names that are defined by the type or mark the "
                                     "type as open type.")
        if k in _RECIPIENT_FIELDS:
            fields[k] = _validate_recipients(k, v)
        elif k in ("from", "sender"):
            fields[k] = _validate_recipients(k, [v])[0]
        elif k == "body":
            if not isinstance(v, dict) or str(v.get("contentType", "text")).lower() not in ("text", "html"):
                raise _request_body_read("The property 'body' must be {\"contentType\": \"text\"|\"html\", "
                                         "\"content\": ...}.")
            content = v.get("content", "")
            if not isinstance(content, str):
                raise _cannot_convert(content, "Edm.String")
            unknown = set(v) - {"contentType", "content", "@odata.type"}
            if unknown:
                raise _request_body_read(f"The property '{sorted(unknown)[0]}' does not exist on type "
                                         "'microsoft.graph.itemBody'.")
            fields[k] = {"contentType": str(v.get("contentType", "text")).lower(), "content": content}
        elif k == "internetMessageHeaders":
            if not isinstance(v, list):
                raise _request_body_read("The property 'internetMessageHeaders' must be an array.")
            for h in v:
                hname = h.get("name") if isinstance(h, dict) else None
                if not isinstance(hname, str) or not hname.lower().startswith("x-"):
                    # Custom headers must start with "x-"/"X-".
                    # https://learn.microsoft.com/en-us/graph/api/resources/internetmessageheader
                    raise GraphError(400, "InvalidInternetMessageHeader",
                                     f"The internet message header name '{hname}' should start with 'x-' or 'X-'.")
            fields[k] = [{"name": h["name"], "value": str(h.get("value", ""))} for h in v]
        elif k == "attachments":
            if not isinstance(v, list):
                raise _request_body_read("The property 'attachments' must be an array.")
            fields[k] = v
        elif k == "singleValueExtendedProperties":
            # https://learn.microsoft.com/graph/api/resources/singlevaluelegacyextendedproperty: {id, value}
            if not isinstance(v, list) or not all(
                    isinstance(p, dict) and isinstance(p.get("id"), str) and isinstance(p.get("value"), str)
                    and set(p) <= {"id", "value"} for p in v):
                raise _request_body_read("The property 'singleValueExtendedProperties' must be an array of "
                                         "{\"id\", \"value\"} objects.")
            fields[k] = [{"id": p["id"], "value": p["value"]} for p in v]
        else:
            fields[k] = _typed(k, v)
    return fields


def _check_addresses(fields: dict[str, Any]) -> None:
    # https://learn.microsoft.com/en-us/graph/api/user-sendmail (ErrorInvalidRecipients)
    recipients = [r for f in ("toRecipients", "ccRecipients", "bccRecipients") for r in fields.get(f, [])]
    if not recipients:
        raise GraphError(400, "ErrorInvalidRecipients", "At least one recipient is not valid., A message can't "
                         "be sent because it contains no recipients.")
    for r in recipients + fields.get("replyTo", []):
        addr = r["emailAddress"].get("address", "")
        if not _ADDRESS_RE.match(addr or ""):
            raise GraphError(400, "ErrorInvalidRecipients", f"At least one recipient isn't valid., Recipient "
                             f"\"{addr}\" isn't resolved. All recipients must be resolved before a message can be "
                             "submitted.")


def _sent_record(mb: Mailbox, fields: dict[str, Any], attachments: list[dict[str, Any]], via: str,
                 save: bool, now: float, message_id: str | None = None) -> dict[str, Any]:
    payload = {k: v for k, v in fields.items() if k != "attachments"}
    payload["attachments"] = [Mailbox.attachment_metadata(a) for a in attachments]
    payload.setdefault("from", {"emailAddress": {"address": mb.user.upn, "name": mb.user.display_name}})
    return {
        "id": message_id or new_message_id(),
        "via": via,
        "saveToSentItems": save,
        "sentDateTime": iso(now),
        "size": len(json.dumps(payload.get("body", {}))) + sum(a["size"] for a in attachments),
        "message": payload,
    }


def save_to_sent_items(mb: Mailbox, fields: dict[str, Any], attachments: list[dict[str, Any]],
                       now: float) -> dict[str, Any]:
    copy = dict(fields, isRead=True, sentDateTime=iso(now), receivedDateTime=iso(now))
    copy.pop("attachments", None)
    copy.setdefault("from", {"emailAddress": {"address": mb.user.upn, "name": mb.user.display_name}})
    msg = mb.add_message("sentitems", copy, now)
    msg["_attachments"] = attachments
    msg["hasAttachments"] = bool(attachments)
    return msg


def deliver_to_sandbox_users(state: SandboxState, sender: Mailbox, fields: dict[str, Any],
                             attachments: list[dict[str, Any]], now: float) -> None:
    """Mail to another test user lands in that user's Inbox (state lock held), so one sandbox user can
    send another one mail and its change notifications; other recipients are only recorded as sent."""
    addresses = {str((r.get("emailAddress") or {}).get("address", "")).lower()
                 for name in ("toRecipients", "ccRecipients", "bccRecipients") for r in fields.get(name) or []
                 if isinstance(r, dict)}
    internet_id = f"<{uuid.uuid4().hex}@sandbox.local>"
    for address in sorted(addresses):
        rcpt = state.mailboxes.get(address)
        if rcpt is None:
            continue
        copy = {k: fields[k] for k in ("subject", "body", "toRecipients", "ccRecipients", "importance",
                                       "conversationId") if k in fields}
        copy.update({"from": email(sender.user.upn, sender.user.display_name), "receivedDateTime": iso(now),
                     "sentDateTime": iso(now), "internetMessageId": internet_id})
        msg = rcpt.add_message("inbox", copy, now)
        if attachments:
            msg["_attachments"] = list(attachments)
            msg["hasAttachments"] = True


@bp.post("/v1.0/me/sendMail")
@bp.post("/v1.0/users/<uid>/sendMail")
@graph_call(scopes=SEND_SCOPES)
def send_mail(ctx: _Ctx) -> tuple[int, Any]:
    # POST /me/sendMail answers 202 Accepted with no body. https://learn.microsoft.com/en-us/graph/api/user-sendmail
    payload = _body_json()
    if not isinstance(payload, dict):
        raise _request_body_read("An unexpected 'StartArray' node was found when reading from the JSON reader. "
                                 "A 'StartObject' node was expected.")
    for k in payload:
        if k.lower() not in ("message", "savetosentitems"):
            raise _request_body_read(f"The parameter '{k}' in the request payload is not a valid parameter for "
                                     "the operation 'sendMail'.")
    message = next((v for k, v in payload.items() if k.lower() == "message"), None)
    if message is None:
        raise GraphError(400, "ErrorInvalidParameter", "The value of the parameter 'Message' is empty.")
    save_raw = next((v for k, v in payload.items() if k.lower() == "savetosentitems"), True)
    if isinstance(save_raw, str) and save_raw.lower() in ("true", "false"):
        save_raw = save_raw.lower() == "true"
    if not isinstance(save_raw, bool):
        raise _request_body_read("Cannot convert the literal to the expected type 'Edm.Boolean'.")
    fields = _validate_message(message, for_send=True)
    state = _sb()
    now = state.now()
    attachments = _make_attachments(fields.get("attachments", []), now)
    _check_addresses(fields)
    with state.lock:
        mb = _mailbox(ctx)
        record = _sent_record(mb, fields, attachments, "sendMail", save_raw, now)
        mb.sent.append(record)
        if save_raw:
            save_to_sent_items(mb, fields, attachments, now)
        deliver_to_sandbox_users(state, mb, fields, attachments, now)
        state.counters["sendmail"] += 1
    return 202, None


# ---------------------------------------------------------------------------------------------
# Drafts, upload sessions, send
# ---------------------------------------------------------------------------------------------
@bp.post("/v1.0/me/messages")
@bp.post("/v1.0/users/<uid>/messages")
@graph_call(scopes=WRITE_SCOPES)
def create_draft(ctx: _Ctx) -> tuple[int, Any]:
    # Create a draft: 201 Created with the message. https://learn.microsoft.com/en-us/graph/api/user-post-messages
    fields = _validate_message(_body_json(), for_send=False)
    state = _sb()
    with state.lock:
        now = state.now()
        attachments = _make_attachments(fields.pop("attachments", []), now)
        mb = _mailbox(ctx)
        fields.setdefault("from", {"emailAddress": {"address": mb.user.upn, "name": mb.user.display_name}})
        fields.setdefault("toRecipients", [])
        fields["isDraft"] = True
        fields["isRead"] = True
        fields["receivedDateTime"] = iso(now)
        msg = mb.add_message("drafts", fields, now)
        if "toRecipients" in fields and not fields["toRecipients"]:
            msg["toRecipients"] = []
        msg["_attachments"] = attachments
        msg["hasAttachments"] = bool(attachments)
        res = mb.message_resource(msg, immutable=immutable_ids())
    return 201, {"@odata.context": f"{_host()}/v1.0/$metadata#users('{ctx.user.me_id}')/messages/$entity", **res}


@bp.post("/v1.0/me/messages/<mid>/attachments/createUploadSession")
@bp.post("/v1.0/users/<uid>/messages/<mid>/attachments/createUploadSession")
@graph_call(scopes=WRITE_SCOPES)
def create_upload_session(ctx: _Ctx, mid: str) -> tuple[int, Any]:
    # https://learn.microsoft.com/en-us/graph/api/attachment-createuploadsession
    body = _body_json()
    item = body.get("AttachmentItem") if isinstance(body, dict) else None
    if not isinstance(item, dict):
        raise GraphError(400, "ErrorInvalidParameter", "The value of the parameter 'AttachmentItem' is empty.")
    if str(item.get("attachmentType", "")).lower() != "file":
        raise GraphError(400, "ErrorInvalidParameter", "AttachmentItem.attachmentType must be 'file'.")
    name, size = item.get("name"), item.get("size")
    if not isinstance(name, str) or not name:
        raise GraphError(400, "ErrorInvalidParameter", "AttachmentItem.name is required.")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise GraphError(400, "ErrorInvalidParameter", "AttachmentItem.size must be a positive integer.")
    if size > MAX_ATTACHMENT_BYTES:
        raise GraphError(400, "ErrorAttachmentSizeLimitExceeded", "The attachment exceeds the 150 MB limit.")
    if size < MIN_UPLOAD_SESSION_BYTES:
        # "uploadSession was used for a file smaller than 3 MB": POST small files to /attachments instead.
        # https://learn.microsoft.com/en-us/graph/outlook-large-attachments (Errors) — the threshold Graph
        # enforces has been measured at 2 MiB (microsoftgraph/msgraph-sdk-java#52).
        raise GraphError(400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize",
                         "The attachment size is less than the minimum size allowed for an upload session.")
    state = _sb()
    token = secrets.token_urlsafe(48)
    with state.lock:
        _message_or_404(_mailbox(ctx), mid)
        now = state.now()
        state.uploads[token] = UploadSession(
            token=token, client_id=ctx.rec.client_id if ctx.rec else "", upn=ctx.user.upn, message_id=mid,
            name=name, size=size, content_type=str(item.get("contentType") or "application/octet-stream"),
            is_inline=bool(item.get("isInline", False)), content_id=item.get("contentId"),
            expires_at=now + UPLOAD_SESSION_LIFETIME_S,
            data=bytearray() if size <= 16 * 1024 * 1024 else None,
        )
    sid = uuid.uuid4()
    return 201, {
        "@odata.context": f"{_host()}/v1.0/$metadata#microsoft.graph.uploadSession",
        "uploadUrl": f"{_host()}/upload/AttachmentSessions/{sid}?authtoken={token}",
        "expirationDateTime": iso(now + UPLOAD_SESSION_LIFETIME_S),
        "nextExpectedRanges": ["0-"],
    }


_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


@bp.route("/upload/AttachmentSessions/<sid>", methods=["PUT", "DELETE"])
def upload_chunk(sid: str) -> Response:
    state = _sb()
    ctx = _Ctx(None, str(uuid.uuid4()), request.headers.get("client-request-id") or "")
    ctx.client_request_id = ctx.client_request_id or ctx.request_id
    token = request.args.get("authtoken", "")
    entered: tuple[str, str] | None = None
    try:
        if "Authorization" in request.headers:
            # The uploadUrl is pre-authenticated; sending an Authorization header makes the PUT fail with 401.
            # https://learn.microsoft.com/en-us/graph/outlook-large-attachments#step-2-use-the-upload-session-to-upload-a-range-of-bytes-of-the-file
            raise GraphError(401, "InvalidAudienceForResource", "The audience claim value is invalid for current "
                             f"resource. Audience claim is '{GRAPH_APP_ID}', request url is '{request.base_url}'.")
        with state.lock:
            sess = state.uploads.get(token)
            if sess is None or state.now() > sess.expires_at:
                state.uploads.pop(token, None)
                raise GraphError(404, "ErrorItemNotFound", "The upload session was not found or has expired.")
        if request.method == "DELETE":
            with state.lock:
                state.uploads.pop(token, None)
            return _json_response(204, None, ctx)
        reason = state.enter_mailbox(sess.client_id, sess.upn)
        if reason:
            with state.lock:
                state.counters["throttled_429"] += 1
            raise _throttled(reason)
        entered = (sess.client_id, sess.upn)
        inj = state.take_injection(request.path, sess.upn)
        if inj is not None:
            if inj.latency_ms:
                state.injected_sleep(inj.latency_ms / 1000)
            if inj.status:
                raise _injected_error(inj.status, inj.retry_after, inj.body)
        return _accept_chunk(ctx, sess)
    except GraphError as exc:
        return _error(ctx, exc)
    finally:
        if entered:
            state.leave_mailbox(*entered)


def _accept_chunk(ctx: _Ctx, sess: UploadSession) -> Response:
    state = _sb()
    m = _RANGE_RE.match(request.headers.get("Content-Range", "").strip())
    if not m:
        raise GraphError(400, "ErrorInvalidRequest", "The Content-Range header is missing or malformed; expected "
                         "'bytes {start}-{end}/{total}'.")
    start, end, total = (int(g) for g in m.groups())
    if total != sess.size:
        raise GraphError(400, "ErrorInvalidRequest", f"The total size {total} does not match the upload session "
                         f"size {sess.size}.")
    if end < start or end >= total:
        raise GraphError(416, "ErrorInvalidRange", "The Content-Range is not valid.")
    length = end - start + 1
    if length > MAX_CHUNK_BYTES:
        raise GraphError(413, "RequestEntityTooLarge", "Each range of bytes can be up to 4 MB.")
    if request.content_length is not None and request.content_length != length:
        raise GraphError(400, "ErrorInvalidRequest", "Content-Length does not match the Content-Range.")
    data = request.get_data(cache=False)
    if len(data) != length:
        raise GraphError(400, "ErrorInvalidRequest", "The request body length does not match the Content-Range.")
    with state.lock:
        if start != sess.next_offset:
            raise GraphError(416, "ErrorInvalidRange", f"The uploaded range does not start at the next expected "
                             f"byte ({sess.next_offset}).")
        sess.hasher.update(data)
        if sess.data is not None:
            sess.data.extend(data)
        sess.next_offset = end + 1
        sess.expires_at = state.now() + UPLOAD_SESSION_LIFETIME_S
        state.counters["upload_chunks"] += 1
        if sess.next_offset < sess.size:
            # Intermediate ranges: 200 OK with the next expected offset.
            return _json_response(200, {
                "@odata.context": f"{_host()}/v1.0/$metadata#microsoft.graph.uploadSession",
                "expirationDateTime": iso(sess.expires_at),
                "nextExpectedRanges": [str(sess.next_offset)],
            }, ctx)
        # Final range: 201 Created, empty body, Location of the attachment.
        state.uploads.pop(sess.token, None)
        mb = state.mailboxes[sess.upn]
        msg = mb.find(sess.message_id)
        if msg is None:
            raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        att = Mailbox.make_attachment(
            {"name": sess.name, "contentType": sess.content_type, "isInline": sess.is_inline,
             "contentId": sess.content_id},
            state.now(), raw=bytes(sess.data) if sess.data is not None else None,
            sha256=sess.hasher.hexdigest(), size=sess.size,
        )
        msg["_attachments"].append(att)
        msg["hasAttachments"] = True
    location = f"{_host()}/v1.0/me/messages('{sess.message_id}')/attachments('{att['id']}')"
    return _json_response(201, None, ctx, {"Location": location})


@bp.post("/v1.0/me/messages/<mid>/send")
@bp.post("/v1.0/users/<uid>/messages/<mid>/send")
@graph_call(scopes=SEND_SCOPES)
def send_draft(ctx: _Ctx, mid: str) -> tuple[int, Any]:
    # https://learn.microsoft.com/en-us/graph/api/message-send : 202 Accepted, draft moves to Sent Items.
    state = _sb()
    with state.lock:
        mb = _mailbox(ctx)
        msg = _message_or_404(mb, mid)
        if not msg.get("isDraft"):
            raise GraphError(400, "ErrorInvalidOperation", "Only draft messages can be sent.")
        fields = {k: v for k, v in msg.items() if not k.startswith("_") and k in MESSAGE_PROPERTIES}
        _check_addresses(fields)
        size = mb.total_size(msg)
        if size > MAX_MESSAGE_BYTES:
            raise GraphError(400, "ErrorMessageSizeExceeded", "The message exceeds the maximum supported size.")
        now = state.now()
        keep = ("subject", "body", "toRecipients", "ccRecipients", "bccRecipients", "replyTo", "from",
                "importance", "internetMessageHeaders", "categories", "conversationId")
        payload = {k: fields[k] for k in keep if k in fields}
        record = _sent_record(mb, payload, msg["_attachments"], "draft", True, now, message_id=mid)
        if msg.get("_inReplyTo"):
            record.update(inReplyTo=msg["_inReplyTo"], references=msg["_references"])
        mb.sent.append(record)
        msg["isDraft"] = False
        msg["sentDateTime"] = iso(now)
        # The sent draft lands in Sent Items as another item: like any move, its id changes (unless the
        # app asked for immutable ids), so the draft's id is gone after the send.
        mb.move(msg["id"], mb.folder_id("sentitems") or "")
        deliver_to_sandbox_users(state, mb, payload, msg["_attachments"], now)
        state.counters["sendmail"] += 1
    return 202, None


# ---------------------------------------------------------------------------------------------
# reply / replyAll / forward, their createReply* drafts, and move
# ---------------------------------------------------------------------------------------------
ANSWER_ACTIONS = ("reply", "replyAll", "forward", "createReply", "createReplyAll", "createForward")


def _optional_body() -> Any:
    # The create* actions may be called without a body; the others take one.
    if not request.get_data(cache=True).strip():
        return {}
    return _body_json()


def _answer_params(action: str, payload: Any) -> tuple[str | None, dict[str, Any], list[dict[str, Any]]]:
    """(comment, message, toRecipients) of https://learn.microsoft.com/en-us/graph/api/message-reply,
    message-replyall and message-forward (and the create* variants, which take the same parameters)."""
    if not isinstance(payload, dict):
        raise _request_body_read("An unexpected 'StartArray' node was found when reading from the JSON reader. "
                                 "A 'StartObject' node was expected.")
    allowed = {"comment", "message"} | ({"torecipients"} if action.lower().endswith("forward") else set())
    for k in payload:
        if k.lower() not in allowed:
            raise _request_body_read(f"The parameter '{k}' in the request payload is not a valid parameter for "
                                     f"the operation '{action}'.")
    values = {k.lower(): v for k, v in payload.items()}
    comment = values.get("comment")
    if comment is not None and not isinstance(comment, str):
        raise _cannot_convert(comment, "Edm.String")
    message = _validate_message(values.get("message") or {}, for_send=False)
    to = _validate_recipients("ToRecipients", values["torecipients"]) if values.get("torecipients") else []
    if comment and "body" in message:
        # "You can specify either a comment or the body property of the message parameter. Specifying both
        # will return an HTTP 400 Bad Request error."
        raise GraphError(400, "ErrorInvalidRequest", "Specify either the comment or the body of the message "
                         "parameter, not both.")
    return comment, message, to


def _without(upn: str, recipients: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for r in recipients:
        addr = str(r["emailAddress"].get("address", "")).lower()
        if addr and addr != upn.lower() and addr not in seen:
            seen.add(addr)
            out.append(r)
    return out


def _answer_fields(mb: Mailbox, original: dict[str, Any], action: str, comment: str | None,
                   message: dict[str, Any], to: list[dict[str, Any]]) -> dict[str, Any]:
    """The reply/forward as Exchange builds it: recipients, RE:/FW: subject, quoted body, same conversation."""
    kind = action[len("create"):] if action.startswith("create") else action
    kind = kind[0].lower() + kind[1:]
    cc_r: list[dict[str, Any]] = []
    if kind == "forward":
        to_r = to
    else:
        to_r = _without(mb.user.upn, list(original.get("replyTo") or [original["from"]]))
        if kind == "replyAll":
            to_r = _without(mb.user.upn, to_r + list(original.get("toRecipients") or []))
            cc_r = _without(mb.user.upn, list(original.get("ccRecipients") or []))
    sender = original["from"]["emailAddress"]
    quoted = (f"<hr><b>From:</b> {sender.get('name') or ''} &lt;{sender.get('address') or ''}&gt;<br>"
              f"<b>Sent:</b> {original['sentDateTime']}<br><b>Subject:</b> {original['subject']}<br><br>"
              f"{original['body'].get('content', '')}")
    fields: dict[str, Any] = {
        "subject": ("FW: " if kind == "forward" else "RE: ") + str(original.get("subject") or ""),
        "body": {"contentType": "html", "content": f"<div>{comment or ''}</div>{quoted}"},
        "toRecipients": to_r, "ccRecipients": cc_r, "conversationId": original["conversationId"],
    }
    fields.update(message)
    fields["conversationId"] = original["conversationId"]
    return fields


def _link_to(msg: dict[str, Any], original: dict[str, Any]) -> None:
    # In-Reply-To / References, which keep the answer in the recipient's thread (RFC 5322 §3.6.4).
    msg["_inReplyTo"] = original["internetMessageId"]
    msg["_references"] = (original.get("_references") or []) + [original["internetMessageId"]]


def _answer(ctx: _Ctx, mid: str, action: str) -> tuple[int, Any]:
    comment, message, to = _answer_params(action, _optional_body() if action.startswith("create") else _body_json())
    state = _sb()
    with state.lock:
        mb = _mailbox(ctx)
        original = _message_or_404(mb, mid)
        now = state.now()
        fields = _answer_fields(mb, original, action, comment, message, to)
        attachments = _make_attachments(fields.pop("attachments", []), now)
        if action.lower().endswith("forward"):
            attachments = [dict(a, id=new_attachment_id()) for a in original["_attachments"]] + attachments
        if action.startswith("create"):
            # https://learn.microsoft.com/en-us/graph/api/message-createreply : 201 Created, a draft in Drafts.
            draft = mb.add_message("drafts", dict(fields, isDraft=True, isRead=True, receivedDateTime=iso(now)), now)
            draft.update(toRecipients=fields["toRecipients"], ccRecipients=fields["ccRecipients"],
                         _attachments=attachments, hasAttachments=bool(attachments))
            _link_to(draft, original)
            res = mb.message_resource(draft, immutable=immutable_ids())
            return 201, {"@odata.context": f"{_host()}/v1.0/$metadata#users('{ctx.user.me_id}')/messages/$entity",
                         **res}
        _check_addresses(fields)
        fields.setdefault("from", email(mb.user.upn, mb.user.display_name))
        record = _sent_record(mb, fields, attachments, action, True, now)
        record.update(inReplyTo=original["internetMessageId"],
                      references=(original.get("_references") or []) + [original["internetMessageId"]])
        mb.sent.append(record)
        save_to_sent_items(mb, fields, attachments, now)
        state.counters["sendmail"] += 1
    return 202, None  # https://learn.microsoft.com/en-us/graph/api/message-reply : 202 Accepted, no body


def _answer_view(ctx: _Ctx, mid: str, action: str) -> tuple[int, Any]:
    scopes = WRITE_SCOPES if action.startswith("create") else SEND_SCOPES
    if not has_any(ctx.rec.scopes if ctx.rec else [], *scopes):
        raise GraphError(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")
    return _answer(ctx, mid, action)


for _action in ANSWER_ACTIONS:
    _view = graph_call(scopes=READ_SCOPES)(_answer_view)
    for _root in ("me", "users/<uid>"):
        bp.add_url_rule(f"/v1.0/{_root}/messages/<mid>/{_action}", endpoint=f"answer_{_action}", methods=["POST"],
                        defaults={"action": _action}, view_func=_view)


@bp.post("/v1.0/me/messages/<mid>/move")
@bp.post("/v1.0/users/<uid>/messages/<mid>/move")
@graph_call(scopes=WRITE_SCOPES)
def move_message(ctx: _Ctx, mid: str) -> tuple[int, Any]:
    # https://learn.microsoft.com/en-us/graph/api/message-move : 201 Created with the message, under a new id.
    payload = _body_json()
    if not isinstance(payload, dict):
        raise _request_body_read("An unexpected 'StartArray' node was found when reading from the JSON reader. "
                                 "A 'StartObject' node was expected.")
    for k in payload:
        if k.lower() != "destinationid":
            raise _request_body_read(f"The parameter '{k}' in the request payload is not a valid parameter for "
                                     "the operation 'move'.")
    dest = next(iter(payload.values()), None)
    if not isinstance(dest, str) or not dest:
        raise GraphError(400, "ErrorInvalidParameter", "The value of the parameter 'DestinationId' is empty.")
    state = _sb()
    with state.lock:
        mb = _mailbox(ctx)
        moving = _message_or_404(mb, mid)
        fid = mb.folder_id(dest)
        if fid is None:
            if not _ID_RE.match(dest):
                raise GraphError(400, "ErrorInvalidIdMalformed", "Id is malformed.")
            raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        res = mb.message_resource(mb.move(moving["id"], fid), immutable=immutable_ids())
    return 201, {"@odata.context": f"{_host()}/v1.0/$metadata#users('{ctx.user.me_id}')/messages/$entity", **res}


# ---------------------------------------------------------------------------------------------
# Unknown Graph routes
# ---------------------------------------------------------------------------------------------
@bp.route("/v1.0/", defaults={"rest": ""}, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
@bp.route("/v1.0/<path:rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def unknown(rest: str) -> Response:
    ctx = _Ctx(None, str(uuid.uuid4()), request.headers.get("client-request-id") or "")
    ctx.client_request_id = ctx.client_request_id or ctx.request_id
    known = {"me", "messages", "mailFolders", "attachments"}
    segs = [s for s in rest.split("/") if s]
    bad = next((s for s in segs if s not in known), segs[-1] if segs else "v1.0")
    if request.method != "GET" and all(s in known for s in segs):
        return _error(ctx, GraphError(405, "Request_BadRequest", "Specified HTTP method is not allowed for the "
                                      "request target."))
    # Graph answers an unknown segment with 400 BadRequest "Resource not found for the segment '...'".
    return _error(ctx, GraphError(400, "BadRequest", f"Resource not found for the segment '{bad}'."))
