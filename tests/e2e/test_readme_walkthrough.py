"""The README's curl walkthrough, run as written (bash, `set -e`) against the test stack: API, TOKEN, SANDBOX and
SANDBOX_CA point it at the session's host and sandbox instead of `make dev`'s defaults. Every step must
succeed and answer what the README says it does."""

from __future__ import annotations

import json
import os
import re
import subprocess
from typing import Any

from tests.conftest import ROOT, Host, wait_for


def walkthrough() -> str:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- walkthrough:", 1)[1].split("```sh\n", 1)[1].split("\n```", 1)[0]
    assert "devstack connect" in block and "/demo/webhooks" in block
    return block


def test_the_readme_walkthrough_works_as_written(host: Host, sandbox: Any, control: Any) -> None:
    env = {**os.environ, "API": host.url, "TOKEN": host.token("dev-user"), "SANDBOX": sandbox.url,
           "SANDBOX_CA": sandbox.ca_path, "PYTHONUNBUFFERED": "1"}
    script = "set -euo pipefail\nexport API TOKEN SANDBOX SANDBOX_CA\n" + walkthrough()
    try:
        proc = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out = proc.stdout
        assert (ROOT / "quote.txt").read_text() == "Please quote 10 units."
    finally:
        (ROOT / "quote.txt").unlink(missing_ok=True)
    account = re.search(r'"id": ?"(acc_[0-9a-f]+)"', out)
    assert account, out[:2000]
    assert '"status": "sent"' in out or '"status":"sent"' in out  # both sends
    assert "Quote request" in out and "Please quote 10 units." in out
    r = host.api("GET", f"/api/accounts/{account.group(1)}/messages", sub="dev-user",
                 params={"folder": "archive", "q": "quote"})
    moved = r.json()["messages"]
    assert moved and moved[0]["isRead"] is True  # flagged, read and filed by the walkthrough
    sent = wait_for(lambda: [m for m in host.api("GET", f"/api/accounts/{account.group(1)}/messages", sub="dev-user",
                                                 params={"folder": "sentitems"}).json()["messages"]
                             if m["subject"] in ("Hello", "The report", "RE: Quote request")], what="sent mail")
    assert {m["subject"] for m in sent} >= {"Hello", "The report"}
    json.loads(host.http.get(host.url + "/demo/webhooks", timeout=30).text)  # the receiver answers JSON


def test_the_dev_hosts_webhook_receiver_checks_signatures(host: Host) -> None:
    """What `make dev` points WEBHOOK_URL at: signed events are kept and listed, anything else is refused."""
    import time

    from shared.webhooks import SIGNATURE_HEADER, sign

    body = json.dumps({"id": "evt_walkthrough", "type": "message.received", "createdAt": "2026-12-07T10:00:00Z",
                       "data": {"accountId": "acc_x", "message": {"id": "m"}}}).encode()
    url = host.url + "/demo/webhooks"
    good = sign(host.env["WEBHOOK_SECRET"], body, int(time.time()))
    assert host.http.post(url, data=body, headers={SIGNATURE_HEADER: good}, timeout=30).status_code == 204
    forged = sign("not-the-secret", body, int(time.time()))
    assert host.http.post(url, data=body, headers={SIGNATURE_HEADER: forged}, timeout=30).status_code == 401
    assert host.http.post(url, data=body, timeout=30).status_code == 401
    events = host.http.get(url, timeout=30).json()["events"]
    assert [e["event"]["id"] for e in events].count("evt_walkthrough") == 1 and events[0]["verified"] is True
    assert host.http.get(url, headers={"Host": "evil.example.com"}, timeout=30).status_code == 403
