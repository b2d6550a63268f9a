"""Proactive refresh end to end: timer → index → queue → worker, against Azurite and the sandbox."""

from __future__ import annotations

import datetime as dt
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from devstack.process import start_host
from tests.conftest import HTTP_ONLY, Host, connect, free_port, wait_for

CONTOSO = ("adele@contoso.onmicrosoft.com", "megan@contoso.onmicrosoft.com")


def _tables(host: Host) -> tuple[Any, Any]:
    from azure.data.tables import TableClient

    cs = host.env["AzureWebJobsStorage"]
    return (TableClient.from_connection_string(cs, "accounts"), TableClient.from_connection_string(cs, "refreshindex"))


def _entity(host: Host, owner: str, account_id: str) -> Any:
    from shared.accounts import owner_partition

    return _tables(host)[0].get_entity(owner_partition(owner), account_id)


def make_due(host: Host, owner: str, account_id: str) -> None:
    """Stand-in for the passage of time: the account's due time is now in the past."""
    from azure.data.tables import UpdateMode

    from shared.accounts import owner_partition
    from shared.due_index import bucket_of, partition_key, row_key

    accounts, index = _tables(host)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=6)
    pk = owner_partition(owner)
    old = accounts.get_entity(pk, account_id).get("refreshDueAt")
    if old:  # the row moves with the due time, as it does when time really passes
        rk = row_key(owner, account_id)
        index.delete_entity(partition_key(bucket_of(dt.datetime.fromisoformat(old.replace("Z", "+00:00"))), rk), rk)
    accounts.update_entity({"PartitionKey": pk, "RowKey": account_id, "refreshDueAt": past.isoformat()},
                           mode=UpdateMode.MERGE)
    index.upsert_entity({"PartitionKey": partition_key(bucket_of(past), row_key(owner, account_id)),
                         "RowKey": row_key(owner, account_id), "owner": owner,
                         "accountId": account_id})


def run_timer(host: Host) -> dict[str, Any]:
    r = host.http.post(host.url + "/admin/functions/refresh_timer", json={"input": ""}, timeout=60)
    assert r.status_code == 202
    lines = [json.loads(line) for line in host.log_text().splitlines() if '"refresh.enqueued"' in line]
    return lines[-1]


@pytest.fixture(scope="module")
def fleet(host: Host, browser_session: Any) -> list[tuple[str, str]]:
    out = []
    for i in range(6):
        owner = f"owner-fleet-{i}"
        acc = connect(host, browser_session, sub=owner, login_hint=CONTOSO[i % 2])["result"]["accountId"]
        out.append((owner, acc))
    return out


def test_new_account_is_indexed_for_keepalive_with_jitter(host: Host, fleet: list[tuple[str, str]]) -> None:
    now = dt.datetime.now(dt.UTC)
    dues = []
    for owner, acc in fleet:
        due = dt.datetime.fromisoformat(_entity(host, owner, acc)["refreshDueAt"].replace("Z", "+00:00"))
        assert now + dt.timedelta(days=6, hours=11) < due <= now + dt.timedelta(days=7, minutes=1)
        dues.append(due)
    assert len(set(dues)) == len(dues)  # jitter spreads them


def test_due_accounts_are_refreshed_and_others_not_read(host: Host, fleet: list[tuple[str, str]],
                                                        control: Any) -> None:
    due, idle = fleet[:3], fleet[3:]
    before = {acc: _entity(host, o, acc)["lastRefreshedAt"] for o, acc in fleet}
    for owner, acc in due:
        make_due(host, owner, acc)
    summary = run_timer(host)
    assert summary["indexRowsRead"] == len(due)

    def all_refreshed() -> bool:
        return all(_entity(host, o, a)["lastRefreshedAt"] != before[a] for o, a in due)

    wait_for(all_refreshed, what="due accounts to be refreshed by the queue worker")
    for owner, acc in idle:
        assert _entity(host, owner, acc)["lastRefreshedAt"] == before[acc]
    for owner, acc in due:
        e = _entity(host, owner, acc)
        assert e["status"] == "active"
        assert dt.datetime.fromisoformat(e["refreshDueAt"].replace("Z", "+00:00")) > dt.datetime.now(dt.UTC)
    assert run_timer(host)["indexRowsRead"] == 0  # the rows were consumed


def test_revoked_grant_found_early_with_signed_webhook(host: Host, browser_session: Any, control: Any,
                                                       webhooks: Any) -> None:
    user = "pat@outlook.com"
    owner = "owner-refresh-revoked"
    acc = connect(host, browser_session, sub=owner, login_hint=user)["result"]["accountId"]
    control.revoke_grants(user)
    make_due(host, owner, acc)
    run_timer(host)
    wait_for(lambda: _entity(host, owner, acc)["status"] == "reauth_required", what="reauth_required")
    e = _entity(host, owner, acc)
    assert json.loads(e["lastError"])["code"] in ("grant_revoked", "invalid_grant")
    assert e["tokens"] == ""  # the dead grant's tokens are destroyed
    [hook] = wait_for(lambda: webhooks.of_type("account.reauth_required", acc), what="webhook")
    from shared.webhooks import verify

    assert verify(host.env["WEBHOOK_SECRET"], hook["body"], hook["headers"]["X-Connector-Signature"])
    assert not verify("wrong-secret", hook["body"], hook["headers"]["X-Connector-Signature"])
    assert hook["doc"]["data"]["account"]["status"] == "reauth_required"
    # A webhook receiver that fails does not block anything, and gets it again later.
    webhooks.fail_next = 1
    r = host.api("DELETE", f"/api/accounts/{acc}", sub=owner)
    assert r.status_code == 204
    wait_for(lambda: webhooks.of_type("account.disconnected", acc), timeout=30, what="retried webhook")


def test_token_endpoint_503_is_retried_and_leaves_account_active(host: Host, fleet: list[tuple[str, str]],
                                                                 control: Any) -> None:
    owner, acc = fleet[4]
    before = _entity(host, owner, acc)["lastRefreshedAt"]
    control.inject("/common/oauth2/v2.0/token", status=503, retry_after=1, count=1)
    make_due(host, owner, acc)
    run_timer(host)
    wait_for(lambda: _entity(host, owner, acc)["lastRefreshedAt"] != before, what="retry after a 503")
    assert _entity(host, owner, acc)["status"] == "active"
    assert "retry 1" in host.log_text()


def test_wrong_client_secret_fails_health_and_touches_no_account(host: Host, fleet: list[tuple[str, str]],
                                                                 control: Any) -> None:
    owner, acc = fleet[5]
    client_id = host.env["MS_CLIENT_ID"]
    secret = host.env["MS_CLIENT_SECRET"]
    before = dict(_entity(host, owner, acc))
    control.set_client_secret_valid(client_id, secret, False)
    try:
        r = host.api("POST", f"/api/accounts/{acc}/refresh", sub=owner)
        assert r.status_code >= 500, r.text
        assert r.json()["code"] != "reauth_required"
        health = host.http.get(host.url + "/api/health", timeout=30)
        assert health.status_code == 503
        assert health.json()["checks"]["appRegistration"]["ok"] is False
        after = _entity(host, owner, acc)
        assert after["status"] == "active" and after["tokens"] == before["tokens"]
        assert "rejected the app's client credentials" in host.log_text()
    finally:
        control.set_client_secret_valid(client_id, secret, True)
    assert host.api("POST", f"/api/accounts/{acc}/refresh", sub=owner).status_code == 200
    assert host.http.get(host.url + "/api/health", timeout=30).status_code == 200


@pytest.fixture(scope="module")
def second_host(host: Host) -> Any:
    """A second instance on the same storage: refresh races cross process boundaries (over HTTP). Its queue
    triggers are off: stopped at the end of this module, it would leave any message it had just received
    invisible for the rest of its lease, and later tests wait for the queues to drain."""
    port = free_port()
    env = {**host.env, **HTTP_ONLY}
    log_path = host.log_path.with_name("host2.log")
    proc = start_host(env, port, log_path)
    try:
        proc.wait_healthy(60)
        yield Host(f"http://127.0.0.1:{port}", env, log_path, proc.proc)
    finally:
        proc.stop()


def test_200_concurrent_refresh_and_send_keep_one_live_refresh_token(host: Host, second_host: Host,
                                                                     browser_session: Any, control: Any) -> None:
    user = "megan@contoso.onmicrosoft.com"
    owner = "owner-race"
    acc = connect(host, browser_session, sub=owner, login_hint=user)["result"]["accountId"]
    control.set_rotation(True)
    # Other tests hold grants for this user too; this account's grant is exactly one live token.
    live_before = control.live_refresh_tokens(user)
    control.expire_access_tokens(user)  # every operation starts with a token Graph will refuse
    statuses: list[int] = []
    lock = threading.Lock()

    def op(i: int) -> None:
        h = host if i % 2 else second_host
        if i % 3 == 0:
            r = h.api("POST", f"/api/accounts/{acc}/send", sub=owner, json={"to": ["r@example.com"]})
        else:
            r = h.api("POST", f"/api/accounts/{acc}/refresh", sub=owner)
        with lock:
            statuses.append(r.status_code)

    with ThreadPoolExecutor(max_workers=40) as pool:
        list(pool.map(op, range(200)))
    assert len(statuses) == 200
    assert set(statuses) <= {200, 202}, sorted(set(statuses))
    state = host.api("GET", f"/api/accounts/{acc}", sub=owner).json()
    assert state["status"] == "active" and state["lastError"] is None
    assert control.live_refresh_tokens(user) == live_before  # none lost, none leaked
    assert host.api("POST", f"/api/accounts/{acc}/send", sub=owner, json={"to": ["r@example.com"]}).status_code == 202
    # The stored refresh token is the live one: a further rotation works.
    assert host.api("POST", f"/api/accounts/{acc}/refresh", sub=owner).status_code == 200
    assert control.live_refresh_tokens(user) == live_before
    # The second instance, started after the queues existed, runs its queue triggers too.
    assert "Exception in thread" not in second_host.log_text()
    assert "serving" in second_host.log_text() and "queue functions" in second_host.log_text()


def test_cleanup_purges_expired_states(host: Host) -> None:
    from azure.data.tables import TableClient

    t = TableClient.from_connection_string(host.env["AzureWebJobsStorage"], "oauthstates")
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).isoformat()
    t.upsert_entity({"PartitionKey": "o-" + "f" * 40, "RowKey": "expired-row", "owner": "x", "expiresAt": past,
                     "createdAt": past, "flow": "v1.x.y.z"})
    r = host.http.post(host.url + "/admin/functions/cleanup_timer", json={}, timeout=60)
    assert r.status_code == 202
    assert not [e for e in t.list_entities() if e["RowKey"] == "expired-row"]


def test_poison_refresh_message_ends_in_poison_queue(host: Host) -> None:
    """A job that keeps failing unexpectedly is retried maxDequeueCount times, then parked."""
    import base64
    import uuid

    from azure.storage.queue import QueueClient

    from shared.accounts import owner_partition

    accounts, _ = _tables(host)
    owner, acc = "owner-poison", "acc_" + uuid.uuid4().hex[:24]
    accounts.create_entity({"PartitionKey": owner_partition(owner), "RowKey": acc, "owner": owner, "status": "active",
                            "tokens": "v1.k1.AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                            "connectedAt": dt.datetime.now(dt.UTC).isoformat()})
    cs = host.env["AzureWebJobsStorage"]
    body = json.dumps({"owner": owner, "accountId": acc, "attempt": 0}).encode()
    QueueClient.from_connection_string(cs, "refresh-jobs").send_message(base64.b64encode(body).decode())
    poison = QueueClient.from_connection_string(cs, "refresh-jobs-poison")

    def parked() -> bool:
        try:
            return any(acc in base64.b64decode(m.content).decode() for m in poison.peek_messages(max_messages=32))
        except Exception:
            return False

    wait_for(parked, timeout=60, what="the job to reach refresh-jobs-poison")
    assert _entity(host, owner, acc)["status"] == "active"  # untouched


def _index_rows(host: Host, owner: str, account_id: str) -> list[str]:
    """The buckets the account is indexed under (a scan of the index table: tests only)."""
    from shared.config import load_settings
    from shared.storage import REFRESH_INDEX_TABLE, Storage

    table = Storage(load_settings(host.env)).table(REFRESH_INDEX_TABLE)
    return index_buckets(table, owner, account_id)


def index_buckets(table: Any, owner: str, account_id: str) -> list[str]:
    from shared.due_index import bucket_of_partition, row_key

    rows = table.query("RowKey eq @rk", parameters={"rk": row_key(owner, account_id)}, select=["PartitionKey"])
    return sorted(bucket_of_partition(str(r["PartitionKey"])) for r in rows)


def _due_bucket(host: Host, owner: str, account_id: str) -> str:
    from shared.due_index import bucket_of

    return bucket_of(dt.datetime.fromisoformat(_entity(host, owner, account_id)["refreshDueAt"].replace("Z", "+00:00")))


def test_refresh_outside_the_timer_leaves_exactly_one_index_row(host: Host, browser_session: Any) -> None:
    owner = "owner-index-hygiene"
    acc = connect(host, browser_session, sub=owner, login_hint=CONTOSO[0])["result"]["accountId"]
    assert _index_rows(host, owner, acc) == [_due_bucket(host, owner, acc)]
    make_due(host, owner, acc)  # a row in a past bucket, as if the account had come due
    assert host.api("POST", f"/api/accounts/{acc}/refresh", sub=owner).status_code == 200
    # The refresh moved the row: no stale row for the timer to read again.
    assert _index_rows(host, owner, acc) == [_due_bucket(host, owner, acc)]
    # Re-connecting the same mailbox moves it too.
    connect(host, browser_session, sub=owner, login_hint=CONTOSO[0])
    assert _index_rows(host, owner, acc) == [_due_bucket(host, owner, acc)]


def test_a_lost_refresh_message_brings_the_account_back_later(host: Host, browser_session: Any) -> None:
    """The timer re-arms each row instead of deleting it; a worker that finishes removes the re-arm row.
    A message that never reaches a worker (a crash, the poison queue) is therefore not the end of it."""
    from azure.storage.queue import QueueClient

    from shared.config import load_settings
    from shared.due_index import REARM, bucket_of
    from shared.service import Connector
    from shared.storage import Storage

    class LostMessages(Storage):
        """Storage whose refresh queue nobody reads: the timer's message is lost."""

        def queue(self, name: str) -> Any:
            return super().queue(name + "-lost" if name == "refresh-jobs" else name)

    owner = "owner-lost-message"
    acc = connect(host, browser_session, sub=owner, login_hint=CONTOSO[1])["result"]["accountId"]
    before = _entity(host, owner, acc)["lastRefreshedAt"]
    make_due(host, owner, acc)
    settings = load_settings(host.env)
    lossy = Connector(settings, storage=LostMessages(settings))
    now = dt.datetime.now(dt.UTC)
    lossy.refresher.enqueue_due(now)
    QueueClient.from_connection_string(settings.storage_connection_string or "",
                                       "refresh-jobs-lost").delete_queue()  # the message is gone for good
    rearm = bucket_of(now + REARM)
    assert _index_rows(host, owner, acc) == [rearm]  # moved ahead, not deleted
    # Half an hour later the timer finds the account again and the host's worker refreshes it.
    Connector(settings).refresher.enqueue_due(now + REARM + dt.timedelta(minutes=1))
    wait_for(lambda: _entity(host, owner, acc)["lastRefreshedAt"] != before, what="the re-armed account's refresh")
    wait_for(lambda: _index_rows(host, owner, acc) == [_due_bucket(host, owner, acc)],
             what="only the new due row to remain")
    assert _entity(host, owner, acc)["status"] == "active"


def test_an_account_used_right_after_connect_is_renewed_by_the_timer_before_its_token_expires(
        host: Host, browser_session: Any, control: Any) -> None:
    """Proactive refresh: an account in active use gets its access token renewed before it expires, with no
    request from the caller. Entra's shortest configurable access-token lifetime (10 minutes) puts the
    renewal due time (5-15 minutes before expiry) at once, so the timer is due without faking time."""
    owner = "owner-active-use"
    control.set_access_token_lifetime(600)
    try:
        acc = connect(host, browser_session, sub=owner, login_hint=CONTOSO[0])["result"]["accountId"]
    finally:
        control.set_access_token_lifetime(None)
    connected = _entity(host, owner, acc)
    # Freshly connected and never used: indexed for the keep-alive only, days away.
    assert _index_rows(host, owner, acc) == [_due_bucket(host, owner, acc)]
    assert _parse(connected["refreshDueAt"]) > dt.datetime.now(dt.UTC) + dt.timedelta(days=6)
    # One use: a read of the inbox.
    assert host.api("GET", f"/api/accounts/{acc}/messages", sub=owner, params={"top": "1"}).status_code == 200
    used = _entity(host, owner, acc)
    expires = _parse(used["accessTokenExpiresAt"])
    assert used["lastUsedAt"] and _parse(used["refreshDueAt"]) < expires - dt.timedelta(minutes=5)
    assert _index_rows(host, owner, acc) == [_due_bucket(host, owner, acc)]  # the row moved with it
    # The timer finds it due and the worker renews the access token; the caller does nothing.
    assert run_timer(host)["enqueued"] >= 1
    wait_for(lambda: _entity(host, owner, acc)["lastRefreshedAt"] != used["lastRefreshedAt"],
             what="the proactive renewal of the used account")
    renewed = _entity(host, owner, acc)
    assert renewed["status"] == "active"
    assert _parse(renewed["accessTokenExpiresAt"]) > expires
    # Still in active use: the next renewal is again due ahead of the new token's expiry.
    assert _parse(renewed["refreshDueAt"]) < _parse(renewed["accessTokenExpiresAt"])


def _parse(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
