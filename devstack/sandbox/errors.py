"""Error bodies exactly as Microsoft Entra ID and Microsoft Graph shape them."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

from flask import Response

# Entra token-endpoint error body: error, error_description ("AADSTSnnnn: text\r\nTrace ID: ..\r\n
# Correlation ID: ..\r\nTimestamp: .."), error_codes, timestamp, trace_id, correlation_id, error_uri,
# and sometimes suberror / claims.
# https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-auth-code-flow#error-response-1
# https://learn.microsoft.com/en-us/previous-versions/azure/dn645548(v=azure.100) (sample body)
# https://learn.microsoft.com/en-us/entra/identity-platform/reference-error-codes


def _entra_timestamp(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%d %H:%M:%SZ")


def aadsts_body(
    error: str,
    code: int,
    text: str,
    *,
    host: str,
    correlation_id: str | None = None,
    suberror: str | None = None,
    claims: str | None = None,
) -> dict[str, Any]:
    trace_id = str(uuid.uuid4())
    correlation_id = correlation_id or str(uuid.uuid4())
    ts = _entra_timestamp()
    body: dict[str, Any] = {
        "error": error,
        "error_description": (
            f"AADSTS{code}: {text}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}"
            f"\r\nTimestamp: {ts}"
        ),
        "error_codes": [code],
        "timestamp": ts,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": f"{host}/error?code={code}",
    }
    if suberror:
        body["suberror"] = suberror
    if claims:
        body["claims"] = claims
    return body


def aadsts_response(status: int, error: str, code: int, text: str, *, host: str, **kw: Any) -> Response:
    body = aadsts_body(error, code, text, host=host, **kw)
    resp = Response(json.dumps(body), status=status, mimetype="application/json")
    resp.headers["Cache-Control"] = "no-store, no-cache"
    resp.headers["Pragma"] = "no-cache"
    resp.headers["x-ms-request-id"] = body["trace_id"]
    return resp


# Graph error body: {"error": {"code", "message", "innerError": {"date", "request-id",
# "client-request-id"}}}  https://learn.microsoft.com/en-us/graph/errors
def graph_error_body(code: str, message: str, request_id: str, client_request_id: str) -> dict[str, Any]:
    return {
        "error": {
            "code": code,
            "message": message,
            "innerError": {
                "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
                "request-id": request_id,
                "client-request-id": client_request_id,
            },
        }
    }


class GraphError(Exception):
    """Raised inside Graph handlers; rendered as a Graph error response."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
