"""Send requests → Graph payloads; inline vs upload-session attachments.

Graph facts encoded here:
* ``POST /me/sendMail`` answers 202 with no body; a request over 4 MB is refused, so attachments
  go inline only while they total ≤ 3 MB
  (https://learn.microsoft.com/graph/api/user-sendmail).
* Larger files: create a draft, ``createUploadSession`` per file, ranged ``PUT``s of < 4 MB to the
  returned URL **without** an Authorization header, then ``POST /messages/{id}/send``; up to 150 MB
  a file (https://learn.microsoft.com/graph/outlook-large-attachments).
* Custom internet headers must start with ``X-`` (https://learn.microsoft.com/graph/api/resources/internetmessageheader).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from shared.errors import PayloadTooLargeError, ValidationError

INLINE_ATTACHMENTS_MAX = 3 * 1024 * 1024
GRAPH_REQUEST_MAX = 4 * 1024 * 1024
# Graph refuses an upload session for a file under 3 MB (ErrorAttachmentSizeShouldNotBeLessThanMinimumSize);
# such files that do not fit inline are POSTed to the draft's attachments one by one instead.
# https://learn.microsoft.com/graph/outlook-large-attachments
# (3,000,000 bytes: above the 2 MiB minimum Graph is seen to enforce, and small enough that one such
# file, base64-encoded, still fits a 4 MB POST.)
UPLOAD_SESSION_MIN = 3_000_000
ATTACHMENT_MAX = 150 * 1024 * 1024
# Multiple of 320 KiB as Graph recommends for upload sessions, and under the 4 MB per-PUT limit.
UPLOAD_CHUNK = 320 * 1024 * 12
TRACKING_HEADER = "X-Connector-Tracking-Id"
# The trackingId is also stored on the message as a named extended property, which Exchange keeps on the Sent
# Items copy (a header of ours is a transport header: not dependable on the copy), so a ``message.sent`` event
# can tell mail sent through this API from mail sent in Outlook.
# https://learn.microsoft.com/graph/api/resources/extended-properties-overview
TRACKING_PROPERTY = "String {5d6c3b1e-8f0a-4c2e-9b7d-3a1f0e4c6b28} Name ConnectorTrackingId"
# Exchange Online's default recipient limit is 500 per message, To, Cc and Bcc together (an admin can
# raise it to 1,000); counted here with Reply-To as a bound on the whole request
# https://learn.microsoft.com/office365/servicedescriptions/exchange-online-service-description/exchange-online-limits#sending-limits
MAX_RECIPIENTS = 500
# Graph sets no count of attachments per message; each one beyond the inline budget costs a Graph
# request, so a message carries at most this many (multipart: as many file parts, plus 'message').
MAX_ATTACHMENTS = 100

# RFC 5322 addr-spec (dot-atom local part or quoted string) with an RFC 1035-style domain.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LOCAL = rf"(?:{_ATEXT}+(?:\.{_ATEXT}+)*|\"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*\")"
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
_ADDR_RE = re.compile(rf"^{_LOCAL}@{_DOMAIN}$")
_NAMED_RE = re.compile(r'^\s*"?(?P<name>[^"<>]*?)"?\s*<(?P<addr>[^<>]+)>\s*$')
_TRACKING_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_CONTENT_TYPE_RE = re.compile(r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+(?:\s*;.*)?$")

Json = dict[str, object]  # a JSON object: values are checked where they are used


@dataclass(frozen=True)
class Recipient:
    address: str
    name: str | None = None

    def to_graph(self) -> Json:
        ea: dict[str, str] = {"address": self.address}
        if self.name:
            ea["name"] = self.name
        return {"emailAddress": ea}


@dataclass
class Attachment:
    """A file to attach: bytes, or a seekable binary file (a multipart part spooled to disk), which
    is then read chunk by chunk for upload sessions instead of being copied into memory."""

    name: str
    content_type: str
    data: bytes | memoryview | BinaryIO = field(repr=False)

    @property
    def size(self) -> int:
        if isinstance(self.data, (bytes, bytearray, memoryview)):
            return len(self.data)
        pos = self.data.tell()
        end = self.data.seek(0, io.SEEK_END)
        self.data.seek(pos)
        return end

    def read_all(self) -> bytes | memoryview:
        """The whole content (only for files small enough to travel inline, ≤ 3 MB)."""
        if isinstance(self.data, (bytes, bytearray, memoryview)):
            return self.data
        self.data.seek(0)
        return self.data.read()

    def chunks(self, size: int = 0) -> Iterator[tuple[int, bytes | memoryview]]:
        """(offset, piece) for ranged PUTs: zero-copy slices of bytes, or reads of ``size`` from a file."""
        size = size or UPLOAD_CHUNK
        if isinstance(self.data, (bytes, bytearray, memoryview)):
            view = memoryview(self.data)
            for start in range(0, len(view), size):
                yield start, view[start : start + size]
            return
        self.data.seek(0)
        start = 0
        while piece := self.data.read(size):
            yield start, piece
            start += len(piece)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for _, piece in self.chunks():
            h.update(piece)
        return h.hexdigest()


@dataclass
class SendRequest:
    to: list[Recipient]
    cc: list[Recipient]
    bcc: list[Recipient]
    reply_to: list[Recipient]
    subject: str
    body_html: str | None
    body_text: str | None
    attachments: list[Attachment]
    importance: str
    tracking_id: str
    save_to_sent_items: bool

    @property
    def attachment_bytes(self) -> int:
        return sum(a.size for a in self.attachments)


# C0 controls but tab, DEL, and the Unicode line breaks (NEL, LS, PS) some mail systems honour.
_CONTROL_RE = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")


_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _no_control(field_name: str, value: str) -> None:
    if not value.isascii() and _SURROGATE_RE.search(value):  # e.g. a multipart file name
        raise ValidationError(field_name, f"{field_name} holds text that is not Unicode (a lone surrogate).")
    if _CONTROL_RE.search(value):
        raise ValidationError(field_name, f"{field_name} must not contain line breaks or control characters "
                              "(header injection).")


def parse_recipient(value: object, field_name: str) -> Recipient:
    if isinstance(value, dict):
        address, name = value.get("address"), value.get("name")
        if not isinstance(address, str) or (name is not None and not isinstance(name, str)):
            raise ValidationError(field_name, f"{field_name} must be {{\"address\": str, \"name\"?: str}}.")
    elif isinstance(value, str):
        _no_control(field_name, value)
        m = _NAMED_RE.fullmatch(value)
        address, name = (m.group("addr"), m.group("name").strip() or None) if m else (value, None)
    else:
        raise ValidationError(field_name, f"{field_name} must be an address string or an object.")
    address = address.strip()
    _no_control(field_name, address)
    if name is not None:
        _no_control(field_name, name)
        if len(name) > 256:
            raise ValidationError(field_name, f"{field_name}: the display name is too long.")
    if len(address) > 254 or not _ADDR_RE.fullmatch(address):
        raise ValidationError(field_name, f"{field_name}: {address[:80]!r} is not a valid email address.")
    return Recipient(address, name)


def mailbox_address(value: object, field_name: str = "address") -> str:
    """One bare address (RFC 5322 addr-spec): no display name, no CR/LF or other control characters, at most
    254 characters (RFC 5321 §4.5.3.1.3 path limit less the brackets)."""
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(field_name, f"{field_name} is required: one email address.")
    _no_control(field_name, value)
    address = value.strip()
    if len(address) > 254 or not _ADDR_RE.fullmatch(address):
        raise ValidationError(field_name, f"{field_name} must be one email address without a display name.")
    return address


def _recipients(body: Json, key: str, *, required: bool = False) -> list[Recipient]:
    raw = body.get(key)
    if raw is None:
        if required:
            raise ValidationError(key, f"{key} is required (at least one recipient).")
        return []
    if isinstance(raw, (str, dict)):
        raw = [raw]
    if not isinstance(raw, list):
        raise ValidationError(key, f"{key} must be a list of recipients.")
    if required and not raw:
        raise ValidationError(key, f"{key} needs at least one recipient.")
    if len(raw) > MAX_RECIPIENTS:
        raise ValidationError(key, f"{key} has more than {MAX_RECIPIENTS} recipients.")
    return [parse_recipient(v, f"{key}[{i}]") for i, v in enumerate(raw)]


def _opt_str(body: Json, key: str, max_len: int) -> str | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise ValidationError(key, f"{key} must be a string.")
    if len(v) > max_len:
        raise ValidationError(key, f"{key} is longer than {max_len} characters.")
    return v


KNOWN_FIELDS = {"to", "cc", "bcc", "replyTo", "subject", "bodyHtml", "bodyText", "attachments", "importance",
                "trackingId", "saveToSentItems"}


def parse_send_request(body: object, *, files: list[Attachment] | None = None, max_total: int) -> SendRequest:
    """Validate a send body; raise ValidationError naming the field, 413 beyond caps."""
    if not isinstance(body, dict):
        raise ValidationError("body", "The request body must be a JSON object.")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise ValidationError(unknown[0], f"Unknown field {unknown[0]!r}.")
    subject = _opt_str(body, "subject", 998) or ""
    _no_control("subject", subject)
    html = _opt_str(body, "bodyHtml", 4 * 1024 * 1024)
    text = _opt_str(body, "bodyText", 4 * 1024 * 1024)
    importance = body.get("importance", "normal")
    if importance not in ("low", "normal", "high"):
        raise ValidationError("importance", "importance must be low, normal or high.")
    tracking = _tracking_id(body)
    save = body.get("saveToSentItems", True)
    if not isinstance(save, bool):
        raise ValidationError("saveToSentItems", "saveToSentItems must be true or false.")
    _check_recipient_total(body)
    attachments = _checked_attachments(body, files, max_total)
    return SendRequest(
        to=_recipients(body, "to", required=True), cc=_recipients(body, "cc"), bcc=_recipients(body, "bcc"),
        reply_to=_recipients(body, "replyTo"), subject=subject, body_html=html, body_text=text,
        attachments=attachments, importance=importance, tracking_id=tracking, save_to_sent_items=save)


def _tracking_id(body: Json) -> str:
    tracking = body.get("trackingId")
    if tracking is None:
        return uuid.uuid4().hex
    if not isinstance(tracking, str) or not _TRACKING_RE.fullmatch(tracking):
        raise ValidationError("trackingId", "trackingId must be 1-128 characters of letters, digits, . _ : -")
    return tracking


def _checked_attachments(body: Json, files: list[Attachment] | None, max_total: int) -> list[Attachment]:
    """JSON attachments plus multipart files: at most MAX_ATTACHMENTS, Graph's 150 MB a file, our total cap (413)."""
    attachments = list(_attachments(body.get("attachments")))
    attachments += files or []
    if len(attachments) > MAX_ATTACHMENTS:
        raise PayloadTooLargeError(f"The message has {len(attachments)} attachments; at most {MAX_ATTACHMENTS}.",
                                   extra={"field": "attachments"})
    total = sum(a.size for a in attachments)
    for i, a in enumerate(attachments):
        if a.size > ATTACHMENT_MAX:
            raise PayloadTooLargeError(f"Attachment {a.name!r} is larger than Graph's 150 MB limit.",
                                       extra={"field": f"attachments[{i}]"})
    if total > max_total:
        raise PayloadTooLargeError(f"Attachments total {total} bytes; this connector accepts up to {max_total}.",
                                   hint="Raise SEND_MAX_TOTAL_BYTES or send fewer/smaller files.",
                                   extra={"field": "attachments"})
    return attachments


def _check_recipient_total(body: Json) -> None:
    """400 naming the field where To, Cc, Bcc and Reply-To together pass :data:`MAX_RECIPIENTS`."""
    total = 0
    for key in ("to", "cc", "bcc", "replyTo"):
        raw = body.get(key)
        total += len(raw) if isinstance(raw, list) else 1 if raw is not None else 0
        if total > MAX_RECIPIENTS:
            raise ValidationError(key, f"The message has more than {MAX_RECIPIENTS} recipients in total "
                                  "(to, cc, bcc and replyTo).")


def _attachments(raw: object) -> Iterator[Attachment]:
    if raw is None:
        return
    if not isinstance(raw, list):
        raise ValidationError("attachments", "attachments must be a list.")
    if len(raw) > MAX_ATTACHMENTS:  # before decoding any of them
        raise PayloadTooLargeError(f"The message has {len(raw)} attachments; at most {MAX_ATTACHMENTS}.",
                                   extra={"field": "attachments"})
    for i, a in enumerate(raw):
        f = f"attachments[{i}]"
        if not isinstance(a, dict):
            raise ValidationError(f, f"{f} must be an object with name, contentType, contentBytes.")
        name, ctype, content = a.get("name"), a.get("contentType", "application/octet-stream"), a.get("contentBytes")
        make_attachment(name, ctype, None, f)  # validate name and type before decoding a large payload
        if not isinstance(content, str):
            raise ValidationError(f"{f}.contentBytes", f"{f}.contentBytes must be a base64 string.")
        try:
            data = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise ValidationError(f"{f}.contentBytes", f"{f}.contentBytes is not valid base64.") from None
        yield make_attachment(name, ctype, data, f)


def make_attachment(name: object, ctype: object, data: bytes | memoryview | BinaryIO | None, f: str) -> Attachment:
    if not isinstance(name, str) or not name.strip() or len(name) > 255:
        raise ValidationError(f"{f}.name", f"{f}.name must be a non-empty file name (≤ 255 characters).")
    _no_control(f"{f}.name", name)
    if not isinstance(ctype, str) or not _CONTENT_TYPE_RE.fullmatch(ctype) or len(ctype) > 255:
        raise ValidationError(f"{f}.contentType", f"{f}.contentType must be a MIME type like application/pdf.")
    _no_control(f"{f}.contentType", ctype)
    return Attachment(name, ctype, data if data is not None else b"")


def message_payload(req: SendRequest, *, inline: list[Attachment]) -> Json:
    """The Graph ``message`` resource for this request (without large attachments)."""
    if req.body_html is not None:
        body = {"contentType": "HTML", "content": req.body_html}
    else:
        body = {"contentType": "Text", "content": req.body_text or ""}
    msg: Json = {
        "subject": req.subject,
        "body": body,
        "toRecipients": [r.to_graph() for r in req.to],
        "importance": req.importance,
        "internetMessageHeaders": [{"name": TRACKING_HEADER, "value": req.tracking_id}],
        "singleValueExtendedProperties": [{"id": TRACKING_PROPERTY, "value": req.tracking_id}],
    }
    if req.cc:
        msg["ccRecipients"] = [r.to_graph() for r in req.cc]
    if req.bcc:
        msg["bccRecipients"] = [r.to_graph() for r in req.bcc]
    if req.reply_to:
        msg["replyTo"] = [r.to_graph() for r in req.reply_to]
    if inline:
        msg["attachments"] = [file_attachment(a) for a in inline]
    return msg


def file_attachment(a: Attachment) -> Json:
    """A ``fileAttachment`` resource with base64 content (https://learn.microsoft.com/graph/api/resources/fileattachment)."""
    return {"@odata.type": "#microsoft.graph.fileAttachment", "name": a.name, "contentType": a.content_type,
            "contentBytes": base64.b64encode(a.read_all()).decode("ascii")}


# -- reply, reply-all, forward ------------------------------------------------------
ANSWER_KINDS = ("reply", "replyAll", "forward")
ANSWER_FIELDS = {"comment", "bodyHtml", "bodyText", "to", "cc", "bcc", "attachments", "trackingId"}


@dataclass
class AnswerRequest:
    """An answer in the conversation of an existing message. Graph builds the recipients (reply, replyAll),
    the RE:/FW: subject, the quoted original and In-Reply-To/References; ``to``/``cc``/``bcc`` add
    recipients (``forward`` needs ``to``)."""

    kind: str
    comment: str | None
    body_html: str | None
    body_text: str | None
    to: list[Recipient]
    cc: list[Recipient]
    bcc: list[Recipient]
    attachments: list[Attachment]
    tracking_id: str

    @property
    def extra_recipients(self) -> bool:
        return bool(self.to or self.cc or self.bcc)


def parse_answer_request(kind: str, body: object, *, files: list[Attachment] | None = None,
                         max_total: int) -> AnswerRequest:
    """Validate a reply/replyAll/forward body; raise ValidationError naming the field, 413 beyond caps."""
    if not isinstance(body, dict):
        raise ValidationError("body", "The request body must be a JSON object.")
    unknown = sorted(set(body) - ANSWER_FIELDS)
    if unknown:
        raise ValidationError(unknown[0], f"Unknown field {unknown[0]!r}.")
    comment = _opt_str(body, "comment", 1024 * 1024)
    html = _opt_str(body, "bodyHtml", 4 * 1024 * 1024)
    text = _opt_str(body, "bodyText", 4 * 1024 * 1024)
    if comment is not None and (html is not None or text is not None):
        # Graph takes either a comment (above the quoted original) or the whole body, never both: 400.
        # https://learn.microsoft.com/graph/api/message-reply#request-body
        raise ValidationError("comment", "Give either comment (added above the quoted message) or "
                              "bodyHtml/bodyText (the whole body), not both.")
    _check_recipient_total(body)
    return AnswerRequest(
        kind=kind, comment=comment, body_html=html, body_text=text,
        to=_recipients(body, "to", required=kind == "forward"), cc=_recipients(body, "cc"),
        bcc=_recipients(body, "bcc"), attachments=_checked_attachments(body, files, max_total),
        tracking_id=_tracking_id(body))


def answer_message(req: AnswerRequest, *, inline: list[Attachment], recipients: bool) -> Json:
    """The ``message`` parameter of reply/replyAll/forward and createReply*: the answer's writable properties.
    ``recipients``: set to/cc/bcc here too (a forward, to which Graph adds no recipient of its own)."""
    msg: Json = {"internetMessageHeaders": [{"name": TRACKING_HEADER, "value": req.tracking_id}],
                 "singleValueExtendedProperties": [{"id": TRACKING_PROPERTY, "value": req.tracking_id}]}
    if req.body_html is not None:
        msg["body"] = {"contentType": "HTML", "content": req.body_html}
    elif req.body_text is not None:
        msg["body"] = {"contentType": "Text", "content": req.body_text}
    if recipients:
        for key, rs in (("toRecipients", req.to), ("ccRecipients", req.cc), ("bccRecipients", req.bcc)):
            if rs:
                msg[key] = [r.to_graph() for r in rs]
    if inline:
        msg["attachments"] = [file_attachment(a) for a in inline]
    return msg


def answer_payload(req: AnswerRequest, *, inline: list[Attachment]) -> Json:
    """The action's body, ``comment`` and ``message`` (https://learn.microsoft.com/graph/api/message-reply,
    message-replyall, message-forward, message-createreply)."""
    payload: Json = {"message": answer_message(req, inline=inline, recipients=req.kind == "forward")}
    if req.comment is not None:
        payload["comment"] = req.comment
    return payload


def plan_answer(req: AnswerRequest) -> AttachmentPlan:
    """Where each file goes, counting the answer's own text against Graph's 4 MB request limit."""
    text = req.body_html if req.body_html is not None else (req.body_text or "") + (req.comment or "")
    return plan_attachments(SendRequest(
        to=req.to, cc=req.cc, bcc=req.bcc, reply_to=[], subject="", body_html=None, body_text=text,
        attachments=req.attachments, importance="normal", tracking_id=req.tracking_id, save_to_sent_items=True))


def answer_fingerprint(kind: str, message_id: str, body: Json, attachments: list[Attachment]) -> str:
    """:func:`request_fingerprint` of an answer, bound to its action and message: the same Idempotency-Key
    on another message or action is a different request (409)."""
    return request_fingerprint({**body, "@action": kind, "@messageId": message_id}, attachments)


@dataclass
class AttachmentPlan:
    inline: list[Attachment]  # in the sendMail / draft request itself
    posted: list[Attachment]  # < 3 MB but not fitting inline: one POST each to the draft's attachments
    sessions: list[Attachment]  # ≥ 3 MB: upload sessions

    @property
    def needs_draft(self) -> bool:
        return bool(self.posted or self.sessions)


_REQUEST_SLACK = 64 * 1024  # JSON punctuation and headers around what we count


def _b64_len(n: int) -> int:
    return (n + 2) // 3 * 4


def plan_attachments(req: SendRequest) -> AttachmentPlan:
    """Place each file so that no Graph request exceeds 4 MB; 413 naming the body if
    the message text alone is too large for one request."""
    base = len(dumps(message_payload(req, inline=[]))) + _REQUEST_SLACK
    if base > GRAPH_REQUEST_MAX:
        which = "bodyHtml" if req.body_html is not None else "bodyText"
        raise PayloadTooLargeError(f"The message is {base} bytes before attachments; Microsoft Graph accepts at "
                                   "most 4 MB in one request.", hint="Shorten the body or send it as an attachment.",
                                   extra={"field": which})
    plan = AttachmentPlan([], [], [])
    budget = INLINE_ATTACHMENTS_MAX
    size = base
    for a in sorted(req.attachments, key=lambda x: x.size):
        if a.size >= UPLOAD_SESSION_MIN:
            plan.sessions.append(a)
        elif a.size <= budget and size + _b64_len(a.size) + 512 <= GRAPH_REQUEST_MAX:
            plan.inline.append(a)
            budget -= a.size
            size += _b64_len(a.size) + 512
        else:
            plan.posted.append(a)
    return plan


def request_fingerprint(body: Json, attachments: list[Attachment]) -> str:
    """SHA-256 of what a send means, for ``Idempotency-Key`` (not of its bytes on the wire).

    A multipart request carries a random boundary that a client regenerates on every retry, and
    JSON may be re-serialised with other spacing: both would make an identical retry look like a
    different body. The fingerprint covers the message fields (canonical JSON, without the base64
    content) and each attachment's name, type and content digest, in order.
    """
    fields = {k: v for k, v in body.items() if k != "attachments"}
    files = [{"name": a.name, "type": a.content_type, "sha256": a.sha256()} for a in attachments]
    canonical = json.dumps({"message": fields, "attachments": files}, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def dumps(obj: object) -> bytes:
    # ensure_ascii=False: UTF-8 is what Graph counts against its 4 MB, and \uXXXX escapes would
    # multiply the size of non-Latin text by up to six.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
