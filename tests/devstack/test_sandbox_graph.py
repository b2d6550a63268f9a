"""The sandbox's Graph side, exercised with plain requests."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading

import requests

ADELE = "adele@contoso.onmicrosoft.com"
MEGAN = "megan@contoso.onmicrosoft.com"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def graph_error(r: requests.Response, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["code"] == code, err
    assert {"date", "request-id", "client-request-id"} <= set(err["innerError"])
    assert r.headers["request-id"] == err["innerError"]["request-id"]
    return err


def message(**overrides: object) -> dict:
    base = {
        "subject": "Hello",
        "body": {"contentType": "Text", "content": "Hi there"},
        "toRecipients": [{"emailAddress": {"address": "someone@example.com", "name": "Someone"}}],
    }
    base.update(overrides)
    return base


def test_send_mail_validation_and_success(sandbox_server, ctl, http, flows):
    at = flows.sign_in(ADELE)["access_token"]
    url = f"{sandbox_server.url}/v1.0/me/sendMail"
    h = bearer(at)

    graph_error(http.post(url, json={"message": message(toRecipients=[])}, headers=h, timeout=10),
                400, "ErrorInvalidRecipients")
    err = graph_error(http.post(url, json={"message": message(toRecipients=[{"emailAddress": {"address": "bad"}}])},
                                headers=h, timeout=10), 400, "ErrorInvalidRecipients")
    assert '"bad"' in err["message"]
    graph_error(http.post(url, json={"message": message(internetMessageHeaders=[{"name": "Foo", "value": "1"}])},
                          headers=h, timeout=10), 400, "InvalidInternetMessageHeader")
    graph_error(http.post(url, data="{not json", headers={**h, "Content-Type": "application/json"}, timeout=10),
                400, "BadRequest")
    graph_error(http.post(url, json={"message": message(colour="red")}, headers=h, timeout=10), 400, "RequestBodyRead")
    big = base64.b64encode(os.urandom(3_200_000)).decode()
    too_big = message(attachments=[{"@odata.type": "#microsoft.graph.fileAttachment", "name": "big.bin",
                                    "contentBytes": big}])
    graph_error(http.post(url, json={"message": too_big}, headers=h, timeout=30), 413, "BadRequest")

    raw = b"attachment bytes"
    ok = message(
        internetMessageHeaders=[{"name": "X-Correlation-Id", "value": "abc"}],
        attachments=[{"@odata.type": "#microsoft.graph.fileAttachment", "name": "a.txt", "contentType": "text/plain",
                      "contentBytes": base64.b64encode(raw).decode()}],
    )
    r = http.post(url, json={"message": ok, "saveToSentItems": True}, headers={**h, "client-request-id": "cr-1"},
                  timeout=10)
    assert r.status_code == 202 and r.content == b""
    assert r.headers["client-request-id"] == "cr-1" and r.headers["request-id"]
    sent = ctl.sent(ADELE)
    assert len(sent) == 1
    msg = sent[0]["message"]
    assert msg["internetMessageHeaders"] == [{"name": "X-Correlation-Id", "value": "abc"}]
    assert msg["attachments"][0]["size"] == len(raw)
    assert msg["attachments"][0]["sha256"] == hashlib.sha256(raw).hexdigest()
    items = http.get(f"{sandbox_server.url}/v1.0/me/mailFolders/sentitems/messages", headers=h, timeout=10).json()
    assert [m["subject"] for m in items["value"]] == ["Hello"]


def test_send_requires_mail_send_scope(sandbox_server, ctl, http, flows):
    tokens = flows.sign_in("nosend@contoso.onmicrosoft.com")
    assert "Mail.Send" not in tokens["scope"].split()
    r = http.post(f"{sandbox_server.url}/v1.0/me/sendMail", json={"message": message()},
                  headers=bearer(tokens["access_token"]), timeout=10)
    err = graph_error(r, 403, "ErrorAccessDenied")
    assert err["message"] == "Access is denied. Check credentials and try again."
    read_only = flows.sign_in(ADELE, scope="User.Read Mail.Read offline_access openid")
    r = http.post(f"{sandbox_server.url}/v1.0/me/sendMail", json={"message": message()},
                  headers=bearer(read_only["access_token"]), timeout=10)
    graph_error(r, 403, "ErrorAccessDenied")
    assert ctl.sent(ADELE) == []


def test_large_attachment_upload_session_then_send(sandbox_server, ctl, http, flows):
    at = flows.sign_in(ADELE)["access_token"]
    base = f"{sandbox_server.url}/v1.0/me/messages"
    draft = http.post(base, json=message(subject="Big file"), headers=bearer(at), timeout=10)
    assert draft.status_code == 201 and draft.json()["isDraft"] is True
    mid = draft.json()["id"]
    small = http.post(f"{base}/{mid}/attachments/createUploadSession", headers=bearer(at), timeout=10, json={
        "AttachmentItem": {"attachmentType": "file", "name": "small.bin", "size": 1024 * 1024}})
    graph_error(small, 400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize")  # POST it to /attachments
    data = os.urandom(5 * 1024 * 1024 + 123)
    sess = http.post(f"{base}/{mid}/attachments/createUploadSession", headers=bearer(at), timeout=10, json={
        "AttachmentItem": {"attachmentType": "file", "name": "big.bin", "size": len(data),
                           "contentType": "application/octet-stream"}})
    assert sess.status_code == 201, sess.text
    upload_url = sess.json()["uploadUrl"]
    assert sess.json()["nextExpectedRanges"] == ["0-"]
    chunk = 2 * 1024 * 1024

    def put(start: int, end: int, **headers: str) -> requests.Response:
        return http.put(upload_url, data=data[start:end + 1], timeout=30, headers={
            "Content-Range": f"bytes {start}-{end}/{len(data)}", **headers})

    graph_error(put(0, chunk - 1, Authorization=f"Bearer {at}"), 401, "InvalidAudienceForResource")
    graph_error(put(chunk, 2 * chunk - 1), 416, "ErrorInvalidRange")  # out of order
    graph_error(put(0, 4 * 1024 * 1024), 413, "RequestEntityTooLarge")  # over 4 MB in one range
    offset = 0
    last = None
    while offset < len(data):
        end = min(offset + chunk, len(data)) - 1
        last = put(offset, end)
        if end + 1 < len(data):
            assert last.status_code == 200 and last.json()["nextExpectedRanges"] == [str(end + 1)]
        offset = end + 1
    assert last is not None and last.status_code == 201 and last.content == b"" and "Location" in last.headers

    sent = http.post(f"{base}/{mid}/send", headers=bearer(at), timeout=10)
    assert sent.status_code == 202 and sent.content == b""
    record = ctl.sent(ADELE)[0]
    assert record["via"] == "draft"
    att = record["message"]["attachments"][0]
    assert att["size"] == len(data) and att["sha256"] == hashlib.sha256(data).hexdigest()
    assert ctl.counters()["upload_chunks"] == 3


def test_fifth_concurrent_request_to_a_mailbox_is_throttled(sandbox_server, ctl, http, flows):
    adele = flows.sign_in(ADELE)["access_token"]
    megan = flows.sign_in(MEGAN)["access_token"]
    ctl.inject("/v1.0/me/messages", latency_ms=20_000, count=4, user=ADELE)
    results: list[int] = []
    lock = threading.Lock()

    def slow_call() -> None:
        s = requests.Session()
        s.trust_env = False
        s.verify = sandbox_server.ca_path
        r = s.get(f"{sandbox_server.url}/v1.0/me/messages", headers=bearer(adele), timeout=30)
        with lock:
            results.append(r.status_code)

    threads = [threading.Thread(target=slow_call) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        assert ctl.wait_inflight(ADELE, 4, timeout=10)
        fifth = http.get(f"{sandbox_server.url}/v1.0/me/messages", headers=bearer(adele), timeout=10)
        err = graph_error(fifth, 429, "ApplicationThrottled")
        assert "MailboxConcurrency" in err["message"] and int(fifth.headers["Retry-After"]) >= 1
        other = http.get(f"{sandbox_server.url}/v1.0/me/messages", headers=bearer(megan), timeout=10)
        assert other.status_code == 200  # another mailbox is unaffected
    finally:
        ctl.release()
        for t in threads:
            t.join(timeout=30)
    assert results == [200, 200, 200, 200]
    counters = ctl.counters()
    assert counters["max_concurrent_per_mailbox"][ADELE] == 4
    assert counters["throttled_429"] == 1


def test_paging_over_thirty_messages(sandbox_server, ctl, http, flows):
    at = flows.sign_in(MEGAN)["access_token"]
    seeded = ctl.seed_messages(MEGAN, 30, folder="archive")
    url = f"{sandbox_server.url}/v1.0/me/mailFolders/archive/messages?$top=10&$select=subject,receivedDateTime"
    ids: list[str] = []
    pages = 0
    while url:
        page = http.get(url, headers=bearer(at), timeout=10).json()
        pages += 1
        ids += [m["id"] for m in page["value"]]
        assert all(set(m) <= {"@odata.etag", "id", "subject", "receivedDateTime"} for m in page["value"])
        url = page.get("@odata.nextLink")
        assert url is None or url.startswith(sandbox_server.url)
    assert pages == 3 and len(ids) == 30 and set(ids) == set(seeded)


def test_filter_expand_and_attachment_value(sandbox_server, ctl, http, flows):
    at = flows.sign_in(ADELE)["access_token"]
    raw = b"%PDF-1.4 sandbox"
    [mid] = ctl.seed_messages(ADELE, [{"subject": "With file", "isRead": False, "attachments": [
        {"name": "f.pdf", "contentType": "application/pdf", "contentBytes": base64.b64encode(raw).decode()}]}])
    # With $orderby, the ordered property must lead the $filter (else InefficientFilter, see test_sandbox_mail).
    unread = http.get(f"{sandbox_server.url}/v1.0/me/messages", params={
        "$filter": "receivedDateTime ge 1900-01-01T00:00:00Z and isRead eq false", "$orderby": "receivedDateTime desc",
        "$top": "50"}, headers=bearer(at), timeout=10).json()
    assert mid in [m["id"] for m in unread["value"]] and all(not m["isRead"] for m in unread["value"])
    full = http.get(f"{sandbox_server.url}/v1.0/me/messages/{mid}?$expand=attachments", headers=bearer(at),
                    timeout=10).json()
    att = full["attachments"][0]
    assert base64.b64decode(att["contentBytes"]) == raw and att["size"] == len(raw)
    value = http.get(f"{sandbox_server.url}/v1.0/me/messages/{mid}/attachments/{att['id']}/$value",
                     headers=bearer(at), timeout=10)
    assert value.content == raw
    graph_error(http.get(f"{sandbox_server.url}/v1.0/me/messages", params={"$filter": "foo(bar)"},
                         headers=bearer(at), timeout=10), 400, "BadRequest")
    graph_error(http.get(f"{sandbox_server.url}/v1.0/me/messages/{'A' * 40}", headers=bearer(at), timeout=10),
                404, "ErrorItemNotFound")


def test_expired_missing_and_unknown_tokens(sandbox_server, ctl, http, flows):
    at = flows.sign_in(ADELE)["access_token"]
    me = f"{sandbox_server.url}/v1.0/me"
    assert http.get(me, headers=bearer(at), timeout=10).status_code == 200
    assert ctl.expire_access_tokens(ADELE) == 1
    r = http.get(me, headers=bearer(at), timeout=10)
    graph_error(r, 401, "InvalidAuthenticationToken")
    assert r.headers["WWW-Authenticate"].startswith('Bearer realm=""')
    graph_error(http.get(me, timeout=10), 401, "InvalidAuthenticationToken")
    graph_error(http.get(me, headers=bearer("garbage"), timeout=10), 401, "InvalidAuthenticationToken")
    # the clock moves past every access token's lifetime (60-90 minutes)
    fresh = flows.sign_in(ADELE)["access_token"]
    ctl.advance_clock(5400)
    graph_error(http.get(me, headers=bearer(fresh), timeout=10), 401, "InvalidAuthenticationToken")


def test_user_without_mailbox(sandbox_server, ctl, http, flows):
    at = flows.sign_in("nomailbox@contoso.onmicrosoft.com")["access_token"]
    assert http.get(f"{sandbox_server.url}/v1.0/me", headers=bearer(at), timeout=10).json()["mail"] is None
    graph_error(http.get(f"{sandbox_server.url}/v1.0/me/messages", headers=bearer(at), timeout=10),
                404, "MailboxNotEnabledForRESTAPI")
    graph_error(http.post(f"{sandbox_server.url}/v1.0/me/sendMail", json={"message": message()},
                          headers=bearer(at), timeout=10), 404, "MailboxNotEnabledForRESTAPI")


def test_personal_account_graph(sandbox_server, ctl, http, flows):
    at = flows.sign_in("pat@outlook.com", tenant="consumers")["access_token"]
    me = http.get(f"{sandbox_server.url}/v1.0/me", headers=bearer(at), timeout=10).json()
    assert me["userPrincipalName"] == "pat@outlook.com" and len(me["id"]) == 16
    folders = http.get(f"{sandbox_server.url}/v1.0/me/mailFolders", headers=bearer(at), timeout=10).json()
    assert "Inbox" in [f["displayName"] for f in folders["value"]]


def test_injected_graph_failures_carry_retry_after(sandbox_server, ctl, http, flows):
    at = flows.sign_in(ADELE)["access_token"]
    ctl.inject("/v1.0/me/sendMail", status=429, retry_after=2)
    ctl.inject("/v1.0/me/sendMail", status=503, retry_after=5)
    first = http.post(f"{sandbox_server.url}/v1.0/me/sendMail", json={"message": message()}, headers=bearer(at),
                      timeout=10)
    graph_error(first, 429, "TooManyRequests")
    assert first.headers["Retry-After"] == "2"
    second = http.post(f"{sandbox_server.url}/v1.0/me/sendMail", json={"message": message()}, headers=bearer(at),
                       timeout=10)
    graph_error(second, 503, "ServiceNotAvailable")
    assert second.headers["Retry-After"] == "5"
    third = http.post(f"{sandbox_server.url}/v1.0/me/sendMail", json={"message": message()}, headers=bearer(at),
                      timeout=10)
    assert third.status_code == 202
    assert len(ctl.sent(ADELE)) == 1


def test_unknown_routes_answer_json(sandbox_server, ctl, http, flows):
    at = flows.sign_in(ADELE)["access_token"]
    r = http.get(f"{sandbox_server.url}/v1.0/me/calendarz", headers=bearer(at), timeout=10)
    graph_error(r, 400, "BadRequest")
    assert "calendarz" in r.json()["error"]["message"]
    r = http.get(f"{sandbox_server.url}/nothing/here", timeout=10)
    assert r.status_code == 404 and json.loads(r.text)["error"]["code"] == "NotFound"


def test_bad_input_gets_a_graph_error_and_leaves_the_mailbox_usable(sandbox_server, ctl, http, flows):
    """Wrong types, enum values and nested properties are refused like Graph's OData reader refuses
    them (400 RequestBodyRead), never stored, and never turn later reads into 500s."""
    at = flows.sign_in(ADELE)["access_token"]
    base = f"{sandbox_server.url}/v1.0/me"
    bad_messages = [
        message(subject=["x"]), message(importance="urgent"), message(isRead="yes"),
        message(body={"contentType": "text", "content": 5}),
        message(toRecipients=[{"emailAddress": {"address": "a@example.com", "nmae": "typo"}}]),
        message(attachments=[{"@odata.type": "#microsoft.graph.fileAttachment", "name": "a.txt"}]),  # no content
    ]
    for bad in bad_messages:
        r = http.post(f"{base}/sendMail", json={"message": bad}, headers=bearer(at), timeout=10)
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["code"] in ("RequestBodyRead", "ErrorInvalidRequest"), r.text
    [mid] = ctl.seed_messages(ADELE, [{"subject": "to patch"}])
    for patch in ({"receivedDateTime": 5}, {"body": {"contentType": "text", "content": None}}, {"isRead": "no"}):
        r = http.patch(f"{base}/messages/{mid}", json=patch, headers=bearer(at), timeout=10)
        assert r.status_code == 400, (patch, r.text)
    for flt in ("isRead gt 'x'", "importance ge true", "receivedDateTime eq true"):
        r = http.get(f"{base}/messages", params={"$filter": flt}, headers=bearer(at), timeout=10)
        assert r.status_code == 400 and r.json()["error"]["code"] == "BadRequest", (flt, r.text)
    assert http.get(f"{base}/messages", headers=bearer(at), timeout=10).status_code == 200
    assert http.get(f"{base}/mailFolders", headers=bearer(at), timeout=10).status_code == 200
    assert ctl.sent(ADELE) == []


def test_control_api_refuses_bad_input(sandbox_server, ctl, http):
    base = f"{sandbox_server.url}/_sandbox"
    for path, body in (("/users/adele@contoso.onmicrosoft.com/messages", {"messages": [{"body": "x"}]}),
                       ("/users/adele@contoso.onmicrosoft.com/messages", {"messages": [{"attachments": "x"}]}),
                       ("/users/adele@contoso.onmicrosoft.com/messages", {"messages": [{"attachments": [
                           {"name": "a.txt", "contentType": "text/plain\r\nX-Evil: 1", "contentBytes": ""}]}]}),
                       ("/clock", {"advance_seconds": 1e308}), ("/clock", {"advance_seconds": -1}),
                       ("/inject", {"path_prefix": "/v1.0/me", "status": 42})):
        r = http.post(base + path, json=body, timeout=10)
        assert r.status_code == 400, (path, body, r.text)
        assert r.headers["Content-Type"].startswith("application/json")
    for timeout in ("nan", "inf", "-1", "x"):
        r = http.get(base + "/wait_inflight", params={"user": ADELE, "n": 1, "timeout": timeout}, timeout=10)
        assert r.status_code == 400, (timeout, r.text)
