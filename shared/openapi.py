"""The OpenAPI 3.1 description of the HTTP API (served at ``GET /api/openapi.json``).

Kept in sync with the code by ``tests/e2e/test_openapi.py``: every registered HTTP route must be
described here, and real responses from the running host must validate against these schemas.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

PROBLEM = {"$ref": "#/components/responses/Problem"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str, example: Any = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"description": description, "content": {"application/json": media}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): PROBLEM for c in codes}


ACCOUNT_ID = {"name": "accountId", "in": "path", "required": True,
              "schema": {"type": "string", "maxLength": 64}, "description": "Account id (acc_…)."}
MESSAGE_ID = {"name": "messageId", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 512}}
ATTACHMENT_ID = {"name": "attachmentId", "in": "path", "required": True,
                 "schema": {"type": "string", "maxLength": 512}}
NULLABLE_STR = {"type": ["string", "null"]}
DATETIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}

ACCOUNT_EXAMPLE = {
    "id": "acc_5f0c2a9e41d7b3c8a1e2f3d4", "provider": "microsoft", "email": "adele@contoso.onmicrosoft.com",
    "displayName": "Adele Vance", "tenantId": "6e1b5c59-3b8a-4a64-9b58-0f3e0c0e1a11", "accountType": "work",
    "status": "active", "scopes": ["User.Read", "Mail.ReadWrite", "Mail.Send"],
    "connectedAt": "2026-11-22T10:00:00Z", "lastRefreshedAt": "2026-11-22T10:00:00Z",
    "accessTokenExpiresAt": "2026-11-22T11:00:00Z", "lastUsedAt": None, "lastError": None,
}

SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object", "description": "RFC 9457 problem details.",
        "required": ["type", "title", "status", "detail", "code"],
        "properties": {
            "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
            "detail": {"type": "string"}, "code": {"type": "string"}, "hint": {"type": "string"},
            "field": {"type": "string", "description": "The request field that is wrong (400)."},
            "microsoft": {"type": "object", "properties": {
                "error": NULLABLE_STR, "codes": {"type": "array", "items": {"type": "integer"}},
                "traceId": {"type": "string"}, "correlationId": {"type": "string"}, "requestId": {"type": "string"}}},
            "outcomeUnknown": {"type": "boolean"}, "reason": {"type": "string"}, "accountId": {"type": "string"},
        },
    },
    "Account": {
        "type": "object", "additionalProperties": False,
        "required": ["id", "provider", "email", "displayName", "tenantId", "accountType", "status", "scopes",
                     "connectedAt", "lastRefreshedAt", "accessTokenExpiresAt", "lastUsedAt", "lastError"],
        "properties": {
            "id": {"type": "string"}, "provider": {"const": "microsoft"}, "email": {"type": "string"},
            "displayName": {"type": "string"}, "tenantId": {"type": "string"},
            "accountType": {"enum": ["work", "personal"]}, "status": {"enum": ["active", "reauth_required"]},
            "scopes": {"type": "array", "items": {"type": "string"}},
            "connectedAt": {"type": "string", "format": "date-time"}, "lastRefreshedAt": DATETIME_OR_NULL,
            "accessTokenExpiresAt": DATETIME_OR_NULL, "lastUsedAt": DATETIME_OR_NULL,
            "lastError": {"oneOf": [{"type": "null"}, {"type": "object", "required": ["code", "message", "at"],
                                                       "properties": {"code": {"type": "string"},
                                                                      "message": {"type": "string"},
                                                                      "at": {"type": "string"}}}]},
        },
        "example": ACCOUNT_EXAMPLE,
    },
    "AccountList": {"type": "object", "required": ["accounts"], "additionalProperties": False,
                    "properties": {"accounts": {"type": "array", "items": _ref("Account")}}},
    "ConnectStart": {"type": "object", "required": ["authUrl", "state", "expiresAt"], "additionalProperties": False,
                     "properties": {"authUrl": {"type": "string", "format": "uri"}, "state": {"type": "string"},
                                    "expiresAt": {"type": "string", "format": "date-time"}}},
    "Health": {"type": "object", "required": ["status", "checks"],
               "properties": {"status": {"enum": ["ok", "unhealthy"]},
                              "checks": {"type": "object", "additionalProperties": {
                                  "type": "object", "required": ["ok"], "properties": {"ok": {"type": "boolean"}}}}}},
    "Recipient": {"oneOf": [
        {"type": "string", "description": "\"a@b.com\" or \"Name <a@b.com>\"", "maxLength": 600},
        {"type": "object", "required": ["address"], "additionalProperties": False,
         "properties": {"address": {"type": "string"}, "name": {"type": "string"}}}]},
    "Recipients": {"oneOf": [{"type": "array", "items": _ref("Recipient"), "maxItems": 500}, _ref("Recipient")]},
    "SendRequest": {
        "type": "object", "required": ["to"], "additionalProperties": False,
        "properties": {
            "to": _ref("Recipients"), "cc": _ref("Recipients"), "bcc": _ref("Recipients"),
            "replyTo": _ref("Recipients"), "subject": {"type": "string", "maxLength": 998},
            "bodyHtml": {"type": "string"}, "bodyText": {"type": "string"},
            "attachments": {"type": "array", "items": {
                "type": "object", "required": ["name", "contentBytes"], "additionalProperties": False,
                "properties": {"name": {"type": "string"}, "contentType": {"type": "string"},
                               "contentBytes": {"type": "string", "contentEncoding": "base64"}}}},
            "importance": {"enum": ["low", "normal", "high"]},
            "trackingId": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
            "saveToSentItems": {"type": "boolean", "default": True},
        },
        "example": {"to": ["Ann <ann@example.com>"], "subject": "Hello", "bodyHtml": "<p>Hi</p>",
                    "trackingId": "crm-4711"},
    },
    "SendResult": {"type": "object", "required": ["status", "trackingId", "sentAt"], "additionalProperties": False,
                   "properties": {"status": {"const": "sent"}, "trackingId": {"type": "string"},
                                  "sentAt": {"type": "string", "format": "date-time"}}},
    "Address": {"type": ["object", "null"], "properties": {"address": NULLABLE_STR, "name": NULLABLE_STR}},
    "MessageSummary": {
        "type": "object",
        "required": ["id", "subject", "from", "toRecipients", "receivedDateTime", "isRead", "hasAttachments",
                     "bodyPreview", "webLink", "conversationId"],
        "properties": {"id": {"type": "string"}, "subject": NULLABLE_STR, "from": _ref("Address"),
                       "toRecipients": {"type": "array", "items": _ref("Address")},
                       "receivedDateTime": NULLABLE_STR, "isRead": {"type": ["boolean", "null"]},
                       "hasAttachments": {"type": ["boolean", "null"]}, "bodyPreview": NULLABLE_STR,
                       "webLink": NULLABLE_STR, "conversationId": NULLABLE_STR},
    },
    "MessagePage": {"type": "object", "required": ["messages", "nextCursor"], "additionalProperties": False,
                    "properties": {"messages": {"type": "array", "items": _ref("MessageSummary")},
                                   "nextCursor": {"type": ["string", "null"],
                                                  "description": "Opaque; pass back as ?cursor=."}}},
    "MessageDetail": {"allOf": [_ref("MessageSummary"), {
        "type": "object", "required": ["body", "attachments"],
        "properties": {
            "ccRecipients": {"type": "array", "items": _ref("Address")},
            "bccRecipients": {"type": "array", "items": _ref("Address")},
            "replyTo": {"type": "array", "items": _ref("Address")},
            "sentDateTime": NULLABLE_STR, "importance": NULLABLE_STR, "internetMessageId": NULLABLE_STR,
            "body": {"type": "object", "required": ["contentType", "content"],
                     "properties": {"contentType": {"enum": ["text", "html"]}, "content": {"type": "string"}}},
            "attachments": {"type": "array", "items": {
                "type": "object", "required": ["id", "name", "contentType", "size"],
                "properties": {"id": {"type": "string"}, "name": NULLABLE_STR, "contentType": NULLABLE_STR,
                               "size": {"type": ["integer", "null"]}, "isInline": {"type": ["boolean", "null"]},
                               "kind": {"type": "string"}}}},
        }}]},
    "FolderList": {"type": "object", "required": ["folders"], "properties": {"folders": {"type": "array", "items": {
        "type": "object", "required": ["id", "displayName"],
        "properties": {"id": {"type": "string"}, "displayName": NULLABLE_STR, "parentFolderId": NULLABLE_STR,
                       "totalItemCount": {"type": ["integer", "null"]}, "unreadItemCount": {"type": ["integer", "null"]},
                       "childFolderCount": {"type": ["integer", "null"]}}}}}},
    "Diagnosis": {"type": "object", "required": ["accountId", "healthy", "checks"], "additionalProperties": False,
                  "properties": {"accountId": {"type": "string"}, "healthy": {"type": "boolean"},
                                 "checks": {"type": "array", "items": {
                                     "type": "object", "required": ["name", "ok", "detail", "hint"],
                                     "additionalProperties": False,
                                     "properties": {"name": {"type": "string"}, "ok": {"type": "boolean"},
                                                    "detail": {"type": "string"}, "hint": NULLABLE_STR}}}}},
}


def _op(op_id: str, summary: str, responses: dict[str, Any], *, params: list[Any] | None = None,
        secured: bool = True, body: dict[str, Any] | None = None, tags: tuple[str, ...] = ()) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "responses": responses, "tags": list(tags)}
    if params:
        op["parameters"] = params
        if any(p.get("in") == "query" for p in params):
            responses.setdefault("414", {"description": "URI too long (the Functions host's request-line limit)."})
    if body:
        op["requestBody"] = body
    if not secured:
        op["security"] = []
    else:
        responses.setdefault("401", PROBLEM)
    responses.setdefault("500", PROBLEM)
    return op


def _q(name: str, schema: dict[str, Any], description: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


@lru_cache(maxsize=1)
def _connect_paths() -> dict[str, Any]:
    return {
        "/api/health": {"get": _op("health", "Storage and client secret reachable?", {
            "200": _json(_ref("Health"), "Healthy."), "503": _json(_ref("Health"), "A check failed.")},
            secured=False, tags=("operations",))},
        "/api/openapi.json": {"get": _op("openapi", "This document.", {
            "200": _json({"type": "object"}, "OpenAPI 3.1 document.")}, secured=False, tags=("operations",))},
        "/api/connect/microsoft": {"get": _op("connect_microsoft", "Start connecting a Microsoft mailbox.", {
            "200": _json(_ref("ConnectStart"), "Send the user's browser to authUrl."), **_errors(400, 404, 503)},
            params=[_q("returnUrl", {"type": "string", "maxLength": 2048},
                       "Where the callback redirects; must match ALLOWED_RETURN_URLS."),
                    _q("loginHint", {"type": "string", "maxLength": 256}, "Pre-fill the sign-in name."),
                    _q("domainHint", {"type": "string", "maxLength": 256}, "Skip home-realm discovery."),
                    _q("prompt", {"enum": ["select_account", "consent", "login"]}, "Entra prompt behaviour."),
                    _q("accountId", {"type": "string", "maxLength": 64}, "Re-connect this account, keeping its id.")],
            tags=("connect",))},
        "/api/connect/microsoft/callback": {"get": _op(
            "connect_microsoft_callback", "Entra redirect URI: consumes state once, stores the account.", {
                "302": {"description": "Redirect to returnUrl with status=connected&accountId=… or "
                                       "status=error&code=…&message=…[&hint=…] (the hint names the fix, e.g. "
                                       "the admin-consent URL for consent_required)"},
                "200": {"description": "Connected (no returnUrl): an HTML page that posts the result to "
                                       "window.opener / the Office dialog parent.",
                        "content": {"text/html": {"schema": {"type": "string"}}}},
                **_errors(400)},
            params=[_q("state", {"type": "string"}, "The state from the connect call.", True),
                    _q("code", {"type": "string"}, "Authorization code."),
                    _q("error", {"type": "string"}, "Error from Entra."),
                    _q("error_description", {"type": "string"}, "Error description from Entra.")],
            secured=False, tags=("connect",))},
    }


def _account_paths() -> dict[str, Any]:
    acc = [ACCOUNT_ID]
    return {
        "/api/accounts": {"get": _op("list_accounts", "The caller's accounts.", {
            "200": _json(_ref("AccountList"), "Accounts.")}, tags=("accounts",))},
        "/api/accounts/{accountId}": {
            "get": _op("get_account", "One account.", {"200": _json(_ref("Account"), "The account."),
                                                        **_errors(404)}, params=acc, tags=("accounts",)),
            "delete": _op("delete_account", "Disconnect: destroy the tokens and the record.", {
                "204": {"description": "Deleted."}, **_errors(404)}, params=acc, tags=("accounts",)),
        },
        "/api/accounts/{accountId}/refresh": {"post": _op("refresh_account", "Refresh the tokens now.", {
            "200": _json(_ref("Account"), "Refreshed."), **_errors(404, 409, 502, 503)}, params=acc,
            tags=("accounts",))},
        "/api/accounts/{accountId}/diagnose": {"get": _op("diagnose", "Explain a broken mailbox.", {
            "200": _json(_ref("Diagnosis"), "Checks with verdicts and hints."), **_errors(404)}, params=acc,
            tags=("accounts",))},
    }


def _mail_paths() -> dict[str, Any]:
    acc = [ACCOUNT_ID]
    return {
        "/api/accounts/{accountId}/send": {"post": _op("send_mail", "Send mail as the mailbox.", {
            "202": _json(_ref("SendResult"), "Accepted by Microsoft Graph."),
            **_errors(400, 403, 404, 409, 413, 502, 503)},
            params=acc + [{"name": "Idempotency-Key", "in": "header", "required": False,
                           "schema": {"type": "string", "maxLength": 255},
                           "description": "Same key + same body within 24 h returns the first result."}],
            body={"required": True, "content": {
                "application/json": {"schema": _ref("SendRequest")},
                "multipart/form-data": {"schema": {
                    "type": "object", "required": ["message"],
                    "properties": {"message": {"type": "string", "description": "SendRequest as JSON"},
                                   "file": {"type": "string", "format": "binary"}}}}}},
            tags=("mail",))},
        "/api/accounts/{accountId}/messages": {"get": _op("list_messages", "A page of messages, newest first.", {
            "200": _json(_ref("MessagePage"), "Messages."), **_errors(400, 403, 404, 409, 502, 503)},
            params=acc + [_q("folder", {"type": "string", "maxLength": 512}, "Well-known name or folder id."),
                          _q("top", {"type": "integer", "minimum": 1, "maximum": 100, "default": 25}, "Page size."),
                          _q("cursor", {"type": "string", "maxLength": 8192}, "nextCursor of the previous page."),
                          _q("unreadOnly", {"type": "boolean"}, "Only unread messages.")],
            tags=("mail",))},
        "/api/accounts/{accountId}/messages/{messageId}": {"get": _op(
            "get_message", "One message with body and attachment metadata.", {
                "200": _json(_ref("MessageDetail"), "The message."), **_errors(400, 403, 404, 409, 502, 503)},
            params=acc + [MESSAGE_ID], tags=("mail",))},
        "/api/accounts/{accountId}/messages/{messageId}/attachments/{attachmentId}": {"get": _op(
            "get_attachment", "The raw bytes of one attachment.", {
                "200": {"description": "The attachment, with its content type.",
                        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
                **_errors(400, 403, 404, 409, 502, 503)},
            params=acc + [MESSAGE_ID, ATTACHMENT_ID], tags=("mail",))},
        "/api/accounts/{accountId}/folders": {"get": _op("list_folders", "Mail folders.", {
            "200": _json(_ref("FolderList"), "Folders."), **_errors(403, 404, 409, 502, 503)}, params=acc,
            tags=("mail",))},
    }


def document() -> dict[str, Any]:
    paths = {**_connect_paths(), **_account_paths(), **_mail_paths()}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Outlook mailbox connector", "version": "1.0.0",
                 "description": "Connect Outlook.com / Microsoft 365 mailboxes (Entra OAuth, auth code + PKCE) and "
                                "send and read mail through Microsoft Graph on the user's behalf."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "tags": [{"name": t} for t in ("connect", "accounts", "mail", "operations")],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                                           "description": "Issued by the integrating product; `sub` is the owner."}},
            "schemas": SCHEMAS,
            "responses": {"Problem": {"description": "An error (RFC 9457).",
                                      "content": {"application/problem+json": {"schema": _ref("Problem")}}}},
        },
    }
