"""Secretless sign-in end to end: a host with MS_CLIENT_CREDENTIAL=certificate (a Key Vault certificate) and
one with MS_CLIENT_CREDENTIAL=managed_identity (the identity's token as a federated credential), each against
an app registration that has no client secret at all. Real MSAL in the host, real azure-identity, the Key
Vault double, a private Microsoft sandbox per kind (its clock is moved here) and Azurite.

For each kind: sign-in, refresh and send work; a wrong certificate / a missing federated credential gives
the mapped AADSTS error with a hint; a rotated certificate and an expired assertion are re-read once. A new
certificate version Entra does not know yet (Key Vault auto-renewal) does not stop anything: the previous
version is used, health says what to do, and the newest is used once it is on the app registration."""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from devstack.certs import new_client_certificate
from devstack.keyvault import KeyVaultDouble
from devstack.process import start_host
from devstack.sandbox import SandboxControl, SandboxServer
from tests.conftest import ARTIFACTS, Host, connect, free_port

USER = "adele@contoso.onmicrosoft.com"
OWNER = "owner-secretless"


@pytest.fixture(scope="module")
def vault() -> Iterator[KeyVaultDouble]:
    from azure.keyvault.secrets._shared import http_challenge_cache

    http_challenge_cache.clear()
    kv = KeyVaultDouble().start()
    ring = {"active": "kv1", "keys": {"kv1": base64.b64encode(secrets.token_bytes(32)).decode()}}
    kv.set_secret("token-encryption-keys", json.dumps(ring))
    yield kv
    kv.stop()


def _private_sandbox() -> tuple[SandboxServer, SandboxControl]:
    sb = SandboxServer(port=0).start()
    return sb, SandboxControl(sb.url, verify=sb.ca_path)


@pytest.fixture(scope="module")
def azurite() -> Iterator[Any]:
    """A private Azurite. These hosts are configured unlike the session host (their own sandboxes, no
    webhooks, no notifications): sharing its queues, each would run the other's jobs with the wrong
    configuration (and a private host would consume the session's webhook deliveries)."""
    from devstack.azurite import Azurite

    az = Azurite().start()
    yield az
    az.stop()


def _host_env(azurite: Any, sb: SandboxServer, vault: KeyVaultDouble, base: str, **extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MS_", "AUTH_", "GRAPH_", "WEBHOOK_"))}
    env.update(vault.identity_env())
    env.update({
        "MS_CLIENT_ID": str(uuid.uuid4()), "MS_AUTHORITY_HOST": sb.url, "GRAPH_BASE_URL": sb.url + "/v1.0",
        "MS_CA_BUNDLE": sb.ca_path, "PUBLIC_BASE_URL": base, "AzureWebJobsStorage": azurite.connection_string,
        "KEY_VAULT_URL": vault.url, "AZURE_CLIENT_ID": vault.identity_client_id,
        "AUTH_ISSUER": "https://issuer.test", "AUTH_AUDIENCE": "outlook-connector-tests",
        "AUTH_HS256_SECRET": secrets.token_urlsafe(32), "ALLOWED_RETURN_URLS": "https://app.example.com/connected",
        "REFRESH_SCHEDULE": "0 0 0 1 1 *", "CLEANUP_SCHEDULE": "0 0 0 1 1 *", "PYTHONUNBUFFERED": "1",
        "NOTIFICATIONS_ENABLED": "false",  # the private sandboxes are not told to call loopback http
        "FORCED_REFRESH_COALESCE_SECONDS": "0",  # each POST …/refresh presents the credential just rotated
    })
    env.update(extra)
    return env


def _start(env: dict[str, str], port: int, name: str) -> tuple[Any, Host]:
    log_path = ARTIFACTS / f"host-{name}.log"
    proc = start_host(env, port, log_path)
    proc.wait_healthy(60, ok=(200, 503))
    return proc, Host(f"http://127.0.0.1:{port}", env, log_path, proc.proc)


CERT_A = new_client_certificate("cert-a")


@pytest.fixture(scope="module")
def cert_stack(azurite: Any, vault: KeyVaultDouble) -> Iterator[tuple[Host, SandboxControl]]:
    vault.set_certificate("connector-cert", *CERT_A)
    sb, ctl = _private_sandbox()
    port = free_port()
    env = _host_env(azurite, sb, vault, f"http://127.0.0.1:{port}", MS_CLIENT_CREDENTIAL="certificate",
                    MS_CLIENT_CERT_NAME="connector-cert")
    ctl.register_client(env["MS_CLIENT_ID"], None, [f"http://127.0.0.1:{port}/api/connect/microsoft/callback"])
    proc, host = _start(env, port, "certificate")
    try:
        yield host, ctl
    finally:
        proc.stop()
        ctl.close()
        sb.stop()


@pytest.fixture(scope="module")
def mi_stack(azurite: Any, vault: KeyVaultDouble) -> Iterator[tuple[Host, SandboxControl]]:
    sb, ctl = _private_sandbox()
    port = free_port()
    env = _host_env(azurite, sb, vault, f"http://127.0.0.1:{port}", MS_CLIENT_CREDENTIAL="managed_identity",
                    MS_TENANT="organizations")
    ctl.register_client(env["MS_CLIENT_ID"], None, [f"http://127.0.0.1:{port}/api/connect/microsoft/callback"])
    # The platform's identity endpoint asks "Entra" (this sandbox) for api://AzureADTokenExchange tokens;
    # 600 s tokens so moving the sandbox clock expires one the app still holds.
    vault.token_service = lambda resource, client_id: ctl.managed_identity_token(client_id, resource, 600)
    proc, host = _start(env, port, "managed-identity")
    try:
        yield host, ctl
    finally:
        proc.stop()
        vault.token_service = None
        ctl.close()
        sb.stop()


@pytest.fixture(scope="module")
def rotation_stack(azurite: Any, vault: KeyVaultDouble) -> Iterator[tuple[Host, SandboxControl]]:
    vault.set_certificate("rotating-cert", *CERT_A)
    sb, ctl = _private_sandbox()
    port = free_port()
    # No cache and no wait before retrying the newest version: the host reads the vault on every token call and
    # tries the newest first each time, so the test needs no clock (the 15-minute schedule is a unit test's).
    env = _host_env(azurite, sb, vault, f"http://127.0.0.1:{port}", MS_CLIENT_CREDENTIAL="certificate",
                    MS_CLIENT_CERT_NAME="rotating-cert", KEY_VAULT_CACHE_SECONDS="0", MS_CLIENT_CERT_RETRY_SECONDS="0")
    ctl.register_client(env["MS_CLIENT_ID"], None, [f"http://127.0.0.1:{port}/api/connect/microsoft/callback"])
    ctl.add_certificate(env["MS_CLIENT_ID"], CERT_A[1])
    proc, host = _start(env, port, "certificate-rotation")
    try:
        yield host, ctl
    finally:
        proc.stop()
        ctl.close()
        sb.stop()


def _sign_in_refresh_send(host: Host, browser: Any, ctl: SandboxControl) -> str:
    out = connect(host, browser, sub=OWNER, login_hint=USER)
    assert out["result"]["status"] == "connected", out["result"]
    account = out["result"]["accountId"]
    r = host.api("POST", f"/api/accounts/{account}/refresh", sub=OWNER)
    assert r.status_code == 200, r.text
    tracking = uuid.uuid4().hex
    r = host.api("POST", f"/api/accounts/{account}/send", sub=OWNER,
                 json={"to": ["someone@example.com"], "subject": f"secretless {tracking}", "bodyText": "hi"})
    assert r.status_code in (200, 202), r.text
    assert any(tracking in json.dumps(s) for s in ctl.sent(USER))
    return str(account)


def _health(host: Host) -> dict[str, Any]:
    return dict(host.http.get(host.url + "/api/health", timeout=30).json())


def test_certificate_sign_in_refresh_send_and_rotation(cert_stack: tuple[Host, SandboxControl], vault: KeyVaultDouble,
                                                       browser_session: Any) -> None:
    host, ctl = cert_stack
    client_id = host.env["MS_CLIENT_ID"]
    key_a, cert_a = CERT_A
    # Not uploaded to the app registration yet: AADSTS700027, an operator error with a hint.
    out = connect(host, browser_session, sub=OWNER, login_hint=USER)
    assert out["result"]["status"] == "error" and out["result"]["code"] == "invalid_client_certificate", out
    assert "MS_CLIENT_CERT_NAME" in out["result"].get("hint", "") or "Certificates" in out["result"].get("hint", "")
    health = _health(host)
    assert health["checks"]["appRegistration"]["code"] == "invalid_client_certificate"
    assert health["checks"]["clientSecret"]["ok"] is True  # the certificate is readable; Entra refuses it

    ctl.add_certificate(client_id, cert_a)  # the operator uploads it
    account = _sign_in_refresh_send(host, browser_session, ctl)
    assert _health(host)["checks"]["appRegistration"]["ok"] is True
    counters = ctl.counters()
    assert counters["client_auth_by_method"].get("secret", 0) == 0 and counters["client_auth_by_method"]["certificate"]

    # Rotation: a new certificate in Key Vault and Entra; the old one expires. The next token call gets
    # AADSTS700027 with the cached certificate, re-reads the vault once and succeeds. No restart.
    key_b, cert_b = new_client_certificate("cert-b")
    ctl.add_certificate(client_id, cert_b)
    vault.set_certificate("connector-cert", key_b, cert_b, pkcs12=True)
    ctl.add_certificate(client_id, cert_a, valid=False)
    reads = vault.reads("connector-cert")
    r = host.api("POST", f"/api/accounts/{account}/refresh", sub=OWNER)
    assert r.status_code == 200, r.text
    assert vault.reads("connector-cert") == reads + 1
    assert ctl.counters()["token_errors"].get("700027", 0) >= 2
    for secret in (key_a, key_b):
        assert secret.splitlines()[1] not in host.log_text()


def test_managed_identity_sign_in_refresh_send_and_stale_assertion(mi_stack: tuple[Host, SandboxControl],
                                                                   vault: KeyVaultDouble,
                                                                   browser_session: Any) -> None:
    host, ctl = mi_stack
    mi = ctl.add_managed_identity(vault.identity_client_id)
    # No federated credential on the app yet: AADSTS70021, mapped with the fix in the hint.
    out = connect(host, browser_session, sub=OWNER, login_hint=USER)
    assert out["result"]["status"] == "error" and out["result"]["code"] == "no_federated_credential", out
    assert "api://AzureADTokenExchange" in out["result"].get("hint", "")

    ctl.add_federated_credential(host.env["MS_CLIENT_ID"], issuer=mi["issuer"], subject=mi["principal_id"])
    account = _sign_in_refresh_send(host, browser_session, ctl)
    by_method = ctl.counters()["client_auth_by_method"]
    assert by_method["federated"] >= 3 and by_method.get("secret", 0) == 0

    # The identity's token the host holds expires (sandbox clock +1000 s, token life 600 s): AADSTS700024,
    # one new token from the identity endpoint, and the refresh succeeds.
    before = vault.token_requests
    ctl.advance_clock(1000)
    r = host.api("POST", f"/api/accounts/{account}/refresh", sub=OWNER)
    assert r.status_code == 200, r.text
    assert ctl.counters()["token_errors"].get("700024") == 1 and vault.token_requests > before
    assert _health(host)["checks"]["appRegistration"]["ok"] is True
    log = host.log_text()
    for token in vault.issued_tokens() + ctl.issued_secrets():
        assert token not in log


def test_new_certificate_version_unknown_to_entra_falls_back_to_the_previous_one(
        rotation_stack: tuple[Host, SandboxControl], vault: KeyVaultDouble, browser_session: Any) -> None:
    host, ctl = rotation_stack
    owner = "owner-cert-rotation"
    out = connect(host, browser_session, sub=owner, login_hint=USER)  # certificate A: registered, used
    assert out["result"]["status"] == "connected", out["result"]
    account = out["result"]["accountId"]
    assert ctl.counters()["token_errors"].get("700027", 0) == 0

    # Key Vault renews the certificate: version B, a new key pair Entra has never seen.
    key_b, cert_b = new_client_certificate("cert-b-renewed")
    vault.set_certificate("rotating-cert", key_b, cert_b, pkcs12=True)
    r = host.api("POST", f"/api/accounts/{account}/refresh", sub=owner)
    assert r.status_code == 200, r.text  # B rejected (AADSTS700027), A presented instead
    assert ctl.counters()["token_errors"].get("700027", 0) == 1
    out = connect(host, browser_session, sub=owner, login_hint=USER)  # sign-in keeps working too
    assert out["result"]["status"] == "connected", out["result"]
    health = _health(host)
    check = health["checks"]["appRegistration"]
    assert health["status"] == "ok" and check["ok"] is True and check["warning"] == "certificate_not_registered"
    assert "app registration" in check["hint"] and "rotating-cert" in check["detail"]
    assert "the app registration does not have it yet" in host.log_text()

    # The operator uploads B; the next try of the newest uses it, without a restart.
    ctl.add_certificate(host.env["MS_CLIENT_ID"], cert_b)
    errors = ctl.counters()["token_errors"].get("700027", 0)
    r = host.api("POST", f"/api/accounts/{account}/refresh", sub=owner)
    assert r.status_code == 200, r.text
    assert ctl.counters()["token_errors"].get("700027", 0) == errors  # B accepted at the first presentation
    assert "warning" not in _health(host)["checks"]["appRegistration"]
    log = host.log_text()
    for key in (CERT_A[0], key_b):
        assert key.splitlines()[1] not in log
