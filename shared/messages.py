"""Reading mail: folders, message pages with opaque cursors, one message, one attachment.

* Only the fields we return are requested (``$select``), newest first
  (https://learn.microsoft.com/graph/api/user-list-messages).
* Paging follows Graph's ``@odata.nextLink`` (https://learn.microsoft.com/graph/paging), but the
  caller never sees it: the cursor is the nextLink sealed with AES-GCM and bound to (owner,
  account), so it cannot be forged, read, or replayed against another account.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

from shared.crypto import KeyRing, account_aad
from shared.errors import ValidationError

WELL_KNOWN_FOLDERS = ("inbox", "sentitems", "drafts", "deleteditems", "archive", "junkemail", "outbox")
LIST_FIELDS = ("id", "subject", "from", "toRecipients", "receivedDateTime", "isRead", "hasAttachments",
               "bodyPreview", "webLink", "conversationId")
DETAIL_FIELDS = LIST_FIELDS + ("ccRecipients", "bccRecipients", "replyTo", "sentDateTime", "body", "importance",
                               "internetMessageId")
_ID_RE = re.compile(r"^[A-Za-z0-9_\-+=]{1,512}$")


def check_id(value: str | None, field: str) -> str:
    if not value or not _ID_RE.match(value):
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


def _address(r: Any) -> dict[str, Any] | None:
    if not isinstance(r, dict):
        return None
    ea = r.get("emailAddress") or {}
    return {"address": ea.get("address"), "name": ea.get("name")}


def _addresses(v: Any) -> list[dict[str, Any]]:
    return [a for a in (_address(r) for r in (v or [])) if a]


def map_summary(m: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": m.get("id"), "subject": m.get("subject"), "from": _address(m.get("from")),
        "toRecipients": _addresses(m.get("toRecipients")), "receivedDateTime": m.get("receivedDateTime"),
        "isRead": m.get("isRead"), "hasAttachments": m.get("hasAttachments"), "bodyPreview": m.get("bodyPreview"),
        "webLink": m.get("webLink"), "conversationId": m.get("conversationId"),
    }


def map_detail(m: dict[str, Any], attachments: list[dict[str, Any]]) -> dict[str, Any]:
    body = m.get("body") or {}
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


def map_folder(f: dict[str, Any]) -> dict[str, Any]:
    return {k: f.get(k) for k in ("id", "displayName", "parentFolderId", "totalItemCount", "unreadItemCount",
                                  "childFolderCount")}
