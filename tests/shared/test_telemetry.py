"""OpenTelemetry (shared/telemetry.py) against the real stack: an in-process Connector on Azurite, real MSAL and
the HTTPS sandbox, the real blueprint functions, and the SDK's in-memory exporters behind the same scrubbing
gate that guards the Application Insights and console exporters.

A connect, a send (inline and with an upload session), a refresh failure and throttled Graph calls each leave
their spans and metrics; then everything exported is scanned for tokens, codes, secrets and addresses.
"""

from __future__ import annotations

import inspect
import json
import re
import secrets
from typing import Any
from urllib.parse import urlencode

import azure.functions as func
import pytest

from tests.conftest import Host, authorize

USER = "megan@contoso.onmicrosoft.com"
OWNER = "telemetry-owner"
HOST_TRACE = secrets.token_hex(16)
HOST_SPAN = secrets.token_hex(8)
_STATE: dict[str, Any] = {}


class _TraceContext:
    def __init__(self, trace_parent: str) -> None:
        self.trace_parent, self.trace_state, self.attributes = trace_parent, "", {}


class _Context:
    """What the Functions host passes as ``context``: its own span for the invocation."""

    def __init__(self, name: str) -> None:
        self.function_name, self.invocation_id = name, "inv-" + secrets.token_hex(4)
        self.trace_context = _TraceContext(f"00-{HOST_TRACE}-{HOST_SPAN}-01")


@pytest.fixture(scope="module")
def otel() -> Any:
    """In-memory exporters, installed once per process (OpenTelemetry's global providers are set once)."""
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from shared import telemetry

    if "telemetry" not in _STATE:
        spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
        _STATE.update(telemetry=telemetry.install(span_exporter=spans, metric_readers=[reader], batch=False),
                      spans=spans, reader=reader)
    telemetry.use(_STATE["telemetry"])
    yield _STATE
    telemetry.use(telemetry.OFF)
    from azure.core.settings import settings
    from opentelemetry.instrumentation.requests import RequestsInstrumentor

    RequestsInstrumentor().uninstrument()  # the rest of the session runs uninstrumented, as before
    settings.tracing_implementation = None
    _STATE["spans"].shutdown()  # a stopped in-memory exporter keeps nothing more


@pytest.fixture(scope="module")
def stack(host: Host, browser_session: Any, otel: Any, monkeypatch_module: Any) -> dict[str, Any]:
    """An in-process Connector on the host's settings, served by the real blueprint functions."""
    from shared import service
    from shared.config import load_settings

    c = service.Connector(load_settings(host.env))
    monkeypatch_module.setattr(service, "_connector", c)
    start = c.connect.start(OWNER, return_url=None, login_hint=USER)
    form = authorize(browser_session, start["authUrl"])
    resp = _call("connect_microsoft_callback", func.HttpRequest(
        method="POST", url=f"{host.url}/api/connect/microsoft/callback", body=urlencode(form.fields).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"}))
    assert resp.status_code == 200, resp.get_body()[:300]
    account_id = c.account_ops.list_accounts(OWNER)[0]["id"]
    tokens = c.accounts.open_tokens(c.accounts.get_account(OWNER, account_id))
    return {"c": c, "account": account_id, "code": form.fields["code"], "tokens": tokens,
            "correlation": resp.headers["x-correlation-id"]}


@pytest.fixture(scope="module")
def monkeypatch_module() -> Any:
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _call(name: str, req: func.HttpRequest) -> func.HttpResponse:
    from shared.blueprints import accounts, connect, messages, send

    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)  # function_app.py's, without its env check
    for blueprint in (connect.bp, accounts.bp, send.bp, messages.bp):
        app.register_functions(blueprint)
    fn = next(f for f in app.get_functions() if f.get_function_name() == name).get_user_function()
    return fn(req, context=_Context(name))


def _api(host: Host, method: str, path: str, name: str, *, body: Any = None,
         route: dict[str, str] | None = None) -> func.HttpResponse:
    return _call(name, func.HttpRequest(
        method=method, url=host.url + path, route_params=route or {},
        headers={"Authorization": f"Bearer {host.token(OWNER)}", "Content-Type": "application/json"},
        body=json.dumps(body).encode() if body is not None else b""))


def _spans(otel: Any, name: str | None = None) -> list[Any]:
    return [s for s in otel["spans"].get_finished_spans() if name is None or s.name == name]


def _points(otel: Any, metric: str) -> list[Any]:
    data = otel["reader"].get_metrics_data()
    out = []
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            out += [p for m in sm.metrics if m.name == metric for p in m.data.data_points]
    return out


def _value(otel: Any, metric: str, **attrs: Any) -> float:
    return sum(getattr(p, "value", getattr(p, "count", 0)) for p in _points(otel, metric)
               if all(p.attributes.get(k) == v for k, v in attrs.items()))


def _children(otel: Any, parent: Any) -> list[Any]:
    return [s for s in _spans(otel) if s.parent is not None and s.parent.span_id == parent.context.span_id]


def test_connect_is_one_trace_under_the_hosts_span(otel: Any, stack: dict[str, Any]) -> None:
    [inv] = _spans(otel, "connect_microsoft_callback")
    assert f"{inv.context.trace_id:032x}" == HOST_TRACE and f"{inv.parent.span_id:016x}" == HOST_SPAN
    assert inv.attributes["connector.correlation_id"] == stack["correlation"]
    assert inv.attributes["http.response.status_code"] == 200 and inv.attributes["faas.trigger"] == "http"
    children = _children(otel, inv)
    urls = [str(s.attributes.get("url.full") or s.attributes.get("http.url") or "") for s in children]
    assert any(u.endswith("/oauth2/v2.0/token") for u in urls), urls  # Entra, through MSAL's session
    assert any(u.endswith("/v1.0/me") for u in urls), urls  # Graph, without its $select
    assert any(s.attributes.get("az.namespace") == "Microsoft.Storage" or "Table" in s.name for s in
               _spans(otel) if s.context.trace_id == inv.context.trace_id), "no azure-core storage span"
    # The single-row calls (shared/_table_rest.py: the state row read and claimed) are traced too.
    row_calls = [s for s in _spans(otel) if s.context.trace_id == inv.context.trace_id and s.kind.name == "CLIENT"
                 and "oauthstates(PartitionKey=" in str(s.attributes.get("url.full") or s.attributes.get("http.url"))]
    assert {s.attributes.get("http.request.method") or s.attributes.get("http.method") for s in row_calls} \
        >= {"GET", "PATCH"}, [s.attributes for s in row_calls]
    assert all("?" not in u for u in urls), urls
    assert _value(otel, "connector.account.transitions", status="active", event="connected") >= 1


def test_send_spans_and_metrics(otel: Any, host: Host, stack: dict[str, Any]) -> None:
    path = f"/api/accounts/{stack['account']}/send"
    big = {"name": "big.bin", "contentType": "application/octet-stream",
           "contentBytes": __import__("base64").b64encode(secrets.token_bytes(3 << 20)).decode()}
    for body in ({"to": ["someone@example.com"], "subject": "hello", "bodyText": "secret body text"},
                 {"to": ["someone@example.com"], "subject": "big", "attachments": [big]}):
        r = _api(host, "POST", path, "send_mail", body=body, route={"accountId": stack["account"]})
        assert r.status_code == 202, r.get_body()[:300]
    assert _value(otel, "connector.send", outcome="sent", size_class="none") >= 1
    assert _value(otel, "connector.send", outcome="sent", size_class="large") >= 1
    assert _value(otel, "connector.send.duration", outcome="sent", size_class="large") >= 1
    sends = _spans(otel, "send_mail")
    uploads = [s for inv in sends for s in _children(otel, inv) if "/upload/" in str(s.attributes.get("url.full"))]
    assert uploads, "no upload-session PUT span"
    assert all("authtoken" not in json.dumps(dict(s.attributes)) for s in uploads)


def test_refresh_failure_is_counted_as_invalid_grant(otel: Any, host: Host, stack: dict[str, Any],
                                                     control: Any) -> None:
    before = _value(otel, "connector.refresh", outcome="invalid_grant")
    control.revoke_grants(USER)
    r = _api(host, "POST", f"/api/accounts/{stack['account']}/refresh", "refresh_account",
             route={"accountId": stack["account"]})
    assert r.status_code == 409, r.get_body()[:300]
    assert _value(otel, "connector.refresh", outcome="invalid_grant") == before + 1
    assert _value(otel, "connector.account.transitions", status="reauth_required", event="refresh_rejected") >= 1
    [inv] = _spans(otel, "refresh_account")[-1:]
    assert inv.attributes["connector.error.code"] == "reauth_required"
    assert inv.attributes["http.response.status_code"] == 409


def test_throttled_graph_calls(otel: Any, host: Host, stack: dict[str, Any], browser_session: Any,
                               control: Any) -> None:
    c = stack["c"]
    start = c.connect.start(OWNER, return_url=None, login_hint=USER, account_id=stack["account"])
    assert c.connect.complete(authorize(browser_session, start["authUrl"]).fields).status == "connected"
    # The exact path (a glob): the connect's background catch-up reads /me/mailFolders/{folder}/messages/delta.
    control.inject("/v1.0/me/mailFolder[s]", status=429, retry_after=0, count=1, user=USER)
    r = _api(host, "GET", f"/api/accounts/{stack['account']}/folders", "list_folders",
             route={"accountId": stack["account"]})
    assert r.status_code == 200, r.get_body()[:300]
    assert _value(otel, "connector.graph.throttled", status=429, outcome="retried") >= 1
    control.inject("/v1.0/me/mailFolder[s]", status=429, retry_after=120, count=1, user=USER)
    r = _api(host, "GET", f"/api/accounts/{stack['account']}/folders", "list_folders",
             route={"accountId": stack["account"]})
    assert r.status_code == 503 and r.headers.get("Retry-After"), r.get_body()[:300]
    assert _value(otel, "connector.graph.throttled", status=429, outcome="gave_up") >= 1
    assert _value(otel, "connector.graph.throttled_mailboxes") >= 1
    statuses = [s.attributes.get("http.response.status_code") or s.attributes.get("http.status_code")
                for s in _spans(otel) if s.kind.name == "CLIENT"]
    assert 429 in statuses


def test_webhook_delivery_is_counted(otel: Any, stack: dict[str, Any], webhooks: Any) -> None:
    event = {"id": "evt_" + secrets.token_hex(8), "type": "account.connected", "createdAt": "2030-01-01T00:00:00Z",
             "data": {"account": {"id": stack["account"]}}}
    stack["c"].webhooks.deliver(json.dumps({"attempt": 0, "event": event}).encode())
    assert _value(otel, "connector.webhook.delivery", outcome="delivered", event="account.connected") >= 1
    assert _value(otel, "connector.webhook.attempts", outcome="delivered", event="account.connected") >= 1


def test_notification_functions_run_in_the_hosts_trace(otel: Any, stack: dict[str, Any]) -> None:
    """The notification worker and timers get the same span and storage budget as shared.blueprints.timers."""
    from shared.blueprints import notifications

    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
    app.register_functions(notifications.bp)
    fns = {f.get_function_name(): f.get_user_function() for f in app.get_functions()}
    from azure.functions.queue import QueueMessage  # the worker's concrete type (carries dequeue_count)

    msg = QueueMessage(id="msg-1", body=b"not a job", dequeue_count=2, pop_receipt=None)
    fns["notification_worker"](msg, context=_Context("notification_worker"))
    [span] = _spans(otel, "notification_worker")
    assert span.parent is not None and f"{span.parent.span_id:016x}" == HOST_SPAN
    assert span.attributes["messaging.message.id"] == "msg-1"
    assert span.attributes["messaging.message.delivery_attempt"] == 2
    for name in ("notifications_timer", "notifications_reconcile"):
        assert "context" in inspect.signature(fns[name]).parameters, name


def test_webhook_urls_keep_only_their_host() -> None:
    """A Slack-style webhook URL carries its secret in the path: spans keep scheme and host only."""
    from shared.telemetry import clean_attributes, redact_webhook_host, strip_url

    redact_webhook_host("https://hooks.slack.com/services/T000/B000/XyZsecretPath")  # WEBHOOK_URL, from Settings
    for url in ("https://hooks.slack.com/services/T000/B000/XyZsecretPath",
                "https://HOOKS.slack.com/services/T000/B000/XyZsecretPath?x=1#f"):
        assert strip_url(url) == url.split("/services")[0]
    assert "XyZsecretPath" not in str(clean_attributes(
        {"url.full": "https://hooks.slack.com/services/T000/B000/XyZsecretPath"}))
    assert strip_url("https://graph.microsoft.com/v1.0/me/messages?$top=1") == \
        "https://graph.microsoft.com/v1.0/me/messages"
    redact_webhook_host(None)


_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_JWT = re.compile(r"eyJ[\w-]{8,}\.[\w-]{8,}")


def test_nothing_exported_carries_a_secret(otel: Any, host: Host, stack: dict[str, Any]) -> None:
    """Run last in this module: every span and metric exported so far, scanned."""
    spans = [s.to_json() for s in _spans(otel)]
    data = otel["reader"].get_metrics_data()
    text = "\n".join(spans) + "\n" + (data.to_json() if data else "")
    assert len(spans) > 20
    tokens = stack["tokens"]
    for secret in (tokens.access_token, tokens.refresh_token, stack["code"], host.env["MS_CLIENT_SECRET"],
                   host.env["AUTH_HS256_SECRET"], host.env["WEBHOOK_SECRET"], "secret body text"):
        assert secret not in text
    assert not _JWT.search(text), _JWT.search(text)
    assert not _EMAIL.search(text), _EMAIL.search(text)
    for marker in ("authtoken=", "client_secret", "refresh_token=", "code=", "$select=", "$filter=", "Bearer "):
        assert marker not in text, marker


def test_scrub_removes_what_an_exception_message_may_quote() -> None:
    from shared.telemetry import scrub, size_class, strip_url

    msg = ("HTTPSConnectionPool(host='graph', port=443): Max retries exceeded with url: "
           "/v1.0/me/messages?$filter=from/emailAddress/address%20eq%20'a@b.com' (Caused by x)")
    assert "$filter" not in scrub(msg) and "a@b.com" not in scrub(msg)
    assert scrub("Authorization: Bearer abc.def") == "Authorization: Bearer [redacted]"
    assert "s3cr3t" not in scrub("client_secret=s3cr3t&grant_type=refresh_token")
    assert scrub("eyJhbGciOi.eyJzdWIiOiIx.sig") == "[jwt]"
    assert strip_url("https://x/upload/Users('a@b')/S?authtoken=T#f") == "https://x/upload/{redacted}/S"
    assert [size_class(n) for n in (0, 10, 2 << 20, 5 << 20)] == ["none", "small", "medium", "large"]


def test_refresh_outcome_classes() -> None:
    from shared.errors import OperatorError, ReauthRequiredError, ThrottledError, UpstreamUnavailableError
    from shared.tokens import refresh_outcome

    assert refresh_outcome(ReauthRequiredError("x")) == "invalid_grant"
    assert refresh_outcome(OperatorError("x", code="invalid_client")) == "invalid_client"
    assert refresh_outcome(ThrottledError("x", retry_after=1)) == "throttled"
    assert refresh_outcome(UpstreamUnavailableError("x")) == "transient"


def test_off_imports_nothing_and_does_nothing() -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("import sys; from shared.telemetry import OFF\n"
            "with OFF.invocation('f', trigger='http', trace_parent=None) as i: i.set('k', 'v')\n"
            "OFF.refresh('ok'); OFF.send('sent', nbytes=1, seconds=0.1); OFF.throttled(429, mailbox='m', gave_up=False)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry', 'azure.monitor'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_logger_of_the_package_is_under_connector() -> None:
    """The OpenTelemetry log export takes the ``connector`` logger tree only: a module logging under
    ``__name__`` (``shared.auth``) would be dropped in Application Insights."""
    import ast

    from tests.conftest import ROOT

    names = []
    for path in sorted((ROOT / "shared").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "getLogger" and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant):
                    names.append((path.name, arg.value))
                elif path.name != "logs.py":  # logs.py quiets third-party loggers by name
                    names.append((path.name, ast.unparse(arg)))
    assert names and all(str(n).startswith("connector") for _, n in names), names
