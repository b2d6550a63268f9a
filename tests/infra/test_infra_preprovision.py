"""The azd preprovision hook (scripts/preprovision.py) against a fake Azure CLI: Microsoft.App, which Flex
Consumption needs and the template does not declare, is registered when it is not, and left alone when it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HOOK = ROOT / "scripts" / "preprovision.py"

FAKE_AZ = textwrap.dedent(
    """\
    import json, os, sys
    path = os.environ["FAKE_AZ_STATE"]
    state = json.load(open(path))
    args = sys.argv[1:]
    state["calls"].append(args)
    rc = 0
    if args[:2] == ["provider", "show"]:
        print(state["state"])
    elif args[:2] == ["provider", "register"]:
        if state.get("forbidden"):
            sys.stderr.write("ERROR: (AuthorizationFailed) The client does not have authorization.\\n")
            rc = 1
        else:
            state["state"] = "Registered"
    else:
        rc = 3
    json.dump(state, open(path, "w"))
    sys.exit(rc)
    """
)


def run(tmp_path: Path, state: str, forbidden: bool = False) -> tuple[subprocess.CompletedProcess[str], Any]:
    script = tmp_path / "az"
    script.write_text(f"#!{sys.executable}\n" + FAKE_AZ)
    script.chmod(0o755)
    state_path = tmp_path / "state.json"
    state_path.write_text(json.dumps({"state": state, "forbidden": forbidden, "calls": []}))
    env = {**os.environ, "AZ": str(script), "FAKE_AZ_STATE": str(state_path), "AZURE_SUBSCRIPTION_ID": "sub-1"}
    proc = subprocess.run([sys.executable, str(HOOK)], env=env, capture_output=True, text=True, timeout=60)
    return proc, json.loads(state_path.read_text())


def test_registers_microsoft_app_when_it_is_not(tmp_path: Path) -> None:
    proc, state = run(tmp_path, "NotRegistered")
    assert proc.returncode == 0, proc.stderr
    register = [c for c in state["calls"] if c[:2] == ["provider", "register"]]
    assert register and "Microsoft.App" in register[0] and "--wait" in register[0]
    assert "--subscription" in register[0] and "sub-1" in register[0]


def test_leaves_a_registered_provider_alone(tmp_path: Path) -> None:
    proc, state = run(tmp_path, "Registered")
    assert proc.returncode == 0 and not [c for c in state["calls"] if c[:2] == ["provider", "register"]]


def test_a_refused_registration_fails_with_what_to_do(tmp_path: Path) -> None:
    proc, _ = run(tmp_path, "NotRegistered", forbidden=True)
    assert proc.returncode == 1 and "az provider register --namespace Microsoft.App" in proc.stderr


def test_azure_yaml_runs_it_before_provisioning() -> None:
    text = (ROOT / "azure.yaml").read_text()
    hooks = text.split("\nhooks:\n", 1)[1].split("\n  postprovision:", 1)[0]  # the preprovision block
    assert "\n  preprovision:\n" in hooks
    assert "run: ./scripts/preprovision.sh" in hooks and "run: ./scripts/preprovision.ps1" in hooks
    for name in ("preprovision.sh", "preprovision.ps1"):
        assert "preprovision.py" in (ROOT / "scripts" / name).read_text()
    assert os.access(ROOT / "scripts" / "preprovision.sh", os.X_OK)
