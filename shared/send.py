"""Sending as the mailbox: inline ``sendMail`` or draft + upload sessions + ``send``; replies and
forwards in a conversation, by Graph's direct action or its reply draft + the same upload path."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from shared.accounts import iso, utcnow
from shared.errors import ConnectorError, MicrosoftError, UpstreamUnavailableError, ValidationError
from shared.graph import GraphClient, TokenSource
from shared.mail import (
    AnswerRequest,
    Attachment,
    AttachmentPlan,
    SendRequest,
    answer_payload,
    dumps,
    file_attachment,
    message_payload,
    plan_answer,
    plan_attachments,
)

log = logging.getLogger("connector.send")

Json = dict[str, object]
SendResult = dict[str, str | None]  # status, trackingId, sentAt (and an answer's ids)


def send(graph: GraphClient, token: TokenSource, mailbox: str, req: SendRequest, *,
         context: Mapping[str, str], record: Callable[[str], None] | None = None) -> SendResult:
    """``record``: called with the draft's (immutable) id just before it is sent; given, the message is sent
    through a draft even when it would fit ``sendMail`` (:mod:`shared.sent_marks`), unless it keeps no Sent Items
    copy (then nothing will be notified of it)."""
    plan = plan_attachments(req)
    via_draft = plan.needs_draft or (record is not None and req.save_to_sent_items)
    if not via_draft:
        payload = {"message": message_payload(req, inline=plan.inline), "saveToSentItems": req.save_to_sent_items}
        graph.request("POST", "me/sendMail", mailbox=mailbox, token=token, safe=False, data=dumps(payload),
                      headers={"Content-Type": "application/json"}, context=context)
    else:
        if not req.save_to_sent_items:
            # POST /messages/{id}/send has no saveToSentItems: a message sent from a draft always
            # lands in Sent Items. Refuse rather than silently keep a copy the caller asked not to.
            raise ValidationError("saveToSentItems", "saveToSentItems=false is only possible when the attachments "
                                  "fit in one Graph request (about 3 MB in all): Graph keeps messages with larger "
                                  "attachments in Sent Items.")
        _send_from_draft(graph, token, mailbox, req, plan, context, record)
    return {"status": "sent", "trackingId": req.tracking_id, "sentAt": iso(utcnow())}


def _send_from_draft(graph: GraphClient, token: TokenSource, mailbox: str, req: SendRequest, plan: AttachmentPlan,
                     context: Mapping[str, str], record: Callable[[str], None] | None) -> None:
    # https://learn.microsoft.com/graph/outlook-large-attachments
    # Creating a draft delivers nothing, so it is safe to retry (safe=True) and a failure before
    # the final send means "nothing was sent".
    draft = graph.request("POST", "me/messages", mailbox=mailbox, token=token, safe=True,
                          data=dumps(message_payload(req, inline=plan.inline)),
                          headers={"Content-Type": "application/json"}, context=context).json()
    send_draft(graph, token, mailbox, draft["id"], plan, context, record=record)


def send_draft(graph: GraphClient, token: TokenSource, mailbox: str, draft_id: str, plan: AttachmentPlan,
               context: Mapping[str, str], *, prepare: Json | None = None,
               record: Callable[[str], None] | None = None) -> None:
    """Finish a draft and send it once: PATCH ``prepare`` (if any), attach the files the draft still lacks
    (POSTs below 3 MB, upload sessions above), then ``POST /messages/{id}/send``. Before that final
    send any failure deletes the draft (nothing was sent); after it, the draft is kept for inspection."""
    sending = False
    try:
        if prepare:  # https://learn.microsoft.com/graph/api/message-update
            graph.request("PATCH", f"me/messages/{draft_id}", mailbox=mailbox, token=token, safe=True,
                          data=dumps(prepare), headers={"Content-Type": "application/json"}, context=context)
        for att in plan.posted:  # https://learn.microsoft.com/graph/api/message-post-attachments
            # Not retried blindly (safe=False): a 5xx whose request did land would attach the file twice.
            graph.request("POST", f"me/messages/{draft_id}/attachments", mailbox=mailbox, token=token, safe=False,
                          data=dumps(file_attachment(att)), headers={"Content-Type": "application/json"},
                          context=context)
        for att in plan.sessions:
            session = graph.request(
                "POST", f"me/messages/{draft_id}/attachments/createUploadSession", mailbox=mailbox, token=token,
                safe=True, context=context,
                json={"AttachmentItem": {"attachmentType": "file", "name": att.name, "size": att.size,
                                         "contentType": att.content_type}}).json()
            _upload(graph, mailbox, session["uploadUrl"], att, context)
        if record is not None:
            record(draft_id)  # before the send: its Sent Items copy is notified as soon as it exists
        sending = True  # from here on a failure may hide a delivery: keep the draft for inspection
        graph.request("POST", f"me/messages/{draft_id}/send", mailbox=mailbox, token=token, safe=False,
                      headers={"Content-Length": "0"}, context=context)
    except Exception as e:
        if not sending:
            _discard_draft(graph, token, mailbox, draft_id)
            if isinstance(e, ConnectorError) and e.extra.get("outcomeUnknown"):
                raise _nothing_sent(e) from None
        if isinstance(e, ConnectorError) and e.status == 404:
            # Our own draft vanished: Microsoft's condition, not an unknown message of the caller.
            raise MicrosoftError("The draft being sent disappeared from the mailbox.", code="draft_not_found",
                                 status=502, microsoft=e.microsoft,
                                 hint="Check Sent Items, then retry the send.") from None
        raise


def answer(graph: GraphClient, token: TokenSource, mailbox: str, message_id: str, req: AnswerRequest, *,
           context: Mapping[str, str], record: Callable[[str], None] | None = None) -> SendResult:
    """Reply, reply-all or forward in the conversation of ``message_id``, delivering once.

    Graph's direct action (``POST /messages/{id}/reply``…, 202, no body) when everything fits one request
    and Graph's own recipients stand; otherwise ``createReply``… (a draft that already carries the thread's
    In-Reply-To/References and conversation), then :func:`send_draft` adds recipients and files and sends it.
    https://learn.microsoft.com/graph/api/message-reply, message-createreply, message-forward
    """
    plan = plan_answer(req)
    result: SendResult = {"status": "sent", "trackingId": req.tracking_id}
    if record is None and not plan.needs_draft and (req.kind == "forward" or not req.extra_recipients):
        graph.request("POST", f"me/messages/{message_id}/{req.kind}", mailbox=mailbox, token=token, safe=False,
                      data=dumps(answer_payload(req, inline=plan.inline)),
                      headers={"Content-Type": "application/json"}, context=context)
        return {**result, "sentAt": iso(utcnow()), "messageId": None, "conversationId": None}
    create = "create" + req.kind[0].upper() + req.kind[1:]
    try:  # not retried blindly: a 5xx that did land would leave a second draft in the thread
        draft = graph.request("POST", f"me/messages/{message_id}/{create}", mailbox=mailbox, token=token,
                              safe=False, data=dumps(answer_payload(req, inline=plan.inline)),
                              headers={"Content-Type": "application/json"}, context=context).json()
    except ConnectorError as e:
        if e.extra.get("outcomeUnknown"):
            raise _nothing_sent(e) from None  # at worst an unsent draft exists; nothing was delivered
        raise
    prepare = None if req.kind == "forward" or not req.extra_recipients else _added_recipients(draft, req)
    send_draft(graph, token, mailbox, draft["id"], plan, context, prepare=prepare, record=record)
    # The draft was created with immutable ids, so its id names the Sent Items copy once it is sent
    # (https://learn.microsoft.com/graph/outlook-immutable-id, "Immutable ID with sending mail").
    conversation, sent_id = draft.get("conversationId"), draft.get("id")
    return {**result, "sentAt": iso(utcnow()), "messageId": sent_id if isinstance(sent_id, str) else None,
            "conversationId": conversation if isinstance(conversation, str) else None}


def _nothing_sent(err: ConnectorError) -> UpstreamUnavailableError:
    """An unknown outcome *before* the final send: no message was delivered, so the caller may retry."""
    return UpstreamUnavailableError(
        "Microsoft Graph did not answer while the message was prepared; nothing was sent.",
        hint="Retry the request (with the same Idempotency-Key).", microsoft=err.microsoft,
        headers={k: v for k, v in err.headers.items() if k == "Retry-After"})


def _added_recipients(draft: Mapping[str, str], req: AnswerRequest) -> Json:
    """The draft's recipients (as Graph chose them) plus the caller's extra ones."""
    out: Json = {}
    for key, extra in (("toRecipients", req.to), ("ccRecipients", req.cc), ("bccRecipients", req.bcc)):
        if extra:
            out[key] = list(draft.get(key) or []) + [r.to_graph() for r in extra]
    return out


def _upload(graph: GraphClient, mailbox: str, upload_url: str, att: Attachment,
            context: Mapping[str, str]) -> None:
    """Ranged PUTs, in order, to the session's pre-authenticated URL
    (https://learn.microsoft.com/graph/outlook-large-attachments). GraphClient owns the limiter and
    the Retry-After waits; an error here comes before the final send, so nothing was sent."""
    for start, piece in att.chunks():
        graph.upload_range(upload_url, piece, start=start, total=att.size, mailbox=mailbox, context=context)


def _discard_draft(graph: GraphClient, token: TokenSource, mailbox: str, draft_id: str) -> None:
    try:
        graph.request("DELETE", f"me/messages/{draft_id}", mailbox=mailbox, token=token, safe=True)
    except ConnectorError as e:
        log.warning("could not delete an unsent draft: %s", e.code)
