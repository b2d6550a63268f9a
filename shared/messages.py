"""Reading mail: folders, message pages with opaque cursors, one message, one attachment.

* Only the fields we return are requested (``$select``), newest first
  (https://learn.microsoft.com/graph/api/user-list-messages).
* Paging follows Graph's ``@odata.nextLink`` (https://learn.microsoft.com/graph/paging), but the
  caller never sees it: the cursor is the nextLink sealed with AES-GCM and bound to (owner,
  account), so it cannot be forged, read, or replayed against another account.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from urllib.parse import quote

from shared.crypto import KeyRing, account_aad
from shared.errors import ValidationError

WELL_KNOWN_FOLDERS = ("inbox", "sentitems", "drafts", "deleteditems", "archive", "junkemail", "outbox")
LIST_FIELDS = ("id", "subject", "from", "toRecipients", "receivedDateTime", "isRead", "hasAttachments",
               "bodyPreview", "webLink", "conversationId")
DETAIL_FIELDS = LIST_FIELDS + ("ccRecipients", "bccRecipients", "replyTo", "sentDateTime", "body", "importance",
                               "internetMessageId")
_ID_RE = re.compile(r"^[A-Za-z0-9_\-+=]{1,512}$")

Json = dict[str, object]  # a JSON object: values are checked where they are used


def check_id(value: str | None, field: str) -> str:
    if not value or not _ID_RE.fullmatch(value):  # fullmatch: "$" would accept a trailing newline
        raise ValidationError(field, f"{field} is not a valid Microsoft Graph id.")
    return value


def folder_segment(folder: str | None) -> str:
    f = (folder or "inbox").strip()
    if f.lower() in WELL_KNOWN_FOLDERS:
        return f.lower()
    return quote(check_id(f, "folder"), safe="")


def parse_top(raw: str | None) -> int:
    if raw is None or raw == "":
        return 25
    try:
        top = int(raw)
    except ValueError:
        raise ValidationError("top", "top must be a whole number from 1 to 100.") from None
    if not 1 <= top <= 100:
        raise ValidationError("top", "top must be a whole number from 1 to 100.")
    return top


def parse_bool(raw: str | None, field: str) -> bool:
    if raw is None or raw == "":
        return False
    if raw.lower() in ("true", "1"):
        return True
    if raw.lower() in ("false", "0"):
        return False
    raise ValidationError(field, f"{field} must be true or false.")


def seal_cursor(ring: KeyRing, owner: str, account_id: str, next_link: str) -> str:
    return ring.seal(next_link.encode(), aad=account_aad(owner, account_id, "cursor"))


def open_cursor(ring: KeyRing, owner: str, account_id: str, cursor: str) -> str:
    try:
        return ring.open(cursor, aad=account_aad(owner, account_id, "cursor")).decode()
    except Exception:
        raise ValidationError("cursor", "cursor is invalid, expired or belongs to another account.") from None


def _address(r: object) -> Json | None:
    if not isinstance(r, dict):
        return None
    ea = r.get("emailAddress") or {}
    return {"address": ea.get("address"), "name": ea.get("name")}


def _addresses(v: object) -> list[Json]:
    return [a for a in (_address(r) for r in items(v)) if a]


def fields(v: object) -> Json:
    """``v`` when it is a JSON object, else an empty one (Graph omits, or nulls, what is not set)."""
    return v if isinstance(v, dict) else {}


def items(v: object) -> list[object]:
    """``v`` when it is a JSON array, else an empty one."""
    return v if isinstance(v, list) else []


def map_summary(m: Json) -> Json:
    return {
        "id": m.get("id"), "subject": m.get("subject"), "from": _address(m.get("from")),
        "toRecipients": _addresses(m.get("toRecipients")), "receivedDateTime": m.get("receivedDateTime"),
        "isRead": m.get("isRead"), "hasAttachments": m.get("hasAttachments"), "bodyPreview": m.get("bodyPreview"),
        "webLink": m.get("webLink"), "conversationId": m.get("conversationId"),
    }


def map_detail(m: Json, attachments: list[Json]) -> Json:
    body = fields(m.get("body"))
    out = map_summary(m)
    out.update({
        "ccRecipients": _addresses(m.get("ccRecipients")), "bccRecipients": _addresses(m.get("bccRecipients")),
        "replyTo": _addresses(m.get("replyTo")), "sentDateTime": m.get("sentDateTime"),
        "importance": m.get("importance"), "internetMessageId": m.get("internetMessageId"),
        "body": {"contentType": str(body.get("contentType", "text")).lower(), "content": body.get("content", "")},
        "attachments": [
            {"id": a.get("id"), "name": a.get("name"), "contentType": a.get("contentType"), "size": a.get("size"),
             "isInline": a.get("isInline", False),
             "kind": str(a.get("@odata.type", "#microsoft.graph.fileAttachment")).rsplit(".", 1)[-1]}
            for a in attachments
        ],
    })
    return out


def map_folder(f: Json) -> Json:
    return {k: f.get(k) for k in ("id", "displayName", "parentFolderId", "totalItemCount", "unreadItemCount",
                                  "childFolderCount")}


# -- finding mail: $filter / $orderby / $search ----------------------------------------
# A $filter with $orderby on messages must name the $orderby property in $filter, first, or Graph answers
# 400 InefficientFilter (https://learn.microsoft.com/graph/api/user-list-messages#using-filter-and-orderby-in-the-same-query):
# every filtered listing therefore starts with a receivedDateTime clause (this one matches every message).
_EPOCH = "1900-01-01T00:00:00Z"
_SEARCH_MAX = 512
_DATETIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d(?::\d\d(?:\.\d{1,7})?)?(?:Z|[+-]\d\d:\d\d)")


@dataclass(frozen=True)
class MessageQuery:
    folder: str | None = None
    top: int = 25
    unread_only: bool = False
    q: str | None = None
    conversation_id: str | None = None
    sender: str | None = None
    received_after: str | None = None
    received_before: str | None = None


def parse_datetime(raw: str | None, field: str) -> str | None:
    """An RFC 3339 date-time with a zone, as Graph's UTC literal (``2026-01-31T09:00:00Z``)."""
    if raw is None or raw == "":
        return None
    if not _DATETIME_RE.fullmatch(raw):
        raise ValidationError(field, f"{field} must be a date-time with a time zone, like 2026-01-31T09:00:00Z.")
    try:
        value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError(field, f"{field} is not a valid date-time.") from None
    if not dt.datetime(1900, 1, 1, tzinfo=dt.UTC) <= value <= dt.datetime(9999, 1, 1, tzinfo=dt.UTC):
        raise ValidationError(field, f"{field} is out of range.")
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_search(raw: str | None) -> str | None:
    if raw is None or raw == "":
        return None
    if len(raw) > _SEARCH_MAX or not raw.strip():
        raise ValidationError("q", f"q must be 1-{_SEARCH_MAX} characters of search text.")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in raw):
        raise ValidationError("q", "q must not contain control characters.")
    return raw.strip()


def _odata_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _kql_phrase(value: str) -> str:
    # The whole $search value is a double-quoted string; inner quotes and backslashes are escaped.
    return value.replace("\\", "\\\\").replace('"', '\\"')


def list_request(query: MessageQuery) -> tuple[str, dict[str, str]]:
    """Graph path and query options for a listing; 400 naming the parameter Graph cannot combine."""
    if query.q is not None:
        return _search_request(query)
    if query.received_after and query.received_before and query.received_after >= query.received_before:
        raise ValidationError("receivedBefore", "receivedBefore must be later than receivedAfter.")
    clauses = [f"receivedDateTime ge {query.received_after or _EPOCH}"]
    if query.received_before:
        clauses.append(f"receivedDateTime lt {query.received_before}")
    if query.unread_only:
        clauses.append("isRead eq false")
    if query.conversation_id:
        clauses.append(f"conversationId eq {_odata_str(query.conversation_id)}")
    if query.sender:
        clauses.append(f"from/emailAddress/address eq {_odata_str(query.sender)}")
    # A thread reads oldest first, across folders (Inbox and Sent Items) unless a folder is named.
    thread = query.conversation_id is not None
    base = "me/messages" if thread and query.folder is None else f"me/mailFolders/{folder_segment(query.folder)}/messages"
    return base, {"$top": str(query.top), "$select": ",".join(LIST_FIELDS), "$filter": " and ".join(clauses),
                  "$orderby": "receivedDateTime " + ("asc" if thread else "desc")}


def _search_request(query: MessageQuery) -> tuple[str, dict[str, str]]:
    """``$search`` takes no ``$filter`` (SearchWithFilter) and no ``$orderby`` (SearchWithOrderBy); Graph sorts
    by sent date, newest first, pages with ``$skiptoken`` and returns at most 1,000 results
    (https://learn.microsoft.com/graph/search-query-parameter#using-search-on-message-collections)."""
    for name, value in (("conversationId", query.conversation_id), ("receivedAfter", query.received_after),
                        ("receivedBefore", query.received_before), ("unreadOnly", query.unread_only or None)):
        if value is not None:
            raise ValidationError(name, f"{name} cannot be combined with q: Microsoft Graph does not filter or "
                                  "sort a full-text search. Search without it, or list without q.")
    kql = query.q or ""
    if query.sender:
        kql = f"from:{query.sender} AND ({kql})"
    path = f"me/mailFolders/{folder_segment(query.folder)}/messages" if query.folder else "me/messages"
    return path, {"$top": str(query.top), "$select": ",".join(LIST_FIELDS), "$search": f'"{_kql_phrase(kql)}"'}


# -- organising: PATCH (isRead, flag, categories) --------------------------------------------------
FLAG_STATUSES = ("notFlagged", "flagged", "complete")
_CATEGORY_MAX = 50


def parse_update(body: object) -> Json:
    """The Graph PATCH body for ``isRead``, ``flag``, ``categories`` (https://learn.microsoft.com/graph/api/message-update)."""
    if not isinstance(body, dict):
        raise ValidationError("body", "The request body must be a JSON object.")
    unknown = sorted(set(body) - {"isRead", "flag", "categories"})
    if unknown:
        raise ValidationError(unknown[0], f"Unknown field {unknown[0]!r}; give isRead, flag or categories.")
    if not body:
        raise ValidationError("body", "Give at least one of isRead, flag, categories.")
    out: Json = {}
    if "isRead" in body:
        if not isinstance(body["isRead"], bool):
            raise ValidationError("isRead", "isRead must be true or false.")
        out["isRead"] = body["isRead"]
    if "flag" in body:
        if body["flag"] not in FLAG_STATUSES:
            raise ValidationError("flag", "flag must be notFlagged, flagged or complete.")
        out["flag"] = {"flagStatus": body["flag"]}
    if "categories" in body:
        out["categories"] = _categories(body["categories"])
    return out


def _categories(raw: object) -> list[str]:
    if not isinstance(raw, list) or len(raw) > _CATEGORY_MAX:
        raise ValidationError("categories", f"categories must be a list of at most {_CATEGORY_MAX} names.")
    for i, c in enumerate(raw):
        if not isinstance(c, str) or not c.strip() or len(c) > 255 or any(ord(x) < 0x20 for x in c):
            raise ValidationError(f"categories[{i}]", f"categories[{i}] must be a category name (1-255 characters).")
    return list(dict.fromkeys(raw))


def map_organised(m: Json) -> Json:
    """A summary plus what organising changes."""
    out = map_summary(m)
    flag = fields(m.get("flag"))
    out.update({"flag": flag.get("flagStatus", "notFlagged"), "categories": items(m.get("categories")),
                "parentFolderId": m.get("parentFolderId")})
    return out


def move_destination(folder: object) -> str:
    """``folder`` of a move: a well-known name (lower-cased) or a folder id."""
    if not isinstance(folder, str) or not folder.strip():
        raise ValidationError("folder", "folder must be a well-known folder name (inbox, archive, …) or a folder id.")
    f = folder.strip()
    return f.lower() if f.lower() in WELL_KNOWN_FOLDERS else check_id(f, "folder")


# -- attachment downloads: whole, or one byte range (RFC 9110 §14) --------------------------------
_RANGE_RE = re.compile(r"bytes=(\d{0,15})-(\d{0,15})")


def parse_range(raw: str | None) -> tuple[int | None, int | None] | None:
    """``Range: bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` as (first, last) / (first, None) / (None, n)."""
    if raw is None or not raw.strip():
        return None
    m = _RANGE_RE.fullmatch(raw.strip().replace(" ", ""))
    if not m or (not m.group(1) and not m.group(2)):
        raise ValidationError("Range", "Range must be one byte range: bytes=first-last, bytes=first- or bytes=-n.")
    first = int(m.group(1)) if m.group(1) else None
    last = int(m.group(2)) if m.group(2) else None
    if first is not None and last is not None and last < first:
        raise ValidationError("Range", "Range: the last byte is before the first.")
    if first is None and last == 0:
        raise ValidationError("Range", "Range: a suffix range needs at least one byte.")
    return first, last
