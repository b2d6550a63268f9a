"""Thread-safe shared state of one sandbox instance (one lock, one condition)."""

from __future__ import annotations

import fnmatch
import os
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from .mailbox import Mailbox
from .users import TEST_USERS, TestUser

CODE_LIFETIME_S = 600  # authorization codes live 10 minutes
RT_INACTIVITY_S = 90 * 24 * 3600  # refresh tokens expire after 90 days of inactivity
MAX_CONCURRENT_PER_MAILBOX = 4
MAILBOX_REQUESTS_PER_10_MIN = 10_000
DEFAULT_SEED = 3  # messages seeded in each mailbox's inbox at start and on reset


@dataclass
class RegisteredCertificate:
    """A certificate uploaded to an app registration (a key credential): only its public part."""

    certificate_pem: str
    thumbprint_sha1: str  # hex, lower case
    thumbprint_sha256: str  # hex, lower case
    public_key: Any
    valid: bool = True  # False: the key credential's end date has passed


@dataclass
class FederatedCredential:
    """A federated identity credential on an app registration (issuer + subject + audiences)."""

    name: str
    issuer: str
    subject: str
    audiences: list[str]


@dataclass
class ManagedIdentity:
    """A user-assigned managed identity: ``client_id`` (app id) and ``principal_id`` (object id, the ``sub``)."""

    client_id: str
    principal_id: str
    tenant_id: str


@dataclass
class ClientApp:
    client_id: str
    name: str
    redirect_uris: list[str]
    secrets: dict[str, bool] = field(default_factory=dict)  # secret -> valid (False = expired)
    certificates: dict[str, RegisteredCertificate] = field(default_factory=dict)  # by SHA-256 thumbprint
    federated: list[FederatedCredential] = field(default_factory=list)
    # Application permissions on Graph the registration declares (granted by admin consent).
    app_roles: tuple[str, ...] = ("Mail.ReadWrite", "Mail.Send")


@dataclass
class AuthCode:
    client_id: str
    user: TestUser
    scopes: list[str]
    redirect_uri: str
    code_challenge: str | None
    code_challenge_method: str | None
    nonce: str | None
    issued_at: float
    redeemed: bool = False


@dataclass
class RefreshTokenRecord:
    client_id: str
    user: TestUser
    scopes: list[str]
    issued_at: float  # of the original grant (sign-in)
    last_used: float
    rotated: bool = False  # replaced by a newer one (only enforced in strict mode)
    # When this token itself was minted, on the machine's monotonic clock (shared by every process on
    # it): lets an audit tell when a live token nobody stored was handed out.
    minted: float = field(default_factory=time.monotonic)
    # The token this one was exchanged for, and when this one was first presented again after that
    # (strict rotation refuses it): a dead token presented while its successor was never used means
    # the successor was lost between Entra's answer and the client's storage.
    successor: str | None = field(default=None, repr=False)
    stale_presented: float | None = None


@dataclass
class AccessTokenRecord:
    client_id: str
    user: TestUser  # for an application token: the app's service principal in the tenant (no mailbox)
    scopes: list[str]  # delegated scopes, or an application token's roles
    expires_at: float
    expired: bool = False
    app: bool = False  # client-credentials (app-only) token


@dataclass
class Injection:
    pattern: str
    status: int | None
    retry_after: int | None
    latency_ms: int | None
    remaining: int
    body: Any = None
    user: str | None = None  # only requests for this mailbox (Graph) match, when set

    def matches(self, path: str, user: str | None) -> bool:
        if self.user is not None and self.user != user:
            return False
        if any(c in self.pattern for c in "*?["):
            return fnmatch.fnmatchcase(path, self.pattern)
        return path.startswith(self.pattern)


@dataclass
class PendingAuth:
    """An /authorize request waiting for the HTML sign-in / consent pages (like Entra's ``ctx``)."""

    params: dict[str, str]
    tenant: str
    user: TestUser | None = None


class SandboxState:
    def __init__(self, default_client: ClientApp) -> None:
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self._default_client = default_client
        # Every code, access, refresh and id token ever issued (never reset): lets tests prove
        # that none of them reaches a log line or a stored entity of the product.
        self.issued: list[str] = []
        # Graph only calls https notification URLs; loopback http only when told (README: notifications).
        self.allow_http_default = os.environ.get("SANDBOX_ALLOW_HTTP_NOTIFICATIONS", "").lower() in ("1", "true", "yes")
        from .subscriptions import Notifier

        self.notifier = Notifier(self)
        self.reset()

    # -- lifecycle -------------------------------------------------------------------------
    def reset(self, clients: bool = False) -> None:
        """Back to the start state. App registrations survive (their secrets become valid again)
        unless ``clients`` is true, which also restores the registrations given at start-up."""
        with self.lock:
            dc = self._default_client
            if clients or not hasattr(self, "clients"):
                self.clients: dict[str, ClientApp] = {
                    dc.client_id: ClientApp(dc.client_id, dc.name, list(dc.redirect_uris), dict(dc.secrets))
                }
                self.managed_identities: dict[str, ManagedIdentity] = {}
            else:
                for app in self.clients.values():
                    app.secrets = {s: True for s in app.secrets}
                    for cert in app.certificates.values():
                        cert.valid = True
            self.codes: dict[str, AuthCode] = {}
            self.refresh_tokens: dict[str, RefreshTokenRecord] = {}
            self.access_tokens: dict[str, AccessTokenRecord] = {}
            self.pending: dict[str, PendingAuth] = {}
            self.tokens_valid_from: dict[str, float] = {}  # upn -> revocation time
            self.ca_blocked: dict[str, bool] = {u.upn: u.ca_blocked for u in TEST_USERS.values()}
            self.admin_consented: set[tuple[str, str]] = set()  # (tenant id, client id)
            # Exchange Online RBAC for Applications / Application Access Policy: the mailboxes (UPNs) an
            # application may reach in a tenant; absent = every mailbox of the tenant.
            self.app_scopes: dict[tuple[str, str], frozenset[str]] = {}
            self.strict_rotation = True
            self.clock_offset = 0.0
            self.token_latency_ms = 0
            self.access_token_lifetime_s: int | None = None  # None: Entra's default 60-90 minutes
            self.injections: list[Injection] = []
            self.release_generation = getattr(self, "release_generation", 0) + 1
            self.counters: Counter[str] = Counter()
            self.inflight: Counter[tuple[str, str]] = Counter()
            self.max_inflight: dict[str, int] = {}
            self.request_log: dict[tuple[str, str], deque[float]] = {}
            # Change notifications (subscriptions.py) and delta queries (delta.py).
            self.subscriptions: dict[str, Any] = {}
            self.allow_http_notifications = self.allow_http_default
            self.validation_timeout_s = 10.0  # Graph's handshake limit; tests may shorten it
            self.notify_drop = 0  # the next N change notifications are dropped (-1: all, until set to 0)
            self.notify_duplicate = 0  # the next N change notifications are sent twice (-1: all)
            self.notify_inflight = getattr(self, "notify_inflight", 0)
            self.notification_log: deque[dict[str, Any]] = deque(maxlen=5000)
            self.delta_tokens: OrderedDict[str, Any] = OrderedDict()
            self.delta_pages: OrderedDict[str, Any] = OrderedDict()
            self.mailboxes: dict[str, Mailbox] = {}
            for u in TEST_USERS.values():
                if u.has_mailbox:
                    mb = Mailbox(u, on_added=self._message_added, on_changed=self._message_changed)
                    mb.seed(DEFAULT_SEED, "inbox", now=self.now())
                    self.mailboxes[u.upn] = mb
            self.uploads: dict[str, Any] = {}
            self.cond.notify_all()

    def now(self) -> float:
        return time.time() + self.clock_offset

    def _message_added(self, mb: Mailbox, msg: dict[str, Any]) -> None:
        from .subscriptions import message_arrived

        message_arrived(self, mb, msg)

    def _message_changed(self, mb: Mailbox, msg: dict[str, Any], change: str, before: dict[str, Any]) -> None:
        from .subscriptions import message_changed

        message_changed(self, mb, msg, change, before)

    # -- injections ------------------------------------------------------------------------
    def take_injection(self, path: str, user: str | None = None) -> Injection | None:
        with self.lock:
            for inj in self.injections:
                if inj.remaining > 0 and inj.matches(path, user):
                    inj.remaining -= 1
                    self.counters["injected"] += 1
                    if inj.remaining == 0:
                        self.injections.remove(inj)
                    return inj
        return None

    def injected_sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``; ``release()`` (control API) ends every such sleep at once."""
        deadline = time.monotonic() + seconds
        with self.cond:
            gen = self.release_generation
            while self.release_generation == gen:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self.cond.wait(remaining)

    def release(self) -> None:
        with self.cond:
            self.release_generation += 1
            self.cond.notify_all()

    # -- per-mailbox concurrency (Outlook service limits) ------------------------------------
    def enter_mailbox(self, client_id: str, upn: str) -> str | None:
        """Register an in-flight request; returns a throttling reason or None."""
        key = (client_id, upn)
        with self.cond:
            now = time.monotonic()
            log = self.request_log.setdefault(key, deque())
            while log and now - log[0] > 600:
                log.popleft()
            if len(log) >= MAILBOX_REQUESTS_PER_10_MIN:
                return "MailboxRequests"
            if self.inflight[key] >= MAX_CONCURRENT_PER_MAILBOX:
                return "MailboxConcurrency"
            log.append(now)
            self.inflight[key] += 1
            self.max_inflight[upn] = max(self.max_inflight.get(upn, 0), self.inflight[key])
            self.cond.notify_all()
            return None

    def leave_mailbox(self, client_id: str, upn: str) -> None:
        key = (client_id, upn)
        with self.cond:
            self.inflight[key] -= 1
            if self.inflight[key] <= 0:
                del self.inflight[key]
            self.cond.notify_all()

    def wait_inflight(self, upn: str, n: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(
                lambda: sum(v for (c, u), v in self.inflight.items() if u == upn) >= n, timeout
            )

    # -- grants ----------------------------------------------------------------------------
    def live_refresh_tokens(self, upn: str, client_id: str | None = None) -> list[float]:
        """The mint times (monotonic clock) of the user's refresh tokens that would be redeemed now."""
        with self.lock:
            now = self.now()
            valid_from = self.tokens_valid_from.get(upn, 0.0)
            return sorted(
                r.minted for r in self.refresh_tokens.values()
                if r.user.upn == upn
                and (client_id is None or r.client_id == client_id)
                and not (r.rotated and self.strict_rotation)
                and r.issued_at >= valid_from
                and now - r.last_used <= RT_INACTIVITY_S
            )

    def lost_rotations(self, upn: str, client_id: str | None = None) -> list[tuple[float, float]]:
        """(successor minted, stale token presented) for each of the user's rotated refresh tokens that was
        presented again while the token it was exchanged for was never redeemed (monotonic clock)."""
        with self.lock:
            out = []
            for r in self.refresh_tokens.values():
                if r.user.upn != upn or (client_id is not None and r.client_id != client_id):
                    continue
                succ = self.refresh_tokens.get(r.successor) if r.successor else None
                if r.stale_presented is not None and succ is not None and not succ.rotated:
                    out.append((succ.minted, r.stale_presented))
            return sorted(out)

    def revoke_grants(self, upn: str) -> None:
        with self.lock:
            self.tokens_valid_from[upn] = self.now()

    def expire_access_tokens(self, upn: str) -> int:
        with self.lock:
            n = 0
            for rec in self.access_tokens.values():
                if rec.user.upn == upn and not rec.expired:
                    rec.expired = True
                    n += 1
            return n

    def counters_snapshot(self) -> dict[str, Any]:
        with self.lock:
            token_by_grant = {
                k.split(":", 1)[1]: v for k, v in self.counters.items() if k.startswith("token:")
            }
            graph_by_user = {
                k.split(":", 1)[1]: v for k, v in self.counters.items() if k.startswith("graph_user:")
            }
            return {
                "token_requests": sum(token_by_grant.values()),
                "token_requests_by_grant_type": token_by_grant,
                "token_errors": {
                    k.split(":", 1)[1]: v for k, v in self.counters.items() if k.startswith("token_error:")
                },
                "client_auth_by_method": {
                    k.split(":", 1)[1]: v for k, v in self.counters.items() if k.startswith("client_auth:")
                },
                "authorize_requests": self.counters["authorize"],
                "graph_requests": self.counters["graph"],
                "graph_requests_by_user": graph_by_user,
                "throttled_429": self.counters["throttled_429"],
                "injected": self.counters["injected"],
                "sendmail": self.counters["sendmail"],
                "upload_chunks": self.counters["upload_chunks"],
                "max_concurrent_per_mailbox": dict(self.max_inflight),
                "notifications": {k.split("_", 1)[1]: v for k, v in self.counters.items() if k.startswith("notify_")},
                "subscriptions_created": self.counters["subscriptions_created"],
                "delta_requests": self.counters["delta_requests"],
                "inflight": {u: n for (c, u), n in self.inflight.items()},
            }
