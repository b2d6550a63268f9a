"""Sandbox fixtures: one private sandbox per test session (separate from the root ``sandbox`` fixture so
resets here never disturb the end-to-end tests)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from devstack.sandbox import SandboxControl, SandboxServer


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[SandboxServer]:
    server = SandboxServer(port=0).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sandbox_control(sandbox_server: SandboxServer) -> Iterator[SandboxControl]:
    ctl = SandboxControl(sandbox_server.url, verify=sandbox_server.ca_path)
    yield ctl
    ctl.close()


@pytest.fixture()
def ctl(sandbox_control: SandboxControl) -> SandboxControl:
    """A freshly reset sandbox for each test."""
    sandbox_control.reset(clients=True)
    return sandbox_control


@pytest.fixture(scope="session")
def http(sandbox_server: SandboxServer) -> Iterator[requests.Session]:
    """A session that trusts only the sandbox CA and ignores REQUESTS_CA_BUNDLE / proxies."""
    s = requests.Session()
    s.trust_env = False
    s.verify = sandbox_server.ca_path
    yield s
    s.close()
