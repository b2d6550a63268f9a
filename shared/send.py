"""Sending as the mailbox: inline ``sendMail`` or draft + upload sessions + ``send`` (SPEC §4)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from shared.accounts import iso, utcnow
from shared.errors import ConnectorError, MicrosoftError, ValidationError
from shared.graph import GraphClient, TokenSource
from shared.mail import (
    Attachment,
    AttachmentPlan,
    SendRequest,
    dumps,
    file_attachment,
    message_payload,
    plan_attachments,
)

log = logging.getLogger("connector.send")


def send(graph: GraphClient, token: TokenSource, mailbox: str, req: SendRequest, *,
         context: Mapping[str, Any]) -> dict[str, Any]:
    plan = plan_attachments(req)
    if not plan.needs_draft:
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
        _send_from_draft(graph, token, mailbox, req, plan, context)
    return {"status": "sent", "trackingId": req.tracking_id, "sentAt": iso(utcnow())}


def _send_from_draft(graph: GraphClient, token: TokenSource, mailbox: str, req: SendRequest, plan: AttachmentPlan,
                     context: Mapping[str, Any]) -> None:
    # https://learn.microsoft.com/graph/outlook-large-attachments
    # Creating a draft delivers nothing, so it is safe to retry (safe=True) and a failure before
    # the final send means "nothing was sent".
    draft = graph.request("POST", "me/messages", mailbox=mailbox, token=token, safe=True,
                          data=dumps(message_payload(req, inline=plan.inline)),
                          headers={"Content-Type": "application/json"}, context=context).json()
    draft_id = draft["id"]
    sending = False
    try:
        for att in plan.posted:  # https://learn.microsoft.com/graph/api/message-post-attachments
            graph.request("POST", f"me/messages/{draft_id}/attachments", mailbox=mailbox, token=token, safe=True,
                          data=dumps(file_attachment(att)), headers={"Content-Type": "application/json"},
                          context=context)
        for att in plan.sessions:
            session = graph.request(
                "POST", f"me/messages/{draft_id}/attachments/createUploadSession", mailbox=mailbox, token=token,
                safe=True, context=context,
                json={"AttachmentItem": {"attachmentType": "file", "name": att.name, "size": att.size,
                                         "contentType": att.content_type}}).json()
            _upload(graph, mailbox, session["uploadUrl"], att, context)
        sending = True  # from here on a failure may hide a delivery: keep the draft for inspection
        graph.request("POST", f"me/messages/{draft_id}/send", mailbox=mailbox, token=token, safe=False,
                      headers={"Content-Length": "0"}, context=context)
    except Exception as e:
        if not sending:
            _discard_draft(graph, token, mailbox, draft_id)
        if isinstance(e, ConnectorError) and e.status == 404:
            # Our own draft vanished: Microsoft's condition, not an unknown message of the caller (SPEC §3).
            raise MicrosoftError("The draft being sent disappeared from the mailbox.", code="draft_not_found",
                                 status=502, microsoft=e.microsoft,
                                 hint="Check Sent Items, then retry the send.") from None
        raise


def _upload(graph: GraphClient, mailbox: str, upload_url: str, att: Attachment,
            context: Mapping[str, Any]) -> None:
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
