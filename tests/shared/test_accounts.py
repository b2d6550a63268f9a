"""Account store against real Azurite: encryption at rest, key rotation, ETag-conditional writes."""

from __future__ import annotations

import base64
import datetime as dt
import secrets
import uuid
from dataclasses import replace
from typing import Any

import pytest

from shared.accounts import ACTIVE, Account, AccountStore, Tokens, owner_partition, utcnow
from shared.crypto import CryptoError, KeyRing
from shared.errors import ConflictError, NotFoundError


@pytest.fixture()
def table(azurite: Any) -> Any:
    from shared.storage import Storage
    from tests.conftest import storage_settings

    t = Storage(storage_settings(azurite.connection_string)).table("acct" + uuid.uuid4().hex[:12])
    t.create_if_missing()
    yield t


def _key() -> bytes:
    return secrets.token_bytes(32)


def _account(store: AccountStore, owner: str, acc_id: str, rt: str = "rt-secret-value") -> Account:
    now = utcnow()
    tokens = Tokens("at-secret-value", rt, now + dt.timedelta(hours=1), ("Mail.Send",), now)
    return Account(owner=owner, id=acc_id, home_account_id="oid.tid", email="a@b.example", display_name="A",
                   tenant_id="tid", account_type="work", status=ACTIVE, scopes=("Mail.Send",), connected_at=now,
                   last_refreshed_at=now, access_token_expires_at=tokens.expires_at, last_used_at=None,
                   last_error=None, sealed_tokens=store.seal_tokens(owner, acc_id, tokens))


def test_tokens_are_sealed_at_rest_and_bound_to_their_row(table: Any) -> None:
    ring = KeyRing("a", {"a": _key()})
    store = AccountStore(table, lambda: ring)
    store.create_account(_account(store, "owner-1", "acc_1"))
    store.create_account(_account(store, "owner-2", "acc_2", rt="other-rt"))
    for e in table.scan():
        flat = " ".join(str(v) for v in e.values())
        assert "rt-secret-value" not in flat and "at-secret-value" not in flat
        assert e["tokensKid"] == "a"
    a1 = store.get_account("owner-1", "acc_1")
    assert store.open_tokens(a1).refresh_token == "rt-secret-value"
    # A ciphertext copied onto another owner's row does not decrypt.
    a2 = store.get_account("owner-2", "acc_2")
    with pytest.raises(CryptoError):
        store.open_tokens(replace(a2, sealed_tokens=a1.sealed_tokens))
    assert "rt-secret-value" not in repr(a1) and "sealed" not in repr(a1).lower().replace("sealed_tokens", "")


def test_other_owner_cannot_read(table: Any) -> None:
    ring = KeyRing("a", {"a": _key()})
    store = AccountStore(table, lambda: ring)
    store.create_account(_account(store, "owner-1", "acc_1"))
    with pytest.raises(NotFoundError):
        store.get_account("owner-2", "acc_1")
    assert store.list_accounts("owner-2") == []
    assert owner_partition("owner-1") != owner_partition("owner-2")


def test_key_rotation_and_reencrypt(table: Any) -> None:
    key_a, key_b = _key(), _key()
    ring = {"now": KeyRing("A", {"A": key_a})}
    store = AccountStore(table, lambda: ring["now"])
    for i in range(5):
        store.create_account(_account(store, f"owner-{i}", f"acc_{i}"))
    ring["now"] = KeyRing("B", {"A": key_a, "B": key_b})
    for i in range(5):  # still readable under the new active key
        assert store.open_tokens(store.get_account(f"owner-{i}", f"acc_{i}")).refresh_token == "rt-secret-value"
    seen, rewritten = store.reencrypt_all()
    assert (seen, rewritten) == (5, 5)
    assert {e["tokensKid"] for e in table.scan()} == {"B"}
    ring["now"] = KeyRing("B", {"B": key_b})  # key A retired
    for i in range(5):
        assert store.open_tokens(store.get_account(f"owner-{i}", f"acc_{i}")).refresh_token == "rt-secret-value"
    assert store.reencrypt_all() == (5, 0)


def test_token_write_is_conditional_on_etag(table: Any) -> None:
    ring = KeyRing("a", {"a": base64.b64decode(base64.b64encode(_key()))})
    store = AccountStore(table, lambda: ring)
    created = store.create_account(_account(store, "o", "acc_x"))
    first = store.update_account(replace(created, display_name="first"), etag=created.etag)
    with pytest.raises(ConflictError):
        store.update_account(replace(created, display_name="stale"), etag=created.etag)
    assert store.get_account("o", "acc_x").display_name == first.display_name == "first"


def test_update_with_merges_only_changed_columns_and_stays_conditional(table: Any) -> None:
    """The ETag loop writes the differing columns as a conditional MERGE (less SDK CPU than a replace):
    a column it did not change keeps what another writer stored, and a stale ETag still loses."""
    store = AccountStore(table, lambda: KeyRing("a", {"a": _key()}))
    acc = store.create_account(_account(store, "owner-m", "acc_m"))
    read = store.get_account("owner-m", "acc_m")
    later = utcnow() + dt.timedelta(hours=2)
    saved = store.update_with(read, lambda cur: replace(cur, refresh_due_at=later, last_error=None))
    raw = table.get(owner_partition("owner-m"), "acc_m")
    assert store.get_account("owner-m", "acc_m").refresh_due_at == later
    assert raw["email"] == "a@b.example" and raw["tokensKid"] == "a"  # untouched columns are intact
    # An out-of-band column survives (a merge), and the ETag returned is the stored one.
    table.merge({"PartitionKey": owner_partition("owner-m"), "RowKey": "acc_m", "note": "x"})
    current = store.get_account("owner-m", "acc_m")
    after = store.update_with(current, lambda cur: replace(cur, display_name="B"))
    assert table.get(owner_partition("owner-m"), "acc_m")["note"] == "x"
    assert store.get_account("owner-m", "acc_m").etag == after.etag and after.display_name == "B"
    # Conditional: a write from a stale read fails its ETag check and is asked again on the fresh record.
    seen: list[str] = []

    def rename(cur: Account) -> Account:
        seen.append(cur.display_name)
        return replace(cur, display_name="C")

    assert store.update_with(saved, rename).display_name == "C"
    assert seen == ["A", "B"] and acc.etag != saved.etag
