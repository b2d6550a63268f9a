"""The operator CLI against the same Azurite storage and settings as the running host."""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
from typing import Any

from tests.conftest import ROOT, Host, connect


def cli(env: dict[str, str], *args: str, cwd: Any = ROOT) -> tuple[int, Any]:
    p = run_cli(env, *args, cwd=cwd)
    return p.returncode, json.loads(p.stdout)


def run_cli(env: dict[str, str], *args: str, cwd: Any = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_list_show_diagnose_refresh(host: Host, browser_session: Any) -> None:
    acc = connect(host, browser_session, sub="owner-cli", login_hint="megan@contoso.onmicrosoft.com")
    acc_id = acc["result"]["accountId"]
    rc, rows = cli(host.env, "list", "--owner", "owner-cli")
    assert rc == 0 and [r["id"] for r in rows] == [acc_id] and rows[0]["owner"] == "owner-cli"
    rc, one = cli(host.env, "show", "owner-cli", acc_id)
    assert rc == 0 and one["email"] == "megan@contoso.onmicrosoft.com"
    rc, diag = cli(host.env, "diagnose", "owner-cli", acc_id)
    assert rc == 0 and diag["healthy"] is True
    rc, refreshed = cli(host.env, "refresh", "owner-cli", acc_id)
    assert rc == 0 and refreshed["status"] == "active"
    rc, problem = cli(host.env, "show", "someone-else", acc_id)
    assert rc == 1 and problem["status"] == 404


def test_cli_reencrypt_moves_every_record_to_the_active_key(host: Host, browser_session: Any) -> None:
    connect(host, browser_session, sub="owner-cli-keys", login_hint="adele@contoso.onmicrosoft.com")
    ring = json.loads(host.env["TOKEN_ENCRYPTION_KEYS"])
    ring["keys"]["k2"] = base64.b64encode(secrets.token_bytes(32)).decode()
    ring["active"] = "k2"
    env = dict(host.env, TOKEN_ENCRYPTION_KEYS=json.dumps(ring))
    p = run_cli(env, "reencrypt")
    rc, out = p.returncode, json.loads(p.stdout)
    assert rc == 0 and out["activeKey"] == "k2" and out["reencrypted"] >= 1
    # Progress as it goes, on standard error (the JSON on standard output stays one document).
    last = p.stderr.strip().splitlines()[-1]
    assert last == f"reencrypt: {out['examined']}/{out['examined']} examined, {out['reencrypted']} re-encrypted"
    from azure.data.tables import TableClient

    t = TableClient.from_connection_string(host.env["AzureWebJobsStorage"], "accounts")
    kids = {e["tokensKid"] for e in t.list_entities() if e.get("tokens")}
    assert kids == {"k2"}
    # The running host still has only k1: records it writes from now on go back under k1,
    # and it can no longer read k2 records. Move everything back so later tests see one key.
    ring["active"] = "k1"
    rc, out = cli(dict(host.env, TOKEN_ENCRYPTION_KEYS=json.dumps(ring)), "reencrypt")
    assert rc == 0 and {e["tokensKid"] for e in t.list_entities() if e.get("tokens")} == {"k1"}


def test_cli_reads_local_settings_json_and_every_command_has_help(host: Host, tmp_path: Any) -> None:
    """Run locally without exported settings, the CLI takes them from local.settings.json as Core Tools does;
    a variable that is set wins over the file."""
    import os

    (tmp_path / "local.settings.json").write_text(json.dumps({"IsEncrypted": False, "Values": host.env}))
    bare = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    rc, rows = cli(bare, "list", "--owner", "owner-cli-settings", cwd=tmp_path)
    assert rc == 0 and rows == []
    rc, problem = cli({**bare, "AzureWebJobsStorage": "not a connection string"}, "list", cwd=tmp_path)
    assert rc == 1 and "AzureWebJobsStorage" in json.dumps(problem)  # the environment won over the file
    for command in ("list", "show", "diagnose", "refresh", "reencrypt"):
        p = run_cli(bare, command, "--help", cwd=tmp_path)
        assert p.returncode == 0 and "usage:" in p.stdout, command
        description = p.stdout.split("\n\n")[1]
        assert description.strip() and not description.startswith("positional"), (command, p.stdout)
    top = run_cli(bare, "--help", cwd=tmp_path).stdout
    for command in ("list", "show", "diagnose", "refresh", "reencrypt"):
        assert any(line.strip().startswith(command + " ") for line in top.splitlines()), (command, top)
