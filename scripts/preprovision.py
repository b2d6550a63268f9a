#!/usr/bin/env python3
"""azd preprovision hook: register the resource providers the deployment needs but does not name.

The Flex Consumption plan runs on Azure Container Apps infrastructure and needs the ``Microsoft.App``
resource provider registered in the subscription; a fresh subscription may not have it, and ARM registers
only the providers of the resource types a template declares (Microsoft.Web, Microsoft.Storage, …), so the
first ``azd provision`` would fail. This hook registers it once (a no-op when already registered) and waits
for the registration to finish. https://learn.microsoft.com/azure/azure-resource-manager/management/resource-providers-and-types

Environment (azd exports it): ``AZURE_SUBSCRIPTION_ID``; ``AZ`` overrides the Azure CLI executable.
Needs a role that may register providers (Contributor or Owner: the deployment needs one of them anyway).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

PROVIDERS = ("Microsoft.App",)


def main(environ: dict[str, str] | None = None) -> int:
    env = dict(os.environ if environ is None else environ)
    executable = env.get("AZ") or shutil.which("az")
    if not executable:
        print("preprovision: the Azure CLI (az) is required: https://aka.ms/azure-cli", file=sys.stderr)
        return 2
    subscription = env.get("AZURE_SUBSCRIPTION_ID", "").strip()
    scope = ["--subscription", subscription] if subscription else []
    for namespace in PROVIDERS:
        state = _az(executable, ["provider", "show", "--namespace", namespace, "--query", "registrationState",
                                 "-o", "tsv", *scope])
        if state is None:
            return 1
        if state.strip() == "Registered":
            print(f"preprovision: resource provider {namespace} is registered")
            continue
        print(f"preprovision: registering resource provider {namespace} (Flex Consumption needs it; a few minutes)")
        if _az(executable, ["provider", "register", "--namespace", namespace, "--wait", *scope]) is None:
            return 1
    return 0


def _az(executable: str, args: list[str]) -> str | None:
    proc = subprocess.run([executable, *args, "--only-show-errors"], capture_output=True, text=True, check=False)
    if proc.returncode == 0:
        return proc.stdout
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    print(f"preprovision: ERROR: az {' '.join(args[:3])} failed: {lines[-1] if lines else proc.returncode}. "
          "Register it yourself (az provider register --namespace Microsoft.App) or ask a subscription owner.",
          file=sys.stderr)
    return None


if __name__ == "__main__":
    sys.exit(main())
