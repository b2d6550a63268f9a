"""POST /api/accounts/{accountId}/send — JSON (base64 attachments) or multipart/form-data."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import azure.functions as func

from shared.blueprints._http import Context, handle, json_response

if TYPE_CHECKING:
    from shared.service import Connector

bp = func.Blueprint()


@bp.route(route="accounts/{accountId}/send", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def send_mail(req: func.HttpRequest) -> func.HttpResponse:
    def run(c: Connector, ctx: Context) -> func.HttpResponse:
        from shared.errors import ValidationError
        from shared.mail import make_attachment, parse_send_request, request_fingerprint

        raw = req.get_body()
        ctype = (req.headers.get("Content-Type") or "").lower()
        files = None
        if ctype.startswith("multipart/form-data"):
            message = req.form.get("message")
            if message is None:
                raise ValidationError("message", "multipart requests need a JSON part named 'message'.")
            body = _json(message, "message")
            files = []
            for i, (_, f) in enumerate(req.files.items(multi=True)):
                field = f"files[{i}]"
                # The part's stream (spooled to a temporary file when large) is read chunk by chunk
                # at upload time: the file is never copied into memory beside the request body.
                files.append(make_attachment(f.filename, f.content_type or "application/octet-stream",
                                             f.stream, field))
        elif ctype.startswith("application/json") or not ctype:
            body = _json(raw, "body")
        else:
            raise ValidationError("Content-Type", "Send application/json or multipart/form-data.")
        request = parse_send_request(body, files=files, max_total=c.settings.send_max_total_bytes)
        key = req.headers.get("Idempotency-Key")
        fingerprint = request_fingerprint(body, request.attachments) if key else ""
        result = c.send_mail(ctx.owner, ctx.account_id, request, idempotency_key=key, body_hash=fingerprint)
        return json_response(result, 202)

    return handle(req, "send_mail", run)


def _json(raw: bytes | str, field: str) -> Any:
    from shared.errors import ValidationError

    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValidationError(field, f"The {field} is not valid JSON.") from None
