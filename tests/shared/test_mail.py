"""Pure logic of shared.mail: validation, the attachment plan, the idempotency fingerprint."""

from __future__ import annotations

import base64
import io

import pytest

from shared.errors import PayloadTooLargeError, ValidationError
from shared.mail import (
    GRAPH_REQUEST_MAX,
    UPLOAD_CHUNK,
    UPLOAD_SESSION_MIN,
    Attachment,
    dumps,
    file_attachment,
    message_payload,
    parse_send_request,
    plan_attachments,
    request_fingerprint,
)


def _req(**body: object) -> object:
    return parse_send_request({"to": ["a@example.com"], **body}, max_total=200 * 1024 * 1024)


def test_configured_total_cap_is_413_naming_attachments() -> None:
    files = [Attachment("a.bin", "application/octet-stream", b"x" * 600), Attachment("b.bin", "text/plain", b"y" * 500)]
    with pytest.raises(PayloadTooLargeError) as e:
        parse_send_request({"to": ["a@example.com"]}, files=files, max_total=1000)
    assert e.value.status == 413 and e.value.extra["field"] == "attachments"
    assert parse_send_request({"to": ["a@example.com"]}, files=files, max_total=1100).attachment_bytes == 1100


@pytest.mark.parametrize(("field", "value"), [
    ("subject", "Hi\r\nBcc: victim@example.com"),
    ("to", ["Eve\n <eve@example.com>"]),
    ("to", ["not-an-address"]),
    ("importance", "urgent"),
])
def test_header_injection_and_bad_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as e:
        _req(**{field: value})
    assert e.value.extra["field"].startswith(field)


def test_plan_keeps_every_graph_request_under_4mb() -> None:
    sizes = [10_000, 1_500_000, 1_500_000, 1_500_000, 2_999_999, UPLOAD_SESSION_MIN, 40 * 1024 * 1024]
    req = _req(attachments=[{"name": f"f{i}", "contentType": "application/octet-stream",
                             "contentBytes": base64.b64encode(b"\0" * n).decode()} for i, n in enumerate(sizes)])
    plan = plan_attachments(req)  # type: ignore[arg-type]
    assert sorted(a.size for a in plan.sessions) == [UPLOAD_SESSION_MIN, 40 * 1024 * 1024]
    assert all(a.size < UPLOAD_SESSION_MIN for a in plan.inline + plan.posted)
    assert len(dumps(message_payload(req, inline=plan.inline))) < GRAPH_REQUEST_MAX  # type: ignore[arg-type]
    for a in plan.posted:
        assert len(dumps(file_attachment(a))) < GRAPH_REQUEST_MAX


def test_fingerprint_ignores_wire_form_but_not_content() -> None:
    body = {"to": ["a@example.com"], "subject": "x"}
    in_memory = Attachment("r.pdf", "application/pdf", b"%PDF-1.7 report")
    spooled = Attachment("r.pdf", "application/pdf", io.BytesIO(b"%PDF-1.7 report"))
    assert request_fingerprint(body, [in_memory]) == request_fingerprint(dict(reversed(body.items())), [spooled])
    assert request_fingerprint(body, [in_memory]) != request_fingerprint(body, [Attachment("r.pdf", "application/pdf",
                                                                                          b"%PDF-1.7 rep0rt")])
    assert request_fingerprint(body, []) != request_fingerprint({**body, "subject": "y"}, [])


def test_spooled_attachment_is_read_in_chunks() -> None:
    data = bytes(range(256)) * 40_000
    a = Attachment("d.bin", "application/octet-stream", io.BytesIO(data))
    pieces = list(a.chunks(1_000_000))
    assert a.size == len(data) and [off for off, _ in pieces] == list(range(0, len(data), 1_000_000))
    assert b"".join(bytes(p) for _, p in pieces) == data


# -- shared.send through a real GraphClient over a scripted transport (see test_graph) ----------

def _big_send(size: int = UPLOAD_CHUNK + 1000) -> tuple[object, bytes]:
    data = bytes(i % 251 for i in range(size))
    req = parse_send_request({"to": ["a@example.com"], "subject": "big"}, max_total=200 * 1024 * 1024,
                             files=[Attachment("big.bin", "application/octet-stream", data)])
    return req, data


def test_large_attachment_goes_through_upload_range_with_its_throttle_handling() -> None:
    from shared.send import send
    from tests.shared.test_graph import UPLOAD_URL, FakeToken, FakeTransport, graph_error, make_client, reply

    req, data = _big_send()
    fake = FakeTransport(
        reply(201, {"id": "draft-1"}),  # POST me/messages
        reply(201, {"uploadUrl": UPLOAD_URL}),  # createUploadSession
        graph_error(429, "TooManyRequests", {"Retry-After": "2"}),  # first chunk refused...
        reply(200, {"nextExpectedRanges": [f"{UPLOAD_CHUNK}-"]}),  # ...and sent again
        reply(201),  # last chunk
        reply(202),  # POST send
    )
    client, t = make_client(fake)
    out = send(client, FakeToken(), "mb-1", req, context={"scopes": "Mail.Send"})  # type: ignore[arg-type]
    assert out["status"] == "sent" and t.sleeps == [2.0]
    puts = [r for r in fake.requests if r.method == "PUT"]
    assert [r.headers["Content-Range"] for r in puts] == [
        f"bytes 0-{UPLOAD_CHUNK - 1}/{len(data)}", f"bytes 0-{UPLOAD_CHUNK - 1}/{len(data)}",
        f"bytes {UPLOAD_CHUNK}-{len(data) - 1}/{len(data)}"]
    assert all("Authorization" not in r.headers for r in puts)
    assert b"".join(bytes(r.body) for r in puts[1:]) == data  # type: ignore[arg-type]
    assert fake.requests[-1].url.endswith("/me/messages/draft-1/send")  # type: ignore[union-attr]
    assert all(r.headers["Authorization"] == "Bearer access-1" for r in fake.requests if r.method == "POST")


def test_expired_upload_session_removes_the_draft_and_is_not_a_404() -> None:
    from shared.errors import MicrosoftError
    from shared.send import send
    from tests.shared.test_graph import UPLOAD_URL, FakeToken, FakeTransport, graph_error, make_client, reply

    req, _ = _big_send()
    fake = FakeTransport(reply(201, {"id": "draft-2"}), reply(201, {"uploadUrl": UPLOAD_URL}),
                         graph_error(404, "ErrorItemNotFound"), reply(204))
    client, _ = make_client(fake)
    with pytest.raises(MicrosoftError) as e:
        send(client, FakeToken(), "mb-1", req, context={})  # type: ignore[arg-type]
    assert e.value.status == 502 and e.value.code == "upload_session_expired"
    assert [r.method for r in fake.requests] == ["POST", "POST", "PUT", "DELETE"]
    assert fake.requests[-1].url.endswith("/me/messages/draft-2")  # type: ignore[union-attr]


def test_a_vanished_draft_is_not_the_callers_404() -> None:
    from shared.errors import MicrosoftError
    from shared.send import send
    from tests.shared.test_graph import FakeToken, FakeTransport, graph_error, make_client, reply

    files = [Attachment(f"p{i}.bin", "application/octet-stream", b"\0" * 1_500_000) for i in range(3)]
    req = parse_send_request({"to": ["a@example.com"]}, files=files, max_total=200 * 1024 * 1024)
    fake = FakeTransport(reply(201, {"id": "draft-3"}), graph_error(404, "ErrorItemNotFound"), reply(204))
    client, _ = make_client(fake)
    with pytest.raises(MicrosoftError) as e:
        send(client, FakeToken(), "mb-1", req, context={})
    assert (e.value.status, e.value.code) == (502, "draft_not_found")
    assert [r.method for r in fake.requests] == ["POST", "POST", "DELETE"]
