"""Settings, read from the environment once and validated at start-up.

Every setting the app reads is declared once, in :data:`SETTINGS`: its environment name, the
:class:`Settings` attribute it fills, the parser that validates and converts it, its default,
whether it is required, local-only, Azure-only or set by the platform, and its documentation.
:func:`load_settings` is a loop over that list plus the few rules that involve several settings
(:func:`_check_cross_field`). ``infra/``, ``local.settings.json.example`` and the README's settings
table are checked against the list by tests. :func:`load_settings` raises
:class:`~shared.errors.ConfigurationError` naming the first bad setting, so a misconfigured host
fails at start-up rather than on the first user request.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import urlsplit

from shared.errors import ConfigurationError

Parser = Callable[[str, str], object]
"""``parse(setting_name, value)`` → the value of the :class:`Settings` attribute, or ConfigurationError.

``value`` is the stripped environment value, or the default when that is empty; a parser is never
called for a setting that is unset and has no default (the attribute is then ``None``).
"""


def is_loopback_host(url: str) -> bool:
    """Whether ``url``'s host is this machine's loopback interface, so traffic to it never leaves the host.

    True for the name ``localhost`` and for any loopback IP literal (``127.0.0.0/8``, ``::1``); the
    host is compared case-insensitively, without port or brackets. False for every other name,
    including look-alikes such as ``localhost.example.com`` (no DNS lookup is made), and for a
    value without a host. Used to allow plain-http JWKS URLs and to relax Key Vault's challenge
    resource check, both only for local doubles.
    """
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------
# Parsers: (setting name, value) -> attribute value; each names the setting when it refuses one
# --------------------------------------------------------------------------------------------


def _https_or_http_url(name: str, value: str, *, https_only: bool) -> str:
    parts = urlsplit(value)
    allowed = ("https",) if https_only else ("https", "http")
    if parts.scheme not in allowed or not parts.netloc:
        want = "an https URL" if https_only else "an http(s) URL"
        raise ConfigurationError(f"{name} must be {want}", setting=name)
    return value.rstrip("/")


def _text(name: str, value: str) -> str:
    return value


def _https_url(name: str, value: str) -> str:
    return _https_or_http_url(name, value, https_only=True)


def _http_url(name: str, value: str) -> str:
    return _https_or_http_url(name, value, https_only=False)


def _jwks_url(name: str, value: str) -> str:
    # Keys fetched over plain http could be replaced in transit: https, except on loopback.
    return _https_or_http_url(name, value, https_only=not is_loopback_host(value))


def _url_list(name: str, value: str) -> tuple[str, ...]:
    urls = tuple(u.strip() for u in value.split(",") if u.strip())
    for u in urls:
        _https_or_http_url(name, u, https_only=False)
    return urls


def _tenant(name: str, value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9.\-]+", value):
        raise ConfigurationError(f"{name} must be common, organizations, consumers or a tenant id", setting=name)
    return value


_APP_ROLES = ("Mail.Read", "Mail.ReadBasic", "Mail.ReadWrite", "Mail.Send")


def _app_roles(name: str, value: str) -> tuple[str, ...]:
    """Application permissions for team mailboxes: mail only, nothing tenant-wide beyond it."""
    roles = tuple(value.split())
    unknown = [r for r in roles if r not in _APP_ROLES]
    if not roles or unknown:
        raise ConfigurationError(f"{name} must list application permissions among {', '.join(_APP_ROLES)}",
                                 setting=name)
    return roles


def _scopes(name: str, value: str) -> tuple[str, ...]:
    scopes = tuple(value.split())
    if not scopes:
        raise ConfigurationError(f"{name} must name at least one scope", setting=name)
    return scopes


def _pem_file(name: str, value: str) -> str:
    if not os.path.isfile(value):
        raise ConfigurationError(f"{name} must be the path of a readable PEM file", setting=name)
    return value


def _connection_string(name: str, value: str) -> str:
    if "=" not in value:
        raise ConfigurationError(f"{name} must be a storage connection string", setting=name)
    return value


def _hs256_secret(name: str, value: str) -> str:
    if len(value.encode()) < 32:
        raise ConfigurationError(f"{name} must be at least 32 bytes", setting=name)
    return value


def _key_ring(name: str, value: str) -> str:
    parse_key_ring(value, setting=name)  # validated here; shared.crypto parses it again when used
    return value


_NCRONTAB = re.compile(r"^\S+( \S+){5}$")


def _ncrontab(name: str, value: str) -> str:
    if not _NCRONTAB.match(value):
        raise ConfigurationError(f"{name} must be a six-field NCRONTAB expression", setting=name)
    return value


def _int_between(lo: int, hi: int) -> Parser:
    def parse(name: str, value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise ConfigurationError(f"{name} must be a whole number", setting=name) from None
        if not lo <= n <= hi:
            raise ConfigurationError(f"{name} must be between {lo} and {hi}", setting=name)
        return n

    return parse


def _flag(name: str, value: str) -> bool:
    return value.lower() in ("1", "true", "yes")


MAIL_EVENT_NAMES = ("message.received", "message.sent", "message.updated", "message.deleted")


def _mail_events(name: str, value: str) -> tuple[str, ...]:
    """Comma-separated event names, each known, at least one (in the order of :data:`MAIL_EVENT_NAMES`)."""
    names = {v.strip() for v in value.split(",") if v.strip()}
    unknown = sorted(names - set(MAIL_EVENT_NAMES))
    if unknown or not names:
        raise ConfigurationError(f"{name} must list one or more of {', '.join(MAIL_EVENT_NAMES)}"
                                 + (f" (unknown: {unknown[0][:40]})" if unknown else ""), setting=name)
    return tuple(n for n in MAIL_EVENT_NAMES if n in names)


def _on_off_auto(name: str, value: str) -> bool | None:
    """``true`` / ``false`` (also 1/0, yes/no, on/off) or ``auto`` (None: decided from other settings)."""
    v = value.lower()
    if v == "auto":
        return None
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"{name} must be true, false or auto", setting=name)


#: ``MS_CLIENT_CREDENTIAL`` values: how the app proves its identity to Entra.
CLIENT_CREDENTIAL_KINDS = ("secret", "certificate", "managed_identity")


def _credential_kind(name: str, value: str) -> str:
    kind = value.lower().replace("-", "_")
    if kind not in CLIENT_CREDENTIAL_KINDS:
        raise ConfigurationError(f"{name} must be one of {', '.join(CLIENT_CREDENTIAL_KINDS)}", setting=name)
    return kind


def _vault_object_name(name: str, value: str) -> str:
    # Key Vault object names: 1-127 alphanumerics and dashes.
    if not re.fullmatch(r"[0-9A-Za-z-]{1,127}", value):
        raise ConfigurationError(f"{name} must be a Key Vault name (1-127 letters, digits, dashes)", setting=name)
    return value


def _assertion_audience(name: str, value: str) -> str:
    if not value.startswith("api://") or any(c.isspace() for c in value):
        raise ConfigurationError(f"{name} must be an api:// audience such as api://AzureADTokenExchange",
                                 setting=name)
    return value


#: ``TELEMETRY_EXPORTER`` values (shared.telemetry).
TELEMETRY_EXPORTERS = ("auto", "azure", "console", "off")


def _telemetry_exporter(name: str, value: str) -> str:
    mode = value.lower()
    if mode not in TELEMETRY_EXPORTERS:
        raise ConfigurationError(f"{name} must be one of {', '.join(TELEMETRY_EXPORTERS)}", setting=name)
    return mode


# --------------------------------------------------------------------------------------------
# The declarations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One environment setting: everything about it is declared here and nowhere else."""

    name: str  # the environment variable / app setting
    default: str | None = None  # used when unset or empty (and then parsed like a set value)
    required: bool = False  # unset and no default: "NAME is required but not set"
    local_only: bool = False  # never written by infra/ (secrets come from Key Vault there)
    doc: str = ""  # one line; the README table is generated from it
    platform: bool = False  # set by the hosting platform itself, never by infra/ or an operator
    attr: str | None = None  # the Settings attribute it fills; None: an input of a DERIVED attribute only
    parse: Parser = _text  # validates and converts the value (see Parser)
    azure_only: bool = False  # only meaningful in Azure: left out of local.settings.json.example


SETTINGS: tuple[Setting, ...] = (
    Setting("MS_CLIENT_ID", attr="client_id", required=True, doc="Application (client) id of the Entra app."),
    Setting("MS_CLIENT_SECRET", attr="client_secret", local_only=True,
            doc="Client secret, required when `KEY_VAULT_URL` is unset; in Azure it comes from Key Vault."),
    Setting("KEY_VAULT_URL", attr="key_vault_url", parse=_https_url,
            doc="Key Vault (https) holding the client secret or certificate, the token key ring and the webhook secret."),
    Setting("MS_CLIENT_SECRET_NAME", "ms-client-secret", attr="client_secret_name", parse=_vault_object_name,
            doc="Key Vault secret name of the client secret."),
    Setting("MS_CLIENT_CREDENTIAL", "secret", attr="client_credential", parse=_credential_kind,
            doc="How the app authenticates to Entra: `secret`, `certificate` (Key Vault certificate) or "
                "`managed_identity` (federated credential, work/school accounts only); see `docs/deploy.md`."),
    Setting("MS_CLIENT_CERT_NAME", "ms-client-cert", attr="client_cert_name", parse=_vault_object_name,
            doc="Key Vault certificate name for `MS_CLIENT_CREDENTIAL=certificate` (its private key is read as "
                "the secret of the same name)."),
    Setting("MS_CLIENT_CERT_RETRY_SECONDS", "900", attr="client_cert_retry_seconds", parse=_int_between(0, 86400),
            local_only=True,
            doc="While Entra rejects the newest version of the certificate (not uploaded to the app registration "
                "yet) and the previous version is used, the newest is tried again this often (seconds)."),
    Setting("KEY_VAULT_CACHE_SECONDS", "300", attr="key_vault_cache_seconds", parse=_int_between(0, 3600),
            local_only=True,
            doc="How long values read from Key Vault are cached (seconds); a credential Entra rejects is re-read "
                "at most every 30 s (or this, if shorter) while it stays rejected."),
    Setting("MS_CLIENT_ASSERTION_AUDIENCE", "api://AzureADTokenExchange", attr="client_assertion_audience",
            parse=_assertion_audience,
            doc="Audience of the managed identity's token for `managed_identity` (`api://AzureADTokenExchangeUSGov` "
                "/ `api://AzureADTokenExchangeChina` in those clouds)."),
    Setting("TOKEN_KEYS_SECRET_NAME", "token-encryption-keys", attr="token_keys_secret_name",
            doc="Key Vault secret name of the token key ring."),
    Setting("MS_AUTHORITY_HOST", "https://login.microsoftonline.com", attr="authority_host", parse=_https_url,
            doc="Entra authority host."),
    Setting("MS_TENANT", "common", attr="tenant", parse=_tenant,
            doc="`common`, `organizations`, `consumers` or a tenant id."),
    Setting("MS_SCOPES", "User.Read Mail.ReadWrite Mail.Send", attr="scopes", parse=_scopes,
            doc="Delegated Graph scopes requested (`offline_access` is always added)."),
    Setting("MS_APP_ROLES", "Mail.ReadWrite Mail.Send", attr="app_roles", parse=_app_roles,
            doc="Application permissions for team mailboxes (admin consent; `docs/team-mailboxes.md`): the tenant "
                "must have granted each before its mailboxes can be added."),
    Setting("GRAPH_BASE_URL", "https://graph.microsoft.com/v1.0", attr="graph_base_url", parse=_https_url,
            doc="Microsoft Graph base URL."),
    Setting("MS_CA_BUNDLE", attr="ca_bundle", parse=_pem_file, local_only=True,
            doc="Extra CA file trusted for the authority and Graph (the sandbox CA locally)."),
    Setting("PUBLIC_BASE_URL", attr="public_base_url", required=True, parse=_http_url,
            doc="Where the app is reachable; redirect URI = `{PUBLIC_BASE_URL}/api/connect/microsoft/callback`."),
    Setting("AzureWebJobsStorage", attr="storage_connection_string", parse=_connection_string,
            doc="Storage connection string (Azurite locally); in Azure the identity-based "
                "`AzureWebJobsStorage__*` (then `AzureWebJobsStorage__accountName` is required)."),
    Setting("AzureWebJobsStorage__accountName", attr="storage_account_name", azure_only=True,
            doc="Identity-based storage: the account name."),
    Setting("AzureWebJobsStorage__tableServiceUri", attr="storage_table_uri", parse=_http_url, azure_only=True,
            doc="Identity-based storage: Table endpoint (else from the name)."),
    Setting("AzureWebJobsStorage__queueServiceUri", attr="storage_queue_uri", parse=_http_url, azure_only=True,
            doc="Identity-based storage: Queue endpoint (else from the name)."),
    Setting("AzureWebJobsStorage__clientId", attr="storage_client_id", azure_only=True,
            doc="Identity-based storage: client id of the user-assigned identity."),
    Setting("AZURE_CLIENT_ID", attr="azure_client_id", azure_only=True,
            doc="User-assigned managed identity used for Key Vault (azure-identity)."),
    Setting("IDENTITY_ENDPOINT", platform=True,
            doc="Managed identity endpoint of App Service / Functions (present when the app has an identity)."),
    Setting("MSI_ENDPOINT", platform=True, doc="Older name of `IDENTITY_ENDPOINT`."),
    Setting("AUTH_ISSUER", attr="auth_issuer", required=True, doc="Expected `iss` of caller JWTs."),
    Setting("AUTH_AUDIENCE", attr="auth_audience", required=True, doc="Expected `aud` of caller JWTs."),
    Setting("AUTH_JWKS_URL", attr="auth_jwks_url", parse=_jwks_url,
            doc="JWKS of the caller token issuer (RS256/ES256), https except on loopback; or `AUTH_HS256_SECRET`."),
    Setting("AUTH_HS256_SECRET", attr="auth_hs256_secret", parse=_hs256_secret, local_only=True,
            doc="Shared secret (32+ bytes) for HS256 caller tokens; or `AUTH_JWKS_URL`."),
    Setting("AUTH_MAX_TOKEN_LIFETIME_SECONDS", "86400", attr="auth_max_token_lifetime_seconds",
            parse=_int_between(60, 30 * 86400),
            doc="Longest lifetime accepted for a caller JWT (`exp` - `iat`, seconds): a leaked long-lived token "
                "is refused."),
    Setting("ALLOWED_RETURN_URLS", "", attr="allowed_return_urls", parse=_url_list,
            doc="Comma-separated allowed `returnUrl` prefixes (scheme + host + path)."),
    Setting("TOKEN_ENCRYPTION_KEYS", attr="token_encryption_keys", parse=_key_ring, local_only=True,
            doc='Key ring `{"active":"kid","keys":{"kid":"base64 of 32 bytes"}}`, required when `KEY_VAULT_URL` '
                "is unset; in Azure a Key Vault secret."),
    Setting("WEBHOOK_URL", attr="webhook_url", parse=_http_url,
            doc="Receiver of account lifecycle webhooks (off when unset); see `docs/webhooks.md`."),
    Setting("WEBHOOK_SECRET", attr="webhook_secret", local_only=True,
            doc="HMAC secret for webhook signatures, required with `WEBHOOK_URL` when `KEY_VAULT_URL` is unset; "
                "in Azure it is read from Key Vault at run time."),
    Setting("WEBHOOK_SECRET_NAME", "webhook-secret", attr="webhook_secret_name", parse=_vault_object_name,
            doc="Key Vault secret name of the webhook HMAC secret."),
    Setting("REFRESH_SCHEDULE", "0 */5 * * * *", attr="refresh_schedule", parse=_ncrontab,
            doc="NCRONTAB of the proactive refresh timer."),
    Setting("CLEANUP_SCHEDULE", "0 17 * * * *", attr="cleanup_schedule", parse=_ncrontab,
            doc="NCRONTAB of the purge of expired OAuth states and idempotency records."),
    Setting("FORCED_REFRESH_COALESCE_SECONDS", "10", attr="forced_refresh_coalesce_seconds",
            parse=_int_between(0, 300),
            doc="`POST .../refresh` within this many seconds of the last one an instance ran for the account answers "
                "that refresh's result instead of a new grant (0: off)."),
    Setting("KEEPALIVE_DAYS", "7", attr="keepalive_days", parse=_int_between(1, 80),
            doc="Idle accounts get a refresh-token keep-alive this often (days, 1-80)."),
    Setting("SEND_MAX_TOTAL_BYTES", str(100 * 1024 * 1024), attr="send_max_total_bytes",
            parse=_int_between(1, 150 * 1024 * 1024), doc="Cap on one send request's attachments; beyond it, 413."),
    Setting("NOTIFICATIONS_ENABLED", "auto", attr="notifications_enabled", parse=_on_off_auto,
            doc="Mailbox events: Graph change notifications become `message.*` webhooks (`true`, `false` or "
                "`auto`: on when `PUBLIC_BASE_URL` is https or Graph is the local sandbox); see `docs/webhooks.md`."),
    Setting("MAIL_EVENTS", "message.received,message.sent", attr="mail_events", parse=_mail_events,
            doc="Mailbox events to produce (comma-separated): `message.received` (Inbox), `message.sent` (Sent Items, "
                "through this API or Outlook), `message.updated` (read, flag, categories, folder), `message.deleted`. "
                "Each needs a Graph subscription per mailbox; see `docs/webhooks.md`."),
    Setting("NOTIFICATIONS_RESOURCE_DATA", "false", attr="notifications_resource_data", parse=_flag,
            doc="Rich notifications: Graph sends each new or changed message's summary encrypted to our certificate, "
                "so no Graph read is needed per event (`docs/webhooks.md`). Subscriptions switch at their next "
                "maintenance."),
    Setting("NOTIFICATION_CERT_NAME", "notification-cert", attr="notification_cert_name", parse=_vault_object_name,
            doc="Key Vault certificate whose public key Graph encrypts rich notifications to (exportable RSA key); "
                "a new version is used for new and renewed subscriptions, earlier versions still decrypt."),
    Setting("NOTIFICATION_CERT_PATH", attr="notification_cert_path", parse=_pem_file, local_only=True,
            doc="Local stand-in for `NOTIFICATION_CERT_NAME` without Key Vault: a PEM file with the RSA key and its "
                "certificate (`make dev` generates one)."),
    Setting("DEMO_ENABLED", "false", attr="demo_enabled", parse=_flag, local_only=True,
            doc="The dev host serves the demo page at `/demo/` (`make dev` sets it); nothing serves it in Azure."),
    Setting("APPLICATIONINSIGHTS_CONNECTION_STRING", attr="appinsights_connection_string",
            doc="Application Insights: OpenTelemetry traces, metrics and logs (`docs/operations.md`); plain logging "
                "when unset."),
    Setting("TELEMETRY_EXPORTER", "auto", attr="telemetry_exporter", parse=_telemetry_exporter, local_only=True,
            doc="OpenTelemetry traces and metrics: `auto` (Application Insights when its connection string is set, "
                "else off), `console` (printed by the host, no Azure needed) or `off`."),
)

#: Settings attributes computed from several settings (each listed one has ``attr=None``).
DERIVED: Mapping[str, tuple[str, ...]] = {
    # A managed identity endpoint exists (App Service / Functions): Key Vault uses ManagedIdentityCredential.
    "managed_identity_available": ("IDENTITY_ENDPOINT", "MSI_ENDPOINT"),
}


def setting_names(*, include_local: bool = True) -> set[str]:
    """Names of the settings an operator or infra/ sets (``include_local``: also the local-only ones)."""
    return {s.name for s in SETTINGS if not s.platform and (include_local or not s.local_only)}


@dataclass(frozen=True)
class KeyRingConfig:
    active: str
    keys: Mapping[str, bytes] = field(repr=False)


@dataclass(frozen=True)
class Settings:
    """The validated settings; each attribute is filled by one entry of SETTINGS (``attr``) or is in DERIVED."""

    client_id: str
    client_secret: str | None = field(repr=False)
    key_vault_url: str | None
    client_secret_name: str
    client_credential: str
    client_cert_name: str
    client_cert_retry_seconds: int
    key_vault_cache_seconds: int
    client_assertion_audience: str
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
    auth_max_token_lifetime_seconds: int
    allowed_return_urls: tuple[str, ...]
    token_encryption_keys: str | None = field(repr=False)
    webhook_url: str | None
    webhook_secret: str | None = field(repr=False)
    webhook_secret_name: str
    refresh_schedule: str
    cleanup_schedule: str
    keepalive_days: int
    forced_refresh_coalesce_seconds: int
    send_max_total_bytes: int
    demo_enabled: bool
    appinsights_connection_string: str | None = field(repr=False)
    telemetry_exporter: str = "auto"  # shared.telemetry.mode_of
    notifications_enabled: bool | None = None  # None: auto (see notifications_on)
    mail_events: tuple[str, ...] = ("message.received", "message.sent")
    notifications_resource_data: bool = False
    notification_cert_name: str = "notification-cert"
    notification_cert_path: str | None = None
    app_roles: tuple[str, ...] = ("Mail.ReadWrite", "Mail.Send")

    @property
    def authority(self) -> str:
        return f"{self.authority_host}/{self.tenant}"

    @property
    def redirect_uri(self) -> str:
        return f"{self.public_base_url}/api/connect/microsoft/callback"

    @property
    def notifications_on(self) -> bool:
        """Inbound mail notifications: explicit, or on where Graph can reach PUBLIC_BASE_URL.

        Graph only delivers to https notification URLs
        (https://learn.microsoft.com/graph/change-notifications-delivery-webhooks); the local sandbox
        (a loopback GRAPH_BASE_URL) may be told to accept loopback http (devstack/sandbox/README.md)."""
        if self.notifications_enabled is not None:
            return self.notifications_enabled
        return self.public_base_url.startswith("https://") or is_loopback_host(self.graph_base_url)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _read(setting: Setting, env: Mapping[str, str]) -> object:
    """One setting's parsed value (``None`` when unset without a default); ConfigurationError names it."""
    name = setting.name
    raw = env.get(name)
    value = raw.strip() if raw is not None else None
    if value and value.startswith("@Microsoft.KeyVault("):
        # App Service passes the reference itself through when it cannot resolve it.
        raise ConfigurationError(f"{name} is an unresolved Key Vault reference: check the app identity's "
                                 "access to the vault", setting=name)
    if not value:
        value = setting.default
    if value is None:
        if setting.required:
            raise ConfigurationError(f"{name} is required but not set", setting=name)
        return None
    return setting.parse(name, value)


#: Tenant segments whose sign-in audience includes personal Microsoft accounts.
_PERSONAL_ACCOUNT_TENANTS = ("common", "consumers", "9188040d-6c67-4c5b-b112-36a304b66dad")


def _check_client_credential(v: Mapping[str, object]) -> None:
    """``MS_CLIENT_CREDENTIAL`` against the vault and the sign-in audience (docs/deploy.md, "Secretless")."""
    kind = v["MS_CLIENT_CREDENTIAL"]
    if kind == "secret" and not v["KEY_VAULT_URL"] and not v["MS_CLIENT_SECRET"]:
        raise ConfigurationError("MS_CLIENT_SECRET is required when KEY_VAULT_URL is not set",
                                 setting="MS_CLIENT_SECRET")
    if kind == "certificate" and not v["KEY_VAULT_URL"]:
        raise ConfigurationError(
            "MS_CLIENT_CREDENTIAL=certificate reads the certificate MS_CLIENT_CERT_NAME from Key Vault: set "
            "KEY_VAULT_URL (locally: python -m devstack.keyvault)", setting="MS_CLIENT_CREDENTIAL")
    if kind == "managed_identity" and str(v["MS_TENANT"]).lower() in _PERSONAL_ACCOUNT_TENANTS:
        # A federated identity credential is only honoured for work/school sign-ins: an app whose
        # signInAudience includes personal Microsoft accounts (MS_TENANT common / consumers) cannot
        # redeem a personal account's code with a managed identity's assertion.
        raise ConfigurationError(
            f"MS_CLIENT_CREDENTIAL=managed_identity does not work with MS_TENANT={v['MS_TENANT']}: a managed "
            "identity as a federated credential needs an app registration for work/school accounts only "
            "(signInAudience AzureADMyOrg or AzureADMultipleOrgs; MS_TENANT=organizations or your tenant id). "
            "For personal accounts use MS_CLIENT_CREDENTIAL=certificate or secret.",
            setting="MS_CLIENT_CREDENTIAL")


def _check_cross_field(v: Mapping[str, object]) -> None:
    """The rules that involve several settings (``v``: setting name -> parsed value)."""
    _check_client_credential(v)
    if not v["KEY_VAULT_URL"] and not v["TOKEN_ENCRYPTION_KEYS"]:
        raise ConfigurationError("TOKEN_ENCRYPTION_KEYS is required when KEY_VAULT_URL is not set",
                                 setting="TOKEN_ENCRYPTION_KEYS")
    if not v["AzureWebJobsStorage"] and not v["AzureWebJobsStorage__accountName"]:
        raise ConfigurationError(
            "AzureWebJobsStorage (or AzureWebJobsStorage__accountName) is required", setting="AzureWebJobsStorage"
        )
    if not v["AUTH_JWKS_URL"] and not v["AUTH_HS256_SECRET"]:
        raise ConfigurationError("Set AUTH_JWKS_URL or AUTH_HS256_SECRET", setting="AUTH_JWKS_URL")
    if v["WEBHOOK_URL"] and not v["WEBHOOK_SECRET"] and not v["KEY_VAULT_URL"]:
        # With a vault, the secret is read at run time (WEBHOOK_SECRET_NAME), never at start-up.
        raise ConfigurationError("WEBHOOK_SECRET is required when WEBHOOK_URL is set and KEY_VAULT_URL is not",
                                 setting="WEBHOOK_SECRET")


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting; raise ConfigurationError naming the bad one.

    Each setting is checked on its own first, in :data:`SETTINGS` order, then the cross-field rules.
    """
    env = os.environ if environ is None else environ
    values = {s.name: _read(s, env) for s in SETTINGS}
    _check_cross_field(values)
    fields = {s.attr: values[s.name] for s in SETTINGS if s.attr is not None}
    fields["managed_identity_available"] = any(values[n] for n in DERIVED["managed_identity_available"])
    # Each value has the type its Setting's parser returns, which is the Settings field's
    # (tests/shared/test_config.py checks every field against its parser).
    return Settings(**fields)  # type: ignore[arg-type]


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
