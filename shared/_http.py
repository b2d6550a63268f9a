"""The one way this app makes an HTTP client: :func:`new_session`.

Every outbound call (Entra token endpoint, Microsoft Graph, Key Vault through the Azure SDK,
webhooks) goes through a ``requests.Session`` built here, injected into the module that uses it,
so that three things are true everywhere:

* **Trust is explicit.** ``trust_env`` is False: requests otherwise lets ``REQUESTS_CA_BUNDLE`` /
  ``CURL_CA_BUNDLE`` replace the session's ``verify`` and applies ``*_PROXY`` / ``.netrc`` from the
  environment (see ``requests.Session.merge_environment_settings``). ``verify`` is certifi's bundle,
  or — when ``MS_CA_BUNDLE`` names an extra CA (the local sandbox's) — certifi's bundle *plus*
  that CA, so the public roots stay trusted alongside it.
* **Nothing waits forever.** requests has no default timeout; :class:`TimeoutSession` applies
  ``timeout`` (connect, read) to every request that does not pass its own.
* **Connections are pooled** with a pool sized for the Functions host's concurrency.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from typing import Any

import certifi
import requests
from requests.adapters import HTTPAdapter

from shared.errors import ConfigurationError

Timeout = float | tuple[float, float]

#: (connect, read) seconds applied to every request that does not pass ``timeout=``.
DEFAULT_TIMEOUT: Timeout = (5, 30)

_bundle_lock = threading.Lock()
_bundle_cache: dict[tuple[str, int, int], str] = {}


class TimeoutSession(requests.Session):
    """A ``requests.Session`` whose requests get ``default_timeout`` unless they pass ``timeout``."""

    def __init__(self, *, default_timeout: Timeout = DEFAULT_TIMEOUT) -> None:
        super().__init__()
        self.default_timeout = default_timeout

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        # After method and url, Session.request takes params, data, headers, cookies, files, auth,
        # timeout: a 7th extra positional argument is the timeout. Only fill it when absent.
        if len(args) < 7 and kwargs.get("timeout") is None:
            kwargs["timeout"] = self.default_timeout
        return super().request(method, url, *args, **kwargs)


def ca_bundle_path(ca_bundle: str | os.PathLike[str] | None) -> str:
    """The file to give ``verify=``: certifi's bundle, or certifi's bundle plus ``ca_bundle``.

    The combined file is written once per (extra CA path, mtime, size) into the temp directory under
    a content-addressed name, atomically, so concurrent processes and threads agree on it.
    """
    if ca_bundle is None:
        return certifi.where()
    path = os.path.realpath(os.fspath(ca_bundle))
    try:
        st = os.stat(path)
    except OSError:
        raise ConfigurationError("MS_CA_BUNDLE must be the path of a readable PEM file", setting="MS_CA_BUNDLE") from None
    key = (path, st.st_mtime_ns, st.st_size)
    with _bundle_lock:
        cached = _bundle_cache.get(key)
        if cached and os.path.exists(cached):
            return cached
        try:
            with open(path, "rb") as fh:
                extra = fh.read()
        except OSError:
            raise ConfigurationError(
                "MS_CA_BUNDLE must be the path of a readable PEM file", setting="MS_CA_BUNDLE"
            ) from None
        if b"-----BEGIN CERTIFICATE-----" not in extra:
            raise ConfigurationError("MS_CA_BUNDLE must contain PEM certificates", setting="MS_CA_BUNDLE")
        with open(certifi.where(), "rb") as fh:
            public = fh.read()
        combined = public.rstrip(b"\n") + b"\n\n# Extra CA from MS_CA_BUNDLE\n" + extra.strip() + b"\n"
        digest = hashlib.sha256(combined).hexdigest()[:24]
        target = os.path.join(tempfile.gettempdir(), f"outlook-connector-ca-{digest}.pem")
        if not os.path.exists(target):
            fd, tmp = tempfile.mkstemp(prefix="outlook-connector-ca-", suffix=".tmp", dir=os.path.dirname(target))
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(combined)
                os.chmod(tmp, 0o644)  # public certificates only
                os.replace(tmp, target)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        _bundle_cache[key] = target
        return target


def new_session(
    ca_bundle: str | os.PathLike[str] | None,
    *,
    pool_size: int = 32,
    timeout: Timeout | None = None,
) -> requests.Session:
    """A pooled session that verifies TLS against certifi (+ ``ca_bundle``) and never waits forever.

    ``timeout`` (default :data:`DEFAULT_TIMEOUT`, read at call time) applies to every request made
    without an explicit ``timeout=``.
    """
    session = TimeoutSession(default_timeout=DEFAULT_TIMEOUT if timeout is None else timeout)
    session.trust_env = False
    session.verify = ca_bundle_path(ca_bundle)
    # No transport-level retries: callers own retry policy (a send must never be replayed blindly).
    adapter = HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session
