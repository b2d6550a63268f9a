"""An Outlook mailbox as Graph exposes it: folders, messages, attachments, sent items.

Resource shapes follow https://learn.microsoft.com/en-us/graph/api/resources/message and
https://learn.microsoft.com/en-us/graph/api/resources/mailfolder; well-known folder names from
https://learn.microsoft.com/en-us/graph/api/resources/mailfolder (inbox, drafts, sentitems, ...).
Not thread-safe by itself: callers hold ``SandboxState.lock``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import random
import secrets
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from .users import TestUser

WELL_KNOWN_FOLDERS = {
    "inbox": "Inbox",
    "drafts": "Drafts",
    "sentitems": "Sent Items",
    "deleteditems": "Deleted Items",
    "archive": "Archive",
    "junkemail": "Junk Email",
    "outbox": "Outbox",
}

# Properties of microsoft.graph.message accepted in $select and in request bodies.
MESSAGE_PROPERTIES = {
    "id", "createdDateTime", "lastModifiedDateTime", "changeKey", "categories", "receivedDateTime",
    "sentDateTime", "hasAttachments", "internetMessageId", "subject", "bodyPreview", "importance",
    "parentFolderId", "conversationId", "conversationIndex", "isDeliveryReceiptRequested",
    "isReadReceiptRequested", "isRead", "isDraft", "webLink", "inferenceClassification", "body",
    "uniqueBody", "sender", "from", "toRecipients", "ccRecipients", "bccRecipients", "replyTo",
    "flag", "internetMessageHeaders", "attachments", "singleValueExtendedProperties",
    "multiValueExtendedProperties", "extensions", "mentions",
}
_NOT_SELECTED_BY_DEFAULT = {"internetMessageHeaders", "uniqueBody", "attachments", "extensions",
                            "singleValueExtendedProperties", "multiValueExtendedProperties", "mentions"}


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_message_id() -> str:
    return "AAMkAG" + base64.urlsafe_b64encode(secrets.token_bytes(45)).decode() + "AAA="


def new_attachment_id() -> str:
    return "AAMkAG" + base64.urlsafe_b64encode(secrets.token_bytes(60)).decode() + "="


def _folder_id(user: TestUser, name: str) -> str:
    digest = hashlib.sha256(f"{user.oid}/{name}".encode()).digest()
    return "AQMkAD" + base64.urlsafe_b64encode(digest + digest[:12]).decode() + "AAA="


def new_change_key() -> str:
    return base64.b64encode(secrets.token_bytes(12)).decode()


def new_conversation_id() -> str:
    return "AAQkAG" + base64.urlsafe_b64encode(secrets.token_bytes(24)).decode()


SYNTHETIC_CHUNK = 1024 * 1024


def synthetic_chunks(seed: str, size: int) -> Iterator[bytes]:
    """Deterministic pseudo-random content of ``size`` bytes: a large attachment the sandbox can serve
    (and a test can check) without holding it. Tests compute the same stream to verify a download."""
    rng = random.Random(seed)
    left = size
    while left > 0:
        n = min(SYNTHETIC_CHUNK, left)
        yield rng.randbytes(n)
        left -= n


def email(address: str, name: str | None = None) -> dict[str, Any]:
    return {"emailAddress": {"name": name or address, "address": address}}


class Mailbox:
    def __init__(self, user: TestUser, on_added: Callable[[Mailbox, dict[str, Any]], None] | None = None,
                 on_changed: Callable[[Mailbox, dict[str, Any], str, dict[str, Any]], None] | None = None) -> None:
        self.user = user
        self.on_added = on_added  # a message appeared in a folder (change notifications)
        # a message changed ("updated"), was removed ("deleted") or moved ("moved"; the last argument has
        # the id and folder it had before): change notifications
        self.on_changed = on_changed
        self.folders: dict[str, dict[str, Any]] = {}
        for wk, display in WELL_KNOWN_FOLDERS.items():
            fid = _folder_id(user, wk)
            self.folders[fid] = {"id": fid, "displayName": display, "wellKnownName": wk}
        self.messages: dict[str, dict[str, Any]] = {}
        self.sent: list[dict[str, Any]] = []
        self._seq = 0

    # -- folders -------------------------------------------------------------------------
    def folder_id(self, ref: str) -> str | None:
        if ref in self.folders:
            return ref
        wk = ref.lower()
        for fid, f in self.folders.items():
            if f["wellKnownName"] == wk:
                return fid
        return None

    def folder_resource(self, fid: str) -> dict[str, Any]:
        f = self.folders[fid]
        msgs = [m for m in self.messages.values() if m["parentFolderId"] == fid]
        return {
            "id": fid,
            "displayName": f["displayName"],
            "parentFolderId": _folder_id(self.user, "msgfolderroot"),
            "childFolderCount": 0,
            "unreadItemCount": sum(1 for m in msgs if not m["isRead"]),
            "totalItemCount": len(msgs),
            "sizeInBytes": sum(len(m["body"]["content"]) for m in msgs),
            "isHidden": False,
        }

    # -- messages ------------------------------------------------------------------------
    def add_message(self, folder_ref: str, fields: dict[str, Any], now: float) -> dict[str, Any]:
        fid = self.folder_id(folder_ref)
        if fid is None:
            raise KeyError(folder_ref)
        self._seq += 1
        mid = new_message_id()
        received = fields.get("receivedDateTime") or iso(now - self._seq)
        body = fields.get("body") or {"contentType": "text", "content": f"Message body {self._seq}"}
        attachments = [self.make_attachment(a, now) for a in fields.get("attachments") or []]
        msg: dict[str, Any] = {
            "id": mid,
            "_immutable": new_message_id(),  # stays when the message moves (https://learn.microsoft.com/graph/outlook-immutable-id)
            "createdDateTime": received,
            "lastModifiedDateTime": received,
            "changeKey": base64.b64encode(secrets.token_bytes(12)).decode(),
            "categories": list(fields.get("categories") or []),
            "receivedDateTime": received,
            "sentDateTime": fields.get("sentDateTime") or received,
            "hasAttachments": bool(attachments),
            "internetMessageId": fields.get("internetMessageId") or f"<{uuid.uuid4().hex}@sandbox.local>",
            "subject": fields.get("subject", f"Seeded message {self._seq}"),
            "bodyPreview": body_preview(body),
            "importance": fields.get("importance", "normal"),
            "parentFolderId": fid,
            "conversationId": fields.get("conversationId") or new_conversation_id(),
            "isDeliveryReceiptRequested": False,
            "isReadReceiptRequested": False,
            "isRead": bool(fields.get("isRead", False)),
            "isDraft": bool(fields.get("isDraft", False)),
            "webLink": f"https://outlook.office365.com/owa/?ItemID={mid}&exvsurl=1&viewmodel=ReadMessageItem",
            "inferenceClassification": "focused",
            "body": body,
            "sender": fields.get("sender") or fields.get("from") or email("sender@example.com", "Sender"),
            "from": fields.get("from") or email("sender@example.com", "Sender"),
            "toRecipients": fields.get("toRecipients") or [email(self.user.upn, self.user.display_name)],
            "ccRecipients": fields.get("ccRecipients") or [],
            "bccRecipients": fields.get("bccRecipients") or [],
            "replyTo": fields.get("replyTo") or [],
            "flag": fields.get("flag") or {"flagStatus": "notFlagged"},
            "internetMessageHeaders": fields.get("internetMessageHeaders") or [],
            "_attachments": attachments,
            # singleValueExtendedProperties: kept on the item (and on its Sent Items copy), returned only when
            # asked for with $expand (https://learn.microsoft.com/graph/api/singlevaluelegacyextendedproperty-get)
            "_extended": [dict(p) for p in fields.get("singleValueExtendedProperties") or []],
        }
        self.messages[mid] = msg
        if self.on_added is not None:
            self.on_added(self, msg)
        return msg

    def seed(self, count_or_list: int | list[dict[str, Any]], folder: str, now: float) -> list[str]:
        items = count_or_list if isinstance(count_or_list, list) else [{} for _ in range(count_or_list)]
        return [self.add_message(folder, dict(item), now)["id"] for item in items]

    @staticmethod
    def make_attachment(att: dict[str, Any], now: float, raw: bytes | None = None,
                        sha256: str | None = None, size: int | None = None) -> dict[str, Any]:
        synthetic = None
        if raw is None and att.get("contentBytes") is not None:
            raw = base64.b64decode(att["contentBytes"], validate=True)
        elif raw is None and sha256 is None and isinstance(att.get("seed"), str):
            synthetic = (att["seed"], int(att["size"]))  # served by streaming synthetic_chunks()
            size = synthetic[1]
        if raw is not None:
            sha256 = hashlib.sha256(raw).hexdigest()
            size = len(raw)
        return {
            "@odata.type": att.get("@odata.type", "#microsoft.graph.fileAttachment"),
            "id": new_attachment_id(),
            "lastModifiedDateTime": iso(now),
            "name": att.get("name", "attachment.bin"),
            "contentType": att.get("contentType") or "application/octet-stream",
            "size": int(size or 0),
            "isInline": bool(att.get("isInline", False)),
            "contentId": att.get("contentId"),
            "sha256": sha256,
            # Bytes are kept only for small attachments (reads); large ones keep size + SHA-256.
            "_bytes": raw if raw is not None and len(raw) <= 16 * 1024 * 1024 else None,
            "_synthetic": synthetic,
        }

    @staticmethod
    def attachment_resource(att: dict[str, Any], with_content: bool = True) -> dict[str, Any]:
        out = {k: v for k, v in att.items() if not k.startswith("_") and k != "sha256"}
        if with_content and att.get("_bytes") is not None:
            out["contentBytes"] = base64.b64encode(att["_bytes"]).decode()
        return out

    @staticmethod
    def attachment_metadata(att: dict[str, Any]) -> dict[str, Any]:
        return {
            "@odata.type": att["@odata.type"], "name": att["name"], "contentType": att["contentType"],
            "size": att["size"], "isInline": att["isInline"], "contentId": att.get("contentId"),
            "sha256": att["sha256"],
        }

    def find(self, mid: str) -> dict[str, Any] | None:
        """The message with this id: its current id, or its immutable id (Graph takes either in a URL)."""
        msg = self.messages.get(mid)
        if msg is None:
            msg = next((m for m in self.messages.values() if m.get("_immutable") == mid), None)
        return msg

    def message_resource(self, msg: dict[str, Any], select: list[str] | None = None,
                         expand_attachments: bool = False, immutable: bool = False) -> dict[str, Any]:
        """``immutable``: the request sent ``Prefer: IdType="ImmutableId"``, so ids are the immutable ones."""
        out: dict[str, Any] = {"@odata.etag": f'W/"{msg["changeKey"]}"',
                               "id": msg["_immutable"] if immutable else msg["id"]}
        for k, v in msg.items():
            if k.startswith("_") or k == "id":
                continue
            if select is not None:
                if k in select:
                    out[k] = v
            elif k not in _NOT_SELECTED_BY_DEFAULT:
                out[k] = v
        if select is not None and "internetMessageHeaders" in select:
            out["internetMessageHeaders"] = msg["internetMessageHeaders"]
        if expand_attachments:
            out["attachments"] = [self.attachment_resource(a) for a in msg["_attachments"]]
        return out

    def move(self, mid: str, fid: str) -> dict[str, Any]:
        """Move a message (its current id ``mid``) to folder ``fid``. Exchange gives the moved item a new id, so
        the sandbox does too: the old id is gone afterwards. Its immutable id stays: an app that asks for
        immutable ids sees the same id before and after."""
        msg = self.messages.pop(mid)
        before = {"id": mid, "parentFolderId": msg["parentFolderId"]}
        msg["id"] = new_message_id()
        msg["parentFolderId"] = fid
        msg["webLink"] = msg["webLink"].replace(mid, msg["id"])
        msg["changeKey"] = new_change_key()
        self.messages[msg["id"]] = msg
        if self.on_changed is not None:
            self.on_changed(self, msg, "moved", before)
        return msg

    def update(self, msg: dict[str, Any], fields: dict[str, Any], now: float) -> None:
        """Change properties of a message: Exchange gives it a new changeKey, and Graph notifies ``updated``."""
        msg.update(fields)
        msg["lastModifiedDateTime"] = iso(now)
        msg["changeKey"] = new_change_key()
        if self.on_changed is not None:
            self.on_changed(self, msg, "updated", {})

    def remove(self, msg: dict[str, Any]) -> None:
        """Delete a message; Graph notifies ``deleted``."""
        del self.messages[msg["id"]]
        if self.on_changed is not None:
            self.on_changed(self, msg, "deleted", {})

    @staticmethod
    def extended_properties(msg: dict[str, Any], wanted: str) -> list[dict[str, Any]]:
        """The message's extended properties whose id is ``wanted`` (ids compare case-insensitively)."""
        return [dict(p) for p in msg.get("_extended") or [] if str(p.get("id", "")).lower() == wanted.lower()]

    def total_size(self, msg: dict[str, Any]) -> int:
        return len(str(msg["body"].get("content", "")).encode()) + sum(a["size"] for a in msg["_attachments"])


def body_preview(body: dict[str, Any]) -> str:
    """Graph's ``bodyPreview``: "the first 255 characters of the message body, in text format"
    (https://learn.microsoft.com/graph/api/resources/message): an HTML body without its markup, scripts and
    styles, entities decoded and whitespace collapsed."""
    content = str(body.get("content", ""))
    if str(body.get("contentType", "text")).lower() == "html":
        from html.parser import HTMLParser

        parts: list[str] = []

        hidden = ("script", "style", "head", "title")
        blocks = ("p", "br", "div", "li", "tr", "td", "h1", "h2", "h3", "blockquote", "table", "ul", "ol")

        class _Text(HTMLParser):
            skip = 0  # inside how many elements whose text is not shown

            def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
                if tag in hidden:
                    self.skip += 1
                elif tag in blocks:
                    parts.append(" ")

            def handle_endtag(self, tag: str) -> None:
                if tag in hidden and self.skip:
                    self.skip -= 1
                elif tag in blocks:
                    parts.append(" ")

            def handle_data(self, data: str) -> None:
                if not self.skip:
                    parts.append(data)

        parser = _Text(convert_charrefs=True)
        parser.feed(content)
        parser.close()
        content = "".join(parts)
    return " ".join(content.split())[:255]
