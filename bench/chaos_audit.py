"""The chaos run's audit: against the sandbox's own records (what was delivered, which refresh tokens
live) and against storage and logs (what the connector kept), never against what the API claimed."""

from __future__ import annotations

import json
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.chaos_stack import CLIENT_ID, ChaosStack
from bench.chaos_traffic import REVOKED_USER, USERS, Api, Mailbox, Recorder, classify

QUEUES = ("refresh-jobs", "webhook-deliveries")
_TOKENISH = re.compile(r"[A-Za-z0-9_\-~+/=.]{16,}")
_FAILED = re.compile(r"devstack host: (?:timer )?(\w+) failed")
_EXC = re.compile(r"([A-Za-z_][\w.]*(?:Error|Exception))(?::|\\n|$)")


@dataclass
class Audit:
    outcomes: Counter[str] = field(default_factory=Counter)
    other: Counter[str] = field(default_factory=Counter)  # "<route> <status> <code>" of unmapped answers
    no_answer: Counter[str] = field(default_factory=Counter)
    latency: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    sends: dict[str, int] = field(default_factory=dict)
    accounts: dict[str, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    # Lost only because strict rotation is harsher than Entra: see :func:`_killed_mid_refresh`.
    killed_mid_refresh: list[str] = field(default_factory=list)
    live_tokens: dict[str, tuple[int, int]] = field(default_factory=dict)  # user -> (live RTs, active accounts)
    webhooks: dict[str, tuple[int, int]] = field(default_factory=dict)  # type -> (expected, delivered)
    missing_events: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    background: Counter[str] = field(default_factory=Counter)  # "<function> <exception>" raised by timers/queues
    poison: int = 0  # queue messages parked after maxDequeueCount failures

    def failures(self) -> list[str]:
        out = []
        if self.outcomes["other"] or self.outcomes["client_error"]:
            out.append(f"{self.outcomes['other']} unmapped answers, {self.outcomes['client_error']} client errors: "
                       f"{dict(self.other.most_common(8))}")
        for k in ("duplicates", "202 but not delivered"):
            if self.sends.get(k):
                out.append(f"{self.sends[k]} sends: {k}")
        if self.lost:
            out.append(f"{len(self.lost)} lost refresh tokens: {self.lost[:5]}")
        if self.missing_events:
            out.append(f"{len(self.missing_events)} webhooks never delivered: {self.missing_events[:5]}")
        bad = self.webhooks.get("bad signatures", (0, 0))[1]
        if bad:
            out.append(f"{bad} webhook deliveries with a whole body and a signature that does not verify")
        if self.poison:
            out.append(f"{self.poison} poison queue messages; background exceptions: {dict(self.background)}")
        if self.leaks:
            out.append(f"{len(self.leaks)} leaked secrets: {self.leaks[:5]}")
        return out


def in_fault(t: float, windows: list[tuple[float, float]]) -> bool:
    return any(a <= t <= b for a, b in windows)


def requests_and_latency(a: Audit, rec: Recorder, windows: list[tuple[float, float]]) -> None:
    for r in rec.recs:
        if r.route == "probe":
            continue
        a.outcomes[r.klass] += 1
        if r.klass in ("other", "client_error"):
            a.other[f"{r.route} {r.status} {r.code}"] += 1
        elif r.klass == "no_answer":
            a.no_answer[r.route] += 1
        else:
            phase = "during faults" if in_fault(r.t0, windows) else "outside faults"
            a.latency.setdefault((r.route, phase), []).append(r.ms)


def drain(stack: ChaosStack, bound_s: float) -> None:
    """Wait (bounded) until the work queues are empty: every refresh done, every webhook attempted."""
    from azure.storage.queue import QueueClient

    cs = stack.hosts[0].env["AzureWebJobsStorage"]
    deadline = time.monotonic() + bound_s
    for name in QUEUES:
        q = QueueClient.from_connection_string(cs, name)
        while time.monotonic() < deadline:
            try:
                if q.get_queue_properties().approximate_message_count == 0:
                    break
            except Exception:  # not created yet / storage blip: look again
                pass
            time.sleep(1.0)


def sends(a: Audit, stack: ChaosStack, rec: Recorder) -> None:
    delivered: Counter[str] = Counter()
    for user, _ in USERS:
        for s in stack.control.sent(user):
            delivered[str(s["message"].get("subject", ""))] += 1
    c: Counter[str] = Counter()
    for subject, sr in rec.sends.items():
        n = delivered.get(subject, 0)
        c["requests"] += 1
        c["with Idempotency-Key"] += sr.key is not None
        c["client retries"] += max(0, len(sr.outcomes) - 1)
        c["outcome-unknown answers"] += sum(o == "unknown" or "outcome_unknown" in o for o in sr.outcomes)
        c["delivered"] += n
        c["duplicates"] += max(0, n - 1)
        c["202 but not delivered"] += "sent" in sr.outcomes and n == 0
        c["refused (mapped error) but delivered"] += n > 0 and "sent" not in sr.outcomes and not any(
            o == "unknown" or "outcome_unknown" in o or o.startswith("503") for o in sr.outcomes)
    a.sends = dict(c)


def stored_accounts(stack: ChaosStack) -> list[dict[str, Any]]:
    from azure.data.tables import TableClient

    t = TableClient.from_connection_string(stack.hosts[0].env["AzureWebJobsStorage"], "accounts")
    return [dict(e) for e in t.list_entities()]


def accounts(a: Audit, stack: ChaosStack, api: Api, mailboxes: list[Mailbox], revoked_at: float | None, *,
             t_start: float, kills: list[float]) -> None:
    """Every account the connector stores gets a refresh now: it must work, unless its grant was revoked.

    ``t_start``: when traffic began (``time.monotonic()``); ``kills``: when a host was SIGKILLed (s since then).
    """
    known = {m.account_id: m for m in mailboxes}
    c: Counter[str] = Counter()
    audit_began = time.monotonic()
    lost_by_user: dict[str, list[str]] = defaultdict(list)
    for e in stored_accounts(stack):
        acc_id, owner = e["RowKey"], e.get("owner", "")
        mb = known.get(acc_id)
        verdict = _verify_refresh(api, owner, acc_id)
        revoked = e.get("email", "").lower() == REVOKED_USER and revoked_at is not None and (
            mb is None or mb.connected_at < revoked_at)
        if verdict == "active":
            c["active, refresh token works"] += 1
        elif verdict == "reauth_required" and revoked:
            c["reauth_required (grant revoked on purpose)"] += 1
        else:
            c[f"LOST ({verdict})"] += 1
            a.lost.append(f"{acc_id} {e.get('email')} {verdict}")
            if verdict == "reauth_required":
                lost_by_user[e.get("email", "").lower()].append(a.lost[-1])
    for user, lost in lost_by_user.items():
        excused = _killed_mid_refresh(stack, user, lost, audit_began=audit_began, t_start=t_start, kills=kills)
        for item in excused:
            a.lost.remove(item)
            a.killed_mid_refresh.append(item)
            c[f"LOST ({item.rsplit(' ', 1)[1]})"] -= 1
            c["reauth_required: host SIGKILLed between Entra's answer and the write (strict rotation only)"] += 1
    a.accounts = {k: v for k, v in c.items() if v}
    stored = stored_accounts(stack)
    for user, _ in USERS:
        active = sum(1 for e in stored if e.get("email", "").lower() == user and e.get("status") == "active")
        a.live_tokens[user] = (stack.control.live_refresh_tokens(user, CLIENT_ID), active)


def _killed_mid_refresh(stack: ChaosStack, user: str, lost: list[str], *, audit_began: float, t_start: float,
                        kills: list[float]) -> list[str]:
    """The lost accounts of ``user`` that a host SIGKILL explains, each matched to its own lost rotation.

    A host killed after the sandbox rotated a refresh token and before the connector stored the new
    one leaves the stored token dead under strict rotation and its successor live but never redeemed.
    No client can survive that with strict rotation; Entra does not revoke a refresh token when it is
    used (https://learn.microsoft.com/entra/identity-platform/refresh-tokens), so there the stored
    one keeps working. The sandbox keeps each token's successor, so the audit asks it for exactly
    that signature: a rotated token presented again (the stored one, by the next refresh) whose
    successor was never used. Such a loss is excused only when a host was killed after the successor
    was minted, before the stale token came back and within the refresh lease (the longest a host may
    hold a new token it has not stored: it keeps retrying the write through a storage outage). A lost
    rotation without a kill in that window, or a loss without a lost rotation, stays a failure.
    """
    from shared.tokens import LEASE

    kills_at = [t_start + k for k in kills]
    rotations = [(m, p) for m, p in stack.control.lost_rotations(user, CLIENT_ID) if m < audit_began]
    explained = [m for m, p in rotations
                 if any(m - 0.5 <= k <= min(p, m + LEASE.total_seconds()) for k in kills_at)]
    return lost[:len(explained)]


def _verify_refresh(api: Api, owner: str, acc_id: str) -> str:
    for _ in range(5):  # bounded: a 503 (throttled) is retried after its Retry-After
        r = api.call("POST", f"/api/accounts/{acc_id}/refresh", route="audit", sub=owner, timeout=60)
        if r is not None and r.status_code == 200:
            return str(r.json().get("status"))
        klass, code = classify(r)
        if klass == "mapped_4xx":
            return code
        time.sleep(min(int(r.headers.get("Retry-After", "2")) if r is not None else 2, 5))
    return f"unverified ({klass} {code})"


def webhooks(a: Audit, stack: ChaosStack, rec: Recorder) -> None:
    assert stack.receiver is not None
    got: dict[str, set[str]] = defaultdict(set)
    for e in stack.receiver.snapshot().values():
        got[e["type"]].add(e["data"]["account"]["id"])
    expected = {"account.connected": set(rec.connected), "account.disconnected": set(rec.disconnected),
                "account.reauth_required": {e["RowKey"] for e in stored_accounts(stack)
                                            if e.get("status") == "reauth_required"}}
    for kind, ids in expected.items():
        a.webhooks[kind] = (len(ids), len(ids & got[kind]))
        a.missing_events += [f"{kind} {i}" for i in sorted(ids - got[kind])]
    a.webhooks["bad signatures"] = (0, stack.receiver.bad_signatures)
    a.webhooks["cut off mid-request (sender killed)"] = (0, stack.receiver.cut_off)
    a.webhooks["deliveries (all, incl. repeats)"] = (0, stack.receiver.deliveries)


def secrets_known(stack: ChaosStack) -> set[str]:
    found = set(stack.control.issued_secrets()) | set(stack.client_secrets) | set(stack.key_material)
    found |= set(stack.vault.issued_tokens())
    assert stack.receiver is not None
    found |= {stack.receiver.secret, stack.jwt_secret}
    return {s for s in found if len(s) >= 16}


def leaks(a: Audit, stack: ChaosStack) -> None:
    known = secrets_known(stack)
    by_prefix: dict[str, list[str]] = defaultdict(list)
    for s in known:
        by_prefix[s[:16]].append(s)
    texts = [(str(p.name), p.read_text(errors="replace")) for p in stack.log_paths() if p.exists()]
    texts.append(("accounts+states+idempotency tables", json.dumps(_all_entities(stack), default=str)))
    for where, text in texts:
        for hit in _scan(text, by_prefix):
            a.leaks.append(f"{where}: {hit[:8]}…")


def _scan(text: str, by_prefix: dict[str, list[str]]) -> set[str]:
    hits = set()
    for m in _TOKENISH.finditer(text):
        run = m.group(0)
        for i in range(len(run) - 15):
            for s in by_prefix.get(run[i:i + 16], ()):
                if run.startswith(s, i):
                    hits.add(s)
    return hits


def _all_entities(stack: ChaosStack) -> list[dict[str, Any]]:
    from azure.data.tables import TableServiceClient

    svc = TableServiceClient.from_connection_string(stack.hosts[0].env["AzureWebJobsStorage"])
    out: list[dict[str, Any]] = []
    for t in svc.list_tables():
        out += [dict(e) for e in svc.get_table_client(t.name).list_entities()]
    return out


def write_log(path: Path, a: Audit) -> None:
    path.write_text(json.dumps({k: (v if not isinstance(v, dict) else {str(x): y for x, y in v.items()})
                                for k, v in a.__dict__.items() if k != "latency"}, indent=2, default=str))


def background(a: Audit, stack: ChaosStack) -> None:
    """Exceptions the timers and queue functions raised (the host retries those messages), and
    messages that ended in a poison queue (what an operator is alerted about)."""
    from azure.storage.queue import QueueClient

    for path in stack.log_paths():
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            m = _FAILED.search(line)
            if m:
                exc = _EXC.findall(line)
                a.background[f"{m.group(1)} {exc[-1].rsplit('.', 1)[-1] if exc else '?'}"] += 1
    cs = stack.hosts[0].env["AzureWebJobsStorage"]
    for name in QUEUES:
        try:
            q = QueueClient.from_connection_string(cs, name + "-poison")
            a.poison += q.get_queue_properties().approximate_message_count or 0
        except Exception:  # never created: nothing was parked
            pass
