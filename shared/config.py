"""Settings, read from the environment once and validated at start-up.

Every setting the app reads is declared in :data:`SETTINGS` (name, default, whether it is
required, whether it is for local development only). ``infra/`` writes the non-local ones as app
settings; a test checks the two lists agree. :func:`load_settings` raises
:class:`~shared.errors.ConfigurationError` naming the first bad setting, so a misconfigured
host fails at start-up rather than on the first user request.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import urlsplit

from shared.errors import ConfigurationError


@dataclass(frozen=True)
class Setting:
    name: str
    default: str | None = None
    required: bool = False
    local_only: bool = False  # never written by infra/ (secrets come from Key Vault there)
    doc: str = ""
    platform: bool = False  # set by the hosting platform itself, never by infra/ or an operator


SETTINGS: tuple[Setting, ...] = (
    Setting("MS_CLIENT_ID", required=True, doc="Application (client) id of the Entra app."),
    Setting("MS_CLIENT_SECRET", local_only=True, doc="Client secret; in Azure it comes from Key Vault."),
    Setting("KEY_VAULT_URL", doc="Key Vault holding the client secret and the token key ring."),
    Setting("MS_CLIENT_SECRET_NAME", "ms-client-secret", doc="Key Vault secret name of the client secret."),
    Setting("TOKEN_KEYS_SECRET_NAME", "token-encryption-keys", doc="Key Vault secret name of the token key ring."),
    Setting("MS_AUTHORITY_HOST", "https://login.microsoftonline.com", doc="Entra authority host."),
    Setting("MS_TENANT", "common", doc="common, organizations, consumers or a tenant id."),
    Setting("MS_SCOPES", "User.Read Mail.ReadWrite Mail.Send", doc="Delegated Graph scopes requested."),
    Setting("GRAPH_BASE_URL", "https://graph.microsoft.com/v1.0", doc="Microsoft Graph base URL."),
    Setting("MS_CA_BUNDLE", local_only=True, doc="Extra CA file trusted for the authority and Graph."),
    Setting("PUBLIC_BASE_URL", required=True, doc="Where the app is reachable (redirect URI base)."),
    Setting("AzureWebJobsStorage", doc="Storage connection string, or identity-based AzureWebJobsStorage__* settings."),
    Setting("AzureWebJobsStorage__accountName", doc="Identity-based storage: the account name."),
    Setting("AzureWebJobsStorage__tableServiceUri", doc="Identity-based storage: Table endpoint (else from the name)."),
    Setting("AzureWebJobsStorage__queueServiceUri", doc="Identity-based storage: Queue endpoint (else from the name)."),
    Setting("AzureWebJobsStorage__clientId", doc="Identity-based storage: client id of the user-assigned identity."),
    Setting("AZURE_CLIENT_ID", doc="User-assigned managed identity used for Key Vault (azure-identity)."),
    Setting("IDENTITY_ENDPOINT", platform=True, doc="Set by App Service / Functions when a managed identity exists."),
    Setting("MSI_ENDPOINT", platform=True, doc="Older name of IDENTITY_ENDPOINT."),
    Setting("AUTH_ISSUER", required=True, doc="Expected `iss` of caller JWTs."),
    Setting("AUTH_AUDIENCE", required=True, doc="Expected `aud` of caller JWTs."),
    Setting("AUTH_JWKS_URL", doc="JWKS of the caller token issuer (RS256/ES256)."),
    Setting("AUTH_HS256_SECRET", local_only=True, doc="Shared secret for HS256 caller tokens (local)."),
    Setting("ALLOWED_RETURN_URLS", "", doc="Comma-separated allowed returnUrl prefixes."),
    Setting("TOKEN_ENCRYPTION_KEYS", local_only=True, doc='Key ring JSON {"active":kid,"keys":{kid:b64}} (local).'),
    Setting("WEBHOOK_URL", doc="Receiver of account lifecycle webhooks (off when unset)."),
    Setting("WEBHOOK_SECRET", doc="HMAC secret for webhook signatures (a Key Vault reference in Azure)."),
    Setting("REFRESH_SCHEDULE", "0 */5 * * * *", doc="NCRONTAB of the proactive refresh timer."),
    Setting("CLEANUP_SCHEDULE", "0 17 * * * *", doc="NCRONTAB of the clean-up timer."),
    Setting("KEEPALIVE_DAYS", "7", doc="Idle accounts get a refresh-token keep-alive this often."),
    Setting("SEND_MAX_TOTAL_BYTES", str(100 * 1024 * 1024), doc="Cap on one send request's attachments."),
    Setting("DEMO_ENABLED", "false", doc="Serve the demo web client from the app."),
    Setting("APPLICATIONINSIGHTS_CONNECTION_STRING", doc="Application Insights (plain logging when unset)."),
)

_BY_NAME = {s.name: s for s in SETTINGS}
_NCRONTAB = re.compile(r"^\S+( \S+){5}$")


def setting_names(*, include_local: bool = True) -> set[str]:
    """Names of the settings an operator or infra/ sets (``include_local``: also the local-only ones)."""
    return {s.name for s in SETTINGS if not s.platform and (include_local or not s.local_only)}


@dataclass(frozen=True)
class KeyRingConfig:
    active: str
    keys: Mapping[str, bytes] = field(repr=False)


@dataclass(frozen=True)
class Settings:
    client_id: str
    client_secret: str | None = field(repr=False)
    key_vault_url: str | None
    client_secret_name: str
    token_keys_secret_name: str
    authority_host: str
    tenant: str
    scopes: tuple[str, ...]
    graph_base_url: str
    ca_bundle: str | None
    public_base_url: str
    storage_connection_string: str | None = field(repr=False)
    storage_account_name: str | None
    storage_table_uri: str | None
    storage_queue_uri: str | None
    storage_client_id: str | None
    azure_client_id: str | None
    managed_identity_available: bool
    auth_issuer: str
    auth_audience: str
    auth_jwks_url: str | None
    auth_hs256_secret: str | None = field(repr=False)
    allowed_return_urls: tuple[str, ...]
    token_encryption_keys: str | None = field(repr=False)
    webhook_url: str | None
    webhook_secret: str | None = field(repr=False)
    refresh_schedule: str
    cleanup_schedule: str
    keepalive_days: int
    send_max_total_bytes: int
    demo_enabled: bool
    appinsights_connection_string: str | None = field(repr=False)

    @property
    def authority(self) -> str:
        return f"{self.authority_host}/{self.tenant}"

    @property
    def redirect_uri(self) -> str:
        return f"{self.public_base_url}/api/connect/microsoft/callback"


def _https_or_http_url(name: str, value: str, *, https_only: bool) -> str:
    parts = urlsplit(value)
    allowed = ("https",) if https_only else ("https", "http")
    if parts.scheme not in allowed or not parts.netloc:
        want = "an https URL" if https_only else "an http(s) URL"
        raise ConfigurationError(f"{name} must be {want}", setting=name)
    return value.rstrip("/")


def _opt_url(name: str, value: str | None) -> str | None:
    return _https_or_http_url(name, value, https_only=False) if value else None


def _is_loopback(url: str) -> bool:
    return (urlsplit(url).hostname or "") in ("localhost", "127.0.0.1", "::1")


def _int(name: str, value: str, lo: int, hi: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ConfigurationError(f"{name} must be a whole number", setting=name) from None
    if not lo <= n <= hi:
        raise ConfigurationError(f"{name} must be between {lo} and {hi}", setting=name)
    return n


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting; raise ConfigurationError naming the bad one."""
    env = os.environ if environ is None else environ

    def get(name: str) -> str | None:
        raw = env.get(name)
        value = raw.strip() if raw is not None else None
        if value and value.startswith("@Microsoft.KeyVault("):
            # App Service passes the reference itself through when it cannot resolve it.
            raise ConfigurationError(f"{name} is an unresolved Key Vault reference: check the app identity's "
                                     "access to the vault", setting=name)
        if not value:
            value = _BY_NAME[name].default or None
        if value is None and _BY_NAME[name].required:
            raise ConfigurationError(f"{name} is required but not set", setting=name)
        return value

    client_id = get("MS_CLIENT_ID") or ""
    key_vault_url = get("KEY_VAULT_URL")
    if key_vault_url:
        key_vault_url = _https_or_http_url("KEY_VAULT_URL", key_vault_url, https_only=True)
    client_secret = get("MS_CLIENT_SECRET")
    token_keys = get("TOKEN_ENCRYPTION_KEYS")
    if not key_vault_url:
        if not client_secret:
            raise ConfigurationError(
                "MS_CLIENT_SECRET is required when KEY_VAULT_URL is not set", setting="MS_CLIENT_SECRET"
            )
        if not token_keys:
            raise ConfigurationError(
                "TOKEN_ENCRYPTION_KEYS is required when KEY_VAULT_URL is not set",
                setting="TOKEN_ENCRYPTION_KEYS",
            )
    if token_keys:
        parse_key_ring(token_keys, setting="TOKEN_ENCRYPTION_KEYS")

    tenant = get("MS_TENANT") or "common"
    if not re.fullmatch(r"[A-Za-z0-9.\-]+", tenant):
        raise ConfigurationError("MS_TENANT must be common, organizations, consumers or a tenant id", setting="MS_TENANT")
    scopes = tuple((get("MS_SCOPES") or "").split())
    if not scopes:
        raise ConfigurationError("MS_SCOPES must name at least one scope", setting="MS_SCOPES")

    ca_bundle = get("MS_CA_BUNDLE")
    if ca_bundle and not os.path.isfile(ca_bundle):
        raise ConfigurationError("MS_CA_BUNDLE must be the path of a readable PEM file", setting="MS_CA_BUNDLE")

    storage_cs = get("AzureWebJobsStorage")
    storage_account = get("AzureWebJobsStorage__accountName")
    if not storage_cs and not storage_account:
        raise ConfigurationError(
            "AzureWebJobsStorage (or AzureWebJobsStorage__accountName) is required", setting="AzureWebJobsStorage"
        )
    if storage_cs and "=" not in storage_cs:
        raise ConfigurationError("AzureWebJobsStorage must be a storage connection string", setting="AzureWebJobsStorage")

    jwks = get("AUTH_JWKS_URL")
    hs = get("AUTH_HS256_SECRET")
    if not jwks and not hs:
        raise ConfigurationError("Set AUTH_JWKS_URL or AUTH_HS256_SECRET", setting="AUTH_JWKS_URL")
    if jwks:
        # Keys fetched over plain http could be replaced in transit: https, except on loopback.
        jwks = _https_or_http_url("AUTH_JWKS_URL", jwks, https_only=not _is_loopback(jwks))
    if hs and len(hs.encode()) < 32:
        raise ConfigurationError("AUTH_HS256_SECRET must be at least 32 bytes", setting="AUTH_HS256_SECRET")

    allowed = tuple(u.strip() for u in (get("ALLOWED_RETURN_URLS") or "").split(",") if u.strip())
    for u in allowed:
        _https_or_http_url("ALLOWED_RETURN_URLS", u, https_only=False)

    webhook_url = get("WEBHOOK_URL")
    webhook_secret = get("WEBHOOK_SECRET")
    if webhook_url:
        webhook_url = _https_or_http_url("WEBHOOK_URL", webhook_url, https_only=False)
        if not webhook_secret:
            raise ConfigurationError("WEBHOOK_SECRET is required when WEBHOOK_URL is set", setting="WEBHOOK_SECRET")

    schedules = {}
    for name in ("REFRESH_SCHEDULE", "CLEANUP_SCHEDULE"):
        value = get(name) or ""
        if not _NCRONTAB.match(value):
            raise ConfigurationError(f"{name} must be a six-field NCRONTAB expression", setting=name)
        schedules[name] = value

    return Settings(
        client_id=client_id,
        client_secret=client_secret,
        key_vault_url=key_vault_url,
        client_secret_name=get("MS_CLIENT_SECRET_NAME") or "ms-client-secret",
        token_keys_secret_name=get("TOKEN_KEYS_SECRET_NAME") or "token-encryption-keys",
        authority_host=_https_or_http_url("MS_AUTHORITY_HOST", get("MS_AUTHORITY_HOST") or "", https_only=True),
        tenant=tenant,
        scopes=scopes,
        graph_base_url=_https_or_http_url("GRAPH_BASE_URL", get("GRAPH_BASE_URL") or "", https_only=True),
        ca_bundle=ca_bundle,
        public_base_url=_https_or_http_url("PUBLIC_BASE_URL", get("PUBLIC_BASE_URL") or "", https_only=False),
        storage_connection_string=storage_cs,
        storage_account_name=storage_account,
        storage_table_uri=_opt_url("AzureWebJobsStorage__tableServiceUri", get("AzureWebJobsStorage__tableServiceUri")),
        storage_queue_uri=_opt_url("AzureWebJobsStorage__queueServiceUri", get("AzureWebJobsStorage__queueServiceUri")),
        storage_client_id=get("AzureWebJobsStorage__clientId"),
        azure_client_id=get("AZURE_CLIENT_ID"),
        managed_identity_available=bool(get("IDENTITY_ENDPOINT") or get("MSI_ENDPOINT")),
        auth_issuer=get("AUTH_ISSUER") or "",
        auth_audience=get("AUTH_AUDIENCE") or "",
        auth_jwks_url=jwks,
        auth_hs256_secret=hs,
        allowed_return_urls=allowed,
        token_encryption_keys=token_keys,
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
        refresh_schedule=schedules["REFRESH_SCHEDULE"],
        cleanup_schedule=schedules["CLEANUP_SCHEDULE"],
        keepalive_days=_int("KEEPALIVE_DAYS", get("KEEPALIVE_DAYS") or "", 1, 80),
        send_max_total_bytes=_int("SEND_MAX_TOTAL_BYTES", get("SEND_MAX_TOTAL_BYTES") or "", 1, 150 * 1024 * 1024),
        demo_enabled=(get("DEMO_ENABLED") or "false").lower() in ("1", "true", "yes"),
        appinsights_connection_string=get("APPLICATIONINSIGHTS_CONNECTION_STRING"),
    )


def parse_key_ring(raw: str, *, setting: str) -> KeyRingConfig:
    """Parse ``{"active":"kid","keys":{"kid":"base64 of 32 bytes"}}``; never echoes key material."""
    import base64
    import binascii

    try:
        doc = json.loads(raw)
        active = doc["active"]
        keys = {str(k): base64.b64decode(v, validate=True) for k, v in doc["keys"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
        raise ConfigurationError(
            f'{setting} must be JSON {{"active":"kid","keys":{{"kid":"base64"}}}}', setting=setting
        ) from None
    bad = next((k for k in keys if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", k)), None)
    if bad is not None:
        raise ConfigurationError(f"{setting}: key ids must be 1-64 of A-Z a-z 0-9 _ - ({bad!r} is not)", setting=setting)
    if active not in keys:
        raise ConfigurationError(f"{setting}: the active key id is not in keys", setting=setting)
    if any(len(k) != 32 for k in keys.values()):
        raise ConfigurationError(f"{setting}: every key must be 32 bytes (AES-256)", setting=setting)
    return KeyRingConfig(active=active, keys=keys)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once (on first use) and then reused."""
    return load_settings()
