"""The connector's one exception tree. Everything the core raises on purpose is a ``ConnectorError``.

::

    ConnectorError                      code, status, title, hint, detail, microsoft
    ├── ConfigurationError              a setting is missing or malformed (start-up), names it
    ├── ValidationError (400)           bad caller input; ``field`` names it
    ├── AuthenticationError (401)       caller JWT missing or invalid (WWW-Authenticate: Bearer)
    ├── NotFoundError (404)             no such account *for this owner* (never 403: no existence leak)
    ├── ConflictError (409)             idempotency key reused with another body, ETag race lost
    ├── PayloadTooLargeError (413)      send request beyond the configured cap
    ├── OAuthError                      the connect flow failed (state, redirect, consent)
    ├── MicrosoftError                  Entra (AADSTS) or Graph answered with an error
    │   ├── ReauthRequiredError (409)   the grant is dead: the user must re-connect
    │   │   └── ConsentRequiredError (409)  a tenant's admin consent is gone: an administrator must consent again
    │   ├── OperatorError (500/502)     our app registration is broken (invalid_client, 7000215…)
    │   └── ThrottledError (503)        Retry-After budget spent; ``retry_after`` seconds
    ├── CryptoError (500)               a stored token failed authenticated decryption (tampered, moved)
    ├── SecretUnavailableError (503)    the client secret or key ring could not be read (Key Vault, env)
    ├── UpstreamUnavailableError (503)  network errors / 5xx from Microsoft after retries
    └── StorageUnavailableError (503)   Table/Queue storage unreachable or failing after SDK retries

``to_problem`` turns any of them into an RFC 9457 ``application/problem+json`` body. Messages
never contain tokens, codes or secrets: Microsoft's ``error_description`` is reduced to its
first line (``AADSTSnnnn: text``), which Microsoft documents as safe to show.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypedDict, Unpack

from shared.problems import problem_type


@dataclass(frozen=True)
class MicrosoftDetails:
    """Identifiers Microsoft support asks for; none of them is a secret."""

    error: str | None = None
    codes: tuple[int, ...] = ()
    trace_id: str | None = None
    correlation_id: str | None = None
    request_id: str | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"error": self.error, "codes": list(self.codes)}
        if self.trace_id:
            out["traceId"] = self.trace_id
        if self.correlation_id:
            out["correlationId"] = self.correlation_id
        if self.request_id:
            out["requestId"] = self.request_id
        return out


class ErrorOptions(TypedDict, total=False):
    """The keyword arguments every :class:`ConnectorError` takes besides ``detail``."""

    code: str | None
    status: int | None
    hint: str | None
    title: str | None
    microsoft: MicrosoftDetails | None
    headers: dict[str, str] | None
    extra: Mapping[str, object] | None


class ConnectorError(Exception):
    """Base of every error the connector raises on purpose."""

    status: int = 500
    code: str = "internal_error"
    title: str = "Internal error"

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        status: int | None = None,
        hint: str | None = None,
        title: str | None = None,
        microsoft: MicrosoftDetails | None = None,
        headers: dict[str, str] | None = None,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if title is not None:
            self.title = title
        self.hint = hint
        self.microsoft = microsoft
        self.headers: dict[str, str] = dict(headers or {})
        self.extra: dict[str, object] = dict(extra or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status}, detail={self.detail!r})"


class ConfigurationError(ConnectorError):
    status = 500
    code = "configuration_error"
    title = "Configuration error"

    def __init__(self, detail: str, *, setting: str) -> None:
        super().__init__(detail, hint=f"Fix the app setting {setting}.")
        self.setting = setting


class ValidationError(ConnectorError):
    status = 400
    code = "invalid_request"
    title = "Invalid request"

    def __init__(self, field_name: str, detail: str, **kw: Unpack[ErrorOptions]) -> None:
        super().__init__(detail, **kw)
        self.field = field_name
        self.extra.setdefault("field", field_name)


class AuthenticationError(ConnectorError):
    status = 401
    code = "unauthorized"
    title = "Unauthorized"

    def __init__(self, detail: str, **kw: Unpack[ErrorOptions]) -> None:
        super().__init__(detail, **kw)
        self.headers.setdefault("WWW-Authenticate", 'Bearer error="invalid_token"')


class NotFoundError(ConnectorError):
    status = 404
    code = "not_found"
    title = "Not found"


class ConflictError(ConnectorError):
    status = 409
    code = "conflict"
    title = "Conflict"


class PayloadTooLargeError(ConnectorError):
    status = 413
    code = "payload_too_large"
    title = "Payload too large"


class OAuthError(ConnectorError):
    status = 400
    code = "oauth_error"
    title = "Connect failed"


class MicrosoftError(ConnectorError):
    status = 502
    code = "microsoft_error"
    title = "Microsoft returned an error"


class ReauthRequiredError(MicrosoftError):
    status = 409
    code = "reauth_required"
    title = "The mailbox must be re-connected"


class ConsentRequiredError(ReauthRequiredError):
    """A team mailbox's tenant no longer grants the app's application permissions (service principal deleted,
    consent revoked): only a tenant administrator can restore it, by consenting again."""

    code = "tenant_consent_required"
    title = "A tenant administrator must consent again"


class OperatorError(MicrosoftError):
    status = 502
    code = "operator_action_required"
    title = "The connector's app registration needs attention"


class ThrottledError(MicrosoftError):
    status = 503
    code = "throttled"
    title = "Microsoft is throttling this mailbox"

    def __init__(self, detail: str, *, retry_after: int, **kw: Unpack[ErrorOptions]) -> None:
        super().__init__(detail, **kw)
        self.retry_after = max(1, int(retry_after))
        self.headers["Retry-After"] = str(self.retry_after)


class CryptoError(ConnectorError):
    """A stored token could not be decrypted (or sealed). Never carries key material."""

    status = 500
    code = "token_decrypt_failed"
    title = "Stored tokens could not be decrypted"


class SecretUnavailableError(ConnectorError):
    """A secret the connector needs could not be read. Names the secret and vault, never a value."""

    status = 503
    code = "secret_unavailable"
    title = "A secret the connector needs is unavailable"

    def __init__(
        self, detail: str, *, secret_name: str, vault: str | None, reason: str | None = None, hint: str | None = None
    ) -> None:
        super().__init__(detail, hint=hint)
        self.secret_name = secret_name
        self.vault = vault
        self.reason = reason

    def copy(self) -> SecretUnavailableError:
        return SecretUnavailableError(
            self.detail, secret_name=self.secret_name, vault=self.vault, reason=self.reason, hint=self.hint
        )


class UpstreamUnavailableError(ConnectorError):
    status = 503
    code = "upstream_unavailable"
    title = "Microsoft is unavailable"

    def __init__(self, detail: str, **kw: Unpack[ErrorOptions]) -> None:
        super().__init__(detail, **kw)
        # Every 503 tells the caller when to come back: Microsoft's own Retry-After when
        # the raiser passed it on, else the default (found by the chaos run: 503s without it).
        from shared.backoff import DEFAULT_RETRY_AFTER_S

        self.headers.setdefault("Retry-After", str(DEFAULT_RETRY_AFTER_S))


class StorageUnavailableError(ConnectorError):
    status = 503
    code = "storage_unavailable"
    title = "Storage is unavailable"

    def __init__(self, detail: str, *, retry_after: int = 5, **kw: Unpack[ErrorOptions]) -> None:
        super().__init__(detail, **kw)
        self.retry_after = max(1, int(retry_after))
        self.headers["Retry-After"] = str(self.retry_after)


@dataclass
class Problem:
    status: int
    body: dict[str, object]
    headers: dict[str, str] = field(default_factory=dict)


def to_problem(exc: BaseException) -> Problem:
    """RFC 9457 problem details for any exception; unknown ones become an opaque 500."""
    if not isinstance(exc, ConnectorError):
        exc = ConnectorError("An unexpected error occurred. The correlation id identifies it in the logs.")
    body: dict[str, object] = {
        "type": problem_type(exc.code),
        "title": exc.title,
        "status": exc.status,
        "detail": exc.detail,
        "code": exc.code,
    }
    if exc.hint:
        body["hint"] = exc.hint
    if exc.microsoft is not None:
        body["microsoft"] = exc.microsoft.to_json()
    body.update(exc.extra)
    return Problem(status=exc.status, body=body, headers=dict(exc.headers))
