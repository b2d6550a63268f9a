"""The sandbox HTTPS server: Flask app factory, ``SandboxServer`` and the CLI entry point."""

from __future__ import annotations

import argparse
import errno
import os
import re
import socket
import sys
import threading
from collections.abc import Sequence
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from devstack import env_port, port_number
from devstack.certs import ensure_certs

from . import control, graph, identity
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
    app.config["MAX_CONTENT_LENGTH"] = 160 * 1024 * 1024
    app.register_blueprint(control.bp)
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

    return app


_REDACT = re.compile(r"/upload/AttachmentSessions/[^/?]+")


class _QuietHandler(WSGIRequestHandler):
    """Logs method, path (no query string: it may carry codes/tokens) and status, or nothing."""

    verbose = False

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if self.verbose:
            path = _REDACT.sub("/upload/AttachmentSessions/…", self.path.split("?", 1)[0])
            sys.stderr.write(f"sandbox: {self.command} {path} {code}\n")

    def log_error(self, format: str, *args: Any) -> None:
        if self.verbose:
            super().log_error(format, *args)


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
    ) -> None:
        self.host = host
        self.port = port
        self._cert_dir = cert_dir
        self._verbose = verbose
        self.key = SigningKey()
        self.state = SandboxState(
            ClientApp(client_id, DEFAULT_APP_NAME, list(redirect_uris), {client_secret: True})
        )
        self.app = create_app(self.state, self.key)
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.ca_path = ""

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(exc.errno, f"port {self.port} on {self.host} is already in use") from None
            raise
        return sock

    def start(self) -> SandboxServer:
        if self._server is not None:
            return self
        certs = ensure_certs(self._cert_dir)
        self.ca_path = str(certs.ca_cert)
        sock = self._bind()
        handler = type("SandboxHandler", (_QuietHandler,), {"verbose": self._verbose})
        try:
            server = make_server(self.host, sock.getsockname()[1], self.app, threaded=True,
                                 request_handler=handler, ssl_context=(str(certs.server_cert), str(certs.server_key)),
                                 fd=sock.fileno())
        finally:
            sock.close()  # make_server duplicated the descriptor
        server.daemon_threads = True  # type: ignore[attr-defined]
        self._server = server
        self.port = server.port
        self._thread = threading.Thread(target=server.serve_forever, name="sandbox-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
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
