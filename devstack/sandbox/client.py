"""``SandboxControl``: a small client for the sandbox control API (``/_sandbox/...``)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import requests

DEFAULT_TIMEOUT = 10.0


class SandboxControlError(RuntimeError):
    pass


class SandboxControl:
    def __init__(self, base_url: str, verify: str | bool = True, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False  # REQUESTS_CA_BUNDLE / proxies must not override verify
        self.session.verify = verify

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> SandboxControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------
    def _call(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
              timeout: float | None = None) -> Any:
        resp = self.session.request(method, f"{self.base_url}/_sandbox{path}", json=json, params=params,
                                    timeout=timeout or self.timeout)
        if resp.status_code >= 400:
            raise SandboxControlError(f"{method} {path}: HTTP {resp.status_code}: {resp.text}")
        return resp.json()

    @staticmethod
    def _u(user: str) -> str:
        return quote(user, safe="")

    # -- API -----------------------------------------------------------------------------------
    def health(self) -> bool:
        return self._call("GET", "/health").get("status") == "ok"

    def users(self) -> list[dict[str, Any]]:
        return self._call("GET", "/users")

    def reset(self, clients: bool = False) -> None:
        """Restore the start state; app registrations are kept unless ``clients=True``."""
        self._call("POST", "/reset", json={"clients": clients})

    def register_client(self, client_id: str, client_secret: str | None, redirect_uris: list[str] | tuple[str, ...],
                        name: str = "Sandbox app") -> None:
        """Register (or update) an app; ``client_secret=None`` registers no secret (a secretless app)."""
        self._call("POST", "/clients", json={"client_id": client_id, "client_secret": client_secret,
                                             "redirect_uris": list(redirect_uris), "name": name})

    def add_certificate(self, client_id: str, certificate_pem: str, valid: bool = True) -> dict[str, Any]:
        """Upload a certificate (public PEM) to the app; ``valid=False`` marks it expired (AADSTS700027)."""
        return dict(self._call("POST", f"/clients/{self._u(client_id)}/certificates",
                               json={"certificate": certificate_pem, "valid": valid}))

    def add_federated_credential(self, client_id: str, *, issuer: str, subject: str,
                                 audiences: tuple[str, ...] = ("api://AzureADTokenExchange",),
                                 name: str = "fic") -> dict[str, Any]:
        """A federated identity credential on the app (replaces one of the same ``name``)."""
        return dict(self._call("POST", f"/clients/{self._u(client_id)}/federated_credentials", json={
            "name": name, "issuer": issuer, "subject": subject, "audiences": list(audiences)}))

    def add_managed_identity(self, client_id: str, principal_id: str | None = None,
                             tenant_id: str | None = None) -> dict[str, Any]:
        """A user-assigned identity; returns its client_id, principal_id, tenant_id and token issuer."""
        return dict(self._call("POST", "/managed_identities", json={
            "client_id": client_id, "principal_id": principal_id, "tenant_id": tenant_id}))

    def managed_identity_token(self, client_id: str, resource: str, lifetime_s: int = 3600) -> dict[str, Any]:
        """The identity's token for ``resource`` in App Service's shape (``access_token``, ``expires_on``...)."""
        return dict(self._call("POST", f"/managed_identities/{self._u(client_id)}/token",
                               json={"resource": resource, "lifetime_s": lifetime_s}))

    def set_client_secret_valid(self, client_id: str, secret: str, valid: bool) -> None:
        """Add a secret or mark one expired (``valid=False`` -> AADSTS7000222)."""
        self._call("POST", f"/clients/{self._u(client_id)}/secrets", json={"secret": secret, "valid": valid})

    def revoke_grants(self, user: str) -> None:
        self._call("POST", f"/users/{self._u(user)}/revoke_grants")

    def expire_access_tokens(self, user: str) -> int:
        return int(self._call("POST", f"/users/{self._u(user)}/expire_access_tokens")["expired"])

    def admin_consented(self, tenant: str, client_id: str) -> bool:
        return bool(self._call("GET", f"/tenants/{self._u(tenant)}/consent", params={"client_id": client_id})
                    ["consented"])

    def remove_admin_consent(self, tenant: str, client_id: str, *, expire_tokens: bool = True) -> int:
        """The tenant's administrator deletes the app's service principal; returns the app tokens ended."""
        return int(self._call("DELETE", f"/tenants/{self._u(tenant)}/consent",
                              params={"client_id": client_id, "expire_tokens": str(expire_tokens).lower()})["expired"])

    def set_app_scope(self, tenant: str, client_id: str, mailboxes: list[str] | None) -> None:
        """Scope the app to ``mailboxes`` in ``tenant`` (RBAC for Applications); None removes the scope."""
        if mailboxes is None:
            self._call("DELETE", f"/tenants/{self._u(tenant)}/app_scope", params={"client_id": client_id})
        else:
            self._call("PUT", f"/tenants/{self._u(tenant)}/app_scope",
                       json={"client_id": client_id, "mailboxes": mailboxes})

    def set_app_roles(self, client_id: str, roles: list[str]) -> None:
        self._call("POST", f"/clients/{self._u(client_id)}/app_roles", json={"roles": roles})

    def set_conditional_access(self, user: str, blocked: bool) -> None:
        self._call("POST", f"/users/{self._u(user)}/conditional_access", json={"blocked": blocked})

    def live_refresh_tokens(self, user: str, client_id: str | None = None) -> int:
        return len(self.live_refresh_token_mint_times(user, client_id))

    def live_refresh_token_mint_times(self, user: str, client_id: str | None = None) -> list[float]:
        """When each live refresh token of the user was minted (``time.monotonic()`` of this machine)."""
        params = {"client_id": client_id} if client_id else None
        return [float(t) for t in self._call("GET", f"/users/{self._u(user)}/refresh_tokens", params=params)["minted"]]

    def lost_rotations(self, user: str, client_id: str | None = None) -> list[tuple[float, float]]:
        """(successor minted, stale token presented), ``time.monotonic()`` of this machine, for each of the
        user's refresh tokens presented again after rotation while their successor was never redeemed."""
        params = {"client_id": client_id} if client_id else None
        rows = self._call("GET", f"/users/{self._u(user)}/lost_rotations", params=params)["rotations"]
        return [(float(r["minted"]), float(r["stalePresented"])) for r in rows]

    def seed_messages(self, user: str, messages: list[dict[str, Any]] | int, folder: str = "inbox", *,
                      immutable: bool = True) -> list[str]:
        """Mail arriving in ``folder``; its ids as an app sees them with ``Prefer: IdType="ImmutableId"`` (the
        connector's) or, with ``immutable=False``, without."""
        body: dict[str, Any] = {"folder": folder}
        body["count" if isinstance(messages, int) else "messages"] = messages
        doc = self._call("POST", f"/users/{self._u(user)}/messages", json=body)
        return list(doc["immutableIds" if immutable else "ids"])

    def outlook(self, user: str, action: str, message_id: str | None = None, **fields: Any) -> dict[str, Any]:
        """The person acts in Outlook (read, unread, flag, unflag, categorize, move, delete, send): Graph notifies
        the app's subscriptions. Returns the message's ``id`` and ``immutableId``."""
        body: dict[str, Any] = {"action": action, **fields}
        if message_id is not None:
            body["messageId"] = message_id
        return dict(self._call("POST", f"/users/{self._u(user)}/outlook", json=body))

    def sent(self, user: str) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/users/{self._u(user)}/sent")["sent"])

    def inject(self, path_prefix: str, *, status: int | None = None, retry_after: int | None = None,
               latency_ms: int | None = None, count: int = 1, body: Any = None, user: str | None = None) -> None:
        self._call("POST", "/inject", json={
            "path_prefix": path_prefix, "status": status, "retry_after": retry_after, "latency_ms": latency_ms,
            "count": count, "body": body, "user": user,
        })

    # -- change notifications --------------------------------------------------------------------
    def notification_switches(self, *, drop: int | None = None, duplicate: int | None = None,
                              allow_http: bool | None = None,
                              validation_timeout_ms: int | None = None) -> dict[str, Any]:
        """Drop or duplicate the next N change notifications (-1: all until 0); allow loopback http URLs;
        shorten the validation handshake's 10 s limit (tests of a slow endpoint)."""
        return dict(self._call("POST", "/notifications", json={
            "drop": drop, "duplicate": duplicate, "allow_http": allow_http,
            "validation_timeout_ms": validation_timeout_ms}))

    def notifications(self) -> dict[str, Any]:
        """The delivery log (``deliveries``), ``inflight`` and the switches."""
        return dict(self._call("GET", "/notifications"))

    def subscriptions(self, user: str | None = None) -> list[dict[str, Any]]:
        """Live subscriptions (all, or one user's), without their clientState."""
        params = {"user": user} if user else None
        return list(self._call("GET", "/subscriptions", params=params)["subscriptions"])

    def lifecycle_event(self, subscription_id: str, event: str) -> None:
        """Send ``reauthorizationRequired``, ``subscriptionRemoved`` or ``missed`` now."""
        self._call("POST", f"/subscriptions/{self._u(subscription_id)}/lifecycle", json={"event": event})

    def clear_injections(self) -> int:
        """Drop every pending injection and end injected delays in progress; returns how many were pending."""
        return int(self._call("DELETE", "/inject")["cleared"])

    def set_token_latency(self, ms: int) -> None:
        self._call("POST", "/token_latency", json={"ms": ms})

    def set_access_token_lifetime(self, seconds: int | None) -> None:
        """Entra's configurable access-token lifetime (600-86400 s); None restores 60-90 minutes."""
        self._call("POST", "/token_lifetime", json={"seconds": seconds})

    def set_rotation(self, strict: bool) -> None:
        self._call("POST", "/rotation", json={"strict": strict})

    def advance_clock(self, seconds: float) -> float:
        return float(self._call("POST", "/clock", json={"advance_seconds": seconds})["offset_seconds"])

    def release(self) -> None:
        """End every injected delay now."""
        self._call("POST", "/release")

    def wait_inflight(self, user: str, n: int, timeout: float = 10.0) -> bool:
        """Block until ``n`` Graph requests for ``user``'s mailbox are in flight (server-side condition)."""
        return bool(self._call("GET", "/wait_inflight", params={"user": user, "n": n, "timeout": timeout},
                               timeout=timeout + self.timeout)["reached"])

    def issued_secrets(self) -> list[str]:
        """Every authorization code and token the sandbox issued since it started."""
        return list(self._call("GET", "/issued")["issued"])

    def counters(self) -> dict[str, Any]:
        return self._call("GET", "/counters")


def redirect_fields(resp: requests.Response) -> dict[str, str]:
    """What Entra hands back to the redirect URI from ``/authorize``: the query of a 302, or the
    hidden fields of a ``response_mode=form_post`` page (OAuth 2.0 Form Post Response Mode)."""
    from html.parser import HTMLParser
    from urllib.parse import parse_qs, urlsplit

    if resp.status_code in (302, 303):
        return {k: v[0] for k, v in parse_qs(urlsplit(resp.headers["Location"]).query).items()}
    fields: dict[str, str] = {}

    class _Form(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            a = dict(attrs)
            if tag == "input" and a.get("type") == "hidden" and a.get("name"):
                fields[str(a["name"])] = a.get("value") or ""

    _Form().feed(resp.text)
    if not fields:
        raise ValueError(f"/authorize answered {resp.status_code} without a redirect or a form_post page")
    return fields
