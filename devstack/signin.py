"""Connecting a sandbox mailbox without a browser: ``python -m devstack connect adele@contoso.onmicrosoft.com``.

It does what a browser does in the connect flow: ``GET /api/connect/microsoft`` with a development caller
token, opens the ``authUrl`` at the sandbox (test users sign in at once), and posts Entra's ``form_post``
answer to the callback; it prints the account id. Local stack only (the sandbox's test users).
"""

from __future__ import annotations

import argparse
import os
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import requests

ROOT = Path(__file__).resolve().parent.parent


class FormPost:
    """What Entra's ``response_mode=form_post`` page makes the browser do: POST its hidden fields."""

    def __init__(self, action: str, fields: dict[str, str]) -> None:
        self.action = action
        self.fields = fields

    def submit(self, http: requests.Session) -> requests.Response:
        return http.post(self.action, data=self.fields, allow_redirects=False, timeout=60)


def read_form_post(resp: requests.Response) -> FormPost:
    """Parse the auto-submitting form of a form_post response (one <form>, hidden <input>s)."""
    found: dict[str, object] = {"action": None, "method": None}
    fields: dict[str, str] = {}

    class Parser(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            a = {k: v or "" for k, v in attrs}
            if tag == "form" and found["action"] is None:
                found["action"], found["method"] = a.get("action"), a.get("method", "").lower()
            elif tag == "input" and a.get("type") == "hidden":
                fields[a["name"]] = a.get("value", "")

    if resp.status_code != 200 or "<form" not in resp.text:
        raise ValueError(f"expected Entra's form_post page, got HTTP {resp.status_code}")
    Parser().feed(resp.text)
    if found["method"] != "post" or not found["action"]:
        raise ValueError("the form_post page has no POST form")
    return FormPost(str(found["action"]), fields)


def connect(api: str, token: str, upn: str, *, ca_bundle: str, return_url: str) -> dict[str, str]:
    """Run the connect flow for a sandbox test user; the callback's redirect parameters (accountId, status…)."""
    app = requests.Session()
    app.trust_env = False
    start = app.get(f"{api}/api/connect/microsoft", params={"loginHint": upn, "returnUrl": return_url},
                    headers={"Authorization": f"Bearer {token}"}, timeout=30)
    start.raise_for_status()
    browser = requests.Session()
    browser.trust_env = False
    browser.verify = ca_bundle
    form = read_form_post(browser.get(start.json()["authUrl"], allow_redirects=False, timeout=30))
    answer = form.submit(app)
    if answer.status_code != 302:
        raise ValueError(f"the callback answered HTTP {answer.status_code}")
    return {k: v[0] for k, v in parse_qs(urlsplit(answer.headers["Location"]).query).items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devstack connect",
                                description="Connect a sandbox test mailbox without a browser; print its account id.")
    p.add_argument("upn", help="a sandbox test user, e.g. adele@contoso.onmicrosoft.com")
    p.add_argument("--sub", default="dev-user", help="the caller (owner) the account belongs to (dev-user)")
    p.add_argument("--api", default=os.environ.get("API", f"http://localhost:{os.environ.get('DEVHOST_PORT', '7071')}"),
                   help="the dev host (API, or http://localhost:DEVHOST_PORT)")
    p.add_argument("--cacert", default=os.environ.get("SANDBOX_CA") or str(ROOT / ".devstack" / "certs" / "ca.pem"),
                   help="the sandbox's CA (SANDBOX_CA, or .devstack/certs/ca.pem)")
    a = p.parse_args(argv)
    from devstack.up import apply_settings, seed_local_settings
    from shared.auth import issue_dev_token
    from shared.config import load_settings

    apply_settings(seed_local_settings())
    token = os.environ.get("TOKEN") or issue_dev_token(load_settings(), a.sub)
    try:
        result = connect(a.api.rstrip("/"), token, a.upn, ca_bundle=a.cacert, return_url=f"{a.api.rstrip('/')}/demo/")
    except (requests.RequestException, ValueError, KeyError) as e:
        print(f"devstack connect: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if result.get("status") != "connected":
        print(f"devstack connect: {result.get('code')}: {result.get('message')}", file=sys.stderr)
        return 1
    print(result["accountId"])
    return 0
