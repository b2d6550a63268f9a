"""``python -m devstack up``: Azurite + sandbox + dev host, with local settings seeded.

Settings come from the environment, then ``local.settings.json`` (created from
``local.settings.json.example`` on first run, with a fresh random token key), like ``func start``.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
import time

from devstack.azurite import ROOT, Azurite, DevstackError, port_in_use

SETTINGS_FILE = ROOT / "local.settings.json"
EXAMPLE_FILE = ROOT / "local.settings.json.example"


def seed_local_settings() -> dict[str, str]:
    if not SETTINGS_FILE.exists():
        doc = json.loads(EXAMPLE_FILE.read_text())
        key = base64.b64encode(secrets.token_bytes(32)).decode()
        doc["Values"]["TOKEN_ENCRYPTION_KEYS"] = json.dumps({"active": "local1", "keys": {"local1": key}})
        doc["Values"]["AUTH_HS256_SECRET"] = secrets.token_urlsafe(32)
        SETTINGS_FILE.write_text(json.dumps(doc, indent=2) + "\n")
        os.chmod(SETTINGS_FILE, 0o600)
        print(f"devstack: created {SETTINGS_FILE.name} from the example (fresh token key)", flush=True)
    values: dict[str, str] = json.loads(SETTINGS_FILE.read_text()).get("Values", {})
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


def main(argv: list[str] | None = None) -> int:
    import argparse
    import logging

    p = argparse.ArgumentParser(prog="python -m devstack up")
    p.add_argument("--port", type=int, default=7071, help="dev host port (7071, like Core Tools)")
    p.add_argument("--sandbox-port", type=int, default=int(os.environ.get("SANDBOX_PORT", 8443)))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    t0 = time.monotonic()
    from devstack.certs import ensure_certs

    certs = ensure_certs()
    values = seed_local_settings()
    os.environ.setdefault("DEMO_ENABLED", "true")  # the local stack shows the demo client unless told not to
    apply_settings(values)
    for port, what in ((a.port, "dev host"), (a.sandbox_port, "sandbox")):
        if port_in_use(port):
            print(f"devstack: port {port} ({what}) is already in use. Stop the other process or pass "
                  f"{'--port' if what == 'dev host' else '--sandbox-port'}.", file=sys.stderr)
            return 1
    os.environ["MS_AUTHORITY_HOST"] = f"https://localhost:{a.sandbox_port}"
    os.environ["GRAPH_BASE_URL"] = f"https://localhost:{a.sandbox_port}/v1.0"
    os.environ["MS_CA_BUNDLE"] = str(certs.ca_cert)
    os.environ["PUBLIC_BASE_URL"] = f"http://localhost:{a.port}"
    print("devstack: starting Azurite (Table + Queue storage)...", flush=True)
    try:
        az = Azurite(blob_port=10000, queue_port=10001, table_port=10002).start()
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
    print(f"""
Outlook connector is running locally ({time.monotonic() - t0:.1f} s).
  API          {host.url}/api/health
  Demo page    {f"http://localhost:{a.port}/demo/" if static else "(off: DEMO_ENABLED=false)"}
  Sandbox      {sandbox.url}   (test users: adele@contoso.onmicrosoft.com, pat@outlook.com, ...)
  Storage      Azurite on 127.0.0.1:10000-10002 (in memory)
Development caller token (sub=dev-user, 12 h):
  {token}
Try:  curl -H "Authorization: Bearer $TOKEN" {host.url}/api/accounts
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
