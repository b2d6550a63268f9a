"""Pure logic of team mailboxes: the one place that turns /me paths into /users/{address} paths, the address rule,
what an application token says about itself, and the Account JSON of a team mailbox."""

from __future__ import annotations

import datetime as dt

import jwt
import pytest

from shared.accounts import APPLICATION, Account
from shared.errors import ValidationError
from shared.graph import mailbox_path
from shared.mail import mailbox_address
from shared.tenant_access import app_token_of


@pytest.mark.parametrize(("root", "path", "expected"), [
    ("me", "me/messages", "me/messages"),
    ("users/support@contoso.com", "me", "users/support@contoso.com"),
    ("users/support@contoso.com", "me/mailFolders/inbox", "users/support@contoso.com/mailFolders/inbox"),
    ("users/support@contoso.com", "subscriptions", "subscriptions"),
    ("users/support@contoso.com", "messages/me", "messages/me"),
    ("users/support@contoso.com", "meetings", "meetings"),  # only the segment "me", not a prefix of a word
])
def test_mailbox_path(root: str, path: str, expected: str) -> None:
    assert mailbox_path(root, path) == expected


@pytest.mark.parametrize("bad", ["", "  ", "Support <support@contoso.com>", "a@b.com, c@d.com", "a@b.com\r\nX: y",
                                 "no-at-sign", "a" * 250 + "@contoso.com", 42, None, ["a@b.com"]])
def test_mailbox_address_refuses_anything_but_one_bare_address(bad: object) -> None:
    with pytest.raises(ValidationError) as e:
        mailbox_address(bad)
    assert e.value.field == "address"


def test_mailbox_address_keeps_a_valid_one() -> None:
    assert mailbox_address(" support@contoso.com ") == "support@contoso.com"


def test_app_token_claims_are_read_and_an_opaque_token_gives_none() -> None:
    at = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
    token = jwt.encode({"roles": ["Mail.ReadWrite", "Mail.Send"], "tid": "t-1", "idtyp": "app"}, "k" * 32,
                       algorithm="HS256")
    got = app_token_of(token, at)
    assert (got.roles, got.tenant_id, got.expires_at) == (("Mail.ReadWrite", "Mail.Send"), "t-1", at)
    assert "access_token" not in repr(got) and token not in repr(got)
    assert app_token_of("EwB-opaque", at).roles == ()


def test_a_team_mailbox_account_json_and_graph_root() -> None:
    now = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
    acc = Account(owner="o", id="acc_1", home_account_id="support@contoso.com.t-1", email="support@contoso.com",
                  display_name="support@contoso.com", tenant_id="t-1", account_type="work", status="active",
                  scopes=("Mail.ReadWrite",), connected_at=now, last_refreshed_at=None, access_token_expires_at=None,
                  last_used_at=None, last_error=None, access_type=APPLICATION, tenant_connection_id="tc_1")
    assert acc.graph_root == "users/support@contoso.com"
    public = acc.to_public()
    assert public["accessType"] == "application" and public["tenantConnectionId"] == "tc_1"
    delegated = Account(**{**acc.__dict__, "access_type": "delegated", "tenant_connection_id": None})
    assert delegated.graph_root == "me" and "tenantConnectionId" not in delegated.to_public()
