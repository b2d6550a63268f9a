"""shared._http: explicit trust (certifi + extra CA, env ignored), default timeout, pooling."""

from __future__ import annotations

import threading
import time

import certifi
import pytest
import requests
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from devstack.certs import ensure_certs
from shared import _http
from shared._http import TimeoutSession, ca_bundle_path, new_session
from shared.errors import ConfigurationError


class _Quiet(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):
        pass


@pytest.fixture(scope="module")
def certs():
    return ensure_certs()


@pytest.fixture(scope="module")
def server(certs):
    release = threading.Event()

    def app(environ, start_response):
        req = Request(environ)
        if req.path == "/hang":
            release.wait(30)  # never answers while the test is waiting for it
        return Response("ok")(environ, start_response)

    srv = make_server(
        "127.0.0.1", 0, app, threaded=True,
        ssl_context=(str(certs.server_cert), str(certs.server_key)), request_handler=_Quiet,
    )
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{srv.server_port}"
    release.set()
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def test_plain_session_trusts_requests_ca_bundle_and_fails(server, monkeypatch):
    # requests lets REQUESTS_CA_BUNDLE override verify when trust_env is on: the dev CA is not in it.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    with requests.Session() as plain, pytest.raises(requests.exceptions.SSLError):
        plain.get(server + "/", timeout=5)


def test_new_session_trusts_extra_ca_despite_env(server, certs, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # would break the call if honoured
    with new_session(str(certs.ca_cert)) as session:
        assert session.trust_env is False
        r = session.get(server + "/")
        assert r.status_code == 200 and r.text == "ok"


def test_env_ca_bundle_cannot_widen_trust(server, certs, monkeypatch):
    # Without MS_CA_BUNDLE only the public roots are trusted, whatever REQUESTS_CA_BUNDLE says.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certs.ca_cert))
    with new_session(None) as session, pytest.raises(requests.exceptions.SSLError):
        session.get(server + "/")


def test_combined_bundle_keeps_public_roots_and_is_cached(certs):
    path = ca_bundle_path(str(certs.ca_cert))
    assert path == ca_bundle_path(certs.ca_cert)  # same file for the same CA, str or Path
    content = open(path, "rb").read()
    public = open(certifi.where(), "rb").read()
    assert public.rstrip(b"\n") in content
    assert open(certs.ca_cert, "rb").read().strip() in content
    assert ca_bundle_path(None) == certifi.where()


def test_bad_extra_ca_is_a_configuration_error(tmp_path):
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigurationError) as ei:
        ca_bundle_path(str(missing))
    assert ei.value.setting == "MS_CA_BUNDLE"
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ConfigurationError):
        ca_bundle_path(str(junk))


def test_timeout_keyword_applies_to_every_request(server, certs):
    with new_session(str(certs.ca_cert), timeout=0.3) as session:
        assert isinstance(session, TimeoutSession)
        started = time.monotonic()
        with pytest.raises(requests.exceptions.Timeout):
            session.get(server + "/hang")
        assert time.monotonic() - started < 5


def test_module_default_timeout_is_read_at_call_time(server, certs, monkeypatch):
    monkeypatch.setattr(_http, "DEFAULT_TIMEOUT", 0.3)
    with new_session(str(certs.ca_cert)) as session:
        assert session.default_timeout == 0.3
        with pytest.raises(requests.exceptions.Timeout):
            session.get(server + "/hang")


def test_default_timeout_is_5_30_and_explicit_timeout_wins(server, certs):
    with new_session(str(certs.ca_cert)) as session:
        assert session.default_timeout == (5, 30)
        started = time.monotonic()
        with pytest.raises(requests.exceptions.Timeout):
            session.get(server + "/hang", timeout=0.3)
        assert time.monotonic() - started < 5


def test_pool_size(certs):
    with new_session(str(certs.ca_cert), pool_size=7) as session:
        adapter = session.get_adapter("https://example.invalid/")
        assert adapter._pool_maxsize == 7 and adapter._pool_connections == 7
        assert adapter.max_retries.total == 0
