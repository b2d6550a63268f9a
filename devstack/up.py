"""``python -m devstack up``: Azurite + sandbox + dev host, with local settings seeded.

Settings come from the environment, then ``local.settings.json`` (created from
``local.settings.json.example`` on first run, with a fresh random token key), like ``func start``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path

from devstack import env_port, port_number
from devstack.azurite import ROOT, Azurite, DevstackError, port_in_use

SETTINGS_FILE = ROOT / "local.settings.json"
EXAMPLE_FILE = ROOT / "local.settings.json.example"


def seed_local_settings(path: Path = SETTINGS_FILE) -> dict[str, str]:
    if not path.exists():
        doc = json.loads(EXAMPLE_FILE.read_text())
        key = base64.b64encode(secrets.token_bytes(32)).decode()
        doc["Values"]["TOKEN_ENCRYPTION_KEYS"] = json.dumps({"active": "local1", "keys": {"local1": key}})
        doc["Values"]["AUTH_HS256_SECRET"] = secrets.token_urlsafe(32)
        path.write_text(json.dumps(doc, indent=2) + "\n")
        os.chmod(path, 0o600)
        print(f"devstack: created {path.name} from the example (fresh token key)", file=sys.stderr, flush=True)
    try:
        values: dict[str, str] = json.loads(path.read_text()).get("Values", {})
    except ValueError as e:
        raise DevstackError(f"{path} is not valid JSON ({e}); fix it or delete it to start from the example") from None
    return values


def apply_settings(values: dict[str, str]) -> None:
    for k, v in values.items():
        os.environ.setdefault(k, str(v))
    ca = os.environ.get("MS_CA_BUNDLE", "")
    if ca and not os.path.isabs(ca):
        os.environ["MS_CA_BUNDLE"] = str(ROOT / ca)


def token_main(argv: list[str] | None = None) -> int:
    from shared.auth import issue_dev_token
    from shared.config import load_settings

    apply_settings(seed_local_settings())
    sub = (argv or ["dev-user"])[0]
    print(issue_dev_token(load_settings(), sub))
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    import logging

    p = argparse.ArgumentParser(prog="python -m devstack up")
    p.add_argument("--port", type=port_number, default=env_port("DEVHOST_PORT", 7071),
                   help="dev host port (DEVHOST_PORT, 7071 like Core Tools)")
    p.add_argument("--sandbox-port", type=port_number, default=env_port("SANDBOX_PORT", 8443),
                   help="sandbox HTTPS port (SANDBOX_PORT, 8443)")
    p.add_argument("--settings", type=Path, default=SETTINGS_FILE,
                   help="settings file, created from local.settings.json.example if missing")
    a = p.parse_args(argv)
    try:
        storage_ports = [port_number(env_port(f"AZURITE_{k}_PORT", d))
                         for k, d in (("BLOB", 10000), ("QUEUE", 10001), ("TABLE", 10002))]
    except argparse.ArgumentTypeError as e:
        print(f"devstack: AZURITE_*_PORT: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    t0 = time.monotonic()
    from devstack.certs import ensure_certs, ensure_notification_certificate

    certs = ensure_certs()
    try:
        values = seed_local_settings(a.settings)
    except DevstackError as e:
        print(f"devstack: {e}", file=sys.stderr)
        return 1
    os.environ.setdefault("DEMO_ENABLED", "true")  # the local stack shows the demo client unless told not to
    apply_settings(values)
    named = [(a.port, "dev host", "DEVHOST_PORT (or --port)"),
             (a.sandbox_port, "sandbox", "SANDBOX_PORT (or --sandbox-port)")]
    named += [(port, "Azurite", "AZURITE_BLOB_PORT / _QUEUE_PORT / _TABLE_PORT") for port in storage_ports]
    for port, what, how in named:
        if port_in_use(port):
            print(f"devstack: port {port} ({what}) is already in use. Stop the other process or set {how}.",
                  file=sys.stderr)
            return 1
    # The demo page returns to itself after connecting: allow it on whatever port the host uses.
    demo_urls = [f"http://localhost:{a.port}/demo/", f"http://127.0.0.1:{a.port}/demo/"]
    allowed = [u for u in os.environ.get("ALLOWED_RETURN_URLS", "").split(",") if u.strip()]
    os.environ["ALLOWED_RETURN_URLS"] = ",".join(allowed + [u for u in demo_urls if u not in allowed])
    os.environ["MS_AUTHORITY_HOST"] = f"https://localhost:{a.sandbox_port}"
    os.environ["GRAPH_BASE_URL"] = f"https://localhost:{a.sandbox_port}/v1.0"
    os.environ["MS_CA_BUNDLE"] = str(certs.ca_cert)
    os.environ.setdefault("NOTIFICATION_CERT_PATH", str(ensure_notification_certificate(certs.ca_cert.parent)))
    os.environ["PUBLIC_BASE_URL"] = f"http://localhost:{a.port}"
    if not os.environ.get("WEBHOOK_URL"):  # the dev host's own receiver (GET /demo/webhooks lists what arrived)
        os.environ["WEBHOOK_URL"] = f"http://localhost:{a.port}/demo/webhooks"
        os.environ["WEBHOOK_SECRET"] = os.environ.get("WEBHOOK_SECRET") or secrets.token_urlsafe(32)
    # The local stack's own sandbox may call the dev host's loopback http notification URL (Graph: https only).
    os.environ.setdefault("SANDBOX_ALLOW_HTTP_NOTIFICATIONS", "1")
    # SIGTERM (a service manager, `kill`, a closed terminal's job control) stops like Ctrl-C: the children
    # are stopped in the finally below instead of being left holding their ports.
    signal.signal(signal.SIGTERM, _interrupt)
    persist = os.environ.get("PERSIST", "").lower() in ("1", "true", "yes")
    location = os.environ.get("AZURITE_LOCATION") or str(ROOT / ".devstack" / "azurite")
    print(f"devstack: starting Azurite (Table + Queue storage{', kept in ' + location if persist else ''})...",
          flush=True)
    try:
        az = Azurite(blob_port=storage_ports[0], queue_port=storage_ports[1], table_port=storage_ports[2],
                     in_memory=not persist, location=location).start()
    except DevstackError as e:
        print(f"devstack: {e}", file=sys.stderr)
        return 1
    os.environ["AzureWebJobsStorage"] = az.connection_string
    from devstack.sandbox import SandboxServer

    print("devstack: starting the Microsoft sandbox (HTTPS)...", flush=True)
    redirects = (f"http://localhost:{a.port}/api/connect/microsoft/callback",
                 f"http://127.0.0.1:{a.port}/api/connect/microsoft/callback")
    sandbox = SandboxServer(port=a.sandbox_port, client_id=os.environ["MS_CLIENT_ID"],
                            client_secret=os.environ.get("MS_CLIENT_SECRET") or "", redirect_uris=redirects).start()
    from devstack.host import DevHost, demo_static, load_app

    try:
        app = load_app()
    except Exception as e:
        print(f"devstack: cannot load function_app: {e}", file=sys.stderr)
        sandbox.stop()
        az.stop()
        return 1
    static = demo_static()
    host = DevHost(app, port=a.port, static=static).start()
    from shared.auth import issue_dev_token
    from shared.config import get_settings

    token = issue_dev_token(get_settings(), "dev-user")
    kept = f"kept in {location}" if persist else "in memory; PERSIST=1 make dev keeps it"
    print(f"""
Outlook connector is running locally ({time.monotonic() - t0:.1f} s).
  API          {host.url}/api/health
  Demo page    {f"http://localhost:{a.port}/demo/" if static else "(off: DEMO_ENABLED=false)"}
  Sandbox      {sandbox.url}   (test users: adele@contoso.onmicrosoft.com, pat@outlook.com, ...)
  Storage      Azurite on 127.0.0.1:{storage_ports[0]}-{storage_ports[2]} ({kept})
Next:
  1. open the demo page and connect a mailbox (the sandbox signs you in; no Azure account needed), or
  2. call the API with the development caller token (sub=dev-user, 12 h):
       export TOKEN={token}
       curl -H "Authorization: Bearer $TOKEN" {host.url}/api/accounts
     (a token for another owner: .venv/bin/python -m devstack token OWNER)
Press Ctrl-C to stop.""", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("devstack: stopping", flush=True)
    finally:
        host.stop()
        sandbox.stop()
        az.stop()
    return 0
