"""Logging policy: our own structured lines at INFO; libraries that could echo HTTP details are
kept at WARNING (azure-core's HTTP logging policy prints headers; MSAL at DEBUG prints requests).

On Azure Functions the host forwards Python ``logging`` to Application Insights when
``APPLICATIONINSIGHTS_CONNECTION_STRING`` is set; without it, lines go to the console.
"""

from __future__ import annotations

import logging

_NOISY = ("azure", "azure.core.pipeline.policies.http_logging_policy", "msal", "urllib3", "werkzeug")
_done = False


def configure() -> None:
    global _done
    if _done:
        return
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("connector").setLevel(logging.INFO)
    _done = True
