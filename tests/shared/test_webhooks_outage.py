"""An event whose enqueue fails (storage down) is kept and queued once storage answers again: the
operation that caused it already happened, so the product must still hear of it."""

from __future__ import annotations

import json
import uuid
from typing import Any

import requests

from devstack.transport import WrappingTransport
from tests.conftest import wait_for


class _RefuseFirst(WrappingTransport):
    """An azure-core transport that refuses the first ``n`` requests (as a storage outage does)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.left = n

    def send(self, request: Any, **kwargs: Any) -> Any:
        from azure.core.exceptions import ServiceRequestError

        if self.left > 0:
            self.left -= 1
            raise ServiceRequestError("connection refused (test)")
        return self._inner.send(request, **kwargs)


def test_an_event_not_queued_during_an_outage_is_queued_when_storage_is_back(azurite: Any) -> None:
    from azure.storage.queue import BinaryBase64DecodePolicy, QueueClient

    from shared.storage import Storage
    from shared.webhooks import Webhooks
    from tests.conftest import storage_settings

    name = "wh" + uuid.uuid4().hex[:12]
    transport = _RefuseFirst(n=7)  # more than one call's retries (three attempts): the first enqueue fails
    queue = Storage(storage_settings(azurite.connection_string), transport=transport).queue(name)  # type: ignore[arg-type]
    reader = QueueClient.from_connection_string(azurite.connection_string, name,
                                                message_decode_policy=BinaryBase64DecodePolicy())
    reader.create_queue()
    hooks = Webhooks("http://127.0.0.1:9/hook", "secret", queue=lambda: queue, session=requests.Session(),
                     sleep=lambda s: None)  # the background retry waits on backoff; the test need not
    hooks.emit("account.disconnected", {"id": "acc_1"})  # storage refuses: kept, not lost
    wait_for(lambda: reader.peek_messages(), timeout=30, what="the kept event to be queued")
    [msg] = list(reader.receive_messages())
    event = json.loads(msg.content)["event"]
    assert event["type"] == "account.disconnected" and event["data"]["account"]["id"] == "acc_1"
    assert transport.left == 0
