"""GET /api/connect/microsoft and its Entra redirect URI, /api/connect/microsoft/callback."""

from __future__ import annotations

import html
import json
import secrets
from typing import TYPE_CHECKING
from urllib.parse import urlencode, urlsplit, urlunsplit

import azure.functions as func

from shared.blueprints._http import Context, JsonBody, handle, query

if TYPE_CHECKING:
    from shared.service import Connector

bp = func.Blueprint()

# The callback URL carries the authorization code: never leak it through Referer or caches.
_NO_LEAK = {"Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


@bp.route(route="connect/microsoft", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def connect_microsoft(req: func.HttpRequest) -> func.HttpResponse:
    def run(c: Connector, ctx: Context) -> JsonBody:
        ctx.account_ref = query(req, "accountId", max_len=64)
        return c.start_connect(
            ctx.owner, return_url=query(req, "returnUrl"), login_hint=query(req, "loginHint", max_len=256),
            domain_hint=query(req, "domainHint", max_len=256), prompt=query(req, "prompt", max_len=32),
            account_id=ctx.account_ref,
        )

    return handle(req, "connect_microsoft", run)


@bp.route(route="connect/microsoft/callback", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def connect_microsoft_callback(req: func.HttpRequest) -> func.HttpResponse:
    def run(c: Connector, ctx: Context) -> func.HttpResponse:
        params = {k: v for k, v in req.params.items() if len(v) < 8192}
        outcome = c.complete_connect(params)
        ctx.account_ref = outcome.account_id
        result: dict[str, str] = {"status": outcome.status}
        if outcome.account_id:
            result["accountId"] = outcome.account_id
        if outcome.status == "error":
            result["code"] = outcome.code or "error"
            result["message"] = (outcome.message or "")[:300]
            if outcome.hint:  # e.g. the admin-consent URL for consent_required: the product can show it
                result["hint"] = outcome.hint[:600]
        if outcome.return_url:
            return func.HttpResponse(status_code=302, headers={"Location": _append(outcome.return_url, result),
                                                               **_NO_LEAK})
        origins = sorted({_origin(u) for u in c.settings.allowed_return_urls})
        return _result_page(result, origins)

    return handle(req, "connect_microsoft_callback", run, auth=False)


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
    title = "Mailbox connected" if ok else "Could not connect the mailbox"
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
           "base-uri 'none'; form-action 'none'")
    return func.HttpResponse(body, status_code=200 if ok else 400, mimetype="text/html", charset="utf-8",
                             headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", **_NO_LEAK})
