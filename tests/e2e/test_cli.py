"""The operator CLI against the same Azurite storage and settings as the running host."""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
from typing import Any

from tests.conftest import ROOT, Host, connect


def cli(env: dict[str, str], *args: str) -> tuple[int, Any]:
    p = subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    return p.returncode, json.loads(p.stdout)


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
    rc, out = cli(env, "reencrypt")
    assert rc == 0 and out["activeKey"] == "k2" and out["reencrypted"] >= 1
    from azure.data.tables import TableClient

    t = TableClient.from_connection_string(host.env["AzureWebJobsStorage"], "accounts")
    kids = {e["tokensKid"] for e in t.list_entities() if e.get("tokens")}
    assert kids == {"k2"}
    # The running host still has only k1: records it writes from now on go back under k1,
    # and it can no longer read k2 records. Move everything back so later tests see one key.
    ring["active"] = "k1"
    rc, out = cli(dict(host.env, TOKEN_ENCRYPTION_KEYS=json.dumps(ring)), "reencrypt")
    assert rc == 0 and {e["tokensKid"] for e in t.list_entities() if e.get("tokens")} == {"k1"}
