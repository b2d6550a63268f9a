"""Sending as the mailbox: inline ``sendMail`` or draft + upload sessions + ``send`` (SPEC §4)."""

from __future__ import annotations

import logging
import time
from typing import Any

from shared.accounts import iso, utcnow
from shared.errors import ConnectorError, UpstreamUnavailableError, ValidationError
from shared.graph import retry_after_seconds
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


def send(graph: Any, token: Any, mailbox: str, req: SendRequest, *, context: dict[str, Any]) -> dict[str, Any]:
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


def _send_from_draft(graph: Any, token: Any, mailbox: str, req: SendRequest, plan: AttachmentPlan,
                     context: dict[str, Any]) -> None:
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
            _upload(graph, mailbox, session["uploadUrl"], att)
        sending = True  # from here on a failure may hide a delivery: keep the draft for inspection
        graph.request("POST", f"me/messages/{draft_id}/send", mailbox=mailbox, token=token, safe=False,
                      headers={"Content-Length": "0"}, context=context)
    except Exception:
        if not sending:
            _discard_draft(graph, token, mailbox, draft_id)
        raise


UPLOAD_RETRY_BUDGET_S = 30.0


def _upload(graph: Any, mailbox: str, upload_url: str, att: Attachment) -> None:
    """Ranged PUTs to the pre-authenticated upload URL: no Authorization header (Graph refuses it).

    A chunk refused with 429/503 stored nothing, so it is sent again after ``Retry-After`` (within a
    bounded budget; Graph limits uploads to 150 MB per 5 minutes per mailbox). A network error leaves
    the range's fate unknown: the send stops there, before anything was sent, and the draft is removed.
    """
    import requests

    total = att.size
    sem = graph._limiter.get(mailbox)
    deadline = time.monotonic() + UPLOAD_RETRY_BUDGET_S
    for start, piece in att.chunks():
        end = start + len(piece) - 1
        headers = {"Content-Range": f"bytes {start}-{end}/{total}", "Content-Length": str(len(piece)),
                   "Content-Type": "application/octet-stream"}
        while True:
            with sem:
                try:
                    resp = graph.session.put(upload_url, data=piece, headers=headers, timeout=(5, 120))
                except requests.RequestException as e:
                    raise UpstreamUnavailableError(f"Uploading an attachment failed ({type(e).__name__}).",
                                                   hint="Retry the send; nothing was sent.") from None
            if resp.status_code in (200, 201):
                break
            wait = retry_after_seconds(resp.headers.get("Retry-After"))
            if resp.status_code in (429, 503) and time.monotonic() + wait <= deadline:
                log.info("upload chunk throttled (%d); retrying in %.1f s", resp.status_code, wait)
                time.sleep(wait)
                continue
            from shared.ms_errors import from_graph_response

            try:
                body = resp.json()
            except ValueError:
                body = None
            raise from_graph_response(resp.status_code, body, resp.headers)


def _discard_draft(graph: Any, token: Any, mailbox: str, draft_id: str) -> None:
    try:
        graph.request("DELETE", f"me/messages/{draft_id}", mailbox=mailbox, token=token, safe=True)
    except ConnectorError as e:
        log.warning("could not delete an unsent draft: %s", e.code)
