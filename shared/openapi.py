"""The OpenAPI 3.1 description of the HTTP API (served at ``GET /api/openapi.json``).

Kept in sync with the code by ``tests/e2e/test_openapi.py``: every registered HTTP route must be
described here, and real responses from the running host must validate against these schemas.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

from shared import __version__

PROBLEM = {"$ref": "#/components/responses/Problem"}

Json = dict[str, object]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Mapping[str, object], description: str, example: object = None) -> Json:
    media: Json = {"schema": schema}
    if example is not None:  # OAS 3.1 media type: a map of Example Objects
        media["examples"] = {"example": {"value": example}}
    return {"description": description, "content": {"application/json": media}}


def _errors(*codes: int) -> Json:
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
    "notifications": {"status": "active", "expiresAt": "2026-11-29T09:50:00Z", "lastEventAt": "2026-11-22T10:05:00Z"},
    "accessType": "delegated",
}
TEAM_ACCOUNT_EXAMPLE = {
    **ACCOUNT_EXAMPLE, "id": "acc_9b1d0e7f22c4a5d6b7e8f901", "email": "support@contoso.onmicrosoft.com",
    "displayName": "support@contoso.onmicrosoft.com", "scopes": ["Mail.ReadWrite", "Mail.Send"],
    "lastRefreshedAt": None, "accessTokenExpiresAt": None, "accessType": "application",
    "tenantConnectionId": "tc_4c1f0a9e8d7b6c5a4f3e2d1c",
}
TENANT_EXAMPLE = {"id": "tc_4c1f0a9e8d7b6c5a4f3e2d1c", "tenantId": "6e1b5c59-3b8a-4a64-9b58-0f3e0c0e1a11",
                  "status": "active", "connectedAt": "2026-11-22T10:00:00Z", "mailboxCount": 1, "lastError": None}
TENANT_ID_PARAM = {"name": "tenantConnectionId", "in": "path", "required": True,
                   "schema": {"type": "string", "maxLength": 64}, "description": "A tenant connection's id (tc_…)."}
_LAST_ERROR = {"oneOf": [{"type": "null"}, {"type": "object", "required": ["code", "message", "at"],
                                            "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                                                           "at": {"type": "string"}}}]}

SCHEMAS: Json = {
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
                     "connectedAt", "lastRefreshedAt", "accessTokenExpiresAt", "lastUsedAt", "lastError",
                     "notifications", "accessType"],
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
            "notifications": {
                "type": "object", "required": ["status", "expiresAt", "lastEventAt"], "additionalProperties": False,
                "description": "Mailbox events (Graph change notifications → message.* webhooks).",
                "properties": {"status": {"enum": ["active", "pending", "failed", "off"]},
                               "expiresAt": DATETIME_OR_NULL, "lastEventAt": DATETIME_OR_NULL}},
            "accessType": {"enum": ["delegated", "application"],
                           "description": "delegated: a user who signed in; application: a team mailbox reached with "
                                          "the app's application permissions (admin consent)."},
            "tenantConnectionId": {"type": "string", "description": "Team mailboxes: the tenant connection."},
        },
        "examples": [ACCOUNT_EXAMPLE, TEAM_ACCOUNT_EXAMPLE],
    },
    "TenantConnection": {
        "type": "object", "additionalProperties": False,
        "required": ["id", "tenantId", "status", "connectedAt", "mailboxCount", "lastError"],
        "description": "A tenant whose administrator granted the app's application permissions (admin consent).",
        "properties": {"id": {"type": "string"}, "tenantId": {"type": "string"},
                       "status": {"enum": ["active", "consent_required"]},
                       "connectedAt": {"type": "string", "format": "date-time"},
                       "mailboxCount": {"type": "integer", "minimum": 0}, "lastError": _LAST_ERROR},
        "examples": [TENANT_EXAMPLE],
    },
    "TenantList": {"type": "object", "required": ["tenants"], "additionalProperties": False,
                   "properties": {"tenants": {"type": "array", "items": _ref("TenantConnection")}}},
    "AddMailbox": {"type": "object", "required": ["address"], "additionalProperties": False,
                   "properties": {"address": {"type": "string", "maxLength": 254, "format": "email",
                                              "description": "A user, shared or room mailbox of the tenant: one "
                                                             "bare address, no display name."}},
                   "examples": [{"address": "support@contoso.onmicrosoft.com"}]},
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
        "examples": [{"to": ["Ann <ann@example.com>"], "subject": "Hello", "bodyHtml": "<p>Hi</p>",
                    "trackingId": "crm-4711"}],
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
    "AnswerRequest": {
        "type": "object", "additionalProperties": False,
        "description": "A reply, reply-all or forward. Graph picks the recipients of a reply (the sender, and for "
                       "replyAll everyone else), the RE:/FW: subject and the quoted original; to/cc/bcc add "
                       "recipients (forward: required). Give comment (above the quoted original) or bodyHtml/bodyText "
                       "(the whole body), not both.",
        "properties": {
            "comment": {"type": "string"}, "bodyHtml": {"type": "string"}, "bodyText": {"type": "string"},
            "to": _ref("Recipients"), "cc": _ref("Recipients"), "bcc": _ref("Recipients"),
            "attachments": {"type": "array", "maxItems": 100, "items": {
                "type": "object", "required": ["name", "contentBytes"], "additionalProperties": False,
                "properties": {"name": {"type": "string"}, "contentType": {"type": "string"},
                               "contentBytes": {"type": "string", "contentEncoding": "base64"}}}},
            "trackingId": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
        },
        "examples": [{"comment": "Thanks, we'll be in touch.", "trackingId": "crm-4711-reply"}],
    },
    "AnswerResult": {
        "type": "object", "required": ["status", "trackingId", "sentAt", "messageId", "conversationId"],
        "additionalProperties": False,
        "properties": {"status": {"const": "sent"}, "trackingId": {"type": "string"},
                       "sentAt": {"type": "string", "format": "date-time"},
                       "messageId": {"type": ["string", "null"],
                                     "description": "The immutable id of the sent answer in Sent Items when it was "
                                                    "sent from a draft (large attachments or added recipients); null "
                                                    "when Graph's direct action sent it (Graph answers no id)."},
                       "conversationId": {"type": ["string", "null"]}}},
    "MessageUpdate": {
        "type": "object", "additionalProperties": False, "minProperties": 1,
        "properties": {"isRead": {"type": "boolean"}, "flag": {"enum": ["notFlagged", "flagged", "complete"]},
                       "categories": {"type": "array", "maxItems": 50,
                                      "items": {"type": "string", "minLength": 1, "maxLength": 255}}},
        "examples": [{"isRead": True, "flag": "flagged", "categories": ["Customer"]}]},
    "MoveRequest": {"type": "object", "required": ["folder"], "additionalProperties": False,
                    "properties": {"folder": {"type": "string", "maxLength": 512,
                                              "description": "A well-known folder name (inbox, archive, "
                                                             "deleteditems, …) or a folder id."}},
                    "examples": [{"folder": "archive"}]},
    "OrganisedMessage": {"allOf": [_ref("MessageSummary"), {
        "type": "object", "required": ["flag", "categories", "parentFolderId"],
        "properties": {"flag": {"enum": ["notFlagged", "flagged", "complete"]},
                       "categories": {"type": "array", "items": {"type": "string"}},
                       "parentFolderId": NULLABLE_STR}}]},
    "Diagnosis": {"type": "object", "required": ["accountId", "healthy", "checks"], "additionalProperties": False,
                  "properties": {"accountId": {"type": "string"}, "healthy": {"type": "boolean"},
                                 "checks": {"type": "array", "items": {
                                     "type": "object", "required": ["name", "ok", "detail", "hint"],
                                     "additionalProperties": False,
                                     "properties": {"name": {"type": "string"}, "ok": {"type": "boolean"},
                                                    "detail": {"type": "string"}, "hint": NULLABLE_STR}}}}},
}


def _op(op_id: str, summary: str, responses: Json, *, params: list[Json] | None = None,
        secured: bool = True, body: Json | None = None, tags: tuple[str, ...] = ()) -> Json:
    op: Json = {"operationId": op_id, "summary": summary, "responses": responses, "tags": list(tags)}
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


def _q(name: str, schema: Mapping[str, object], description: str, required: bool = False) -> Json:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


_CALLBACK_FIELDS: dict[str, dict[str, str]] = {
    "state": {"type": "string"}, "code": {"type": "string"}, "error": {"type": "string"},
    "error_description": {"type": "string"}}


def _callback_responses() -> Json:
    return {
        "302": {"description": "Redirect to returnUrl with status=connected&accountId=…&result=… (result: a signed "
                               "token to verify against the session that started the connect, see "
                               "GET /api/connect/microsoft/keys) or status=error&code=…&message=…[&hint=…]"},
        "200": {"description": "Connected (no returnUrl): an HTML page that posts the result to "
                               "window.opener / the Office dialog parent.",
                "content": {"text/html": {"schema": {"type": "string"}}}},
        **_errors(400, 413, 503)}


@lru_cache(maxsize=1)
def _connect_paths() -> Json:
    return {
        "/api/health": {"get": _op("health", "Storage and client secret reachable?", {
            "200": _json(_ref("Health"), "Healthy."), "503": _json(_ref("Health"), "A check failed.")},
            secured=False, tags=("operations",))},
        "/api/openapi.json": {"get": _op("openapi", "This document.", {
            "200": _json({"type": "object"}, "OpenAPI 3.1 document.")}, secured=False, tags=("operations",))},
        "/api/problems": {"get": _op("problems", "What each problem `code` means; every problem's `type` points "
                                     "to its anchor here.", {
            "200": {"description": "HTML page, one anchor per code.", "content": {"text/html": {
                "schema": {"type": "string"}}}}}, secured=False, tags=("operations",))},
        "/api/connect/microsoft": {"get": _op("connect_microsoft", "Start connecting a Microsoft mailbox.", {
            "200": _json(_ref("ConnectStart"), "Send the user's browser to authUrl."), **_errors(400, 404, 503)},
            params=[_q("returnUrl", {"type": "string", "maxLength": 2048},
                       "Where the callback redirects; must match ALLOWED_RETURN_URLS."),
                    _q("loginHint", {"type": "string", "maxLength": 256}, "Pre-fill the sign-in name."),
                    _q("domainHint", {"type": "string", "maxLength": 256}, "Skip home-realm discovery."),
                    _q("prompt", {"enum": ["select_account", "consent", "login"]}, "Entra prompt behaviour."),
                    _q("accountId", {"type": "string", "maxLength": 64}, "Re-connect this account, keeping its id."),
                    _q("requireLoginHint", {"enum": ["true", "false"]},
                       "true: the signed-in account's UPN or mail must equal loginHint, else error account_mismatch "
                       "and nothing is stored.")],
            tags=("connect",))},
        "/api/connect/microsoft/callback": {
            "post": _op("connect_microsoft_callback_post", "Entra redirect URI (response_mode=form_post): consumes "
                        "state once, redeems the code, stores the account.", _callback_responses(),
                        body={"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
                            "type": "object", "required": ["state"], "properties": _CALLBACK_FIELDS}}}},
                        secured=False, tags=("connect",)),
            "get": _op("connect_microsoft_callback", "Entra's error redirects (error, state); a code in the URL is "
                       "refused (400, field code): codes arrive by form_post.", _callback_responses(),
                       params=[_q(k, v, "From Entra.", k == "state") for k, v in _CALLBACK_FIELDS.items()],
                       secured=False, tags=("connect",)),
        },
        "/api/connect/microsoft/admin": {"get": _op(
            "connect_microsoft_admin", "Team mailboxes: a tenant administrator (Global or Privileged Role "
            "Administrator) opens authUrl, signs in, then grants the app's application permissions on Entra's "
            "admin-consent page; both legs return through the callback, which stores a tenant connection and "
            "redirects to returnUrl with status=connected&tenantConnectionId=…&result=… (or status=error&code=…).", {
                "200": _json(_ref("ConnectStart"), "Send the administrator's browser to authUrl."),
                **_errors(400, 503)},
            params=[_q("returnUrl", {"type": "string", "maxLength": 2048},
                       "Where the callback redirects; must match ALLOWED_RETURN_URLS."),
                    _q("tenant", {"type": "string", "maxLength": 256},
                       "The tenant (id or verified domain) the consent is for; default organizations (the "
                       "administrator's own). A consent granted in another tenant is refused.")],
            tags=("connect", "tenants"))},
        "/api/connect/microsoft/keys": {"get": _op(
            "connect_result_keys", "The JWK Set (RFC 7517) of ES256 public keys that verify the callback's "
            "result token.", {"200": _json({"type": "object", "required": ["keys"], "properties": {
                "keys": {"type": "array", "items": {"type": "object", "required": ["kty", "kid"]}}}},
                "JWK Set."), **_errors(503)}, secured=False, tags=("connect",))},
    }


def _account_paths() -> Json:
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
            "200": _json(_ref("Diagnosis"), "Checks with verdicts and hints."), **_errors(400, 404)},
            params=[*acc, _q("probe", {"type": "string", "maxLength": 254},
                             "Team mailboxes: a mailbox of the tenant that was not added, to check that the "
                             "administrator scoped the app (refused = scoped). Default: one of the caller's "
                             "signed-in mailboxes of that tenant.")],
            tags=("accounts",))},
    }


def _tenant_paths() -> Json:
    tc = [TENANT_ID_PARAM]
    return {
        "/api/tenants": {"get": _op("list_tenants", "The caller's tenant connections (team mailboxes).", {
            "200": _json(_ref("TenantList"), "Tenant connections.")}, tags=("tenants",))},
        "/api/tenants/{tenantConnectionId}": {
            "get": _op("get_tenant", "One tenant connection.", {
                "200": _json(_ref("TenantConnection"), "The tenant connection."), **_errors(404)}, params=tc,
                tags=("tenants",)),
            "delete": _op("delete_tenant", "Remove the connection and every mailbox added through it (their "
                          "subscriptions included).", {"204": {"description": "Deleted."}, **_errors(404, 503)},
                          params=tc, tags=("tenants",)),
        },
        "/api/tenants/{tenantConnectionId}/mailboxes": {"post": _op(
            "add_mailbox", "Add a user, shared or room mailbox of the tenant, after reaching it with the "
            "application token. 409 mailbox_access_denied: outside the administrator's scope; 422 "
            "mailbox_not_found; 409 tenant_consent_required: consent removed.", {
                "201": _json(_ref("Account"), "Added (accessType application)."),
                "200": _json(_ref("Account"), "Added before: the same account."),
                **_errors(400, 404, 409, 413, 422, 503)},
            params=tc, body={"required": True, "content": {"application/json": {"schema": _ref("AddMailbox")}}},
            tags=("tenants",))},
    }


def _mail_paths() -> Json:
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
        **_read_paths(),
        "/api/accounts/{accountId}/messages/{messageId}": {
            "get": _op("get_message", "One message with body and attachment metadata.", {
                "200": _json(_ref("MessageDetail"), "The message."), **_errors(400, 403, 404, 409, 502, 503)},
                params=acc + [MESSAGE_ID], tags=("mail",)),
            "patch": _op("update_message", "Mark read or unread, flag, categorise.", {
                "200": _json(_ref("OrganisedMessage"), "The updated message."),
                **_errors(400, 403, 404, 409, 502, 503)},
                params=acc + [MESSAGE_ID], body={"required": True, "content": {
                    "application/json": {"schema": _ref("MessageUpdate")}}}, tags=("mail",)),
            "delete": _op("delete_message", "Delete as Outlook does: the message moves to Deleted Items.", {
                "204": {"description": "Moved to Deleted Items (its id stays: ids are immutable ids)."},
                **_errors(400, 403, 404, 409, 502, 503)}, params=acc + [MESSAGE_ID], tags=("mail",)),
        },
        **_answer_paths(),
        "/api/accounts/{accountId}/messages/{messageId}/move": {"post": _op(
            "move_message", "Move to another folder; the message keeps its (immutable) id.", {
                "200": _json(_ref("OrganisedMessage"), "The message in its new folder, with the same id."),
                **_errors(400, 403, 404, 409, 502, 503)},
            params=acc + [MESSAGE_ID], body={"required": True, "content": {
                "application/json": {"schema": _ref("MoveRequest")}}}, tags=("mail",))},
    }


def _read_paths() -> Json:
    acc = [ACCOUNT_ID]
    return {
        "/api/accounts/{accountId}/messages/{messageId}/attachments/{attachmentId}": {"get": _op(
            "get_attachment", "The raw bytes of one attachment, whole (up to 25 MiB) or one byte range.", {
                "200": {"description": "The attachment, with its content type.",
                        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
                "206": {"description": "One range (at most 25 MiB; Content-Range says which bytes and the total).",
                        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
                **_errors(400, 403, 404, 409, 413, 416, 502, 503)},
            params=acc + [MESSAGE_ID, ATTACHMENT_ID, {
                "name": "Range", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 64},
                "description": "bytes=first-last, bytes=first- or bytes=-n. Needed for attachments over 25 MiB "
                               "(the whole is answered 413 attachment_too_large)."}], tags=("mail",))},
        "/api/accounts/{accountId}/folders": {"get": _op("list_folders", "Mail folders.", {
            "200": _json(_ref("FolderList"), "Folders."), **_errors(403, 404, 409, 502, 503)}, params=acc,
            tags=("mail",))},
        "/api/accounts/{accountId}/messages": {"get": _op(
            "list_messages", "A page of messages: newest first, a thread oldest first, or full-text search results.", {
                "200": _json(_ref("MessagePage"), "Messages."), **_errors(400, 403, 404, 409, 502, 503)},
            params=acc + [
                _q("folder", {"type": "string", "maxLength": 512}, "Well-known name or folder id."),
                _q("top", {"type": "integer", "minimum": 1, "maximum": 100, "default": 25}, "Page size."),
                _q("cursor", {"type": "string", "maxLength": 8192}, "nextCursor of the previous page."),
                _q("unreadOnly", {"type": "boolean"}, "Only unread messages."),
                _q("q", {"type": "string", "maxLength": 512},
                   "Full-text search (Graph $search, KQL such as subject:invoice): newest sent first, at most 1,000 "
                   "results; not combinable with unreadOnly, conversationId, receivedAfter or receivedBefore (400)."),
                _q("conversationId", {"type": "string", "maxLength": 512},
                   "One thread, oldest first, across folders unless folder is given."),
                _q("from", {"type": "string", "maxLength": 320}, "Sender address."),
                _q("receivedAfter", {"type": "string", "format": "date-time"}, "Received at or after (RFC 3339)."),
                _q("receivedBefore", {"type": "string", "format": "date-time"}, "Received before (RFC 3339).")],
            tags=("mail",))},
        "/api/accounts/{accountId}/conversations/{conversationId}": {"get": _op(
            "get_conversation", "A thread's messages, oldest first, paged like messages.", {
                "200": _json(_ref("MessagePage"), "Messages of the conversation."),
                **_errors(400, 403, 404, 409, 502, 503)},
            params=acc + [{"name": "conversationId", "in": "path", "required": True,
                           "schema": {"type": "string", "maxLength": 512}},
                          _q("top", {"type": "integer", "minimum": 1, "maximum": 100, "default": 25}, "Page size."),
                          _q("cursor", {"type": "string", "maxLength": 8192}, "nextCursor of the previous page.")],
            tags=("mail",))},
    }


def _answer_paths() -> Json:
    idem = {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 255},
            "description": "Same key + same body within 24 h returns the first result and sends nothing."}
    out: Json = {}
    for kind, op_id, summary in (("reply", "reply_message", "Reply to the sender, in the same conversation."),
                                 ("replyAll", "reply_all_message", "Reply to all, in the same conversation."),
                                 ("forward", "forward_message", "Forward (with its attachments) to `to`.")):
        out[f"/api/accounts/{{accountId}}/messages/{{messageId}}/{kind}"] = {"post": _op(
            op_id, summary, {"202": _json(_ref("AnswerResult"), "Accepted by Microsoft Graph."),
                             **_errors(400, 403, 404, 409, 413, 502, 503)},
            params=[ACCOUNT_ID, MESSAGE_ID, idem], body={"required": True, "content": {
                "application/json": {"schema": _ref("AnswerRequest")},
                "multipart/form-data": {"schema": {
                    "type": "object", "required": ["message"],
                    "properties": {"message": {"type": "string", "description": "AnswerRequest as JSON"},
                                   "file": {"type": "string", "format": "binary"}}}}}},
            tags=("mail",))}
    return out


def _notification_op(op_id: str, summary: str) -> Json:
    """Graph's side of the contract (https://learn.microsoft.com/graph/change-notifications-delivery-webhooks)."""
    body = {"required": False, "content": {"application/json": {"schema": {
        "type": "object", "required": ["value"], "description": "Graph's changeNotificationCollection.",
        "properties": {"value": {"type": "array", "minItems": 1, "maxItems": 1000, "items": {
            "type": "object", "required": ["subscriptionId"],
            "properties": {"subscriptionId": {"type": "string", "maxLength": 128},
                           "clientState": {"type": "string", "maxLength": 128},
                           "changeType": {"type": "string"}, "lifecycleEvent": {"type": "string"},
                           "resourceData": {"type": "object", "properties": {"id": {"type": "string"}}}}}}}}}}}
    token = _q("validationToken", {"type": "string", "maxLength": 1024},
               "Graph's validation handshake: echoed as text/plain (200).")
    return _op(op_id, summary, {
        "200": {"description": "Validation handshake: the URL-decoded validationToken.",
                "content": {"text/plain": {"schema": {"type": "string"}}}},
        "202": {"description": "Notifications checked (clientState) and queued."},
        **_errors(400, 413, 503)}, params=[token], body=body, secured=False, tags=("notifications",))


def _notification_paths() -> Json:
    return {
        "/api/notifications/microsoft": {"post": _notification_op(
            "graph_notifications", "Microsoft Graph change notifications (anonymous; Graph calls it).")},
        "/api/notifications/microsoft/lifecycle": {"post": _notification_op(
            "graph_lifecycle_notifications", "Microsoft Graph lifecycle notifications (anonymous).")},
    }


_ADDRESS = {"type": ["object", "null"], "properties": {"address": NULLABLE_STR, "name": NULLABLE_STR}}
_SUMMARY = {
    "type": "object", "required": ["id"],
    "properties": {
        "id": {"type": "string", "description": "Immutable id: the same before and after a move."},
        "subject": NULLABLE_STR, "from": _ADDRESS, "toRecipients": {"type": "array", "items": _ADDRESS},
        "toRecipientsCount": {"type": "integer"}, "receivedDateTime": DATETIME_OR_NULL,
        "conversationId": NULLABLE_STR, "internetMessageId": NULLABLE_STR, "hasAttachments": {"type": "boolean"},
        "bodyPreview": NULLABLE_STR, "isRead": {"type": "boolean"},
        "folder": {"type": "string", "description": "message.updated: a well-known folder name, else the folder id."},
        "flag": {"type": "object", "description": "message.updated",
                 "properties": {"flagStatus": {"enum": ["notFlagged", "flagged", "complete"]}}},
        "categories": {"type": "array", "items": {"type": "string"}, "description": "message.updated"},
    },
}
_EVENT_EXAMPLE_MESSAGE = {"id": "AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0AmQ", "subject": "Quarterly numbers",
                          "from": {"address": "ann@example.com", "name": "Ann"},
                          "toRecipients": [{"address": "adele@contoso.onmicrosoft.com", "name": "Adele Vance"}],
                          "toRecipientsCount": 1, "receivedDateTime": "2026-11-22T10:05:01Z",
                          "conversationId": "AAQkAGI2", "internetMessageId": "<1@example.com>",
                          "hasAttachments": False, "bodyPreview": "See attached", "isRead": False}
#: The events the connector POSTs to WEBHOOK_URL (docs/webhooks.md): (type, summary, extra data, example message).
_MESSAGE_EVENTS: tuple[tuple[str, str, Json, Json], ...] = (
    ("message.received", "A message arrived in the Inbox.", {}, _EVENT_EXAMPLE_MESSAGE),
    ("message.sent", "A message was sent (Sent Items): through this API (origin api) or in Outlook (mailbox).",
     {"origin": "api", "trackingId": "crm-4711"}, {**_EVENT_EXAMPLE_MESSAGE, "isRead": True}),
    ("message.updated", "A message was read or unread, flagged, categorised or moved; the message as it is now.",
     {}, {**_EVENT_EXAMPLE_MESSAGE, "isRead": True, "folder": "archive", "flag": {"flagStatus": "flagged"},
          "categories": ["Customer"]}),
    ("message.deleted", "A message left the mailbox.", {}, {"id": _EVENT_EXAMPLE_MESSAGE["id"]}),
)
_ACCOUNT_EVENTS = (
    ("account.connected", "A mailbox was connected (or re-connected while active)."),
    ("account.reauth_required", "The grant is dead: ask the user to re-connect."),
    ("account.recovered", "An account in reauth_required was re-connected."),
    ("account.disconnected", "The account was deleted through the API."),
)


def _webhook(event: str, summary: str, data: Json, example: Json) -> Json:
    headers = [{"name": "X-Connector-Signature", "in": "header", "required": True, "schema": {"type": "string"},
                "description": "t=<unix seconds>,v1=<hex HMAC-SHA256(WEBHOOK_SECRET, \"<t>.<raw body>\")>"},
               {"name": "X-Connector-Event", "in": "header", "required": True, "schema": {"const": event}},
               {"name": "X-Connector-Delivery", "in": "header", "required": True, "schema": {"type": "string"},
                "description": "The event id: drop ids already handled (delivery is at least once)."}]
    schema = {"type": "object", "required": ["id", "type", "createdAt", "data"],
              "properties": {"id": {"type": "string"}, "type": {"const": event},
                             "createdAt": {"type": "string", "format": "date-time"}, "data": data}}
    body = {"id": "evt_3f2a9c", "type": event, "createdAt": "2026-11-22T10:05:03Z", "data": example}
    return {"post": {"operationId": event.replace(".", "_"), "summary": summary, "tags": ["webhooks"],
                     "description": "Verify the signature over the raw body first (docs/webhooks.md).",
                     "parameters": headers,
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": schema, "examples": {event: {"value": body}}}}},
                     "responses": {"2XX": {"description": "Handled (answer within 10 s; anything else is retried)."}}}}


_TENANT_EVENTS = (
    ("tenant.consent_required", "A tenant's admin consent is gone (consent removed or the app's service principal "
                                "deleted): its mailboxes are reauth_required until an administrator consents again."),
    ("tenant.recovered", "An administrator consented again: the connection and its mailboxes are active again."),
)


def _webhooks() -> Json:
    """OpenAPI 3.1 ``webhooks``: what the connector POSTs to ``WEBHOOK_URL``."""
    out: Json = {}
    for event, summary in _TENANT_EVENTS:
        out[event] = _webhook(event, summary, {
            "type": "object", "required": ["tenantConnection", "accountIds"],
            "properties": {"tenantConnection": _ref("TenantConnection"),
                           "accountIds": {"type": "array", "items": {"type": "string"},
                                          "description": "The team mailboxes whose status changed."}}},
            {"tenantConnection": {**TENANT_EXAMPLE, "status": "consent_required" if "required" in event else "active"},
             "accountIds": [TEAM_ACCOUNT_EXAMPLE["id"]]})
    for event, summary in _ACCOUNT_EVENTS:
        out[event] = _webhook(event, summary, {"type": "object", "required": ["account"],
                                               "properties": {"account": _ref("Account")}},
                              {"account": ACCOUNT_EXAMPLE})
    for event, summary, extra, message in _MESSAGE_EVENTS:
        props: Json = {"accountId": {"type": "string"}, "message": _SUMMARY}
        if event == "message.sent":
            props.update(origin={"enum": ["api", "mailbox"]}, trackingId=NULLABLE_STR)
        out[event] = _webhook(event, summary, {"type": "object", "required": ["accountId", "message", *extra],
                                               "properties": props},
                              {"accountId": "acc_5f0c2a9e41d7b3c8a1e2f3d4", **extra, "message": message})
    return out


def document() -> Json:
    paths = {**_connect_paths(), **_account_paths(), **_tenant_paths(), **_mail_paths(), **_notification_paths()}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Outlook mailbox connector", "version": __version__,
                 "description": "Connect Outlook.com / Microsoft 365 mailboxes (Entra OAuth, auth code + PKCE) and "
                                "send and read mail through Microsoft Graph on the user's behalf."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "tags": [{"name": t} for t in ("connect", "accounts", "tenants", "mail", "notifications", "operations",
                                       "webhooks")],
        "paths": paths,
        "webhooks": _webhooks(),
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                                           "description": "Issued by the integrating product; `sub` is the owner."}},
            "schemas": SCHEMAS,
            "responses": {"Problem": {"description": "An error (RFC 9457).",
                                      "content": {"application/problem+json": {"schema": _ref("Problem")}}}},
        },
    }
