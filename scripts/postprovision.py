#!/usr/bin/env python3
"""azd postprovision hook: create the app's generated secrets in Key Vault, once.

Creates, only if they do not exist yet:

* ``token-encryption-keys`` (``TOKEN_KEYS_SECRET_NAME``): the token key ring
  ``{"active":"k1","keys":{"k1":"<base64 of 32 random bytes>"}}`` from :mod:`secrets` (the
  operating system's CSPRNG). ARM has no real randomness (``uniqueString``/``newGuid`` are
  derived or predictable), which is why this is not done in Bicep.
* ``webhook-secret`` (``WEBHOOK_SECRET_NAME``): the webhook HMAC secret, unless Bicep already
  wrote one from the ``WEBHOOK_SECRET`` azd variable. The app reads it at run time (no Key Vault
  reference, so no restart is needed after it is created).

* ``notification-cert`` (``NOTIFICATION_CERT_NAME``), when ``NOTIFICATIONS_RESOURCE_DATA`` is true: the Key Vault
  certificate Graph encrypts rich notifications to, self-signed with Key Vault's default policy (RSA 2048,
  exportable key, renewed automatically before it expires; each renewal is a new version the app picks up).
  Certificates are data-plane objects ARM cannot create, which is why this is not done in Bicep.

An existing secret is never overwritten, so ``azd provision`` / ``azd up`` can be re-run without
rotating the key ring (which would make every stored token unreadable). Rotation is a separate,
deliberate step (docs/deploy.md). Secret values are passed to ``az`` through a private temporary
file, never on the command line, and are never printed.

Environment (azd exports the Bicep outputs): ``KEY_VAULT_NAME`` (required),
``TOKEN_KEYS_SECRET_NAME``, ``WEBHOOK_SECRET_NAME``, ``MS_CLIENT_CREDENTIAL``,
``MS_CLIENT_SECRET_NAME``, ``MS_CLIENT_CERT_NAME``, ``NOTIFICATIONS_RESOURCE_DATA``, ``NOTIFICATION_CERT_NAME``;
``AZ`` overrides the Azure CLI executable;
``POSTPROVISION_RETRIES`` / ``POSTPROVISION_RETRY_DELAY`` tune the wait for the new Key Vault
role assignment to propagate.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

KEY_BYTES = 32


class HookError(Exception):
    """A failure the operator must act on; the message never contains a secret."""


def new_key_ring() -> str:
    key = base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")
    return json.dumps({"active": "k1", "keys": {"k1": key}}, separators=(",", ":"))


def new_webhook_secret() -> str:
    return secrets.token_urlsafe(32)


def check_key_ring(raw: str) -> None:
    """Raise HookError if ``raw`` is not a usable key ring (without echoing any of it)."""
    try:
        doc = json.loads(raw)
        active = doc["active"]
        keys = {k: base64.b64decode(v, validate=True) for k, v in doc["keys"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise HookError('the stored key ring is not JSON {"active":kid,"keys":{kid:base64}}') from None
    if active not in keys:
        raise HookError("the stored key ring's active key id is not in its keys")
    if any(len(k) != KEY_BYTES for k in keys.values()):
        raise HookError("every key in the stored key ring must be 32 bytes (AES-256)")


class AzCli:
    def __init__(self, executable: str, retries: int, delay: float) -> None:
        self.executable = executable
        self.retries = retries
        self.delay = delay

    def run(self, args: Sequence[str], *, retry: bool = False) -> str:
        attempts = self.retries if retry else 1
        last = ""
        for attempt in range(1, attempts + 1):
            proc = subprocess.run(
                [self.executable, *args, "--only-show-errors"],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode == 0:
                return proc.stdout
            lines = (proc.stderr or proc.stdout or "").strip().splitlines()
            last = lines[-1] if lines else f"exit code {proc.returncode}"
            if attempt < attempts:
                print(
                    f"postprovision: az {args[0]} {args[1]} {args[2]} failed ({last}); "
                    f"retrying in {self.delay:g}s ({attempt}/{attempts - 1}) - a new role assignment "
                    "can take a few minutes to apply",
                    file=sys.stderr,
                )
                time.sleep(self.delay)
        raise HookError(f"az {' '.join(args[:3])} failed: {last}")

    def secret_names(self, vault: str) -> set[str]:
        out = self.run(
            ["keyvault", "secret", "list", "--vault-name", vault, "--query", "[].name", "-o", "json"], retry=True
        )
        return set(json.loads(out or "[]"))

    def deleted_secret_names(self, vault: str) -> set[str]:
        out = self.run(
            ["keyvault", "secret", "list-deleted", "--vault-name", vault, "--query", "[].name", "-o", "json"],
            retry=True,
        )
        return set(json.loads(out or "[]"))

    def secret_value(self, vault: str, name: str) -> str:
        return self.run(
            ["keyvault", "secret", "show", "--vault-name", vault, "--name", name, "--query", "value", "-o", "tsv"]
        ).rstrip("\r\n")

    def set_secret(self, vault: str, name: str, value: str, content_type: str) -> None:
        fd, path = tempfile.mkstemp(prefix="kv-", suffix=".txt")  # mode 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
                fh.write(value)
            self.run(
                [
                    "keyvault",
                    "secret",
                    "set",
                    "--vault-name",
                    vault,
                    "--name",
                    name,
                    "--file",
                    path,
                    "--encoding",
                    "utf-8",
                    "--content-type",
                    content_type,
                    "--output",
                    "none",
                ]
            )
        finally:
            os.unlink(path)


def ensure_certificate(az: AzCli, vault: str, name: str, existing: set[str], deleted: set[str]) -> bool:
    """Create Key Vault certificate ``name`` (self-signed, Key Vault's default policy) unless it exists; a
    certificate's key is the secret of the same name, so the secret list tells. Return True if it was created."""
    if name in existing:
        print(f"postprovision: certificate '{name}' already exists in {vault}; left unchanged")
        return False
    if name in deleted:
        raise HookError(f"certificate '{name}' is soft-deleted in {vault}. Recover it: "
                        f"az keyvault certificate recover --vault-name {vault} --name {name}")
    policy = az.run(["keyvault", "certificate", "get-default-policy", "-o", "json"])
    fd, path = tempfile.mkstemp(prefix="kv-policy-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(policy)
        az.run(["keyvault", "certificate", "create", "--vault-name", vault, "--name", name, "--policy", f"@{path}",
                "--output", "none"], retry=True)
    finally:
        os.unlink(path)
    print(f"postprovision: created certificate '{name}' in {vault} (rich notifications)")
    return True


def ensure_secret(
    az: AzCli, vault: str, name: str, existing: set[str], deleted: set[str], make: Callable[[], str], content_type: str
) -> bool:
    """Create secret ``name`` unless it exists; return True if it was created."""
    if name in existing:
        print(f"postprovision: secret '{name}' already exists in {vault}; left unchanged")
        return False
    if name in deleted:
        raise HookError(
            f"secret '{name}' is soft-deleted in {vault}. Recover it (do not replace it: tokens encrypted "
            f"with it would be lost): az keyvault secret recover --vault-name {vault} --name {name}"
        )
    az.set_secret(vault, name, make(), content_type)
    print(f"postprovision: created secret '{name}' in {vault}")
    return True


def main(environ: dict[str, str] | None = None) -> int:
    env = dict(os.environ if environ is None else environ)
    vault = env.get("KEY_VAULT_NAME", "").strip()
    if not vault:
        print("postprovision: KEY_VAULT_NAME is not set (run this as the azd postprovision hook)", file=sys.stderr)
        return 2
    executable = env.get("AZ") or shutil.which("az")
    if not executable:
        print("postprovision: the Azure CLI (az) is required: https://aka.ms/azure-cli", file=sys.stderr)
        return 2
    az = AzCli(
        executable,
        retries=max(1, int(env.get("POSTPROVISION_RETRIES", "12"))),
        delay=float(env.get("POSTPROVISION_RETRY_DELAY", "10")),
    )
    keys_name = env.get("TOKEN_KEYS_SECRET_NAME") or "token-encryption-keys"
    webhook_name = env.get("WEBHOOK_SECRET_NAME") or "webhook-secret"
    try:
        existing = az.secret_names(vault)
        deleted = az.deleted_secret_names(vault)
        ensure_secret(az, vault, keys_name, existing, deleted, new_key_ring, "application/json")
        if keys_name in existing:
            check_key_ring(az.secret_value(vault, keys_name))
        ensure_secret(az, vault, webhook_name, existing, deleted, new_webhook_secret, "text/plain")
        if (env.get("NOTIFICATIONS_RESOURCE_DATA") or "").lower() in ("1", "true", "yes"):
            ensure_certificate(az, vault, env.get("NOTIFICATION_CERT_NAME") or "notification-cert", existing, deleted)
    except HookError as exc:
        print(f"postprovision: ERROR: {exc}", file=sys.stderr)
        return 1
    note = credential_note(env, vault, existing)
    if note:
        print(note)
    return 0


def credential_note(env: dict[str, str], vault: str, existing: set[str]) -> str | None:
    """What the operator still has to do for the app's Entra credential (MS_CLIENT_CREDENTIAL), if anything."""
    kind = (env.get("MS_CLIENT_CREDENTIAL") or "secret").lower()
    if kind == "managed_identity":
        return (
            "postprovision: note: MS_CLIENT_CREDENTIAL=managed_identity - the app registration needs a federated "
            "credential for the function app's identity (issuer FEDERATED_CREDENTIAL_ISSUER, subject "
            "MANAGED_IDENTITY_PRINCIPAL_ID, audience api://AzureADTokenExchange); see docs/deploy.md"
        )
    if kind == "certificate":
        name = env.get("MS_CLIENT_CERT_NAME") or "ms-client-cert"
        if name in existing:  # a Key Vault certificate's key is the secret of the same name
            return None
        return (
            f"postprovision: note: the Key Vault certificate '{name}' does not exist yet; create it with\n"
            f"  az keyvault certificate create --vault-name {vault} --name {name} "
            "--policy \"$(az keyvault certificate get-default-policy)\"\n"
            "  and upload its public part to the app registration (docs/deploy.md)"
        )
    name = env.get("MS_CLIENT_SECRET_NAME") or "ms-client-secret"
    if name in existing:
        return None
    return (
        "postprovision: note: the Entra client secret is not in Key Vault yet; store it with\n"
        f"  az keyvault secret set --vault-name {vault} --name {name} --file <file holding it>"
    )


if __name__ == "__main__":
    sys.exit(main())
