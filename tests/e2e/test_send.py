"""Sending end to end: dev host + Azurite + sandbox (real Graph-shaped validation and limits)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import uuid
from typing import Any

import pytest

from tests.conftest import Host, connect, wait_for

USER = "megan@contoso.onmicrosoft.com"
OWNER = "owner-send"
TRACKING = "crm-" + uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def account(host: Host, browser_session: Any) -> str:
    return str(connect(host, browser_session, sub=OWNER, login_hint=USER)["result"]["accountId"])


def _send(host: Host, account: str, body: Any, **kw: Any) -> Any:
    return host.api("POST", f"/api/accounts/{account}/send", sub=OWNER, json=body, **kw)


def _sent_by_tracking(control: Any, tracking: str) -> list[dict[str, Any]]:
    out = []
    for s in control.sent(USER):
        headers = {h["name"]: h["value"] for h in s["message"].get("internetMessageHeaders", [])}
        if headers.get("X-Connector-Tracking-Id") == tracking:
            out.append(s)
    return out


def test_minimal_send_arrives(host: Host, account: str, control: Any) -> None:
    r = _send(host, account, {"to": ["rcpt@example.com"], "subject": "Hi", "bodyText": "Hello"})
    assert r.status_code == 202, r.text
    out = r.json()
    assert out["status"] == "sent" and out["trackingId"] and out["sentAt"]
    [sent] = _sent_by_tracking(control, out["trackingId"])
    msg = sent["message"]
    assert msg["toRecipients"] == [{"emailAddress": {"address": "rcpt@example.com"}}]
    assert msg["subject"] == "Hi" and msg["body"]["content"] == "Hello"
    assert msg["body"]["contentType"].lower() == "text"
    assert sent["via"] == "sendMail"


def test_full_send_keeps_every_field(host: Host, account: str, control: Any) -> None:
    pdf = os.urandom(50_000)
    body = {
        "to": ["Ann Example <ann@example.com>", {"address": "bob@example.org", "name": "Bob"}],
        "cc": ["carol@example.net"], "bcc": [{"address": "dan@example.com"}],
        "replyTo": ["Support <support@example.com>"],
        "subject": "Quarterly report ✓", "bodyHtml": "<p>See <b>attached</b></p>", "importance": "high",
        "trackingId": TRACKING, "saveToSentItems": False,
        "attachments": [{"name": "r.pdf", "contentType": "application/pdf",
                         "contentBytes": base64.b64encode(pdf).decode()}],
    }
    r = _send(host, account, body)
    assert r.status_code == 202, r.text
    assert r.json()["trackingId"] == TRACKING
    [sent] = _sent_by_tracking(control, TRACKING)
    m = sent["message"]
    assert m["toRecipients"] == [{"emailAddress": {"address": "ann@example.com", "name": "Ann Example"}},
                                 {"emailAddress": {"address": "bob@example.org", "name": "Bob"}}]
    assert m["ccRecipients"] == [{"emailAddress": {"address": "carol@example.net"}}]
    assert m["bccRecipients"] == [{"emailAddress": {"address": "dan@example.com"}}]
    assert m["replyTo"] == [{"emailAddress": {"address": "support@example.com", "name": "Support"}}]
    assert m["subject"] == "Quarterly report ✓" and m["importance"] == "high"
    assert m["body"]["content"] == "<p>See <b>attached</b></p>" and m["body"]["contentType"].lower() == "html"
    assert sent["saveToSentItems"] is False
    [att] = m["attachments"]
    assert att["name"] == "r.pdf" and att["size"] == len(pdf) and att["sha256"] == hashlib.sha256(pdf).hexdigest()


@pytest.mark.parametrize(("body", "field"), [
    ({}, "to"),
    ({"to": []}, "to"),
    ({"to": ["not-an-address"]}, "to[0]"),
    ({"to": ["a@example.com"], "cc": ["x@@y"]}, "cc[0]"),
    ({"to": ["a@example.com"], "subject": "hi\r\nBcc: evil@example.com"}, "subject"),
    ({"to": [{"address": "a@example.com", "name": "x\nBcc: e@example.com"}]}, "to[0]"),
    ({"to": ["a@example.com"], "importance": "urgent"}, "importance"),
    ({"to": ["a@example.com"], "attachments": [{"name": "a", "contentBytes": "!!!"}]}, "attachments[0].contentBytes"),
    ({"to": ["a@example.com"], "attachments": [{"contentBytes": "AAAA"}]}, "attachments[0].name"),
    ({"to": ["a@example.com"], "trackingId": "has space"}, "trackingId"),
    ({"to": ["a@example.com"], "saveToSentItems": "yes"}, "saveToSentItems"),
    ({"to": ["a@example.com"], "bogus": 1}, "bogus"),
    ([1, 2], "body"),
])
def test_invalid_input_names_the_field(host: Host, account: str, control: Any, body: Any, field: str) -> None:
    before = len(control.sent(USER))
    r = _send(host, account, body)
    assert r.status_code == 400, r.text
    assert r.headers["Content-Type"].startswith("application/problem+json")
    assert r.json()["field"] == field
    assert len(control.sent(USER)) == before


def test_malformed_json_is_400(host: Host, account: str) -> None:
    r = host.api("POST", f"/api/accounts/{account}/send", sub=OWNER, data=b"{not json",
                 headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["field"] == "body"


@pytest.mark.parametrize("size_mb", [5, 40])
def test_large_attachments_use_upload_sessions(host: Host, account: str, control: Any, size_mb: int) -> None:
    data = os.urandom(size_mb * 1024 * 1024)
    tracking = f"big-{size_mb}"
    before = control.counters()["upload_chunks"]
    # multipart/form-data: raw file parts, no base64 overhead
    files = {"message": (None, json.dumps({"to": ["big@example.com"], "subject": "big", "trackingId": tracking}),
                         "application/json"),
             "file": ("data.bin", data, "application/octet-stream")}
    r = host.api("POST", f"/api/accounts/{account}/send", sub=OWNER, files=files)
    assert r.status_code == 202, r.text
    [sent] = _sent_by_tracking(control, tracking)
    assert sent["via"] != "sendMail"
    [att] = sent["message"]["attachments"]
    assert att["size"] == len(data) and att["sha256"] == hashlib.sha256(data).hexdigest()
    assert control.counters()["upload_chunks"] - before >= size_mb // 4


def test_json_base64_attachment_over_3mb_uses_upload_session(host: Host, account: str, control: Any) -> None:
    data = os.urandom(3 * 1024 * 1024 + 10)
    r = _send(host, account, {"to": ["j@example.com"], "trackingId": "json-big",
                              "attachments": [{"name": "x.bin", "contentType": "application/octet-stream",
                                               "contentBytes": base64.b64encode(data).decode()}]})
    assert r.status_code == 202, r.text
    [sent] = _sent_by_tracking(control, "json-big")
    assert sent["message"]["attachments"][0]["sha256"] == hashlib.sha256(data).hexdigest()


def test_total_cap_is_413(host: Host, account: str) -> None:
    # SEND_MAX_TOTAL_BYTES defaults to 100 MB; the host caps requests at 100 MB as Azure does.
    r = host.api("POST", f"/api/accounts/{account}/send", sub=OWNER,
                 files={"message": (None, json.dumps({"to": ["a@example.com"]}), "application/json"),
                        "f": ("huge.bin", b"\0" * (100 * 1024 * 1024 + 1), "application/octet-stream")})
    assert r.status_code == 413
    assert r.headers["Content-Type"].startswith("application/problem+json")


def test_expired_access_token_is_refreshed_transparently(host: Host, account: str, control: Any) -> None:
    control.expire_access_tokens(USER)
    before = host.api("GET", f"/api/accounts/{account}", sub=OWNER).json()["lastRefreshedAt"]
    r = _send(host, account, {"to": ["e@example.com"], "trackingId": "after-expiry"})
    assert r.status_code == 202, r.text
    # This account's grant was refreshed for the send. (The sandbox's counter of refresh grants is global: other
    # accounts of this mailbox refresh too, to read the Sent Items copy their subscriptions are notified of.)
    after = host.api("GET", f"/api/accounts/{account}", sub=OWNER).json()["lastRefreshedAt"]
    assert after is not None and after != before
    assert _sent_by_tracking(control, "after-expiry")


def test_injected_429_is_survived(host: Host, account: str, control: Any) -> None:
    control.inject("/v1.0/me/sendMail", status=429, retry_after=1, count=2)
    r = _send(host, account, {"to": ["t@example.com"], "trackingId": "after-429"})
    assert r.status_code == 202, r.text
    assert len(_sent_by_tracking(control, "after-429")) == 1


def test_persistent_429_becomes_503_with_retry_after(host: Host, account: str, control: Any) -> None:
    control.inject("/v1.0/me/sendMail", status=429, retry_after=120, count=1)
    r = _send(host, account, {"to": ["t@example.com"], "trackingId": "throttled"})
    assert r.status_code == 503 and r.headers["Retry-After"] == "120"
    assert r.json()["code"] == "throttled"
    assert not _sent_by_tracking(control, "throttled")


def test_twenty_concurrent_sends_stay_within_four_in_flight(host: Host, account: str, control: Any) -> None:
    control.inject("/v1.0/me/sendMail", latency_ms=150, count=20)
    results: list[int] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        r = _send(host, account, {"to": ["c@example.com"], "trackingId": f"conc-{i}"})
        with lock:
            results.append(r.status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [202] * 20
    for i in range(20):
        assert len(_sent_by_tracking(control, f"conc-{i}")) == 1
    c = control.counters()
    assert c["max_concurrent_per_mailbox"][USER] <= 4
    assert c["max_concurrent_per_mailbox"][USER] >= 2  # really concurrent


def test_idempotency_same_key_same_body_sends_once(host: Host, account: str, control: Any) -> None:
    body = {"to": ["i@example.com"], "trackingId": "idem-1"}
    h = {"Idempotency-Key": "key-1"}
    first = _send(host, account, body, headers=h)
    second = _send(host, account, body, headers=h)
    assert first.status_code == second.status_code == 202
    assert first.json() == second.json()
    assert len(_sent_by_tracking(control, "idem-1")) == 1
    other = _send(host, account, {"to": ["i@example.com"], "trackingId": "idem-2"}, headers=h)
    assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"
    assert not _sent_by_tracking(control, "idem-2")


def test_idempotency_concurrent_duplicates_send_once(host: Host, account: str, control: Any) -> None:
    control.inject("/v1.0/me/sendMail", latency_ms=300, count=1)
    body = {"to": ["d@example.com"], "trackingId": "idem-conc"}
    out: list[Any] = []
    barrier = threading.Barrier(5)

    def one() -> None:
        barrier.wait()
        out.append(_send(host, account, body, headers={"Idempotency-Key": "conc-key"}))

    threads = [threading.Thread(target=one) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in out] == [202] * 5
    assert len({r.json()["sentAt"] for r in out}) == 1
    assert len(_sent_by_tracking(control, "idem-conc")) == 1


def test_graph_5xx_on_send_is_not_retried(host: Host, account: str, control: Any) -> None:
    control.inject("/v1.0/me/sendMail", status=503, retry_after=7, count=1)
    r = _send(host, account, {"to": ["u@example.com"], "trackingId": "unknown-1"},
              headers={"Idempotency-Key": "unknown-key"})
    assert r.status_code == 503 and r.json()["outcomeUnknown"] is True
    again = _send(host, account, {"to": ["u@example.com"], "trackingId": "unknown-1"},
                  headers={"Idempotency-Key": "unknown-key"})
    assert again.status_code == 409 and again.json()["code"] == "send_outcome_unknown"


def test_revoked_grant_gives_409_reauth_required(host: Host, browser_session: Any, control: Any,
                                                 webhooks: Any) -> None:
    user = "adele@contoso.onmicrosoft.com"
    acc = connect(host, browser_session, sub="owner-revoked", login_hint=user)["result"]["accountId"]
    control.revoke_grants(user)
    control.expire_access_tokens(user)
    r = host.api("POST", f"/api/accounts/{acc}/send", sub="owner-revoked", json={"to": ["x@example.com"]})
    assert r.status_code == 409, r.text
    assert r.json()["code"] == "reauth_required"
    state = host.api("GET", f"/api/accounts/{acc}", sub="owner-revoked").json()
    assert state["status"] == "reauth_required" and state["lastError"]["code"]
    hooks = wait_for(lambda: webhooks.of_type("account.reauth_required", acc), what="reauth webhook")
    from shared.webhooks import verify

    assert verify(host.env["WEBHOOK_SECRET"], hooks[0]["body"], hooks[0]["headers"]["X-Connector-Signature"])
    # Re-connecting recovers it, with the same id, and says so.
    again = connect(host, browser_session, sub="owner-revoked", login_hint=user, accountId=acc)["result"]
    assert again == {"status": "connected", "accountId": acc}
    wait_for(lambda: webhooks.of_type("account.recovered", acc), what="recovered webhook")
    ok = host.api("POST", f"/api/accounts/{acc}/send", sub="owner-revoked", json={"to": ["x@example.com"]})
    assert ok.status_code == 202


def test_send_to_unknown_account_is_404(host: Host) -> None:
    r = host.api("POST", "/api/accounts/acc_doesnotexist/send", sub=OWNER, json={"to": ["a@example.com"]})
    assert r.status_code == 404


def _multipart(message: dict[str, Any], *files: tuple[str, bytes]) -> list[tuple[str, Any]]:
    parts: list[tuple[str, Any]] = [("message", (None, json.dumps(message), "application/json"))]
    parts += [("file", (name, data, "application/octet-stream")) for name, data in files]
    return parts


def test_idempotent_multipart_retry_returns_the_first_result(host: Host, account: str, control: Any) -> None:
    # requests draws a new multipart boundary for every request, as browsers and other clients do:
    # the retry is byte-for-byte different but means the same send.
    key = "mp-" + uuid.uuid4().hex
    msg = {"to": ["idem-mp@example.com"], "subject": "once", "trackingId": "idem-mp-" + key[-8:]}
    data = os.urandom(200_000)
    first = host.api("POST", f"/api/accounts/{account}/send", sub=OWNER, files=_multipart(msg, ("a.bin", data)),
                     headers={"Idempotency-Key": key})
    assert first.status_code == 202, first.text
    again = host.api("POST", f"/api/accounts/{account}/send", sub=OWNER, files=_multipart(msg, ("a.bin", data)),
                     headers={"Idempotency-Key": key})
    assert again.status_code == 202 and again.json() == first.json()
    assert len(_sent_by_tracking(control, msg["trackingId"])) == 1
    other = host.api("POST", f"/api/accounts/{account}/send", sub=OWNER,
                     files=_multipart(msg, ("a.bin", data[:-1] + b"x")), headers={"Idempotency-Key": key})
    assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"


def test_small_files_that_do_not_fit_inline_are_posted_to_the_draft(host: Host, account: str, control: Any) -> None:
    # Three 1.5 MB files: too much for one 4 MB request, too small for upload sessions (Graph
    # refuses those under 3 MB), so each is POSTed to the draft's attachments.
    files = [(f"part{i}.bin", os.urandom(1_500_000)) for i in range(3)]
    r = host.api("POST", f"/api/accounts/{account}/send", sub=OWNER,
                 files=_multipart({"to": ["parts@example.com"], "trackingId": "three-parts"}, *files))
    assert r.status_code == 202, r.text
    [sent] = _sent_by_tracking(control, "three-parts")
    got = {a["name"]: a["sha256"] for a in sent["message"]["attachments"]}
    assert got == {name: hashlib.sha256(data).hexdigest() for name, data in files}


def test_a_5xx_on_a_draft_attachment_is_not_retried_blindly_and_nothing_is_sent(host: Host, account: str,
                                                                               control: Any) -> None:
    """A 5xx on POST …/attachments may have landed: retrying it could attach the file twice. The draft is
    discarded, nothing was sent, so the answer is a plain 503 the caller may retry with the same key."""
    files = [(f"p{i}.bin", os.urandom(1_500_000)) for i in range(3)]
    body = {"to": ["parts@example.com"], "trackingId": "attach-503"}
    control.inject("/v1.0/me/messages/*/attachments", status=503, retry_after=3, count=1, user=USER)
    first = host.api("POST", f"/api/accounts/{account}/send", sub=OWNER, files=_multipart(body, *files),
                     headers={"Idempotency-Key": "attach-503"})
    assert first.status_code == 503, first.text
    assert first.json()["code"] == "upstream_unavailable" and "outcomeUnknown" not in first.json()
    assert _sent_by_tracking(control, "attach-503") == []
    again = host.api("POST", f"/api/accounts/{account}/send", sub=OWNER, files=_multipart(body, *files),
                     headers={"Idempotency-Key": "attach-503"})
    assert again.status_code == 202, again.text
    [sent] = _sent_by_tracking(control, "attach-503")
    assert sorted(a["name"] for a in sent["message"]["attachments"]) == ["p0.bin", "p1.bin", "p2.bin"]


def test_save_to_sent_items_false_is_refused_where_graph_cannot_honour_it(host: Host, account: str,
                                                                           control: Any) -> None:
    before = len(control.sent(USER))
    r = host.api("POST", f"/api/accounts/{account}/send", sub=OWNER, files=_multipart(
        {"to": ["x@example.com"], "saveToSentItems": False}, ("big.bin", os.urandom(3_200_000))))
    assert r.status_code == 400 and r.json()["field"] == "saveToSentItems", r.text
    assert len(control.sent(USER)) == before


def test_non_latin_body_is_measured_in_utf8(host: Host, account: str, control: Any) -> None:
    # 1.1 M CJK characters are 3.3 MB of UTF-8: one Graph request can carry them (\\u escapes would not).
    text = "郵" * 1_100_000
    r = _send(host, account, {"to": ["cjk@example.com"], "bodyText": text, "trackingId": "cjk-body"})
    assert r.status_code == 202, r.text[:300]
    [sent] = _sent_by_tracking(control, "cjk-body")
    assert sent["message"]["body"]["content"] == text
    too_big = _send(host, account, {"to": ["cjk@example.com"], "bodyText": "郵" * 1_500_000})
    assert too_big.status_code == 413 and too_big.json()["field"] == "bodyText", too_big.text[:300]


def test_throttled_upload_chunk_is_sent_again_after_retry_after(host: Host, account: str, control: Any) -> None:
    data = os.urandom(6 * 1024 * 1024)
    control.inject("/upload/AttachmentSessions", status=429, retry_after=1, count=1, user=USER)
    before = control.counters()["upload_chunks"]
    r = host.api("POST", f"/api/accounts/{account}/send", sub=OWNER,
                 files=_multipart({"to": ["up429@example.com"], "trackingId": "upload-429"}, ("d.bin", data)))
    assert r.status_code == 202, r.text
    [sent] = _sent_by_tracking(control, "upload-429")
    assert sent["message"]["attachments"][0]["sha256"] == hashlib.sha256(data).hexdigest()
    assert control.counters()["upload_chunks"] - before == 2  # 6 MB in two accepted chunks after the refusal


@pytest.mark.parametrize(("status", "graph_code", "code"), [
    (403, "ErrorSendAsDenied", "send_as_denied"),
    (400, "ErrorInvalidRecipients", "invalid_recipients"),
    (413, "ErrorMessageSizeExceeded", "message_too_large"),
])
def test_graph_send_errors_are_mapped_with_a_hint(host: Host, account: str, control: Any, status: int,
                                                  graph_code: str, code: str) -> None:
    control.inject("/v1.0/me/sendMail", status=status, count=1, user=USER,
                   body={"code": graph_code, "message": f"{graph_code} from Exchange."})  # wrapped in {"error":…}
    r = _send(host, account, {"to": ["mapped@example.com"]})
    assert r.status_code == status and r.headers["Content-Type"].startswith("application/problem+json")
    p = r.json()
    assert p["code"] == code and p["hint"] and p["microsoft"]["error"] == graph_code
    assert p["microsoft"].get("requestId")  # what Microsoft support asks for


def test_a_send_left_pending_by_a_lost_process_is_not_sent_again(host: Host, account: str, control: Any) -> None:
    """A record still 'pending' long after its send started (the process died, or the result write failed):
    the message may have gone out, so the key answers send_outcome_unknown instead of sending again."""
    import datetime as dt

    from azure.data.tables import TableClient

    from shared.accounts import iso, owner_partition

    key = "stale-" + uuid.uuid4().hex
    body = {"to": ["stale@example.com"], "subject": "maybe sent"}
    fingerprint_of = _fingerprint(body)
    t = TableClient.from_connection_string(host.env["AzureWebJobsStorage"], "idempotency")
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=20)
    t.create_entity({"PartitionKey": owner_partition(OWNER) + "-" + account,
                     "RowKey": hashlib.sha256(key.encode()).hexdigest(), "bodyHash": fingerprint_of,
                     "state": "pending", "createdAt": iso(long_ago), "expiresAt": iso(long_ago + dt.timedelta(hours=24))})
    before = len(control.sent(USER))
    r = _send(host, account, body, headers={"Idempotency-Key": key})
    assert r.status_code == 409 and r.json()["code"] == "send_outcome_unknown", r.text
    assert len(control.sent(USER)) == before


def _fingerprint(body: dict[str, Any]) -> str:
    from shared.mail import request_fingerprint

    return request_fingerprint(body, [])
