"""shared.graph in process: a real ``requests.Session`` over a scripted transport adapter.

No network and no real waiting: the adapter answers with real ``requests.Response`` objects and
records every request; ``sleep``/``clock`` are injected so a Retry-After wait is only recorded.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest
import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import MaxRetryError, NewConnectionError

from shared.errors import MicrosoftError, ThrottledError, UpstreamUnavailableError
from shared.graph import GraphClient
from shared.ms_errors import GRAPH, from_graph_response

BASE = "https://graph.test/v1.0"
UPLOAD_URL = "https://upload.test/api/AttachmentSessions('s1')?authtoken=UPLOAD-SECRET"

Handler = Callable[[requests.PreparedRequest], "requests.Response | Exception"]


def reply(status: int, body: Any = None, headers: dict[str, str] | None = None) -> Handler:
    """A scripted answer: a real Response built for the request it answers."""

    def build(req: requests.PreparedRequest) -> requests.Response:
        r = requests.Response()
        r.status_code = status
        r.headers = CaseInsensitiveDict(headers or {})
        data = b"" if body is None else json.dumps(body).encode()
        if body is not None:
            r.headers.setdefault("Content-Type", "application/json")
        r.raw = io.BytesIO(data)
        r.url = req.url or ""
        r.request = req
        r.encoding = "utf-8"
        return r

    return build


def graph_error(status: int, code: str, headers: dict[str, str] | None = None) -> Handler:
    return reply(status, {"error": {"code": code, "message": f"{code} from Graph.",
                                    "innerError": {"request-id": "req-1"}}}, headers)


def fail(exc: Exception) -> Handler:
    return lambda req: exc


class FakeTransport(BaseAdapter):
    """Answers from a script (a queue of handlers) or one ``handler`` for every request; records requests."""

    def __init__(self, *script: Handler, handler: Handler | None = None) -> None:
        super().__init__()
        self.script: deque[Handler] = deque(script)
        self.handler = handler
        self.requests: list[requests.PreparedRequest] = []
        self._lock = threading.Lock()

    def send(self, request: requests.PreparedRequest, stream: bool = False, timeout: Any = None,
             verify: Any = True, cert: Any = None, proxies: Any = None) -> requests.Response:
        with self._lock:
            self.requests.append(request)
            step = self.handler or (self.script.popleft() if self.script else None)
        if step is None:
            raise AssertionError(f"unscripted request {request.method} {request.url}")
        out = step(request)
        if isinstance(out, Exception):
            raise out
        return out

    def close(self) -> None:
        pass


class FakeTime:
    """A clock that only moves when the client sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


class FakeToken:
    root = "me"

    def __init__(self) -> None:
        self.current = "access-1"
        self.refreshed_from: list[str] = []

    def get(self) -> str:
        return self.current

    def refresh(self, stale: str) -> str:
        self.refreshed_from.append(stale)
        self.current = f"access-{len(self.refreshed_from) + 1}"
        return self.current


def make_client(transport: FakeTransport, **kw: Any) -> tuple[GraphClient, FakeTime]:
    session = requests.Session()
    session.trust_env = False
    session.mount("https://graph.test/", transport)
    session.mount("https://upload.test/", transport)
    t = FakeTime()
    return GraphClient(BASE, session, sleep=t.sleep, clock=t.clock, **kw), t


def get(client: GraphClient, path: str = "me/messages", **kw: Any) -> requests.Response:
    return client.request("GET", path, mailbox=kw.pop("mailbox", "mb-1"), token=kw.pop("token", FakeToken()), **kw)


def send_mail(client: GraphClient, token: FakeToken | None = None) -> requests.Response:
    return client.request("POST", "me/sendMail", mailbox="mb-1", token=token or FakeToken(), safe=False,
                          json={"message": {"subject": "x"}})


# -- Retry-After and budgets -----------------------------------------------------------------

def test_429_waits_retry_after_then_succeeds() -> None:
    fake = FakeTransport(graph_error(429, "TooManyRequests", {"Retry-After": "7"}), reply(200, {"value": [1]}))
    client, t = make_client(fake)
    assert get(client).json() == {"value": [1]}
    assert t.sleeps == [7.0]
    assert len(fake.requests) == 2
    assert fake.requests[0].url == fake.requests[1].url == f"{BASE}/me/messages"


def test_budget_exceeded_raises_throttled_with_retry_after() -> None:
    fake = FakeTransport(*[graph_error(429, "ApplicationThrottled", {"Retry-After": "10"})] * 5)
    client, t = make_client(fake, retry_budget_s=30.0)
    with pytest.raises(ThrottledError) as e:
        get(client)
    assert t.sleeps == [10.0, 10.0, 10.0]  # a 4th wait would end past the 30 s budget
    assert len(fake.requests) == 4
    assert e.value.status == 503 and e.value.headers["Retry-After"] == "10"
    assert e.value.microsoft is not None and e.value.microsoft.error == "ApplicationThrottled"


def test_a_single_wait_beyond_the_cap_is_not_slept() -> None:
    fake = FakeTransport(graph_error(429, "TooManyRequests", {"Retry-After": "120"}))
    client, t = make_client(fake, max_single_wait_s=15.0)
    with pytest.raises(ThrottledError) as e:
        get(client)
    assert t.sleeps == [] and e.value.headers["Retry-After"] == "120"


def test_503_on_a_read_is_retried_after_retry_after() -> None:
    fake = FakeTransport(graph_error(503, "ServiceNotAvailable", {"Retry-After": "2"}), reply(200, {"id": "m"}))
    client, t = make_client(fake)
    assert get(client, "me/messages/m").json() == {"id": "m"}
    assert t.sleeps == [2.0] and len(fake.requests) == 2


def test_503_on_send_mail_is_not_retried_and_outcome_unknown() -> None:
    fake = FakeTransport(graph_error(503, "ServiceNotAvailable", {"Retry-After": "9"}), reply(202))
    client, t = make_client(fake)
    with pytest.raises(ThrottledError) as e:
        send_mail(client)
    assert len(fake.requests) == 1 and t.sleeps == []
    assert e.value.extra["outcomeUnknown"] is True and e.value.headers["Retry-After"] == "9"


def test_429_on_send_mail_is_a_refusal_and_is_retried() -> None:
    fake = FakeTransport(graph_error(429, "TooManyRequests", {"Retry-After": "1"}), reply(202))
    client, t = make_client(fake)
    assert send_mail(client).status_code == 202
    assert t.sleeps == [1.0] and [r.method for r in fake.requests] == ["POST", "POST"]


# -- 401: one refresh, one retry -------------------------------------------------------------

def test_401_refreshes_once_and_retries_once() -> None:
    fake = FakeTransport(graph_error(401, "InvalidAuthenticationToken"), reply(200, {"id": "me"}))
    client, _ = make_client(fake)
    token = FakeToken()
    assert get(client, "me", token=token).json() == {"id": "me"}
    assert token.refreshed_from == ["access-1"]
    assert [r.headers["Authorization"] for r in fake.requests] == ["Bearer access-1", "Bearer access-2"]


def test_second_401_is_not_our_401_and_names_no_token() -> None:
    fake = FakeTransport(graph_error(401, "InvalidAuthenticationToken"), graph_error(401, "InvalidAuthenticationToken"))
    client, _ = make_client(fake)
    token = FakeToken()
    with pytest.raises(UpstreamUnavailableError) as e:
        get(client, "me", token=token)
    assert token.refreshed_from == ["access-1"] and len(fake.requests) == 2
    assert e.value.status == 503 and e.value.code == "graph_token_rejected"
    assert e.value.headers.get("Retry-After", "").isdigit()  # a refusal: the caller may retry, even a send
    assert "access-" not in str(e.value) and "access-" not in (e.value.hint or "")


def test_401_with_another_code_is_not_refreshed_nor_our_401() -> None:
    fake = FakeTransport(graph_error(401, "InvalidAudienceForResource"))
    client, _ = make_client(fake)
    token = FakeToken()
    with pytest.raises(MicrosoftError) as e:
        get(client, "me", token=token)
    assert token.refreshed_from == [] and e.value.status == 502


# -- Graph errors never masquerade as ours -----------------------------------------

def test_mailbox_not_enabled_is_409_mailbox_not_available() -> None:
    fake = FakeTransport(graph_error(404, "MailboxNotEnabledForRESTAPI"))
    client, _ = make_client(fake)
    with pytest.raises(MicrosoftError) as e:
        get(client)
    assert (e.value.status, e.value.code) == (409, "mailbox_not_available")
    assert e.value.hint and "licence" in e.value.hint and "mail-api-overview" in e.value.hint
    assert e.value.microsoft is not None and e.value.microsoft.error == "MailboxNotEnabledForRESTAPI"
    assert e.value.microsoft.request_id == "req-1"


@pytest.mark.parametrize(("status", "body", "expected"), [
    (404, {"error": {"code": "ErrorItemNotFound", "message": "gone"}}, (404, "message_not_found")),
    (404, {"error": {"code": "ResourceNotFound", "message": "no"}}, (502, "graph_resource_not_found")),
    (404, None, (502, "graph_error")),
    (401, None, (502, "graph_error")),
    (401, {"error": {"code": "InvalidAuthenticationToken"}}, (503, "graph_token_rejected")),
    (403, {"error": {"code": "ErrorAccessDenied"}}, (403, "mail_access_denied")),
    (400, {"error": {"code": "SomethingNew"}}, (400, "graph_error")),
])
def test_graph_status_mapping(status: int, body: Any, expected: tuple[int, str]) -> None:
    err = from_graph_response(status, body, {})
    assert (err.status, err.code) == expected


def test_no_mapped_graph_code_answers_401_and_only_item_not_found_answers_404() -> None:
    assert all(info.status != 401 for info in GRAPH.values())
    assert {code for code, info in GRAPH.items() if info.status == 404} == {"ErrorItemNotFound"}


# -- the per-mailbox limiter -----------------------------------------------------------------

def test_at_most_four_in_flight_per_mailbox_and_other_mailboxes_pass() -> None:
    release = threading.Event()
    cond = threading.Condition()
    state = {"a": 0, "max_a": 0}

    def handler(req: requests.PreparedRequest) -> requests.Response:
        if "/mailbox-b/" in (req.url or ""):
            return reply(200, {"mailbox": "b"})(req)
        with cond:
            state["a"] += 1
            state["max_a"] = max(state["max_a"], state["a"])
            cond.notify_all()
        release.wait(10)
        with cond:
            state["a"] -= 1
        return reply(200, {"mailbox": "a"})(req)

    client, _ = make_client(FakeTransport(handler=handler))
    results: list[int] = []

    def call_a(i: int) -> None:
        if i % 2:  # upload chunks share the mailbox's limit with ordinary calls
            results.append(client.upload_range(UPLOAD_URL + "&mailbox-a/", b"x", start=0, total=1,
                                               mailbox="A").status_code)
        else:
            results.append(get(client, "mailbox-a/x", mailbox="A").status_code)

    threads = [threading.Thread(target=call_a, args=(i,)) for i in range(6)]
    for th in threads:
        th.start()
    try:
        with cond:
            assert cond.wait_for(lambda: state["a"] == 4, timeout=5)
        other = get(client, "mailbox-b/x", mailbox="B")  # not blocked by mailbox A's four
        assert other.json() == {"mailbox": "b"}
        with cond:
            assert not cond.wait_for(lambda: state["a"] > 4, timeout=0.3)
    finally:
        release.set()
        for th in threads:
            th.join(10)
    assert results == [200] * 6 and state["max_a"] == 4


# -- upload sessions -------------------------------------------------------------------------

def test_upload_range_has_no_authorization_and_resends_a_throttled_chunk(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeTransport(graph_error(429, "TooManyRequests", {"Retry-After": "3"}),
                         reply(200, {"nextExpectedRanges": ["30-99"]}))
    client, t = make_client(fake)
    client.session.auth = ("user", "password")  # a session-wide auth must not leak onto the upload URL
    chunk = bytes(range(10))
    with caplog.at_level(logging.DEBUG):
        resp = client.upload_range(UPLOAD_URL, memoryview(chunk), start=20, total=100, mailbox="mb-1")
    assert resp.json() == {"nextExpectedRanges": ["30-99"]}
    assert t.sleeps == [3.0] and len(fake.requests) == 2
    for r in fake.requests:
        assert r.method == "PUT" and r.url == UPLOAD_URL
        assert "Authorization" not in r.headers
        assert r.headers["Content-Range"] == "bytes 20-29/100" and r.headers["Content-Length"] == "10"
        assert bytes(r.body) == chunk  # type: ignore[arg-type]
    assert "UPLOAD-SECRET" not in caplog.text


def test_upload_range_expired_session_is_not_our_404() -> None:
    fake = FakeTransport(graph_error(404, "ErrorItemNotFound"))
    client, _ = make_client(fake)
    with pytest.raises(MicrosoftError) as e:
        client.upload_range(UPLOAD_URL, b"abc", start=0, total=3, mailbox="mb-1")
    assert (e.value.status, e.value.code) == (502, "upload_session_expired")
    assert "UPLOAD-SECRET" not in str(e.value)


@pytest.mark.parametrize(("url", "chunk", "start", "total"), [
    ("http://upload.test/s?authtoken=x", b"abc", 0, 3),  # would send the secret in clear
    (UPLOAD_URL, b"abc", 1, 3),  # past the end
    (UPLOAD_URL, b"", 0, 3),
])
def test_upload_range_refuses_bad_input(url: str, chunk: bytes, start: int, total: int) -> None:
    fake = FakeTransport()
    client, _ = make_client(fake)
    with pytest.raises(ValueError):
        client.upload_range(url, chunk, start=start, total=total, mailbox="mb-1")
    assert fake.requests == []


# -- URLs and network failures ---------------------------------------------------------------

@pytest.mark.parametrize("url", ["https://evil.test/v1.0/me", "https://graph.test/v1.0evil/me",
                                 "http://graph.test/v1.0/me"])
def test_a_url_outside_the_base_is_refused(url: str) -> None:
    fake = FakeTransport(reply(200, {}))
    client, _ = make_client(fake)
    with pytest.raises(ValueError):
        get(client, url)
    assert fake.requests == []


def test_a_next_link_inside_the_base_is_followed() -> None:
    fake = FakeTransport(reply(200, {"value": []}))
    client, _ = make_client(fake)
    get(client, f"{BASE}/me/messages?$skip=25")
    assert fake.requests[0].url == f"{BASE}/me/messages?$skip=25"


def _refused() -> requests.ConnectionError:
    reason = NewConnectionError(None, "Failed to establish a new connection: [Errno 111] Connection refused")
    return requests.ConnectionError(MaxRetryError(None, "/v1.0/me/sendMail", reason))  # type: ignore[arg-type]


@pytest.mark.parametrize(("exc", "unknown"), [
    (_refused(), False),
    (requests.ConnectTimeout("connect timed out"), False),
    (requests.ReadTimeout("read timed out"), True),
    (requests.ConnectionError("Connection aborted: RemoteDisconnected"), True),
])
def test_network_failure_on_send_mail(exc: Exception, unknown: bool) -> None:
    fake = FakeTransport(fail(exc), reply(202))
    client, t = make_client(fake)
    with pytest.raises(UpstreamUnavailableError) as e:
        send_mail(client)
    assert len(fake.requests) == 1 and t.sleeps == []
    assert bool(e.value.extra.get("outcomeUnknown")) is unknown
    assert ("nothing was sent" in e.value.detail) is not unknown


# -- immutable ids ---------------------------------------------------------------------------

def test_every_request_asks_for_immutable_ids_and_keeps_the_callers_preferences() -> None:
    """https://learn.microsoft.com/graph/outlook-immutable-id: the header applies only to the request that
    carries it, so every request carries it; a caller's own Prefer (delta's page size) joins it."""
    fake = FakeTransport(reply(200, {}), reply(200, {}), reply(202, None))
    client, _ = make_client(fake)
    get(client)
    get(client, "me/mailFolders/inbox/messages/delta", headers={"Prefer": "odata.maxpagesize=50"})
    send_mail(client)
    prefer = [r.headers["Prefer"] for r in fake.requests]
    assert prefer == ['IdType="ImmutableId"', 'IdType="ImmutableId", odata.maxpagesize=50', 'IdType="ImmutableId"']
    assert fake.requests[2].headers["Content-Type"] == "application/json"
    assert fake.requests[2].body == b'{"message":{"subject":"x"}}'
