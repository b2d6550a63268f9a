"""One test per deploy defect found by review, so none can come back; and the optional
Bicep path that creates the Entra app registration (Microsoft Graph Bicep extension)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pycep", reason="pycep-parser is needed to parse Bicep offline")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.infra.test_infra_bicep import (  # noqa: E402
    INFRA,
    app_settings,
    dig,
    load_templates,
    mentions,
    modules,
    only,
    resources,
)


@pytest.fixture(scope="module")
def templates() -> dict[str, dict[str, Any]]:
    return load_templates()


def _site(templates: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return dict(only(resources(templates["modules/functionapp.bicep"], "Microsoft.Web/sites"), "function app")["body"])


def test_no_ftps_state_on_flex_and_ftp_is_off_by_policy(templates: dict[str, dict[str, Any]]) -> None:
    for path in INFRA.rglob("*.bicep"):
        assert not re.search(r"^\s*ftpsState\s*:", path.read_text(), re.M), f"{path}: Flex rejects ftpsState (51021)"
    policies = resources(templates["modules/functionapp.bicep"], "Microsoft.Web/sites/basicPublishingCredentialsPolicies")
    assert {p["body"]["name"] for p in policies.values() if dig(p["body"], "properties", "allow") is False} == {
        "ftp", "scm"}


def test_host_json_holds_no_setting_that_opentelemetry_mode_ignores() -> None:
    """With "telemetryMode": "OpenTelemetry" the host's Application Insights logger is not used: its
    ``logging.applicationInsights`` section (classic sampling) and the ``Host.Results`` category (the classic
    request rows) have no effect, and request rows come from OpenTelemetry spans (docs/operations.md)."""
    host = json.loads((ROOT / "host.json").read_text())
    assert host["telemetryMode"] == "OpenTelemetry"
    assert "applicationInsights" not in host["logging"]
    assert "Host.Results" not in host["logging"]["logLevel"]
    ops = (ROOT / "docs" / "operations.md").read_text()
    assert "Host.Results" in ops and "samplingSettings" in ops  # what was dropped, and why, is written down


def test_demo_is_not_deployed(templates: dict[str, dict[str, Any]]) -> None:
    from shared.config import SETTINGS

    assert next(s for s in SETTINGS if s.name == "DEMO_ENABLED").local_only
    assert "DEMO_ENABLED" not in app_settings(templates)
    for path in [*INFRA.rglob("*.bicep"), INFRA / "main.parameters.json"]:
        assert "demoEnabled" not in path.read_text() and "DEMO_ENABLED" not in path.read_text(), path
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    assert "DEMO_ENABLED=true" not in deploy


def test_public_base_url_is_normalised_once(templates: dict[str, dict[str, Any]]) -> None:
    main = templates["main.bicep"]
    var = main["variables"]["publicBaseUrlNormalised"]["value"]
    text = json.dumps(var)
    assert "ends_with" in text or "endsWith" in text
    assert mentions(var, "publicBaseUrl") and "substring" in text
    call = next(m for m in modules(main).values() if m["path"] == "modules/functionapp.bicep")
    assert call["body"]["params"]["publicBaseUrl"] == "publicBaseUrlNormalised"
    # The raw parameter feeds nothing else (a use is the identifier on a right-hand side, not `x.publicBaseUrl`).
    uses = [ln for ln in (INFRA / "main.bicep").read_text().splitlines()
            if re.search(r"(?<![\w.'])publicBaseUrl(?!\w)(?!\s*:)", ln) and not ln.lstrip().startswith("param ")]
    assert len(uses) == 1 and uses[0].startswith("var publicBaseUrlNormalised ="), uses
    assert "functionApp.outputs.publicBaseUrl" in (INFRA / "main.bicep").read_text().split("output REDIRECT_URI")[1]
    # The app strips it too: both sides give the same redirect URI.
    from shared.config import load_settings
    from tests.shared.test_config import GOOD

    assert load_settings({**GOOD, "PUBLIC_BASE_URL": "https://mail.example.com/"}).public_base_url == (
        "https://mail.example.com")


def test_no_key_vault_reference_and_webhook_secret_read_at_run_time(templates: dict[str, dict[str, Any]]) -> None:
    settings = app_settings(templates)
    assert "WEBHOOK_SECRET" not in settings and settings["WEBHOOK_SECRET_NAME"] == "webhookSecretName"
    for path in INFRA.rglob("*.bicep"):
        assert "@Microsoft.KeyVault(" not in path.read_text(), path
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    assert "## Rotating the webhook secret" in deploy


def test_parameters_file_maps_every_setting_parameter(templates: dict[str, dict[str, Any]]) -> None:
    params = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    main_params = templates["main.bicep"]["parameters"]
    for name in ("msAuthorityHost", "msScopes", "graphBaseUrl", "refreshSchedule", "cleanupSchedule", "keepaliveDays",
                 "sendMaxTotalBytes", "maximumInstanceCount", "instanceMemoryMB", "msClientCredential",
                 "msClientCertName", "zoneRedundant", "alwaysReadyHttpInstances", "grantDeployerDataRoles"):
        assert name in params, f"{name}: `azd env set` would silently do nothing"
    # Every main.bicep parameter that fills an app setting is mapped from the azd variable of that name,
    # with the same default.
    for setting, value in app_settings(templates).items():
        if isinstance(value, str) and value in main_params and setting != "MS_CLIENT_ID":
            mapped = params.get(value, {}).get("value", "")
            assert mapped.startswith("${" + setting), (value, mapped)
            default = main_params[value].get("default")
            if default is not None:
                assert mapped == f"${{{setting}={default}}}", (setting, mapped)
    assert set(params) <= set(main_params)


def test_flex_limits_location_metadata_and_no_cors(templates: dict[str, dict[str, Any]]) -> None:
    for tpl in ("main.bicep", "modules/functionapp.bicep"):
        decorators = templates[tpl]["parameters"]["maximumInstanceCount"]["decorators"]
        assert {"type": "min_value", "argument": 40} in decorators or any(
            d.get("type") == "min_value" and d.get("argument") == 40 for d in decorators), decorators
    loc = templates["main.bicep"]["parameters"]["location"]["decorators"]
    assert any(d.get("type") == "metadata" and d["argument"] == {"azd": {"type": "location"}} for d in loc)
    assert dig(_site(templates), "properties", "siteConfig", "cors") is None


def test_zone_redundancy_and_always_ready_are_parameters_off_by_default(templates: dict[str, dict[str, Any]]) -> None:
    main = templates["main.bicep"]["parameters"]
    assert main["zoneRedundant"]["default"] is False and main["alwaysReadyHttpInstances"]["default"] == 0
    fa = templates["modules/functionapp.bicep"]
    plan = only(resources(fa, "Microsoft.Web/serverfarms"), "plan")["body"]
    assert dig(plan, "properties", "zoneRedundant") == "zoneRedundant"
    scale = dig(_site(templates), "properties", "functionAppConfig", "scaleAndConcurrency")
    text = json.dumps(scale["alwaysReady"])
    assert "alwaysReadyHttpInstances" in text and '"http"' in text


def test_deployer_data_roles_are_optional(templates: dict[str, dict[str, Any]]) -> None:
    roles = resources(templates["modules/roles.bicep"], "Microsoft.Authorization/roleAssignments")
    for name, flag in (("deployerTableContributor", "grantDeployerDataRoles"),
                       ("deployerCertificatesOfficer", "grantDeployerCertificatesOfficer")):
        assert mentions(roles[name]["condition"], flag), name
    assert templates["main.bicep"]["parameters"]["grantDeployerDataRoles"]["default"] is False


def test_deploy_doc_walks_secret_and_secretless_paths() -> None:
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    assert "store the PEM in Key Vault the same way" not in deploy
    for needle in ("MS_CLIENT_CREDENTIAL=certificate", "MS_CLIENT_CREDENTIAL=managed_identity",
                   "az ad app federated-credential create", "az keyvault certificate create",
                   "az ad app credential reset", "signInAudience", "infra/entra-app/main.bicep",
                   "AADSTS700027", "AADSTS70021", "AADSTS700024"):
        assert needle in deploy, needle


# --------------------------------------------------------------------------------------------
# The optional app registration template (Microsoft Graph Bicep extension)
# --------------------------------------------------------------------------------------------

GRAPH_DELEGATED = {  # https://learn.microsoft.com/graph/permissions-reference
    "offline_access": "7427e0e9-2fba-42fe-b0c0-848c9e6a8182",
    "openid": "37f7f235-527c-4136-accd-4a02d197296e",
    "profile": "14dad69e-099b-42c9-810b-d002981feec1",
    "User.Read": "e1fe6dd8-ba31-4d61-89e7-88639da4683d",
    "Mail.ReadWrite": "024d486e-b451-40bb-833d-3e66d98c5c73",
    "Mail.Send": "e383f46e-2787-4529-855e-0e479a3ffac0",
}


def test_app_registration_template_is_optional_and_complete(templates: dict[str, dict[str, Any]]) -> None:
    tpl = templates["entra-app/main.bicep"]
    assert "microsoftGraphV1" in tpl["extensions"]
    config = json.loads((INFRA / "entra-app" / "bicepconfig.json").read_text())
    assert config["extensions"]["microsoftGraphV1"].startswith("br:mcr.microsoft.com/bicep/extensions/microsoftgraph/")
    # Off by default: azd deploys infra/main.bicep, which never references it.
    assert "entra-app" not in json.dumps(modules(templates["main.bicep"]))
    app = only(resources(tpl, "Microsoft.Graph/applications@v1.0".split("@")[0]), "application")["body"]
    assert dig(app, "web", "redirectUris") == ["redirectUri"]
    assert set(tpl["variables"]["delegatedScopes"]["value"].values()) == set(GRAPH_DELEGATED.values())
    assert mentions(app["requiredResourceAccess"], "graphAppId")
    assert tpl["variables"]["graphAppId"]["value"] == "00000003-0000-0000-c000-000000000000"
    fic = only(resources(tpl, "Microsoft.Graph/applications/federatedIdentityCredentials"), "federated credential")
    assert fic["body"]["subject"] == "managedIdentityPrincipalId"
    assert fic["body"]["audiences"] == ["federatedCredentialAudience"]
    assert tpl["parameters"]["federatedCredentialAudience"]["default"] == "api://AzureADTokenExchange"
    # No federated credential for an audience with personal accounts (the app refuses that combination).
    assert mentions(fic["condition"], "personalAccounts")
    assert resources(tpl, "Microsoft.Graph/servicePrincipals")


def test_every_main_parameter_is_mapped_for_azd() -> None:
    """azd fills a parameter only through main.parameters.json: one missing there cannot be set with
    `azd env set` (keyVaultSoftDeleteRetentionInDays was)."""
    import re

    params = re.findall(r"^param (\w+)", (INFRA / "main.bicep").read_text(), re.M)
    mapped = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    assert params and [p for p in params if p not in mapped] == []
    assert mapped["keyVaultSoftDeleteRetentionInDays"]["value"] == "${KEY_VAULT_SOFT_DELETE_RETENTION_DAYS=90}"


def test_the_graph_bicep_option_states_its_requirements() -> None:
    text = (INFRA / "entra-app" / "main.bicep").read_text()
    assert "v0.36.1" in text and "public cloud only" in text
    assert "microsoftgraph/v1.0:1.0.0" in (INFRA / "entra-app" / "bicepconfig.json").read_text()


def test_location_offers_only_flex_consumption_regions(templates: dict[str, dict[str, Any]]) -> None:
    decorators = templates["main.bicep"]["parameters"]["location"]["decorators"]
    allowed = next(d["argument"] for d in decorators if d["type"] == "allowed")
    assert len(allowed) >= 20 and {"eastus", "westeurope", "swedencentral", "australiaeast"} <= set(allowed)
    assert all(re.fullmatch(r"[a-z0-9]+", r) for r in allowed) and "eastus2euap" not in allowed  # no canary
    assert "list-flexconsumption-locations" in (ROOT / "docs" / "deploy.md").read_text()


def test_public_base_url_is_the_sites_default_host_name(templates: dict[str, dict[str, Any]]) -> None:
    """Not built from the app name and a DNS suffix: App Service's regional default host names are not
    predictable, so the value is the site's own ``defaultHostName`` (app settings written after the site)."""
    fa = templates["modules/functionapp.bicep"]
    assert app_settings(templates)["PUBLIC_BASE_URL"] == "baseUrl"
    base = json.dumps(fa["variables"]["baseUrl"])
    assert "defaultHostName" in base and "azurewebsites" not in base and "appServiceDnsSuffix" not in base
