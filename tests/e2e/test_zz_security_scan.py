"""Runs after the other end-to-end tests: nothing secret leaked into logs, storage or queues.

The sandbox reports every authorization code, access, refresh and id token it ever issued; none
may appear in anything the host logged or stored during the whole run.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from tests.conftest import ARTIFACTS, Host

JWT = re.compile(r"eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}")


def _secrets(host: Host, control: Any) -> list[str]:
    issued = control.issued_secrets()
    assert len(issued) > 50, "the run should have issued many codes and tokens"
    out = [s for s in issued if len(s) >= 16]
    out += [host.env["MS_CLIENT_SECRET"], host.env["AUTH_HS256_SECRET"], host.env["WEBHOOK_SECRET"]]
    for key in json.loads(host.env["TOKEN_ENCRYPTION_KEYS"])["keys"].values():
        out += [key, base64.b64decode(key).hex()]
    return out


def _everything_stored(host: Host) -> str:
    from azure.data.tables import TableServiceClient
    from azure.storage.queue import QueueServiceClient

    cs = host.env["AzureWebJobsStorage"]
    parts = []
    for t in TableServiceClient.from_connection_string(cs).list_tables():
        for e in TableServiceClient.from_connection_string(cs).get_table_client(t.name).list_entities():
            parts.append(json.dumps({k: str(v) for k, v in e.items()}))
    qs = QueueServiceClient.from_connection_string(cs)
    for q in qs.list_queues():
        for m in qs.get_queue_client(q.name).peek_messages(max_messages=32):
            content = m.content if isinstance(m.content, str) else m.content.decode()
            parts.append(content)
            try:
                parts.append(base64.b64decode(content).decode(errors="replace"))
            except ValueError:
                pass
    return "\n".join(parts)


def test_no_secret_in_any_log_line(host: Host, control: Any) -> None:
    logs = "\n".join(p.read_text(errors="replace") for p in ARTIFACTS.glob("host*.log"))
    assert len(logs) > 1000
    leaked = [s[:8] + "…" for s in _secrets(host, control) if s in logs]
    assert leaked == [], f"secrets found in host logs: {leaked}"
    assert not JWT.search(logs), "a JWT appears in the host logs"
    for word in ("code=", "refresh_token", "access_token=", "client_secret="):
        assert word not in logs, f"{word!r} appears in the host logs"


def test_no_plaintext_token_in_storage(host: Host, control: Any) -> None:
    stored = _everything_stored(host)
    assert "tokens" in stored and "v1." in stored  # sealed blobs are there
    leaked = [s[:8] + "…" for s in _secrets(host, control) if s in stored]
    assert leaked == [], f"secrets found in storage: {leaked}"
    assert not JWT.search(stored), "a JWT is stored in plaintext"
