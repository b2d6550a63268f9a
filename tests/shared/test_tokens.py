"""TokenManager against the real stack (Azurite, MSAL, the sandbox with strict rotation): the
rotation-race paths that the 200-operation race test cannot force on purpose.

Two in-process Connectors stand for two instances; the only knob turned is the lease length (a
constructor argument), so a lease can run out while its holder's token request is still in flight.
"""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import pytest

from devstack.transport import WrappingTransport
from shared.accounts import ACTIVE, utcnow
from tests.conftest import Host, authorize, wait_for

USER = "megan@contoso.onmicrosoft.com"


def _connector(host: Host, lease: dt.timedelta) -> Any:
    from shared.config import load_settings
    from shared.service import Connector
    from shared.tokens import TokenManager

    c = Connector(load_settings(host.env))
    c.__dict__["tokens"] = TokenManager(c.accounts, c.oauth, index=c.refresh_index, keepalive=dt.timedelta(days=7),
                                         lease=lease)
    return c


def _connect(c: Any, browser: Any, owner: str) -> str:
    start = c.connect.start(owner, return_url=None, login_hint=USER)
    out = c.connect.complete(authorize(browser, start["authUrl"]).fields)  # Entra's form_post fields
    assert out.status == "connected", out
    return str(out.account_id)


@pytest.fixture()
def strict_slow_token_endpoint(control: Any) -> Any:
    control.set_rotation(True)
    yield control
    control.set_token_latency(0)


def test_holder_whose_lease_ran_out_still_stores_the_live_refresh_token(
        host: Host, browser_session: Any, strict_slow_token_endpoint: Any) -> None:
    control = strict_slow_token_endpoint
    lease = dt.timedelta(seconds=1)
    a, b = _connector(host, lease), _connector(host, lease)
    owner = "owner-lease-race"
    acc_id = _connect(a, browser_session, owner)
    live_before = control.live_refresh_tokens(USER)
    used = a.accounts.open_tokens(a.accounts.get_account(owner, acc_id)).refresh_token
    control.set_token_latency(2500)  # each token request takes longer than the lease
    results: dict[str, Any] = {}

    def run(name: str, c: Any) -> None:
        try:
            results[name] = c.tokens.refresh(owner, acc_id, force=True)
        except Exception as e:  # recorded and asserted below
            results[name] = e

    ta = threading.Thread(target=run, args=("a", a))
    ta.start()
    # A holds the lease with its request in flight; once the lease has run out, B takes over and
    # redeems the same (soon revoked) refresh token.
    first = wait_for(lambda: (lambda r: r if r.lease_id else None)(a.accounts.get_account(owner, acc_id)),
                     what="A's lease")
    wait_for(lambda: utcnow() > first.lease_until, what="A's lease to run out")
    tb = threading.Thread(target=run, args=("b", b))
    tb.start()
    ta.join(30)
    tb.join(30)
    assert not isinstance(results["a"], Exception), results["a"]
    assert not isinstance(results["b"], Exception), results["b"]  # B lost the race and used A's tokens
    final = a.accounts.get_account(owner, acc_id)
    assert final.status == ACTIVE and final.lease_id is None
    stored = a.accounts.open_tokens(final).refresh_token
    assert stored != used
    # Exactly one live refresh token for this grant, and it is the stored one: a further refresh works.
    assert control.live_refresh_tokens(USER) == live_before
    control.set_token_latency(0)
    again = b.tokens.refresh(owner, acc_id, force=True)
    assert again.status == ACTIVE
    assert control.live_refresh_tokens(USER) == live_before


class _LoseResponses(WrappingTransport):
    """An azure-core transport around the real one that performs chosen writes to the accounts table and
    then drops their responses, as a reset connection would: the SDK retries the write, which now fails
    its ETag check."""

    def __init__(self) -> None:
        super().__init__()
        self.drop: list[bool] = []  # one flag per coming write to the accounts table
        self.dropped = 0

    def send(self, request: Any, **kwargs: Any) -> Any:
        from azure.core.exceptions import ServiceResponseError

        response = self._inner.send(request, **kwargs)
        if request.method in ("PUT", "MERGE", "PATCH") and "/accounts(" in request.url and self.drop:
            if self.drop.pop(0):
                self.dropped += 1
                raise ServiceResponseError("connection reset after the write (test)")
        return response


def test_a_final_write_whose_response_was_lost_still_counts(host: Host, browser_session: Any) -> None:
    from shared.config import load_settings
    from shared.due_index import bucket_of
    from shared.service import Connector
    from shared.storage import Storage

    settings = load_settings(host.env)
    transport = _LoseResponses()
    c = Connector(settings, storage=Storage(settings, transport=transport))
    owner = "owner-lost-response"
    acc_id = _connect(c, browser_session, owner)
    before = c.accounts.get_account(owner, acc_id)
    transport.drop = [False, True]  # the lease write goes through; the final write's answer is lost
    after = c.tokens.refresh(owner, acc_id, force=True)
    assert transport.dropped == 1
    assert after.status == ACTIVE and after.lease_id is None
    assert c.accounts.open_tokens(after).refresh_token != c.accounts.open_tokens(before).refresh_token
    stored = c.accounts.get_account(owner, acc_id)
    assert stored.sealed_tokens == after.sealed_tokens
    # The refresh completed as if nothing happened: the next due time is indexed (not left to the
    # daily reconciliation).
    from shared.storage import REFRESH_INDEX_TABLE
    from tests.e2e.test_refresh import index_buckets

    rows = index_buckets(c.storage.table(REFRESH_INDEX_TABLE), owner, acc_id)
    assert bucket_of(stored.refresh_due_at) in rows


def test_a_retry_that_takes_another_writers_tokens_reports_them_adopted(
        host: Host, browser_session: Any, strict_slow_token_endpoint: Any) -> None:
    """Chaos finding: Graph rejected a caller's token (401) while another instance was refreshing; the
    caller waited for that refresh and took its tokens, but was told it had redeemed them itself
    (the other writer stored them after the caller began), so when Microsoft had revoked those
    too, the caller got a 502 instead of its one real refresh (``adopted``, shared/graph.py)."""
    from shared.tokens import AccountTokenSource

    control = strict_slow_token_endpoint
    a, b = _connector(host, dt.timedelta(seconds=60)), _connector(host, dt.timedelta(seconds=60))
    owner = "owner-adopt"
    acc_id = _connect(a, browser_session, owner)
    account = a.accounts.get_account(owner, acc_id)
    rejected = a.accounts.open_tokens(account).access_token
    control.set_token_latency(1500)  # B holds the lease while its token request is in flight
    done: dict[str, Any] = {}
    tb = threading.Thread(target=lambda: done.setdefault("b", b.tokens.refresh(owner, acc_id, force=True)))
    tb.start()
    wait_for(lambda: a.accounts.get_account(owner, acc_id).lease_id, what="B's lease")
    source = AccountTokenSource(a.tokens, account)
    token = source.refresh(rejected)  # waits for B's refresh, then takes what B stored
    tb.join(30)
    stored = a.accounts.open_tokens(a.accounts.get_account(owner, acc_id)).access_token
    assert token == stored != rejected
    assert source.adopted is True
    # A refresh this call makes itself is not adopted.
    control.set_token_latency(0)
    assert source.refresh(token) != token and source.adopted is False
