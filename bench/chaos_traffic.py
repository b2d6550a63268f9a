"""The chaos run's clients: a realistic mix through the public HTTP API, every answer recorded.

Each client thread balances over the dev hosts itself (an instance that refuses the connection is
skipped, as a load balancer would), and records every request: route, status, outcome class,
problem code, start time and latency. Sends carry a unique subject so the audit can count what
the sandbox delivered; some carry an ``Idempotency-Key`` and some of those give up after a short
timeout and retry with the same key, as an impatient integrator does.
"""

from __future__ import annotations

import base64
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests

RETURN_URL = "https://app.example.com/connected"
# (user, weight): two work mailboxes in Contoso, a personal account (the consumer tenant), a user
# whose tenant removed Mail.Send and one without a mailbox (mapped 4xx answers, never 5xx).
USERS = (("adele@contoso.onmicrosoft.com", 36), ("megan@contoso.onmicrosoft.com", 36), ("pat@outlook.com", 20),
         ("nosend@contoso.onmicrosoft.com", 4), ("nomailbox@contoso.onmicrosoft.com", 4))
REVOKED_USER = "pat@outlook.com"  # its grants are revoked on purpose during the run
OPS = (("send", 32), ("read", 38), ("get", 10), ("refresh", 12), ("connect", 4), ("disconnect", 3))


@dataclass
class Mailbox:
    owner: str
    account_id: str
    user: str
    connected_at: float  # seconds since the run started
    disconnected: bool = False
    keep: bool = False  # connected before the traffic: never disconnected (the audit needs long-lived accounts)


@dataclass
class Rec:
    route: str
    status: int  # 0: no answer (refused, reset or timed out)
    klass: str
    code: str
    t0: float
    ms: float


@dataclass
class SendRec:
    user: str
    key: str | None
    outcomes: list[str] = field(default_factory=list)  # "sent" | "<status>:<code>" | "unknown"


def classify(resp: requests.Response | None) -> tuple[str, str]:
    """(outcome class, problem code): 2xx / mapped_4xx / 503_retry_after / other / no_answer."""
    if resp is None:
        return "no_answer", ""
    s = resp.status_code
    if s < 400:
        return "2xx", ""
    code = ""
    if resp.headers.get("Content-Type", "").startswith("application/problem+json"):
        try:
            code = str(resp.json().get("code") or "")
        except ValueError:
            code = ""
    if 400 <= s < 500 and code:
        return "mapped_4xx", code
    if s == 503 and resp.headers.get("Retry-After", "").isdigit() and code:
        return "503_retry_after", code
    return "other", code or resp.text[:80]


class Registry:
    """The mailboxes the clients know about (thread-safe)."""

    def __init__(self, seed: int) -> None:
        self.lock = threading.Lock()
        self.boxes: list[Mailbox] = []
        self.rng = random.Random(seed)
        self.owner_seq = 0

    def add(self, mb: Mailbox) -> None:
        with self.lock:
            self.boxes.append(mb)

    def pick(self, rng: random.Random, *, churn_only: bool = False) -> Mailbox | None:
        with self.lock:
            live = [b for b in self.boxes if not b.disconnected and not (churn_only and b.keep)]
        return rng.choice(live) if live else None

    def next_owner(self) -> str:
        with self.lock:
            self.owner_seq += 1
            return f"chaos-owner-{self.owner_seq // 2}"  # two mailboxes per owner

    def all(self) -> list[Mailbox]:
        with self.lock:
            return list(self.boxes)


class Recorder:
    def __init__(self) -> None:
        self.t_start = time.monotonic()
        self.lock = threading.Lock()
        self.recs: list[Rec] = []
        self.sends: dict[str, SendRec] = {}  # subject -> what the client was told
        self.connected: list[str] = []  # account ids the callback said were connected
        self.disconnected: list[str] = []  # account ids the API deleted (204)
        self.transport_retries = 0

    def now(self) -> float:
        return time.monotonic() - self.t_start

    def add(self, route: str, resp: requests.Response | None, t0: float, ms: float) -> None:
        klass, code = classify(resp)
        with self.lock:
            self.recs.append(Rec(route, resp.status_code if resp is not None else 0, klass, code, t0, ms))


class Api:
    """One client's HTTP access to the hosts: JWTs per owner, client-side balancing, recording."""

    def __init__(self, stack: Any, recorder: Recorder | None, rng: random.Random) -> None:
        self.stack, self.rec, self.rng = stack, recorder, rng
        self.http = requests.Session()
        self.http.trust_env = False
        self.browser = requests.Session()
        self.browser.trust_env = False
        self.browser.verify = stack.ca
        self._tokens: dict[str, tuple[str, float]] = {}

    def close(self) -> None:
        self.http.close()
        self.browser.close()

    def token(self, sub: str) -> str:
        import jwt

        cached = self._tokens.get(sub)
        now = time.time()
        if cached and cached[1] > now + 60:
            return cached[0]
        claims = {"sub": sub, "iss": "https://chaos.bench", "aud": "chaos", "iat": int(now), "exp": int(now) + 3600}
        tok = jwt.encode(claims, self.stack.jwt_secret, algorithm="HS256")
        self._tokens[sub] = (tok, now + 3600)
        return tok

    def call(self, method: str, path: str, *, route: str, sub: str | None = None, timeout: float = 60,
             host: int | None = None, **kw: Any) -> requests.Response | None:
        """One request; a refused connection (an instance that is down) moves on to the next instance.
        Any other transport failure (reset, timeout) is an unknown outcome: recorded, not retried here."""
        headers = dict(kw.pop("headers", {}))
        if sub is not None:
            headers["Authorization"] = f"Bearer {self.token(sub)}"
        urls = [h.url for h in self.stack.hosts]
        first = host if host is not None else self.rng.randrange(len(urls))
        t0 = self.rec.now() if self.rec else 0.0
        start = time.monotonic()
        resp: requests.Response | None = None
        for attempt in range(3 * len(urls)):  # bounded: every instance, three rounds
            url = urls[(first + attempt) % len(urls)] + path
            try:
                resp = self.http.request(method, url, headers=headers, timeout=(2, timeout), allow_redirects=False,
                                         **kw)
                break
            except requests.ConnectionError as e:
                if not _refused(e):
                    break
                if self.rec:
                    with self.rec.lock:
                        self.rec.transport_retries += 1
                if (attempt + 1) % len(urls) == 0:
                    time.sleep(0.5)  # every instance refused: wait for one to come back (bounded above)
            except (requests.Timeout, requests.exceptions.ChunkedEncodingError):
                break  # no (whole) answer: a timeout, or a body cut off by an instance killed while sending it
        if self.rec:
            self.rec.add(route, resp, t0, (time.monotonic() - start) * 1000)
        return resp


def _refused(e: Exception) -> bool:
    text = repr(e)
    return "Connection refused" in text or "NewConnectionError" in text or "Errno 111" in text


def connect(api: Api, registry: Registry, user: str, owner: str | None = None) -> Mailbox | None:
    """The whole journey: start, the browser at /authorize (form_post page), POST to the callback."""
    from devstack.sandbox.client import redirect_fields

    owner = owner or registry.next_owner()
    r = api.call("GET", "/api/connect/microsoft", route="connect_start", sub=owner,
                 params={"returnUrl": RETURN_URL, "loginHint": user})
    if r is None or r.status_code != 200:
        return None
    try:
        fields = redirect_fields(api.browser.get(r.json()["authUrl"], allow_redirects=False, timeout=30))
    except (requests.RequestException, ValueError):
        return None
    cb = api.call("POST", "/api/connect/microsoft/callback", route="connect_callback", data=fields)
    if cb is None or cb.status_code != 302:
        return None
    q = {k: v[0] for k, v in parse_qs(urlsplit(cb.headers["Location"]).query).items()}
    if q.get("status") != "connected":
        return None
    mb = Mailbox(owner, q["accountId"], user, api.rec.now() if api.rec else 0.0)
    registry.add(mb)
    if api.rec:
        with api.rec.lock:
            api.rec.connected.append(mb.account_id)
    return mb


def pick_user(rng: random.Random) -> str:
    return rng.choices([u for u, _ in USERS], weights=[w for _, w in USERS])[0]


def send(api: Api, mb: Mailbox) -> None:
    rng = api.rng
    subject = f"chaos {uuid.uuid4().hex}"
    body: dict[str, Any] = {"to": ["someone@example.com"], "subject": subject, "bodyText": "chaos run"}
    if rng.random() < 0.2:
        blob = base64.b64encode(rng.randbytes(rng.choice((2_000, 40_000)))).decode()
        body["attachments"] = [{"name": "a.bin", "contentType": "application/octet-stream", "contentBytes": blob}]
    key = uuid.uuid4().hex if rng.random() < 0.7 else None
    impatient = key is not None and rng.random() < 0.15
    rec = SendRec(mb.user, key)
    assert api.rec is not None
    with api.rec.lock:
        api.rec.sends[subject] = rec
    path = f"/api/accounts/{mb.account_id}/send"
    for attempt in range(4 if key else 1):  # only a keyed send may be retried
        headers = {"Idempotency-Key": key} if key else {}
        r = api.call("POST", path, route="send", sub=mb.owner, json=body, headers=headers,
                     timeout=1.0 if impatient and attempt == 0 else 60)
        outcome = _send_outcome(r)
        rec.outcomes.append(outcome)
        if not key or not _retry_send(r, outcome):
            return
        time.sleep(min(float(r.headers.get("Retry-After", "1")) if r is not None else 1.0, 5.0))


def _send_outcome(r: requests.Response | None) -> str:
    if r is None:
        return "unknown"
    if r.status_code == 202:
        return "sent"
    return f"{r.status_code}:{classify(r)[1]}"


def _retry_send(r: requests.Response | None, outcome: str) -> bool:
    """An integrator retries with the same key after no answer, a 503, or 'still in progress'."""
    return r is None or r.status_code == 503 or outcome.endswith("idempotency_in_progress")


def read(api: Api, mb: Mailbox) -> None:
    r = api.call("GET", f"/api/accounts/{mb.account_id}/messages", route="messages", sub=mb.owner,
                 params={"top": "5"})
    if r is not None and r.status_code == 200 and api.rng.random() < 0.4:
        msgs = r.json().get("messages") or []
        if msgs:
            mid = api.rng.choice(msgs)["id"]
            api.call("GET", f"/api/accounts/{mb.account_id}/messages/{mid}", route="message", sub=mb.owner)


def disconnect(api: Api, registry: Registry, mb: Mailbox) -> None:
    with registry.lock:
        if mb.disconnected:
            return
        mb.disconnected = True  # no other client picks it from now on
    r = api.call("DELETE", f"/api/accounts/{mb.account_id}", route="disconnect", sub=mb.owner)
    if r is not None and r.status_code == 204 and api.rec:
        with api.rec.lock:
            api.rec.disconnected.append(mb.account_id)
    elif r is None or r.status_code != 404:
        with registry.lock:
            mb.disconnected = False  # not deleted (storage down...): it stays in play


def one_op(api: Api, registry: Registry) -> None:
    op = api.rng.choices([o for o, _ in OPS], weights=[w for _, w in OPS])[0]
    if op == "connect":
        connect(api, registry, pick_user(api.rng))
        return
    mb = registry.pick(api.rng, churn_only=op == "disconnect")
    if mb is None:
        return
    if op == "send":
        send(api, mb)
    elif op == "read":
        read(api, mb)
    elif op == "get":
        api.call("GET", f"/api/accounts/{mb.account_id}", route="account", sub=mb.owner)
    elif op == "refresh":
        api.call("POST", f"/api/accounts/{mb.account_id}/refresh", route="refresh", sub=mb.owner)
    else:
        disconnect(api, registry, mb)


def client_loop(api: Api, registry: Registry, stop: threading.Event, deadline: float, max_ops: int) -> int:
    """Until ``stop`` or ``deadline`` (monotonic) or ``max_ops``: whichever comes first."""
    n = 0
    while n < max_ops and not stop.is_set() and time.monotonic() < deadline:
        try:
            one_op(api, registry)
        except Exception as e:  # a client bug must not stop the run silently: recorded as 'other'
            if api.rec:
                with api.rec.lock:
                    api.rec.recs.append(Rec("client_error", -1, "client_error", repr(e)[:120], api.rec.now(), 0))
        n += 1
    return n


def token_churn(control: Any, stop: threading.Event, rng: random.Random, every_s: float) -> int:
    """Access tokens revoked early (as Continuous Access Evaluation does), one user at a time: the next
    Graph call of each of that user's accounts gets 401 and must refresh once and retry once."""
    n = 0
    while n < 10_000 and not stop.wait(every_s):
        try:
            control.expire_access_tokens(pick_user(rng))
            n += 1
        except Exception:  # the sandbox is never down in this run; a failed call just skips a round
            pass
    return n
