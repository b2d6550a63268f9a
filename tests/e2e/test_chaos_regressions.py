"""Regression tests for defects the chaos run (``python -m bench chaos``) uncovered, one each."""

from __future__ import annotations

from typing import Any

from tests.conftest import Host, connect, wait_for


def test_token_endpoint_5xx_answers_503_with_retry_after(host: Host, control: Any, browser_session: Any) -> None:
    """Chaos finding 1: a 5xx from the token endpoint during refresh-now was a 503 without
    ``Retry-After``."""
    acc = connect(host, browser_session, sub="owner-chaos-1", login_hint="megan@contoso.onmicrosoft.com")
    account_id = acc["result"]["accountId"]
    control.inject("*/oauth2/v2.0/token", status=500, count=1)
    try:
        r = host.api("POST", f"/api/accounts/{account_id}/refresh", sub="owner-chaos-1")
    finally:
        control.clear_injections()
    assert r.status_code == 503, r.text
    assert r.json()["code"] == "upstream_unavailable"
    assert r.headers.get("Retry-After", "").isdigit() and int(r.headers["Retry-After"]) >= 1, r.headers
    # The account is untouched (MSAL answers the identical request from its cache for a while, so the
    # record is read rather than refreshed again here).
    assert host.api("GET", f"/api/accounts/{account_id}", sub="owner-chaos-1").json()["status"] == "active"


def test_account_disconnected_mid_refresh_does_not_poison_the_refresh_job(host: Host, control: Any,
                                                                           browser_session: Any) -> None:
    """Chaos finding 2: a refresh job whose account was disconnected while its token request was in
    flight raised NotFoundError out of the queue worker: retried maxDequeueCount times, then parked in
    ``refresh-jobs-poison`` (an operator alert for a normal event). It must end quietly instead."""
    import json
    import threading

    from tests.e2e.test_refresh import _entity, make_due

    owner = "owner-chaos-2"
    account_id = connect(host, browser_session, sub=owner, login_hint="adele@contoso.onmicrosoft.com")["result"][
        "accountId"]
    make_due(host, owner, account_id)
    control.inject("*/oauth2/v2.0/token", latency_ms=20_000, count=1)  # held until release()
    job = json.dumps({"owner": owner, "accountId": account_id, "attempt": 0})
    answer: dict[str, Any] = {}

    def worker() -> None:
        answer["r"] = host.http.post(host.url + "/admin/functions/refresh_worker", json={"input": job}, timeout=60)

    t = threading.Thread(target=worker)
    t.start()
    try:
        wait_for(lambda: _entity(host, owner, account_id).get("leaseId"), timeout=30,
                 what="the worker to lease the account (its token request is now held)")
        assert host.api("DELETE", f"/api/accounts/{account_id}", sub=owner).status_code == 204
    finally:
        control.release()
        control.clear_injections()
        t.join(60)
    assert answer["r"].status_code == 202, answer["r"].text  # the worker function returned normally



def test_second_401_after_adopting_another_writers_tokens_earns_one_real_refresh() -> None:
    """Chaos finding 3: a call whose token Graph rejected (401) took the tokens another refresher had
    just stored instead of refreshing; when Microsoft had revoked those too (CAE revokes all of a
    user's access tokens at once), the retry got 401 again and the caller a 502 (now 503) graph_token_rejected
    although one real refresh would have worked. Now that case gets one refresh more, and only it."""
    from tests.shared.test_graph import FakeToken, FakeTransport, get, graph_error, make_client, reply

    class AdoptingToken(FakeToken):
        adopted = True  # what AccountTokenSource reports when refresh() took another writer's tokens

    stale = graph_error(401, "InvalidAuthenticationToken")
    fake = FakeTransport(stale, stale, reply(200, {"id": "me"}))
    client, _ = make_client(fake)
    token = AdoptingToken()
    assert get(client, "me", token=token).json() == {"id": "me"}
    assert token.refreshed_from == ["access-1", "access-2"]
    # Without adoption it stays one refresh and one retry (tests/shared/test_graph.py).
    fake = FakeTransport(stale, stale)
    client, _ = make_client(fake)
    plain = FakeToken()
    try:
        get(client, "me", token=plain)
    except Exception as e:
        assert getattr(e, "code", "") == "graph_token_rejected"
    assert plain.refreshed_from == ["access-1"] and len(fake.requests) == 2
