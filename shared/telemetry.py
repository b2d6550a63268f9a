"""OpenTelemetry for the connector: one span per invocation, child spans for every Graph, Entra and
storage call, and the operator's metrics. The one module that owns providers, tracers and meters.

Modes (``TELEMETRY_EXPORTER``, read once from :class:`shared.config.Settings`):

* ``auto`` (default): Application Insights when ``APPLICATIONINSIGHTS_CONNECTION_STRING`` is set,
  else off. ``configure_azure_monitor()`` (the Azure Monitor OpenTelemetry distro,
  https://learn.microsoft.com/azure/azure-monitor/app/opentelemetry-enable?tabs=python) exports the
  metrics and the ``connector`` logs; traces go through our own TracerProvider whose exporter is the
  distro's ``AzureMonitorTraceExporter`` behind :class:`_Scrubbed`, so every exported span passes
  the secret filter (the distro adds its own unfiltered exporter when it owns tracing). The
  credential is the app's managed identity: the component has local authentication off
  (https://learn.microsoft.com/azure/azure-monitor/app/azure-ad-authentication?tabs=python).
* ``console``: the same spans and metrics printed by the SDK's console exporters (local, no Azure).
* ``off``: nothing is imported; every method below is a no-op.

Cold start: importing this module imports no OpenTelemetry package. The providers are
built on first use, inside the first invocation (:func:`get_telemetry`): ``azure.monitor.opentelemetry``
costs ~670 ms to import, which indexing must not pay.

Correlation: the Functions host passes its trace context to the worker
(``func.Context.trace_context.trace_parent``, https://learn.microsoft.com/azure/azure-functions/opentelemetry-howto);
the invocation span is its child, carries the ``x-correlation-id`` returned to the caller, and
the log line carries the span's trace id. ``requests`` (Graph, Entra, webhooks) and azure-core
(Tables, Queues, Key Vault) instrumentations make the child spans
(https://opentelemetry-python-contrib.readthedocs.io/en/latest/instrumentation/requests/requests.html,
https://learn.microsoft.com/python/api/overview/azure/core-tracing-opentelemetry-readme).

Secrets: span attributes are ours and bounded (function, route template, status, error code,
account id); URLs lose their query string and fragment (upload-session ``authtoken``, Graph
``$filter``/``$search`` values), and :class:`_Scrubbed` removes JWTs, bearer tokens, OAuth
parameters and email addresses from every exported string, exception events included. Request
and response bodies are never recorded by either instrumentation. Metric attributes are closed
vocabularies (outcomes, error codes, size classes), never an id or an address.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Meter, Observation, _Gauge
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
    from opentelemetry.trace import Span, Tracer
    from opentelemetry.util.types import Attributes

    from shared.config import Settings

AttrValue = str | bool | int | float
SERVICE_NAME = "outlook-connector"
INSTRUMENTATION = "connector"

#: ``connector.refresh`` outcomes.
REFRESH_OUTCOMES = ("ok", "invalid_grant", "invalid_client", "throttled", "transient")
#: Libraries the distro would instrument on its own; we instrument requests and azure-core ourselves.
_DISTRO_LIBRARIES = ("azure_sdk", "django", "fastapi", "flask", "psycopg2", "requests", "urllib", "urllib3",
                     "httpx")
#: Seconds a throttled mailbox counts in ``connector.graph.throttled_mailboxes``.
THROTTLE_WINDOW_S = 60.0


# -- scrubbing ----------------------------------------------------------------------------------

_URL_QUERY = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s?#'\"<>]*|[\w./%-])[?#][^\s'\"<>)]*", re.IGNORECASE)
_JWT = re.compile(r"\beyJ[\w-]{4,}\.[\w-]{4,}\.?[\w-]*")
_BEARER = re.compile(r"\b(Bearer|Basic)\s+[\w.~+/=-]+", re.IGNORECASE)
_OAUTH_PARAM = re.compile(
    r"\b(client_secret|client_assertion|code|code_verifier|refresh_token|access_token|id_token|assertion|"
    r"authtoken|password|sig|state)=[^&\s'\"]+", re.IGNORECASE)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_URL_KEYS = frozenset({"http.url", "url.full", "http.target", "url.path", "az.url"})
_DROPPED_KEYS = frozenset({"url.query", "http.request.body", "http.response.body", "enduser.id", "user.email"})


def scrub(text: str) -> str:
    """``text`` without query strings, tokens, OAuth parameters or email addresses."""
    text = _URL_QUERY.sub(lambda m: m.group(1) + "?…", text)
    text = _JWT.sub("[jwt]", text)
    text = _BEARER.sub(lambda m: m.group(1) + " [redacted]", text)
    text = _OAUTH_PARAM.sub(lambda m: m.group(1) + "=[redacted]", text)
    return _EMAIL.sub("[email]", text)


def strip_url(url: str) -> str:
    """Scheme, host and path of ``url``; path segments that look like an address or a token go. A URL on
    the webhook receiver's host (``WEBHOOK_URL``) keeps only scheme and host: such URLs often carry their
    secret in the path (``https://hooks.slack.com/services/T…/B…/<secret>``)."""
    base = url.split("#", 1)[0].split("?", 1)[0]
    origin = _origin(base)
    if origin and origin.lower() == _webhook_host[0]:
        return origin
    return "/".join("{redacted}" if "@" in seg or _JWT.search(seg) else seg for seg in base.split("/"))


def _origin(url: str) -> str:
    """``scheme://host[:port]`` of an absolute URL, else ""."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme:
        return ""
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    return f"{scheme}://{host}" if host else ""


_webhook_host = [""]  # the origin of WEBHOOK_URL, lower case (set from the settings telemetry is configured with)


def redact_webhook_host(webhook_url: str | None) -> None:
    """URLs on the host of ``webhook_url`` (``WEBHOOK_URL``) keep only scheme and host in spans and logs."""
    _webhook_host[0] = _origin((webhook_url or "").split("#", 1)[0].split("?", 1)[0]).lower()


def _clean_value(key: str, value: object) -> object:
    if isinstance(value, str):
        return scrub(strip_url(value)) if key in _URL_KEYS else scrub(value)
    if isinstance(value, (list, tuple)):
        return tuple(scrub(v) if isinstance(v, str) else v for v in value)
    return value


def clean_attributes(attributes: Mapping[str, object] | None) -> dict[str, object]:
    return {k: _clean_value(k, v) for k, v in (attributes or {}).items() if k not in _DROPPED_KEYS}


def size_class(nbytes: int) -> str:
    """``connector.send`` size class: ``none``, ``small`` (< 1 MiB), ``medium`` (< 3 MiB: inline or posted
    attachments) or ``large`` (upload sessions, https://learn.microsoft.com/graph/outlook-large-attachments)."""
    if nbytes <= 0:
        return "none"
    return "small" if nbytes < 1 << 20 else "medium" if nbytes < 3 << 20 else "large"


# -- the facade ---------------------------------------------------------------------------------


class Invocation:
    """The span of one invocation (or nothing, when telemetry is off)."""

    def __init__(self, span: Span | None) -> None:
        self._span = span

    @property
    def trace_id(self) -> str | None:
        if self._span is None:
            return None
        ctx = self._span.get_span_context()
        return f"{ctx.trace_id:032x}" if ctx.is_valid else None

    def set(self, key: str, value: AttrValue | None) -> None:
        if self._span is not None and value is not None:
            self._span.set_attribute(key, value)

    def outcome(self, *, status: int | None = None, code: str | None = None, error: BaseException | None = None) -> None:
        """Record how the invocation ended: an HTTP status, our error code, the exception's class (never its text)."""
        if self._span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        self.set("http.response.status_code", status)
        self.set("connector.error.code", code)
        if error is not None:
            self.set("error.type", type(error).__name__)
        if error is not None or (status is not None and status >= 500):
            self._span.set_status(Status(StatusCode.ERROR, code or (type(error).__name__ if error else None)))


class Telemetry:
    """Spans and meters; a disabled instance (:data:`OFF`) does nothing and imports nothing."""

    def __init__(self, *, tracer: Tracer | None = None, meter: Meter | None = None) -> None:
        self._tracer = tracer
        self._meter = meter
        self._throttled: dict[str, float] = {}
        self._throttled_lock = threading.Lock()
        self._instruments = _Instruments(meter, self._observe_throttled) if meter is not None else None

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    @contextmanager
    def invocation(self, function: str, *, trigger: str, trace_parent: str | None = None,
                   attributes: Mapping[str, AttrValue | None] | None = None) -> Iterator[Invocation]:
        """The span of one function invocation, a child of the host's ``trace_parent`` (W3C ``traceparent``).

        HTTP invocations are INTERNAL spans under the host's request span (the host already reports the
        request: https://learn.microsoft.com/azure/azure-functions/opentelemetry-howto#duplicate-request-telemetry);
        queue invocations are CONSUMER spans."""
        if self._tracer is None:
            yield Invocation(None)
            return
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        parent = TraceContextTextMapPropagator().extract({"traceparent": trace_parent}) if trace_parent else None
        attrs = {"faas.trigger": trigger, "faas.name": function,
                 **{k: v for k, v in (attributes or {}).items() if v is not None}}
        kind = SpanKind.CONSUMER if trigger == "pubsub" else SpanKind.INTERNAL
        with self._tracer.start_as_current_span(function, context=parent, kind=kind, attributes=attrs,
                                                record_exception=False, set_status_on_exception=False) as span:
            inv = Invocation(span)
            try:
                yield inv
            except BaseException as e:
                inv.outcome(code=getattr(e, "code", None), error=e)
                raise

    # -- metrics ------------------------------------------------
    def refresh(self, outcome: str, *, code: str | None = None) -> None:
        """One token-endpoint refresh: ``outcome`` in :data:`REFRESH_OUTCOMES`, ``code`` our error code."""
        if self._instruments is not None:
            self._instruments.refreshes.add(1, _attrs(outcome=outcome, code=code))

    def account_status(self, status: str, *, event: str) -> None:
        """An account moved to ``status`` (``active``, ``reauth_required``, ``disconnected``) by ``event``."""
        if self._instruments is not None:
            self._instruments.transitions.add(1, _attrs(status=status, event=event))

    def accounts(self, counts: Mapping[str, int]) -> None:
        """How many accounts are in each status now (the daily reconciliation counts them)."""
        if self._instruments is not None:
            for status, n in counts.items():
                self._instruments.accounts.set(n, {"status": status})

    def send(self, outcome: str, *, nbytes: int, seconds: float) -> None:
        """One send (``sent`` or our error code) with its attachments' size class and duration."""
        if self._instruments is not None:
            attrs = _attrs(outcome=outcome, size_class=size_class(nbytes))
            self._instruments.sends.add(1, attrs)
            self._instruments.send_duration.record(seconds, attrs)

    def throttled(self, status: int, *, mailbox: str, gave_up: bool) -> None:
        """Graph answered 429/503 for ``mailbox`` (counted, never exported: only the number of mailboxes is)."""
        if self._instruments is None:
            return
        self._instruments.throttles.add(1, _attrs(status=status, outcome="gave_up" if gave_up else "retried"))
        key = hashlib.sha256(mailbox.encode()).hexdigest()[:16]
        with self._throttled_lock:
            self._throttled[key] = time.monotonic()

    def webhook(self, outcome: str, *, attempt: int, event: str) -> None:
        """A webhook delivery attempt: ``delivered``, ``retry`` or ``abandoned``; ``attempt`` counts from 1."""
        if self._instruments is not None:
            attrs = _attrs(outcome=outcome, event=event)
            self._instruments.webhooks.add(1, attrs)
            if outcome != "retry":
                self._instruments.webhook_attempts.record(attempt, attrs)

    def notification_lag(self, seconds: float, *, source: str = "notification") -> None:
        """Seconds from a message's arrival in the mailbox (``receivedDateTime``) to its ``message.received``
        event; ``source`` says how it was found (``notification`` or ``catch_up``)."""
        if self._instruments is not None:
            self._instruments.notification_lag.record(max(0.0, seconds), {"source": source})

    def _observe_throttled(self, options: CallbackOptions) -> Iterator[Observation]:
        from opentelemetry.metrics import Observation

        cutoff = time.monotonic() - THROTTLE_WINDOW_S
        with self._throttled_lock:
            self._throttled = {k: t for k, t in self._throttled.items() if t >= cutoff}
            yield Observation(len(self._throttled))


def _attrs(**values: AttrValue | None) -> dict[str, AttrValue]:
    return {k: v for k, v in values.items() if v is not None}


class _Instruments:
    """The connector's instruments on one meter (names: docs/operations.md, workbook, alert rules)."""

    def __init__(self, meter: Meter, observe_throttled: object) -> None:
        self.refreshes: Counter = meter.create_counter(
            "connector.refresh", unit="{refresh}", description="Token refreshes by outcome")
        self.transitions: Counter = meter.create_counter(
            "connector.account.transitions", unit="{account}", description="Accounts entering a status")
        self.accounts: _Gauge = meter.create_gauge(
            "connector.accounts", unit="{account}", description="Accounts by status (daily reconciliation)")
        self.sends: Counter = meter.create_counter(
            "connector.send", unit="{message}", description="Sends by outcome and size class")
        self.send_duration: Histogram = meter.create_histogram(
            "connector.send.duration", unit="s", description="Send latency")
        self.throttles: Counter = meter.create_counter(
            "connector.graph.throttled", unit="{response}", description="Graph 429/503 answers")
        meter.create_observable_gauge(
            "connector.graph.throttled_mailboxes", callbacks=[observe_throttled],  # type: ignore[list-item]
            unit="{mailbox}", description=f"Mailboxes throttled in the last {THROTTLE_WINDOW_S:.0f} s (per instance)")
        self.webhooks: Counter = meter.create_counter(
            "connector.webhook.delivery", unit="{delivery}", description="Webhook delivery attempts by outcome")
        self.webhook_attempts: Histogram = meter.create_histogram(
            "connector.webhook.attempts", unit="{attempt}", description="Attempts a delivery took (final outcomes)")
        self.notification_lag: Histogram = meter.create_histogram(
            "connector.notification.lag", unit="s", description="Mail arrival to message.received event")


#: Telemetry off: every call is a no-op.
OFF = Telemetry()


# -- exporting ----------------------------------------------------------------------------------


def _scrubbed_exporter(inner: SpanExporter) -> SpanExporter:
    from opentelemetry.sdk.trace.export import SpanExporter

    class _Scrubbed(SpanExporter):
        """Hands ``inner`` a cleaned copy of every span: the one gate between spans and the outside."""

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return inner.export([_clean_span(s) for s in spans])

        def shutdown(self) -> None:
            inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return inner.force_flush(timeout_millis)

    return _Scrubbed()


def _clean_span(span: ReadableSpan) -> ReadableSpan:
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.trace import Status

    def attrs(a: Attributes) -> Attributes:
        return clean_attributes(a)  # type: ignore[return-value]

    status = span.status
    if status.description:
        status = Status(status.status_code, scrub(status.description))
    return ReadableSpan(
        name=scrub(span.name), context=span.context, parent=span.parent, resource=span.resource,
        attributes=attrs(span.attributes), kind=span.kind, status=status, start_time=span.start_time,
        end_time=span.end_time, instrumentation_scope=span.instrumentation_scope, links=span.links,
        events=[Event(e.name, attrs(e.attributes), e.timestamp) for e in span.events])


def _request_hook(span: Span, request: object) -> None:
    """requests instrumentation: record the URL without its query string (it may carry a secret)."""
    url = getattr(request, "url", None)
    if isinstance(url, str) and span.is_recording():
        for key in ("url.full", "http.url"):
            span.set_attribute(key, strip_url(url))


def _instrument_libraries(tracer_provider: TracerProvider) -> None:
    """Child spans: ``requests`` (Graph, Entra, webhooks, JWKS) and azure-core (Tables, Queues, Key Vault)."""
    from azure.core.settings import settings as azure_settings
    from azure.core.tracing.ext.opentelemetry_span import OpenTelemetrySpan
    from opentelemetry.instrumentation.requests import RequestsInstrumentor

    instrumentor = RequestsInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=tracer_provider, request_hook=_request_hook)
    azure_settings.tracing_implementation = OpenTelemetrySpan


def _resource() -> object:
    from opentelemetry.sdk.resources import Resource

    return Resource.create({"service.name": os.environ.get("WEBSITE_SITE_NAME") or SERVICE_NAME})


def _tracing(span_exporter: SpanExporter, *, batch: bool) -> TracerProvider:
    """The global TracerProvider, exporting through the scrubbing gate, with the libraries instrumented."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=_resource())  # type: ignore[arg-type]
    processor = BatchSpanProcessor if batch else SimpleSpanProcessor
    provider.add_span_processor(processor(_scrubbed_exporter(span_exporter)))
    trace.set_tracer_provider(provider)
    _instrument_libraries(provider)
    return provider


def install(*, span_exporter: SpanExporter, metric_readers: Sequence[MetricReader], batch: bool = True) -> Telemetry:
    """Global providers exporting through ``span_exporter`` (scrubbed) and ``metric_readers``; the facade over
    them. Tests pass in-memory exporters here (once per process: OpenTelemetry's globals are set once)."""
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider

    tracer_provider = _tracing(span_exporter, batch=batch)
    meter_provider = MeterProvider(metric_readers=list(metric_readers),
                                   resource=tracer_provider.resource)
    metrics.set_meter_provider(meter_provider)
    return Telemetry(tracer=tracer_provider.get_tracer(INSTRUMENTATION),
                     meter=meter_provider.get_meter(INSTRUMENTATION))


def _console() -> Telemetry:
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    return install(span_exporter=ConsoleSpanExporter(),
                   metric_readers=[PeriodicExportingMetricReader(ConsoleMetricExporter(), 60_000)], batch=False)


def _azure(settings: Settings) -> Telemetry:
    """Application Insights: metrics and ``connector`` logs by the distro, traces through the scrubbing exporter."""
    from azure.monitor.opentelemetry import configure_azure_monitor
    from azure.monitor.opentelemetry.exporter import AzureMonitorTraceExporter
    from opentelemetry import metrics

    conn = settings.appinsights_connection_string
    credential = _credential(settings)
    tracer_provider = _tracing(AzureMonitorTraceExporter(connection_string=conn, credential=credential), batch=True)
    # Tracing stays ours (above); the distro sets the meter and logger providers. Its instrumentations are
    # off: requests and azure-core are instrumented by _tracing, with the URL hook.
    configure_azure_monitor(
        connection_string=conn, credential=credential, disable_tracing=True, enable_live_metrics=False,
        logger_name="connector", resource=tracer_provider.resource,
        instrumentation_options={lib: {"enabled": False} for lib in _DISTRO_LIBRARIES})
    return Telemetry(tracer=tracer_provider.get_tracer(INSTRUMENTATION),
                     meter=metrics.get_meter_provider().get_meter(INSTRUMENTATION))


def _credential(settings: Settings) -> object | None:
    """Entra ingestion (the component has local auth off): the app's user-assigned managed identity."""
    if not settings.managed_identity_available:
        return None
    from azure.identity import ManagedIdentityCredential

    return ManagedIdentityCredential(client_id=settings.azure_client_id) if settings.azure_client_id \
        else ManagedIdentityCredential()


def mode_of(settings: Settings) -> str:
    """``azure``, ``console`` or ``off``, from ``TELEMETRY_EXPORTER`` (``auto``: Azure when a connection string is set)."""
    mode = settings.telemetry_exporter
    if mode == "auto":
        return "azure" if settings.appinsights_connection_string else "off"
    return mode


_lock = threading.Lock()
_current: Telemetry | None = None


def get_telemetry(settings: Settings | None = None) -> Telemetry:
    """The process's telemetry, configured on first use (inside the first invocation, never at import)
    from ``settings`` (those of the connector asking), else from the process's settings."""
    global _current
    if _current is None:
        with _lock:
            if _current is None:
                from shared.config import get_settings

                mode = "off"
                try:
                    settings = settings or get_settings()
                    redact_webhook_host(settings.webhook_url)
                    mode = mode_of(settings)
                    _current = _azure(settings) if mode == "azure" else _console() if mode == "console" else OFF
                except Exception as e:  # telemetry must never fail an invocation
                    import logging

                    logging.getLogger("connector.telemetry").error(
                        "telemetry (%s) could not be configured: %s; continuing without it", mode, type(e).__name__)
                    _current = OFF
    return _current


def use(telemetry: Telemetry) -> Telemetry:
    """Make ``telemetry`` the process's (tests; a host that builds its own)."""
    global _current
    with _lock:
        _current = telemetry
    return telemetry
