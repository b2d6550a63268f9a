"""Graph subscriptions on an account's mailbox (one per feed: Inbox, Sent Items, mailbox-wide changes), and
where we keep them.

Microsoft's contract (https://learn.microsoft.com/graph/change-notifications-delivery-webhooks):

* ``POST /subscriptions`` with ``changeType``, ``notificationUrl``, ``lifecycleNotificationUrl``,
  ``resource``, ``expirationDateTime`` and a ``clientState`` of at most 128 characters; before it
  answers 201, Graph validates *both* URLs (``?validationToken=…`` echoed as text/plain within 10 s).
* An Outlook message subscription lives at most 10,080 minutes (under 7 days,
  https://learn.microsoft.com/graph/api/resources/subscription#subscription-lifetime); it is renewed
  with ``PATCH /subscriptions/{id}`` (which also reauthorizes it), reauthorized with
  ``POST /subscriptions/{id}/reauthorize`` and removed with ``DELETE``
  (https://learn.microsoft.com/graph/change-notifications-lifecycle-events).

Table ``subscriptions`` holds two kinds of rows:

* **state**, one per feed (PartitionKey = owner partition, RowKey = account id for the Inbox feed, account id +
  ``|feed|`` + feed name for the others): the subscription id, its expiry, the folder's delta link and the due
  time of the next maintenance (renewal / safety catch-up);
* **creation claim** (owner partition, RowKey = the state's RowKey + ``|creating``): held by the one worker
  that creates the feed's subscription, so concurrent jobs (four connects at once) make one;
* **pointer list** (owner partition, RowKey = account id + ``|cs|`` + pointer key): every pointer an
  account has, so a disconnect finds (and deletes at Graph) every subscription whose id was recorded,
  even one whose creation crashed before the state row was written (a crash between Graph's answer and
  the pointer's update leaves a subscription we cannot name: it expires by itself within 7 days);
* **pointer** (PartitionKey = ``cs-`` + SHA-256 of the clientState, RowKey = ``cs``): owner,
  account, feed, subscription id and the clientState sealed with the token key ring. The notification
  endpoint finds a subscription by the clientState a notification carries, so a pointer written
  *before* ``POST /subscriptions`` already recognises notifications that race its answer; an unknown
  or wrong clientState finds nothing. The clientState is a 256-bit random value, so its SHA-256 in a
  key reveals nothing; the sealed copy is compared in constant time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from shared.accounts import iso, owner_partition, parse_iso, utcnow
from shared.crypto import RingSource, account_aad
from shared.errors import MicrosoftError, NotFoundError
from shared.graph import mailbox_path
from shared.notifications import FEED_NAMES, INBOX
from shared.storage import etag_of

if TYPE_CHECKING:
    from shared.graph import GraphClient, TokenSource
    from shared.notifications import Feed
    from shared.rich_notifications import EncryptionCertificate
    from shared.storage import EntityValue, Row, Table

# Outlook messages: at most 10,080 minutes; ask for a little less so clock skew never makes Graph refuse it.
MAX_LIFETIME = dt.timedelta(minutes=10_080)
REQUESTED_LIFETIME = MAX_LIFETIME - dt.timedelta(minutes=10)
# With resource data, 1,440 minutes (https://learn.microsoft.com/graph/api/resources/subscription#subscription-lifetime).
RICH_LIFETIME = dt.timedelta(minutes=1_440) - dt.timedelta(minutes=10)
CLIENT_STATE_BYTES = 32  # 43 base64url characters, within Graph's 128
_POINTER_RK = "cs"
IMMUTABLE_IDS = "immutable"  # SubscriptionState.id_type of a subscription created with immutable ids
_CREATING = "|creating"
_POINTER_LIST = "|cs|"
_FEED = "|feed|"
CREATION_STALE = dt.timedelta(minutes=2)  # Graph validates both URLs (10 s each) before it answers
_NOT_FOUND_CODES = {"ResourceNotFound", "ItemNotFound", "ErrorItemNotFound", "NotFound", "InvalidSubscriptionId"}


class SubscriptionGoneError(Exception):
    """Graph no longer knows the subscription (expired, removed): create a new one."""


@dataclass(frozen=True)
class SubscriptionState:
    owner: str
    account_id: str
    subscription_id: str = ""
    client_key: str = ""  # the pointer row's PartitionKey
    feed: str = INBOX
    # "immutable": created with Prefer: IdType="ImmutableId", so its notifications name messages by immutable ids.
    # "" for a subscription made before, which Graph keeps notifying with regular ids until it is recreated.
    id_type: str = ""
    rich: bool = False  # created with includeResourceData (lifetime RICH_LIFETIME)
    cert_id: str = ""  # the encryptionCertificateId it was created with
    expires_at: dt.datetime | None = None
    delta_link: str = ""
    delta_synced_at: dt.datetime | None = None  # start of the last complete catch-up round
    due_at: dt.datetime | None = None  # next maintenance (index row)
    failures: int = 0
    last_error: str = ""
    etag: str | None = None


@dataclass(frozen=True)
class Pointer:
    owner: str
    account_id: str
    subscription_id: str
    feed: str = INBOX


def state_key(account_id: str, feed: str) -> str:
    """The state row's RowKey: the account id for the Inbox feed (as before there were feeds)."""
    return account_id if feed == INBOX else account_id + _FEED + feed


def client_key(client_state: str) -> str:
    return "cs-" + hashlib.sha256(client_state.encode("utf-8", "surrogatepass")).hexdigest()


class SubscriptionStore:
    """State and pointer rows (errors mapped by :mod:`shared.storage`)."""

    def __init__(self, table: Table, key_ring: RingSource) -> None:
        self._table = table
        self._key_ring = key_ring

    # -- state rows ---------------------------------------------------------------------------
    def get(self, owner: str, account_id: str, feed: str = INBOX) -> SubscriptionState | None:
        try:
            return _state_from(self._table.get(owner_partition(owner), state_key(account_id, feed)))
        except NotFoundError:
            return None

    def states_of(self, owner: str, account_id: str) -> dict[str, SubscriptionState]:
        """Every feed's state of the account: one range read from the Inbox row (the account id) to the other
        feeds' (``|feed|…``); the account's claim and pointer-list rows in between are skipped."""
        rows = self._table.query("PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
                                 parameters={"pk": owner_partition(owner), "lo": account_id,
                                             "hi": account_id + _FEED + "~"})
        states = (_state_from(row) for row in rows if _is_state_key(str(row["RowKey"])))
        return {state.feed: state for state in states if state.account_id == account_id}

    def save(self, state: SubscriptionState) -> SubscriptionState:
        """Write the state row (upsert: the worker of one account is the only writer that matters;
        a lost race costs at most one extra renewal or catch-up)."""
        return replace(state, etag=self._table.replace(_state_entity(state), etag=None))

    def delete(self, state: SubscriptionState) -> None:
        """One feed's state row, its pointer and its creation claim."""
        pk = owner_partition(state.owner)
        rk = state_key(state.account_id, state.feed)
        self._table.delete_if_present(pk, rk)
        self.drop_pointer(state.owner, state.account_id, state.client_key)
        self._table.delete_if_present(pk, rk + _CREATING)

    def delete_account(self, owner: str, account_id: str, *, states: Iterable[SubscriptionState] | None = None,
                       keys: set[str] | None = None) -> None:
        """Every feed's state row, every pointer and every creation claim of the account (``states``, ``keys``:
        the states and pointer keys already read, so they are not read again)."""
        pk = owner_partition(owner)
        found = list(states if states is not None else self.states_of(owner, account_id).values())
        listed = keys if keys is not None else {key for key, _ in self.pointers_of(owner, account_id)}
        for state in found:
            self._table.delete_if_present(pk, state_key(account_id, state.feed))
        for key in (listed | {state.client_key for state in found}) - {""}:
            self.drop_pointer(owner, account_id, key)
        for feed in FEED_NAMES:  # a disconnect holds every feed's claim
            self._table.delete_if_present(pk, state_key(account_id, feed) + _CREATING)

    def all_states(self) -> list[SubscriptionState]:
        """Every state row (the daily reconciliation only)."""
        rows = self._table.query("RowKey ne @p", parameters={"p": _POINTER_RK})
        return [_state_from(e) for e in rows if _is_state_key(str(e.get("RowKey")))]

    # -- the creation claim -------------------------------------------------------------------
    def claim_creation(self, owner: str, account_id: str, feed: str = INBOX) -> str | None:
        """The right to create the feed's subscription (its ETag), or None while another worker holds it."""
        now = utcnow()

        def abandoned(row: Row) -> bool:
            since = parse_iso(row.get("at"))
            return since is None or since <= now - CREATION_STALE

        return self._table.claim({"PartitionKey": owner_partition(owner),
                                  "RowKey": state_key(account_id, feed) + _CREATING, "at": iso(now)},
                                 take_over=abandoned).etag

    def release_creation(self, owner: str, account_id: str, etag: str, feed: str = INBOX) -> None:
        self._table.delete_if_present(owner_partition(owner), state_key(account_id, feed) + _CREATING, etag=etag)

    # -- pointer rows ---------------------------------------------------------------------------
    def new_pointer(self, owner: str, account_id: str, feed: str = INBOX) -> tuple[str, str]:
        """A fresh clientState and its pointer row (subscription id still unknown): (clientState, key)."""
        client_state = secrets.token_urlsafe(CLIENT_STATE_BYTES)
        key = client_key(client_state)
        sealed = self._key_ring().seal(client_state.encode(), aad=account_aad(owner, account_id, "clientState"))
        # Listed first: a pointer that exists is always listed, so a disconnect finds it.
        self._table.upsert({"PartitionKey": owner_partition(owner), "RowKey": account_id + _POINTER_LIST + key})
        self._table.create({"PartitionKey": key, "RowKey": _POINTER_RK, "owner": owner, "accountId": account_id,
                            "feed": feed, "subscriptionId": "", "clientState": sealed})
        return client_state, key

    def bind_pointer(self, key: str, subscription_id: str) -> None:
        self._table.merge({"PartitionKey": key, "RowKey": _POINTER_RK, "subscriptionId": subscription_id})

    def drop_pointer(self, owner: str, account_id: str, key: str) -> None:
        if key:
            self._table.delete_if_present(key, _POINTER_RK)
            self._table.delete_if_present(owner_partition(owner), account_id + _POINTER_LIST + key)

    def pointers_of(self, owner: str, account_id: str) -> list[tuple[str, str]]:
        """(pointer key, subscription id or "") of every pointer the account has (one partition range read,
        then one read per pointer: an account has one, or a few after a crash)."""
        prefix = account_id + _POINTER_LIST
        rows = self._table.query("PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
                                 parameters={"pk": owner_partition(owner), "lo": prefix, "hi": prefix + "~"},
                                 select=["RowKey"])
        found = []
        for row in rows:
            key = str(row["RowKey"])[len(prefix):]
            try:
                found.append((key, str(self._table.get(key, _POINTER_RK).get("subscriptionId") or "")))
            except NotFoundError:
                found.append((key, ""))
        return found

    def lookup(self, client_state: str) -> Pointer | None:
        """The subscription a clientState belongs to, or None (unknown or wrong clientState)."""
        try:
            e = self._table.get(client_key(client_state), _POINTER_RK)
        except NotFoundError:
            return None
        owner, account_id = str(e.get("owner") or ""), str(e.get("accountId") or "")
        try:
            sealed = str(e.get("clientState") or "")
            stored = self._key_ring(sealed).open(sealed,
                                           aad=account_aad(owner, account_id, "clientState"))
        except Exception:  # tampered or moved row: not ours
            return None
        if not hmac.compare_digest(stored, client_state.encode("utf-8", "surrogatepass")):
            return None
        return Pointer(owner, account_id, str(e.get("subscriptionId") or ""), str(e.get("feed") or INBOX))


# -- Graph calls ---------------------------------------------------------------------------------
def create(graph: GraphClient, token: TokenSource, mailbox: str, feed: Feed, *, notification_url: str,
           lifecycle_url: str, client_state: str, now: dt.datetime,
           encryption: EncryptionCertificate | None = None) -> tuple[str, dt.datetime]:
    """POST /subscriptions (Graph validates both URLs first). Returns (id, expiry). With ``encryption``, a rich
    subscription: the feed's properties, encrypted to that certificate, in every notification.
    https://learn.microsoft.com/graph/api/subscription-post-subscriptions,
    https://learn.microsoft.com/graph/change-notifications-with-resource-data"""
    lifetime = RICH_LIFETIME if encryption is not None else REQUESTED_LIFETIME
    resource = mailbox_path(token.root, feed.resource)  # users/{address}/… for a team mailbox
    body: dict[str, object] = {
        "changeType": ",".join(feed.change_types), "notificationUrl": notification_url,
        "lifecycleNotificationUrl": lifecycle_url, "resource": resource,
        "expirationDateTime": iso(now + lifetime), "clientState": client_state, "latestSupportedTlsVersion": "v1_2"}
    if encryption is not None:
        body.update(resource=f"{resource}?$select={','.join(feed.select)}", includeResourceData=True,
                    encryptionCertificate=encryption.certificate_b64, encryptionCertificateId=encryption.id)
    doc = graph.request("POST", "subscriptions", mailbox=mailbox, token=token, json=body, safe=False).json()
    return str(doc["id"]), parse_iso(doc.get("expirationDateTime")) or now + lifetime


def renew(graph: GraphClient, token: TokenSource, mailbox: str, subscription_id: str, *,
          now: dt.datetime, rich: bool = False) -> dt.datetime:
    """PATCH /subscriptions/{id}: renews and reauthorizes. https://learn.microsoft.com/graph/api/subscription-update"""
    lifetime = RICH_LIFETIME if rich else REQUESTED_LIFETIME
    body = {"expirationDateTime": iso(now + lifetime)}
    try:
        doc = graph.request("PATCH", f"subscriptions/{subscription_id}", mailbox=mailbox, token=token, json=body,
                            safe=True).json()
    except MicrosoftError as e:
        raise _gone_or(e) from None
    return parse_iso(doc.get("expirationDateTime")) or now + lifetime


def reauthorize(graph: GraphClient, token: TokenSource, mailbox: str, subscription_id: str) -> None:
    """POST /subscriptions/{id}/reauthorize (a ``reauthorizationRequired`` challenge).
    https://learn.microsoft.com/graph/api/subscription-reauthorize"""
    try:
        graph.request("POST", f"subscriptions/{subscription_id}/reauthorize", mailbox=mailbox, token=token, safe=True)
    except MicrosoftError as e:
        raise _gone_or(e) from None


def delete(graph: GraphClient, token: TokenSource, mailbox: str, subscription_id: str) -> None:
    """DELETE /subscriptions/{id}; a subscription Graph no longer knows is deleted already."""
    try:
        graph.request("DELETE", f"subscriptions/{subscription_id}", mailbox=mailbox, token=token, safe=True)
    except MicrosoftError as e:
        if not isinstance(_gone_or(e), SubscriptionGoneError):
            raise


def _gone_or(e: MicrosoftError) -> Exception:
    code = e.microsoft.error if e.microsoft is not None else None
    return SubscriptionGoneError() if code in _NOT_FOUND_CODES else e


# -- entities ------------------------------------------------------------------------------------
def _is_state_key(rk: str) -> bool:
    if "|" not in rk:
        return True
    head, sep, name = rk.partition(_FEED)
    return bool(sep) and "|" not in head and bool(name) and "|" not in name


def _state_entity(s: SubscriptionState) -> dict[str, EntityValue]:
    return {"PartitionKey": owner_partition(s.owner), "RowKey": state_key(s.account_id, s.feed), "owner": s.owner,
            "accountId": s.account_id, "feed": s.feed, "subscriptionId": s.subscription_id, "clientKey": s.client_key,
            "idType": s.id_type, "rich": s.rich, "certId": s.cert_id,
            "expiresAt": iso(s.expires_at) or "", "deltaLink": s.delta_link,
            "deltaSyncedAt": iso(s.delta_synced_at) or "", "dueAt": iso(s.due_at) or "", "failures": s.failures,
            "lastError": s.last_error, "updatedAt": iso(utcnow())}


def _state_from(e: Row) -> SubscriptionState:
    def text(name: str) -> str:
        value = e.get(name)
        return str(value) if value else ""

    failures = e.get("failures")
    return SubscriptionState(
        owner=text("owner"), account_id=text("accountId") or text("RowKey"), subscription_id=text("subscriptionId"),
        client_key=text("clientKey"), feed=text("feed") or INBOX, id_type=text("idType"),
        rich=e.get("rich") is True, cert_id=text("certId"),
        expires_at=parse_iso(e.get("expiresAt")),
        delta_link=text("deltaLink"),
        delta_synced_at=parse_iso(e.get("deltaSyncedAt")), due_at=parse_iso(e.get("dueAt")),
        failures=failures if isinstance(failures, int) else 0, last_error=text("lastError"),
        etag=etag_of(e))
