"""Microsoft identity platform (Entra ID v2.0) endpoints: discovery, JWKS, /authorize, /token.

Protocol references (each behaviour below cites its page):
- Auth code flow, PKCE, error responses:
  https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-auth-code-flow
- OpenID Connect discovery document:
  https://learn.microsoft.com/en-us/entra/identity-platform/v2-protocols-oidc
- AADSTS error codes: https://learn.microsoft.com/en-us/entra/identity-platform/reference-error-codes
"""

from __future__ import annotations

import base64
import hashlib
import html
import random
import secrets
import time
from typing import Any
from urllib.parse import urlencode, urlparse

from flask import Blueprint, Response, current_app, jsonify, request

from . import tokens
from .assertions import check_client_assertion
from .errors import aadsts_body, aadsts_response
from .scopes import GRAPH_DEFAULT_SCOPE, OIDC_SCOPES, InvalidScopeError, parse_scopes, resource_scopes
from .state import (
    CODE_LIFETIME_S,
    RT_INACTIVITY_S,
    AccessTokenRecord,
    AuthCode,
    ClientApp,
    PendingAuth,
    RefreshTokenRecord,
    SandboxState,
)
from .users import (
    ADMIN_CONSENT_TENANTS,
    CONSUMER_TENANT_ID,
    TENANT_NAMES,
    TEST_USERS,
    TestUser,
    find_user,
    resolve_tenant,
)

bp = Blueprint("identity", __name__)


def _sb() -> tuple[SandboxState, tokens.SigningKey]:
    ext = current_app.extensions["sandbox"]
    return ext["state"], ext["key"]


def _host() -> str:
    return request.host_url.rstrip("/")


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.0000000Z", time.gmtime(ts))


# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------
def _tenant_not_found(segment: str) -> Response:
    # AADSTS90002 for an unknown tenant segment (discovery answers 400 with a JSON body).
    return aadsts_response(
        400, "invalid_tenant", 90002,
        f"Tenant '{segment}' not found. Check to make sure you have the correct tenant ID and are signing "
        "into the correct cloud. Check with your subscription administrator, this may happen if there are "
        "no active subscriptions for the tenant.",
        host=_host(),
    )


@bp.get("/<tenant>/v2.0/.well-known/openid-configuration")
def openid_configuration(tenant: str) -> Response:
    # Shape of https://login.microsoftonline.com/{tenant}/v2.0/.well-known/openid-configuration;
    # for common/organizations the issuer carries the literal "{tenantid}" placeholder.
    # https://learn.microsoft.com/en-us/entra/identity-platform/v2-protocols-oidc#find-your-apps-openid-configuration-document-uri
    resolved = resolve_tenant(tenant)
    if resolved is None:
        return _tenant_not_found(tenant)
    host = _host()
    if resolved == "consumers":
        iss_tid = CONSUMER_TENANT_ID
    elif resolved in ("common", "organizations"):
        iss_tid = "{tenantid}"
    else:
        iss_tid = resolved
    base = f"{host}/{tenant}"
    return jsonify({
        "token_endpoint": f"{base}/oauth2/v2.0/token",
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
        "jwks_uri": f"{base}/discovery/v2.0/keys",
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "issuer": f"{host}/{iss_tid}/v2.0",
        "request_uri_parameter_supported": False,
        "userinfo_endpoint": f"{host}/oidc/userinfo",
        "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
        "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
        "http_logout_supported": True,
        "frontchannel_logout_supported": True,
        "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
        "claims_supported": [
            "sub", "iss", "cloud_instance_name", "cloud_instance_host_name", "cloud_graph_host_name",
            "msgraph_host", "aud", "exp", "iat", "auth_time", "acr", "nonce", "preferred_username", "name",
            "tid", "ver", "at_hash", "c_hash", "email",
        ],
        "kerberos_endpoint": f"{base}/kerberos",
        "tenant_region_scope": None if iss_tid == "{tenantid}" else "WW",
        "cloud_instance_name": "microsoftonline.com",
        "cloud_graph_host_name": "graph.windows.net",
        "msgraph_host": urlparse(host).netloc,
        "rbac_url": "https://pas.windows.net",
    })


@bp.get("/<tenant>/discovery/keys")
@bp.get("/<tenant>/discovery/v2.0/keys")
def jwks(tenant: str) -> Response:
    # JWKS with RSA keys carrying "kid" (https://learn.microsoft.com/en-us/entra/identity-platform/signing-key-rollover)
    if resolve_tenant(tenant) is None:
        return _tenant_not_found(tenant)
    _, key = _sb()
    return jsonify(key.jwks(f"{_host()}/{{tenantid}}/v2.0"))


@bp.get("/<tenant>/discovery/instance")
def instance_discovery(tenant: str) -> Response | tuple[Response, int]:
    # The instance-discovery answer MSAL reads "tenant_discovery_endpoint" from
    # (msal/authority.py _instance_discovery; https://login.microsoftonline.com/common/discovery/instance).
    auth_ep = request.args.get("authorization_endpoint", "")
    host = _host()
    netloc = urlparse(host).netloc
    parsed = urlparse(auth_ep)
    if parsed.hostname and parsed.hostname not in (urlparse(host).hostname, "127.0.0.1", "localhost", "::1"):
        return jsonify({
            "error": "invalid_instance",
            "error_description": "AADSTS50049: Unknown or invalid instance.",
            "error_codes": [50049],
        }), 400
    seg = (parsed.path.strip("/").split("/") or ["common"])[0] or "common"
    return jsonify({
        "tenant_discovery_endpoint": f"{host}/{seg}/v2.0/.well-known/openid-configuration",
        "api-version": "1.1",
        "metadata": [{"preferred_network": netloc, "preferred_cache": netloc, "aliases": [netloc]}],
    })


@bp.get("/error")
def error_lookup() -> Response:
    code = html.escape(request.args.get("code", ""))
    return _page("Error lookup", f"<p>AADSTS{code}: see the sandbox README for what this code reproduces.</p>")


# ---------------------------------------------------------------------------------------------
# HTML helpers
# ---------------------------------------------------------------------------------------------
def _page(title: str, body: str, status: int = 200) -> Response:
    doc = (
        "<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
        "<style>body{font-family:Segoe UI,Arial,sans-serif;max-width:34em;margin:3em auto}"
        "button{margin:.3em;padding:.4em 1em}.err{color:#a4262c}</style></head><body>"
        "<p><b>Microsoft</b> <small>(local sandbox)</small></p><h2>" + html.escape(title) + "</h2>"
        + body + "</body></html>"
    )
    return Response(doc, status=status, mimetype="text/html")


def _redirect(location: str) -> Response:
    return Response(status=302, headers={"Location": location})


def _error_page(code: int, text: str, status: int = 400) -> Response:
    # Errors detected before the redirect URI is trusted are shown to the user, never redirected:
    # https://learn.microsoft.com/en-us/entra/identity-platform/reply-url (AADSTS50011 page).
    return _page(
        "Sorry, but we're having trouble signing you in.",
        f"<p class='err'>AADSTS{code}: {html.escape(text)}</p>",
        status,
    )


# ---------------------------------------------------------------------------------------------
# /authorize
# ---------------------------------------------------------------------------------------------
_AUTH_PARAMS = (
    "client_id", "response_type", "redirect_uri", "scope", "response_mode", "state", "nonce", "prompt",
    "login_hint", "domain_hint", "code_challenge", "code_challenge_method", "client_info", "claims",
)


def _redirect_with(params: dict[str, str], values: dict[str, str]) -> Response:
    uri = params["redirect_uri"]
    mode = params.get("response_mode") or "query"
    if params.get("state") is not None and "state" not in values:
        values = dict(values, state=params["state"])
    if mode == "form_post":
        # OAuth 2.0 Form Post Response Mode, as Entra answers it: a 200 page whose form POSTs the
        # values to the redirect URI on load (the code never appears in a URL), not cached.
        # https://learn.microsoft.com/entra/identity-platform/v2-oauth2-auth-code-flow#successful-response
        fields = "".join(
            f"<input type='hidden' name='{html.escape(k)}' value='{html.escape(v)}'>" for k, v in values.items()
        )
        page = _page(
            "Working...",
            f"<form method='post' name='hiddenform' action='{html.escape(uri)}'>{fields}<noscript><p>Script is "
            "disabled. Click Submit to continue.</p><button>Submit</button></noscript></form>"
            "<script>document.forms[0].submit()</script>",
        )
        page.headers["Cache-Control"] = "no-store, no-cache"
        return page
    sep = "#" if mode == "fragment" else ("&" if "?" in uri else "?")
    return _redirect(uri + sep + urlencode(values))


def _redirect_error(params: dict[str, str], error: str, code: int, text: str, **extra: str) -> Response:
    # Authorization error response: error, error_description, error_uri, state
    # https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-auth-code-flow#error-response
    body = aadsts_body(error, code, text, host=_host())
    values = {"error": error, "error_description": body["error_description"], "error_uri": body["error_uri"]}
    values.update(extra)
    return _redirect_with(params, values)


@bp.route("/<tenant>/oauth2/v2.0/authorize", methods=["GET", "POST"])
def authorize(tenant: str) -> Response:
    state, _ = _sb()
    with state.lock:
        state.counters["authorize"] += 1
    src = request.args if request.method == "GET" else request.form
    params = {k: src[k] for k in _AUTH_PARAMS if k in src}
    resolved = resolve_tenant(tenant)
    if resolved is None:
        return _error_page(90002, f"Tenant '{tenant}' not found.")
    client_id = params.get("client_id")
    if not client_id:
        return _error_page(900144, "The request body must contain the following parameter: 'client_id'.")
    with state.lock:
        client = state.clients.get(client_id)
    if client is None:
        return _error_page(
            700016,
            f"Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can "
            "happen if the application has not been installed by the administrator of the tenant or consented "
            "to by any user in the tenant. You may have sent your authentication request to the wrong tenant.",
        )
    redirect_uri = params.get("redirect_uri")
    if not redirect_uri or redirect_uri not in client.redirect_uris:
        # AADSTS50011 is displayed on the sign-in page; Entra never redirects to an unregistered URI.
        # https://learn.microsoft.com/en-us/troubleshoot/entra/entra-id/app-integration/error-code-aadsts50011-redirect-uri-mismatch
        return _error_page(
            50011,
            f"The redirect URI '{redirect_uri or ''}' specified in the request does not match the redirect URIs "
            f"configured for the application '{client_id}'. Make sure the redirect URI sent in the request "
            "matches one added to your application in the Azure portal. Navigate to "
            "https://aka.ms/redirectUriMismatchError to learn more about how to fix this.",
        )
    if params.get("response_mode", "query") not in ("query", "fragment", "form_post"):
        params["response_mode"] = "query"
        return _redirect_error(params, "invalid_request", 900144, "The response_mode parameter is not valid.")
    rtype = params.get("response_type")
    if not rtype:
        return _redirect_error(params, "invalid_request", 900144,
                               "The request body must contain the following parameter: 'response_type'.")
    if rtype != "code":
        return _redirect_error(params, "unsupported_response_type", 700054,
                               f"response_type '{rtype}' is not enabled for the application.")
    try:
        scopes = parse_scopes(params.get("scope"))
    except InvalidScopeError as exc:
        return _redirect_error(params, "invalid_scope", 70011,
                               f"The provided value for the input parameter 'scope' is not valid. "
                               f"The scope '{exc}' does not exist.")
    if not scopes:
        return _redirect_error(params, "invalid_request", 900144,
                               "The request body must contain the following parameter: 'scope'.")
    # PKCE: S256 or plain; the challenge is 43-128 characters (RFC 7636 §4.2).
    # https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-auth-code-flow#request-an-authorization-code
    challenge = params.get("code_challenge")
    if challenge is not None:
        method = params.setdefault("code_challenge_method", "plain")
        if method not in ("S256", "plain"):
            return _redirect_error(params, "invalid_request", 50149, "Invalid Code_Challenge_method parameter.")
        if not 43 <= len(challenge) <= 128:
            return _redirect_error(params, "invalid_request", 501491, "Invalid size of Code_Challenge parameter.")
    prompt = params.get("prompt", "")
    user = find_user(params.get("login_hint"))
    if user is not None:
        # Test shortcut: a login_hint naming a test user signs in and consents without any page.
        return _complete(params, tenant, user, scopes, interactive=False)
    if prompt == "none":
        return _redirect_error(params, "login_required", 50058,
                               "A silent sign-in request was sent but no user is signed in.")
    ctx = secrets.token_urlsafe(24)
    with state.lock:
        state.pending[ctx] = PendingAuth(params=params, tenant=tenant)
    return _signin_page(tenant, ctx, params.get("login_hint"))


def _signin_page(tenant: str, ctx: str, hint: str | None) -> Response:
    buttons = "".join(
        f"<button name='user' value='{html.escape(u.upn)}'>{html.escape(u.display_name)} "
        f"&lt;{html.escape(u.upn)}&gt;</button><br>"
        for u in TEST_USERS.values()
    )
    note = f"<p class='err'>No test user matches '{html.escape(hint)}'.</p>" if hint else ""
    return _page(
        "Pick an account",
        f"{note}<form method='post' action='/{html.escape(tenant)}/oauth2/v2.0/authorize/signin'>"
        f"<input type='hidden' name='ctx' value='{ctx}'>{buttons}</form>",
    )


@bp.post("/<tenant>/oauth2/v2.0/authorize/signin")
def authorize_signin(tenant: str) -> Response:
    state, _ = _sb()
    with state.lock:
        pending = state.pending.get(request.form.get("ctx", ""))
    user = find_user(request.form.get("user"))
    if pending is None or user is None:
        return _error_page(90014, "The sign-in session has expired or the account is unknown. Start again.")
    scopes = parse_scopes(pending.params.get("scope"))
    pending.user = user
    return _complete(pending.params, pending.tenant, user, scopes, interactive=True,
                     ctx=request.form.get("ctx"))


@bp.post("/<tenant>/oauth2/v2.0/authorize/consent")
def authorize_consent(tenant: str) -> Response:
    state, _ = _sb()
    with state.lock:
        pending = state.pending.pop(request.form.get("ctx", ""), None)
    if pending is None or pending.user is None:
        return _error_page(90014, "The sign-in session has expired. Start again.")
    decision = request.form.get("decision")
    if decision == "admin_cancel":
        return _consent_required(pending.params, pending.user)
    if decision != "accept":
        # Cancel on the permissions page: access_denied + AADSTS65004 back to the app.
        # https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-auth-code-flow#error-codes-for-authorization-endpoint-errors
        # Entra adds error_subcode=cancel, which MSAL and apps read as "the user cancelled".
        return _redirect_error(pending.params, "access_denied", 65004,
                               "User declined to consent to access the app.", error_subcode="cancel")
    return _issue_code(pending.params, pending.user, parse_scopes(pending.params.get("scope")))


def _consent_required(params: dict[str, str], user: TestUser) -> Response:
    state, _ = _sb()
    with state.lock:
        name = state.clients[params["client_id"]].name
    return _redirect_error(
        params, "consent_required", 65001,
        f"The user or administrator has not consented to use the application with ID '{params['client_id']}' "
        f"named '{name}'. Send an interactive authorization request for this user and resource.",
    )


def _complete(params: dict[str, str], tenant: str, user: TestUser, scopes: list[str], *, interactive: bool,
              ctx: str | None = None) -> Response:
    state, _ = _sb()
    resolved = resolve_tenant(tenant)
    wrong_tenant = (
        (resolved == "consumers" and not user.personal)
        or (resolved == "organizations" and user.personal)
        or (resolved not in ("common", "organizations", "consumers") and resolved != user.tid)
    )
    if wrong_tenant:
        # AADSTS50020: account from another identity provider / tenant (returned as access_denied).
        return _redirect_error(
            params, "access_denied", 50020,
            f"User account '{user.upn}' from identity provider 'https://sts.windows.net/{user.tid}/' does not "
            f"exist in tenant '{TENANT_NAMES.get(str(resolved), tenant)}' and cannot access the application "
            f"'{params['client_id']}' in that tenant.",
        )
    if user.shared:
        # A shared mailbox's account is disabled for sign-in.
        return _error_page(50057, "The user account is disabled.")
    with state.lock:
        blocked = state.ca_blocked.get(user.upn, False)
        consented = (user.tid, params["client_id"]) in state.admin_consented
    if blocked:
        # Conditional Access block. https://learn.microsoft.com/en-us/entra/identity/conditional-access/troubleshoot-conditional-access
        return _redirect_error(
            params, "access_denied", 53003,
            "Access has been blocked by Conditional Access policies. The access policy does not allow token "
            "issuance.",
        )
    if user.tid in ADMIN_CONSENT_TENANTS and not consented and not user.admin:  # an administrator may consent
        # User consent disallowed: the user sees "Need admin approval" (AADSTS90094); returning to the app
        # without consent yields consent_required / AADSTS65001.
        # https://learn.microsoft.com/en-us/troubleshoot/entra/entra-id/app-integration/troubleshoot-consent-issues
        if params.get("prompt") == "none" or not interactive:
            return _consent_required(params, user)
        return _page(
            "Need admin approval",
            f"<p>{html.escape(state.clients[params['client_id']].name)} needs permission to access resources in "
            "your organization that only an admin can grant. Please ask an admin to grant permission to this "
            "app before you can use it.</p><p class='err'>AADSTS90094: An administrator of "
            f"{html.escape(TENANT_NAMES.get(user.tid, ''))} has set a policy that prevents you from granting "
            "the permissions requested by this application.</p>"
            f"<form method='post' action='/{html.escape(tenant)}/oauth2/v2.0/authorize/consent'>"
            f"<input type='hidden' name='ctx' value='{html.escape(ctx or '')}'>"
            "<button name='decision' value='admin_cancel'>Return to the application without granting "
            "consent</button></form>",
        )
    if interactive and params.get("prompt") != "none":
        rows = "".join(f"<li>{html.escape(s)}</li>" for s in scopes)
        return _page(
            "Permissions requested",
            f"<p>{html.escape(state.clients[params['client_id']].name)} wants to:</p><ul>{rows}</ul>"
            f"<p>Signed in as {html.escape(user.upn)}</p>"
            f"<form method='post' action='/{html.escape(tenant)}/oauth2/v2.0/authorize/consent'>"
            f"<input type='hidden' name='ctx' value='{html.escape(ctx or '')}'>"
            "<button name='decision' value='accept'>Accept</button>"
            "<button name='decision' value='cancel'>Cancel</button></form>",
        )
    return _issue_code(params, user, scopes)


def _issue_code(params: dict[str, str], user: TestUser, scopes: list[str]) -> Response:
    state, _ = _sb()
    granted = [s for s in scopes if s.lower() not in user.denied_scopes]
    code = tokens.opaque_code()
    with state.lock:
        state.issued.append(code)
        state.codes[code] = AuthCode(
            client_id=params["client_id"], user=user, scopes=granted, redirect_uri=params["redirect_uri"],
            code_challenge=params.get("code_challenge"), code_challenge_method=params.get("code_challenge_method"),
            nonce=params.get("nonce"), issued_at=state.now(),
        )
    values = {"code": code}
    if params.get("client_info") == "1":
        values["client_info"] = tokens.client_info(user)
    if params.get("state") is not None:
        values["state"] = params["state"]
    values["session_state"] = tokens.new_guid()
    return _redirect_with(params, values)


@bp.get("/<tenant>/v2.0/adminconsent")
@bp.get("/<tenant>/adminconsent")
def admin_consent(tenant: str) -> Response:
    """Admin consent (https://learn.microsoft.com/entra/identity-platform/v2-admin-consent): a Global
    Administrator signs in and grants the app's permissions for the whole tenant; the browser returns with
    ``admin_consent=True&tenant=…&scope=…&state=…``, or ``error``/``error_description``.

    Sandbox shortcut, as on ``/authorize``: a ``login_hint`` naming a test user signs in without a page.
    """
    state, _ = _sb()
    resolved = resolve_tenant(tenant)
    client_id = request.args.get("client_id", "")
    with state.lock:
        client = state.clients.get(client_id)
    if resolved is None or resolved in ("common", "consumers"):
        return _error_page(90002, f"Tenant '{tenant}' not found.")
    if client is None:
        return _error_page(700016, f"Application with identifier '{client_id}' was not found in the directory.")
    redirect_uri = request.args.get("redirect_uri") or client.redirect_uris[0]
    if redirect_uri not in client.redirect_uris:
        return _error_page(50011, f"The redirect URI '{redirect_uri}' specified in the request does not match.")
    hint = (request.args.get("login_hint") or "").strip().lower()
    user = find_user(hint)
    if user is None:
        return _admin_signin_page(hint)
    back = {k: request.args[k] for k in ("state",) if k in request.args}
    sep = "&" if "?" in redirect_uri else "?"
    if user.shared:
        return _error_page(50057, "The user account is disabled.")
    if user.personal or (resolved != "organizations" and user.tid != resolved):
        return _error_page(50020, f"User account '{user.upn}' from identity provider "
                           f"'https://sts.windows.net/{user.tid}/' does not exist in tenant "
                           f"'{TENANT_NAMES.get(str(resolved), tenant)}'.")
    if not user.admin:
        # A user who is not an administrator cannot grant tenant-wide consent; Entra returns the browser with
        # an error instead of a grant.
        text = ("AADSTS90093: This application requires application permissions to another application. Consent "
                "for application permissions can only be performed by an administrator.")
        return _redirect(redirect_uri + sep + urlencode({"error": "access_denied", "error_description": text,
                                                         **back}))
    if request.args.get("decision") == "cancel":
        return _redirect(redirect_uri + sep + urlencode({"error": "access_denied", "error_subcode": "cancel",
                                                         "error_description": "AADSTS65004: User declined to "
                                                         "consent to access the app.", **back}))
    with state.lock:
        state.admin_consented.add((user.tid, client_id))
    values = {"admin_consent": "True", "tenant": user.tid}
    if "scope" in request.args:
        values["scope"] = request.args["scope"]
    values.update(back)
    return _redirect(redirect_uri + sep + urlencode(values))


def _admin_signin_page(hint: str) -> Response:
    links = "".join(
        f"<a href='?{html.escape(urlencode({**request.args, 'login_hint': u.upn}))}'>"
        f"<button type='button'>{html.escape(u.display_name)} &lt;{html.escape(u.upn)}&gt;"
        f"{' (administrator)' if u.admin else ''}</button></a><br>"
        for u in TEST_USERS.values() if not u.personal
    )
    note = f"<p class='err'>No test user matches '{html.escape(hint)}'.</p>" if hint else ""
    return _page("Permissions requested: accept for your organization", f"{note}{links}")


# ---------------------------------------------------------------------------------------------
# /token
# ---------------------------------------------------------------------------------------------
def _err(status: int, error: str, code: int, text: str, **kw: Any) -> Response:
    state, _ = _sb()
    with state.lock:
        state.counters[f"token_error:{code}"] += 1
    return aadsts_response(status, error, code, text, host=_host(),
                           correlation_id=request.headers.get("client-request-id"), **kw)


def _missing(name: str) -> Response:
    return _err(400, "invalid_request", 900144, f"The request body must contain the following parameter: '{name}'.")


@bp.post("/<tenant>/oauth2/v2.0/token")
def token(tenant: str) -> Response:
    state, _ = _sb()
    with state.lock:
        latency = state.token_latency_ms
    if latency:
        state.injected_sleep(latency / 1000)
    inj = state.take_injection(request.path)
    if inj is not None:
        if inj.latency_ms:
            state.injected_sleep(inj.latency_ms / 1000)
        if inj.status:
            return _injected_token_response(inj.status, inj.retry_after, inj.body)
    if resolve_tenant(tenant) is None:
        return _err(400, "invalid_request", 90002, f"Tenant '{tenant}' not found.")
    form = request.form
    grant_type = form.get("grant_type", "")
    with state.lock:
        state.counters[f"token:{grant_type or 'missing'}"] += 1
    client_id = form.get("client_id")
    secret = form.get("client_secret")
    if request.authorization and request.authorization.type == "basic":  # client_secret_basic
        client_id = client_id or request.authorization.username
        secret = secret or request.authorization.password
    if not client_id:
        return _missing("client_id")
    with state.lock:
        client = state.clients.get(client_id)
    if client is None:
        return _err(
            400, "unauthorized_client", 700016,
            f"Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can "
            "happen if the application has not been installed by the administrator of the tenant or consented "
            "to by any user in the tenant. You may have sent your authentication request to the wrong tenant.",
        )
    refused = _authenticate_client(client, secret, tenant)
    if refused is not None:
        return refused
    if not grant_type:
        return _missing("grant_type")
    if grant_type == "authorization_code":
        return _grant_code(client_id)
    if grant_type == "refresh_token":
        return _grant_refresh(client_id)
    if grant_type == "client_credentials":
        return _grant_client_credentials(client_id, tenant)
    return _err(400, "unsupported_grant_type", 70003, f"The app requested an unsupported grant type '{grant_type}'.")


def _authenticate_client(client: ClientApp, secret: str | None, tenant: str) -> Response | None:
    """Client authentication (secret, or a certificate / federated client assertion); None when it passes.

    Failures are HTTP 401 invalid_client, as Entra answers them. Assertions: devstack/sandbox/assertions.py.
    """
    state, key = _sb()
    assertion = request.form.get("client_assertion")
    if assertion and secret:
        return _err(400, "invalid_request", 90014, "A client may use only one authentication method: send "
                    "'client_assertion' or 'client_secret', not both.")
    if assertion:
        with state.lock:
            method, failure = check_client_assertion(
                client, assertion, request.form.get("client_assertion_type"), key=key, host=_host(), tenant=tenant,
                now=state.now())
            state.counters[f"client_auth:{method}"] += 1
        if failure is not None:
            return _err(failure.status, failure.error, failure.code, failure.text)
        return None
    if not secret:
        return _err(401, "invalid_client", 7000218,
                    "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.")
    client_id = client.client_id
    with state.lock:
        valid = client.secrets.get(secret)
        state.counters["client_auth:secret"] += 1
    if valid is None:
        return _err(
            401, "invalid_client", 7000215,
            "Invalid client secret provided. Ensure the secret being sent in the request is the client secret "
            f"value, not the client secret ID, for a secret added to app '{client_id}'.",
        )
    if not valid:
        return _err(
            401, "invalid_client", 7000222,
            f"The provided client secret keys for app '{client_id}' are expired. Visit the Azure portal to create "
            "new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate credentials "
            "for added security: https://aka.ms/certCreds.",
        )
    return None


def _injected_token_response(status: int, retry_after: int | None, body: Any) -> Response:
    if body is not None:
        resp = jsonify(body)
        resp.status_code = status
    elif status == 429:
        resp = _err(429, "temporarily_unavailable", 90055,
                    "There are too many incoming requests. Please try again later.")
    elif status >= 500:
        resp = _err(status, "temporarily_unavailable", 90033,
                    "A transient error has occurred. Please try again.")
    else:
        resp = _err(status, "invalid_request", 90100, "Injected error.")
    if retry_after is not None:
        resp.headers["Retry-After"] = str(retry_after)
    return resp


def _pkce_ok(code: AuthCode, verifier: str | None) -> bool:
    if not code.code_challenge:
        # A code issued without a challenge redeemed with a verifier: a PKCE downgrade (an attacker stripped
        # the challenge from the authorization request). RFC 9700 §4.8.2: the server MUST refuse it.
        return not verifier
    if not verifier:
        return False
    if code.code_challenge_method == "S256":
        digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
        computed = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        return secrets.compare_digest(computed, code.code_challenge)
    return secrets.compare_digest(verifier, code.code_challenge)


def _grant_code(client_id: str) -> Response:
    state, _ = _sb()
    form = request.form
    raw = form.get("code")
    if not raw:
        return _missing("code")
    with state.lock:
        code = state.codes.get(raw)
        if code is None or code.client_id != client_id:
            return _err(400, "invalid_grant", 9002313, "Invalid request. Request is malformed or invalid.")
        if code.redeemed:
            # Codes are single use. https://learn.microsoft.com/en-us/entra/identity-platform/reference-error-codes
            return _err(400, "invalid_grant", 54005,
                        "OAuth2 Authorization code was already redeemed, please retry with a new valid code or "
                        "use an existing refresh token.")
        if state.now() - code.issued_at > CODE_LIFETIME_S:
            # Codes live about 10 minutes. https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-auth-code-flow#redeem-a-code-for-an-access-token
            return _err(400, "invalid_grant", 70008,
                        "The provided authorization code or refresh token has expired due to inactivity. Send a "
                        "new interactive authorization request for this user and resource.")
        redirect_uri = form.get("redirect_uri")
        if not redirect_uri:
            return _missing("redirect_uri")
        if redirect_uri not in state.clients[client_id].redirect_uris:
            return _err(400, "invalid_client", 50011,
                        f"The redirect URI '{redirect_uri}' specified in the request does not match the redirect "
                        f"URIs configured for the application '{client_id}'. Make sure the redirect URI sent in "
                        "the request matches one added to your application in the Azure portal. Navigate to "
                        "https://aka.ms/redirectUriMismatchError to learn more about how to fix this.")
        if redirect_uri != code.redirect_uri:
            return _err(400, "invalid_grant", 500112,
                        f"The reply address '{redirect_uri}' does not match the reply address "
                        f"'{code.redirect_uri}' provided when requesting Authorization code.")
        if not _pkce_ok(code, form.get("code_verifier")):
            # https://learn.microsoft.com/en-us/entra/identity-platform/reference-error-codes (AADSTS501481)
            return _err(400, "invalid_grant", 501481,
                        "The Code_Verifier does not match the code_challenge supplied in the authorization request.")
        if state.ca_blocked.get(code.user.upn):
            return _ca_blocked()
        code.redeemed = True
    return _issue_tokens(client_id, code.user, code.scopes, nonce=code.nonce, grant_time=None)


def _ca_blocked() -> Response:
    # Conditional Access at the token endpoint: interaction_required + suberror message_only.
    return _err(400, "interaction_required", 53003,
                "Access has been blocked by Conditional Access policies. The access policy does not allow token "
                "issuance.", suberror="message_only")


def _grant_refresh(client_id: str) -> Response:
    state, _ = _sb()
    form = request.form
    raw = form.get("refresh_token")
    if not raw:
        return _missing("refresh_token")
    with state.lock:
        rec = state.refresh_tokens.get(raw)
        now = state.now()
        if rec is None:
            return _err(400, "invalid_grant", 9002313, "Invalid request. Request is malformed or invalid.")
        if rec.client_id != client_id or (rec.rotated and state.strict_rotation):
            # Strict rotation (sandbox switch, default on): a refresh token that was already exchanged is dead.
            if rec.rotated and rec.stale_presented is None:
                rec.stale_presented = time.monotonic()
            return _err(400, "invalid_grant", 70000, "The provided value for the input parameter 'refresh_token' "
                        "or 'assertion' is not valid.")
        valid_from = state.tokens_valid_from.get(rec.user.upn, 0.0)
        if rec.issued_at < valid_from:
            # Revoked sessions / password reset. https://learn.microsoft.com/en-us/entra/identity-platform/refresh-tokens#token-revocation
            return _err(400, "invalid_grant", 50173,
                        "The provided grant has expired due to it being revoked, a fresh auth token is needed. The "
                        f"user might have changed or reset their password. The grant was issued on "
                        f"'{_iso(rec.issued_at)}' and the TokensValidFrom date (before which tokens are not valid) "
                        f"for this user is '{_iso(valid_from)}'.")
        if now - rec.last_used > RT_INACTIVITY_S:
            # 90 days of inactivity. https://learn.microsoft.com/en-us/entra/identity-platform/refresh-tokens#token-lifetime
            return _err(400, "invalid_grant", 700082,
                        f"The refresh token has expired due to inactivity. The token was issued on "
                        f"'{_iso(rec.issued_at)}' and was inactive for 90.00:00:00.")
        if state.ca_blocked.get(rec.user.upn):
            return _ca_blocked()
        try:
            requested = parse_scopes(form.get("scope")) if form.get("scope") else list(rec.scopes)
        except InvalidScopeError as exc:
            return _err(400, "invalid_scope", 70011, f"The provided value for the input parameter 'scope' is not "
                        f"valid. The scope '{exc}' does not exist.")
        granted_low = {s.lower() for s in rec.scopes}
        missing = [s for s in resource_scopes(requested) if s.lower() not in granted_low]
        if missing:
            return _err(400, "invalid_grant", 65001,
                        f"The user or administrator has not consented to use the application with ID "
                        f"'{client_id}' named '{state.clients[client_id].name}'. Send an interactive "
                        "authorization request for this user and resource.", suberror="consent_required")
        rec.rotated = True
        rec.last_used = now
        # A subset of resource scopes may be asked for; OIDC scopes follow the original grant.
        scopes = resource_scopes(requested) or resource_scopes(rec.scopes)
        scopes += [s for s in rec.scopes if s in OIDC_SCOPES]
        grant_time = rec.issued_at
        user = rec.user
    return _issue_tokens(client_id, user, scopes, nonce=None, grant_time=grant_time, rt_scopes=rec.scopes,
                         rotated_from=rec)


def _grant_client_credentials(client_id: str, tenant: str) -> Response:
    """Client-credentials grant: an application token for one tenant with the app roles an administrator
    consented to (https://learn.microsoft.com/entra/identity-platform/v2-oauth2-client-creds-grant-flow)."""
    state, key = _sb()
    tid = resolve_tenant(tenant) or ""
    if tid in ("common", "organizations", "consumers"):
        # The client-credentials grant needs a tenant: https://learn.microsoft.com/entra/identity-platform/reference-error-codes
        return _err(400, "invalid_request", 9001023, "The grant type isn't supported over the /common or "
                    "/consumers endpoints. Please use the /organizations or tenant-specific endpoint.")
    scope = (request.form.get("scope") or "").strip()
    if not scope:
        return _missing("scope")
    if scope.split() != [GRAPH_DEFAULT_SCOPE]:
        return _err(400, "invalid_scope", 1002012,
                    f"The provided value for scope {scope} is not valid. Client credential flows must have a scope "
                    "value with /.default suffixed to the resource identifier (application ID URI).")
    with state.lock:
        consented = (tid, client_id) in state.admin_consented
        client = state.clients[client_id]
        now = state.now()
    if not consented:
        # No service principal in the tenant (never consented, or removed by an administrator).
        return _err(401, "invalid_client", 7000229,
                    f"The client application {client_id} is missing service principal in the tenant {tid}. "
                    "See instructions here: https://go.microsoft.com/fwlink/?linkid=2225119")
    expires_in = state.access_token_lifetime_s or 3599
    sp = TestUser(upn="", display_name=client.name, oid=_service_principal_id(tid, client_id), tid=tid,
                  has_mailbox=False)
    roles = list(client.app_roles)
    at = tokens.app_token(key, client_id=client_id, app_name=client.name, tenant_id=tid, principal_id=sp.oid,
                          roles=roles, now=int(now), expires_in=expires_in)
    with state.lock:
        state.access_tokens[at] = AccessTokenRecord(client_id, sp, roles, now + expires_in, app=True)
        state.issued.append(at)
        state.counters["app_tokens_issued"] += 1
    resp = jsonify({"token_type": "Bearer", "expires_in": expires_in, "ext_expires_in": expires_in,
                    "access_token": at})
    resp.headers["Cache-Control"] = "no-store, no-cache"
    resp.headers["Pragma"] = "no-cache"
    return resp


def _service_principal_id(tid: str, client_id: str) -> str:
    digest = hashlib.sha256(f"sp|{tid}|{client_id}".encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-4{digest[13:16]}-8{digest[17:20]}-{digest[20:32]}"


def _issue_tokens(client_id: str, user: TestUser, scopes: list[str], *, nonce: str | None,
                  grant_time: float | None, rt_scopes: list[str] | None = None,
                  rotated_from: RefreshTokenRecord | None = None) -> Response:
    # Successful token response fields:
    # https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-auth-code-flow#successful-response-2
    state, key = _sb()
    host = _host()
    with state.lock:
        now = state.now()
        app_name = state.clients[client_id].name
        res = resource_scopes(scopes)
        # Access tokens live 60-90 minutes by default; a configurable token lifetime policy can set
        # 10 minutes to 1 day (https://learn.microsoft.com/entra/identity-platform/configurable-token-lifetimes).
        expires_in = state.access_token_lifetime_s or random.randint(3600, 5399)
        at = tokens.access_token(key, user=user, client_id=client_id, app_name=app_name, scopes=res,
                                 now=int(now), expires_in=expires_in)
        state.access_tokens[at] = AccessTokenRecord(client_id, user, res, now + expires_in)
        state.issued.append(at)
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "scope": " ".join(res + [s for s in ("profile", "openid", "email") if s in scopes]),
            "expires_in": expires_in,
            "ext_expires_in": expires_in,
            "access_token": at,
        }
        all_scopes = rt_scopes or scopes
        if "offline_access" in all_scopes:
            rt = tokens.refresh_token(user)
            state.refresh_tokens[rt] = RefreshTokenRecord(
                client_id, user, list(all_scopes), issued_at=grant_time if grant_time is not None else now,
                last_used=now,
            )
            body["refresh_token"] = rt
            state.issued.append(rt)
            if rotated_from is not None:
                rotated_from.successor = rt
        if "openid" in scopes:
            body["id_token"] = tokens.id_token(key, host=host, user=user, client_id=client_id, nonce=nonce,
                                               now=int(now), scopes=set(scopes))
            state.issued.append(body["id_token"])
        if request.form.get("client_info") == "1":
            body["client_info"] = tokens.client_info(user)
    resp = jsonify(body)
    resp.headers["Cache-Control"] = "no-store, no-cache"
    resp.headers["Pragma"] = "no-cache"
    return resp
