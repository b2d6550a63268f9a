"""shared.secret_store against devstack.keyvault with the real ManagedIdentityCredential and SecretClient."""

from __future__ import annotations

import base64
import json
import logging
import os
import threading

import certifi
import pytest
from azure.core.credentials import AccessToken

from devstack.keyvault import KeyVaultDouble
from shared import secret_store as secret_store_module
from shared.app_credential import AppCredential
from shared.config import load_settings
from shared.crypto import KeyRing, account_aad
from shared.errors import to_problem
from shared.secret_store import SecretStore, SecretUnavailableError

CLIENT_SECRET = "kv-client-secret~Value.0123456789abcdef"
KEY_1 = os.urandom(32)
KEY_2 = os.urandom(32)
KEY_RING_JSON = json.dumps(
    {"active": "k2", "keys": {"k1": base64.b64encode(KEY_1).decode(), "k2": base64.b64encode(KEY_2).decode()}}
)
SECRET_MATERIAL = (CLIENT_SECRET, base64.b64encode(KEY_1).decode(), base64.b64encode(KEY_2).decode())

BASE_ENV = {
    "MS_CLIENT_ID": "00000000-0000-0000-0000-000000000001",
    "PUBLIC_BASE_URL": "http://127.0.0.1:7071",
    "AzureWebJobsStorage": "UseDevelopmentStorage=true",
    "AUTH_ISSUER": "https://issuer.example",
    "AUTH_AUDIENCE": "connector",
    "AUTH_HS256_SECRET": "h" * 32,
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def vault(monkeypatch):
    from azure.keyvault.secrets._shared import http_challenge_cache

    # The SDK caches challenges per host:port process-wide; a reused ephemeral port must start fresh.
    http_challenge_cache.clear()
    double = KeyVaultDouble(port=0).start()
    for name in ("IDENTITY_SERVER_THUMBPRINT", "MSI_ENDPOINT", "MSI_SECRET", "AZURE_CLIENT_ID", "IMDS_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in double.identity_env().items():
        monkeypatch.setenv(name, value)
    # The environment's bundle lacks the dev CA: proves the SDK transport ignores it.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    double.set_secret("ms-client-secret", CLIENT_SECRET)
    double.set_secret("token-encryption-keys", KEY_RING_JSON)
    yield double
    double.stop()
    http_challenge_cache.clear()


def vault_settings(double: KeyVaultDouble, **overrides: str):
    env = dict(BASE_ENV, KEY_VAULT_URL=double.url, MS_CA_BUNDLE=double.ca_cert)
    env.update(overrides)
    return load_settings(env)


def assert_no_secret(text: str) -> None:
    for material in SECRET_MATERIAL:
        assert material not in text


def test_challenge_then_managed_identity_token_then_cached(vault):
    store = SecretStore(vault_settings(vault))  # default credential: ManagedIdentityCredential (App Service)
    assert store.client_secret() == CLIENT_SECRET
    assert store.client_secret() == CLIENT_SECRET
    assert vault.reads("ms-client-secret") == 1
    reqs = [r for r in vault.requests if r.path.startswith("/secrets/ms-client-secret")]
    # The SDK's challenge flow: first without a token (401 + WWW-Authenticate), then with the MSI token.
    assert [(r.auth, r.status) for r in reqs] == [("none", 401), ("valid", 200)]
    assert vault.token_requests == 1
    store.close()


def test_invalidate_client_secret_rereads_once(vault):
    store = SecretStore(vault_settings(vault), ttl_seconds=300)
    assert store.client_secret() == CLIENT_SECRET
    vault.set_secret("ms-client-secret", "rotated-secret")
    assert store.client_secret() == CLIENT_SECRET  # still cached
    store.invalidate_client_secret()
    assert store.client_secret() == "rotated-secret"
    assert store.client_secret() == "rotated-secret"
    assert vault.reads("ms-client-secret") == 2
    assert vault.token_requests == 1  # the identity token is reused
    assert not [r for r in vault.requests if r.auth == "none"][1:]  # challenge only once


def test_ttl_expiry_rereads_with_injected_clock(vault):
    clock = FakeClock()
    store = SecretStore(vault_settings(vault), ttl_seconds=300, clock=clock)
    store.client_secret()
    clock.now += 299
    store.client_secret()
    assert vault.reads("ms-client-secret") == 1
    clock.now += 2
    store.client_secret()
    assert vault.reads("ms-client-secret") == 2


def test_key_ring_from_vault(vault):
    clock = FakeClock()
    store = SecretStore(vault_settings(vault), clock=clock)
    ring = store.key_ring()
    assert isinstance(ring, KeyRing) and ring.active_kid == "k2" and ring.kids == ("k1", "k2")
    assert store.key_ring() is ring
    assert vault.reads("token-encryption-keys") == 1
    aad = account_aad("owner", "acct", "refresh_token")
    assert ring.open(KeyRing("k1", {"k1": KEY_1}).seal(b"rt", aad=aad), aad=aad) == b"rt"
    # rotation in the vault is picked up after invalidation
    vault.set_secret("token-encryption-keys", json.dumps({"active": "k1", "keys": {"k1": base64.b64encode(KEY_1).decode()}}))
    store.invalidate_key_ring()
    assert store.key_ring().active_kid == "k1"
    assert_no_secret(repr(ring) + repr(store))


def test_malformed_key_ring_in_vault(vault):
    vault.set_secret("token-encryption-keys", json.dumps({"active": "zz", "keys": {"k1": base64.b64encode(KEY_1).decode()}}))
    store = SecretStore(vault_settings(vault))
    with pytest.raises(SecretUnavailableError) as ei:
        store.key_ring()
    err = ei.value
    assert err.reason == "malformed" and "token-encryption-keys" in err.detail
    assert_no_secret(str(err) + repr(err) + str(err.hint))


def test_missing_secret_names_it_and_leaks_nothing(vault):
    vault.delete_secret("ms-client-secret")
    store = SecretStore(vault_settings(vault))
    assert store.key_ring().active_kid == "k2"  # the other secret is fine (and now cached)
    with pytest.raises(SecretUnavailableError) as ei:
        store.client_secret()
    err = ei.value
    assert (err.code, err.status, err.reason) == ("secret_unavailable", 503, "not_found")
    assert err.secret_name == "ms-client-secret" and err.vault == vault.url
    assert "ms-client-secret" in err.detail and "ms-client-secret" in err.hint and vault.url in err.hint
    problem = json.dumps(to_problem(err).body)
    assert "secret_unavailable" in problem
    assert_no_secret(problem + str(err) + repr(err))
    with pytest.raises(SecretUnavailableError):
        store.client_secret()
    # failures are cached briefly: no vault call storm
    assert vault.reads("ms-client-secret") == 1
    vault.set_secret("ms-client-secret", CLIENT_SECRET)
    store.invalidate_client_secret()
    store.client_secret()


def test_failure_cache_expires(vault):
    clock = FakeClock()
    vault.forbid("ms-client-secret")
    store = SecretStore(vault_settings(vault), clock=clock, error_ttl_seconds=5)
    for _ in range(3):
        with pytest.raises(SecretUnavailableError):
            store.client_secret()
    assert vault.reads("ms-client-secret") == 1
    vault.allow("ms-client-secret")
    clock.now += 6
    assert store.client_secret() == CLIENT_SECRET
    assert vault.reads("ms-client-secret") == 2


def test_forbidden_secret(vault):
    vault.forbid("ms-client-secret")
    store = SecretStore(vault_settings(vault))
    with pytest.raises(SecretUnavailableError) as ei:
        store.client_secret()
    err = ei.value
    assert err.reason == "forbidden" and err.status == 503
    assert "403" in err.detail and "ms-client-secret" in err.detail and "Key Vault Secrets User" in err.hint
    assert_no_secret(str(err) + repr(err) + str(err.hint))


def test_wrong_token_is_refused(vault):
    class BogusCredential:
        def get_token(self, *scopes, **kwargs):
            return AccessToken("not-issued-by-the-vault", 4_102_444_800)

    store = SecretStore(vault_settings(vault), credential=BogusCredential())
    with pytest.raises(SecretUnavailableError) as ei:
        store.client_secret()
    assert ei.value.reason == "unauthenticated"
    assert vault.reads("ms-client-secret") == 0
    assert {r.auth for r in vault.requests} == {"none", "invalid"}
    assert all(r.status == 401 for r in vault.requests)


def test_revoked_token_fails_then_recovers_with_new_credential(vault):
    store = SecretStore(vault_settings(vault))
    store.client_secret()
    vault.revoke_tokens()
    store.invalidate_client_secret()
    with pytest.raises(SecretUnavailableError):
        store.client_secret()  # the identity's cached token is no longer accepted
    fresh = SecretStore(vault_settings(vault))
    assert fresh.client_secret() == CLIENT_SECRET


def test_concurrent_cold_reads_hit_the_vault_once(vault):
    store = SecretStore(vault_settings(vault))
    barrier = threading.Barrier(16)
    results, errors = [], []

    def worker():
        barrier.wait()
        try:
            results.append(store.client_secret())
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and results == [CLIENT_SECRET] * 16
    assert vault.reads("ms-client-secret") == 1


def test_env_ca_bundle_is_not_trusted_by_the_sdk(vault, monkeypatch):
    # Without MS_CA_BUNDLE the dev CA is untrusted even though REQUESTS_CA_BUNDLE names it.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", vault.ca_cert)
    monkeypatch.setitem(secret_store_module.SDK_RETRY, "retry_total", 0)
    store = SecretStore(vault_settings(vault, MS_CA_BUNDLE=""))
    with pytest.raises(SecretUnavailableError) as ei:
        store.client_secret()
    assert ei.value.reason == "unreachable" and vault.url in ei.value.hint
    assert vault.requests == []


def test_unreachable_vault(vault, monkeypatch):
    monkeypatch.setitem(secret_store_module.SDK_RETRY, "retry_total", 0)
    settings = vault_settings(vault)
    vault.stop()
    store = SecretStore(settings)
    with pytest.raises(SecretUnavailableError) as ei:
        store.client_secret()
    assert ei.value.reason == "unreachable" and ei.value.secret_name == "ms-client-secret"


def test_no_identity_available(vault, monkeypatch):
    from azure.identity import CredentialUnavailableError

    class NoIdentity:
        def get_token(self, *scopes, **kwargs):
            raise CredentialUnavailableError(message="no managed identity endpoint")

    store = SecretStore(vault_settings(vault), credential=NoIdentity())
    with pytest.raises(SecretUnavailableError) as ei:
        store.client_secret()
    assert ei.value.reason == "no_identity" and "managed identity" in ei.value.hint


def test_injected_secret_client_factory(vault):
    calls = []

    class FakeSecret:
        value = "from-factory"

    class FakeClient:
        def get_secret(self, name):
            calls.append(name)
            return FakeSecret()

    store = SecretStore(vault_settings(vault), credential=object(), secret_client_factory=lambda url, cred: FakeClient())
    assert store.client_secret() == "from-factory"
    assert calls == ["ms-client-secret"] and vault.requests == []


def test_environment_path_without_vault(monkeypatch):
    for name in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER", "MSI_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(dict(BASE_ENV, MS_CLIENT_SECRET="env-secret", TOKEN_ENCRYPTION_KEYS=KEY_RING_JSON))

    def no_client(url, cred):  # pragma: no cover - must not be called
        raise AssertionError("no Key Vault without KEY_VAULT_URL")

    store = SecretStore(settings, secret_client_factory=no_client)
    assert store.client_secret() == "env-secret"
    ring = store.key_ring()
    assert ring.active_kid == "k2" and store.key_ring() is ring
    store.invalidate_client_secret()
    AppCredential(settings, vault=store).check()
    assert "env-secret" not in repr(store)


def test_no_secret_or_token_in_logs(vault, caplog):
    caplog.set_level(logging.DEBUG)
    store = SecretStore(vault_settings(vault))
    store.client_secret()
    store.key_ring()
    vault.forbid("ms-client-secret")
    store.invalidate_client_secret()
    with pytest.raises(SecretUnavailableError):
        store.client_secret()
    text = caplog.text
    assert_no_secret(text)
    for token in vault.issued_tokens():
        assert token not in text
    assert vault.msi_header not in text


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("https://127.0.0.1:8443", True),
        ("https://localhost:8443", True),
        ("https://[::1]:8443", True),
        ("https://myvault.vault.azure.net", False),
        ("https://localhost.evil.example", False),
    ],
)
def test_challenge_resource_check_is_only_relaxed_for_loopback(url, loopback):
    # verify_challenge_resource=False is passed only for these (see SecretStore._default_factory).
    assert secret_store_module._is_loopback(url) is loopback


def test_double_lists_versions_with_paging_and_serves_each_version(vault):
    # The real SecretClient against the double: GET /secrets/{name}/versions with nextLink paging, GET of one
    # version, a disabled version refused as Key Vault refuses it, certificate-backed secrets' attributes.
    from azure.core.exceptions import HttpResponseError
    from azure.identity import ManagedIdentityCredential
    from azure.keyvault.secrets import SecretClient

    from devstack.certs import new_client_certificate

    ids = [vault.set_secret("paged", f"value-{i}") for i in range(5)]
    vault.update_version("paged", ids[1], enabled=False)
    client = SecretClient(vault.url, ManagedIdentityCredential(), verify_challenge_resource=False,
                          connection_verify=vault.ca_cert)
    pages = [list(page) for page in client.list_properties_of_secret_versions("paged", max_page_size=2).by_page()]
    assert [len(p) for p in pages] == [2, 2, 1] and vault.listings("paged") == 3
    items = {p.version: p for page in pages for p in page}
    assert set(items) == set(ids) and items[ids[1]].enabled is False and items[ids[0]].enabled is True
    assert client.get_secret("paged", ids[3]).value == "value-3" and client.get_secret("paged").value == "value-4"
    with pytest.raises(HttpResponseError) as ei:
        client.get_secret("paged", ids[1])
    assert ei.value.status_code == 403 and "disabled" in str(ei.value.message)
    assert list(client.list_properties_of_secret_versions("no-such-secret")) == []
    key_pem, cert_pem = new_client_certificate(days=30)
    version = vault.set_certificate("a-cert", key_pem, cert_pem, pkcs12=True)
    listed = next(iter(client.list_properties_of_secret_versions("a-cert")))
    assert listed.version == version and listed.managed is True and listed.content_type == "application/x-pkcs12"
    assert listed.expires_on is not None and listed.not_before is not None and listed.expires_on > listed.not_before
    client.close()


def test_a_rejected_credential_is_reread_at_most_every_30_seconds(vault):
    clock = FakeClock()
    store = SecretStore(vault_settings(vault), clock=clock, ttl_seconds=300)
    cred = AppCredential(store_settings := vault_settings(vault), vault=store, clock=clock)
    assert store_settings.client_credential == "secret"
    stale = cred.current()
    assert vault.reads("ms-client-secret") == 1
    clock.now += 100
    # Entra rejects it: re-read once; the vault still has the same value, so a retry would not help.
    assert cred.reject(stale, "client_secret_expired") is None
    assert vault.reads("ms-client-secret") == 2
    for _ in range(5):  # it stays rejected: no vault read per token request
        clock.now += 5
        assert cred.reject(stale, "client_secret_expired") is None
    assert vault.reads("ms-client-secret") == 2
    vault.set_secret("ms-client-secret", "rotated-secret")
    clock.now += 6  # 31 s after the re-read
    fresh = cred.reject(stale, "client_secret_expired")
    assert fresh is not None and fresh.msal == "rotated-secret" and vault.reads("ms-client-secret") == 3
    # Accepted, then rejected a second later: re-read at once (it may just have been rotated).
    cred.accept(fresh)
    clock.now += 1
    assert cred.reject(fresh, "client_secret_expired") is None
    assert vault.reads("ms-client-secret") == 4
    clock.now += 1
    assert cred.reject(fresh, "client_secret_expired") is None
    assert vault.reads("ms-client-secret") == 4


def test_a_value_sealed_with_a_key_this_instance_has_not_loaded_rereads_the_ring_once(vault):
    """After a rotation another instance seals (an OAuth state, a cursor) with the new active key: the
    cached ring is re-read once instead of failing to decrypt (a 500 on the callback)."""
    store = SecretStore(vault_settings(vault), clock=FakeClock())
    old = store.key_ring()
    assert old.kids == ("k1", "k2") and vault.reads("token-encryption-keys") == 1
    key_3 = bytes(range(32))
    vault.set_secret("token-encryption-keys", json.dumps({"active": "k3", "keys": {
        "k1": base64.b64encode(KEY_1).decode(), "k3": base64.b64encode(key_3).decode()}}))
    aad = account_aad("owner", "acct", "oauth-state")
    sealed = KeyRing("k3", {"k3": key_3}).seal(b"flow", aad=aad)  # what the other instance stored
    assert store.key_ring() is old  # a plain read still uses the cache
    assert store.key_ring(sealed).open(sealed, aad=aad) == b"flow"
    assert vault.reads("token-encryption-keys") == 2
    known = store.key_ring().seal(b"x", aad=aad)  # a key id the ring knows costs no read
    store.key_ring(known)
    assert vault.reads("token-encryption-keys") == 2
