"""Session fixtures: one Azurite, one Microsoft sandbox, one dev host (a real subprocess).

Nothing here patches the app: the host runs ``function_app.py`` against Azurite and the sandbox
over HTTPS, exactly as a developer's ``make dev`` does, with settings from the environment.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
ALL_MAIL_EVENTS = "message.received,message.sent,message.updated,message.deleted"
FEEDS = 3  # subscriptions per mailbox with ALL_MAIL_EVENTS: Inbox, Sent Items, mailbox-wide changes
# The app's timer and queue functions (shared/blueprints/timers.py, notifications.py). A second host on the
# session's storage runs none of them (``AzureWebJobs.<name>.Disabled``, as on Azure): its workers would
# take the session host's queue messages, and one it held when it stopped stays invisible for the
# queue lease (10 minutes), stalling every later test that waits for the queues to drain.
BACKGROUND_FUNCTIONS = ("refresh_timer", "refresh_worker", "refresh_reconcile", "webhook_delivery", "cleanup_timer",
                        "notification_worker", "notifications_timer", "notifications_reconcile")
HTTP_ONLY = {f"AzureWebJobs.{name}.Disabled": "true" for name in BACKGROUND_FUNCTIONS}


def storage_settings(connection_string: str = "", **extra: str) -> Any:
    """Minimal valid Settings around a storage connection (tests of the storage layer build a Storage on them)."""
    from shared.config import load_settings

    return load_settings({
        "MS_CLIENT_ID": "c", "MS_CLIENT_SECRET": "s", "PUBLIC_BASE_URL": "http://127.0.0.1:7071",
        "AzureWebJobsStorage": connection_string, "AUTH_ISSUER": "i", "AUTH_AUDIENCE": "a",
        "AUTH_HS256_SECRET": "x" * 32, "TOKEN_ENCRYPTION_KEYS": '{"active":"k","keys":{"k":"' + "A" * 43 + '="}}',
        **extra,
    })


def wait_for(condition: Any, *, timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``condition()`` until it returns a truthy value (never a blind sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def azurite() -> Iterator[Any]:
    from devstack.azurite import Azurite

    az = Azurite().start()
    yield az
    az.stop()


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Any]:
    from devstack.sandbox import SandboxServer

    # Like `make dev`: the sandbox may call the dev host's loopback http notification URL (Graph: https only).
    sb = SandboxServer(port=0, allow_http_notifications=True).start()
    yield sb
    sb.stop()


@pytest.fixture(scope="session")
def control(sandbox: Any) -> Any:
    from devstack.sandbox import SandboxControl

    return SandboxControl(sandbox.url, verify=sandbox.ca_path)


class WebhookReceiver:
    """A local webhook endpoint that records deliveries; can be told to fail."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.fail_next = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.lock:
                    if outer.fail_next > 0:
                        outer.fail_next -= 1
                        self.send_response(500)
                        self.end_headers()
                        return
                    outer.events.append({"body": body, "headers": dict(self.headers.items())})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"

    def of_type(self, event_type: str, account_id: str | None = None) -> list[dict[str, Any]]:
        out = []
        with self.lock:
            for e in self.events:
                doc = json.loads(e["body"])
                if doc["type"] == event_type and (account_id is None or doc["data"]["account"]["id"] == account_id):
                    out.append({**e, "doc": doc})
        return out


@pytest.fixture(scope="session")
def webhooks() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver()
    yield r
    r.server.shutdown()


def free_port() -> int:
    from devstack.azurite import free_port as fp

    return fp()


class Host:
    def __init__(self, url: str, env: dict[str, str], log_path: Path, proc: subprocess.Popen[bytes]) -> None:
        self.url = url
        self.env = env
        self.log_path = log_path
        self.proc = proc
        self.http = requests.Session()
        self.http.trust_env = False

    def settings(self) -> Any:
        from shared.config import load_settings

        return load_settings(self.env)

    def token(self, sub: str, **overrides: Any) -> str:
        import jwt

        now = int(time.time())
        claims = {"sub": sub, "iss": self.env["AUTH_ISSUER"], "aud": self.env["AUTH_AUDIENCE"], "iat": now,
                  "nbf": now, "exp": now + 3600}
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, self.env["AUTH_HS256_SECRET"], algorithm="HS256")

    def api(self, method: str, path: str, sub: str | None = "owner-a", **kw: Any) -> requests.Response:
        headers = kw.pop("headers", {})
        if sub is not None:
            headers.setdefault("Authorization", f"Bearer {self.token(sub)}")
        kw.setdefault("timeout", 120)
        kw.setdefault("allow_redirects", False)
        return self.http.request(method, self.url + path, headers=headers, **kw)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def notification_cert_path() -> Path:
    """The tests' rich-notification certificate (as `make dev` makes one), generated once per checkout."""
    from devstack.certs import ensure_notification_certificate

    ARTIFACTS.mkdir(exist_ok=True)
    return ensure_notification_certificate(ARTIFACTS)


@contextlib.contextmanager
def launch_host(azurite: Any, sandbox: Any, control: Any, webhooks: WebhookReceiver, *,
                client_id: str = "5a1b0c3d-0000-4000-8000-00000000c0de", name: str = "host",
                extra: dict[str, str] | None = None) -> Iterator[Host]:
    """A dev host on its own port (its own app registration in the sandbox), sharing Azurite, the sandbox and the
    webhook receiver; ``extra`` settings override the defaults."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    control.register_client(client_id, "sandbox-client-secret-not-a-real-secret",
                            [f"{base}/api/connect/microsoft/callback"])
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MS_", "AUTH_", "GRAPH_", "WEBHOOK_"))}
    env.update({
        "MS_CLIENT_ID": client_id,
        "MS_CLIENT_SECRET": "sandbox-client-secret-not-a-real-secret",
        "MS_AUTHORITY_HOST": sandbox.url,
        "MS_TENANT": "common",
        "GRAPH_BASE_URL": sandbox.url + "/v1.0",
        "MS_CA_BUNDLE": sandbox.ca_path,
        "NOTIFICATION_CERT_PATH": str(notification_cert_path()),
        "PUBLIC_BASE_URL": base,
        "AzureWebJobsStorage": azurite.connection_string,
        "AUTH_ISSUER": "https://issuer.test",
        "AUTH_AUDIENCE": "outlook-connector-tests",
        "AUTH_HS256_SECRET": secrets.token_urlsafe(32),
        "ALLOWED_RETURN_URLS": f"https://app.example.com/connected,{base}/demo/",
        "TOKEN_ENCRYPTION_KEYS": json.dumps({"active": "k1", "keys": {"k1": key}}),
        "WEBHOOK_URL": webhooks.url,
        "WEBHOOK_SECRET": secrets.token_urlsafe(24),
        "REFRESH_SCHEDULE": "0 0 0 1 1 *",
        "CLEANUP_SCHEDULE": "0 0 0 1 1 *",
        "PYTHONUNBUFFERED": "1",
        "DEMO_ENABLED": "true",
        # Failed queue messages become visible again at once (host.json says 10 s), so poison
        # handling is observable quickly; the same override syntax works on Azure.
        "AzureFunctionsJobHost__extensions__queues__visibilityTimeout": "00:00:00",
        **(extra or {}),
    })
    from devstack.process import start_host

    log_path = ARTIFACTS / f"{name}.log"
    proc = start_host(env, port, log_path)
    try:
        proc.wait_healthy(60)
        yield Host(base, env, log_path, proc.proc)
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def host(azurite: Any, sandbox: Any, control: Any, webhooks: WebhookReceiver) -> Iterator[Host]:
    """The dev host of the end-to-end tests, producing every mailbox event (one subscription per feed)."""
    with launch_host(azurite, sandbox, control, webhooks, extra={"MAIL_EVENTS": ALL_MAIL_EVENTS}) as h:
        yield h


@pytest.fixture(scope="session")
def browser_session(sandbox: Any) -> requests.Session:
    """What the user's browser does at the sandbox: follow /authorize to the redirect."""
    s = requests.Session()
    s.trust_env = False
    s.verify = sandbox.ca_path
    return s


from devstack.signin import FormPost, read_form_post  # noqa: E402 - the browser's side of form_post


def authorize(browser: requests.Session, auth_url: str) -> FormPost:
    """The browser at Entra's /authorize (test users sign in at once): the form_post back to the app."""
    return read_form_post(browser.get(auth_url, allow_redirects=False, timeout=30))


def connect(host: Host, browser: requests.Session, *, sub: str = "owner-a", login_hint: str,
            return_url: str | None = "https://app.example.com/connected", **extra: str) -> dict[str, Any]:
    """Run the whole connect journey; return the parsed redirect (or the HTML page response)."""
    params = {"loginHint": login_hint, **extra}
    if return_url:
        params["returnUrl"] = return_url
    r = host.api("GET", "/api/connect/microsoft", sub=sub, params=params)
    assert r.status_code == 200, r.text
    start = r.json()
    form = authorize(browser, start["authUrl"])
    assert form.action == host.url + "/api/connect/microsoft/callback", form.action
    cb = form.submit(host.http)
    out: dict[str, Any] = {"start": start, "form": form, "response": cb}
    if cb.status_code == 302:
        loc = cb.headers["Location"]
        out["location"] = loc
        out["result"] = {k: v[0] for k, v in parse_qs(urlsplit(loc).query).items()}
        out["result_token"] = out["result"].pop("result", None)  # the signed result (connect_result)
    return out
