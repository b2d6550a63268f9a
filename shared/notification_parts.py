"""The inbound-mail parts, built once each from what the connector hands over: the endpoints'
intake, the queue worker, the subscriptions' lifecycle and reconciliation, and delivery. Blueprints reach
each part in one hop (``connector.notifications.intake`` …); no part reaches back here.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING

from shared.storage import NOTIFICATION_QUEUE, SEEN_TABLE, SUBSCRIPTION_INDEX_TABLE, SUBSCRIPTIONS_TABLE

if TYPE_CHECKING:
    import requests

    from shared.accounts import AccountStore
    from shared.config import Settings
    from shared.crypto import RingSource
    from shared.due_index import DueIndex
    from shared.graph import GraphClient
    from shared.notification_delivery import NotificationDelivery
    from shared.notification_intake import NotificationIntake, RichCheck
    from shared.notification_worker import NotificationWorker
    from shared.notifications import NotificationConfig
    from shared.rich_notifications import NotificationCertificates
    from shared.sent_marks import SentMarks
    from shared.storage import Queue, Storage
    from shared.subscription_lifecycle import SubscriptionLifecycle, SubscriptionReconciler
    from shared.subscriptions import SubscriptionStore
    from shared.telemetry import Telemetry
    from shared.tokens import TokenManager
    from shared.webhooks import Webhooks


class NotificationParts:
    def __init__(self, settings: Settings, *, storage: Storage, key_ring: RingSource, graph: GraphClient,
                 tokens: TokenManager, accounts: AccountStore, webhooks: Webhooks, telemetry: Telemetry,
                 certificates: NotificationCertificates, session: requests.Session,
                 sent_marks: SentMarks | None = None) -> None:
        self._settings = settings
        self._certificates = certificates  # rich notifications: our encryption certificate's versions
        self._session = session  # Microsoft's signing keys (validation tokens)
        self._sent_marks = sent_marks
        self._storage = storage
        self._key_ring = key_ring
        self._graph = graph
        self._tokens = tokens
        self._accounts = accounts
        self._webhooks = webhooks
        self._telemetry = telemetry
        self._queue: Callable[[], Queue] = lambda: storage.queue(NOTIFICATION_QUEUE)

    @cached_property
    def config(self) -> NotificationConfig:
        from shared.notifications import NotificationConfig

        return NotificationConfig.from_settings(self._settings)

    @cached_property
    def store(self) -> SubscriptionStore:
        from shared.subscriptions import SubscriptionStore

        return SubscriptionStore(self._storage.table(SUBSCRIPTIONS_TABLE), self._key_ring)

    @cached_property
    def index(self) -> DueIndex:
        from shared.due_index import DueIndex

        return DueIndex(self._storage.table(SUBSCRIPTION_INDEX_TABLE))

    @cached_property
    def intake(self) -> NotificationIntake:
        """Behind the anonymous notification endpoints."""
        from shared.notification_intake import NotificationIntake

        return NotificationIntake(enabled=self.config.enabled, store=self.store, queue=self._queue, rich=self.rich)

    @cached_property
    def rich(self) -> RichCheck:
        """Rich notifications' checks: accepted whether or not this instance asks for resource data, so a batch of
        a subscription made before the setting changed is still opened (with the key it was made with)."""
        from shared.jwks import SessionJWKClient
        from shared.notification_intake import RichCheck
        from shared.rich_notifications import ValidationTokens

        # Microsoft's signing keys for the identity platform's tokens (v1 and v2 share them).
        jwks = SessionJWKClient(f"{self._settings.authority_host}/common/discovery/keys", session=self._session)
        return RichCheck(ValidationTokens(client_id=self._settings.client_id,
                                          authority_host=self._settings.authority_host, jwks=jwks),
                         self._certificates)

    @cached_property
    def delivery(self) -> NotificationDelivery:
        from shared.notification_delivery import NotificationDelivery

        return NotificationDelivery(graph=self._graph, tokens=self._tokens, accounts=self._accounts,
                                    seen=self._storage.table(SEEN_TABLE), webhooks=self._webhooks,
                                    telemetry=self._telemetry, sent_marks=self._sent_marks)

    @cached_property
    def subscriptions(self) -> SubscriptionLifecycle:
        from shared.subscription_lifecycle import SubscriptionLifecycle

        return SubscriptionLifecycle(self.config, graph=self._graph, tokens=self._tokens, accounts=self._accounts,
                                     store=self.store, index=self.index, queue=self._queue, delivery=self.delivery,
                                     certificates=self._certificates)

    @cached_property
    def reconciler(self) -> SubscriptionReconciler:
        from shared.subscription_lifecycle import SubscriptionReconciler

        return SubscriptionReconciler(enabled=self.config.enabled, feeds=tuple(f.name for f in self.config.feeds),
                                      accounts=self._accounts, store=self.store,
                                      index=self.index, seen=self._storage.table(SEEN_TABLE), queue=self._queue)

    @cached_property
    def worker(self) -> NotificationWorker:
        """The queue trigger's body."""
        from shared.notification_worker import NotificationWorker
        from shared.subscription_lifecycle import SubscriptionFailures

        failures = SubscriptionFailures(self.config, accounts=self._accounts, store=self.store, index=self.index,
                                        queue=self._queue)
        return NotificationWorker(lifecycle=self.subscriptions, delivery=self.delivery, failures=failures)
