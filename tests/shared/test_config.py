"""Settings validation: fail fast, naming the bad setting (pure logic, no I/O)."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import types
import typing

import pytest

from shared.config import DERIVED, SETTINGS, Settings, is_loopback_host, load_settings, setting_names
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
    azure_only = {s.name for s in SETTINGS if s.azure_only}
    assert azure_only == {"AzureWebJobsStorage__accountName", "AzureWebJobsStorage__tableServiceUri",
                          "AzureWebJobsStorage__queueServiceUri", "AzureWebJobsStorage__clientId", "AZURE_CLIENT_ID"}
    assert spec_section_8 <= set(values)
    assert setting_names() - azure_only <= set(values), sorted(setting_names() - azure_only - set(values))
    # The values work as they are (the CA path is relative to the repository; devstack resolves it).
    settings = load_settings({**values, "MS_CA_BUNDLE": str(ensure_certs().ca_cert)})
    assert settings.authority_host.startswith("https://localhost") and settings.storage_connection_string


# --------------------------------------------------------------------------------------------
# One declaration per setting: the Settings dataclass, README, local.settings.json.example
# --------------------------------------------------------------------------------------------


def test_every_settings_field_is_filled_by_exactly_one_declaration() -> None:
    fields = {f.name for f in dataclasses.fields(Settings)}
    attrs = [s.attr for s in SETTINGS if s.attr is not None]
    assert len(attrs) == len(set(attrs)), "two settings fill the same attribute"
    assert not set(attrs) & set(DERIVED), "a derived attribute is also filled by a setting"
    assert set(attrs) | set(DERIVED) == fields, {
        "fields without a setting": sorted(fields - set(attrs) - set(DERIVED)),
        "settings without a field": sorted((set(attrs) | set(DERIVED)) - fields),
    }
    # Vice versa: a setting without an attribute exists only as an input of a derived attribute.
    inputs = [n for names in DERIVED.values() for n in names]
    assert sorted(inputs) == sorted(s.name for s in SETTINGS if s.attr is None)


def test_declarations_are_consistent() -> None:
    for s in SETTINGS:
        assert s.doc and "|" not in s.doc, s.name  # the doc is a README table cell
        assert not (s.required and s.default is not None), f"{s.name}: required with a default"
        assert not (s.platform and (s.required or s.local_only or s.attr)), s.name
        if s.default is not None:  # defaults are valid values
            s.parse(s.name, s.default)


def _check_types(settings: Settings) -> None:
    hints = typing.get_type_hints(Settings)
    for f in dataclasses.fields(Settings):
        value, hint = getattr(settings, f.name), hints[f.name]
        options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        allowed = tuple(typing.get_origin(t) or t for t in options)  # tuple[str, ...] -> tuple
        assert isinstance(value, allowed), f"{f.name}: {value!r} is not {hint}"
        if isinstance(value, tuple):
            assert all(isinstance(v, str) for v in value), f.name


@pytest.mark.parametrize("extra", [
    {},
    {"KEY_VAULT_URL": "https://v.vault.azure.net/", "MS_CLIENT_SECRET": "", "TOKEN_ENCRYPTION_KEYS": "",
     "AzureWebJobsStorage": "", "AzureWebJobsStorage__accountName": "acct", "IDENTITY_ENDPOINT": "http://127.0.0.1:1",
     "AUTH_HS256_SECRET": "", "AUTH_JWKS_URL": "https://issuer.example.com/jwks", "ALLOWED_RETURN_URLS": "https://a/,http://b/",
     "WEBHOOK_URL": "https://hooks.example.com", "WEBHOOK_SECRET": "w", "DEMO_ENABLED": "TRUE"},
])
def test_parsed_values_have_the_declared_types(extra: dict[str, str]) -> None:
    s = load_settings({**GOOD, **extra})
    _check_types(s)
    assert s.managed_identity_available is bool(extra.get("IDENTITY_ENDPOINT"))
    assert s.demo_enabled is (extra.get("DEMO_ENABLED") == "TRUE")


@pytest.mark.parametrize(("url", "loopback"), [
    ("http://localhost:7071/jwks", True), ("http://LOCALHOST/x", True), ("http://127.0.0.1:1", True),
    ("http://127.0.0.2", True), ("http://[::1]:8443/", True), ("http://localhost.evil.example", False),
    ("http://10.0.0.1", False), ("https://issuer.example.com", False), ("not a url", False), ("", False),
])
def test_is_loopback_host(url: str, loopback: bool) -> None:
    assert is_loopback_host(url) is loopback


def test_jwks_url_may_be_plain_http_only_on_loopback() -> None:
    s = load_settings({**GOOD, "AUTH_JWKS_URL": "http://127.0.0.1:9999/jwks/"})
    assert s.auth_jwks_url == "http://127.0.0.1:9999/jwks"


def render_settings_table() -> str:
    """The README's settings table, generated from SETTINGS (paste it when this test says so)."""
    rows = ["| Name | Default | Meaning |", "|---|---|---|"]
    for s in SETTINGS:
        if s.required:
            default = "required"
        elif s.default is None:
            default = "—"
        else:
            default = f"`{s.default}`" if s.default else "(empty)"
        flags = [text for on, text in ((s.local_only, "Local only."), (s.azure_only, "Azure only."),
                                       (s.platform, "Set by the platform.")) if on]
        rows.append(f"| `{s.name}` | {default} | {' '.join([*flags, s.doc])} |")
    return "\n".join(rows) + "\n"


def _readme_settings_rows() -> dict[str, str]:
    from tests.conftest import ROOT

    section = (ROOT / "README.md").read_text().split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+) \|", section, re.M)
    return {name: cell.strip() for name, cell in rows}


def test_readme_settings_table_matches_declarations() -> None:
    from tests.conftest import ROOT

    rows = _readme_settings_rows()
    declared = {s.name: s for s in SETTINGS}
    assert set(rows) == set(declared), {"README only": sorted(set(rows) - set(declared)),
                                        "undocumented": sorted(set(declared) - set(rows))}
    for name, cell in rows.items():
        s = declared[name]
        shown = None if cell in ("—", "required") else "" if cell == "(empty)" else cell.strip("`")
        assert (shown, cell == "required") == (s.default, s.required), f"README default of {name}: {cell}"
    table = render_settings_table()
    assert table in (ROOT / "README.md").read_text(), "README settings table is stale; paste:\n" + table


# Values local.settings.json.example deliberately sets to something other than the default.
LOCAL_OVERRIDES = {"MS_AUTHORITY_HOST", "GRAPH_BASE_URL", "ALLOWED_RETURN_URLS"}  # sandbox and demo URLs
# Settings of the Functions host itself, not read by the app.
HOST_SETTINGS = {"FUNCTIONS_WORKER_RUNTIME", "AzureWebJobsFeatureFlags"}


def test_local_settings_example_matches_declarations() -> None:
    from tests.conftest import ROOT

    values = json.loads((ROOT / "local.settings.json.example").read_text())["Values"]
    local = {s.name for s in SETTINGS if not s.platform and not s.azure_only}
    assert set(values) - HOST_SETTINGS == local, {"unknown": sorted(set(values) - HOST_SETTINGS - local),
                                                  "missing": sorted(local - set(values))}
    for s in SETTINGS:
        if s.name in values and s.default is not None and s.name not in LOCAL_OVERRIDES:
            assert values[s.name] == s.default, f"{s.name}: the example differs from the default"


@pytest.mark.parametrize(("change", "error"), [({}, None), ({"KEEPALIVE_DAYS": "0"}, "KEEPALIVE_DAYS")])
def test_function_app_imports_with_a_valid_environment(change: dict[str, str], error: str | None) -> None:
    """``import function_app`` validates the settings at start-up: it works with GOOD and fails naming a bad one."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **GOOD, **change}
    proc = subprocess.run([sys.executable, "-c", "import function_app"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    if error is None:
        assert proc.returncode == 0, proc.stderr[-2000:]
    else:
        assert proc.returncode != 0 and "ConfigurationError" in proc.stderr and error in proc.stderr, proc.stderr


def test_documents_and_docstrings_cite_nothing_outside_the_repository() -> None:
    """README, docs, the package, the dev stack and the benchmarks refer only to what the repository holds:
    no product-specification sections or issue numbers a reader cannot open."""
    from tests.conftest import ROOT

    pattern = re.compile(r"SPEC ?§|SPEC\.md|\b[Ii]ssue \d+")
    paths = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "infra").rglob("*.md"),
             *(ROOT / "shared").rglob("*.py"), *(ROOT / "devstack").rglob("*.py"), *(ROOT / "devstack").rglob("*.md"),
             *(ROOT / "bench").glob("*.py"), ROOT / "bench" / "results.md", ROOT / "function_app.py"]
    found = [f"{p.relative_to(ROOT)}:{i}" for p in paths for i, line in enumerate(p.read_text().splitlines(), 1)
             if pattern.search(line)]
    assert found == [], found
