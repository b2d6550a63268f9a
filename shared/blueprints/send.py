"""POST /api/accounts/{accountId}/send — JSON (base64 attachments) or multipart/form-data."""

from __future__ import annotations

from typing import TYPE_CHECKING

import azure.functions as func

from shared.blueprints._http import NO_CONTEXT, Context, handle, json_body, json_response

if TYPE_CHECKING:
    from shared.mail import Attachment
    from shared.service import Connector

bp = func.Blueprint()


@bp.route(route="accounts/{accountId}/send", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def send_mail(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    def run(c: Connector, ctx: Context) -> func.HttpResponse:
        from shared.mail import parse_send_request, request_fingerprint

        body, files = read_mail_body(req)
        request = parse_send_request(body, files=files, max_total=c.settings.send_max_total_bytes)
        key = req.headers.get("Idempotency-Key")
        fingerprint = request_fingerprint(body, request.attachments) if key and isinstance(body, dict) else ""
        result = c.mail.send(ctx.owner, ctx.account_id, request, idempotency_key=key, body_hash=fingerprint)
        return json_response(result, 202)

    return handle(req, "send_mail", run, context=context)


def read_mail_body(req: func.HttpRequest) -> tuple[object, list[Attachment] | None]:
    """The body of a send, reply or forward: JSON, or multipart/form-data (a JSON part ``message`` and
    raw file parts). ``None`` files for JSON, whose attachments ride in the body as base64."""
    from shared.errors import ValidationError

    ctype = (req.headers.get("Content-Type") or "").lower()
    if ctype.startswith("multipart/form-data"):
        return _multipart(req)
    if ctype.startswith("application/json") or not ctype:
        return json_body(req.get_body(), "body"), None
    raise ValidationError("Content-Type", "Send application/json or multipart/form-data.")


def _multipart(req: func.HttpRequest) -> tuple[object, list[Attachment]]:
    """The JSON part ``message`` and the file parts, after counting the parts (RFC 7578) without parsing."""
    from shared.errors import ValidationError
    from shared.mail import make_attachment

    check_multipart_parts(req.get_body(), req.headers.get("Content-Type") or "")
    message = req.form.get("message")
    if message is None:
        raise ValidationError("message", "multipart requests need a JSON part named 'message'.")
    body = json_body(message, "message")
    files = []
    for i, (_, f) in enumerate(req.files.items(multi=True)):
        # The part's stream (spooled to a temporary file when large) is read chunk by chunk at upload
        # time: the file is never copied into memory beside the request body.
        files.append(make_attachment(f.filename, f.content_type or "application/octet-stream", f.stream,
                                     f"files[{i}]"))
    return body, files


def check_multipart_parts(raw: bytes, content_type: str) -> None:
    """413 before parsing when the body has more parts than a message may have attachments (+1).

    Every part starts with the delimiter ``--boundary`` (RFC 2046 §5.1.1), so counting delimiters
    bounds the parts in one fast pass; a multipart parser would first build them all. The boundary is
    read by the parser that parses the body (werkzeug's, under ``HttpRequest.form``), so the count and the
    parse use the same one; a header that plainly names it twice is refused as malformed as well."""
    from werkzeug.http import parse_options_header

    from shared.errors import PayloadTooLargeError, ValidationError
    from shared.mail import MAX_ATTACHMENTS

    _, options = parse_options_header(content_type)
    if _param_names(content_type).count("boundary") > 1:
        raise ValidationError("Content-Type", "The Content-Type names more than one boundary.")
    boundary = options.get("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 70:  # RFC 2046 §5.1.1: 1-70 characters
        raise ValidationError("Content-Type", "multipart/form-data needs a boundary parameter of 1-70 characters.")
    parts = raw.count(b"--" + boundary.encode("latin-1", "replace")) - 1
    if parts > MAX_ATTACHMENTS + 1:
        raise PayloadTooLargeError(f"The request has more than {MAX_ATTACHMENTS + 1} parts.",
                                   hint=f"Send at most {MAX_ATTACHMENTS} files with the 'message' part.",
                                   extra={"field": "files"})


def _param_names(content_type: str) -> list[str]:
    """The parameter names of a media type, lower case, as often as they occur (RFC 9110 §5.6.6)."""
    from email.message import Message

    m = Message()
    m["Content-Type"] = content_type
    return [name.lower() for name, _ in (m.get_params() or [])[1:]]
