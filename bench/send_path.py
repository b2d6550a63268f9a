"""Send path: median in-process send latency vs the irreducible I/O (one table read + one Graph call).

Both loops run in the same process against the same Azurite and zero-latency sandbox, interleaved
in rounds so drift affects both alike. A fresh access token must cost no table write: the
account row's ETag is compared before and after the measured sends.
"""

from __future__ import annotations

import json
import time

from bench._stack import Stack, machine, median, pct, write_section


def run(n: int = 300) -> dict[str, float]:
    from shared._http import new_session
    from shared.accounts import owner_partition
    from shared.mail import parse_send_request

    stack = Stack()
    try:
        c = stack.connector()
        owner = "bench-owner"
        acc_id = stack.connect(c, owner, "adele@contoso.onmicrosoft.com")
        from azure.data.tables import TableClient

        table = TableClient.from_connection_string(c.settings.storage_connection_string, "accounts")
        token = c.accounts.open_tokens(c.accounts.get_account(owner, acc_id)).access_token
        session = new_session(stack.ca)
        body = {"to": ["rcpt@example.com"], "subject": "bench", "bodyText": "hello"}
        graph_payload = json.dumps({"message": {"subject": "bench", "body": {"contentType": "Text", "content": "hello"},
                                                "toRecipients": [{"emailAddress": {"address": "rcpt@example.com"}}]},
                                    "saveToSentItems": True})
        url = stack.url + "/v1.0/me/sendMail"

        def one_send() -> None:
            req = parse_send_request(body, max_total=10**8)
            c.mail.send(owner, acc_id, req, idempotency_key=None, body_hash="x")

        def one_io() -> None:
            table.get_entity(owner_partition(owner), acc_id)
            r = session.post(url, data=graph_payload, headers={"Authorization": f"Bearer {token}",
                                                               "Content-Type": "application/json"}, timeout=30)
            assert r.status_code == 202, r.text

        for _ in range(30):  # warm-up: connection pools, MSAL app, caches, lastUsedAt's hourly write
            one_send()
            one_io()
        etag_before = table.get_entity(owner_partition(owner), acc_id).metadata["etag"]
        sends, ios = [], []
        for _ in range(n):
            t = time.perf_counter()
            one_send()
            sends.append(time.perf_counter() - t)
            t = time.perf_counter()
            one_io()
            ios.append(time.perf_counter() - t)
        etag_after = table.get_entity(owner_partition(owner), acc_id).metadata["etag"]
    finally:
        stack.stop()
    res = {"send_median_ms": median(sends) * 1e3, "send_p95_ms": pct(sends, 0.95) * 1e3,
           "io_median_ms": median(ios) * 1e3, "io_p95_ms": pct(ios, 0.95) * 1e3,
           "table_writes_during_sends": int(etag_before != etag_after)}
    res["ratio"] = res["send_median_ms"] / res["io_median_ms"]
    send_row = f"{res['send_median_ms']:.2f} ms | {res['send_p95_ms']:.2f} ms"
    io_row = f"{res['io_median_ms']:.2f} ms | {res['io_p95_ms']:.2f} ms"
    write_section("Send path", f"""
{machine()}; {n} sends, interleaved with {n} rounds of the irreducible I/O; Azurite + sandbox (no latency).

| what | median | p95 |
|---|---|---|
| `Connector.send_mail` (validation, table read, token unseal, Graph `sendMail`) | {send_row} |
| irreducible I/O: one `get_entity` + one raw `POST /me/sendMail` | {io_row} |

**Ratio: {res['ratio']:.2f}×** — bar 1.3×. Account row ETag unchanged across the measured sends:
{'yes (no table write)' if not res['table_writes_during_sends'] else 'NO — a write happened'}.
""")
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    run()
