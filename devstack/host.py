"""A development Functions host for ``function_app.py`` (Core Tools cannot be installed everywhere).

It does what the Azure Functions host does for this app, reading only the environment:

* serves every HTTP trigger under the ``routePrefix`` of ``host.json`` (route templates with
  ``{param}``, ``{param?}``, ``{param:constraint}`` and ``{*rest}``), with the host's 100 MB
  request cap (https://learn.microsoft.com/azure/azure-functions/functions-scale#service-limits);
* runs timer triggers on their NCRONTAB schedule (``%SETTING%`` placeholders resolved from the
  environment);
* polls Azure Storage queues for queue triggers with the ``host.json`` queue options: base64
  messages, batch size, visibility timeout on failure, ``maxDequeueCount`` then ``<queue>-poison``
  (https://learn.microsoft.com/azure/azure-functions/functions-bindings-storage-queue-trigger);
* ignores the trigger of a function disabled with ``AzureWebJobs.<FUNCTION_NAME>.Disabled=true``
  (https://learn.microsoft.com/azure/azure-functions/disable-function);
* answers ``POST /admin/functions/{name}`` with body ``{"input": "..."}`` to run a non-HTTP
  function now (https://learn.microsoft.com/azure/azure-functions/functions-manually-run-non-http).
  Unlike the real host it answers 202 *after* the function has run, so callers can rely on it.
  Like Core Tools, a caller that is not on loopback (by address or by ``Host``) must send the
  master key as ``x-functions-key``: ``DEVHOST_ADMIN_KEY``, or a random key per process.

Hardening of a host a developer leaves running: the admin call takes only same-origin JSON (a web
page cannot make a browser run a function, e.g. emit a correctly signed webhook); a request body is
read only when the function asks for it (a route that refuses a declared ``Content-Length`` never has
it buffered); sockets have a read timeout (``DEVHOST_READ_TIMEOUT_SECONDS``, 30); a client gone
mid-body is one log line; ``X-Forwarded-Host`` is believed only with ``DEVHOST_TRUST_FORWARDED=true``
(behind a tunnel that sets it), since anyone can send it.

``/demo/token`` mints caller tokens, so it answers only requests whose ``Host`` (and ``Origin``,
when sent) names loopback or PUBLIC_BASE_URL's host: a page on another site that rebinds its DNS
name to 127.0.0.1 (DNS rebinding) still sends its own name in ``Host``.

With Core Tools installed, ``func start`` runs the same ``function_app.py`` and ``local.settings.json``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import datetime as dt
import hmac
import importlib
import inspect
import ipaddress
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import azure.functions as func
from azure.functions.queue import QueueMessage  # the worker's concrete type (carries dequeue_count)
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from devstack.ncrontab import CronError, NCrontab

ROOT = Path(__file__).resolve().parent.parent
MAX_REQUEST_BYTES = 100 * 1024 * 1024
log = logging.getLogger("devstack.host")


def _timespan_seconds(value: str, default: float) -> float:
    """host.json timespans are ``hh:mm:ss``."""
    try:
        h, m, s = value.split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)
    except (ValueError, AttributeError):
        return default


def disabled(function_name: str) -> bool:
    """``AzureWebJobs.<FUNCTION_NAME>.Disabled`` = true: the host ignores the function's trigger (it can still
    be run through the admin endpoint). https://learn.microsoft.com/azure/azure-functions/disable-function"""
    return os.environ.get(f"AzureWebJobs.{function_name}.Disabled", "").strip().lower() in ("true", "1")


def load_host_json(root: Path = ROOT) -> dict[str, Any]:
    try:
        return json.loads((root / "host.json").read_text())
    except FileNotFoundError:
        return {}


def resolve_setting(value: str) -> str:
    """Resolve ``%NAME%`` like the Functions host (app settings = environment variables)."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in os.environ:
            return os.environ[name]
        from shared.config import SETTINGS  # defaults the app documents

        for s in SETTINGS:
            if s.name == name and s.default is not None:
                return s.default
        raise KeyError(f"app setting {name} referenced by a trigger is not set")

    return re.sub(r"%([^%]+)%", sub, value)


def compile_route(template: str) -> tuple[re.Pattern[str], list[str]]:
    names: list[str] = []
    out = ""
    pos = 0
    for m in re.finditer(r"/?\{(\*)?([A-Za-z_][A-Za-z0-9_]*)(?::[^}?]+)?(\?)?\}", template):
        out += re.escape(template[pos : m.start()])
        catch_all, name, optional = m.group(1), m.group(2), m.group(3)
        names.append(name)
        slash = "/" if m.group(0).startswith("/") else ""
        body = f"(?P<{name}>.*)" if catch_all else f"(?P<{name}>[^/]+)"
        out += f"(?:{re.escape(slash)}{body})?" if (optional or catch_all) else re.escape(slash) + body
        pos = m.end()
    out += re.escape(template[pos:])
    return re.compile("^" + out + "/?\\Z", re.IGNORECASE), names


@dataclass
class HttpRoute:
    name: str
    methods: set[str]
    pattern: re.Pattern[str]
    template: str
    fn: Callable[..., Any]
    arg: str


@dataclass
class TimerFunction:
    name: str
    schedule: str
    fn: Callable[..., Any]
    arg: str
    run_on_startup: bool = False
    cron: NCrontab | None = None  # parsed from ``schedule`` when indexed


@dataclass
class QueueFunction:
    name: str
    queue: str
    connection: str
    fn: Callable[..., Any]
    arg: str


@dataclass
class _Timer:
    past_due: bool = False
    schedule_status: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)


_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-[0-9a-f]{16}-([0-9a-f]{2})")


@dataclass
class _TraceContext:
    trace_parent: str
    trace_state: str = ""
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass
class _InvocationContext:
    """What the host passes as ``context: func.Context``: the invocation id and the host's trace context.

    Like the real host, the trace context is the host's own span for the invocation: a child of the
    caller's ``traceparent`` when it sent one, else a new trace
    (https://learn.microsoft.com/azure/azure-functions/opentelemetry-howto)."""

    function_name: str
    trace_context: _TraceContext
    invocation_id: str = field(default_factory=lambda: str(__import__("uuid").uuid4()))
    function_directory: str = str(ROOT)
    thread_local_storage: threading.local = field(default_factory=threading.local)
    retry_context: Any = None


def _host_trace_parent(incoming: str | None) -> str:
    m = _TRACEPARENT.fullmatch((incoming or "").strip().lower())
    trace_id = m.group(1) if m else secrets.token_hex(16)
    return f"00-{trace_id}-{secrets.token_hex(8)}-{m.group(2) if m else '01'}"


def _call(fn: Callable[..., Any], kwargs: dict[str, Any], *, traceparent: str | None = None) -> Any:
    if "context" in inspect.signature(fn).parameters and "context" not in kwargs:
        kwargs = {**kwargs, "context": _InvocationContext(fn.__name__, _TraceContext(_host_trace_parent(traceparent)))}
    result = fn(**kwargs)
    if inspect.iscoroutine(result):
        result = asyncio.run(result)
    return result


class DevHost:
    def __init__(self, app: func.FunctionApp, *, host: str = "127.0.0.1", port: int = 7071,
                 root: Path = ROOT, static: dict[str, Path] | None = None) -> None:
        self.host, self.port = host, port
        cfg = load_host_json(root)
        ext = cfg.get("extensions", {})
        self.route_prefix = ext.get("http", {}).get("routePrefix", "api").strip("/")
        q = dict(ext.get("queues", {}))
        # App settings override host.json like on Azure: AzureFunctionsJobHost__extensions__queues__<name>
        # (https://learn.microsoft.com/azure/azure-functions/functions-host-json#override-hostjson-values)
        prefix = "AzureFunctionsJobHost__extensions__queues__"
        q.update({k[len(prefix):]: v for k, v in os.environ.items() if k.startswith(prefix)})
        self.q_batch = int(q.get("batchSize", 16))
        self.q_max_dequeue = int(q.get("maxDequeueCount", 5))
        self.q_visibility = _timespan_seconds(q.get("visibilityTimeout", "00:00:00"), 0.0)
        self.q_max_poll = _timespan_seconds(q.get("maxPollingInterval", "00:01:00"), 60.0)
        # A taken message stays invisible this long (the real host: 10 minutes, renewed while it runs);
        # when an instance dies mid-message, that is when another one sees it. Chaos runs shorten it.
        self.q_lease = _positive_int("DEVHOST_QUEUE_LEASE_SECONDS", os.environ.get("DEVHOST_QUEUE_LEASE_SECONDS"), 600)
        self.q_base64 = q.get("messageEncoding", "base64") == "base64"
        self.static = static or {}
        # The master key for /admin calls from off loopback (Core Tools' x-functions-key).
        self.admin_key = os.environ.get("DEVHOST_ADMIN_KEY") or secrets.token_urlsafe(32)
        self.trust_forwarded = os.environ.get("DEVHOST_TRUST_FORWARDED", "").lower() == "true"
        self.read_timeout = _positive_int("DEVHOST_READ_TIMEOUT_SECONDS", os.environ.get("DEVHOST_READ_TIMEOUT_SECONDS"),
                                          30)
        self.body_deadline = 4.0 * self.read_timeout  # a whole body, however it trickles in
        self.http: list[HttpRoute] = []
        self.timers: list[TimerFunction] = []
        self.queues: list[QueueFunction] = []
        self.by_name: dict[str, Any] = {}
        for f in app.get_functions():
            self._index(f)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: Any = None

    # -- indexing ---------------------------------------------------------------------------
    def _index(self, f: Any) -> None:
        trig = f.get_trigger()
        d = trig.get_dict_repr()
        name, fn = f.get_function_name(), f.get_user_function()
        kind = d["type"]
        if kind == "httpTrigger" and disabled(name):
            return  # not served: 404, like the host
        if kind == "httpTrigger":
            template = d.get("route") or name
            pattern, _ = compile_route(template)
            methods = {str(getattr(m, "value", m)).upper() for m in (d.get("methods") or [])} or {
                "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"}
            item: Any = HttpRoute(name, methods, pattern, template, fn, d["name"])
            self.http.append(item)
        elif kind == "timerTrigger":
            item = TimerFunction(name, resolve_setting(d["schedule"]), fn, d["name"], bool(d.get("runOnStartup")))
            # Fail fast on a bad schedule, naming the %SETTING% it came from.
            item.cron = NCrontab(item.schedule, source=f"timer {name}: schedule {d['schedule']}")
            self.timers.append(item)
        elif kind == "queueTrigger":
            item = QueueFunction(name, resolve_setting(d["queueName"]), d.get("connection") or "AzureWebJobsStorage",
                                 fn, d["name"])
            self.queues.append(item)
        else:
            raise ValueError(f"devstack host: trigger type {kind} of {name} is not supported")
        self.by_name[name.lower()] = item

    # -- HTTP ---------------------------------------------------------------------------------
    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        req = Request(environ)
        t0 = time.perf_counter()
        try:
            resp = self._dispatch(req)
        except ClientGone as gone:  # nobody reads the answer; one line, no traceback
            log.warning("devstack host: %s %s: the client went away while sending its body (%s)", req.method,
                        req.path, gone.reason)
            resp = _problem(400, "Bad request", "The request body was cut short.")
        except Exception as e:  # the host never crashes on a request; the app logs its own errors
            # One line, no traceback: a log line never carries one (it can quote request data).
            log.error("devstack host: unhandled %s on %s %s", type(e).__name__, req.method, req.path)
            resp = _problem(500, "Internal error", "The host could not run the function.")
        log.debug("%s %s -> %s in %.1f ms", req.method, req.path, resp.status_code, (time.perf_counter() - t0) * 1e3)
        return resp(environ, start_response)

    def _dispatch(self, req: Request) -> Response:
        path = req.path
        if path.startswith("/admin/functions/") and req.method == "POST":
            if not (is_local_request(req) or _key_matches(req.headers.get("x-functions-key"), self.admin_key)):
                return _problem(401, "Unauthorized", "Admin calls from off loopback need the master key in "
                                "x-functions-key (DEVHOST_ADMIN_KEY).")
            if not same_origin(req):
                return _problem(403, "Forbidden", "Admin calls are not taken from another site (Origin / "
                                "Sec-Fetch-Site).")
            if req.mimetype != "application/json":
                return _problem(415, "Unsupported media type", 'Admin calls take Content-Type: application/json, '
                                'like {"input": "..."}.')
            return self._admin(path.rsplit("/", 1)[-1], req)
        if path == DEMO_WEBHOOKS_PATH and "/demo/" in self.static:
            return _demo_webhooks(req)
        if path == DEMO_TOKEN_PATH and "/demo/" in self.static:
            if not _trusted_host(req):
                return _problem(403, "Forbidden", "/demo/token answers only loopback names (Host and Origin); "
                                "use `python -m devstack token SUB` elsewhere.")
            return _demo_token(req)
        for prefix, folder in self.static.items():
            if path == prefix.rstrip("/"):
                return Response(status=302, headers={"Location": prefix})
            if path.startswith(prefix):
                return _static(folder, path[len(prefix):] or "index.html")
        prefix = "/" + self.route_prefix + "/" if self.route_prefix else "/"
        if not path.startswith(prefix):
            return _problem(404, "Not found", f"No function serves {path}.")
        sub = path[len(prefix):]
        allowed: set[str] = set()
        for route in self.http:
            m = route.pattern.match(sub)
            if not m:
                continue
            if req.method not in route.methods:
                allowed |= route.methods
                continue
            return self._invoke_http(route, req, {k: v for k, v in m.groupdict().items() if v is not None})
        if allowed:
            return _problem(405, "Method not allowed", f"{req.method} is not allowed on {path}.",
                            {"Allow": ", ".join(sorted(allowed))})
        return _problem(404, "Not found", f"No function serves {path}.")

    def _invoke_http(self, route: HttpRoute, req: Request, params: dict[str, str]) -> Response:
        length = req.content_length or 0
        if length > MAX_REQUEST_BYTES:
            return _problem(413, "Payload too large", "The Functions host accepts requests up to 100 MB.")
        url = req.url
        if req.headers.get("X-Forwarded-Host") and self.trust_forwarded:
            url = f"{req.scheme}://{req.headers['X-Forwarded-Host']}{req.full_path.rstrip('?')}"
        freq = LazyBodyRequest(
            method=req.method,
            url=url,
            headers=dict(req.headers.items()),
            params=dict(parse_qsl(req.query_string.decode("latin-1"), keep_blank_values=True)),
            route_params=params,
            read=lambda limit: _read_body(req, limit, deadline_s=self.body_deadline),
        )
        try:
            out = _call(route.fn, {route.arg: freq}, traceparent=req.headers.get("traceparent"))
        except BodyTooLarge:
            return _problem(413, "Payload too large", "The Functions host accepts requests up to 100 MB.")
        if out is None:
            return Response(status=204)
        if not isinstance(out, func.HttpResponse):
            return _problem(500, "Internal error", f"{route.name} did not return an HttpResponse.")
        headers = list(out.headers.items())
        if not any(k.lower() == "content-type" for k, _ in headers) and out.mimetype:
            headers.append(("Content-Type", f"{out.mimetype}; charset={out.charset}"))
        return Response(out.get_body(), status=out.status_code, headers=headers)

    def _admin(self, name: str, req: Request) -> Response:
        item = self.by_name.get(name.lower())
        if item is None:
            return _problem(404, "Not found", f"No function named {name}.")
        try:
            raw = req.get_data() or b"{}"
            payload = json.loads(raw)
            if not isinstance(payload, dict):
                raise ValueError
        except (ValueError, RecursionError):
            return _problem(400, "Bad request", 'The body must be JSON like {"input": "..."}.')
        if isinstance(item, TimerFunction):
            self._run_timer(item, past_due=False)
        elif isinstance(item, QueueFunction):
            if not isinstance(payload.get("input", ""), str):
                return _problem(400, "Bad request", 'The body must be JSON like {"input": "..."}: input is the '
                                "queue message as a string.")
            data = str(payload.get("input", "")).encode()
            msg = QueueMessage(id="admin", body=data, dequeue_count=1, pop_receipt=None)
            _call(item.fn, {item.arg: msg})
        else:
            return _problem(400, "Bad request", f"{name} is an HTTP function; call its route instead.")
        return Response(status=202)

    # -- timers -------------------------------------------------------------------------------
    def _run_timer(self, t: TimerFunction, *, past_due: bool) -> None:
        try:
            _call(t.fn, {t.arg: _Timer(past_due=past_due)})
        except Exception as e:
            log.error("devstack host: timer %s failed: %s", t.name, _one_line(e))

    def _timer_loop(self, t: TimerFunction) -> None:
        cron = t.cron or NCrontab(t.schedule)
        if t.run_on_startup:
            self._run_timer(t, past_due=False)
        while not self._stop.is_set():
            now = dt.datetime.now(dt.timezone.utc)
            nxt = cron.next_after(now)
            if self._stop.wait((nxt - now).total_seconds()):
                return
            self._run_timer(t, past_due=False)

    # -- queues -------------------------------------------------------------------------------
    def _queue_client(self, q: QueueFunction, name: str) -> Any:
        from azure.storage.queue import QueueClient

        conn = os.environ.get(q.connection)
        if not conn:
            raise KeyError(f"queue trigger {q.name}: connection setting {q.connection} is not set")
        client = QueueClient.from_connection_string(conn, name, connection_timeout=10, read_timeout=30)
        from azure.core.exceptions import ResourceExistsError

        try:
            client.create_queue()
        except ResourceExistsError:  # another instance (or the app itself) created it first
            pass
        return client

    def _queue_loop(self, q: QueueFunction) -> None:
        while True:  # storage may not be up yet: keep trying, never let the trigger thread die
            try:
                client = self._queue_client(q, q.queue)
                break
            except KeyError:
                raise
            except Exception as e:
                log.warning("devstack host: queue %s not reachable yet (%s); retrying", q.queue, type(e).__name__)
                if self._stop.wait(2.0):
                    return
        poison = None
        delay = 0.1
        pool = ThreadPoolExecutor(self.q_batch, thread_name_prefix=f"q-{q.queue}")
        vt = max(int(self.q_visibility), 0)
        while not self._stop.is_set():
            try:
                msgs = list(client.receive_messages(messages_per_page=self.q_batch, max_messages=self.q_batch,
                                                    visibility_timeout=self.q_lease))
            except Exception as e:
                log.warning("devstack host: polling %s failed: %s", q.queue, type(e).__name__)
                msgs = []
            if not msgs:
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, self.q_max_poll)
                continue
            delay = 0.1

            def handle(m: Any) -> None:
                nonlocal poison
                content = m.content if isinstance(m.content, str) else m.content.decode()
                try:
                    body = base64.b64decode(content, validate=True) if self.q_base64 else content.encode()
                except (binascii.Error, ValueError):
                    body = content.encode()
                fm = QueueMessage(id=m.id, body=body, dequeue_count=m.dequeue_count, pop_receipt=m.pop_receipt,
                                       insertion_time=m.inserted_on, expiration_time=m.expires_on,
                                  time_next_visible=m.next_visible_on)
                try:
                    _call(q.fn, {q.arg: fm})
                    failed = False
                except Exception as e:
                    log.error("devstack host: %s failed (dequeue %s): %s", q.name, m.dequeue_count, _one_line(e))
                    failed = True
                try:  # the bookkeeping after the function: a lease that ran out meanwhile must not stop the loop
                    if not failed:
                        client.delete_message(m)
                    elif m.dequeue_count >= self.q_max_dequeue:
                        if poison is None:
                            poison = self._queue_client(q, q.queue + "-poison")
                        poison.send_message(content)
                        client.delete_message(m)
                    else:
                        client.update_message(m, visibility_timeout=vt)
                except Exception as e:  # e.g. 404 or a pop receipt mismatch: the message was leased again
                    log.warning("devstack host: %s: message %s not settled (%s); it will be seen again",
                                q.name, m.id, type(e).__name__)

            list(pool.map(handle, msgs))
        pool.shutdown(wait=False)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> DevHost:
        handler = type("_Handler", (_NoDelayHandler,), {"timeout": self.read_timeout})
        self._server = make_server(self.host, self.port, self.wsgi, threaded=True, request_handler=handler)
        self.port = self._server.server_port
        th = threading.Thread(target=self._server.serve_forever, name="devhost-http", daemon=True)
        th.start()
        self._threads.append(th)
        for t in self.timers:
            if not disabled(t.name):
                self._spawn(f"timer-{t.name}", self._timer_loop, t)
        for q in self.queues:
            if not disabled(q.name):
                self._spawn(f"queue-{q.name}", self._queue_loop, q)
        return self

    def _spawn(self, name: str, target: Callable[..., None], arg: Any) -> None:
        th = threading.Thread(target=target, args=(arg,), name=name, daemon=True)
        th.start()
        self._threads.append(th)

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class _NoDelayHandler(WSGIRequestHandler):
    """Werkzeug's handler without Nagle's algorithm: the body is not held back ~40 ms waiting for the
    client's delayed ACK of the headers (the Functions host answers at once). Its ``timeout`` (set per
    host) bounds every socket read: a client that stops sending frees its thread."""

    disable_nagle_algorithm = True

    def log_error(self, format: str, *args: Any) -> None:
        log.warning("devstack host: %s", (format % args).splitlines()[0][:200])


class ClientGone(BaseException):
    """The client stopped sending its body (disconnected, or silent past the read timeout). A BaseException
    so that no ``except Exception`` in the function turns it into a 500 and a log line of its own."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BodyTooLarge(BaseException):
    """A body without ``Content-Length`` (chunked) grew past the host's 100 MB cap."""


class LazyBodyRequest(func.HttpRequest):
    """An ``HttpRequest`` whose body is read from the socket when the function first asks for it
    (``get_body``, ``form``, ``files``), so a function that refuses a declared ``Content-Length`` has
    read nothing."""

    def __init__(self, *, read: Callable[[int], bytes], **kw: Any) -> None:
        super().__init__(body=b"", **kw)
        self._read = read
        self._body: bytes | None = None

    def get_body(self) -> bytes:
        if self._body is None:
            self._body = self._read(MAX_REQUEST_BYTES + 1)
        return self._body

    def read_body_up_to(self, limit: int) -> bytes:
        """At most ``limit`` bytes of the body (a route's own cap): a larger one is not read further."""
        if self._body is None:
            self._body = self._read(limit)
        return self._body

    def get_json(self) -> Any:
        return json.loads(self.get_body().decode("utf-8"))


def _read_body(req: Request, limit: int, *, deadline_s: float) -> bytes:
    """Up to ``limit`` bytes of the body (the rest, if any, is never read: the answer closes the connection),
    within ``deadline_s`` in all: a client that trickles a byte now and then does not hold a thread past it."""
    from werkzeug.exceptions import ClientDisconnected

    deadline = time.monotonic() + deadline_s
    chunks: list[bytes] = []
    size = 0
    try:
        while size < limit:
            if time.monotonic() > deadline:
                raise ClientGone("too slow")
            chunk = req.stream.read(min(65536, limit - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except ClientDisconnected:
        raise ClientGone("disconnected") from None
    except (TimeoutError, OSError) as e:
        raise ClientGone(type(e).__name__) from None
    body = b"".join(chunks)
    if len(body) > MAX_REQUEST_BYTES:
        raise BodyTooLarge
    if req.content_length is not None and len(body) < min(req.content_length, limit):
        raise ClientGone("disconnected")
    return body


def _problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail})
    return Response(body, status=status, headers=headers or {}, content_type="application/problem+json")


_MIME = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}


def _static(folder: Path, rel: str) -> Response:
    target = (folder / rel).resolve()
    if folder.resolve() not in target.parents or not target.is_file():
        return _problem(404, "Not found", "No such file.")
    return Response(target.read_bytes(), content_type=_MIME.get(target.suffix, "application/octet-stream"),
                    headers={"Cache-Control": "no-store"})


DEMO_DIR = ROOT / "devstack" / "demo"
DEMO_TOKEN_PATH = "/demo/token"
_SUB_RE = re.compile(r"[A-Za-z0-9._@-]{1,128}")  # fullmatch: "$" would accept a trailing newline
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _hostname(value: str) -> str:
    """The host name of a ``Host`` header or an origin, without port and IPv6 brackets, lower case."""
    try:
        return (urlsplit(value if "://" in value else "//" + value).hostname or "").lower()
    except ValueError:
        return ""


def _is_loopback_name(name: str) -> bool:
    return name in _LOOPBACK_NAMES or name.endswith(".localhost")  # RFC 6761 §6.3


def is_local_request(req: Request) -> bool:
    """Loopback by address *and* by ``Host`` (a rebound DNS name reaches 127.0.0.1 with its own Host)."""
    try:
        local_addr = ipaddress.ip_address(req.remote_addr or "").is_loopback
    except ValueError:
        local_addr = False
    return local_addr and _is_loopback_name(_hostname(req.host))


def _one_line(e: BaseException) -> str:
    """An exception as one short line (its type and the first line of its message), never a traceback."""
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def same_origin(req: Request) -> bool:
    """Not sent by a page of another site: ``Sec-Fetch-Site`` (Fetch Metadata, sent by browsers) is
    ``same-origin`` or ``none`` (typed by the user), and ``Origin``, when sent, is this host's own origin.
    A script or curl sends neither. https://www.w3.org/TR/fetch-metadata/#sec-fetch-site-header"""
    site = req.headers.get("Sec-Fetch-Site")
    if site is not None and site.lower() not in ("same-origin", "none"):
        return False
    origin = req.headers.get("Origin")
    return origin is None or origin.rstrip("/").lower() == req.host_url.rstrip("/").lower()


def _key_matches(given: str | None, key: str) -> bool:
    return bool(given) and hmac.compare_digest(str(given).encode(), key.encode())


def _positive_int(name: str, raw: str | None, default: int) -> int:
    """A whole number of seconds ≥ 1 from the environment, or a clear start-up error naming it."""
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"devstack host: {name} must be a whole number of seconds, at least 1 (got {raw!r})")
    return value


def _trusted_host(req: Request) -> bool:
    """``Host`` and, when sent, ``Origin`` name loopback. Not PUBLIC_BASE_URL's host: behind a tunnel that
    name reaches the host from anywhere (and a tunnel's traffic arrives from loopback), so anyone could
    mint caller tokens; ``python -m devstack token SUB`` serves that case on the developer's own machine."""
    origin = req.headers.get("Origin")
    return _is_loopback_name(_hostname(req.host)) and (origin is None or _is_loopback_name(_hostname(origin)))


def demo_static() -> dict[str, Path]:
    """``/demo/`` (the demo web client and its token endpoint) when DEMO_ENABLED is true.

    Only the dev host serves it: ``devstack/`` is never deployed (.funcignore)."""
    from shared.config import get_settings

    return {"/demo/": DEMO_DIR} if get_settings().demo_enabled and DEMO_DIR.is_dir() else {}


def _demo_token(req: Request) -> Response:
    """``POST /demo/token {"sub": "..."}``: a development caller token for the demo page.

    It stands in for the integrating product's back end, which issues its users' JWTs."""
    from shared.auth import issue_dev_token
    from shared.config import get_settings

    if req.method != "POST":
        return _problem(405, "Method not allowed", "Use POST.", {"Allow": "POST"})
    try:
        doc = json.loads(req.get_data() or b"{}")
        sub = doc.get("sub", "demo-user") if isinstance(doc, dict) else None
    except (ValueError, RecursionError):
        sub = None
    if not isinstance(sub, str) or not _SUB_RE.fullmatch(sub):
        return _problem(400, "Bad request",
                        'The body must be JSON like {"sub": "demo-user"}: 1-128 of A-Z a-z 0-9 . _ @ -.')
    settings = get_settings()
    if not settings.auth_hs256_secret:
        return _problem(409, "Not available", "AUTH_HS256_SECRET is not set, so the dev host cannot issue tokens.")
    lifetime = 12 * 3600
    token = issue_dev_token(settings, sub, lifetime_s=lifetime)
    # The sandbox's address too, so the page's instructions name the port this stack really uses.
    body = json.dumps({"token": token, "sub": sub, "exp": int(time.time()) + lifetime,
                       "sandbox": settings.authority_host})
    return Response(body, content_type="application/json", headers={"Cache-Control": "no-store"})


DEMO_WEBHOOKS_PATH = "/demo/webhooks"
_received: collections.deque[dict[str, object]] = collections.deque(maxlen=100)
_received_lock = threading.Lock()


def _demo_webhooks(req: Request) -> Response:
    """The local stack's webhook receiver (``make dev`` points ``WEBHOOK_URL`` here): ``POST`` checks the
    ``X-Connector-Signature`` with ``WEBHOOK_SECRET`` the way docs/webhooks.md shows a receiver doing it, and keeps
    the newest 100 events in memory; ``GET`` lists them, newest first (loopback names only)."""
    from shared.config import get_settings
    from shared.webhooks import SIGNATURE_HEADER, verify

    if req.method == "GET":
        if not _trusted_host(req):
            return _problem(403, "Forbidden", "/demo/webhooks lists events to loopback names only.")
        with _received_lock:
            events = list(reversed(_received))
        return Response(json.dumps({"events": events}), content_type="application/json",
                        headers={"Cache-Control": "no-store"})
    if req.method != "POST":
        return _problem(405, "Method not allowed", "Use GET or POST.", {"Allow": "GET, POST"})
    secret = get_settings().webhook_secret
    body = req.get_data()
    if not secret or not verify(secret, body, req.headers.get(SIGNATURE_HEADER) or ""):
        return _problem(401, "Unauthorized", "The X-Connector-Signature does not verify with WEBHOOK_SECRET.")
    try:
        event = json.loads(body)
    except ValueError:
        return _problem(400, "Bad request", "The body is not JSON.")
    with _received_lock:
        _received.append({"receivedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "verified": True,
                          "event": event})
    return Response(status=204)


def load_app(module: str = "function_app") -> func.FunctionApp:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    mod = importlib.import_module(module)
    app: func.FunctionApp = mod.app
    return app


def main(argv: list[str] | None = None) -> int:
    import argparse

    from devstack import env_port, port_number
    from devstack.azurite import port_in_use

    p = argparse.ArgumentParser(prog="python -m devstack host", description="Serve function_app.py locally.")
    p.add_argument("--host", default=os.environ.get("DEVHOST_HOST", "127.0.0.1"))
    p.add_argument("--port", type=port_number, default=env_port("DEVHOST_PORT", 7071),
                   help="HTTP port (DEVHOST_PORT, 7071 like Core Tools)")
    a = p.parse_args(argv)
    from shared.logs import SafeFormatter

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(SafeFormatter("%(message)s"))  # one record, one line
    try:
        taken = bool(a.port) and port_in_use(a.port, a.host)
    except OSError as e:  # an unknown --host
        print(f"devstack host: cannot use host {a.host!r}: {e}", file=sys.stderr)
        return 1
    if taken:
        print(f"devstack host: port {a.port} is already in use (another host or `func start`?). "
              "Stop it, or set DEVHOST_PORT (or pass --port).", file=sys.stderr)
        return 1
    try:
        app = load_app()
    except Exception as e:  # a configuration error names its setting; show it plainly
        print(f"devstack host: cannot load function_app: {e}", file=sys.stderr)
        return 1
    try:
        dev = DevHost(app, host=a.host, port=a.port, static=demo_static())
    except (CronError, KeyError, ValueError) as e:  # a bad schedule, unset %SETTING% or bad number: one line
        print(f"devstack host: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    try:
        h = dev.start()
    except OSError as e:
        print(f"devstack host: cannot listen on {a.host}:{a.port}: {e}", file=sys.stderr)
        return 1
    off = sorted([t.name for t in h.timers if disabled(t.name)] + [q.name for q in h.queues if disabled(q.name)])
    print(f"devstack host: serving {len(h.http)} HTTP, {len(h.timers)} timer and {len(h.queues)} queue "
          f"functions on {h.url}" + (f" (disabled: {', '.join(off)})" if off else ""), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        h.stop()
    return 0
