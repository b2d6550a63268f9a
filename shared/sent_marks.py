"""What this API sent, by the id of the message's Sent Items copy: so a rich ``message.sent`` learns its origin
without a Graph read.

With rich notifications Graph sends the Sent Items copy's properties, but not our trackingId: that is an
extended property, which Graph returns only through ``$expand``, never in notification resource data. So, when
rich notifications and ``message.sent`` are both on, the API sends through a draft (``POST /me/messages`` with
``Prefer: IdType="ImmutableId"``, then ``POST /me/messages/{id}/send``): a draft's immutable id is the id of its
Sent Items copy (https://learn.microsoft.com/graph/outlook-immutable-id, "Immutable ID with sending mail"). The
mark is written *before* the send, so it exists when Graph notifies; a Sent Items message without a mark was
sent from elsewhere (Outlook, a phone, another app).

Rows live in the de-duplication table (PartitionKey = account id, RowKey = ``apisent-`` + SHA-256 of the message
id), expire with it (:data:`shared.notifications.DEDUP_WINDOW`) and are purged by the daily reconciliation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from shared.accounts import iso, utcnow
from shared.errors import NotFoundError
from shared.notifications import DEDUP_WINDOW

if TYPE_CHECKING:
    from shared.storage import Table


def _row_key(message_id: str) -> str:
    return "apisent-" + hashlib.sha256(message_id.encode()).hexdigest()[:48]


class SentMarks:
    def __init__(self, table: Table) -> None:
        self._table = table

    def recorder(self, account_id: str, tracking_id: str) -> Callable[[str], None]:
        """What the send path calls with the draft's id just before it sends the draft."""
        def record(message_id: str) -> None:
            now = utcnow()
            self._table.upsert({"PartitionKey": account_id, "RowKey": _row_key(message_id), "state": "apisent",
                                "trackingId": tracking_id, "at": iso(now), "expiresAt": iso(now + DEDUP_WINDOW)})
        return record

    def tracking_id(self, account_id: str, message_id: str) -> str | None:
        """The trackingId this API sent the message with, or None (sent from elsewhere)."""
        try:
            row = self._table.get(account_id, _row_key(message_id))
        except NotFoundError:
            return None
        value = row.get("trackingId")
        return str(value) if value else None
