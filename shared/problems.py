"""The problem types the API answers (RFC 9457): what each ``code`` means and what to do about it.

Every problem's ``type`` is ``/api/problems#<code>``, a URI reference that resolves against the request's
own URL (RFC 9457 §3.1.1, RFC 3986 §5) to the page ``GET /api/problems`` serves from this catalogue, one
anchor per code; ``docs/problems.md`` is the same catalogue for readers of the repository (a test keeps
them equal). Microsoft's own codes (``AADSTSnnnn``, Graph's ``error.code``) travel in ``microsoft``.
"""

from __future__ import annotations

import html
from functools import lru_cache

PROBLEMS_PATH = "/api/problems"

#: code → (title, what it means and what to do). Codes from Entra's and Graph's tables come with the hint of
#: the problem itself as well (``shared.ms_errors``).
PROBLEMS: dict[str, tuple[str, str]] = {
    # -- the caller and the request
    "unauthorized": ("Unauthorized", "The caller JWT is missing, expired, not yet valid, for another audience or "
                     "issuer, signed with an unknown key, or lives longer than AUTH_MAX_TOKEN_LIFETIME_SECONDS. "
                     "Send `Authorization: Bearer <JWT>` issued by your back end."),
    "invalid_request": ("Invalid request", "The request is malformed; `field` names what is wrong (a body field, a "
                        "query parameter or a header). Fix it and send it again: nothing was done."),
    "not_found": ("Not found", "No such account, message or record for this caller."),
    "account_not_found": ("Account not found", "No such account for this caller (another owner's accounts are "
                          "never visible)."),
    "message_not_found": ("Message not found", "The message (or attachment, or folder) does not exist in this "
                          "mailbox, or was deleted."),
    "payload_too_large": ("Payload too large", "The request is larger than this endpoint takes (its declared "
                          "Content-Length, the send cap SEND_MAX_TOTAL_BYTES, or the part count)."),
    "attachment_too_large": ("Attachment too large for one response", "Download it in byte ranges (`Range` "
                             "header), as the hint says."),
    "range_not_satisfiable": ("Range not satisfiable", "The requested byte range starts after the end of the "
                              "attachment."),
    "conflict": ("Conflict", "The request conflicts with the current state; retry after reading it again."),
    "etag_conflict": ("Changed concurrently", "A record changed while it was being written; retry."),
    "already_exists": ("Already exists", "A record with this key exists already."),
    "idempotency_key_reused": ("Idempotency-Key reused", "This Idempotency-Key was used within 24 h with another "
                               "request body. Use a new key for a different message."),
    "idempotency_in_progress": ("Request in progress", "A request with this Idempotency-Key is still running; retry "
                                "in a few seconds to get its result."),
    "send_outcome_unknown": ("Send outcome unknown", "Microsoft did not answer an earlier send with this key; it is "
                             "not sent again. Check Sent Items before sending with a new key."),
    "configuration_error": ("Configuration error", "An app setting is missing or malformed; the message names it."),
    "internal_error": ("Internal error", "An unexpected error; the correlation id (`x-correlation-id`) finds it in "
                       "the logs."),
    # -- connecting
    "oauth_error": ("Connect failed", "The connect flow failed; start it again."),
    "invalid_state": ("Invalid sign-in link", "The connect `state` is unknown, forged or already used; start the "
                      "connect flow again."),
    "expired_state": ("Sign-in link expired", "The connect link lived 5 minutes; start the connect flow again."),
    "invalid_callback": ("Sign-in response rejected", "The sign-in response did not match the flow; start again."),
    "invalid_id_token": ("Sign-in response failed validation", "The id token's nonce, issuer or audience did not "
                         "match; start the connect flow again."),
    "no_refresh_token": ("No refresh token", "Microsoft returned no refresh token: consent to offline access."),
    "account_mismatch": ("Another account signed in", "The account that signed in is not the one the link is for "
                         "(`requireLoginHint`, or a re-connect of another mailbox)."),
    "connect_in_progress": ("Connect in progress", "Another sign-in of this mailbox is being stored; retry."),
    "authorization_error": ("Sign-in did not complete", "Microsoft's sign-in ended with an error this API does not "
                            "map; start the connect flow again."),
    "access_denied": ("Access denied", "The user cancelled sign-in or consent, or a policy denied it."),
    "consent_required": ("Consent required", "The user or an administrator has not consented to the app's "
                         "permissions; the hint carries the admin-consent URL."),
    "admin_consent_required": ("Admin consent required", "The tenant requires an administrator to approve the app; "
                               "send the admin-consent URL of the hint to an administrator."),
    "app_not_authorized_in_tenant": ("App not authorized in the tenant", "An administrator must consent."),
    "account_not_allowed": ("Account type not allowed", "This account type or tenant is not allowed by the app "
                            "registration."),
    "consent_declined": ("Consent declined", "The user declined the permissions; connect again and accept."),
    "mfa_required": ("MFA required", "Multi-factor authentication is required; re-connect interactively."),
    "mfa_registration_required": ("MFA registration required", "The user must register for MFA, then re-connect."),
    "blocked_by_conditional_access": ("Blocked by Conditional Access", "A Conditional Access policy blocked the "
                                      "sign-in; the tenant administrator must allow it."),
    "code_already_redeemed": ("Code already used", "The authorization code was redeemed; connect again."),
    "pkce_mismatch": ("PKCE mismatch", "The PKCE verifier did not match; connect again."),
    # -- team mailboxes (admin consent, application access)
    "admin_required": ("Administrator required", "Only a Global Administrator or Privileged Role Administrator of "
                       "the tenant can grant the app's application permissions; one of them opens the admin-consent "
                       "link (the app registration must put directory roles in its tokens: docs/team-mailboxes.md)."),
    "tenant_mismatch": ("Consent from another tenant", "The administrator who signed in, or the consent, belongs to "
                        "another tenant than the one the admin-consent link was for; nothing was stored."),
    "app_roles_missing": ("Application permissions missing", "The tenant granted the app without the application "
                          "permissions of MS_APP_ROLES: declare them on the app registration, then consent again "
                          "(docs/team-mailboxes.md)."),
    "tenant_not_found": ("Tenant connection not found", "No such tenant connection for this caller (another "
                         "owner's are never visible)."),
    "tenant_consent_required": ("Tenant consent required", "The tenant no longer grants the app its application "
                                "permissions (consent removed or the app's service principal deleted): a tenant "
                                "administrator consents again; the connection and its mailboxes keep their ids "
                                "(a `tenant.consent_required` webhook was sent)."),
    "mailbox_access_denied": ("Mailbox outside the administrator's scope", "The tenant administrator scoped the app "
                              "to some mailboxes (Exchange Online RBAC for Applications or an Application Access "
                              "Policy) and this one is not included; docs/team-mailboxes.md has the PowerShell."),
    "mailbox_not_found": ("No such mailbox", "The tenant has no Exchange Online mailbox with this address (a user, "
                          "shared or room mailbox)."),
    # -- the grant and the app registration
    "reauth_required": ("Re-connect required", "The grant is dead (revoked, password reset, 90 days idle): the user "
                        "connects the mailbox again (an `account.reauth_required` webhook was sent)."),
    "grant_expired": ("Grant expired", "The refresh token or code expired; re-connect the mailbox."),
    "grant_revoked": ("Grant revoked", "The grant was revoked; re-connect the mailbox."),
    "no_tokens": ("No tokens", "The account holds no tokens (re-connect required)."),
    "operator_action_required": ("Operator action required", "The app registration or its credential needs "
                                 "attention (see docs/troubleshooting.md)."),
    "invalid_client": ("App credential rejected", "Entra rejected the app's credentials: check MS_CLIENT_ID and the "
                       "credential in Key Vault."),
    "unknown_client": ("Unknown client", "The client id is not registered in this tenant."),
    "redirect_uri_mismatch": ("Redirect URI mismatch", "Register exactly the connector's callback URL as a Web "
                              "redirect URI."),
    "invalid_client_secret": ("Client secret wrong", "Store the secret's Value (not its id) in Key Vault."),
    "client_secret_expired": ("Client secret expired", "Create a new secret and store it in Key Vault."),
    "invalid_client_certificate": ("Certificate unknown to Entra", "Upload the Key Vault certificate's public key to "
                                   "the app registration."),
    "client_assertion_expired": ("Client assertion expired", "Check the host clock; a new assertion is fetched."),
    "no_federated_credential": ("No federated credential", "Add the managed identity's federated credential to the "
                                "app registration (docs/deploy.md)."),
    "client_assertion_mismatch": ("Client assertion mismatch", "The certificate belongs to another app, or "
                                  "MS_CLIENT_ID is wrong."),
    "invalid_client_assertion": ("Client assertion invalid", "Check MS_CLIENT_CREDENTIAL and the certificate or "
                                 "federated credential."),
    # -- Microsoft Graph
    "microsoft_error": ("Microsoft returned an error", "See `microsoft` for Microsoft's code and ids."),
    "graph_error": ("Microsoft Graph error", "Graph answered an error this API does not map; the request-id in "
                    "`microsoft` is what Microsoft support asks for."),
    "graph_token_rejected": ("Graph rejected a fresh token", "Nothing was done; retry after `Retry-After`. If it "
                             "persists, re-connect the mailbox."),
    "mail_access_denied": ("Mail access denied", "The granted permissions do not allow this; re-connect with "
                           "consent, or ask an administrator."),
    "send_as_denied": ("Send-as denied", "Send from the connected mailbox itself."),
    "invalid_recipients": ("Invalid recipients", "Exchange refused a recipient address."),
    "message_too_large": ("Message too large", "The message exceeds the mailbox's size limit."),
    "mailbox_not_available": ("Mailbox not available", "No Exchange Online mailbox is reachable for this account "
                              "(unlicensed, guest, on-premises or inactive)."),
    "graph_resource_not_found": ("Graph resource not found", "A mailbox resource was not found; run diagnose."),
    "invalid_id": ("Malformed id", "The message or folder id is malformed."),
    "mailbox_full": ("Mailbox full", "The user must free space."),
    "draft_not_found": ("Draft gone", "The reply draft disappeared before it was sent; nothing was sent, retry."),
    "upload_session_expired": ("Upload session expired", "An attachment upload session expired; nothing was sent, "
                               "retry the send."),
    "throttled": ("Throttled", "Microsoft Graph throttled the mailbox beyond the retry budget; retry after "
                  "`Retry-After`."),
    "upstream_unavailable": ("Microsoft unavailable", "Entra or Graph could not be reached or failed; retry after "
                             "`Retry-After`."),
    "subscription_in_progress": ("Subscription being created", "Another worker is creating the account's "
                                 "subscription; the job is retried."),
    "notification_certificate_missing": ("No notification certificate", "NOTIFICATIONS_RESOURCE_DATA is on but "
                                         "no encryption certificate is configured (NOTIFICATION_CERT_NAME in Key "
                                         "Vault, or NOTIFICATION_CERT_PATH locally)."),
    # -- the connector's own dependencies
    "storage_unavailable": ("Storage unavailable", "Table or Queue storage is failing; retry after `Retry-After`."),
    "storage_rejected": ("Storage refused the request", "Storage refused the connector's request (credentials or "
                         "permissions); an operator must look."),
    "storage_payload_too_large": ("Record too large", "A record is larger than Table Storage stores."),
    "secret_unavailable": ("Secret unavailable", "A Key Vault secret could not be read; the detail names it and the "
                           "vault."),
    "token_decrypt_failed": ("Stored token unreadable", "A stored token failed decryption (a key removed from the "
                             "ring, or a tampered row); re-connect the mailbox."),
}


def problem_type(code: str) -> str:
    """The ``type`` of a problem with this code: a reference to its anchor on the problems page."""
    return f"{PROBLEMS_PATH}#{code}"


@lru_cache(maxsize=1)
def page() -> str:
    """``GET /api/problems``: the catalogue as HTML, one ``id`` per code (built once: the catalogue is constant)."""
    rows = "\n".join(f'<h2 id="{html.escape(code)}"><code>{html.escape(code)}</code>: {html.escape(title)}</h2>\n'
                     f"<p>{html.escape(text)}</p>" for code, (title, text) in sorted(PROBLEMS.items()))
    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>Outlook connector: problem types'
            "</title></head>\n<body><h1>Problem types</h1>\n<p>Every error of the API is "
            "<code>application/problem+json</code> (RFC 9457) with a <code>code</code>; its <code>type</code> "
            f"points here.</p>\n{rows}\n</body></html>\n")


def markdown() -> str:
    """``docs/problems.md``: the same catalogue."""
    lines = ["# Problem types", "",
             "Every error of the API is `application/problem+json` (RFC 9457) with a `code`; its `type` is",
             f"`{PROBLEMS_PATH}#<code>`, which the running connector serves. This page is generated from",
             "`shared/problems.py` (a test keeps them equal).", ""]
    for code, (title, text) in sorted(PROBLEMS.items()):
        lines += [f"## {code}", "", f"**{title}.** {text}", ""]
    return "\n".join(lines)
