"""Sending as the mailbox: inline ``sendMail`` or draft + upload sessions + ``send`` (SPEC §4)."""

from __future__ import annotations

import logging
from typing import Any

from shared.accounts import iso, utcnow
from shared.errors import ConnectorError, UpstreamUnavailableError
from shared.mail import SendRequest, chunks, dumps, message_payload, plan_attachments

log = logging.getLogger("connector.send")


def send(graph: Any, token: Any, mailbox: str, req: SendRequest, *, context: dict[str, Any]) -> dict[str, Any]:
    inline, large = plan_attachments(req)
    if not large:
        payload = {"message": message_payload(req, inline=inline), "saveToSentItems": req.save_to_sent_items}
        graph.request("POST", "me/sendMail", mailbox=mailbox, token=token, safe=False, data=dumps(payload),
                      headers={"Content-Type": "application/json"}, context=context)
    else:
        _send_with_upload_sessions(graph, token, mailbox, req, inline, large, context)
    return {"status": "sent", "trackingId": req.tracking_id, "sentAt": iso(utcnow())}


def _send_with_upload_sessions(graph: Any, token: Any, mailbox: str, req: SendRequest, inline: list[Any],
                               large: list[Any], context: dict[str, Any]) -> None:
    # https://learn.microsoft.com/graph/outlook-large-attachments
    draft = graph.request("POST", "me/messages", mailbox=mailbox, token=token, safe=False,
                          data=dumps(message_payload(req, inline=inline)),
                          headers={"Content-Type": "application/json"}, context=context).json()
    draft_id = draft["id"]
    sending = False
    try:
        for att in large:
            session = graph.request(
                "POST", f"me/messages/{draft_id}/attachments/createUploadSession", mailbox=mailbox, token=token,
                safe=True, context=context,
                json={"AttachmentItem": {"attachmentType": "file", "name": att.name, "size": att.size,
                                         "contentType": att.content_type}}).json()
            _upload(graph, mailbox, session["uploadUrl"], att.data)
        sending = True  # from here on a failure may hide a delivery: keep the draft for inspection
        graph.request("POST", f"me/messages/{draft_id}/send", mailbox=mailbox, token=token, safe=False,
                      headers={"Content-Length": "0"}, context=context)
    except Exception:
        if not sending:
            _discard_draft(graph, token, mailbox, draft_id)
        raise


def _upload(graph: Any, mailbox: str, upload_url: str, data: Any) -> None:
    """Ranged PUTs to the pre-authenticated upload URL: no Authorization header (Graph refuses it)."""
    total = len(data)
    import requests

    sem = graph._limiter.get(mailbox)
    for start, piece in chunks(data):
        end = start + len(piece) - 1
        headers = {"Content-Range": f"bytes {start}-{end}/{total}", "Content-Length": str(len(piece)),
                   "Content-Type": "application/octet-stream"}
        with sem:
            try:
                resp = graph.session.put(upload_url, data=piece, headers=headers, timeout=(5, 120))
            except requests.RequestException as e:
                raise UpstreamUnavailableError(f"Uploading an attachment failed ({type(e).__name__}).",
                                               hint="Retry the send; nothing was sent.") from None
        if resp.status_code not in (200, 201):
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
