"""azure-core's private modules are used in one adapter (shared/_azure_core.py): an upgrade that moves them
fails here, at import, rather than on a storage request."""

from __future__ import annotations

import http.client
import io
import socket

from azure.core.rest import HttpRequest

from shared._azure_core import is_rest_request, rest_response


def test_the_private_imports_resolve_and_behave() -> None:
    assert is_rest_request(HttpRequest("GET", "http://127.0.0.1/x"))
    assert not is_rest_request(object())


def test_an_http_client_answer_becomes_a_read_rest_response() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nETag: W/\"1\"\r\nContent-Length: 2\r\n\r\n{}"

    class _Sock(socket.socket):
        def makefile(self, *args: object, **kwargs: object) -> io.BufferedReader:  # type: ignore[override]
            return io.BufferedReader(io.BytesIO(raw))

    answer = http.client.HTTPResponse(_Sock())
    answer.begin()
    response = rest_response(HttpRequest("GET", "http://127.0.0.1/x"), answer)
    assert response.status_code == 200 and response.headers["ETag"] == 'W/"1"' and response.content == b"{}"
