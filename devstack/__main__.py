"""``python -m devstack {up,sandbox,azurite,host,token}`` — the local stack (never deployed)."""

from __future__ import annotations

import sys

USAGE = """usage: python -m devstack COMMAND [options]

  up        start Azurite + the Microsoft sandbox + the dev host; print URLs and a caller token
  sandbox   start only the Microsoft sandbox (HTTPS, login + Graph)
  azurite   start only Azurite (Table + Queue storage)
  host      start only the dev Functions host for function_app.py (port 7071)
  token     print a development caller token (python -m devstack token [sub])
  connect   connect a sandbox test mailbox without a browser; print its account id
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if args else 2
    cmd, rest = args[0], args[1:]
    if cmd == "up":
        from devstack.up import main as run
    elif cmd == "sandbox":
        from devstack.sandbox import main as run
    elif cmd == "azurite":
        from devstack.azurite import main as run
    elif cmd == "host":
        from devstack.host import main as run
    elif cmd == "token":
        from devstack.up import token_main as run
    elif cmd == "connect":
        from devstack.signin import main as run
    else:
        print(f"devstack: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return int(run(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
