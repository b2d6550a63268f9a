"""One table from Microsoft's error codes to product errors (code, status, hint, who acts).

Entra token-endpoint errors are JSON ``{error, error_description: "AADSTSnnnn: ...", error_codes,
trace_id, correlation_id, suberror?, claims?}``
(https://learn.microsoft.com/entra/identity-platform/reference-error-codes). Graph errors are
``{"error": {"code", "message", "innerError": {"request-id", "client-request-id", "date"}}}``
(https://learn.microsoft.com/graph/errors). Only the first line of ``error_description`` is kept:
the rest (trace, timestamps) travels in structured fields.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from shared.backoff import retry_after_from
from shared.errors import (
    ConnectorError,
    MicrosoftDetails,
    MicrosoftError,
    OperatorError,
    ReauthRequiredError,
    ThrottledError,
    UpstreamUnavailableError,
)


@dataclass(frozen=True)
class ErrorInfo:
    code: str
    status: int
    hint: str
    kind: str = "user"  # "user": the user acts; "reauth": grant dead; "operator": our app registration;
    # "transient": retry later (503 + Retry-After)


# https://learn.microsoft.com/entra/identity-platform/reference-error-codes#aadsts-error-codes
AADSTS: dict[int, ErrorInfo] = {
    50011: ErrorInfo("redirect_uri_mismatch", 502,
                    "The redirect URI sent does not match the app registration. Register exactly "
                    "{redirect_uri} as a Web redirect URI in Entra (PUBLIC_BASE_URL must match).", "operator"),
    65001: ErrorInfo("consent_required", 403,
                    "The user or an administrator has not consented to the app's permissions. Ask a tenant "
                    "administrator to grant consent: {admin_consent_url}"),
    90094: ErrorInfo("admin_consent_required", 403,
                    "This tenant requires an administrator to approve the app. Send this link to a tenant "
                    "administrator: {admin_consent_url}"),
    700016: ErrorInfo("unknown_client", 502,
                     "The client id is not registered in this tenant (or the tenant segment is wrong). Check "
                     "MS_CLIENT_ID and MS_TENANT, and that the app is multi-tenant if users come from other tenants.",
                     "operator"),
    90099: ErrorInfo("app_not_authorized_in_tenant", 403,
                    "The application has not been authorized in this tenant. An administrator must consent: "
                    "{admin_consent_url}"),
    50020: ErrorInfo("account_not_allowed", 403,
                    "This account type or tenant is not allowed by the app registration (e.g. a personal "
                    "account on a work-only app, or a guest). Use a supported account or change "
                    "'Supported account types'."),
    50076: ErrorInfo("mfa_required", 401,
                    "Multi-factor authentication is required. Re-connect the mailbox interactively.", "reauth"),
    50079: ErrorInfo("mfa_registration_required", 401,
                    "The user must register for multi-factor authentication, then re-connect.", "reauth"),
    53003: ErrorInfo("blocked_by_conditional_access", 403,
                    "A Conditional Access policy blocked the sign-in. The tenant administrator must allow this "
                    "app, device or location."),
    54005: ErrorInfo("code_already_redeemed", 400,
                    "The authorization code was already used. Start the connect flow again."),
    70008: ErrorInfo("grant_expired", 401,
                    "The refresh token or code expired (90 days of inactivity, or a 10-minute code). "
                    "Re-connect the mailbox.", "reauth"),
    700082: ErrorInfo("grant_expired", 401,
                     "The refresh token expired after 90 days of inactivity. Re-connect the mailbox.", "reauth"),
    50173: ErrorInfo("grant_revoked", 401,
                    "The grant was revoked (password reset, admin revocation or session policy). "
                    "Re-connect the mailbox.", "reauth"),
    7000215: ErrorInfo("invalid_client_secret", 502,
                      "The client secret is wrong. Put the current secret's VALUE (not its id) in Key Vault "
                      "secret MS_CLIENT_SECRET_NAME.", "operator"),
    7000222: ErrorInfo("client_secret_expired", 502,
                      "The client secret has expired. Create a new secret in Entra and store it in Key Vault.",
                      "operator"),
    # Client assertions (MS_CLIENT_CREDENTIAL certificate / managed_identity): operator problems too.
    # https://learn.microsoft.com/entra/identity-platform/certificate-credentials
    # https://learn.microsoft.com/entra/workload-id/workload-identity-federation-config-app-trust-managed-identity
    700027: ErrorInfo("invalid_client_certificate", 502,
                     "Entra does not accept the certificate the app signed with (not uploaded to the app "
                     "registration, expired, or the wrong key). Upload the public certificate of Key Vault "
                     "certificate MS_CLIENT_CERT_NAME under 'Certificates & secrets' (docs/deploy.md).", "operator"),
    700024: ErrorInfo("client_assertion_expired", 502,
                     "The client assertion is outside its valid time range: check the host clock, or the managed "
                     "identity returned an expired token; the next request fetches a new one.", "operator"),
    70021: ErrorInfo("no_federated_credential", 502,
                    "No federated credential on the app registration matches the managed identity's token. Add "
                    "one for the function app's managed identity (issuer https://login.microsoftonline.com/"
                    "<tenant id>/v2.0, subject = the identity's object id, audience api://AzureADTokenExchange; "
                    "docs/deploy.md).", "operator"),
    700211: ErrorInfo("no_federated_credential", 502,
                     "No federated credential matches the assertion's issuer: it must be "
                     "https://login.microsoftonline.com/<the identity's tenant id>/v2.0 (docs/deploy.md).",
                     "operator"),
    700212: ErrorInfo("no_federated_credential", 502,
                     "No federated credential matches the assertion's audience: the credential and "
                     "MS_CLIENT_ASSERTION_AUDIENCE must both be api://AzureADTokenExchange (docs/deploy.md).",
                     "operator"),
    700213: ErrorInfo("no_federated_credential", 502,
                     "No federated credential matches the assertion's subject: it must be the managed identity's "
                     "object (principal) id, and AZURE_CLIENT_ID must name that identity (docs/deploy.md).",
                     "operator"),
    700021: ErrorInfo("client_assertion_mismatch", 502,
                     "The client assertion's issuer/subject is not MS_CLIENT_ID: the certificate belongs to "
                     "another app, or MS_CLIENT_ID is wrong.", "operator"),
    50027: ErrorInfo("invalid_client_assertion", 502,
                    "Entra could not use the client assertion (malformed, wrong audience or signature). Check "
                    "MS_CLIENT_CREDENTIAL, MS_TENANT and the certificate or federated credential "
                    "(docs/deploy.md).", "operator"),
    501481: ErrorInfo("pkce_mismatch", 400, "The PKCE verifier did not match. Start the connect flow again."),
    65004: ErrorInfo("consent_declined", 403, "The user declined consent. Connect again and accept the permissions."),
    # Admin consent (team mailboxes) by someone who is not an administrator of the tenant.
    90093: ErrorInfo("admin_required", 403,
                    "Only a Global Administrator or Privileged Role Administrator of the tenant can grant the "
                    "application permissions. Ask one to open the admin-consent link."),
}

# https://learn.microsoft.com/graph/errors and the Outlook mail API error codes
GRAPH: dict[str, ErrorInfo] = {
    # Only reached after one refresh + retry: the grant itself refreshed fine, so this is not
    # (yet) a dead grant; the refresher decides that, not a Graph 401. Most often transient (a
    # revocation that also hit the token minted during this call), so 503 + Retry-After; a 401
    # is a refusal, so even a send may be retried.
    "InvalidAuthenticationToken": ErrorInfo(
        "graph_token_rejected", 503,
        "Graph rejected a freshly refreshed access token; nothing was done. Retry after the given delay; if it "
        "persists, re-connect the mailbox (a Conditional Access or token-protection policy may apply).",
        "transient"),
    "ErrorAccessDenied": ErrorInfo(
        "mail_access_denied", 403,
        "The granted permissions do not allow this (e.g. Mail.Send was not consented). Re-connect with consent "
        "for {scopes}, or ask an administrator to grant it. For a team mailbox: the tenant administrator must "
        "include it in the app's scope (Exchange Online RBAC for Applications; docs/team-mailboxes.md)."),
    "ErrorSendAsDenied": ErrorInfo(
        "send_as_denied", 403,
        "The mailbox may not send as the given address. Send from the connected mailbox itself."),
    "ErrorInvalidRecipients": ErrorInfo(
        "invalid_recipients", 400, "At least one recipient address was refused by Exchange. Check the addresses."),
    "ErrorMessageSizeExceeded": ErrorInfo(
        "message_too_large", 413,
        "The message exceeds the mailbox's size limit. Send smaller attachments or share a link instead."),
    # Graph says 404, but the account exists: a state of the mailbox the user must fix, so 409.
    # https://learn.microsoft.com/graph/api/resources/mail-api-overview
    "MailboxNotEnabledForRESTAPI": ErrorInfo(
        "mailbox_not_available", 409,
        "This account has no Exchange Online mailbox reachable through Graph: the user is unlicensed, a guest, "
        "hosted on-premises, or the mailbox is inactive. Assign an Exchange Online licence or connect "
        "another account (https://learn.microsoft.com/graph/api/resources/mail-api-overview)."),
    # The one Graph 404 that stays ours: an unknown message (or attachment) of a known account.
    "ErrorItemNotFound": ErrorInfo("message_not_found", 404, "The message or folder does not exist in this mailbox."),
    "ResourceNotFound": ErrorInfo(
        "graph_resource_not_found", 502,
        "Microsoft Graph could not find a mailbox resource the connector asked for (not a message): the mailbox "
        "may not be provisioned yet. Run the account's diagnose check."),
    # A /users/{address} path naming no user of the tenant (a team mailbox deleted or renamed).
    "ErrorInvalidUser": ErrorInfo(
        "mailbox_not_found", 409,
        "The tenant has no mailbox with this address (deleted or renamed). Add the mailbox again by its current "
        "address."),
    "ErrorInvalidIdMalformed": ErrorInfo("invalid_id", 400, "The message or folder id is malformed."),
    "ErrorQuotaExceeded": ErrorInfo("mailbox_full", 507, "The mailbox is full. The user must free space."),
}

_AADSTS_RE = re.compile(r"AADSTS(\d+)")
_ERROR_RE = re.compile(r"[a-z0-9_]{1,64}")
_ID_RE = re.compile(r"[A-Za-z0-9-]{1,64}")  # Entra's trace_id / correlation_id are GUIDs
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_MAX_CODES = 8


def _first_line(text: str | None) -> str:
    line = (text or "").strip().splitlines()[0][:400] if text and text.strip() else ""
    return _CONTROL_RE.sub(" ", line)


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _id_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and _ID_RE.fullmatch(value) else None


def _error_codes(raw: object) -> list[int]:
    """``error_codes`` is a JSON array of integers; tolerate one integer or a string of them, never a
    string iterated per character."""
    items: list[object]
    if isinstance(raw, (list, tuple)):
        items = list(raw)
    elif isinstance(raw, str):
        items = list(re.findall(r"\d{1,9}", raw))
    elif isinstance(raw, int) and not isinstance(raw, bool):
        items = [raw]
    else:
        return []
    codes: list[int] = []
    for c in items[:_MAX_CODES]:
        if isinstance(c, bool):
            continue
        if isinstance(c, int) or (isinstance(c, str) and c.isascii() and c.isdigit() and len(c) <= 9):
            codes.append(int(c))
    return codes


def _fmt(hint: str, ctx: Mapping[str, str]) -> str:
    for k, v in ctx.items():
        hint = hint.replace("{" + k + "}", str(v))
    return hint


def from_token_error(body: Mapping[str, object], *, context: Mapping[str, str] | None = None) -> ConnectorError:
    """A typed error from an Entra token / authorize error (MSAL result dict or redirect params).

    On the callback these values come from the browser, not from Microsoft: each is reduced to the
    alphabet its documented form uses (RFC 6749 §4.1.2.1 limits ``error`` to printable ASCII; Entra
    uses snake_case), so nothing a caller sends can reach a log line or a header as it is."""
    ctx = dict(context or {})
    raw_error = body.get("error")
    error = str(raw_error) if isinstance(raw_error, str) and _ERROR_RE.fullmatch(raw_error) else "unknown_error"
    desc = _first_line(_text_or_none(body.get("error_description")))
    codes = _error_codes(body.get("error_codes")) or [int(x) for x in _AADSTS_RE.findall(desc)[:1]]
    details = MicrosoftDetails(error=error, codes=tuple(codes), trace_id=_id_or_none(body.get("trace_id")),
                               correlation_id=_id_or_none(body.get("correlation_id")))
    m = next((AADSTS[c] for c in codes if c in AADSTS), None)
    detail = desc or f"Microsoft returned {error}."
    if m is not None:
        hint = _fmt(m.hint, ctx)
        if m.kind == "operator":
            return OperatorError(detail, code=m.code, hint=hint, microsoft=details)
        if m.kind == "reauth":
            return ReauthRequiredError(detail, hint=hint, microsoft=details, extra={"reason": m.code})
        return MicrosoftError(detail, code=m.code, status=m.status, hint=hint, microsoft=details)
    if error == "invalid_client" or error == "unauthorized_client":
        return OperatorError(detail, code="invalid_client", microsoft=details,
                             hint="The app registration rejected our credentials. Check MS_CLIENT_ID and the "
                                  "client secret in Key Vault.")
    if error == "invalid_grant" or error == "interaction_required":
        return ReauthRequiredError(detail, microsoft=details, hint="Re-connect the mailbox.",
                                   extra={"reason": "invalid_grant"})
    if error == "access_denied":
        return MicrosoftError(detail or "The user cancelled or was denied.", code="access_denied", status=403,
                              microsoft=details, hint="The user cancelled sign-in or consent. Connect again.")
    if error == "consent_required":
        return MicrosoftError(detail, code="consent_required", status=403, microsoft=details,
                              hint=_fmt(AADSTS[65001].hint, ctx))
    if error in ("temporarily_unavailable", "server_error"):
        return UpstreamUnavailableError(detail or "Microsoft sign-in is temporarily unavailable.", microsoft=details,
                                        hint="Try again in a minute.")
    return MicrosoftError(detail, code=error, status=502, microsoft=details)


# The errors an authorization redirect may carry: RFC 6749 §4.1.2.1 and OpenID Connect Core 1.0 §3.1.2.6.
AUTHORIZE_ERRORS = frozenset({
    "invalid_request", "unauthorized_client", "access_denied", "unsupported_response_type", "invalid_scope",
    "server_error", "temporarily_unavailable", "interaction_required", "login_required",
    "account_selection_required", "consent_required", "invalid_request_uri", "invalid_request_object",
    "request_not_supported", "request_uri_not_supported", "registration_not_supported", "invalid_client",
    "invalid_grant",
})
# What the callback says for each product code: our words, never the redirect's error_description.
_CALLBACK_MESSAGES = {
    "access_denied": "Sign-in or consent was cancelled or denied.",
    "consent_declined": "The permissions were declined.",
    "consent_required": "The app's permissions need consent.",
    "admin_consent_required": "This organisation requires an administrator to approve the app.",
    "app_not_authorized_in_tenant": "The app is not authorized in this organisation.",
    "admin_required": "Only an administrator of the organisation can grant this consent.",
    "account_not_allowed": "This kind of account cannot connect to this app.",
    "blocked_by_conditional_access": "A Conditional Access policy of the organisation blocked the sign-in.",
    "mfa_required": "Multi-factor authentication is required.",
    "mfa_registration_required": "The account must register for multi-factor authentication first.",
    "upstream_unavailable": "Microsoft sign-in is temporarily unavailable.",
}
_CALLBACK_DEFAULT = "Microsoft sign-in did not complete."


def callback_message(code: str) -> str:
    """The fixed text the connect callback shows (and forwards to ``returnUrl``) for a product code."""
    return _CALLBACK_MESSAGES.get(code, _CALLBACK_DEFAULT)


def from_authorize_error(params: Mapping[str, str], *, context: Mapping[str, str] | None = None) -> ConnectorError:
    """A typed error from an authorization redirect's ``error`` (the connect callback), with a fixed message.

    Everything in the redirect came through the browser, so anyone can have written it: its
    ``error_description`` is never shown or forwarded (a phrased "call this number" on our origin is a phishing
    page). Only a documented ``error`` value and an ``AADSTSnnnn`` number we map are used; the message is ours."""
    raw = params.get("error")
    error = raw if isinstance(raw, str) and raw in AUTHORIZE_ERRORS else "authorization_error"
    found = _AADSTS_RE.findall(str(params.get("error_description") or "")[:400])[:1]
    codes = [int(c) for c in found if len(c) <= 9 and int(c) in AADSTS]
    err = from_token_error({"error": error, "error_codes": codes, "trace_id": params.get("trace_id"),
                            "correlation_id": params.get("correlation_id")}, context=context)
    err.detail = callback_message(err.code)
    err.args = (err.detail,)
    return err


#: Product codes meaning "Entra rejected the app's own credential": re-read it once, then alert the operator.
CLIENT_CREDENTIAL_REJECTED = frozenset({
    "invalid_client_secret", "client_secret_expired", "invalid_client_certificate", "client_assertion_expired",
    "no_federated_credential", "client_assertion_mismatch", "invalid_client_assertion",
})


def is_invalid_client(err: ConnectorError) -> bool:
    return isinstance(err, OperatorError) and (err.code in ("invalid_client", "unknown_client")
                                               or err.code in CLIENT_CREDENTIAL_REJECTED)


def from_graph_response(status: int, body: object, headers: Mapping[str, str], *,
                        context: Mapping[str, str] | None = None) -> ConnectorError:
    ctx = dict(context or {})
    err = body.get("error") if isinstance(body, dict) else None
    gcode = str(err.get("code")) if isinstance(err, dict) and err.get("code") else f"HTTP{status}"
    message = _first_line(str(err.get("message"))) if isinstance(err, dict) and err.get("message") else ""
    inner = (err.get("innerError") or {}) if isinstance(err, dict) else {}
    details = MicrosoftDetails(error=gcode, request_id=headers.get("request-id") or inner.get("request-id"),
                               correlation_id=headers.get("client-request-id") or inner.get("client-request-id"))
    detail = message or f"Microsoft Graph answered {status}."
    if status in (429, 503):
        return ThrottledError(detail, retry_after=retry_after_from(headers), microsoft=details,
                              hint="Microsoft Graph is throttling this mailbox; retry after the given delay.")
    m = GRAPH.get(gcode)
    if m is not None:
        if m.kind == "reauth":
            return ReauthRequiredError(detail, hint=m.hint, microsoft=details, extra={"reason": m.code})
        if m.kind == "transient":
            return UpstreamUnavailableError(detail, code=m.code, hint=_fmt(m.hint, ctx), microsoft=details)
        return MicrosoftError(detail, code=m.code, status=m.status, hint=_fmt(m.hint, ctx), microsoft=details)
    if status >= 500:
        return UpstreamUnavailableError(detail, microsoft=details, hint="Microsoft Graph failed; try again later.")
    if status in (401, 404):
        # Our 401 is the caller's JWT, our 404 an unknown account or message:
        # an unmapped Graph 401 (one refresh already failed) or 404 is Microsoft's condition.
        return MicrosoftError(detail, code="graph_error", status=502, microsoft=details,
                              hint=f"Microsoft Graph answered {status} ({gcode}); retry, and if it persists run the "
                                   "account's diagnose check.")
    return MicrosoftError(detail, code="graph_error", status=status, microsoft=details)
