"""GET /api/connect/microsoft, its Entra redirect URI /api/connect/microsoft/callback (POST: Entra's
``response_mode=form_post``), and GET /api/connect/microsoft/keys (the public keys of ``result``)."""

from __future__ import annotations

import html
import json
import secrets
from typing import TYPE_CHECKING
from urllib.parse import urlencode, urlsplit, urlunsplit

import azure.functions as func

from shared.blueprints._http import (
    NO_CONTEXT,
    Context,
    JsonBody,
    capped_body,
    handle,
    json_response,
    query,
    query_bool,
)

if TYPE_CHECKING:
    from shared.connect_flow import CallbackOutcome
    from shared.service import Connector

bp = func.Blueprint()

# The callback's answers follow a sign-in: never leak anything through Referer or caches, never framed
# (clickjacking; https://developer.mozilla.org/docs/Web/HTTP/Headers/Content-Security-Policy/frame-ancestors).
_NO_LEAK = {"Referrer-Policy": "no-referrer", "Cache-Control": "no-store", "X-Frame-Options": "DENY"}
_FORM = "application/x-www-form-urlencoded"
_MAX_CALLBACK_BODY = 64 * 1024  # code, state, client_info, session_state: a few KB at most
_MAX_PARAM = 8192


@bp.route(route="connect/microsoft", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def connect_microsoft(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    def run(c: Connector, ctx: Context) -> JsonBody:
        ctx.account_ref = query(req, "accountId", max_len=64)
        return c.connect.start(
            ctx.owner, return_url=query(req, "returnUrl"), login_hint=query(req, "loginHint", max_len=256),
            domain_hint=query(req, "domainHint", max_len=256), prompt=query(req, "prompt", max_len=32),
            account_id=ctx.account_ref, require_login_hint=query_bool(req, "requireLoginHint"),
        )

    return handle(req, "connect_microsoft", run, context=context)


@bp.route(route="connect/microsoft/admin", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def connect_microsoft_admin(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    """Team mailboxes: Entra's admin-consent URL for the app's application permissions."""

    def run(c: Connector, ctx: Context) -> JsonBody:
        return c.team_mailboxes.start(ctx.owner, return_url=query(req, "returnUrl"),
                                      tenant=query(req, "tenant", max_len=256))

    return handle(req, "connect_microsoft_admin", run, context=context)


@bp.route(route="connect/microsoft/keys", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def connect_result_keys(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    """The JWK Set (RFC 7517 §5) that verifies the callback's ``result`` token (shared.connect_result)."""

    def run(c: Connector, ctx: Context) -> func.HttpResponse:
        from shared.connect_result import jwks

        return json_response(jwks(c.secrets.key_ring()))

    return handle(req, "connect_result_keys", run, auth=False, context=context)


@bp.route(route="connect/microsoft/callback", methods=["GET", "POST"], auth_level=func.AuthLevel.ANONYMOUS)
def connect_microsoft_callback(req: func.HttpRequest, context: func.Context = NO_CONTEXT) -> func.HttpResponse:
    def run(c: Connector, ctx: Context) -> func.HttpResponse:
        params = callback_params(req)
        if req.method != "POST" and "code" in params:
            c.connect.refuse_code_in_url(params.get("state"))  # burns the state, then 400
        outcome = c.connect.complete(params)
        if outcome.next_url:  # admin consent: the administrator signed in, now Entra's admin-consent page
            return func.HttpResponse(status_code=302, headers={"Location": outcome.next_url, **_NO_LEAK})
        ctx.account_ref = outcome.account_id
        result = _result_params(outcome)
        if outcome.return_url:
            return func.HttpResponse(status_code=302, headers={"Location": _append(outcome.return_url, result),
                                                               **_NO_LEAK})
        origins = sorted({_origin(u) for u in c.settings.allowed_return_urls})
        return _result_page(result, origins)

    return handle(req, "connect_microsoft_callback", run, auth=False, context=context)


def callback_params(req: func.HttpRequest) -> dict[str, str]:
    """What Entra sent: the form of a ``form_post`` POST, or the query of a GET.

    The product asks for ``response_mode=form_post`` (RFC 9700 §4.3.1: a code in a URL is kept by
    history, logs and Referer), so a code in a query string was not sent by the Entra flow we
    started: its state is burnt and the callback refused (``Connector.refuse_code_in_url``). A GET
    still carries Entra's error redirects (``error``, ``error_description``, ``state``)."""
    from shared.errors import ValidationError

    if req.method == "POST":
        ctype = (req.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype != _FORM:
            raise ValidationError("Content-Type", f"The callback takes {_FORM} (Entra's form_post).")
        capped_body(req, _MAX_CALLBACK_BODY, "The callback body")
        source = {k: v for k, v in req.form.items()}
    else:
        source = dict(req.params.items())
    return {k: v for k, v in source.items() if isinstance(v, str) and len(v) < _MAX_PARAM}


def _result_params(outcome: CallbackOutcome) -> dict[str, str]:
    result: dict[str, str] = {"status": outcome.status}
    if outcome.account_id:
        result["accountId"] = outcome.account_id
    if outcome.tenant_connection_id:
        result["tenantConnectionId"] = outcome.tenant_connection_id
    if outcome.result:
        result["result"] = outcome.result
    if outcome.status == "error":
        result["code"] = outcome.code or "error"
        result["message"] = (outcome.message or "")[:300]
        if outcome.hint:  # e.g. the admin-consent URL for consent_required: the product can show it
            result["hint"] = outcome.hint[:600]
    return result


def _append(url: str, params: dict[str, str]) -> str:
    parts = urlsplit(url)
    q = parts.query + ("&" if parts.query else "") + urlencode(params)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, q, parts.fragment))


def _origin(url: str) -> str:
    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc}"


# office.js must be loaded from Microsoft's CDN for Office.context.ui.messageParent to exist in a dialog
# opened with displayDialogAsync. https://learn.microsoft.com/office/dev/add-ins/develop/dialog-api-in-office-add-ins
_OFFICE_JS_ORIGIN = "https://appsforoffice.microsoft.com"
_OFFICE_JS = _OFFICE_JS_ORIGIN + "/lib/1/hosted/office.js"


def _result_page(result: dict[str, str], origins: list[str]) -> func.HttpResponse:
    """A small page for popups and Office dialogs: shows the result and posts it to the opener.

    ``postMessage`` targets only the origins of ALLOWED_RETURN_URLS, so another site that opened
    the popup learns nothing (with none configured, nothing is posted). In an Office dialog,
    ``Office.context.ui.messageParent`` carries it; office.js is a no-op in a plain browser.
    """
    nonce = secrets.token_urlsafe(16)
    ok = result["status"] == "connected"
    what = "organisation" if "tenantConnectionId" in result else "mailbox"
    title = f"{what.capitalize()} connected" if ok else f"Could not connect the {what}"
    detail = "You can close this window." if ok else result.get("message", "")
    hint = result.get("hint")
    payload = json.dumps({"type": "outlook-connector/connect", **result}).replace("<", "\\u003c")
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width,initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem}}
.err{{color:#a4262c}}.ok{{color:#107c10}}code{{background:#f3f2f1;padding:0 .2rem}}</style></head>
<body><h1 class="{'ok' if ok else 'err'}" id="title">{html.escape(title)}</h1>
<p id="detail">{html.escape(detail)}</p>
{'' if ok else f'<p>Code: <code id="code">{html.escape(result.get("code", ""))}</code></p>'}
{f'<p id="hint">{html.escape(hint)}</p>' if hint and not ok else ''}
<script nonce="{nonce}">
// Before any third-party script runs: nothing of the callback's URL (state, an error) stays in it.
try {{ history.replaceState(null, "", location.pathname); }} catch (e) {{}}
</script>
<script nonce="{nonce}" src="{_OFFICE_JS}"></script>
<script nonce="{nonce}">
(function () {{
  var result = {payload};
  var origins = {json.dumps(origins)};
  try {{ if (window.opener) origins.forEach(function (o) {{ window.opener.postMessage(result, o); }}); }} catch (e) {{}}
  window.__connectResult = result;
  if (window.Office && Office.onReady) {{
    Office.onReady(function () {{ try {{ Office.context.ui.messageParent(JSON.stringify(result)); }} catch (e) {{}} }});
  }}
}})();
</script></body></html>"""
    csp = (f"default-src 'none'; style-src 'unsafe-inline'; script-src 'nonce-{nonce}' {_OFFICE_JS_ORIGIN}; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return func.HttpResponse(body, status_code=200 if ok else 400, mimetype="text/html", charset="utf-8",
                             headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", **_NO_LEAK})
