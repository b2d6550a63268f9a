"""The client secret, the client certificate, the token key ring and the webhook secret: Key Vault (Azure)
or environment (local only).

With ``KEY_VAULT_URL`` set, both values are Key Vault secrets (``MS_CLIENT_SECRET_NAME``,
``TOKEN_KEYS_SECRET_NAME``) read through ``azure-keyvault-secrets`` with an azure-identity credential:

* **Credential.** :func:`default_credential`: when the App Service / Functions managed-identity
  endpoint is present (``IDENTITY_ENDPOINT``, or the older ``MSI_ENDPOINT``), a
  ``ManagedIdentityCredential`` — user-assigned when ``AZURE_CLIENT_ID`` is set, system-assigned
  otherwise; anywhere else ``DefaultAzureCredential(exclude_interactive_browser_credential=True)``
  (environment service principal, workload identity, IMDS, ``az login`` …) so a developer can point
  a local host at a real vault. Pass ``credential=`` to choose another.
  (https://learn.microsoft.com/azure/app-service/overview-managed-identity#rest-endpoint-reference)
* **Transport.** The SDK runs on ``shared._http.new_session`` (``trust_env=False``) and gets the
  same CA file as ``connection_verify``: azure-core passes ``verify=`` on every request, which would
  otherwise be ``True`` (certifi only, or whatever ``REQUESTS_CA_BUNDLE`` says when ``trust_env`` is
  on). Bounded retries (the SDK default is 10 with exponential back-off) so a dead vault fails a
  health check in seconds, not minutes.
* **Challenge auth.** ``SecretClient`` discovers the vault's tenant and resource from a 401
  challenge and checks that the resource's domain is a parent of the vault host. A loopback vault
  (the ``devstack.keyvault`` double) can never pass that check, so — only for ``localhost`` /
  ``127.0.0.1`` / ``::1`` vault URLs — the client is built with ``verify_challenge_resource=False``.
  (https://aka.ms/azsdk/blog/vault-uri)
* **Caching.** Each value is kept in memory for ``ttl_seconds`` (``KEY_VAULT_CACHE_SECONDS``; failures
  for ``error_ttl_seconds``, so a vault outage does not turn every request into a vault call);
  concurrent callers share one read.
* **Rejected credentials.** When Entra rejects the app's credential, :class:`shared.app_credential.AppCredential`
  (which chooses what to present: ``MS_CLIENT_CREDENTIAL``) asks :meth:`SecretStore.reread` to drop the cached
  value, so a secret or certificate rotated in the vault is picked up without a restart. The re-read is
  skipped while the cached value was read less than :data:`REREAD_INTERVAL_S` ago (or the TTL, if shorter)
  and Entra has accepted nothing since: a credential that stays rejected (an expired secret) costs one
  vault read per interval, not one per token request.
* **Certificate versions.** Key Vault renews a certificate as a new version with a new key, which Entra
  does not know until it is uploaded to the app registration. :meth:`SecretStore.newest_certificate` reads
  the newest; :meth:`SecretStore.earlier_certificate` finds the previous enabled, unexpired version
  (``list_properties_of_secret_versions`` + ``get_secret(name, version)``) for the fallback
  (``shared.certificate_rotation``). Listing needs the *list* (``secrets/readMetadata``) permission, which
  *Key Vault Secrets User* includes.
* **The webhook secret** is read at run time too (``WEBHOOK_SECRET_NAME``), never at start-up, so a
  vault problem cannot stop every function; rotating it in the vault takes effect within the TTL.
* **Errors.** Anything that stops a read (not found, forbidden, no identity, network) raises
  :class:`SecretUnavailableError` (``secret_unavailable``, 503) naming the secret and the vault —
  never a value.

Without ``KEY_VAULT_URL`` the values come from ``MS_CLIENT_SECRET``, ``TOKEN_ENCRYPTION_KEYS`` and
``WEBHOOK_SECRET`` (local development only; ``shared.config`` requires them then).

Azure SDK modules are imported lazily, on the first read: cold start matters on Functions.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol, TypeVar, cast

from shared.certificate_rotation import CertificateVersion
from shared.client_credentials import CertificateError, parse_certificate
from shared.config import is_loopback_host
from shared.errors import ConfigurationError, SecretUnavailableError

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential

    from shared.config import Settings
    from shared.crypto import KeyRing

#: Retry settings for the Key Vault client (azure-core RetryPolicy keywords).
SDK_RETRY: dict[str, float] = {"retry_total": 2, "retry_backoff_factor": 0.5, "retry_backoff_max": 4}
#: (connect, read) timeouts in seconds for Key Vault requests.
SDK_TIMEOUTS: dict[str, float] = {"connection_timeout": 5, "read_timeout": 30}
#: While Entra keeps rejecting the app's credential, Key Vault is re-read at most this often (seconds).
REREAD_INTERVAL_S = 30.0
#: At most this many earlier versions of the certificate are read when looking for a fallback.
MAX_FALLBACK_READS = 5
_KV_VERSION = re.compile(r"[0-9a-fA-F]{32}")  # a Key Vault object version id

log = logging.getLogger("connector.secrets")
T = TypeVar("T")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)

_RBAC_HINT = (
    "Grant the function app's managed identity the 'Key Vault Secrets User' role on the vault "
    "(or a 'get' secret permission in its access policy)."
)


class SecretPropertiesLike(Protocol):
    """What is read of a secret version's properties (``azure.keyvault.secrets.SecretProperties``)."""

    @property
    def version(self) -> str | None: ...

    @property
    def enabled(self) -> bool | None: ...

    @property
    def expires_on(self) -> dt.datetime | None: ...

    @property
    def not_before(self) -> dt.datetime | None: ...

    @property
    def created_on(self) -> dt.datetime | None: ...


class SecretClientLike(Protocol):
    """The part of ``azure.keyvault.secrets.SecretClient`` this store uses."""

    def get_secret(self, name: str, version: str | None = None) -> object: ...

    def list_properties_of_secret_versions(self, name: str) -> Iterable[SecretPropertiesLike]: ...


SecretClientFactory = Callable[[str, "TokenCredential"], SecretClientLike]
"""``factory(vault_url, credential)`` → a ``SecretClient`` (or a stand-in with the same two calls)."""


def default_credential(settings: Settings) -> TokenCredential:
    """Managed identity on App Service / Functions, ``DefaultAzureCredential`` elsewhere."""
    if settings.managed_identity_available:
        from azure.identity import ManagedIdentityCredential

        return ManagedIdentityCredential(client_id=settings.azure_client_id)
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential(exclude_interactive_browser_credential=True)


# The vault URL's host is this machine (only the local Key Vault double lives there).
_is_loopback = is_loopback_host


class _Fetched(NamedTuple):
    value: str
    version: str  # Key Vault version id ("" when the client does not say)


@dataclass(frozen=True)
class _Entry:
    expires_at: float
    value: object = None
    error: SecretUnavailableError | None = None
    read_at: float = 0.0

    def unwrap(self) -> object:
        if self.error is not None:
            raise self.error.copy()
        return self.value


class SecretStore:
    """Key Vault (or environment) values with an in-memory TTL cache: the client secret, the client
    certificate's versions, the token key ring and the webhook secret. Thread-safe. Which credential the
    app presents to Entra is :class:`shared.app_credential.AppCredential`'s choice, over this store."""

    def __init__(
        self,
        settings: Settings,
        *,
        credential: TokenCredential | None = None,
        ttl_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        secret_client_factory: SecretClientFactory | None = None,
        error_ttl_seconds: float = 5,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._vault = settings.key_vault_url
        self._credential = credential
        self._ttl = float(settings.key_vault_cache_seconds if ttl_seconds is None else ttl_seconds)
        self._reread_s = min(REREAD_INTERVAL_S, self._ttl)
        self._wall = wall_clock
        self._error_ttl = error_ttl_seconds
        self._clock = clock
        self._factory = secret_client_factory
        self._client: SecretClientLike | None = None
        self._client_lock = threading.Lock()
        names = (settings.client_secret_name, settings.token_keys_secret_name, settings.client_cert_name,
                 settings.webhook_secret_name, settings.notification_cert_name)
        self._locks = {name: threading.Lock() for name in names}
        self._cache: dict[str, _Entry] = {}
        self._env_ring: KeyRing | None = None
        self._versions: dict[tuple[str, str], CertificateVersion | None] = {}  # certificate versions read
        self._versions_lock = threading.Lock()

    def __repr__(self) -> str:
        source = self._vault or "environment"
        return f"SecretStore(source={source!r}, ttl_seconds={self._ttl})"

    # ------------------------------------------------------------------ public API
    def client_secret(self) -> str:
        """The Entra app's client secret."""
        if not self._vault:
            if not self._settings.client_secret:
                raise SecretUnavailableError(
                    "MS_CLIENT_SECRET is not set and KEY_VAULT_URL is not configured.",
                    secret_name="MS_CLIENT_SECRET", vault=None, reason="not_set",
                    hint="Set KEY_VAULT_URL (Azure) or MS_CLIENT_SECRET (local development).",
                )
            return self._settings.client_secret
        return self._get(self._settings.client_secret_name, self._as_client_secret)

    def key_ring(self, sealed: str | None = None) -> KeyRing:
        """The token encryption key ring (see ``shared.crypto``). Given a ``sealed`` value whose key id the
        cached ring lacks (another instance sealed it after a rotation), the vault is re-read once."""
        ring = self._current_key_ring()
        if sealed is not None and self._vault:
            from shared.crypto import kid_of

            try:
                unknown = kid_of(sealed) not in ring.kids
            except Exception:  # not a sealed value at all: opening it will say so
                unknown = False
            if unknown:
                self.invalidate_key_ring()
                ring = self._current_key_ring()
        return ring

    def _current_key_ring(self) -> KeyRing:
        if not self._vault:
            if self._env_ring is None:
                from shared.crypto import KeyRing

                raw = self._settings.token_encryption_keys
                if not raw:
                    raise SecretUnavailableError(
                        "TOKEN_ENCRYPTION_KEYS is not set and KEY_VAULT_URL is not configured.",
                        secret_name="TOKEN_ENCRYPTION_KEYS", vault=None, reason="not_set",
                        hint="Set KEY_VAULT_URL (Azure) or TOKEN_ENCRYPTION_KEYS (local development).",
                    )
                self._env_ring = KeyRing.from_json(raw, setting="TOKEN_ENCRYPTION_KEYS")
            return self._env_ring
        return self._get(self._settings.token_keys_secret_name, self._as_key_ring)

    def newest_certificate(self, name: str | None = None) -> CertificateVersion:
        """The newest version of a Key Vault certificate (``MS_CLIENT_CERT_NAME`` unless named), read as its secret
        (cached)."""
        name = name or self._settings.client_cert_name
        if not self._vault:
            raise SecretUnavailableError(
                f"The Key Vault certificate {name} needs KEY_VAULT_URL.", secret_name=name,
                vault=None, reason="not_set", hint="Set KEY_VAULT_URL (locally: python -m devstack.keyvault).")
        return self._get(name, self._as_certificate)

    def certificate_version(self, name: str, version: str) -> CertificateVersion | None:
        """One version of Key Vault certificate ``name``, or None when there is no such version (an earlier
        notification certificate still opens what was encrypted to it). Versions never change: each is read
        from the vault once."""
        if not self._vault or not _KV_VERSION.fullmatch(version):
            return None
        with self._versions_lock:
            if (name, version) in self._versions:
                return self._versions[(name, version)]
        try:
            found: CertificateVersion | None = self._as_certificate(name, self._fetch(name, version))
        except SecretUnavailableError as exc:
            if exc.reason != "not_found":
                raise
            found = None
        with self._versions_lock:
            if len(self._versions) >= 64:
                self._versions.clear()
            self._versions[(name, version)] = found
        return found

    def webhook_secret(self) -> str:
        """The webhook HMAC secret: ``WEBHOOK_SECRET`` locally, Key Vault ``WEBHOOK_SECRET_NAME`` otherwise."""
        if not self._vault:
            if not self._settings.webhook_secret:
                raise SecretUnavailableError(
                    "WEBHOOK_SECRET is not set and KEY_VAULT_URL is not configured.", secret_name="WEBHOOK_SECRET",
                    vault=None, reason="not_set", hint="Set KEY_VAULT_URL (Azure) or WEBHOOK_SECRET (local).")
            return self._settings.webhook_secret
        return self._get(self._settings.webhook_secret_name, self._as_client_secret)

    def invalidate_client_secret(self) -> None:
        """Forget the cached client secret; the next :meth:`client_secret` reads the vault again."""
        self._invalidate(self._settings.client_secret_name)

    def invalidate_key_ring(self) -> None:
        """Forget the cached key ring (e.g. a record names a key id this instance has not seen yet)."""
        self._invalidate(self._settings.token_keys_secret_name)

    def close(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None and hasattr(client, "close"):
            client.close()

    # ------------------------------------------------------------------ cache
    def _invalidate(self, name: str) -> None:
        if not self._vault:
            return
        with self._locks[name]:  # waits for a read in flight, so the next call really re-reads
            self._cache.pop(name, None)

    def reread(self, name: str, *, accepted_at: float) -> bool:
        """Invalidate ``name`` after Entra rejected it, unless it was read within the re-read interval and
        Entra has accepted nothing since ``accepted_at`` (this store's clock): it stays rejected, and
        re-reading the vault per token request would not help. True when the next read goes to the vault."""
        if not self._vault:
            return False
        entry = self._cache.get(name)
        if entry is not None and self._clock() - entry.read_at < self._reread_s and accepted_at < entry.read_at:
            log.info("Not re-reading %s from Key Vault: read %.0f s ago and still rejected.", name,
                     self._clock() - entry.read_at)
            return False
        self._invalidate(name)
        return True

    @property
    def reread_interval_s(self) -> float:
        """While Entra keeps rejecting a credential, the vault is re-read at most this often."""
        return self._reread_s

    def earlier_certificate(self, newest: CertificateVersion, *, skip: set[str],
                             valid_at: float) -> CertificateVersion | None:
        """The most recent other enabled, unexpired version of the certificate whose thumbprint is not in
        ``skip`` (at most :data:`MAX_FALLBACK_READS` versions read), or None."""
        name = self._settings.client_cert_name
        for version in self._candidate_versions(name, newest.version)[:MAX_FALLBACK_READS]:
            try:
                found = self._as_certificate(name, self._fetch(name, version))
            except SecretUnavailableError as exc:
                log.warning("Skipping version %s of the Key Vault certificate %s (%s).", version, name, exc.reason)
                continue
            if found.thumbprint not in skip and found.cert.not_after > valid_at:
                return found
        log.warning("Entra rejects the newest version of the Key Vault certificate %s and no earlier enabled, "
                    "unexpired version is left to fall back on.", name)
        return None

    def _get(self, name: str, transform: Callable[[str, _Fetched], T]) -> T:
        """``transform``'s value of the secret ``name``, cached (each name always has the same transform)."""
        entry = self._cache.get(name)
        if entry is not None and self._clock() < entry.expires_at:
            return cast(T, entry.unwrap())
        with self._locks[name]:  # single flight: concurrent callers wait for one read
            entry = self._cache.get(name)
            if entry is not None and self._clock() < entry.expires_at:
                return cast(T, entry.unwrap())
            try:
                value = transform(name, self._fetch(name))
            except SecretUnavailableError as exc:
                self._cache[name] = _Entry(expires_at=self._clock() + self._error_ttl, error=exc.copy())
                raise
            now = self._clock()
            self._cache[name] = _Entry(expires_at=now + self._ttl, value=value, read_at=now)
            return value

    def _candidate_versions(self, name: str, newest_version: str) -> list[str]:
        """Version ids of ``name`` other than the newest that are enabled and valid now, most recent first."""
        from azure.core.exceptions import AzureError

        now = dt.datetime.fromtimestamp(self._wall(), dt.timezone.utc)
        try:
            items = list(self._secret_client().list_properties_of_secret_versions(name))
        except AzureError as exc:
            log.warning("Could not list the versions of the Key Vault certificate %s (%s); no fallback.", name,
                        self._map_error(name, exc).reason)
            return []
        usable = [p for p in items if p.version and p.version != newest_version and p.enabled is not False
                  and (p.expires_on is None or p.expires_on > now) and (p.not_before is None or p.not_before <= now)]
        usable.sort(key=lambda p: p.created_on or _EPOCH, reverse=True)  # Key Vault lists in no given order
        return [str(p.version) for p in usable]

    # ------------------------------------------------------------------ Key Vault
    def _secret_client(self) -> SecretClientLike:
        with self._client_lock:
            if self._client is None:
                credential = self._credential if self._credential is not None else default_credential(self._settings)
                self._credential = credential
                factory = self._factory or self._default_factory
                self._client = factory(self._vault or "", credential)
            return self._client

    def _default_factory(self, vault_url: str, credential: TokenCredential) -> SecretClientLike:
        from azure.core.pipeline.transport import RequestsTransport
        from azure.keyvault.secrets import SecretClient

        from shared._http import ca_bundle_path, new_session

        ca = self._settings.ca_bundle
        transport = RequestsTransport(
            session=new_session(ca, pool_size=4),
            session_owner=True,
            connection_verify=ca_bundle_path(ca),  # azure-core sends verify= on every request
            **SDK_TIMEOUTS,
        )
        kwargs: dict[str, object] = {"transport": transport, **SDK_RETRY}
        if _is_loopback(vault_url):
            # The challenge's resource (https://vault.azure.net) can't be a parent domain of a loopback
            # host; only the local Key Vault double lives there. Real vaults keep the check.
            kwargs["verify_challenge_resource"] = False
        client: SecretClientLike = SecretClient(vault_url, credential, **kwargs)
        return client

    def _fetch(self, name: str, version: str | None = None) -> _Fetched:
        from azure.core.exceptions import AzureError

        try:
            client = self._secret_client()
            secret = client.get_secret(name, version) if version else client.get_secret(name)
        except AzureError as exc:
            raise self._map_error(name, exc) from None
        value = getattr(secret, "value", None)
        if not value:
            raise SecretUnavailableError(
                f"The Key Vault secret '{name}' in {self._vault} has no value.",
                secret_name=name, vault=self._vault, reason="empty",
                hint=f"Set a value for the secret '{name}' in {self._vault}.",
            )
        return _Fetched(value, str(getattr(getattr(secret, "properties", None), "version", None) or ""))

    def _map_error(self, name: str, exc: Exception) -> SecretUnavailableError:
        return vault_error(name, self._vault, exc)

    # ------------------------------------------------------------------ transforms
    @staticmethod
    def _as_client_secret(name: str, raw: _Fetched) -> str:
        # Entra client secrets contain no whitespace; a trailing newline pasted into the vault would break
        # every token request.
        return raw.value.strip()

    def _as_certificate(self, name: str, raw: _Fetched) -> CertificateVersion:
        try:
            return CertificateVersion(raw.version, parse_certificate(raw.value))
        except CertificateError as exc:
            raise SecretUnavailableError(
                f"The Key Vault certificate '{name}' in {self._vault} is not usable: {exc}.",
                secret_name=name, vault=self._vault, reason="malformed",
                hint=f"Create or import '{name}' as a Key Vault certificate with an exportable RSA key "
                "(PEM or PKCS#12 content type); its secret of the same name must hold key and certificate.",
            ) from None

    def _as_key_ring(self, name: str, raw: _Fetched) -> KeyRing:
        from shared.crypto import KeyRing

        try:
            return KeyRing.from_json(raw.value, setting=name)
        except ConfigurationError as exc:
            raise SecretUnavailableError(
                f"The Key Vault secret '{name}' in {self._vault} is not a valid token key ring: {exc.detail}",
                secret_name=name, vault=self._vault, reason="malformed",
                hint=f'Store JSON {{"active":"<kid>","keys":{{"<kid>":"<base64 of 32 random bytes>"}}}} as {name}.',
            ) from None


def _identity_error(exc: Exception, where: str, *, name: str, vault: str | None) -> SecretUnavailableError:
    """The vault could not be authenticated to: no identity at all, or one the vault refuses."""
    from azure.identity import CredentialUnavailableError

    if isinstance(exc, CredentialUnavailableError):
        return SecretUnavailableError(
            f"Could not read {where}: no Azure identity is available to authenticate to the vault.",
            secret_name=name, vault=vault, reason="no_identity",
            hint="Enable a managed identity on the function app (set AZURE_CLIENT_ID for a user-assigned "
            "one); locally, sign in with 'az login' or unset KEY_VAULT_URL.",
        )
    return SecretUnavailableError(
        f"Could not read {where}: the vault did not accept the app's identity (401).",
        secret_name=name, vault=vault, reason="unauthenticated",
        hint="Check that the vault is in the managed identity's tenant. " + _RBAC_HINT,
    )


def vault_error(name: str, vault: str | None, exc: Exception) -> SecretUnavailableError:
    """What stopped a read of ``name``, as a 503 naming the secret and the vault (never a value)."""
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ResourceNotFoundError,
        ServiceRequestError,
        ServiceResponseError,
    )

    where = f"the Key Vault secret '{name}' in {vault}"
    status = getattr(exc, "status_code", None)
    error = getattr(exc, "error", None)
    kv_code = getattr(error, "code", None) if error is not None else None
    if isinstance(exc, ResourceNotFoundError) or status == 404:
        return SecretUnavailableError(
            f"Could not read {where}: it does not exist ({kv_code or 'NotFound'}, 404).",
            secret_name=name, vault=vault, reason="not_found",
            hint=f"Create the secret '{name}' in {vault}, or set the app setting that names it.",
        )
    if status == 403:
        return SecretUnavailableError(
            f"Could not read {where}: access denied ({kv_code or 'Forbidden'}, 403).",
            secret_name=name, vault=vault, reason="forbidden", hint=_RBAC_HINT,
        )
    if isinstance(exc, ClientAuthenticationError):
        return _identity_error(exc, where, name=name, vault=vault)
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return SecretUnavailableError(
            f"Could not read {where}: the vault is unreachable ({type(exc).__name__}).",
            secret_name=name, vault=vault, reason="unreachable",
            hint=f"Check that {vault} resolves and is reachable from the function app (DNS, private "
            "endpoint, firewall) and that its TLS certificate is trusted.",
        )
    if isinstance(exc, HttpResponseError):
        return SecretUnavailableError(
            f"Could not read {where}: the vault answered {status} ({kv_code or 'error'}).",
            secret_name=name, vault=vault, reason="vault_error",
            hint="Key Vault may be throttling or unavailable; the connector retries on the next request.",
        )
    return SecretUnavailableError(
        f"Could not read {where} ({type(exc).__name__}).", secret_name=name, vault=vault, reason="error",
        hint=f"Check the vault {vault} and the function app's identity.",
    )
