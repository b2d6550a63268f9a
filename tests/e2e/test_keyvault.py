"""A host configured for Azure: secrets from Key Vault through a managed identity (real SDK,
real azure-identity, a Key Vault double speaking the REST API with challenge auth), including a
client-secret rotation picked up on AADSTS7000215 without a restart."""

from __future__ import annotations

import base64
import json
import secrets
from typing import Any

import pytest

from devstack.process import start_host
from tests.conftest import ARTIFACTS, HTTP_ONLY, Host, connect, free_port


@pytest.fixture(scope="module")
def vault() -> Any:
    from devstack.keyvault import KeyVaultDouble

    kv = KeyVaultDouble().start()
    yield kv
    kv.stop()


@pytest.fixture(scope="module")
def vault_host(host: Host, vault: Any, control: Any) -> Any:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # One Entra app, two redirect URIs: the session host keeps working beside this one.
    control.register_client(host.env["MS_CLIENT_ID"], host.env["MS_CLIENT_SECRET"],
                            [f"{host.url}/api/connect/microsoft/callback", f"{base}/api/connect/microsoft/callback"])
    ring = {"active": "kv1", "keys": {"kv1": base64.b64encode(secrets.token_bytes(32)).decode()}}
    vault.set_secret("token-encryption-keys", json.dumps(ring))
    vault.set_secret("ms-client-secret", "an-old-secret-that-entra-no-longer-accepts")
    env = {k: v for k, v in host.env.items() if k not in ("MS_CLIENT_SECRET", "TOKEN_ENCRYPTION_KEYS")}
    env.update(vault.identity_env())
    # No cache: a rejected secret is otherwise re-read at most every 30 s, and this test rotates it within
    # seconds (the throttle itself is tests/shared/test_secret_store.py's).
    env.update({"KEY_VAULT_URL": vault.url, "PUBLIC_BASE_URL": base, "ALLOWED_RETURN_URLS":
                "https://app.example.com/connected", "KEY_VAULT_CACHE_SECONDS": "0"})
    env.update(HTTP_ONLY)  # on the session's queues: its workers would take (and strand) other tests' messages
    log_path = ARTIFACTS / "host-keyvault.log"
    proc = start_host(env, port, log_path)
    try:
        proc.wait_healthy(60, ok=(200, 503))  # 503: the vault's client secret is stale, on purpose
        yield Host(base, env, log_path, proc.proc)
    finally:
        proc.stop()


def test_secrets_come_from_key_vault_and_rotation_is_picked_up(vault_host: Host, vault: Any,
                                                               browser_session: Any) -> None:
    # The vault holds a stale client secret: Entra says AADSTS7000215, the host re-reads the vault
    # once (same stale value), and reports an operator error — not a user error.
    out = connect(vault_host, browser_session, sub="owner-kv", login_hint="adele@contoso.onmicrosoft.com")
    assert out["result"]["status"] == "error" and out["result"]["code"] == "invalid_client_secret", out["result"]
    health = vault_host.http.get(vault_host.url + "/api/health", timeout=30).json()
    assert health["checks"]["appRegistration"]["ok"] is False
    assert health["checks"]["clientSecret"]["ok"] is True  # the vault is reachable; the value is wrong
    reads_before = vault.reads("ms-client-secret")
    # The operator rotates the secret in Key Vault. No restart: the next AADSTS7000215 re-reads it.
    vault.set_secret("ms-client-secret", vault_host_secret(vault_host))
    out = connect(vault_host, browser_session, sub="owner-kv", login_hint="adele@contoso.onmicrosoft.com")
    assert out["result"]["status"] == "connected", out["result"]
    assert vault.reads("ms-client-secret") > reads_before
    assert vault_host.http.get(vault_host.url + "/api/health", timeout=30).status_code == 200
    # Tokens are sealed with the key ring from the vault.
    from azure.data.tables import TableClient

    t = TableClient.from_connection_string(vault_host.env["AzureWebJobsStorage"], "accounts")
    row = next(e for e in t.list_entities() if e["RowKey"] == out["result"]["accountId"])
    assert row["tokensKid"] == "kv1"
    # The challenge flow really ran: unauthenticated first, then with a managed-identity token.
    auths = [r.auth for r in vault.requests]
    assert "none" in auths and "valid" in auths and vault.token_requests


def vault_host_secret(h: Host) -> str:
    from devstack.sandbox import DEFAULT_CLIENT_SECRET

    return DEFAULT_CLIENT_SECRET
