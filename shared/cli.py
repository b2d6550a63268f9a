"""Operator command line, against the same storage and settings as the app.

    python -m shared.cli list [--owner SUB]
    python -m shared.cli show OWNER ACCOUNT_ID
    python -m shared.cli diagnose OWNER ACCOUNT_ID
    python -m shared.cli refresh OWNER ACCOUNT_ID
    python -m shared.cli reencrypt

Settings come from the environment (SPEC §8); locally, ``python -m devstack`` commands and
``local.settings.json`` provide them. Output is JSON; never a token.
"""

from __future__ import annotations

import argparse
import json
import sys

from shared.errors import ConnectorError, to_problem


def _print(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shared.cli", description="Operate the Outlook connector.")
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="list accounts (all owners unless --owner)")
    ls.add_argument("--owner")
    for name in ("show", "diagnose", "refresh"):
        sp = sub.add_parser(name)
        sp.add_argument("owner")
        sp.add_argument("account_id")
    sub.add_parser("reencrypt", help="re-seal every record with the active key")
    a = p.parse_args(argv)
    try:
        from shared.service import get_connector

        c = get_connector()
        if a.cmd == "list":
            rows = c.accounts.list_accounts(a.owner) if a.owner else c.accounts.list_all()
            _print([{"owner": r.owner, **r.to_public()} for r in rows])
        elif a.cmd == "show":
            _print(c.account_ops.get_account(a.owner, a.account_id))
        elif a.cmd == "diagnose":
            _print(c.account_ops.diagnose(a.owner, a.account_id))
        elif a.cmd == "refresh":
            _print(c.account_ops.refresh_account(a.owner, a.account_id))
        elif a.cmd == "reencrypt":
            seen, rewritten = c.accounts.reencrypt_all()
            _print({"examined": seen, "reencrypted": rewritten, "activeKey": c.secrets.key_ring().active_kid})
    except ConnectorError as e:
        _print(to_problem(e).body)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
