"""Logging policy: our own structured lines at INFO; libraries that could echo HTTP details are
kept at WARNING (azure-core's HTTP logging policy prints headers; MSAL at DEBUG prints requests).

On Azure Functions (``telemetryMode: OpenTelemetry``, ``PYTHON_ENABLE_OPENTELEMETRY``) the ``connector``
loggers are exported to Application Insights by the Azure Monitor distro once telemetry is configured
(shared/telemetry.py, docs/operations.md); without a connection string, lines go to the console. The
HTTP log line carries the OpenTelemetry ``traceId`` next to the ``correlationId``.

**One record, one line** (log forging, CWE-117): a value from a request (an Entra ``error`` on the
callback, a header, an id) must never start a new line that reads like a record of its own.
:func:`configure` installs a log-record factory that renders every record's message once and
escapes line breaks and other control characters in it (``\\n`` becomes the two characters
``\\`` ``n``), whatever handler or formatter the host puts behind it; :class:`SafeFormatter` does
the same for the formatted output, traceback included, where we own the handler (the dev host).
:func:`safe` escapes one value for code that builds a message itself.
"""

from __future__ import annotations

import logging
import re

_NOISY = ("azure", "azure.core.pipeline.policies.http_logging_policy", "msal", "urllib3", "werkzeug")
_done = False
# C0 and C1 controls, DEL, the Unicode line and paragraph separators, and the bidi controls that can
# make a line read differently from its bytes (Trojan Source, CVE-2021-42574).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    c = m.group(0)
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c) or f"\\u{ord(c):04x}"


def safe(value: object, max_len: int = 256) -> str:
    """``value`` as one printable line: controls escaped, cut to ``max_len`` characters."""
    text = str(value)
    if len(text) > max_len:
        text = text[:max_len] + "…"
    return _UNSAFE.sub(_escape, text)


def escape_lines(text: str) -> str:
    """The whole of ``text`` on one line (no length cap)."""
    return _UNSAFE.sub(_escape, text)


class SafeFormatter(logging.Formatter):
    """A formatter whose output is always one line (a traceback's line breaks are escaped too)."""

    def format(self, record: logging.LogRecord) -> str:
        return escape_lines(super().format(record))


def _install_record_factory() -> None:
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_one_line", False):
        return

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep the record as it is, the handler reports it
            return record
        if _UNSAFE.search(message):
            record.msg, record.args = escape_lines(message), None
        return record

    factory._one_line = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def configure() -> None:
    global _done
    if _done:
        return
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("connector").setLevel(logging.INFO)
    _install_record_factory()
    _done = True
