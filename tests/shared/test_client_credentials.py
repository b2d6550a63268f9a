"""MS_CLIENT_CREDENTIAL: settings rules, the certificate read from Key Vault (PEM and PKCS#12), the managed
identity's assertion through the real ManagedIdentityCredential, and the webhook secret read at run time."""

from __future__ import annotations

import json
import logging
from typing import Any

import jwt
import pytest
from azure.core.credentials import AccessToken

from devstack.certs import new_client_certificate
from devstack.keyvault import KeyVaultDouble, sandbox_token_service
from shared.app_credential import AppCredential
from shared.client_credentials import CertificateError, ManagedIdentityAssertion, parse_certificate
from shared.config import load_settings
from shared.errors import ConfigurationError, SecretUnavailableError
from shared.secret_store import SecretStore

from .test_config import GOOD
from .test_secret_store import KEY_RING_JSON, vault, vault_settings  # noqa: F401 - the vault fixture

GOOD_SETTINGS = load_settings(GOOD)

EXCHANGE = "api://AzureADTokenExchange"


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tenant", ["common", "consumers", "9188040d-6c67-4c5b-b112-36a304b66dad"])
def test_managed_identity_with_personal_accounts_is_refused_at_start_up(tenant: str) -> None:
    with pytest.raises(ConfigurationError) as ei:
        load_settings({**GOOD, "MS_CLIENT_CREDENTIAL": "managed_identity", "MS_TENANT": tenant})
    assert ei.value.setting == "MS_CLIENT_CREDENTIAL"
    text = str(ei.value)
    assert "signInAudience" in text and "organizations" in text and "certificate" in text


@pytest.mark.parametrize("tenant", ["organizations", "72f988bf-86f1-41af-91ab-2d7cd011db47", "contoso.com"])
def test_managed_identity_for_work_accounts_needs_no_secret(tenant: str) -> None:
    s = load_settings({**GOOD, "MS_CLIENT_SECRET": "", "MS_CLIENT_CREDENTIAL": "managed-identity", "MS_TENANT": tenant})
    assert s.client_credential == "managed_identity" and s.client_assertion_audience == EXCHANGE


def test_credential_kind_and_certificate_rules() -> None:
    with pytest.raises(ConfigurationError) as ei:
        load_settings({**GOOD, "MS_CLIENT_CREDENTIAL": "password"})
    assert ei.value.setting == "MS_CLIENT_CREDENTIAL"
    with pytest.raises(ConfigurationError) as ei:
        load_settings({**GOOD, "MS_CLIENT_CREDENTIAL": "certificate"})  # no KEY_VAULT_URL
    assert ei.value.setting == "MS_CLIENT_CREDENTIAL" and "KEY_VAULT_URL" in str(ei.value)
    s = load_settings({**GOOD, "MS_CLIENT_SECRET": "", "MS_CLIENT_CREDENTIAL": "CERTIFICATE",
                       "KEY_VAULT_URL": "https://v.vault.azure.net"})
    assert (s.client_credential, s.client_cert_name) == ("certificate", "ms-client-cert")
    for bad in ({"MS_CLIENT_CERT_NAME": "bad name"}, {"MS_CLIENT_ASSERTION_AUDIENCE": "https://x"}):
        with pytest.raises(ConfigurationError) as ei:
            load_settings({**GOOD, **bad})
        assert ei.value.setting == next(iter(bad))


def test_webhook_secret_is_not_needed_at_start_up_with_a_vault() -> None:
    s = load_settings({**GOOD, "KEY_VAULT_URL": "https://v.vault.azure.net", "WEBHOOK_URL": "https://h.example.com"})
    assert s.webhook_secret is None and s.webhook_secret_name == "webhook-secret"


def test_public_base_url_trailing_slash_is_normalised() -> None:
    s = load_settings({**GOOD, "PUBLIC_BASE_URL": "https://mail.example.com/"})
    assert s.redirect_uri == "https://mail.example.com/api/connect/microsoft/callback"


# --------------------------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------------------------


def test_parse_certificate_pem_either_order_and_pkcs12() -> None:
    import base64

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    key_pem, cert_pem = new_client_certificate()
    a, b = parse_certificate(key_pem + cert_pem), parse_certificate(cert_pem + "\n" + key_pem)
    assert a == b and a.certificate_pem == cert_pem and len(a.thumbprint_sha256) == 64
    key = serialization.load_pem_private_key(key_pem.encode(), None)
    blob = pkcs12.serialize_key_and_certificates(b"c", key, x509.load_pem_x509_certificate(cert_pem.encode()),  # type: ignore[arg-type]
                                                 None, serialization.NoEncryption())
    assert parse_certificate(base64.b64encode(blob).decode()) == a
    assert key_pem.splitlines()[1] not in repr(a)


@pytest.mark.parametrize("case", ["garbage", "key only", "cert only", "mismatch", "ec", "encrypted"])
def test_unusable_certificates_are_refused_without_echoing_them(case: str) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key_pem, cert_pem = new_client_certificate()
    other_key, _ = new_client_certificate()
    ec_key = ec.generate_private_key(ec.SECP256R1())
    raw = {
        "garbage": "%%% not base64 %%%", "key only": key_pem, "cert only": cert_pem, "mismatch": other_key + cert_pem,
        "ec": ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()).decode() + cert_pem,
        "encrypted": ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.BestAvailableEncryption(b"pw")).decode() + cert_pem,
    }[case]
    with pytest.raises(CertificateError) as ei:
        parse_certificate(raw)
    assert "BEGIN" not in str(ei.value) and len(str(ei.value)) < 100


def test_certificate_from_key_vault_and_rotation(vault: KeyVaultDouble, caplog: Any) -> None:  # noqa: F811
    caplog.set_level(logging.DEBUG)
    key_pem, cert_pem = new_client_certificate()
    vault.set_certificate("ms-client-cert", key_pem, cert_pem)
    clock = Clock()
    settings = vault_settings(vault, MS_CLIENT_CREDENTIAL="certificate")
    store = SecretStore(settings, clock=clock, ttl_seconds=300)
    cred = AppCredential(settings, vault=store, clock=clock)
    first = cred.current()
    assert first.kind == "certificate" and first.msal == {"private_key": key_pem, "public_certificate": cert_pem}
    assert cred.current() == first and vault.reads("ms-client-cert") == 1  # cached
    cred.check()
    new_key, new_cert = new_client_certificate()
    vault.set_certificate("ms-client-cert", new_key, new_cert, pkcs12=True)  # rotated, as PKCS#12 this time
    assert cred.current() == first  # still cached until Entra rejects it or the cache expires
    clock.now += 301
    second = cred.current()
    assert second.version != first.version and second.msal["public_certificate"] == new_cert
    assert key_pem.splitlines()[1] not in repr(second) + repr(store) + caplog.text
    assert new_key.splitlines()[1] not in caplog.text


def test_malformed_or_missing_certificate_is_a_named_503(vault: KeyVaultDouble) -> None:  # noqa: F811
    settings = vault_settings(vault, MS_CLIENT_CREDENTIAL="certificate")
    store = SecretStore(settings, error_ttl_seconds=0)
    cred = AppCredential(settings, vault=store)
    with pytest.raises(SecretUnavailableError) as ei:
        cred.check()
    assert ei.value.reason == "not_found" and ei.value.secret_name == "ms-client-cert"
    vault.set_secret("ms-client-cert", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(SecretUnavailableError) as ei:
        cred.current()
    assert ei.value.reason == "malformed" and "AAAA" not in str(ei.value.detail)


# --------------------------------------------------------------------------------------------
# Certificate rotation: Entra does not know the newest version yet
# --------------------------------------------------------------------------------------------

REJECTED = {"error": "invalid_client", "error_codes": [700027],
            "error_description": "AADSTS700027: Client assertion contains an invalid signature. [Reason - The key "
                                 "was not found.]"}


class Entra:
    """The token endpoint's verdict per presented credential; records what was presented."""

    def __init__(self, *accepted: str) -> None:
        self.accepted = set(accepted)
        self.presented: list[str] = []

    def __call__(self, credential: Any) -> dict[str, Any]:
        self.presented.append(credential.version)
        if credential.version in self.accepted:
            return {"access_token": "at", "refresh_token": "rt", "expires_in": 3600, "scope": "Mail.Send"}
        return dict(REJECTED)

    def call(self, oauth: Any) -> list[str]:
        self.presented.clear()
        oauth._call_token_endpoint(self)
        return list(self.presented)


def _oauth(cred: AppCredential, monkeypatch: Any) -> Any:
    from shared.oauth import OAuthClient

    oauth = OAuthClient(GOOD_SETTINGS, credentials=cred, session=None, states_table=None)  # type: ignore[arg-type]
    monkeypatch.setattr(oauth, "_msal_app_for", lambda credential, tenant=None: credential)  # the "app" is the credential
    return oauth


def _thumb(cert_pem: str) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    return x509.load_pem_x509_certificate(cert_pem.encode()).fingerprint(hashes.SHA256()).hex()


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def test_newest_certificate_unknown_to_entra_falls_back_until_it_is_registered(
        vault: KeyVaultDouble, monkeypatch: Any, caplog: Any) -> None:  # noqa: F811
    caplog.set_level(logging.DEBUG)
    key_a, cert_a = new_client_certificate("a")
    key_b, cert_b = new_client_certificate("b")
    a, b = _thumb(cert_a), _thumb(cert_b)
    vault.set_certificate("ms-client-cert", key_a, cert_a)
    clock = Clock()
    settings = vault_settings(vault, MS_CLIENT_CREDENTIAL="certificate")
    store = SecretStore(settings, clock=clock, ttl_seconds=300)
    cred = AppCredential(settings, vault=store, clock=clock, cert_retry_seconds=900)
    oauth, entra = _oauth(cred, monkeypatch), Entra(a)
    assert entra.call(oauth) == [a] and cred.warning() is None

    vault.set_certificate("ms-client-cert", key_b, cert_b, pkcs12=True)  # auto-renewal: a new key pair
    clock.now += 301  # the cache expires: the app reads B, Entra rejects it, A keeps working
    assert entra.call(oauth) == [b, a] and oauth.operator_alert is None
    assert vault.listings("ms-client-cert") == 1
    warning = cred.warning()
    assert warning is not None and warning["warning"] == "certificate_not_registered"
    sha1_b = parse_certificate(key_b + cert_b).thumbprint_sha1.upper()
    assert sha1_b in warning["detail"] and "app registration" in warning["hint"]
    assert any(r.levelno == logging.WARNING and "app registration does not have it" in r.getMessage()
               for r in caplog.records)
    reads = vault.reads("ms-client-cert")
    for _ in range(3):  # on the fallback: one presentation per call, no vault traffic
        clock.now += 60
        assert entra.call(oauth) == [a]
    assert vault.reads("ms-client-cert") == reads + 0 and vault.listings("ms-client-cert") == 1

    clock.now += 900  # the scheduled retry of the newest: still unknown, back to A
    assert entra.call(oauth) == [b, a] and cred.warning() is not None
    entra.accepted.add(b)  # the operator uploads B to the app registration
    clock.now += 100
    assert entra.call(oauth) == [a]  # the retry is not due yet
    clock.now += 800
    assert entra.call(oauth) == [b] and cred.warning() is None
    assert entra.call(oauth) == [b]
    text = caplog.text + repr(store) + json.dumps(warning)
    for key in (key_a, key_b):
        assert key.splitlines()[1] not in text


def test_fallback_skips_disabled_and_expired_versions_and_ends_when_entra_rejects_it(
        vault: KeyVaultDouble, monkeypatch: Any) -> None:  # noqa: F811
    import time

    certs = {n: new_client_certificate(n) for n in ("a", "disabled", "expired", "newest")}
    versions = {n: vault.set_certificate("ms-client-cert", *pair) for n, pair in certs.items()}
    vault.update_version("ms-client-cert", versions["disabled"], enabled=False)
    vault.update_version("ms-client-cert", versions["expired"], expires=int(time.time()) - 60)
    t = {n: _thumb(pair[1]) for n, pair in certs.items()}
    settings = vault_settings(vault, MS_CLIENT_CREDENTIAL="certificate")
    clock = Clock()
    store = SecretStore(settings, clock=clock)
    cred = AppCredential(settings, vault=store, clock=clock)
    oauth, entra = _oauth(cred, monkeypatch), Entra(t["a"], t["disabled"], t["expired"])
    assert entra.call(oauth) == [t["newest"], t["a"]]
    # The app registration drops A and gets the newest: A's rejection makes the app present the newest at once.
    entra.accepted = {t["newest"]}
    assert entra.call(oauth) == [t["a"], t["newest"]] and cred.warning() is None


def test_no_earlier_version_means_the_operator_error(vault: KeyVaultDouble, monkeypatch: Any) -> None:  # noqa: F811
    from shared.errors import OperatorError

    key, cert = new_client_certificate("only")
    vault.set_certificate("ms-client-cert", key, cert)
    settings = vault_settings(vault, MS_CLIENT_CREDENTIAL="certificate")
    clock = Clock()
    store = SecretStore(settings, clock=clock)
    cred = AppCredential(settings, vault=store, clock=clock)
    oauth, entra = _oauth(cred, monkeypatch), Entra()
    with pytest.raises(OperatorError) as ei:
        entra.call(oauth)
    assert ei.value.code == "invalid_client_certificate" and oauth.operator_alert is not None
    assert entra.presented == [_thumb(cert)] and cred.warning() is None


def test_an_expired_secret_costs_one_vault_read_per_30_seconds_not_one_per_token_call(
        vault: KeyVaultDouble, monkeypatch: Any) -> None:  # noqa: F811
    from shared.errors import OperatorError

    clock = Clock()
    settings = vault_settings(vault)
    store = SecretStore(settings, clock=clock, ttl_seconds=300)
    oauth = _oauth(AppCredential(settings, vault=store, clock=clock), monkeypatch)
    expired = {"error": "invalid_client", "error_codes": [7000222],
               "error_description": "AADSTS7000222: The provided client secret keys for app are expired."}
    calls = []

    def entra(credential: Any) -> dict[str, Any]:
        calls.append(credential.version)
        return dict(expired)

    for _ in range(10):
        clock.now += 2
        with pytest.raises(OperatorError):
            oauth._call_token_endpoint(entra)
    assert vault.reads("ms-client-secret") == 1  # read 2 s before the first rejection: not read again
    assert len(calls) == 10  # and no retry with the same value
    clock.now += 30
    with pytest.raises(OperatorError):
        oauth._call_token_endpoint(entra)
    assert vault.reads("ms-client-secret") == 2


# --------------------------------------------------------------------------------------------
# Managed identity as a federated credential
# --------------------------------------------------------------------------------------------


def test_managed_identity_assertion_through_the_real_credential(vault: KeyVaultDouble, control: Any) -> None:  # noqa: F811
    mi = control.add_managed_identity(vault.identity_client_id)
    vault.token_service = sandbox_token_service(control)
    settings = vault_settings(vault, MS_CLIENT_CREDENTIAL="managed_identity", MS_TENANT="organizations",
                              AZURE_CLIENT_ID=vault.identity_client_id)
    store = SecretStore(settings)
    cred = AppCredential(settings, vault=store)
    credential = cred.current()
    assert credential.kind == "managed_identity" and set(credential.msal) == {"client_assertion"}
    assertion = credential.msal["client_assertion"]
    token = assertion()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (claims["aud"], claims["sub"], claims["iss"]) == (EXCHANGE, mi["principal_id"], mi["issuer"])
    requests_before = vault.token_requests
    assert assertion() == token and vault.token_requests == requests_before  # cached
    cred.check()
    cred.reject(credential, "client_assertion_expired")  # Entra rejected it: a new token, not the cached one
    assert assertion() != token and vault.token_requests == requests_before + 1
    assert token not in repr(credential) and token not in repr(store)


class FakeCredential:
    def __init__(self, lifetime: float, clock: Any) -> None:
        self.calls = 0
        self.lifetime = lifetime
        self.clock = clock

    def get_token(self, *scopes: str, **kw: Any) -> AccessToken:
        assert scopes == (EXCHANGE + "/.default",)
        self.calls += 1
        return AccessToken(f"token-{self.calls}", int(self.clock() + self.lifetime))


def test_assertion_is_renewed_shortly_before_it_expires() -> None:
    now = [1_000_000.0]
    fake = FakeCredential(3600, lambda: now[0])
    assertion = ManagedIdentityAssertion(lambda: fake, EXCHANGE, clock=lambda: now[0])
    assert assertion() == "token-1"
    now[0] += 3600 - 301
    assert assertion() == "token-1"
    now[0] += 2  # inside the 5-minute margin
    assert assertion() == "token-2" and fake.calls == 2


def test_no_managed_identity_is_a_named_503() -> None:
    from azure.identity import CredentialUnavailableError

    class NoIdentity:
        def get_token(self, *scopes: str, **kw: Any) -> AccessToken:
            raise CredentialUnavailableError(message="no endpoint")

    with pytest.raises(SecretUnavailableError) as ei:
        ManagedIdentityAssertion(NoIdentity, EXCHANGE)()
    assert ei.value.reason == "no_identity" and "AZURE_CLIENT_ID" in (ei.value.hint or "")


# --------------------------------------------------------------------------------------------
# Webhook secret
# --------------------------------------------------------------------------------------------


def test_webhook_secret_read_at_run_time_with_ttl(vault: KeyVaultDouble) -> None:  # noqa: F811
    now = [0.0]
    store = SecretStore(vault_settings(vault, WEBHOOK_URL="https://hooks.example.com"), clock=lambda: now[0],
                        ttl_seconds=300)
    with pytest.raises(SecretUnavailableError) as ei:  # not created yet: a delivery fails, start-up does not
        store.webhook_secret()
    assert ei.value.secret_name == "webhook-secret"
    vault.set_secret("webhook-secret", "first\n")
    now[0] += 10  # past the error TTL
    assert store.webhook_secret() == "first"
    vault.set_secret("webhook-secret", "second")
    assert store.webhook_secret() == "first"
    now[0] += 301  # rotation is picked up within the TTL
    assert store.webhook_secret() == "second"


def test_local_webhook_secret_from_environment() -> None:
    settings = load_settings({**GOOD, "TOKEN_ENCRYPTION_KEYS": KEY_RING_JSON, "WEBHOOK_URL": "https://h.example.com",
                              "WEBHOOK_SECRET": "local-secret"})
    assert SecretStore(settings).webhook_secret() == "local-secret"


def test_webhooks_resolve_the_secret_per_delivery_and_retry_when_it_is_unavailable() -> None:
    import json as _json

    from shared.webhooks import SIGNATURE_HEADER, Webhooks, verify

    posted: list[tuple[bytes, dict[str, str]]] = []
    requeued: list[dict[str, Any]] = []

    class Session:
        def post(self, url: str, data: bytes, headers: dict[str, str], **kw: Any) -> Any:
            posted.append((data, headers))
            return type("R", (), {"status_code": 204})()

    class Queue:
        def send(self, body: bytes, **kw: Any) -> None:
            requeued.append(kw)

    secrets = iter(["first", "rotated"])
    hooks = Webhooks("https://hooks.example.com", lambda: next(secrets), queue=Queue, session=Session())  # type: ignore[arg-type]
    message = _json.dumps({"attempt": 0, "event": {"id": "evt_1", "type": "account.connected"}}).encode()
    hooks.deliver(message)
    hooks.deliver(message)
    assert verify("first", posted[0][0], posted[0][1][SIGNATURE_HEADER])
    assert verify("rotated", posted[1][0], posted[1][1][SIGNATURE_HEADER])

    def unavailable() -> str:
        raise SecretUnavailableError("vault down", secret_name="webhook-secret", vault="https://v", reason="x")

    Webhooks("https://hooks.example.com", unavailable, queue=Queue, session=Session()).deliver(message)  # type: ignore[arg-type]
    assert len(posted) == 2 and requeued and requeued[0]["visibility_timeout"] > 0  # retried later, not lost
