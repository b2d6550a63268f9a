"""A local stack for benchmarks: Azurite + the sandbox in its own process + an in-process Connector."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import platform
import secrets
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.md"
CLIENT_ID = "5a1b0c3d-0000-4000-8000-00000000c0de"
CLIENT_SECRET = "sandbox-client-secret-not-a-real-secret"
PUBLIC = "http://127.0.0.1:7999"


class Stack:
    def __init__(self) -> None:
        from devstack.azurite import Azurite, free_port
        from devstack.certs import ensure_certs
        from devstack.process import ServerProcess

        self.ca = str(ensure_certs().ca_cert)
        self.azurite = Azurite().start()
        self.sandbox_port = free_port()
        env = dict(os.environ, MS_CLIENT_ID=CLIENT_ID, MS_CLIENT_SECRET=CLIENT_SECRET,
                   SANDBOX_REDIRECT_URIS=f"{PUBLIC}/api/connect/microsoft/callback")
        self.url = f"https://localhost:{self.sandbox_port}"
        self.sandbox = ServerProcess(["devstack.sandbox", "--port", str(self.sandbox_port), "--quiet"], env=env,
                                     log_path=ROOT / "bench" / ".out" / "sandbox.log",
                                     health_url=f"{self.url}/_sandbox/health", verify=self.ca)
        try:
            self.sandbox.wait_healthy(30)
        except BaseException:
            self.azurite.stop()
            raise
        from devstack.sandbox import SandboxControl

        self.control = SandboxControl(self.url, verify=self.ca)
        self.env = {
            "MS_CLIENT_ID": CLIENT_ID, "MS_CLIENT_SECRET": CLIENT_SECRET, "MS_AUTHORITY_HOST": self.url,
            "GRAPH_BASE_URL": self.url + "/v1.0", "MS_CA_BUNDLE": self.ca, "PUBLIC_BASE_URL": PUBLIC,
            "AzureWebJobsStorage": self.azurite.connection_string, "AUTH_ISSUER": "https://bench",
            "AUTH_AUDIENCE": "bench", "AUTH_HS256_SECRET": secrets.token_urlsafe(32),
            "TOKEN_ENCRYPTION_KEYS": json.dumps({"active": "b1", "keys": {
                "b1": base64.b64encode(secrets.token_bytes(32)).decode()}}),
        }

    def connector(self) -> Any:
        from shared.config import load_settings
        from shared.service import Connector

        return Connector(load_settings(self.env))

    def connect(self, c: Any, owner: str, user: str) -> str:
        start = c.connect.start(owner, return_url=None, login_hint=user)
        s = requests.Session()
        s.trust_env = False
        s.verify = self.ca
        from devstack.sandbox.client import redirect_fields

        out = c.connect.complete(redirect_fields(s.get(start["authUrl"], allow_redirects=False, timeout=30)))
        assert out.status == "connected", out
        return str(out.account_id)

    def stop(self) -> None:
        self.sandbox.stop()
        self.azurite.stop()


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}")


#: Set by ``python -m bench --write``: only then do benchmarks rewrite bench/results.md (a tracked file).
WRITE = [False]


def write_section(name: str, body: str) -> None:
    """Replace (or add) the section ``## name`` of results.md, when asked (``--write``); else print it."""
    if not WRITE[0]:
        print(f"\n## {name}\n\n{body.strip()}\n(not written: pass --write to update bench/results.md)", flush=True)
        return
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nMeasured by `python -m bench`.\n"
    marker = f"\n## {name}\n"
    section = f"{marker}\n{body.strip()}\n"
    if marker in text:
        head, _, rest = text.partition(marker)
        nxt = rest.find("\n## ")
        text = head + section + (rest[nxt:] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n" + section
    RESULTS.write_text(text)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


_FUNCTIONS: dict[str, Any] = {}


def app_function(name: str) -> Any:
    """The user function ``name`` of ``function_app.app``, indexed once per process: azure-functions refuses a
    second ``get_functions()`` on one app (every name would then look registered twice)."""
    if not _FUNCTIONS:
        from function_app import app

        _FUNCTIONS.update({str(f.get_function_name()): f.get_user_function() for f in app.get_functions()})
    return _FUNCTIONS[name]
