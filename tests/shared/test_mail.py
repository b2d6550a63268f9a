"""Pure logic of shared.mail: validation, the attachment plan, the idempotency fingerprint."""

from __future__ import annotations

import base64
import io

import pytest

from shared.errors import PayloadTooLargeError, ValidationError
from shared.mail import (
    GRAPH_REQUEST_MAX,
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
