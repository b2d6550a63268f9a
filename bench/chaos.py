"""``python -m bench chaos``: a soak-and-chaos run with figures.

Starts the local stack (Azurite, the Microsoft sandbox, a Key Vault double, a webhook receiver and
two or more dev hosts running the timers and queue workers), connects N mailboxes across several
sandbox users and tenants, drives a mix of sends (with and without ``Idempotency-Key``, some with
attachments, some retried after a client timeout), reads, refresh-now, connects and disconnects
from several client threads for ``--minutes``, injects the faults of :mod:`bench.chaos_faults` on a
schedule, then audits against the sandbox's records and storage (:mod:`bench.chaos_audit`), prints
the table and writes it to ``bench/results.md``. Exit status 1 when a promise was broken.

    python -m bench chaos [--mailboxes 200] [--minutes 5] [--clients 8] [--hosts 2]

Every loop is bounded in count and time; all traffic stays on 127.0.0.1 / localhost.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from bench._stack import machine, pct, write_section
from bench.chaos_audit import Audit
from bench.chaos_faults import FULL, SHORT, FaultLog, Faults, Scale
from bench.chaos_stack import OUT, ChaosStack
from bench.chaos_traffic import Api, Mailbox, Recorder, Registry, client_loop, connect, pick_user, token_churn

SECTION = "Chaos: load and faults together (`python -m bench chaos`)"


@dataclass
class Options:
    mailboxes: int = 200
    minutes: float = 5.0
    clients: int = 8
    hosts: int = 2
    seed: int = 15
    write_results: bool = True

    @property
    def scale(self) -> Scale:
        return SHORT if self.minutes < 3 else FULL


@dataclass
class Result:
    audit: Audit
    faults: list[FaultLog]
    ops: int
    seconds: float
    options: Options

    @property
    def ok(self) -> bool:
        return not self.audit.failures() and all(f.recovered is not None for f in self.faults)


def parse(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--mailboxes", type=int, default=200, help="mailboxes connected before the traffic (1-5000)")
    p.add_argument("--minutes", type=float, default=5.0, help="length of the traffic and fault phase (0.2-120)")
    p.add_argument("--clients", type=int, default=8, help="concurrent API clients sending traffic (1-64)")
    p.add_argument("--hosts", type=int, default=2, help="dev host instances behind the clients (2-8)")
    p.add_argument("--seed", type=int, default=15, help="random seed of the traffic and the fault schedule")
    p.add_argument("--write", action="store_true", help="update bench/results.md with the report (a tracked file)")
    a = p.parse_args(argv)
    if not (1 <= a.mailboxes <= 5000 and 0.2 <= a.minutes <= 120 and 1 <= a.clients <= 64 and 2 <= a.hosts <= 8):
        p.error("--mailboxes 1-5000, --minutes 0.2-120, --clients 1-64, --hosts 2-8")
    return Options(a.mailboxes, a.minutes, a.clients, a.hosts, a.seed, a.write)


def connect_all(stack: ChaosStack, registry: Registry, rec: Recorder, n: int, workers: int) -> Mailbox:
    """The canary (an adele mailbox the probes use, never disconnected) and ``n - 1`` more."""
    api = Api(stack, None, random.Random(0))
    canary = connect(api, registry, "adele@contoso.onmicrosoft.com", owner="chaos-canary")
    if canary is None:
        raise RuntimeError("the canary mailbox could not be connected; see bench/.out/chaos/host*.log")
    rec.connected.append(canary.account_id)

    def one(i: int) -> None:
        a = Api(stack, None, random.Random(i))
        try:
            mb = connect(a, registry, pick_user(a.rng))
            if mb is not None:
                with rec.lock:
                    rec.connected.append(mb.account_id)
        finally:
            a.close()

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(1, n)))
    api.close()
    for mb in registry.all():
        mb.keep = True  # churn (connect, disconnect) happens among the accounts connected during the run
    return canary


def drive(stack: ChaosStack, opts: Options, registry: Registry, rec: Recorder, canary: Mailbox) -> tuple[int, Faults]:
    stop = threading.Event()
    deadline = time.monotonic() + opts.minutes * 60
    apis = [Api(stack, rec, random.Random(opts.seed * 1000 + i)) for i in range(opts.clients)]
    probe = Api(stack, rec, random.Random(opts.seed))
    faults = Faults(stack, rec, probe, canary, opts.scale, stop)
    max_ops = int(opts.minutes * 60 * 100)  # per client: far above what a client can do, a bound all the same
    with ThreadPoolExecutor(opts.clients + 1) as pool:
        fault_run = pool.submit(faults.run, deadline - opts.scale.recover_bound_s / 4)
        counts = [pool.submit(client_loop, api, registry, stop, deadline + 2 * 60, max_ops) for api in apis]
        churn = threading.Thread(target=token_churn, args=(stack.control, stop, random.Random(opts.seed), 5.0),
                                 daemon=True)
        churn.start()
        threading.Thread(target=_progress, args=(rec, faults, stop, deadline), daemon=True).start()
        try:
            fault_run.result(timeout=opts.minutes * 60 + 15 * 60)  # bounded even if a fault hangs
            stop.wait(max(0.0, deadline - time.monotonic()))  # traffic continues after the last fault
        finally:
            stop.set()
        ops = sum(c.result(timeout=5 * 60) for c in counts)
        churn.join(10)
    for api in apis + [probe]:
        api.close()
    return ops, faults


def _progress(rec: Recorder, faults: Faults, stop: threading.Event, deadline: float,
              every_s: float = 30.0) -> None:
    """A line every ``every_s`` during the traffic phase, so a long run shows it is alive and where it is."""
    while not stop.wait(every_s):
        with rec.lock:
            ops, errors = len(rec.recs), sum(r.status >= 500 or r.status == 0 for r in rec.recs)
        left = max(0.0, deadline - time.monotonic()) / 60
        print(f"chaos: {ops} requests so far ({errors} 5xx or no answer), {len(faults.log)} faults injected, "
              f"{left:.1f} min of traffic left", flush=True)


def audit(stack: ChaosStack, registry: Registry, rec: Recorder, faults: Faults, opts: Options) -> Audit:
    from bench import chaos_audit as ca

    a = Audit()
    stack.control.clear_injections()
    ca.drain(stack, bound_s=300 if opts.scale is FULL else 120)
    windows = [(f.started, f.recovered if f.recovered is not None else f.ended + opts.scale.recover_bound_s)
               for f in faults.log]
    ca.requests_and_latency(a, rec, windows)
    ca.sends(a, stack, rec)
    api = Api(stack, None, random.Random(1))
    kills = [f.started for f in faults.log if f.name.startswith("host SIGKILLed")]
    ca.accounts(a, stack, api, registry.all(), faults.revoked_at, t_start=rec.t_start, kills=kills)
    ca.drain(stack, bound_s=300 if opts.scale is FULL else 120)  # the reauth webhooks the audit caused
    api.close()
    ca.webhooks(a, stack, rec)
    ca.leaks(a, stack)
    ca.background(a, stack)
    ca.write_log(OUT / "audit.json", a)
    return a


def run(opts: Options) -> Result:
    stack = ChaosStack(hosts=opts.hosts)
    try:
        stack.start()
        registry, rec = Registry(opts.seed), Recorder()
        print(f"chaos: stack up ({opts.hosts} hosts); connecting {opts.mailboxes} mailboxes", flush=True)
        canary = connect_all(stack, registry, rec, opts.mailboxes, max(4, opts.clients))
        print(f"chaos: {len(registry.all())} connected; traffic for {opts.minutes:g} min", flush=True)
        t0 = time.monotonic()
        ops, faults = drive(stack, opts, registry, rec, canary)
        seconds = time.monotonic() - t0
        print("chaos: traffic stopped; auditing", flush=True)
        return Result(audit(stack, registry, rec, faults, opts), faults.log, ops, seconds, opts)
    finally:
        stack.stop()


# -- the report ------------------------------------------------------------------------------
def _ms(xs: list[float]) -> str:
    return f"{pct(xs, 0.5):.0f} / {pct(xs, 0.95):.0f} / {pct(xs, 0.99):.0f}" if xs else "–"


def table(r: Result) -> str:
    a, o = r.audit, r.options
    lines = [f"Machine: {machine()}. {o.mailboxes} mailboxes, {o.hosts} dev hosts, {o.clients} client threads, "
             f"{r.seconds / 60:.1f} min of traffic, {r.ops} client operations. Verdict: "
             f"**{'PASS' if r.ok else 'FAIL'}**.", "", "| Requests by outcome | count |", "|---|---:|"]
    for k in ("2xx", "mapped_4xx", "503_retry_after", "other", "client_error", "no_answer"):
        lines.append(f"| {_OUTCOME[k]} | {a.outcomes.get(k, 0)} |")
    if a.other:
        lines += ["", "Unmapped answers: " + ", ".join(f"`{k}` × {v}" for k, v in a.other.most_common(10))]
    lines += ["", "| Route | p50 / p95 / p99 ms outside faults | n | during faults | n |", "|---|---|---:|---|---:|"]
    for route in sorted({k[0] for k in a.latency}):
        out, dur = a.latency.get((route, "outside faults"), []), a.latency.get((route, "during faults"), [])
        lines.append(f"| {route} | {_ms(out)} | {len(out)} | {_ms(dur)} | {len(dur)} |")
    lines += ["", "| Sends | count |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in a.sends.items()]
    lines += ["", "| Accounts at the end (each refreshed by the audit) | count |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(a.accounts.items())]
    lines += ["", "| Sandbox user | live refresh tokens at Entra (incl. disconnected accounts': Entra has no "
              "per-token revocation) | active accounts stored |", "|---|---:|---:|"]
    lines += [f"| {u} | {lv} | {ac} |" for u, (lv, ac) in a.live_tokens.items()]
    lines += ["", "| Webhooks | expected | delivered |", "|---|---:|---:|"]
    lines += [f"| {k} | {e or '–'} | {d} |" for k, (e, d) in a.webhooks.items()]
    lines += ["", f"Background functions: {a.poison} poison queue messages; exceptions the host retried: "
              + (", ".join(f"`{k}` × {v}" for k, v in a.background.most_common()) or "none") + "."]
    lines += ["", f"Plaintext tokens or secrets found in storage or host logs: **{len(a.leaks)}**.", "",
              "| Fault (t = s since traffic began) | start | end | recovered after |", "|---|---:|---:|---:|"]
    for f in r.faults:
        rec = f"{f.recovery_s:.1f} s" if f.recovery_s is not None else "NOT RECOVERED"
        lines.append(f"| {f.name}: {f.detail} | {f.started:.0f} | {f.ended:.0f} | {rec} |")
    if a.killed_mid_refresh:
        lines += ["", "Lost to a SIGKILL between Entra's answer and the write (each matched to a live refresh "
                  "token minted within 2 s before the kill that no account holds; with Entra, which does not "
                  "revoke a used refresh token, the stored one would still work): "
                  + ", ".join(f"`{x}`" for x in a.killed_mid_refresh)]
    if not r.ok:
        lines += ["", "Failures: " + "; ".join(a.failures() or ["a fault did not recover"])]
    return "\n".join(lines)


_OUTCOME = {"2xx": "2xx (and the callback's 302)", "mapped_4xx": "mapped 4xx (problem with a code)",
            "503_retry_after": "503 with Retry-After", "other": "anything else (must be 0; no 500s)",
            "client_error": "bench client errors (must be 0)",
            "no_answer": "no answer (instance killed mid-request or mid-answer, or the client's own 1 s timeout)"}


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    r = run(opts)
    text = table(r)
    print("\n" + text)
    if opts.write_results:
        write_section(SECTION, _NOTE + "\n\n" + text)
        print("\nresults written to bench/results.md")
    return 0 if r.ok else 1


_NOTE = ("Faults are injected one after another (the webhook outage alongside) while the clients run; "
         "'during faults' is from a fault's start until its probe saw every instance healthy again. "
         "The audit counts deliveries in the sandbox's own sent records, refreshes every stored account "
         "through the API, and scans storage and host logs for every token and secret issued in the run.")
