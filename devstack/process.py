"""A devstack server as a subprocess (the dev host, the sandbox), started and awaited one way.

Tests and benchmarks use it: it polls the server's health URL (never a blind sleep), fails fast
with the log tail when the process dies, and always terminates the process it started.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import requests

from devstack.azurite import ROOT, DevstackError


class ServerProcess:
    """``python -m <args>`` with stdout and stderr in ``log_path``, healthy when ``health_url`` answers."""

    def __init__(self, args: Sequence[str], *, env: Mapping[str, str], log_path: Path, health_url: str,
                 verify: str | bool = True) -> None:
        self.args, self.log_path, self.health_url = list(args), log_path, health_url
        self._http = requests.Session()
        self._http.trust_env = False  # proxies / REQUESTS_CA_BUNDLE from the environment must not interfere
        self._http.verify = verify
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")  # closed by stop()
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", *self.args], cwd=ROOT, env=dict(env),
                                         stdout=self._log, stderr=subprocess.STDOUT)
        except BaseException:
            self._log.close()
            self._http.close()
            raise

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_healthy(self, timeout: float = 60.0, *, ok: Collection[int] = (200,),
                     interval: float = 0.1) -> ServerProcess:
        """Poll ``health_url`` until it answers a status in ``ok``; on exit or timeout, stop and raise."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise DevstackError(f"{' '.join(self.args)} exited with status {self.proc.returncode}:\n"
                                    f"{self.log_tail()}")
            try:
                if self._http.get(self.health_url, timeout=5).status_code in ok:
                    return self
            except requests.RequestException:
                pass  # not listening yet
            if time.monotonic() > deadline:
                self.stop()
                raise DevstackError(f"{' '.join(self.args)}: {self.health_url} did not answer {sorted(ok)} "
                                    f"within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(interval)

    def stop(self) -> None:
        """Terminate (then kill) the process and close its log; safe to call twice."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        self._http.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_host(env: Mapping[str, str], port: int, log_path: Path) -> ServerProcess:
    """``python -m devstack host --port PORT``: call ``wait_healthy()`` next, and ``stop()`` when done."""
    return ServerProcess(["devstack", "host", "--port", str(port)], env=env, log_path=log_path,
                         health_url=f"http://127.0.0.1:{port}/api/health")
