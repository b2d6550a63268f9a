"""Reading mail and diagnosing mailboxes end to end (dev host + Azurite + sandbox)."""

from __future__ import annotations

import base64
import os
from typing import Any

import pytest

from tests.conftest import Host, connect

OWNER = "owner-read"
USER = "adele@contoso.onmicrosoft.com"


@pytest.fixture(scope="module")
def account(host: Host, browser_session: Any) -> str:
    return str(connect(host, browser_session, sub=OWNER, login_hint=USER)["result"]["accountId"])


def _get(host: Host, path: str, sub: str = OWNER, **params: Any) -> Any:
    return host.api("GET", path, sub=sub, params=params)


def test_paging_30_messages_with_top_10(host: Host, account: str, control: Any) -> None:
    seeded = set(control.seed_messages(USER, [{"subject": f"page-test {i}"} for i in range(30)], folder="archive"))
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"folder": "archive", "top": 10}
        if cursor:
            params["cursor"] = cursor
        r = _get(host, f"/api/accounts/{account}/messages", **params)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["messages"]) <= 10
        seen += [m["id"] for m in body["messages"]]
        pages += 1
        cursor = body["nextCursor"]
        if not cursor:
            break
        assert "http" not in cursor and "graph" not in cursor.lower()  # opaque, never a Graph URL
    assert len(seen) == len(set(seen))
    assert seeded <= set(seen) and pages >= 3
    m = body["messages"][0] if body["messages"] else None
    if m:
        assert set(m) == {"id", "subject", "from", "toRecipients", "receivedDateTime", "isRead", "hasAttachments",
                          "bodyPreview", "webLink", "conversationId"}


def test_tampered_and_foreign_cursors_are_rejected(host: Host, account: str, browser_session: Any,
                                                   control: Any) -> None:
    control.seed_messages(USER, 12, folder="inbox")
    first = _get(host, f"/api/accounts/{account}/messages", top=5).json()
    cursor = first["nextCursor"]
    assert cursor
    tampered = cursor[:-3] + ("AAA" if cursor[-3:] != "AAA" else "BBB")
    r = _get(host, f"/api/accounts/{account}/messages", cursor=tampered)
    assert r.status_code == 400 and r.json()["field"] == "cursor"
    other = connect(host, browser_session, sub="owner-read-2", login_hint=USER)["result"]["accountId"]
    r = _get(host, f"/api/accounts/{other}/messages", sub="owner-read-2", cursor=cursor)
    assert r.status_code == 400 and r.json()["field"] == "cursor"
    assert _get(host, f"/api/accounts/{account}/messages", cursor=cursor).status_code == 200


def test_unread_only_and_bad_query(host: Host, account: str, control: Any) -> None:
    control.seed_messages(USER, [{"subject": "read one", "isRead": True}, {"subject": "unread one"}],
                          folder="junkemail")
    r = _get(host, f"/api/accounts/{account}/messages", folder="junkemail", unreadOnly="true")
    subjects = [m["subject"] for m in r.json()["messages"]]
    assert "unread one" in subjects and "read one" not in subjects
    for params, field in (({"top": 0}, "top"), ({"top": 101}, "top"), ({"top": "x"}, "top"),
                          ({"unreadOnly": "maybe"}, "unreadOnly"), ({"folder": "../../me"}, "folder")):
        r = _get(host, f"/api/accounts/{account}/messages", **params)
        assert r.status_code == 400 and r.json()["field"] == field, (params, r.text)


def test_message_and_attachment_are_fetched_intact(host: Host, account: str, control: Any) -> None:
    data = os.urandom(70_000)
    [mid] = control.seed_messages(USER, [{
        "subject": "with attachment", "body": {"contentType": "html", "content": "<p>Hello <b>there</b></p>"},
        "ccRecipients": [{"emailAddress": {"address": "cc@example.com", "name": "CC"}}],
        "attachments": [{"name": "report.pdf", "contentType": "application/pdf",
                         "contentBytes": base64.b64encode(data).decode()}]}])
    r = _get(host, f"/api/accounts/{account}/messages/{mid}")
    assert r.status_code == 200, r.text
    msg = r.json()
    assert msg["subject"] == "with attachment"
    assert msg["body"] == {"contentType": "html", "content": "<p>Hello <b>there</b></p>"}
    assert msg["ccRecipients"] == [{"address": "cc@example.com", "name": "CC"}]
    [att] = msg["attachments"]
    assert att["name"] == "report.pdf" and att["size"] == len(data) and att["contentType"] == "application/pdf"
    raw = _get(host, f"/api/accounts/{account}/messages/{mid}/attachments/{att['id']}")
    assert raw.status_code == 200 and raw.content == data
    assert raw.headers["Content-Type"] == "application/pdf"
    assert raw.headers["Content-Disposition"] == 'attachment; filename="report.pdf"'
    # A sender-chosen name and type stay inside their headers; non-Latin names survive (RFC 8187).
    [mid2] = control.seed_messages(USER, [{"subject": "odd name", "attachments": [
        {"name": 'Rapport été "final"; x=1.pdf', "contentType": "not a mime type",
         "contentBytes": base64.b64encode(b"hi").decode()}]}])
    [att2] = _get(host, f"/api/accounts/{account}/messages/{mid2}").json()["attachments"]
    raw2 = _get(host, f"/api/accounts/{account}/messages/{mid2}/attachments/{att2['id']}")
    assert raw2.status_code == 200 and raw2.content == b"hi"
    assert raw2.headers["Content-Type"] == "application/octet-stream"
    disposition = raw2.headers["Content-Disposition"]
    assert disposition.startswith('attachment; filename="Rapport t final x1.pdf"; '), disposition
    assert "filename*=UTF-8''Rapport%20%C3%A9t%C3%A9%20%22final%22%3B%20x%3D1.pdf" in disposition
    assert _get(host, f"/api/accounts/{account}/messages/AAMkAGnotthere123456789").status_code == 404
    assert _get(host, f"/api/accounts/{account}/messages/{mid}", sub="owner-stranger").status_code == 404


def test_folders(host: Host, account: str) -> None:
    r = _get(host, f"/api/accounts/{account}/folders")
    names = {f["displayName"] for f in r.json()["folders"]}
    assert {"Inbox", "Sent Items", "Drafts"} <= names


def test_expired_token_on_read_is_refreshed(host: Host, account: str, control: Any) -> None:
    control.expire_access_tokens(USER)
    assert _get(host, f"/api/accounts/{account}/messages", top=1).status_code == 200


def _check(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in report["checks"] if c["name"] == name)


def test_diagnose_healthy_work_account(host: Host, account: str) -> None:
    r = _get(host, f"/api/accounts/{account}/diagnose")
    assert r.status_code == 200, r.text
    rep = r.json()
    assert rep["healthy"] is True, rep
    assert "Work or school" in _check(rep, "accountType")["detail"]
    assert "access token (scp)" in _check(rep, "scope:send mail")["detail"]
    assert all(set(c) == {"name", "ok", "detail", "hint"} for c in rep["checks"])


def test_diagnose_mailbox_less_user_names_the_fix(host: Host, browser_session: Any) -> None:
    out = connect(host, browser_session, sub="owner-nomb", login_hint="nomailbox@contoso.onmicrosoft.com")
    acc = out["result"]["accountId"]
    rep = _get(host, f"/api/accounts/{acc}/diagnose", sub="owner-nomb").json()
    mb = _check(rep, "mailbox")
    assert rep["healthy"] is False and mb["ok"] is False
    assert "MailboxNotEnabledForRESTAPI" in mb["detail"] or "mailbox_not_available" in mb["detail"]
    assert "licence" in mb["hint"]
    assert _check(rep, "profile")["ok"] is True
    r = _get(host, f"/api/accounts/{acc}/messages", sub="owner-nomb")
    assert r.status_code == 409 and r.json()["code"] == "mailbox_not_available"
    assert r.json()["microsoft"]["error"] == "MailboxNotEnabledForRESTAPI"


def test_diagnose_reports_missing_mail_send(host: Host, browser_session: Any) -> None:
    out = connect(host, browser_session, sub="owner-nosend", login_hint="nosend@contoso.onmicrosoft.com")
    acc = out["result"]["accountId"]
    rep = _get(host, f"/api/accounts/{acc}/diagnose", sub="owner-nosend").json()
    send = _check(rep, "sendPermission")
    assert send["ok"] is False and "adminconsent" in send["hint"]
    assert _check(rep, "scope:send mail")["ok"] is False
    assert _check(rep, "scope:read mail")["ok"] is True
    r = host.api("POST", f"/api/accounts/{acc}/send", sub="owner-nosend", json={"to": ["a@example.com"]})
    assert r.status_code == 403 and r.json()["code"] == "mail_access_denied"


def test_diagnose_personal_account(host: Host, browser_session: Any) -> None:
    out = connect(host, browser_session, sub="owner-diag-personal", login_hint="pat@outlook.com")
    acc = out["result"]["accountId"]
    rep = _get(host, f"/api/accounts/{acc}/diagnose", sub="owner-diag-personal").json()
    assert "Personal Microsoft account" in _check(rep, "accountType")["detail"]
    assert "opaque" in _check(rep, "scope:read mail")["detail"]
    assert rep["healthy"] is True, rep
