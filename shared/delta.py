"""Folder delta catch-up (Inbox, Sent Items): every message that arrived, even when every notification was lost.

Graph's message delta (https://learn.microsoft.com/graph/delta-query-messages,
https://learn.microsoft.com/graph/api/message-delta): a round of ``GET
/me/mailFolders/{id}/messages/delta`` pages follows ``@odata.nextLink`` until an
``@odata.deltaLink``, which starts the next round. Query options are given once, in the first
request of the first round (``changeType=created``, ``$select``, and the only ``$filter`` Graph
supports there, ``receivedDateTime ge …``); Graph encodes them into the links. Page size comes
from ``Prefer: odata.maxpagesize``. A delta link Graph no longer knows answers 410 Gone
(``SyncStateNotFound``): the caller starts a new round from the last time it was in sync.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.accounts import iso
from shared.errors import MicrosoftError
from shared.notifications import SUMMARY_FIELDS

if TYPE_CHECKING:
    from shared.graph import GraphClient, TokenSource

PAGE_SIZE = 50
MAX_PAGES = 40  # per run: a larger backlog resumes from the saved nextLink on the next run
_EXPIRED_CODES = {"SyncStateNotFound", "syncStateNotFound", "SyncStateInvalid", "resyncRequired"}


class DeltaExpiredError(Exception):
    """Graph no longer knows the delta link: start a new round."""


@dataclass(frozen=True)
class DeltaResult:
    link: str  # the deltaLink (round complete) or the nextLink to resume from
    complete: bool
    seen: int  # messages handed to the callback


def initial_params(since: dt.datetime) -> dict[str, str]:
    return {"changeType": "created", "$select": ",".join(SUMMARY_FIELDS),
            "$filter": f"receivedDateTime ge {iso(since)}"}


def catch_up(graph: GraphClient, token: TokenSource, mailbox: str, *, link: str, since: dt.datetime,
             on_message: Callable[[dict[str, object]], None], folder: str = "inbox",
             max_pages: int = MAX_PAGES) -> DeltaResult:
    """Walk the round starting at ``link`` (or a new round of the well-known ``folder`` from ``since`` when
    empty); call ``on_message`` for every created or changed message (removals are skipped)."""
    url, params = (link, None) if link else (f"me/mailFolders/{folder}/messages/delta", initial_params(since))
    seen = 0
    for _ in range(max_pages):
        page = _page(graph, token, mailbox, url, params)
        for item in _items(page):
            if "@removed" not in item:
                on_message(item)
                seen += 1
        delta, nxt = page.get("@odata.deltaLink"), page.get("@odata.nextLink")
        if isinstance(delta, str) and delta:
            return DeltaResult(delta, True, seen)
        if not (isinstance(nxt, str) and nxt):
            raise DeltaExpiredError()  # neither link: not a delta answer we can continue
        url, params = nxt, None
    return DeltaResult(url, False, seen)


def _page(graph: GraphClient, token: TokenSource, mailbox: str, url: str,
          params: dict[str, str] | None) -> dict[str, object]:
    try:
        resp = graph.request("GET", url, mailbox=mailbox, token=token, params=params,
                             headers={"Prefer": f"odata.maxpagesize={PAGE_SIZE}"})
    except MicrosoftError as e:
        code = e.microsoft.error if e.microsoft is not None else None
        if e.status == 410 or code in _EXPIRED_CODES:
            raise DeltaExpiredError() from None
        raise
    doc = resp.json()
    return doc if isinstance(doc, dict) else {}


def _items(page: dict[str, object]) -> list[dict[str, object]]:
    value = page.get("value")
    return [v for v in value if isinstance(v, dict) and isinstance(v.get("id"), str)] if isinstance(value, list) else []
