"""Local development stack: Microsoft sandbox, Azurite launcher and a dev Functions host.

Never deployed (excluded by ``.funcignore``). Nothing in ``shared/`` imports from here.
"""

from __future__ import annotations

import argparse
import os


def port_number(value: str) -> int:
    """argparse type for a TCP port: a clear message instead of a traceback for 70000 or "abc"."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535)")
    return port


def env_port(name: str, default: int) -> str:
    """The default of a ``--port`` option from the environment, validated by :func:`port_number` later."""
    return os.environ.get(name) or str(default)
