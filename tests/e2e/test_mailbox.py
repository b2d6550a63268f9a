"""Working with mail end to end: reply/replyAll/forward in the thread, PATCH, move,
DELETE, search, threads and ranged attachment downloads — dev host + Azurite + the HTTPS sandbox."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import uuid
from typing import Any

import pytest

from devstack.sandbox.mailbox import synthetic_chunks
from tests.conftest import Host, connect

OWNER = "owner-mailbox"
USER = "adele@contoso.onmicrosoft.com"
LEAD = {"emailAddress": {"address": "lead@example.com", "name": "Lead Person"}}


@pytest.fixture(scope="module")
def account(host: Host, browser_session: Any) -> str:
    return str(connect(host, browser_session, sub=OWNER, login_hint=USER)["result"]["accountId"])


def _api(host: Host, method: str, path: str, **kw: Any) -> Any:
    return host.api(method, path, sub=kw.pop("sub", OWNER), **kw)


def _thread(control: Any, subject: str, *, folder: str = "inbox", **extra: Any) -> tuple[str, str, str]:
    """Seed one incoming message; returns (message id, conversation id, internet message id)."""
    cid = "AAQkAG" + base64.urlsafe_b64encode(os.urandom(24)).decode()
    imid = f"<{uuid.uuid4().hex}@example.com>"
    [mid] = control.seed_messages(USER, [{"subject": subject, "from": LEAD, "conversationId": cid,
                                          "internetMessageId": imid, **extra}], folder=folder)
    return mid, cid, imid


def _sent(control: Any, tracking: str) -> list[dict[str, Any]]:
    out = []
    for s in control.sent(USER):
        headers = {h["name"]: h["value"] for h in s["message"].get("internetMessageHeaders", [])}
        if headers.get("X-Connector-Tracking-Id") == tracking:
            out.append(s)
    return out


def _addresses(recipients: list[dict[str, Any]]) -> list[str]:
    return [r["emailAddress"]["address"] for r in recipients]


# -- reply, reply-all, forward ---------------------------------------------------------------------
def test_reply_stays_in_the_conversation(host: Host, account: str, control: Any) -> None:
    mid, cid, imid = _thread(control, "Pricing question")
    r = _api(host, "POST", f"/api/accounts/{account}/messages/{mid}/reply",
             json={"comment": "Thanks, here are our prices.", "trackingId": "reply-direct"})
    assert r.status_code == 202, r.text
    out = r.json()
    assert out["status"] == "sent" and out["trackingId"] == "reply-direct" and out["messageId"] is None
    [sent] = _sent(control, "reply-direct")
    assert sent["via"] == "reply" and sent["inReplyTo"] == imid and sent["references"] == [imid]
    msg = sent["message"]
    assert msg["conversationId"] == cid and msg["subject"] == "RE: Pricing question"
    assert _addresses(msg["toRecipients"]) == ["lead@example.com"]
    assert "Thanks, here are our prices." in msg["body"]["content"]
    thread = _api(host, "GET", f"/api/accounts/{account}/conversations/{cid}").json()["messages"]
    assert [m["subject"] for m in thread] == ["Pricing question", "RE: Pricing question"]  # oldest first


def test_reply_with_a_10_mb_attachment_lands_once_in_the_thread(host: Host, account: str, control: Any) -> None:
    mid, cid, imid = _thread(control, "Send me the contract")
    data = os.urandom(10 * 1024 * 1024)
    message = {"bodyHtml": "<p>The contract is attached.</p>", "trackingId": "reply-10mb"}
    before = control.counters()["upload_chunks"]

    def reply() -> Any:
        parts = [("message", (None, json.dumps(message), "application/json")),
                 ("file", ("contract.pdf", data, "application/pdf"))]
        return _api(host, "POST", f"/api/accounts/{account}/messages/{mid}/reply", files=parts,
                    headers={"Idempotency-Key": "reply-10mb-key"})

    first = reply()
    assert first.status_code == 202, first.text
    sent_id = first.json()["messageId"]  # the draft's immutable id: it names the Sent Items copy now
    copy = _api(host, "GET", f"/api/accounts/{account}/messages/{sent_id}")
    assert copy.status_code == 200 and copy.json()["subject"] == "RE: Send me the contract"
    again = reply()  # a client retry with the same key: the first result, nothing sent again
    assert again.status_code == 202 and again.json() == first.json()
    [sent] = _sent(control, "reply-10mb")
    assert sent["via"] == "draft" and sent["inReplyTo"] == imid
    assert sent["message"]["conversationId"] == cid == first.json()["conversationId"]
    assert sent["message"]["subject"] == "RE: Send me the contract"
    assert _addresses(sent["message"]["toRecipients"]) == ["lead@example.com"]
    [att] = sent["message"]["attachments"]
    assert att["name"] == "contract.pdf" and att["sha256"] == hashlib.sha256(data).hexdigest()
    assert control.counters()["upload_chunks"] - before >= 3  # upload session, in < 4 MB ranges
    thread = _api(host, "GET", f"/api/accounts/{account}/messages", params={"conversationId": cid}).json()
    assert [m["subject"] for m in thread["messages"]] == ["Send me the contract", "RE: Send me the contract"]
    other = _api(host, "POST", f"/api/accounts/{account}/messages/{mid}/replyAll", json=message,
                 headers={"Idempotency-Key": "reply-10mb-key"})
    assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"


def test_reply_all_and_added_recipients(host: Host, account: str, control: Any) -> None:
    mid, cid, _ = _thread(control, "Team sync", toRecipients=[
        {"emailAddress": {"address": USER}}, {"emailAddress": {"address": "colleague@example.com"}}],
        ccRecipients=[{"emailAddress": {"address": "boss@example.com"}}])
    r = _api(host, "POST", f"/api/accounts/{account}/messages/{mid}/replyAll",
             json={"comment": "Agreed.", "trackingId": "reply-all"})
    assert r.status_code == 202, r.text
    [sent] = _sent(control, "reply-all")
    assert _addresses(sent["message"]["toRecipients"]) == ["lead@example.com", "colleague@example.com"]
    assert _addresses(sent["message"]["ccRecipients"]) == ["boss@example.com"]  # never the mailbox itself
    r = _api(host, "POST", f"/api/accounts/{account}/messages/{mid}/reply",
             json={"bodyText": "Adding Dana.", "cc": ["Dana <dana@example.com>"], "trackingId": "reply-cc"})
    assert r.status_code == 202, r.text
    [sent] = _sent(control, "reply-cc")  # the draft path: Graph's recipients plus ours
    assert _addresses(sent["message"]["toRecipients"]) == ["lead@example.com"]
    assert _addresses(sent["message"]["ccRecipients"]) == ["dana@example.com"]
    assert sent["message"]["body"]["content"] == "Adding Dana." and sent["message"]["conversationId"] == cid


def test_forward_carries_the_attachments(host: Host, account: str, control: Any) -> None:
    mid, _, _ = _thread(control, "Invoice 42", attachments=[
        {"name": "invoice.pdf", "contentType": "application/pdf", "contentBytes": base64.b64encode(b"%PDF").decode()}])
    r = _api(host, "POST", f"/api/accounts/{account}/messages/{mid}/forward", json={"comment": "FYI"})
    assert r.status_code == 400 and r.json()["field"] == "to"
    r = _api(host, "POST", f"/api/accounts/{account}/messages/{mid}/forward",
             json={"to": ["accounts@example.com"], "comment": "FYI", "trackingId": "fwd-1"})
    assert r.status_code == 202, r.text
    [sent] = _sent(control, "fwd-1")
    assert sent["via"] == "forward" and sent["message"]["subject"] == "FW: Invoice 42"
    assert _addresses(sent["message"]["toRecipients"]) == ["accounts@example.com"]
    assert [a["name"] for a in sent["message"]["attachments"]] == ["invoice.pdf"]


@pytest.mark.parametrize(("body", "field"), [
    ({"comment": "a", "bodyText": "b"}, "comment"),
    ({"to": ["nope"]}, "to[0]"),
    ({"cc": ["a@example.com\r\nBcc: x@example.com"]}, "cc[0]"),
    ({"bogus": 1}, "bogus"),
    ({"trackingId": "has space"}, "trackingId"),
    ({"attachments": [{"name": "a", "contentBytes": "!!"}]}, "attachments[0].contentBytes"),
    ([1], "body"),
])
def test_bad_answers_name_the_field(host: Host, account: str, control: Any, body: Any, field: str) -> None:
    mid, _, _ = _thread(control, "bad input")
    before = len(control.sent(USER))
    r = _api(host, "POST", f"/api/accounts/{account}/messages/{mid}/reply", json=body)
    assert r.status_code == 400 and r.json()["field"] == field, r.text
    assert r.headers["Content-Type"].startswith("application/problem+json")
    assert len(control.sent(USER)) == before


def test_unknown_message_is_message_not_found(host: Host, account: str) -> None:
    gone = "AAMkAG" + "x" * 40
    for method, suffix, body in (("POST", "/reply", {"comment": "x"}), ("POST", "/forward", {"to": ["a@example.com"]}),
                                 ("PATCH", "", {"isRead": True}), ("POST", "/move", {"folder": "archive"}),
                                 ("DELETE", "", None)):
        r = _api(host, method, f"/api/accounts/{account}/messages/{gone}{suffix}", json=body)
        assert r.status_code == 404 and r.json()["code"] == "message_not_found", (method, suffix, r.text)
    r = _api(host, "POST", f"/api/accounts/{account}/messages/not%20an%20id/reply", json={"comment": "x"})
    assert r.status_code == 400 and r.json()["field"] == "messageId"


# -- organise ----------------------------------------------------------------------------------------
def test_patch_marks_flags_and_categorises(host: Host, account: str, control: Any) -> None:
    mid, _, _ = _thread(control, "to organise")
    r = _api(host, "PATCH", f"/api/accounts/{account}/messages/{mid}",
             json={"isRead": True, "flag": "flagged", "categories": ["Customer", "Customer", "Q3"]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == mid and out["isRead"] is True and out["flag"] == "flagged"
    assert out["categories"] == ["Customer", "Q3"]
    assert _api(host, "GET", f"/api/accounts/{account}/messages/{mid}").json()["isRead"] is True
    done = _api(host, "PATCH", f"/api/accounts/{account}/messages/{mid}", json={"flag": "complete", "isRead": False})
    assert done.json()["flag"] == "complete" and done.json()["isRead"] is False
    for body, field in (({}, "body"), ({"flag": "red"}, "flag"), ({"isRead": "yes"}, "isRead"),
                        ({"categories": "x"}, "categories"), ({"categories": [""]}, "categories[0]"),
                        ({"subject": "x"}, "subject"), ([], "body")):
        r = _api(host, "PATCH", f"/api/accounts/{account}/messages/{mid}", json=body)
        assert r.status_code == 400 and r.json()["field"] == field, (body, r.text)


def test_move_answers_the_same_id_and_delete_goes_to_deleted_items(host: Host, account: str, control: Any) -> None:
    """Ids are Graph's immutable ids: a message keeps its id when it is moved (and when it is deleted, which
    moves it to Deleted Items), in every answer."""
    subject = "move me " + uuid.uuid4().hex[:6]
    mid, _, _ = _thread(control, subject)
    r = _api(host, "POST", f"/api/accounts/{account}/messages/{mid}/move", json={"folder": "Archive"})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == mid and r.json()["subject"] == subject
    after = _api(host, "GET", f"/api/accounts/{account}/messages/{mid}")
    assert after.status_code == 200 and after.json()["id"] == mid
    archive = _api(host, "GET", f"/api/accounts/{account}/messages", params={"folder": "archive", "top": 100}).json()
    assert mid in [m["id"] for m in archive["messages"]]
    assert _api(host, "DELETE", f"/api/accounts/{account}/messages/{mid}").status_code == 204
    deleted = _api(host, "GET", f"/api/accounts/{account}/messages", params={"folder": "deleteditems", "top": 100})
    assert mid in [m["id"] for m in deleted.json()["messages"]]
    gone = _api(host, "GET", f"/api/accounts/{account}/messages/AAMkAG{'n' * 40}")
    assert gone.status_code == 404 and gone.json()["code"] == "message_not_found"
    other, _, _ = _thread(control, "stays")
    for body, field in (({"folder": "AAMkAG" + "q" * 40}, "folder"), ({"folder": "../x"}, "folder"),
                        ({}, "folder"), ({"folder": "archive", "x": 1}, "x")):
        r = _api(host, "POST", f"/api/accounts/{account}/messages/{other}/move", json=body)
        assert r.status_code == 400 and r.json()["field"] == field, (body, r.text)


# -- find ----------------------------------------------------------------------------------------------
def test_search_pages_and_its_rules(host: Host, account: str, control: Any) -> None:
    word = "zebra" + uuid.uuid4().hex[:8]
    control.seed_messages(USER, [{"subject": f"{word} report {i}", "from": LEAD} for i in range(12)])
    control.seed_messages(USER, [{"subject": f"{word} from someone else"}])
    seen: list[str] = []
    cursor, pages = None, 0
    while True:
        params: dict[str, Any] = {"q": word, "top": 5, "from": "lead@example.com"}
        if cursor:
            params = {"cursor": cursor}
        r = _api(host, "GET", f"/api/accounts/{account}/messages", params=params)
        assert r.status_code == 200, r.text
        seen += [m["subject"] for m in r.json()["messages"]]
        pages += 1
        cursor = r.json()["nextCursor"]
        if not cursor:
            break
    assert pages == 3 and len(seen) == 12 == len(set(seen)) and all(s.startswith(word + " report") for s in seen)
    assert len(_api(host, "GET", f"/api/accounts/{account}/messages", params={"q": f'"{word}"'}).json()["messages"]) == 13
    for extra in ("conversationId", "receivedAfter", "receivedBefore", "unreadOnly"):
        value = {"conversationId": "AAQkAGabc", "unreadOnly": "true"}.get(extra, "2026-01-01T00:00:00Z")
        r = _api(host, "GET", f"/api/accounts/{account}/messages", params={"q": word, extra: value})
        assert r.status_code == 400 and r.json()["field"] == extra, (extra, r.text)
    r = _api(host, "GET", f"/api/accounts/{account}/messages", params={"q": "a\x01b"})
    assert r.status_code == 400 and r.json()["field"] == "q"


def test_filters_by_sender_and_received_time(host: Host, account: str, control: Any) -> None:
    tag = uuid.uuid4().hex[:8]
    control.seed_messages(USER, [
        {"subject": f"{tag} old", "from": LEAD, "receivedDateTime": "2020-01-01T10:00:00Z"},
        {"subject": f"{tag} mid", "from": LEAD, "receivedDateTime": "2020-06-01T10:00:00Z"},
        {"subject": f"{tag} other", "receivedDateTime": "2020-06-02T10:00:00Z"}], folder="junkemail")
    r = _api(host, "GET", f"/api/accounts/{account}/messages", params={
        "folder": "junkemail", "from": "Lead@Example.com", "receivedAfter": "2020-03-01T00:00:00+01:00",
        "receivedBefore": "2021-01-01T00:00:00Z"})
    assert r.status_code == 200, r.text
    assert [m["subject"] for m in r.json()["messages"]] == [f"{tag} mid"]
    for params, field in (({"receivedAfter": "yesterday"}, "receivedAfter"), ({"from": "not-an-address"}, "from"),
                          ({"receivedAfter": "2021-01-01T00:00:00Z", "receivedBefore": "2020-01-01T00:00:00Z"},
                           "receivedBefore"), ({"conversationId": "bad id!"}, "conversationId")):
        r = _api(host, "GET", f"/api/accounts/{account}/messages", params=params)
        assert r.status_code == 400 and r.json()["field"] == field, (params, r.text)


def test_thread_pages_oldest_first_across_folders(host: Host, account: str, control: Any) -> None:
    cid = "AAQkAG" + base64.urlsafe_b64encode(os.urandom(24)).decode()
    for i in range(7):
        control.seed_messages(USER, [{"subject": f"thread {i}", "conversationId": cid,
                                      "receivedDateTime": f"2024-01-0{i + 1}T08:00:00Z"}],
                              folder="inbox" if i % 2 else "sentitems")
    subjects: list[str] = []
    cursor, pages = None, 0
    while True:
        params = {"cursor": cursor} if cursor else {"top": 3}
        body = _api(host, "GET", f"/api/accounts/{account}/conversations/{cid}", params=params).json()
        subjects += [m["subject"] for m in body["messages"]]
        pages += 1
        cursor = body["nextCursor"]
        if not cursor:
            break
    assert subjects == [f"thread {i}" for i in range(7)] and pages == 3
    r = _api(host, "GET", f"/api/accounts/{account}/conversations/{cid}", params={"top": 0})
    assert r.status_code == 400 and r.json()["field"] == "top"


# -- ranged downloads ------------------------------------------------------------------------------------
def test_large_attachment_downloads_in_ranges(host: Host, account: str, control: Any) -> None:
    size, seed = 30 * 1024 * 1024 + 123, "range-" + uuid.uuid4().hex
    [mid] = control.seed_messages(USER, [{"subject": "big file", "attachments": [
        {"name": "big.bin", "contentType": "application/octet-stream", "size": size, "seed": seed}]}])
    [att] = _api(host, "GET", f"/api/accounts/{account}/messages/{mid}").json()["attachments"]
    url = f"/api/accounts/{account}/messages/{mid}/attachments/{att['id']}"
    whole = _api(host, "GET", url)
    assert whole.status_code == 413 and whole.json()["code"] == "attachment_too_large", whole.text[:300]
    assert "Range" in whole.json()["hint"]
    h = hashlib.sha256()
    start, part = 0, 8 * 1024 * 1024
    while True:
        r = _api(host, "GET", url, headers={"Range": f"bytes={start}-{start + part - 1}"})
        assert r.status_code == 206, r.text[:300]
        assert r.headers["Content-Range"] == f"bytes {start}-{start + len(r.content) - 1}/{size}"
        h.update(r.content)
        start += len(r.content)
        if start >= size:
            break
    expected = hashlib.sha256()
    for piece in synthetic_chunks(seed, size):
        expected.update(piece)
    assert h.hexdigest() == expected.hexdigest()
    tail = _api(host, "GET", url, headers={"Range": "bytes=-100"})
    assert tail.status_code == 206 and len(tail.content) == 100
    assert tail.headers["Content-Range"] == f"bytes {size - 100}-{size - 1}/{size}"
    beyond = _api(host, "GET", url, headers={"Range": f"bytes={size}-"})
    assert beyond.status_code == 416 and beyond.headers["Content-Range"] == f"bytes */{size}"
    bad = _api(host, "GET", url, headers={"Range": "bytes=0-1,5-9"})
    assert bad.status_code == 400 and bad.json()["field"] == "Range"


# -- owner isolation ------------------------------------------------------------------------------------
def test_another_owner_gets_404_on_every_new_route(host: Host, account: str, control: Any) -> None:
    mid, cid, _ = _thread(control, "private")
    stranger = "owner-mailbox-stranger"
    base = f"/api/accounts/{account}"
    calls = [("POST", f"{base}/messages/{mid}/reply", {"comment": "x"}),
             ("POST", f"{base}/messages/{mid}/replyAll", {"comment": "x"}),
             ("POST", f"{base}/messages/{mid}/forward", {"to": ["a@example.com"]}),
             ("PATCH", f"{base}/messages/{mid}", {"isRead": True}),
             ("POST", f"{base}/messages/{mid}/move", {"folder": "archive"}),
             ("DELETE", f"{base}/messages/{mid}", None),
             ("GET", f"{base}/conversations/{cid}", None),
             ("GET", f"{base}/messages?q=private", None)]
    before = len(control.sent(USER))
    for method, path, body in calls:
        r = _api(host, method, path, json=body, sub=stranger)
        assert r.status_code == 404 and r.json()["code"] == "account_not_found", (method, path, r.text)
    assert len(control.sent(USER)) == before
    assert _api(host, "GET", f"{base}/messages/{mid}").json()["isRead"] is False  # untouched, not moved


def test_real_responses_of_the_new_routes_match_the_openapi_document(host: Host, account: str,
                                                                     control: Any) -> None:
    from tests.e2e.test_openapi import Checker

    c = Checker(host.http.get(host.url + "/api/openapi.json", timeout=30).json())
    mid, cid, _ = _thread(control, "schema check")
    base = f"/api/accounts/{account}"

    def call(method: str, path: str, **kw: Any) -> Any:
        r = _api(host, method, path, **kw)
        c.check(method, path.split("?")[0], r)
        return r

    call("POST", f"{base}/messages/{mid}/reply", json={"comment": "ok"})
    call("POST", f"{base}/messages/{mid}/replyAll", json={"comment": "a", "bodyText": "b"})
    call("POST", f"{base}/messages/{mid}/forward", json={"to": ["x@example.com"]})
    call("PATCH", f"{base}/messages/{mid}", json={"flag": "flagged"})
    call("GET", f"{base}/conversations/{cid}")
    call("GET", f"{base}/messages", params={"q": "schema"})
    call("GET", f"{base}/messages", params={"q": "schema", "unreadOnly": "true"})
    moved = call("POST", f"{base}/messages/{mid}/move", json={"folder": "archive"}).json()["id"]
    call("DELETE", f"{base}/messages/{moved}")
    call("DELETE", f"{base}/messages/AAMkAG{'n' * 40}")  # no such message: 404
    assert len(c.checked) >= 9
