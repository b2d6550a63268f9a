"""Working with mail as an account: send, answer in a thread, organise, find, read, download.

:class:`MailOps` takes its parts keyword-only (the Graph client, the token manager, the account store,
the idempotency table, the cursor key ring) and never reaches back into the Connector. Every call goes
to Graph as the account through :class:`~shared.graph.GraphClient` (limiter, Retry-After, one refresh on
401, errors mapped in :mod:`shared.ms_errors`) and records active use once the operation succeeded.

* Reply, reply-all, forward: :func:`shared.send.answer` — Graph's direct action, or its reply draft + the
  send path's attachments and upload sessions; under ``Idempotency-Key`` like a send.
* Organise: ``PATCH`` (isRead, flag, categories); move (the message keeps its immutable id); delete = move to
  Deleted Items, as Outlook does.
* Find: ``$filter``/``$orderby`` listings, ``$search`` with its own rules, threads oldest first; Graph's
  nextLink travels sealed as the caller's cursor.
* Download: the classic Functions HTTP model hands the host a whole ``bytes`` body, so memory is bounded by
  serving at most :data:`DOWNLOAD_MAX` bytes per response: a whole attachment up to that size, larger ones in
  ``Range`` requests. Graph's stream is read in 64 KiB pieces into a spooled temporary file, so nothing
  beyond the one response is held (see the README's "Attachment downloads" and bench/results.md).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from shared import messages as m
from shared.errors import (
    ConnectorError,
    MicrosoftError,
    PayloadTooLargeError,
    UpstreamUnavailableError,
    ValidationError,
)
from shared.idempotency import run_once
from shared.tokens import AccountTokenSource

if TYPE_CHECKING:
    import requests

    from shared.accounts import AccountStore
    from shared.crypto import RingSource
    from shared.graph import GraphClient
    from shared.mail import AnswerRequest, SendRequest
    from shared.sent_marks import SentMarks
    from shared.storage import Table
    from shared.telemetry import Telemetry
    from shared.tokens import TokenManager

Json = dict[str, object]
# Per response: the Functions host's classic HTTP model (no streaming) holds a response whole. Larger
# attachments are fetched in ranges of at most this size.
DOWNLOAD_MAX = 25 * 1024 * 1024
_READ = 64 * 1024
_SPOOL = 1024 * 1024


@dataclass(frozen=True)
class Download:
    content: bytes
    content_type: str
    name: str
    status: int  # 200: the whole attachment; 206: one range
    content_range: str | None = None


class _As:
    """One operation as an account: its mailbox key and token source, and active use recorded at the end."""

    def __init__(self, tokens: TokenManager, token: AccountTokenSource) -> None:
        self._tokens = tokens
        self.token = token
        self.mailbox = token.account.mailbox_key

    def used(self) -> None:
        self._tokens.note_use(self.token.account)


class MailOps:
    """Everything done as an account: send, answer, organise, find, read, download. One path: the account
    (404 for another owner) → its token source → Graph → active use noted, under ``Idempotency-Key`` for
    whatever sends mail."""

    def __init__(self, *, graph: GraphClient, tokens: TokenManager, accounts: AccountStore, idempotency: Table,
                 key_ring: RingSource, context: Mapping[str, str], telemetry: Telemetry,
                 download_max: int = DOWNLOAD_MAX, sent_marks: SentMarks | None = None) -> None:
        self._graph = graph
        self._tokens = tokens
        self._accounts = accounts
        self._idempotency = idempotency
        self._key_ring = key_ring
        self._context = dict(context)
        self._telemetry = telemetry
        self._download_max = download_max
        self._sent_marks = sent_marks  # rich message.sent: what this API sent, by Sent Items id

    def _as(self, owner: str, account_id: str) -> _As:
        account = self._accounts.get_account(owner, account_id)  # 404 account_not_found for another owner
        return _As(self._tokens, AccountTokenSource(self._tokens, account))

    def _call(self, who: _As, method: str, path: str, *, params: dict[str, str] | None = None,
              payload: Mapping[str, object] | None = None, safe: bool | None = None,
              stream: bool = False) -> requests.Response:
        return self._graph.request(method, path, mailbox=who.mailbox, token=who.token, safe=safe, params=params,
                                   json=payload, stream=stream, context=self._context)

    # -- send -----------------------------------------------------------------------------------
    def send(self, owner: str, account_id: str, request: SendRequest, *, idempotency_key: str | None,
             body_hash: str) -> dict[str, str | None]:
        """Send as the mailbox: sendMail, or a draft with upload sessions for large attachments."""
        from shared.send import send

        who = self._as(owner, account_id)

        def action() -> dict[str, str | None]:
            with self._measured_send(request.attachment_bytes):
                result = send(self._graph, who.token, who.mailbox, request, context=self._context,
                              record=self._recorder(account_id, request.tracking_id))
            who.used()
            return result

        return run_once(self._idempotency, owner, account_id, idempotency_key, body_hash, action)

    def _recorder(self, account_id: str, tracking_id: str) -> Callable[[str], None] | None:
        return self._sent_marks.recorder(account_id, tracking_id) if self._sent_marks is not None else None

    @contextmanager
    def _measured_send(self, nbytes: int) -> Iterator[None]:
        """``connector.send``: outcome (``sent`` or our error code), size class and duration of one send."""
        started = time.perf_counter()
        outcome = "sent"
        try:
            yield
        except Exception as e:
            outcome = e.code if isinstance(e, ConnectorError) else "internal_error"
            raise
        finally:
            self._telemetry.send(outcome, nbytes=nbytes, seconds=time.perf_counter() - started)

    # -- read -----------------------------------------------------------------------------------
    def get_message(self, owner: str, account_id: str, message_id: str | None) -> Json:
        """One message with its body and attachment metadata."""
        mid = m.check_id(message_id, "messageId")
        who = self._as(owner, account_id)
        msg = self._call(who, "GET", f"me/messages/{mid}", params={"$select": ",".join(m.DETAIL_FIELDS)})
        atts = self._call(who, "GET", f"me/messages/{mid}/attachments",
                          params={"$select": "id,name,contentType,size,isInline"})
        who.used()
        out: Json = m.map_detail(msg.json(), atts.json().get("value", []))
        return out

    def list_folders(self, owner: str, account_id: str) -> Json:
        who = self._as(owner, account_id)
        resp = self._call(who, "GET", "me/mailFolders", params={"$top": "100"})
        who.used()
        return {"folders": [m.map_folder(f) for f in resp.json().get("value", [])]}

    # -- reply, reply-all, forward --------------------------------------------------------------
    def answer(self, owner: str, account_id: str, message_id: str, req: AnswerRequest, *,
               idempotency_key: str | None, body_hash: str) -> dict[str, str | None]:
        from shared.send import answer

        mid = m.check_id(message_id, "messageId")
        who = self._as(owner, account_id)

        def action() -> dict[str, str | None]:
            result: dict[str, str | None] = answer(self._graph, who.token, who.mailbox, mid, req,
                                                   context=self._context,
                                                   record=self._recorder(account_id, req.tracking_id))
            who.used()
            return result

        return run_once(self._idempotency, owner, account_id, idempotency_key, body_hash, action)

    # -- organise -------------------------------------------------------------------------------
    def update(self, owner: str, account_id: str, message_id: str, changes: Mapping[str, object]) -> Json:
        mid = m.check_id(message_id, "messageId")
        who = self._as(owner, account_id)
        # https://learn.microsoft.com/graph/api/message-update : 200 with the updated message
        resp = self._call(who, "PATCH", f"me/messages/{mid}", payload=changes, safe=True)
        who.used()
        out: Json = m.map_organised(resp.json())
        return out

    def move(self, owner: str, account_id: str, message_id: str, folder: str) -> Json:
        """https://learn.microsoft.com/graph/api/message-move : 201 with the moved message, under the same
        immutable id (every request asks for immutable ids)."""
        mid = m.check_id(message_id, "messageId")
        who = self._as(owner, account_id)
        if folder not in m.WELL_KNOWN_FOLDERS:
            self._check_folder(who, folder)  # so that a 404 from the move is the message's
        resp = self._call(who, "POST", f"me/messages/{mid}/move", payload={"destinationId": folder})
        who.used()
        out: Json = m.map_organised(resp.json())
        return out

    def _check_folder(self, who: _As, folder: str) -> None:
        try:
            self._call(who, "GET", f"me/mailFolders/{folder}", params={"$select": "id"})
        except MicrosoftError as e:
            if e.code in ("message_not_found", "invalid_id"):
                raise ValidationError("folder", "folder is not a folder of this mailbox.",
                                      hint="List the folders with GET /api/accounts/{accountId}/folders.") from None
            raise

    def delete(self, owner: str, account_id: str, message_id: str) -> None:
        """Deleted Items, as Outlook's delete does: an explicit move, whatever Graph's DELETE would do."""
        self.move(owner, account_id, message_id, "deleteditems")

    # -- find -----------------------------------------------------------------------------------
    def find(self, owner: str, account_id: str, query: m.MessageQuery, cursor: str | None) -> Json:
        ring = self._key_ring()
        who = self._as(owner, account_id)
        if cursor:
            path, params = m.open_cursor(self._key_ring(cursor), owner, account_id, cursor), None
        else:
            path, opts = m.list_request(query)
            params = opts
        body = self._call(who, "GET", path, params=params).json()
        who.used()
        next_link = body.get("@odata.nextLink")
        return {"messages": [m.map_summary(x) for x in body.get("value", [])],
                "nextCursor": m.seal_cursor(ring, owner, account_id, next_link) if next_link else None}

    def conversation(self, owner: str, account_id: str, conversation_id: str, *, top: int,
                     cursor: str | None) -> Json:
        cid = m.check_id(conversation_id, "conversationId")
        return self.find(owner, account_id, m.MessageQuery(top=top, conversation_id=cid), cursor)

    # -- download -------------------------------------------------------------------------------
    def download(self, owner: str, account_id: str, message_id: str, attachment_id: str,
                 byte_range: tuple[int | None, int | None] | None) -> Download:
        mid = m.check_id(message_id, "messageId")
        aid = m.check_id(attachment_id, "attachmentId")
        who = self._as(owner, account_id)
        base = f"me/messages/{mid}/attachments/{aid}"
        info = self._call(who, "GET", base, params={"$select": "id,name,contentType,size"}).json()
        # https://learn.microsoft.com/graph/api/attachment-get#example-6-get-the-raw-contents-of-a-file-attachment-on-a-message
        resp = self._call(who, "GET", base + "/$value", stream=True)
        try:
            content, status, content_range = self._read(resp, byte_range)
        finally:
            resp.close()
        who.used()
        return Download(content, str(info.get("contentType") or "application/octet-stream"),
                        str(info.get("name") or ""), status, content_range)

    def _read(self, resp: requests.Response,
              byte_range: tuple[int | None, int | None] | None) -> tuple[bytes, int, str | None]:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        if byte_range is None:
            if total is not None and total > self._download_max:
                raise self._too_large(total)
            return _copy(resp, 0, self._download_max, on_overflow=lambda: self._too_large(None)), 200, None
        first, last = _resolve(byte_range, total)
        last = min(last, first + self._download_max - 1)  # a longer range gets its first part (206 says which)
        content = _copy(resp, first, last - first + 1, on_overflow=None)
        if not content:
            raise _unsatisfiable(total)
        return content, 206, f"bytes {first}-{first + len(content) - 1}/{total if total is not None else '*'}"

    def _too_large(self, total: int | None) -> PayloadTooLargeError:
        size = f"{total} bytes" if total is not None else "larger than this limit"
        return PayloadTooLargeError(
            f"The attachment is {size}; one response carries at most {self._download_max} bytes.",
            code="attachment_too_large", extra={"field": "Range", "maxBytesPerResponse": self._download_max},
            hint=f"Download it in parts: send 'Range: bytes=0-{self._download_max - 1}', then the next range, "
                 "until a 206 answer's Content-Range reaches the total.")


def _resolve(byte_range: tuple[int | None, int | None], total: int | None) -> tuple[int, int]:
    first, last = byte_range
    if first is None:  # bytes=-n: the last n bytes
        if total is None:
            raise _unsatisfiable(None)
        return max(0, total - (last or 0)), total - 1
    if total is not None and first >= total:
        raise _unsatisfiable(total)
    end = last if last is not None else (total - 1 if total is not None else first + 2**62)
    return first, end if total is None else min(end, total - 1)


def _unsatisfiable(total: int | None) -> ValidationError:
    return ValidationError("Range", "The range starts after the end of the attachment.", status=416,
                           code="range_not_satisfiable", title="Range not satisfiable",
                           headers={"Content-Range": f"bytes */{total if total is not None else '*'}"})


def _copy(resp: requests.Response, skip: int, limit: int,
          on_overflow: Callable[[], Exception] | None) -> bytes:
    """Bytes ``skip`` to ``skip+limit-1`` of Graph's stream, through a spooled temporary file (64 KiB reads):
    peak memory is the result plus a megabyte, however large the attachment."""
    import requests

    with tempfile.SpooledTemporaryFile(max_size=_SPOOL) as sink:
        try:
            kept = _pump(resp, sink, skip, limit, on_overflow)
        except (requests.RequestException, OSError):  # the stream broke after Graph's headers arrived
            raise UpstreamUnavailableError("Microsoft Graph stopped sending the attachment part way.",
                                           hint="Retry the download.") from None
        finally:
            resp.close()
        sink.seek(0)
        data = sink.read(kept)
    return bytes(data)


def _pump(resp: requests.Response, sink: IO[bytes], skip: int, limit: int,
          on_overflow: Callable[[], Exception] | None) -> int:
    offset = kept = 0
    for piece in resp.iter_content(_READ):
        start = max(0, skip - offset)
        offset += len(piece)
        if start >= len(piece):
            continue
        room = limit - kept
        if len(piece) - start > room and on_overflow is not None:
            raise on_overflow()
        chunk = piece[start:start + room]
        sink.write(chunk)
        kept += len(chunk)
        if kept >= limit and on_overflow is None:
            break  # a range: the rest of Graph's stream is not needed
    return kept
