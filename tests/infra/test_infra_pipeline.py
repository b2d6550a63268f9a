"""The GitHub Actions workflow `azd pipeline config` uses: the provision hooks call the Azure CLI, so the Azure CLI
is signed in (federated credential, no secret) before `azd provision`, beside azd's own sign-in."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "azure-dev.yml"


def test_the_hooks_have_an_azure_cli_sign_in_in_the_pipeline() -> None:
    text = WORKFLOW.read_text()
    azd_login = text.index("azd auth login")
    az_login = text.index("uses: azure/login@")
    provision = text.index("run: azd provision")
    assert azd_login < provision and az_login < provision
    assert "--federated-credential-provider github" in text and "id-token: write" in text
    assert "client-secret" not in text and "creds:" not in text  # no stored secret
    assert 'python-version: "3.11"' in text  # the hooks are Python
    assert "AZURE_PRINCIPAL_TYPE: ServicePrincipal" in text
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    assert "azd pipeline config" in deploy and ".github/workflows/azure-dev.yml" in deploy
