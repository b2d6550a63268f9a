"""Static checks of infra/ (Bicep, parsed offline with pycep-parser) and azure.yaml.

`security_violations()` is the assertion helper: it reads the parsed templates and returns one
message per security-relevant property that is not what docs/deploy.md promises (identity-only
storage, TLS 1.2, RBAC Key Vault with purge protection, local-auth-free Application Insights,
Flex Consumption with identity-based deployment storage, least-privilege role GUIDs, no secret in
an app setting or output). The mutation tests flip one property in a copy of infra/ and show the
helper notices.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pycep = pytest.importorskip("pycep", reason="pycep-parser is needed to parse Bicep offline")

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
if str(ROOT) not in sys.path:  # so `shared` imports however pytest was started
    sys.path.insert(0, str(ROOT))

# Built-in role definition ids, verified against
# https://learn.microsoft.com/azure/role-based-access-control/built-in-roles (storage, security, monitor).
ROLE_GUIDS = {
    "Storage Blob Data Owner": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
    "Storage Queue Data Contributor": "974c5e8b-45b9-4653-ba55-5f855dd0fb88",
    "Storage Table Data Contributor": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
    "Key Vault Secrets User": "4633458b-17de-408a-b874-0445c86b69e6",
    "Key Vault Secrets Officer": "b86a8fe4-44ce-4948-aee5-eccb2c155cd7",
    "Key Vault Certificates Officer": "a4417e6f-fecd-4de8-b567-7b0420556985",
    "Monitoring Metrics Publisher": "3913510d-42f4-4e42-8a64-420c390055eb",
}
# (role, resource type it is scoped to, principal parameter) - and nothing else.
EXPECTED_ASSIGNMENTS = {
    ("Storage Blob Data Owner", "Microsoft.Storage/storageAccounts", "appPrincipalId"),
    ("Storage Queue Data Contributor", "Microsoft.Storage/storageAccounts", "appPrincipalId"),
    ("Storage Table Data Contributor", "Microsoft.Storage/storageAccounts", "appPrincipalId"),
    ("Key Vault Secrets User", "Microsoft.KeyVault/vaults", "appPrincipalId"),
    ("Monitoring Metrics Publisher", "Microsoft.Insights/components", "appPrincipalId"),
    ("Key Vault Secrets Officer", "Microsoft.KeyVault/vaults", "deployerPrincipalId"),
    # Optional (grantDeployerDataRoles): `python -m shared.cli reencrypt` from the operator's machine.
    ("Storage Table Data Contributor", "Microsoft.Storage/storageAccounts", "deployerPrincipalId"),
    # Only with MS_CLIENT_CREDENTIAL=certificate: the operator creates the certificate in the vault.
    ("Key Vault Certificates Officer", "Microsoft.KeyVault/vaults", "deployerPrincipalId"),
}
TABLES = {"accounts", "oauthstates", "refreshindex", "idempotency", "subscriptions", "subscriptionindex",
          "seenmessages"}
QUEUES = {"refresh-jobs", "refresh-jobs-poison", "webhook-deliveries", "webhook-deliveries-poison",
          "notification-jobs", "notification-jobs-poison"}
# App settings Bicep may write besides the non-local names in shared.config.SETTINGS.
# (The identity-based AzureWebJobsStorage__accountName / __tableServiceUri / __queueServiceUri / __clientId
# and AZURE_CLIENT_ID are read by the app, so they are in SETTINGS; these are read only by the Functions host.)
PLATFORM_SETTINGS = {
    "AzureWebJobsStorage__blobServiceUri",
    "AzureWebJobsStorage__credential",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
    "PYTHON_THREADPOOL_THREAD_COUNT",  # the Python worker's thread pool (queue trigger concurrency)
    "PYTHON_ENABLE_OPENTELEMETRY",  # the worker exports OpenTelemetry itself (docs/operations.md)
}
# Settings Flex Consumption rejects (runtime/deployment are in functionAppConfig instead).
FLEX_FORBIDDEN_SETTINGS = {
    "FUNCTIONS_WORKER_RUNTIME",
    "FUNCTIONS_EXTENSION_VERSION",
    "WEBSITE_RUN_FROM_PACKAGE",
    "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
    "WEBSITE_CONTENTSHARE",
    "SCM_DO_BUILD_DURING_DEPLOYMENT",
}


# --------------------------------------------------------------------------------------------
# Loading and walking parsed templates
# --------------------------------------------------------------------------------------------


def bicep_files(infra: Path = INFRA) -> list[Path]:
    return sorted(infra.rglob("*.bicep"))


def load_templates(infra: Path = INFRA) -> dict[str, dict[str, Any]]:
    parser = pycep.BicepParser()
    return {f.relative_to(infra).as_posix(): parser.parse(file_path=f) for f in bicep_files(infra)}


def _unwrap(config: dict[str, Any]) -> tuple[dict[str, Any], Any, Any]:
    """Strip pycep's loop/condition wrappers: (body, condition, loop)."""
    condition = loop = None
    while isinstance(config, dict) and "config" in config and ("condition" in config or "loop_type" in config):
        condition = config.get("condition") or condition
        loop = config.get("loop_type") or loop
        config = config["config"]
    return config, condition, loop


def resources(tpl: dict[str, Any], rtype: str | None = None, *, existing: bool = False) -> dict[str, dict]:
    out = {}
    for name, res in (tpl.get("resources") or {}).items():
        if res.get("existing") != existing or (rtype and res["type"] != rtype):
            continue
        body, condition, loop = _unwrap(res["config"])
        out[name] = {"type": res["type"], "body": body, "condition": condition, "loop": loop}
    return out


def modules(tpl: dict[str, Any]) -> dict[str, dict]:
    out = {}
    for name, mod in (tpl.get("modules") or {}).items():
        body, condition, loop = _unwrap(mod["config"])
        out[name] = {"path": mod["detail"]["path"], "body": body, "condition": condition, "loop": loop}
    return out


def only(items: dict[str, dict], what: str) -> dict:
    assert len(items) == 1, f"expected exactly one {what}, found {sorted(items)}"
    return next(iter(items.values()))


def dig(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def mentions(expr: Any, identifier: str) -> bool:
    """Does a parsed expression refer to ``identifier`` (bare, interpolated or in an operator)?"""
    return re.search(rf"(?<![\w.'-]){re.escape(identifier)}(?![\w'-])", json.dumps(expr)) is not None


def accessed(expr: Any, base: str) -> set[str]:
    """Properties read from ``base`` in an expression: ``base.x`` (operator or interpolation)."""
    found: set[str] = set()
    if isinstance(expr, str):
        found.update(re.findall(rf"(?<![\w.]){re.escape(base)}\.(\w+)", expr))
    elif isinstance(expr, dict):
        ops = dig(expr, "operator", "operands") if dig(expr, "operator", "type") == "property_accessor" else None
        if ops and ops.get("operand_1") == base and isinstance(ops.get("operand_2"), str):
            found.add(ops["operand_2"])
        for value in expr.values():
            found |= accessed(value, base)
    elif isinstance(expr, list):
        for value in expr:
            found |= accessed(value, base)
    return found


def secure_params(tpl: dict[str, Any]) -> set[str]:
    return {
        name
        for name, p in (tpl.get("parameters") or {}).items()
        if any(d.get("type") == "secure" for d in p.get("decorators", []))
    }


def app_settings(templates: dict[str, dict]) -> dict[str, Any]:
    """Name -> value expression of every app setting the function app gets (its ``appsettings`` config:
    ``union(appSettings, derivedSettings, platformSettings)``, written after the site exists)."""
    fa_tpl = templates["modules/functionapp.bicep"]
    site = only(resources(fa_tpl, "Microsoft.Web/sites"), "function app")
    assert dig(site["body"], "properties", "siteConfig", "appSettings") is None, "app settings: one place only"
    config = only(resources(fa_tpl, "Microsoft.Web/sites/config"), "app settings")
    assert config["body"]["name"] == "appsettings"
    expr = dig(config["body"], "properties")
    assert isinstance(expr, dict) and dig(expr, "function", "type") == "union", "appsettings must be union(...)"
    call = next(m for m in modules(templates["main.bicep"]).values() if m["path"] == "modules/functionapp.bicep")
    settings: dict[str, Any] = {}
    for part in expr["function"]["parameters"].values():
        if part in (fa_tpl.get("variables") or {}):
            items = fa_tpl["variables"][part]["value"]
        elif part in (fa_tpl.get("parameters") or {}):
            items = call["body"]["params"][part]
        else:
            raise AssertionError(f"appsettings part {part!r} is neither a variable nor a parameter")
        for name, value in items.items():
            assert name not in settings, f"app setting {name} written twice"
            settings[name] = value
    return settings


# --------------------------------------------------------------------------------------------
# The assertion helper
# --------------------------------------------------------------------------------------------


def security_violations(templates: dict[str, dict]) -> list[str]:
    v: list[str] = []

    def expect(cond: bool, msg: str) -> None:
        if not cond:
            v.append(msg)

    # Storage: identity only, TLS 1.2, HTTPS, no anonymous blobs.
    st_tpl = templates["modules/storage.bicep"]
    for name, st in resources(st_tpl, "Microsoft.Storage/storageAccounts").items():
        props = st["body"].get("properties", {})
        expect(props.get("allowSharedKeyAccess") is False, f"storage {name}: allowSharedKeyAccess must be false")
        expect(
            props.get("defaultToOAuthAuthentication") is True,
            f"storage {name}: defaultToOAuthAuthentication must be true",
        )
        expect(props.get("minimumTlsVersion") == "TLS1_2", f"storage {name}: minimumTlsVersion must be TLS1_2")
        expect(props.get("allowBlobPublicAccess") is False, f"storage {name}: allowBlobPublicAccess must be false")
        expect(props.get("supportsHttpsTrafficOnly") is True, f"storage {name}: supportsHttpsTrafficOnly must be true")
        expect(
            props.get("allowCrossTenantReplication") is False,
            f"storage {name}: allowCrossTenantReplication must be false",
        )
    for name, c in resources(st_tpl, "Microsoft.Storage/storageAccounts/blobServices/containers").items():
        expect(dig(c["body"], "properties", "publicAccess") == "None", f"container {name}: publicAccess must be None")
    main = templates["main.bicep"]
    main_vars = main.get("variables") or {}
    expect(set(dig(main_vars, "tableNames", "value") or []) == TABLES, f"tables must be {sorted(TABLES)}")
    expect(set(dig(main_vars, "queueNames", "value") or []) == QUEUES, f"queues must be {sorted(QUEUES)}")
    table_loops = resources(st_tpl, "Microsoft.Storage/storageAccounts/tableServices/tables")
    queue_loops = resources(st_tpl, "Microsoft.Storage/storageAccounts/queueServices/queues")
    expect(
        any(dig(r["loop"], "detail", "array_name") == "tableNames" for r in table_loops.values()),
        "storage must create every table in tableNames",
    )
    expect(
        any(dig(r["loop"], "detail", "array_name") == "queueNames" for r in queue_loops.values()),
        "storage must create every queue in queueNames",
    )

    # Key Vault: RBAC, soft delete, purge protection; secrets written only when given.
    kv_tpl = templates["modules/keyvault.bicep"]
    for name, kv in resources(kv_tpl, "Microsoft.KeyVault/vaults").items():
        props = kv["body"].get("properties", {})
        expect(props.get("enableRbacAuthorization") is True, f"key vault {name}: enableRbacAuthorization must be true")
        expect(props.get("enableSoftDelete") is True, f"key vault {name}: enableSoftDelete must be true")
        expect(props.get("enablePurgeProtection") is True, f"key vault {name}: enablePurgeProtection must be true")
        expect(not props.get("accessPolicies"), f"key vault {name}: no access policies (RBAC only)")
    for tpl_name, tpl in templates.items():
        for name, res in resources(tpl, "Microsoft.KeyVault/vaults/secrets").items():
            expect(
                tpl_name == "modules/keyvault-secret.bicep",
                f"{tpl_name}: secret {name} must go through keyvault-secret.bicep",
            )
    for name, mod in modules(kv_tpl).items():
        if mod["path"] == "keyvault-secret.bicep":
            value = mod["body"]["params"].get("value")
            expect(
                value in secure_params(kv_tpl) and mod["condition"] is not None and mentions(mod["condition"], value),
                f"key vault secret {name}: must be written only when its @secure() value is non-empty",
            )

    # Application Insights / Log Analytics: local auth disabled.
    mon_tpl = templates["modules/monitoring.bicep"]
    for name, ai in resources(mon_tpl, "Microsoft.Insights/components").items():
        expect(
            dig(ai["body"], "properties", "DisableLocalAuth") is True,
            f"app insights {name}: DisableLocalAuth must be true",
        )
        expect(
            dig(ai["body"], "properties", "WorkspaceResourceId") is not None,
            f"app insights {name}: must be workspace-based",
        )
    for name, la in resources(mon_tpl, "Microsoft.OperationalInsights/workspaces").items():
        expect(
            dig(la["body"], "properties", "features", "disableLocalAuth") is True,
            f"workspace {name}: disableLocalAuth must be true",
        )

    # Function app: Flex Consumption, Python 3.11, user-assigned identity everywhere.
    fa_tpl = templates["modules/functionapp.bicep"]
    plan = only(resources(fa_tpl, "Microsoft.Web/serverfarms"), "plan")["body"]
    expect(
        dig(plan, "sku", "name") == "FC1" and dig(plan, "sku", "tier") == "FlexConsumption",
        "plan must be FC1 / FlexConsumption",
    )
    expect(dig(plan, "properties", "reserved") is True, "plan must be Linux (reserved: true)")
    site = only(resources(fa_tpl, "Microsoft.Web/sites"), "function app")["body"]
    props = site.get("properties", {})
    expect(site.get("kind") == "functionapp,linux", "function app kind must be functionapp,linux")
    expect(dig(site, "identity", "type") == "UserAssigned", "function app identity must be UserAssigned")
    expect(props.get("httpsOnly") is True, "function app: httpsOnly must be true")
    expect(
        props.get("keyVaultReferenceIdentity") == "identityId",
        "function app: keyVaultReferenceIdentity must be the user-assigned identity",
    )
    expect(dig(props, "siteConfig", "minTlsVersion") == "1.2", "function app: minTlsVersion must be 1.2")
    # Flex Consumption rejects siteConfig.ftpsState in newer regions (error 51021); the
    # basicPublishingCredentialsPolicies below turn FTP off instead.
    expect(dig(props, "siteConfig", "ftpsState") is None, "function app: no siteConfig.ftpsState on Flex Consumption")
    expect(dig(props, "siteConfig", "remoteDebuggingEnabled") is False, "function app: remote debugging must be off")
    runtime = dig(props, "functionAppConfig", "runtime") or {}
    expect(
        runtime.get("name") == "python" and runtime.get("version") == "3.11", "function app runtime must be python 3.11"
    )
    dep = dig(props, "functionAppConfig", "deployment", "storage") or {}
    expect(dep.get("type") == "blobContainer", "deployment storage must be a blob container")
    expect(
        dig(dep, "authentication", "type") == "UserAssignedIdentity",
        "deployment storage must authenticate with the user-assigned identity",
    )
    expect(
        dig(dep, "authentication", "userAssignedIdentityResourceId") == "identityId",
        "deployment storage identity must be the app's identity",
    )
    expect(
        dig(props, "functionAppConfig", "scaleAndConcurrency") is not None,
        "functionAppConfig.scaleAndConcurrency must be set",
    )
    basic = resources(fa_tpl, "Microsoft.Web/sites/basicPublishingCredentialsPolicies")
    expect(
        {b["body"]["name"] for b in basic.values() if dig(b["body"], "properties", "allow") is False} == {"ftp", "scm"},
        "basic-auth publishing (ftp and scm) must be disabled",
    )

    # App settings: identity-based storage, Entra App Insights, no secret value anywhere.
    settings = app_settings(templates)
    expect("AzureWebJobsStorage" not in settings, "AzureWebJobsStorage (a connection string) must not be written")
    expect(
        settings.get("AzureWebJobsStorage__credential") == "managedidentity",
        "AzureWebJobsStorage__credential must be managedidentity",
    )
    for suffix in ("accountName", "blobServiceUri", "queueServiceUri", "tableServiceUri", "clientId"):
        expect(f"AzureWebJobsStorage__{suffix}" in settings, f"AzureWebJobsStorage__{suffix} must be set")
    auth = str(settings.get("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", ""))
    expect(
        "Authorization=AAD" in auth and "ClientId=${identityClientId}" in auth,
        "APPLICATIONINSIGHTS_AUTHENTICATION_STRING must be Authorization=AAD;ClientId=<identity>",
    )
    # Secrets are read by the app at run time (TTL cache, re-read on rotation), never resolved by the
    # platform at start-up: no Key Vault reference can stop every function.
    expect("WEBHOOK_SECRET" not in settings, "WEBHOOK_SECRET must not be an app setting (read from Key Vault)")
    expect(
        not any("@Microsoft.KeyVault(" in json.dumps(value) for value in settings.values()),
        "no app setting may be a Key Vault reference",
    )
    secure = secure_params(main) | secure_params(fa_tpl)
    for name, value in settings.items():
        for p in secure:
            expect(not mentions(value, p), f"app setting {name} must not carry the secure parameter {p}")
        expect(name not in FLEX_FORBIDDEN_SETTINGS, f"app setting {name} is not allowed on Flex Consumption")
        expect(
            not re.search(r"AccountKey=|SharedAccessSignature|InstrumentationKey=", json.dumps(value)),
            f"app setting {name} holds a key",
        )

    # Role assignments: exactly the least-privilege set, with the right GUIDs.
    v.extend(role_violations(templates))

    # Outputs and templates: never a secret.
    for tpl_name, tpl in templates.items():
        secure = secure_params(tpl)
        for out_name, out in (tpl.get("outputs") or {}).items():
            for p in secure:
                expect(
                    not mentions(out.get("value"), p), f"{tpl_name}: output {out_name} exposes the secure parameter {p}"
                )
            if re.search(r"secret|password|key$", out_name, re.I):
                expect(
                    out_name.upper().endswith("_NAME") or out_name.upper().endswith("URL") or out_name == "uri",
                    f"{tpl_name}: output {out_name} looks like a secret",
                )
        text = json.dumps(tpl)
        expect(
            not re.search(r"\blist(Keys|Secrets|AccountSas|ServiceSas)\b", text),
            f"{tpl_name}: must not read keys (listKeys/listSecrets/SAS)",
        )
    return v


def role_violations(templates: dict[str, dict]) -> list[str]:
    v = []
    tpl = templates["modules/roles.bicep"]
    role_ids = dig(tpl, "variables", "roleIds", "value") or {}
    by_guid = {g: n for n, g in ROLE_GUIDS.items()}
    existing = {name: r["type"] for name, r in resources(tpl, existing=True).items()}
    found = set()
    for name, ra in resources(tpl, "Microsoft.Authorization/roleAssignments").items():
        body = ra["body"]
        keys = sorted(accessed(dig(body, "properties", "roleDefinitionId"), "roleIds"))
        if len(keys) != 1:
            v.append(f"role assignment {name}: roleDefinitionId must reference exactly one roleIds entry")
            continue
        guid = role_ids.get(keys[0], "?")
        role = by_guid.get(guid)
        if role is None:
            v.append(f"role assignment {name}: {guid} is not one of the expected built-in roles")
            continue
        if accessed(body.get("name"), "roleIds") != set(keys):
            v.append(f"role assignment {name}: its name must be derived from its role id")
        scope_type = existing.get(body.get("scope"), f"<{body.get('scope')}>")
        principal = dig(body, "properties", "principalId")
        found.add((role, scope_type, principal))
        if principal == "appPrincipalId" and dig(body, "properties", "principalType") != "ServicePrincipal":
            v.append(f"role assignment {name}: the managed identity's principalType must be ServicePrincipal")
    for missing in sorted(EXPECTED_ASSIGNMENTS - found):
        v.append(f"missing role assignment {missing}")
    for extra in sorted(found - EXPECTED_ASSIGNMENTS):
        v.append(f"unexpected role assignment {extra} (least privilege)")
    return v


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def templates() -> dict[str, dict]:
    return load_templates()


@pytest.mark.parametrize("path", bicep_files(), ids=lambda p: p.relative_to(INFRA).as_posix())
def test_every_bicep_file_parses(path: Path) -> None:
    parsed = pycep.BicepParser().parse(file_path=path)
    assert parsed.get("resources") or parsed.get("modules"), f"{path} declares nothing"


def test_expected_files_exist() -> None:
    for rel in ("main.bicep", "main.parameters.json", "README.md", ".checkov.yaml"):
        assert (INFRA / rel).is_file(), rel
    for mod in ("identity", "storage", "keyvault", "keyvault-secret", "monitoring", "functionapp", "roles"):
        assert (INFRA / "modules" / f"{mod}.bicep").is_file(), mod


def test_every_module_reference_resolves(templates: dict[str, dict]) -> None:
    for tpl_name, tpl in templates.items():
        base = (INFRA / tpl_name).parent
        for name, mod in modules(tpl).items():
            target = (base / mod["path"]).resolve()
            assert target.is_file(), f"{tpl_name}: module {name} -> {mod['path']} does not exist"
            params = set(load_templates_cache(target).get("parameters") or {})
            given = set(mod["body"].get("params", {}))
            assert given <= params, f"{tpl_name}: module {name} passes unknown params {sorted(given - params)}"
            required = {
                p
                for p, d in load_templates_cache(target)["parameters"].items()
                if "default" not in d or d["default"] is None
            }
            assert required <= given, f"{tpl_name}: module {name} misses required params {sorted(required - given)}"


_CACHE: dict[Path, dict] = {}


def load_templates_cache(path: Path) -> dict:
    if path not in _CACHE:
        _CACHE[path] = pycep.BicepParser().parse(file_path=path)
    return _CACHE[path]


def test_security_properties_hold(templates: dict[str, dict]) -> None:
    assert security_violations(templates) == []


def test_role_guids_and_doc_links_in_roles_bicep(templates: dict[str, dict]) -> None:
    text = (INFRA / "modules" / "roles.bicep").read_text()
    role_ids = templates["modules/roles.bicep"]["variables"]["roleIds"]["value"]
    assert set(role_ids.values()) == set(ROLE_GUIDS.values())
    for role, guid in ROLE_GUIDS.items():
        line = next((ln for ln in text.splitlines() if role in ln and guid in ln), None)
        assert line, f"roles.bicep must name {role} with {guid} in a comment"
        following = text.splitlines()[text.splitlines().index(line) + 1]
        assert "https://learn.microsoft.com/azure/role-based-access-control/built-in-roles/" in following, role
    assert role_violations(templates) == []


# One property flipped in a copy of infra/ -> the helper must object.
MUTATIONS = [
    ("modules/storage.bicep", "allowSharedKeyAccess: false", "allowSharedKeyAccess: true", "allowSharedKeyAccess"),
    ("modules/storage.bicep", "minimumTlsVersion: 'TLS1_2'", "minimumTlsVersion: 'TLS1_0'", "minimumTlsVersion"),
    ("modules/storage.bicep", "allowBlobPublicAccess: false", "allowBlobPublicAccess: true", "allowBlobPublicAccess"),
    (
        "modules/storage.bicep",
        "supportsHttpsTrafficOnly: true",
        "supportsHttpsTrafficOnly: false",
        "supportsHttpsTrafficOnly",
    ),
    ("modules/keyvault.bicep", "enablePurgeProtection: true", "enablePurgeProtection: false", "enablePurgeProtection"),
    (
        "modules/keyvault.bicep",
        "enableRbacAuthorization: true",
        "enableRbacAuthorization: false",
        "enableRbacAuthorization",
    ),
    ("modules/keyvault.bicep", "= if (!empty(clientSecretValue)) {", "= {", "only when"),
    ("modules/monitoring.bicep", "DisableLocalAuth: true", "DisableLocalAuth: false", "DisableLocalAuth"),
    (
        "modules/functionapp.bicep",
        "type: 'UserAssignedIdentity'",
        "type: 'SystemAssignedIdentity'",
        "user-assigned identity",
    ),
    ("modules/functionapp.bicep", "version: '3.11'", "version: '3.10'", "python 3.11"),
    ("modules/functionapp.bicep", "name: 'FC1'", "name: 'Y1'", "FC1"),
    ("modules/functionapp.bicep", "httpsOnly: true", "httpsOnly: false", "httpsOnly"),
    ("modules/functionapp.bicep", "AzureWebJobsStorage__credential: 'managedidentity'",
     "AzureWebJobsStorage__credential: 'connectionstring'", "managedidentity"),
    (
        "modules/roles.bicep",
        "monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'",
        "monitoringMetricsPublisher: 'b24988ac-6180-42a0-ab88-20f7382dd24c'",
        "not one of the expected",
    ),
    (
        "modules/roles.bicep",
        "roleIds.storageQueueDataContributor)\n  scope: storage",
        "roleIds.storageQueueDataContributor)\n  scope: vault",
        "Storage Queue Data Contributor",
    ),
    ("main.bicep", "      AUTH_ISSUER: authIssuer", "      AUTH_ISSUER: msClientSecret", "secure parameter msClientSecret"),
    ("main.bicep", "  'idempotency'\n", "", "tables must be"),
    (
        "main.bicep",
        "output KEY_VAULT_URL string = keyVault.outputs.uri",
        "output KEY_VAULT_URL string = keyVault.outputs.uri\noutput LEAK string = msClientSecret",
        "exposes the secure parameter",
    ),
]


@pytest.mark.parametrize(("rel", "old", "new", "expected"), MUTATIONS, ids=[m[3] + "@" + m[0] for m in MUTATIONS])
def test_flipped_property_is_caught(tmp_path: Path, rel: str, old: str, new: str, expected: str) -> None:
    copy = tmp_path / "infra"
    shutil.copytree(INFRA, copy)
    target = copy / rel
    text = target.read_text()
    assert text.count(old) == 1, f"mutation anchor {old!r} must occur exactly once in {rel}"
    target.write_text(text.replace(old, new))
    violations = security_violations(load_templates(copy))
    assert violations, f"flipping {old!r} -> {new!r} went unnoticed"
    assert any(expected in msg for msg in violations), violations


def test_app_settings_equal_config_settings(templates: dict[str, dict]) -> None:
    """Bicep writes exactly the declared non-local, non-platform settings (plus the host's own)."""
    from shared.config import SETTINGS, setting_names

    wanted = setting_names(include_local=False)
    written = set(app_settings(templates))
    # In Azure, host storage is identity-based: AzureWebJobsStorage (a connection string) is
    # replaced by the AzureWebJobsStorage__* settings.
    assert "AzureWebJobsStorage" in wanted
    expected = (wanted - {"AzureWebJobsStorage"}) | PLATFORM_SETTINGS
    assert written == expected, {"missing": sorted(expected - written), "unexpected": sorted(written - expected)}
    assert not (written & setting_names(include_local=True) - wanted), "a local-only setting is written"
    assert not written & {s.name for s in SETTINGS if s.platform}, "a platform-provided setting is written"
    assert not PLATFORM_SETTINGS & {s.name for s in SETTINGS}, "a declared setting is listed as host-only"


def test_setting_defaults_match_config(templates: dict[str, dict]) -> None:
    """Where Bicep fills a setting from main.bicep, its default is SETTINGS' (none for a required one)."""
    from shared.config import SETTINGS

    main_params = templates["main.bicep"]["parameters"]
    main_vars = templates["main.bicep"]["variables"]
    settings = app_settings(templates)
    checked = set()
    for s in SETTINGS:
        value = settings.get(s.name)
        if not isinstance(value, str):
            continue
        if value in main_params:
            bicep_default = main_params[value].get("default")
            if s.default is not None or s.required:
                assert _bicep_default_matches(s, bicep_default), f"{s.name}: default differs from SETTINGS"
            checked.add(s.name)
        elif value in main_vars and s.default is not None:
            assert main_vars[value]["value"] == s.default, f"{s.name}: value differs from SETTINGS default"
            checked.add(s.name)
    # Every written setting with a default (or required) is fed from main.bicep, so none escapes the check.
    must = {s.name for s in SETTINGS if s.name in settings and (s.default is not None or s.required)}
    assert must - {"PUBLIC_BASE_URL"} <= checked, sorted(must - checked)  # PUBLIC_BASE_URL: the app's own URL


def _bicep_default_matches(s: Any, bicep_default: Any) -> bool:
    if s.name == "MS_CLIENT_ID":
        # Required by the app, but empty in Bicep while bootstrapping with infra/entra-app (docs/deploy.md):
        # the app then refuses to start, naming it.
        return bicep_default == ""
    want = None if s.required else s.default
    return bicep_default == want or str(bicep_default) == want


def test_main_outputs(templates: dict[str, dict]) -> None:
    outputs = templates["main.bicep"]["outputs"]
    for name in (
        "FUNCTION_APP_URL",
        "REDIRECT_URI",
        "KEY_VAULT_URL",
        "KEY_VAULT_NAME",
        "AZURE_FUNCTION_APP_NAME",
        "AZURE_RESOURCE_GROUP",
    ):
        assert name in outputs, name
    assert outputs["REDIRECT_URI"]["value"].endswith("/api/connect/microsoft/callback")
    # The postprovision hook reads these names from the azd environment.
    hook = (ROOT / "scripts" / "postprovision.py").read_text()
    for name in (
        "KEY_VAULT_NAME",
        "TOKEN_KEYS_SECRET_NAME",
        "WEBHOOK_SECRET_NAME",
        "MS_CLIENT_SECRET_NAME",
        "MS_CLIENT_CREDENTIAL",
        "MS_CLIENT_CERT_NAME",
        "MANAGED_IDENTITY_PRINCIPAL_ID",
        "FEDERATED_CREDENTIAL_ISSUER",
    ):
        assert name in outputs and name in hook, name


def test_parameters_file_maps_azd_variables(templates: dict[str, dict]) -> None:
    params = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    main_params = templates["main.bicep"]["parameters"]
    assert set(params) <= set(main_params), sorted(set(params) - set(main_params))
    required = {n for n, p in main_params.items() if p.get("default") is None}
    assert required <= set(params), f"required parameters without an azd mapping: {sorted(required - set(params))}"
    values = {n: p["value"] for n, p in params.items()}
    assert values["environmentName"] == "${AZURE_ENV_NAME}"
    assert values["location"] == "${AZURE_LOCATION}"
    assert values["principalId"] == "${AZURE_PRINCIPAL_ID}"
    assert values["msClientId"] == "${MS_CLIENT_ID=}"
    assert "msClientSecret" in secure_params(templates["main.bicep"])


def test_azure_yaml() -> None:
    text = (ROOT / "azure.yaml").read_text()
    assert re.search(r"^services:\n  api:\n    project: \.\n    language: python\n    host: function$", text, re.M), (
        text
    )
    assert re.search(r"^  postprovision:$", text, re.M)
    assert "run: ./scripts/postprovision.sh" in text and "run: ./scripts/postprovision.ps1" in text
    for script in ("postprovision.sh", "postprovision.ps1", "postprovision.py"):
        assert (ROOT / "scripts" / script).is_file(), script
    assert os.access(ROOT / "scripts" / "postprovision.sh", os.X_OK)
    # The platform builds the package (Linux wheels for Python 3.11), whatever machine runs azd deploy.
    assert re.search(r"^    host: function\n(?:    #.*\n)*    remoteBuild: true$", text, re.M), text
    # The hooks' wrappers share one Python launcher per shell (scripts/run_hook.*).
    assert "run_hook.ps1" in (ROOT / "scripts" / "postprovision.ps1").read_text()
    ps1 = (ROOT / "scripts" / "run_hook.ps1").read_text()
    assert "PowerShell 7" in ps1 and ps1.index("'py'") < ps1.index("'python'") and "@('-3')" in ps1
    # The app tag azd uses to find the function app matches the service name.
    assert "var serviceName = 'api'" in (INFRA / "main.bicep").read_text()


def test_key_ring_is_not_generated_by_arm(templates: dict[str, dict]) -> None:
    """ARM has no real randomness: the key ring must come from the postprovision hook only."""
    for tpl_name, tpl in templates.items():
        parsed = json.dumps(tpl)
        assert "new_guid" not in parsed and "newGuid" not in parsed, f"{tpl_name} uses newGuid()"
        for name, mod in modules(tpl).items():
            if mod["path"].endswith("keyvault-secret.bicep"):
                assert not mentions(mod["body"]["params"].get("name"), "tokenKeysSecretName"), name
                assert "token-encryption-keys" not in json.dumps(mod["body"]), name
    assert "secrets.token_bytes" in (ROOT / "scripts" / "postprovision.py").read_text()


def test_checkov_skips_are_documented() -> None:
    config = (INFRA / ".checkov.yaml").read_text()
    skips = re.findall(r"^\s*-\s*(CKV2?_[A-Z]+_\d+)", config, re.M)
    assert skips, "no skips parsed from infra/.checkov.yaml"
    readme = (INFRA / "README.md").read_text()
    for check in skips:
        row = next((ln for ln in readme.splitlines() if ln.startswith(f"| {check} ")), None)
        assert row, f"{check} is skipped but has no row in infra/README.md"
        reason = row.split("|")[3].strip() if row.count("|") >= 4 else ""
        assert len(reason) > 40, f"{check}: the reason in infra/README.md is too thin"
    documented = set(re.findall(r"^\| (CKV2?_[A-Z]+_\d+) ", readme, re.M))
    assert documented == set(skips), "infra/README.md and infra/.checkov.yaml list different skips"
    inline = set()
    for path in INFRA.rglob("*.bicep"):
        inline |= set(re.findall(r"//\s*checkov:skip=(CKV2?_[A-Z]+_\d+):", path.read_text()))
    assert inline == {"CKV_AZURE_13", "CKV_AZURE_63", "CKV_AZURE_65", "CKV_AZURE_66", "CKV_AZURE_80",
                      "CKV_AZURE_88"}, "resource-scoped skips are only the web-config checks on appsettings"
    assert all(check in readme for check in inline), "a resource-scoped skip is not explained in infra/README.md"


def test_checkov_passes() -> None:
    """checkov runs in its own venv (it pins an old `packaging`); the script creates it on first use."""
    proc = subprocess.run(
        ["bash", str(ROOT / "tests" / "infra" / "run_checkov.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
