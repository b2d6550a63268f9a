"""Operator command line, against the same storage and settings as the app.

    python -m shared.cli list [--owner SUB]
    python -m shared.cli show OWNER ACCOUNT_ID
    python -m shared.cli diagnose OWNER ACCOUNT_ID
    python -m shared.cli refresh OWNER ACCOUNT_ID
    python -m shared.cli reencrypt

Settings come from the environment (the app settings); run locally, the ``Values`` of
``local.settings.json`` (``--settings``, in the current folder by default) fill in what the
environment does not set, as Azure Functions Core Tools does. Output is JSON; never a token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from shared.errors import ConnectorError, to_problem


def _print(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


def load_local_settings(path: Path) -> int:
    """Fill the environment from ``path``'s ``Values`` (never overriding a set variable); a relative
    ``MS_CA_BUNDLE`` is taken relative to the file. Returns how many settings were applied."""
    if not path.is_file():
        return 0
    values = json.loads(path.read_text()).get("Values", {})
    applied = 0
    for name, value in values.items():
        if name not in os.environ:
            os.environ[name] = str(value)
            applied += 1
    ca = os.environ.get("MS_CA_BUNDLE", "")
    if ca and not os.path.isabs(ca) and "MS_CA_BUNDLE" in values:
        os.environ["MS_CA_BUNDLE"] = str(path.resolve().parent / ca)
    return applied


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shared.cli", description="Operate the Outlook connector: "
                                "inspect accounts, run their diagnosis, refresh them, re-encrypt stored tokens.")
    p.add_argument("--settings", type=Path, default=Path("local.settings.json"),
                   help="local settings file whose Values fill in unset environment variables "
                        "(default: ./local.settings.json; ignored when missing)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    ls = sub.add_parser("list", help="list accounts (all owners unless --owner)",
                        description="List accounts as their public JSON, with their owner.")
    ls.add_argument("--owner", help="only this owner's accounts (the caller JWT's sub)")
    for name, text in (("show", "one account's public JSON"),
                       ("diagnose", "run the checks that explain a broken mailbox"),
                       ("refresh", "refresh the account's tokens now")):
        sp = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        sp.add_argument("owner", help="the owner (the caller JWT's sub)")
        sp.add_argument("account_id", help="the account id (acc_…)")
    sub.add_parser("reencrypt", help="re-seal every record with the active key",
                   description="Re-seal every stored token record not under the active key of the key ring "
                               "(after a rotation); progress goes to standard error as it goes.")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    load_local_settings(a.settings)
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
            def progress(examined: int, total: int, rewritten: int) -> None:
                print(f"reencrypt: {examined}/{total} examined, {rewritten} re-encrypted", file=sys.stderr,
                      flush=True)

            seen, rewritten = c.accounts.reencrypt_all(on_progress=progress)
            _print({"examined": seen, "reencrypted": rewritten, "activeKey": c.secrets.key_ring().active_kid})
    except ConnectorError as e:
        _print(to_problem(e).body)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
