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

    def register_client(self, client_id: str, client_secret: str, redirect_uris: list[str] | tuple[str, ...],
                        name: str = "Sandbox app") -> None:
        self._call("POST", "/clients", json={"client_id": client_id, "client_secret": client_secret,
                                             "redirect_uris": list(redirect_uris), "name": name})

    def set_client_secret_valid(self, client_id: str, secret: str, valid: bool) -> None:
        """Add a secret or mark one expired (``valid=False`` -> AADSTS7000222)."""
        self._call("POST", f"/clients/{self._u(client_id)}/secrets", json={"secret": secret, "valid": valid})

    def revoke_grants(self, user: str) -> None:
        self._call("POST", f"/users/{self._u(user)}/revoke_grants")

    def expire_access_tokens(self, user: str) -> int:
        return int(self._call("POST", f"/users/{self._u(user)}/expire_access_tokens")["expired"])

    def set_conditional_access(self, user: str, blocked: bool) -> None:
        self._call("POST", f"/users/{self._u(user)}/conditional_access", json={"blocked": blocked})

    def live_refresh_tokens(self, user: str, client_id: str | None = None) -> int:
        params = {"client_id": client_id} if client_id else None
        return int(self._call("GET", f"/users/{self._u(user)}/refresh_tokens", params=params)["live"])

    def seed_messages(self, user: str, messages: list[dict[str, Any]] | int, folder: str = "inbox") -> list[str]:
        body: dict[str, Any] = {"folder": folder}
        body["count" if isinstance(messages, int) else "messages"] = messages
        return list(self._call("POST", f"/users/{self._u(user)}/messages", json=body)["ids"])

    def sent(self, user: str) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/users/{self._u(user)}/sent")["sent"])

    def inject(self, path_prefix: str, *, status: int | None = None, retry_after: int | None = None,
               latency_ms: int | None = None, count: int = 1, body: Any = None, user: str | None = None) -> None:
        self._call("POST", "/inject", json={
            "path_prefix": path_prefix, "status": status, "retry_after": retry_after, "latency_ms": latency_ms,
            "count": count, "body": body, "user": user,
        })

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
