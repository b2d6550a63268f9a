"""The sandbox HTTPS server: Flask app factory, ``SandboxServer`` and the CLI entry point."""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import threading
from collections.abc import Sequence
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from devstack import env_port, port_number
from devstack.certs import ensure_certs

from . import control, delta, graph, identity, subscriptions
from .state import ClientApp, SandboxState
from .tokens import SigningKey
from .users import TEST_USERS

DEFAULT_CLIENT_ID = "5a1b0c3d-0000-4000-8000-00000000c0de"
DEFAULT_CLIENT_SECRET = "sandbox-client-secret-not-a-real-secret"
DEFAULT_REDIRECT_URIS = (
    "http://localhost:7071/api/connect/microsoft/callback",
    "http://127.0.0.1:7071/api/connect/microsoft/callback",
)
DEFAULT_APP_NAME = "Outlook connector (sandbox)"


class PortInUseError(OSError):
    pass


def create_app(state: SandboxState, key: SigningKey) -> Flask:
    app = Flask("devstack.sandbox")
    app.extensions["sandbox"] = {"state": state, "key": key}
    state.notifier.signing_key = key  # signs rich notifications' validation tokens
    app.config["MAX_CONTENT_LENGTH"] = 160 * 1024 * 1024
    app.register_blueprint(control.bp)
    app.register_blueprint(subscriptions.bp)
    app.register_blueprint(delta.bp)
    app.register_blueprint(graph.bp)
    app.register_blueprint(identity.bp)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        # Never an HTML stack trace: Graph-style JSON for anything the routes do not know.
        code = exc.code or 500
        name = {404: "NotFound", 405: "MethodNotAllowed", 413: "RequestEntityTooLarge"}.get(code, "BadRequest")
        return jsonify({"error": {"code": name, "message": exc.description or exc.name}}), code

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        app.logger.error("sandbox internal error on %s %s: %r", request.method, request.path, exc)
        return jsonify({"error": {"code": "InternalServerError", "message": "The sandbox hit an internal error."}}), 500

    @app.after_request
    def _drain_request_body(resp: Response) -> Response:
        # A refusal (413, 401 …) may come before the body was read. Read the rest (at most
        # MAX_CONTENT_LENGTH) so the client, which sends its whole body first, gets the answer and
        # the keep-alive connection stays usable, as with Microsoft's front ends.
        try:
            request.stream.exhaust()  # type: ignore[attr-defined]
        except Exception:
            pass
        return resp

    return app


_REDACT = re.compile(r"/upload/AttachmentSessions/[^/?]+")


SERVER_THREADS = 128  # concurrent requests (idle keep-alive connections hold no thread)


class _RequestLog:
    """``--verbose``: method, path (no query string: it may carry codes or tokens) and status."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        def logging_start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            path = _REDACT.sub("/upload/AttachmentSessions/…", environ.get("PATH_INFO", ""))
            sys.stderr.write(f"sandbox: {environ.get('REQUEST_METHOD')} {path} {status.split(' ', 1)[0]}\n")
            return start_response(status, headers, exc_info)

        return self.app(environ, logging_start_response)


class SandboxServer:
    """A local, faithful fake of login.microsoftonline.com and graph.microsoft.com over HTTPS."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        redirect_uris: Sequence[str] = DEFAULT_REDIRECT_URIS,
        cert_dir: str | os.PathLike[str] | None = None,
        verbose: bool = False,
        allow_http_notifications: bool | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._cert_dir = cert_dir
        self._verbose = verbose
        self.key = SigningKey()
        self.state = SandboxState(
            ClientApp(client_id, DEFAULT_APP_NAME, list(redirect_uris), {client_secret: True})
        )
        if allow_http_notifications is not None:  # else SANDBOX_ALLOW_HTTP_NOTIFICATIONS (README: notifications)
            self.state.allow_http_default = allow_http_notifications
            self.state.reset()
        self.app = create_app(self.state, self.key)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.ca_path = ""

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def start(self) -> SandboxServer:
        """Serve over HTTPS with keep-alive connections (cheroot: a threaded WSGI server with a TLS adapter).

        Microsoft's endpoints keep connections open; Werkzeug's development server closes every one,
        which would make each token request pay a new TCP + TLS handshake here and not in production.
        """
        if self._server is not None:
            return self
        from cheroot import wsgi
        from cheroot.ssl.builtin import BuiltinSSLAdapter

        certs = ensure_certs(os.fspath(self._cert_dir) if self._cert_dir is not None else None)
        self.ca_path = str(certs.ca_cert)
        port = self.port
        app = _RequestLog(self.app) if self._verbose else self.app
        server = wsgi.Server((self.host, port), app, numthreads=SERVER_THREADS, server_name="sandbox",
                             request_queue_size=256, timeout=30, accepted_queue_timeout=30)
        server.ssl_adapter = BuiltinSSLAdapter(str(certs.server_cert), str(certs.server_key))
        server.keep_alive_conn_limit = 1024  # cheroot keeps only 10 idle connections open by default
        try:
            server.prepare()
        except OSError as exc:
            # cheroot reports a taken port as "No socket could be created -- (…: [Errno 98] …)"
            if exc.errno == errno.EADDRINUSE or f"[Errno {errno.EADDRINUSE}]" in str(exc):
                raise PortInUseError(exc.errno, f"port {port} on {self.host} is already in use") from None
            raise
        self._server = server
        self.port = int(server.bind_addr[1])
        self._thread = threading.Thread(target=server.serve, name="sandbox-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def serve_forever(self) -> None:
        """Block until Ctrl-C (the server itself runs in its daemon thread)."""
        assert self._thread is not None
        try:
            while self._thread.is_alive():
                self._thread.join(timeout=0.5)
        except KeyboardInterrupt:
            pass

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.sandbox",
                                     description="Local fake of login.microsoftonline.com and graph.microsoft.com.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port_number, default=env_port("SANDBOX_PORT", 8443),
                        help="HTTPS port (SANDBOX_PORT, 8443)")
    parser.add_argument("--quiet", action="store_true", help="do not log requests")
    args = parser.parse_args(argv)
    redirect_env = os.environ.get("SANDBOX_REDIRECT_URIS", "")
    redirect_uris = [u.strip() for u in redirect_env.split(",") if u.strip()] or list(DEFAULT_REDIRECT_URIS)
    client_id = os.environ.get("MS_CLIENT_ID") or DEFAULT_CLIENT_ID
    client_secret = os.environ.get("MS_CLIENT_SECRET") or DEFAULT_CLIENT_SECRET
    server = SandboxServer(args.host, args.port, client_id=client_id, client_secret=client_secret,
                           redirect_uris=redirect_uris, verbose=not args.quiet)
    try:
        server.start()
    except PortInUseError:
        print(f"sandbox: port {args.port} is already in use on {args.host}; stop the other process or pass "
              "--port / set SANDBOX_PORT", file=sys.stderr)
        return 1
    except (OSError, OverflowError) as exc:  # gaierror for an unknown --host is an OSError
        print(f"sandbox: cannot listen on {args.host}:{args.port}: {getattr(exc, 'strerror', None) or exc}",
              file=sys.stderr)
        return 1
    print(f"Microsoft sandbox listening on {server.url}")
    print(f"  MS_AUTHORITY_HOST={server.url}")
    print(f"  GRAPH_BASE_URL={server.url}/v1.0")
    print(f"  MS_CA_BUNDLE={server.ca_path}")
    print(f"  MS_CLIENT_ID={client_id}")
    if client_secret == DEFAULT_CLIENT_SECRET:
        print(f"  MS_CLIENT_SECRET={client_secret}   (the documented dev secret)")
    else:
        print("  MS_CLIENT_SECRET=<from your environment>")
    print(f"  redirect URIs: {', '.join(redirect_uris)}")
    print("  control API: " + server.url + "/_sandbox/  (see devstack/sandbox/README.md)")
    print("Test users:")
    for u in TEST_USERS.values():
        print(f"  {u.upn:<36} {u.description}")
    print("Press Ctrl-C to stop.", flush=True)
    try:
        server.serve_forever()
    finally:
        server.stop()
    return 0
