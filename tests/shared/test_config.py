"""Settings validation: fail fast, naming the bad setting (pure logic, no I/O)."""

from __future__ import annotations

import base64
import json

import pytest

from shared.config import SETTINGS, load_settings, setting_names
from shared.errors import ConfigurationError

KEY = base64.b64encode(b"k" * 32).decode()
GOOD = {
    "MS_CLIENT_ID": "cid", "MS_CLIENT_SECRET": "s", "PUBLIC_BASE_URL": "http://localhost:7071",
    "AzureWebJobsStorage": "UseDevelopmentStorage=true", "AUTH_ISSUER": "i", "AUTH_AUDIENCE": "a",
    "AUTH_HS256_SECRET": "x" * 32, "TOKEN_ENCRYPTION_KEYS": json.dumps({"active": "k1", "keys": {"k1": KEY}}),
}


def test_good_settings_load_with_defaults() -> None:
    s = load_settings(GOOD)
    assert s.authority == "https://login.microsoftonline.com/common"
    assert s.scopes == ("User.Read", "Mail.ReadWrite", "Mail.Send")
    assert s.redirect_uri == "http://localhost:7071/api/connect/microsoft/callback"
    assert "s" not in repr(s).split("client_secret")[0][-5:]
    assert "x" * 32 not in repr(s) and KEY not in repr(s)


@pytest.mark.parametrize(("change", "setting"), [
    ({"MS_CLIENT_ID": ""}, "MS_CLIENT_ID"),
    ({"MS_CLIENT_SECRET": ""}, "MS_CLIENT_SECRET"),
    ({"PUBLIC_BASE_URL": "localhost:7071"}, "PUBLIC_BASE_URL"),
    ({"MS_AUTHORITY_HOST": "http://login.example.com"}, "MS_AUTHORITY_HOST"),
    ({"GRAPH_BASE_URL": "ftp://graph"}, "GRAPH_BASE_URL"),
    ({"AzureWebJobsStorage": ""}, "AzureWebJobsStorage"),
    ({"AUTH_HS256_SECRET": "short"}, "AUTH_HS256_SECRET"),
    ({"AUTH_HS256_SECRET": ""}, "AUTH_JWKS_URL"),
    ({"TOKEN_ENCRYPTION_KEYS": "{}"}, "TOKEN_ENCRYPTION_KEYS"),
    ({"TOKEN_ENCRYPTION_KEYS": json.dumps({"active": "k.1", "keys": {"k.1": KEY}})}, "TOKEN_ENCRYPTION_KEYS"),
    ({"TOKEN_ENCRYPTION_KEYS": json.dumps({"active": "k1", "keys": {"k1": "c2hvcnQ="}})}, "TOKEN_ENCRYPTION_KEYS"),
    ({"REFRESH_SCHEDULE": "*/5 * * * *"}, "REFRESH_SCHEDULE"),
    ({"KEEPALIVE_DAYS": "100"}, "KEEPALIVE_DAYS"),
    ({"WEBHOOK_URL": "https://hooks.example.com"}, "WEBHOOK_SECRET"),
    ({"MS_CA_BUNDLE": "/nonexistent.pem"}, "MS_CA_BUNDLE"),
    ({"AUTH_JWKS_URL": "http://issuer.example.com/jwks"}, "AUTH_JWKS_URL"),  # https only, except loopback
    ({"WEBHOOK_URL": "https://h.example.com", "WEBHOOK_SECRET": "@Microsoft.KeyVault(SecretUri=https://v/x)"},
     "WEBHOOK_SECRET"),
])
def test_bad_setting_is_named(change: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigurationError) as ei:
        load_settings({**GOOD, **change})
    assert ei.value.setting == setting
    assert setting in str(ei.value)
    for v in change.values():
        if len(v) > 8 and v.startswith(("{", "@")):
            assert KEY not in str(ei.value)


def test_every_setting_is_declared_once() -> None:
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    assert {"MS_CLIENT_ID", "KEY_VAULT_URL", "REFRESH_SCHEDULE"} <= setting_names(include_local=False)
    assert "MS_CLIENT_SECRET" not in setting_names(include_local=False)


def test_local_settings_example_lists_every_setting_with_working_values() -> None:
    from devstack.certs import ensure_certs
    from tests.conftest import ROOT

    values = json.loads((ROOT / "local.settings.json.example").read_text())["Values"]
    spec_section_8 = {
        "MS_CLIENT_ID", "MS_CLIENT_SECRET", "KEY_VAULT_URL", "MS_CLIENT_SECRET_NAME", "MS_AUTHORITY_HOST", "MS_TENANT",
        "MS_SCOPES", "GRAPH_BASE_URL", "MS_CA_BUNDLE", "PUBLIC_BASE_URL", "AzureWebJobsStorage", "AUTH_ISSUER",
        "AUTH_AUDIENCE", "AUTH_JWKS_URL", "AUTH_HS256_SECRET", "ALLOWED_RETURN_URLS", "TOKEN_ENCRYPTION_KEYS",
        "WEBHOOK_URL", "WEBHOOK_SECRET", "REFRESH_SCHEDULE"}
    # Only meaningful in Azure, with identity-based storage and a managed identity.
    azure_only = {"AzureWebJobsStorage__accountName", "AzureWebJobsStorage__tableServiceUri",
                  "AzureWebJobsStorage__queueServiceUri", "AzureWebJobsStorage__clientId", "AZURE_CLIENT_ID"}
    assert spec_section_8 <= set(values)
    assert setting_names() - azure_only <= set(values), sorted(setting_names() - azure_only - set(values))
    # The values work as they are (the CA path is relative to the repository; devstack resolves it).
    settings = load_settings({**values, "MS_CA_BUNDLE": str(ensure_certs().ca_cert)})
    assert settings.authority_host.startswith("https://localhost") and settings.storage_connection_string
