"""Put Message over the Queue service REST API, through a small azure-core pipeline (as :mod:`shared._table_rest`).

Why not ``QueueClient.send_message`` for it: every mailbox event enqueues a job and a webhook, and a timer run
enqueues one job per due account; the Queue SDK spends about half of a rich event's CPU on its generated
serialiser, tracing decorator and thirteen-policy pipeline for a one-line XML body. What stays the same as the SDK:
the transport (so every fault and timeout looks identical), azure-core's retry policy with the per-call budget
options (:class:`shared.storage.Budget`), azure-core's error types (mapped once by :func:`shared.storage.mapped`),
the credential, and the base64 message text the Functions queue trigger reads. Receiving, deleting and creating
queues stay with ``QueueClient``.

Protocol references:

* https://learn.microsoft.com/rest/api/storageservices/put-message — ``POST {queue}/messages``, body
  ``<QueueMessage><MessageText>…</MessageText></QueueMessage>``, ``201 Created``.
* Shared Key for the Blob, Queue and File services:
  https://learn.microsoft.com/rest/api/storageservices/authorize-with-shared-key#blob-queue-and-file-services-shared-key-authorization
  — ``VERB``, eleven standard headers (``Content-Length`` empty when zero), the ``x-ms-`` headers lower-cased and
  sorted, then ``/<account><path>`` and each query parameter as ``\\n<name>:<value>``, names lower-cased and sorted.
"""

from __future__ import annotations

import base64
from email.utils import formatdate
from typing import TYPE_CHECKING, Unpack
from urllib.parse import parse_qsl, urlsplit

from azure.core.pipeline.policies import SansIOHTTPPolicy
from azure.core.rest import HttpRequest

from shared._table_rest import SharedKeyPolicy, raise_refusal

if TYPE_CHECKING:
    from azure.core.pipeline import Pipeline, PipelineRequest
    from azure.core.rest import HttpResponse

    from shared._table_rest import RestCallOptions

API_VERSION = "2021-12-02"  # a version azure-storage-queue 12.x and Azurite both speak
_HEADERS_SIGNED = ("Content-Encoding", "Content-Language", "Content-Length", "Content-MD5", "Content-Type", "Date",
                   "If-Modified-Since", "If-Match", "If-None-Match", "If-Unmodified-Since", "Range")
# azure-core retries only idempotent methods after a lost answer; the Queue SDK retries Put Message too, and so does
# this path: a message sent twice is a job or webhook that is de-duplicated downstream (message-id claims, the
# event id a receiver drops), where a message not sent at all would be lost until a later retry.
_RETRY_METHODS = frozenset({"POST"})


class QueueHeaders(SansIOHTTPPolicy):
    """The version header and a fresh ``x-ms-date`` on every attempt (it is signed: retries re-sign)."""

    def on_request(self, request: PipelineRequest[HttpRequest]) -> None:
        headers = request.http_request.headers
        headers["x-ms-version"] = API_VERSION
        headers["x-ms-date"] = formatdate(usegmt=True)


class QueueSharedKeyPolicy(SharedKeyPolicy):
    """Shared Key authorisation for the Queue service: the Table service's signing with the Queue service's string
    to sign (see the module docstring for the format)."""

    def string_to_sign(self, r: HttpRequest, name: str) -> str:
        headers = {k.lower(): v for k, v in r.headers.items()}
        body = r.content if isinstance(r.content, (bytes, str)) else b""
        length = len(body.encode() if isinstance(body, str) else body)
        standard = [str(length) if h == "Content-Length" and length else headers.get(h.lower(), "")
                    for h in _HEADERS_SIGNED]
        if standard[2] == "0":
            standard[2] = ""
        ms = "".join(f"{k}:{v.strip()}\n" for k, v in sorted(headers.items()) if k.startswith("x-ms-"))
        url = urlsplit(r.url)
        query = sorted((k.lower(), v) for k, v in parse_qsl(url.query, keep_blank_values=True))
        resource = f"/{name}{url.path}" + "".join(f"\n{k}:{v}" for k, v in query)
        return "\n".join((r.method, *standard)) + "\n" + ms + resource


class QueueRest:
    """Put Message on one queue. Raises azure-core's errors: ``HttpResponseError`` (with the status) for a refusal,
    ``ServiceRequestError`` / ``ServiceResponseError`` when nothing answered."""

    def __init__(self, *, pipeline: Pipeline[HttpRequest, HttpResponse], queue_url: str, sas: str = "") -> None:
        self._pipeline = pipeline
        self._messages = f"{queue_url.split('?', 1)[0].rstrip('/')}/messages"
        self._sas = sas.lstrip("?")

    def put(self, message: bytes, *, visibility_timeout: int | None = None, **call: Unpack[RestCallOptions]) -> None:
        """Enqueue ``message`` base64-encoded (what the Functions queue trigger decodes by default)."""
        query = "&".join(p for p in (f"visibilitytimeout={visibility_timeout}" if visibility_timeout else "",
                                     self._sas) if p)
        text = base64.b64encode(message).decode("ascii")  # base64 needs no XML escaping
        body = f'<?xml version="1.0" encoding="utf-8"?><QueueMessage><MessageText>{text}</MessageText></QueueMessage>'
        request = HttpRequest("POST", f"{self._messages}?{query}" if query else self._messages,
                              headers={"Content-Type": "application/xml"}, content=body)
        raise_refusal(self._pipeline.run(request, retry_on_methods=_RETRY_METHODS, **call).http_response)
