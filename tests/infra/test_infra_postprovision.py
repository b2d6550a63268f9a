"""The azd postprovision hook (scripts/postprovision.py) against a fake Azure CLI.

It must create the token key ring and the webhook secret only when absent, with real randomness,
never overwrite them, never put a secret on a command line or in its output, and fail (creating
nothing) when it cannot tell whether a secret exists.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOOK = ROOT / "scripts" / "postprovision.py"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FAKE_AZ = textwrap.dedent(
    """\
    import json, os, sys
    state_path = os.environ["FAKE_AZ_STATE"]
    with open(state_path) as fh:
        state = json.load(fh)
    args = sys.argv[1:]
    state["calls"].append(args)

    def opt(name):
        return args[args.index(name) + 1] if name in args else None

    def save():
        with open(state_path, "w") as fh:
            json.dump(state, fh)

    rc = 0
    if args[:3] == ["keyvault", "secret", "list"]:
        if state.get("forbidden"):
            sys.stderr.write("ERROR: (Forbidden) Caller is not authorized to perform action on resource.\\n")
            rc = 1
        else:
            print(json.dumps(sorted(state["secrets"])))
    elif args[:3] == ["keyvault", "secret", "list-deleted"]:
        print(json.dumps(sorted(state["deleted"])))
    elif args[:3] == ["keyvault", "secret", "show"]:
        print(state["secrets"][opt("--name")])
    elif args[:3] == ["keyvault", "secret", "set"]:
        with open(opt("--file"), encoding="utf-8") as fh:
            state["secrets"][opt("--name")] = fh.read()
        state["content_types"][opt("--name")] = opt("--content-type")
    elif args[:3] == ["keyvault", "certificate", "get-default-policy"]:
        print(json.dumps({"issuerParameters": {"name": "Self"}, "keyProperties": {"exportable": True,
                          "keySize": 2048, "keyType": "RSA"}, "secretProperties": {"contentType":
                          "application/x-pkcs12"}, "x509CertificateProperties": {"subject": "CN=CLIGetDefaultPolicy",
                          "validityInMonths": 12}, "lifetimeActions": [{"action": {"actionType": "AutoRenew"},
                          "trigger": {"daysBeforeExpiry": 90}}]}))
    elif args[:3] == ["keyvault", "certificate", "create"]:
        with open(opt("--policy")[1:], encoding="utf-8") as fh:
            state["policies"][opt("--name")] = json.load(fh)
        state["secrets"][opt("--name")] = "<pkcs12>"
    elif args[:2] == ["functionapp", "restart"]:
        pass
    else:
        sys.stderr.write("fake az: unexpected " + " ".join(args) + "\\n")
        rc = 3
    save()
    sys.exit(rc)
    """
)


@pytest.fixture
def fake_az(tmp_path: Path):
    script = tmp_path / "az"
    script.write_text(f"#!{sys.executable}\n" + FAKE_AZ)
    script.chmod(0o755)
    state_path = tmp_path / "state.json"

    def run(secrets: dict[str, str] | None = None, deleted: list[str] | None = None, forbidden: bool = False,
            **extra: str):
        if secrets is not None or not state_path.exists():
            state = {
                "secrets": secrets or {},
                "deleted": deleted or [],
                "forbidden": forbidden,
                "calls": [],
                "content_types": {},
                "policies": {},
            }
            state_path.write_text(json.dumps(state))
        env = {
            **os.environ,
            "AZ": str(script),
            "FAKE_AZ_STATE": str(state_path),
            "KEY_VAULT_NAME": "kv-test",
            "TOKEN_KEYS_SECRET_NAME": "token-encryption-keys",
            "WEBHOOK_SECRET_NAME": "webhook-secret",
            "AZURE_FUNCTION_APP_NAME": "func-test",
            "AZURE_RESOURCE_GROUP": "rg-test",
            "POSTPROVISION_RETRIES": "2",
            "POSTPROVISION_RETRY_DELAY": "0",
            **extra,
        }
        proc = subprocess.run([sys.executable, str(HOOK)], env=env, capture_output=True, text=True, timeout=60)
        return proc, json.loads(state_path.read_text())

    return run


def _key(ring: str) -> bytes:
    doc = json.loads(ring)
    return base64.b64decode(doc["keys"][doc["active"]])


def test_creates_key_ring_and_webhook_secret_when_absent(fake_az) -> None:
    proc, state = fake_az(secrets={})
    assert proc.returncode == 0, proc.stderr
    ring = state["secrets"]["token-encryption-keys"]
    doc = json.loads(ring)
    assert doc["active"] == "k1" and set(doc["keys"]) == {"k1"}
    assert len(_key(ring)) == 32
    assert len(state["secrets"]["webhook-secret"]) >= 40
    assert state["content_types"]["token-encryption-keys"] == "application/json"
    # WEBHOOK_SECRET is read by the app at run time (no Key Vault reference): nothing to restart.
    assert not any(c[:2] == ["functionapp", "restart"] for c in state["calls"])
    assert "ms-client-secret" in proc.stdout  # the note for the default credential kind
    # The app's own parser accepts it.
    from shared.config import parse_key_ring

    assert len(parse_key_ring(ring, setting="TOKEN_ENCRYPTION_KEYS").keys["k1"]) == 32


def test_secret_values_never_on_a_command_line_or_in_output(fake_az) -> None:
    proc, state = fake_az(secrets={})
    assert proc.returncode == 0, proc.stderr
    argv = json.dumps(state["calls"])
    output = proc.stdout + proc.stderr
    for value in state["secrets"].values():
        key_material = json.loads(value)["keys"]["k1"] if value.startswith("{") else value
        assert key_material not in argv
        assert key_material not in output


def test_each_run_draws_fresh_randomness(fake_az, tmp_path: Path) -> None:
    _, first = fake_az(secrets={})
    _, second = fake_az(secrets={})
    assert _key(first["secrets"]["token-encryption-keys"]) != _key(second["secrets"]["token-encryption-keys"])
    assert first["secrets"]["webhook-secret"] != second["secrets"]["webhook-secret"]


def test_reprovisioning_never_rotates_existing_secrets(fake_az) -> None:
    _, created = fake_az(secrets={})
    proc, again = fake_az()  # same vault, second `azd provision`
    assert proc.returncode == 0, proc.stderr
    assert again["secrets"] == created["secrets"]
    assert not any(call[:3] == ["keyvault", "secret", "set"] for call in again["calls"][len(created["calls"]) :])
    assert "left unchanged" in proc.stdout


def test_webhook_secret_given_through_bicep_is_kept(fake_az) -> None:
    proc, state = fake_az(secrets={"webhook-secret": "operator-chosen"})
    assert proc.returncode == 0, proc.stderr
    assert state["secrets"]["webhook-secret"] == "operator-chosen"
    assert not any(c[:2] == ["functionapp", "restart"] for c in state["calls"])


def test_fails_without_creating_when_existence_is_unknown(fake_az) -> None:
    proc, state = fake_az(secrets={}, forbidden=True)
    assert proc.returncode != 0
    assert state["secrets"] == {}
    assert not any(call[:3] == ["keyvault", "secret", "set"] for call in state["calls"])
    assert "Forbidden" in proc.stderr


def test_soft_deleted_key_ring_must_be_recovered_not_replaced(fake_az) -> None:
    proc, state = fake_az(secrets={}, deleted=["token-encryption-keys"])
    assert proc.returncode != 0
    assert "token-encryption-keys" not in state["secrets"]
    assert "az keyvault secret recover" in proc.stderr


def test_malformed_existing_key_ring_is_reported_without_its_value(fake_az) -> None:
    proc, _ = fake_az(secrets={"token-encryption-keys": "not-json-s3cr3t", "webhook-secret": "x"})
    assert proc.returncode != 0
    assert "key ring" in proc.stderr
    assert "s3cr3t" not in proc.stdout + proc.stderr


def test_missing_vault_name_is_a_clear_error() -> None:
    env = {k: v for k, v in os.environ.items() if k != "KEY_VAULT_NAME"}
    proc = subprocess.run([sys.executable, str(HOOK)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "KEY_VAULT_NAME" in proc.stderr


def test_posix_wrapper_runs_the_python_hook() -> None:
    env = {k: v for k, v in os.environ.items() if k != "KEY_VAULT_NAME"}
    proc = subprocess.run(["sh", str(ROOT / "scripts" / "postprovision.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "KEY_VAULT_NAME" in proc.stderr


def test_rich_notifications_get_their_certificate_once(fake_az) -> None:
    proc, state = fake_az({}, NOTIFICATIONS_RESOURCE_DATA="true", NOTIFICATION_CERT_NAME="notification-cert")
    assert proc.returncode == 0, proc.stderr
    policy = state["policies"]["notification-cert"]
    assert policy["keyProperties"]["exportable"] is True and policy["keyProperties"]["keyType"] == "RSA"
    first = len(state["calls"])
    again, state = fake_az(None, NOTIFICATIONS_RESOURCE_DATA="true", NOTIFICATION_CERT_NAME="notification-cert")
    assert again.returncode == 0 and "certificate 'notification-cert' already exists" in again.stdout
    assert not any(call[:3] == ["keyvault", "certificate", "create"] for call in state["calls"][first:])


def test_no_certificate_without_rich_notifications(fake_az) -> None:
    proc, state = fake_az({})
    assert proc.returncode == 0, proc.stderr
    assert not any(call[:2] == ["keyvault", "certificate"] for call in state["calls"])
