"""Sandbox fixtures: one private sandbox per test session (separate from the root ``sandbox`` fixture so
resets here never disturb the end-to-end tests)."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from devstack.sandbox import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, SandboxControl, SandboxServer


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[SandboxServer]:
    server = SandboxServer(port=0).start()
    yield server
    server.stop()


class _GraphIdsControl(SandboxControl):
    """The sandbox's own tests call Graph without ``Prefer: IdType="ImmutableId"`` (unless a test says so):
    seeded messages are named by the ids such a caller sees."""

    def seed_messages(self, user: str, messages: list[dict[str, Any]] | int, folder: str = "inbox", *,
                      immutable: bool = False) -> list[str]:
        return super().seed_messages(user, messages, folder, immutable=immutable)


@pytest.fixture(scope="session")
def sandbox_control(sandbox_server: SandboxServer) -> Iterator[SandboxControl]:
    ctl = _GraphIdsControl(sandbox_server.url, verify=sandbox_server.ca_path)
    yield ctl
    ctl.close()


@pytest.fixture()
def ctl(sandbox_control: SandboxControl) -> SandboxControl:
    """A freshly reset sandbox for each test."""
    sandbox_control.reset(clients=True)
    return sandbox_control


@pytest.fixture(scope="session")
def http(sandbox_server: SandboxServer) -> Iterator[requests.Session]:
    """A session that trusts only the sandbox CA and ignores REQUESTS_CA_BUNDLE / proxies."""
    s = requests.Session()
    s.trust_env = False
    s.verify = sandbox_server.ca_path
    yield s
    s.close()


REDIRECT_URI = "http://localhost:7071/api/connect/microsoft/callback"
DEFAULT_SCOPE = "User.Read Mail.ReadWrite Mail.Send offline_access openid profile"


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


class SandboxFlows:
    """Plain-HTTP OAuth flows against the sandbox (what a browser + a token client do)."""

    redirect_uri = REDIRECT_URI

    def __init__(self, server: SandboxServer, http: requests.Session) -> None:
        self.url = server.url
        self.http = http

    def authorize(self, upn: str, *, tenant: str = "common", scope: str = DEFAULT_SCOPE,
                  **extra: str) -> tuple[requests.Response, str]:
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        params = {
            "client_id": DEFAULT_CLIENT_ID, "response_type": "code", "redirect_uri": REDIRECT_URI, "scope": scope,
            "state": secrets.token_urlsafe(16), "code_challenge": challenge, "code_challenge_method": "S256",
            "login_hint": upn, **extra,
        }
        r = self.http.get(f"{self.url}/{tenant}/oauth2/v2.0/authorize", params=params, allow_redirects=False,
                          timeout=10)
        return r, verifier

    def sign_in(self, upn: str, *, tenant: str = "common", scope: str = DEFAULT_SCOPE) -> dict[str, Any]:
        """Authorization code + PKCE with the login_hint auto-consent path; returns the token response."""
        r, verifier = self.authorize(upn, tenant=tenant, scope=scope)
        assert r.status_code == 302, r.text[:300]
        q = query_of(r.headers["Location"])
        assert "code" in q, q
        tok = self.http.post(f"{self.url}/{tenant}/oauth2/v2.0/token", data={
            "client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET,
            "grant_type": "authorization_code", "code": q["code"], "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier, "scope": scope,
        }, timeout=10)
        assert tok.status_code == 200, tok.text
        return tok.json()


@pytest.fixture()
def flows(sandbox_server: SandboxServer, http: requests.Session) -> SandboxFlows:
    return SandboxFlows(sandbox_server, http)
