"""Message delta queries: ``GET /v1.0/me/mailFolders/{id}/messages/delta``.

https://learn.microsoft.com/en-us/graph/api/message-delta and
https://learn.microsoft.com/en-us/graph/delta-query-messages: the first request of the first round may
carry ``$select``, ``changeType`` (created / updated / deleted) and ``$filter=receivedDateTime ge|gt
{value}`` (the only filter delta supports); pages follow ``@odata.nextLink`` (``$skiptoken``) until
``@odata.deltaLink`` (``$deltatoken``), which starts the next round with the same options. Page size:
``Prefer: odata.maxpagesize`` (default 10). Removed (deleted or moved-away) messages come as
``{"id", "@removed": {"reason": "deleted"}}``. An unknown or forgotten token answers 410 Gone
(``SyncStateNotFound``), as Outlook does once its token cache dropped it.

Each delta token remembers the folder as it was (message id → changeKey) when its round began; the
next round compares the folder with that snapshot.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, request

from .errors import GraphError
from .graph import READ_SCOPES, _Ctx, _folder_or_404, _host, _sb, _select, graph_call, immutable_ids
from .mailbox import Mailbox

bp = Blueprint("delta", __name__)

MAX_TOKENS = 20_000
DEFAULT_PAGE = 10
_FILTER = re.compile(r"^\s*receivedDateTime\s+(ge|gt)\s+(\S+)\s*$")
_MAXPAGESIZE = re.compile(r"odata\.maxpagesize\s*=\s*(\d+)")


@dataclass
class DeltaToken:
    upn: str
    client_id: str
    folder_id: str
    select: list[str] | None
    filter: str | None
    change_type: str | None
    snapshot: dict[str, str] = field(default_factory=dict)  # immutable id -> "changeKey id" when the round began


@dataclass
class Round:
    token: DeltaToken
    items: list[dict[str, Any]]
    next_token: str


def _store(table: OrderedDict[str, Any], key: str, value: Any) -> None:
    table[key] = value
    while len(table) > MAX_TOKENS:
        table.popitem(last=False)


def _filter(raw: str | None) -> Any:
    if not raw:
        return lambda m: True
    m = _FILTER.match(raw)
    if not m:
        raise GraphError(400, "BadRequest", "The only $filter supported with delta is receivedDateTime ge|gt {value}.")
    try:
        bound = dt.datetime.fromisoformat(m.group(2).replace("Z", "+00:00"))
    except ValueError:
        raise GraphError(400, "BadRequest", f"Invalid filter value '{m.group(2)}'.") from None
    bound = bound if bound.tzinfo else bound.replace(tzinfo=dt.timezone.utc)

    def keep(msg: dict[str, Any]) -> bool:
        received = dt.datetime.fromisoformat(str(msg["receivedDateTime"]).replace("Z", "+00:00"))
        return received >= bound if m.group(1) == "ge" else received > bound

    return keep


def _new_token(ctx: _Ctx, folder_id: str) -> DeltaToken:
    change_type = request.args.get("changeType")
    if change_type is not None and change_type not in ("created", "updated", "deleted"):
        raise GraphError(400, "BadRequest", f"Invalid changeType '{change_type}'.")
    raw_filter = request.args.get("$filter", request.args.get("filter"))
    _filter(raw_filter)  # refuse a filter delta does not support now, not on a later page
    rec = ctx.rec
    assert rec is not None
    return DeltaToken(ctx.user.upn, rec.client_id, folder_id, _select(), raw_filter, change_type)


def _round(mb: Mailbox, tok: DeltaToken, *, initial: bool) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The snapshot is keyed by the immutable id (it survives moves) and holds "changeKey id" with the id of
    the time; a removed message is named by whichever id the request asks for."""
    keep = _filter(tok.filter)
    immutable = immutable_ids()
    current = {m["_immutable"]: m for m in mb.messages.values() if m["parentFolderId"] == tok.folder_id and keep(m)}
    seen = {key: value.split(" ", 1) for key, value in tok.snapshot.items()}
    created = [m for key, m in current.items() if key not in seen]
    updated = [m for key, m in current.items() if key in seen and seen[key][0] != m["changeKey"]]
    removed = [key if immutable else seen[key][1] for key in seen if key not in current]
    if initial or tok.change_type is None:
        changed, gone = created + updated, removed
    else:
        changed = {"created": created, "updated": updated}.get(tok.change_type, [])
        gone = removed if tok.change_type == "deleted" else []
    changed.sort(key=lambda m: (m["receivedDateTime"], m["id"]))
    items = [{"@odata.type": "#microsoft.graph.message", **mb.message_resource(m, tok.select, immutable=immutable)}
             for m in changed]
    items += [{"@odata.type": "#microsoft.graph.message", "id": mid, "@removed": {"reason": "deleted"}}
              for mid in gone]
    return items, {key: f"{m['changeKey']} {m['id']}" for key, m in current.items()}


def _gone() -> GraphError:
    return GraphError(410, "SyncStateNotFound", "The sync state generation is not found. The delta token is "
                      "expired and data must be synchronized again.")


def _page_size() -> int:
    m = _MAXPAGESIZE.search(request.headers.get("Prefer", ""))
    return max(1, min(int(m.group(1)), 1000)) if m else DEFAULT_PAGE


def _delta(ctx: _Ctx, folder: str) -> tuple[int, Any]:
    state = _sb()
    rec = ctx.rec
    assert rec is not None
    skip, deltatoken = request.args.get("$skiptoken"), request.args.get("$deltatoken")
    with state.lock:
        mb = state.mailboxes[ctx.user.upn]
        if skip is not None:
            page = state.delta_pages.get(skip)
            if page is None or page[0].token.upn != ctx.user.upn:
                raise _gone()
            rnd, offset = page
        else:
            if deltatoken is not None:
                tok = state.delta_tokens.get(deltatoken)
                if tok is None or tok.upn != ctx.user.upn or tok.client_id != rec.client_id:
                    raise _gone()
            else:
                tok = _new_token(ctx, _folder_or_404(mb, folder))
            items, snapshot = _round(mb, tok, initial=deltatoken is None)
            next_token = secrets.token_urlsafe(24)
            _store(state.delta_tokens, next_token, DeltaToken(tok.upn, tok.client_id, tok.folder_id, tok.select,
                                                              tok.filter, tok.change_type, snapshot))
            rnd, offset = Round(tok, items, next_token), 0
        size = _page_size()
        body: dict[str, Any] = {"@odata.context": f"{_host()}/v1.0/$metadata#Collection(message)",
                                "value": rnd.items[offset:offset + size]}
        base = f"{_host()}{request.path}"
        if offset + size < len(rnd.items):
            nxt = secrets.token_urlsafe(24)
            _store(state.delta_pages, nxt, (rnd, offset + size))
            body["@odata.nextLink"] = f"{base}?$skiptoken={nxt}"
        else:
            body["@odata.deltaLink"] = f"{base}?$deltatoken={rnd.next_token}"
        state.counters["delta_requests"] += 1
    return 200, body


@bp.get("/v1.0/me/mailFolders/<folder>/messages/delta")
@bp.get("/v1.0/users/<uid>/mailFolders/<folder>/messages/delta")
@graph_call(scopes=READ_SCOPES)
def folder_delta(ctx: _Ctx, folder: str) -> tuple[int, Any]:
    return _delta(ctx, folder)


@bp.get("/v1.0/me/mailFolders('<folder>')/messages/delta")
@bp.get("/v1.0/users/<uid>/mailFolders('<folder>')/messages/delta")
@graph_call(scopes=READ_SCOPES)
def folder_delta_quoted(ctx: _Ctx, folder: str) -> tuple[int, Any]:
    return _delta(ctx, folder)
