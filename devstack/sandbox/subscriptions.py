"""Graph change notifications: ``/v1.0/subscriptions`` and the notifications they cause.

References:
- Create / validation handshake / delivery: https://learn.microsoft.com/en-us/graph/change-notifications-delivery-webhooks
- Subscription resource and lifetimes: https://learn.microsoft.com/en-us/graph/api/resources/subscription
- Lifecycle events: https://learn.microsoft.com/en-us/graph/change-notifications-lifecycle-events
- Update (renew), reauthorize, delete: https://learn.microsoft.com/en-us/graph/api/subscription-update,
  https://learn.microsoft.com/en-us/graph/api/subscription-reauthorize,
  https://learn.microsoft.com/en-us/graph/api/subscription-delete

Like Graph, ``POST /subscriptions`` first validates ``notificationUrl`` and ``lifecycleNotificationUrl``
(``POST url?validationToken=…``; 200, ``text/plain``, the exact token, within 10 s) and refuses the
subscription when either answers wrongly or slowly. Notification URLs must be https; loopback http is
accepted only when the sandbox is told so (``SANDBOX_ALLOW_HTTP_NOTIFICATIONS=1`` or the control API).
Notifications are POSTed from a background pool with Graph's 3 s timeout, never inside the Graph
request (or control call) that caused them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests
from flask import Blueprint

from .errors import GraphError
from .graph import READ_SCOPES, _body_json, _Ctx, _host, _sb, graph_call, immutable_ids
from .mailbox import Mailbox

if TYPE_CHECKING:
    from .state import SandboxState

bp = Blueprint("subscriptions", __name__)

MAX_LIFETIME_S = 10_080 * 60  # Outlook message: 10,080 minutes (under 7 days)
VALIDATION_TIMEOUT_S = 10.0  # the endpoint must answer the handshake within 10 s
DELIVERY_TIMEOUT_S = 3.0  # notifications are POSTed with a 3-second timeout
MAX_CLIENT_STATE = 128
LIFECYCLE_EVENTS = ("reauthorizationRequired", "subscriptionRemoved", "missed")
_RESOURCE = re.compile(r"^/?(?:me|users/(?P<user>[^/]+))/(?:mailFolders\('(?P<q>[^']+)'\)/messages|"
                       r"mailFolders/(?P<f>[^/]+)/messages|(?P<all>messages))$", re.IGNORECASE)


@dataclass
class Subscription:
    id: str
    client_id: str
    upn: str
    oid: str
    tid: str
    resource: str
    folder_id: str | None  # None: every folder (``me/messages``)
    change_types: tuple[str, ...]
    notification_url: str
    lifecycle_url: str | None
    client_state: str | None = field(repr=False)
    expires_at: float
    tls: str = "v1_2"
    created_at: float = 0.0
    renewals: int = 0
    reauthorizations: int = 0
    reauth_required: bool = False
    immutable_ids: bool = False  # created with Prefer: IdType="ImmutableId": notifications carry immutable ids

    def resource_json(self) -> dict[str, Any]:
        return {"id": self.id, "resource": self.resource, "applicationId": self.client_id,
                "changeType": ",".join(self.change_types), "clientState": self.client_state,
                "notificationUrl": self.notification_url, "notificationQueryOptions": None,
                "lifecycleNotificationUrl": self.lifecycle_url, "expirationDateTime": _iso_ms(self.expires_at),
                "creatorId": self.oid, "includeResourceData": False, "latestSupportedTlsVersion": self.tls,
                "encryptionCertificate": None, "encryptionCertificateId": None, "notificationUrlAppId": None}

    def control_json(self) -> dict[str, Any]:
        """For tests: everything except the clientState."""
        return {"id": self.id, "user": self.upn, "resource": self.resource, "changeType": ",".join(self.change_types),
                "notificationUrl": self.notification_url, "lifecycleNotificationUrl": self.lifecycle_url,
                "expirationDateTime": _iso_ms(self.expires_at), "createdDateTime": _iso_ms(self.created_at),
                "renewals": self.renewals, "reauthorizations": self.reauthorizations,
                "reauthorizationRequired": self.reauth_required}


def _iso_ms(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _parse_time(value: Any, name: str) -> float:
    if not isinstance(value, str):
        raise GraphError(400, "InvalidRequest", f"{name} must be a date-time string.")
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise GraphError(400, "InvalidRequest", f"Cannot convert the literal '{value}' to Edm.DateTimeOffset.") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)).timestamp()


# ---------------------------------------------------------------------------------------------
# Delivery: validation handshake and notifications (a background pool; never the causing request)
# ---------------------------------------------------------------------------------------------
class Notifier:
    def __init__(self, state: SandboxState) -> None:
        self._state = state
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._session = requests.Session()
        self._session.trust_env = False

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="sandbox-notify")
            return self._pool

    def check_url(self, url: Any, name: str) -> str:
        if not isinstance(url, str) or not url:
            raise GraphError(400, "InvalidRequest", f"{name} is required.")
        parts = urlsplit(url)
        if parts.scheme == "https" and parts.hostname:
            return url
        if parts.scheme == "http" and _loopback(parts.hostname or "") and self._state.allow_http_notifications:
            return url
        raise GraphError(400, "InvalidRequest", f"Subscription validation request failed. {name} must be https "
                         "(the sandbox accepts loopback http only when told to: see devstack/sandbox/README.md).")

    def validate(self, url: str) -> None:
        """Graph's handshake: POST ?validationToken=…; 200, text/plain, exactly the token, within 10 s."""
        token = f"Validation: Testing client application reachability for subscription Request-Id: {uuid.uuid4()}"
        with self._state.lock:
            self._state.counters["notify_validations"] += 1
        try:
            r = self._session.post(url, params={"validationToken": token}, data=b"", allow_redirects=False,
                                   headers={"Content-Type": "text/plain; charset=utf-8"},
                                   timeout=(VALIDATION_TIMEOUT_S, self._state.validation_timeout_s))
        except requests.Timeout:
            raise GraphError(400, "ValidationError", "Subscription validation request timeout.") from None
        except requests.RequestException:
            raise GraphError(400, "ValidationError", "Subscription validation request failed. Notification "
                             "endpoint could not be reached.") from None
        if r.status_code != 200:
            raise GraphError(400, "ValidationError", "Subscription validation request failed. Notification endpoint "
                             f"must respond with 200 OK to validation request (it answered {r.status_code}).")
        ctype = r.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "text/plain" or r.content.decode("utf-8", "replace") != token:
            raise GraphError(400, "ValidationError", "Subscription validation request failed. Response must exactly "
                             "match validationToken query parameter, as text/plain.")

    def change(self, sub: Subscription, msg: dict[str, Any]) -> None:
        """A message arrived in the subscribed folder (called with the state lock held)."""
        state = self._state
        if state.notify_drop:
            state.notify_drop -= 1 if state.notify_drop > 0 else 0
            state.counters["notify_dropped"] += 1
            state.notification_log.append({"subscriptionId": sub.id, "kind": "change", "messageId": msg["id"],
                                           "status": "dropped", "at": time.time()})
            return
        copies = 1
        if state.notify_duplicate:
            state.notify_duplicate -= 1 if state.notify_duplicate > 0 else 0
            copies = 2
        mid = msg["_immutable"] if sub.immutable_ids else msg["id"]
        path = f"Users/{sub.oid}@{sub.tid}/Messages/{mid}"
        item = {"id": uuid.uuid4().hex[:16], "subscriptionId": sub.id,
                "subscriptionExpirationDateTime": _iso_ms(sub.expires_at), "clientState": sub.client_state,
                "changeType": "created", "resource": path, "tenantId": sub.tid,
                "resourceData": {"@odata.type": "#Microsoft.Graph.Message", "@odata.id": path,
                                 "@odata.etag": f'W/"{msg["changeKey"]}"', "id": mid}}
        for _ in range(copies):
            self._submit(sub.notification_url, {"value": [item]}, sub.id, "change", mid)

    def lifecycle(self, sub: Subscription, event: str) -> None:
        item = {"subscriptionId": sub.id, "subscriptionExpirationDateTime": _iso_ms(sub.expires_at),
                "tenantId": sub.tid, "clientState": sub.client_state, "lifecycleEvent": event}
        self._submit(sub.lifecycle_url or sub.notification_url, {"value": [item]}, sub.id, event, None)

    def _submit(self, url: str, payload: dict[str, Any], sid: str, kind: str, mid: str | None) -> None:
        with self._state.lock:
            self._state.notify_inflight += 1
        self._executor().submit(self._post, url, payload, sid, kind, mid)

    def _post(self, url: str, payload: dict[str, Any], sid: str, kind: str, mid: str | None) -> None:
        t0 = time.perf_counter()
        try:
            r = self._session.post(url, json=payload, allow_redirects=False,
                                   timeout=(DELIVERY_TIMEOUT_S, DELIVERY_TIMEOUT_S))
            status: Any = r.status_code
            r.close()
        except requests.RequestException as e:
            status = type(e).__name__
        ms = round((time.perf_counter() - t0) * 1000, 1)
        with self._state.cond:
            self._state.notify_inflight -= 1
            self._state.counters["notify_sent"] += 1
            self._state.notification_log.append({"subscriptionId": sid, "kind": kind, "messageId": mid,
                                                 "status": status, "ms": ms, "at": time.time()})
            self._state.cond.notify_all()


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def message_arrived(state: SandboxState, mb: Mailbox, msg: dict[str, Any]) -> None:
    """Mailbox hook (state lock held): notify every live subscription on the message's folder."""
    now = state.now()
    for sub in list(state.subscriptions.values()):
        if (sub.upn == mb.user.upn and sub.expires_at > now and "created" in sub.change_types
                and sub.folder_id in (None, msg["parentFolderId"])):
            state.notifier.change(sub, msg)


# ---------------------------------------------------------------------------------------------
# /v1.0/subscriptions
# ---------------------------------------------------------------------------------------------
def _resource_folder(ctx: _Ctx, resource: Any) -> str | None:
    if not isinstance(resource, str):
        raise GraphError(400, "InvalidRequest", "resource is required.")
    m = _RESOURCE.match(resource.strip())
    if not m:
        raise GraphError(400, "ExtensionError", f"Operation: Create; Exception: [Status Code: BadRequest; Reason: "
                         f"The resource '{resource}' is not supported for change notifications.]")
    user = m.group("user")
    if user and user.lower() not in (ctx.user.upn.lower(), ctx.user.oid.lower(), ctx.user.me_id.lower()):
        raise GraphError(403, "ExtensionError", "Operation: Create; Exception: [Status Code: Forbidden; Reason: "
                         "Access is denied.]")
    if m.group("all"):
        return None
    mb = _sb().mailboxes[ctx.user.upn]
    fid = mb.folder_id(m.group("q") or m.group("f"))
    if fid is None:
        raise GraphError(404, "ExtensionError", "Operation: Create; Exception: [Status Code: NotFound; Reason: "
                         "The specified folder could not be found in the store.]")
    return fid


def _change_types(value: Any) -> tuple[str, ...]:
    types = tuple(t.strip() for t in value.split(",")) if isinstance(value, str) else ()
    if not types or any(t not in ("created", "updated", "deleted") for t in types):
        raise GraphError(400, "InvalidRequest", "changeType must be created, updated and/or deleted.")
    return types


def _expiry(value: Any, now: float) -> float:
    at = _parse_time(value, "expirationDateTime")
    if at <= now:
        raise GraphError(400, "InvalidRequest", "Subscription expiration date must be in the future.")
    if at > now + MAX_LIFETIME_S:
        raise GraphError(400, "InvalidRequest", f"Subscription expiration can only be {MAX_LIFETIME_S // 60} "
                         "minutes in the future.")
    return at


def _new_subscription(ctx: _Ctx, body: dict[str, Any]) -> Subscription:
    state = _sb()
    client_state = body.get("clientState")
    if client_state is not None and (not isinstance(client_state, str) or len(client_state) > MAX_CLIENT_STATE):
        raise GraphError(400, "InvalidRequest", f"clientState must be at most {MAX_CLIENT_STATE} characters.")
    lifecycle = body.get("lifecycleNotificationUrl")
    rec = ctx.rec
    assert rec is not None
    return Subscription(
        id=str(uuid.uuid4()), client_id=rec.client_id, upn=ctx.user.upn, oid=ctx.user.oid, tid=ctx.user.tid,
        resource=str(body.get("resource")), folder_id=_resource_folder(ctx, body.get("resource")),
        change_types=_change_types(body.get("changeType")),
        notification_url=state.notifier.check_url(body.get("notificationUrl"), "notificationUrl"),
        lifecycle_url=None if lifecycle is None else state.notifier.check_url(lifecycle, "lifecycleNotificationUrl"),
        client_state=client_state, expires_at=_expiry(body.get("expirationDateTime"), state.now()),
        tls=str(body.get("latestSupportedTlsVersion") or "v1_2"), created_at=state.now(),
        immutable_ids=immutable_ids())


@bp.post("/v1.0/subscriptions")
@graph_call(scopes=READ_SCOPES)
def create_subscription(ctx: _Ctx) -> tuple[int, Any]:
    body = _body_json()
    if not isinstance(body, dict):
        raise GraphError(400, "InvalidRequest", "The request body must be a subscription object.")
    sub = _new_subscription(ctx, body)
    state = _sb()
    state.notifier.validate(sub.notification_url)  # outside the state lock: the endpoint may call us back
    if sub.lifecycle_url and sub.lifecycle_url != sub.notification_url:
        state.notifier.validate(sub.lifecycle_url)
    with state.lock:
        state.subscriptions[sub.id] = sub
        state.counters["subscriptions_created"] += 1
    return 201, {"@odata.context": f"{_host()}/v1.0/$metadata#subscriptions/$entity", **sub.resource_json()}


def _own(ctx: _Ctx, sid: str) -> Subscription:
    """A live subscription of this app and user, else Graph's 404 (expired ones are gone)."""
    state = _sb()
    rec = ctx.rec
    assert rec is not None
    with state.lock:
        sub = state.subscriptions.get(sid)
        if sub is not None and sub.expires_at <= state.now():
            del state.subscriptions[sid]
            sub = None
    if sub is None or sub.client_id != rec.client_id or sub.upn != ctx.user.upn:
        raise GraphError(404, "ResourceNotFound", f"The object '{sid}' of type 'subscription' was not found.")
    return sub


@bp.get("/v1.0/subscriptions")
@graph_call(scopes=READ_SCOPES, mailbox=False)
def list_subscriptions(ctx: _Ctx) -> tuple[int, Any]:
    state = _sb()
    rec = ctx.rec
    assert rec is not None
    with state.lock:
        now = state.now()
        mine = [s.resource_json() for s in state.subscriptions.values()
                if s.client_id == rec.client_id and s.upn == ctx.user.upn and s.expires_at > now]
    return 200, {"@odata.context": f"{_host()}/v1.0/$metadata#subscriptions", "value": mine}


@bp.get("/v1.0/subscriptions/<sid>")
@graph_call(scopes=READ_SCOPES, mailbox=False)
def get_subscription(ctx: _Ctx, sid: str) -> tuple[int, Any]:
    return 200, {"@odata.context": f"{_host()}/v1.0/$metadata#subscriptions/$entity", **_own(ctx, sid).resource_json()}


@bp.patch("/v1.0/subscriptions/<sid>")
@graph_call(scopes=READ_SCOPES, mailbox=False)
def update_subscription(ctx: _Ctx, sid: str) -> tuple[int, Any]:
    """Renew (and reauthorize): only expirationDateTime and notificationUrl may change."""
    sub = _own(ctx, sid)
    body = _body_json()
    if not isinstance(body, dict) or not body or any(k not in ("expirationDateTime", "notificationUrl") for k in body):
        raise GraphError(400, "InvalidRequest", "Only expirationDateTime and notificationUrl can be updated.")
    state = _sb()
    url = state.notifier.check_url(body["notificationUrl"], "notificationUrl") if "notificationUrl" in body else None
    expires = _expiry(body["expirationDateTime"], state.now()) if "expirationDateTime" in body else sub.expires_at
    with state.lock:
        sub.expires_at = expires
        sub.notification_url = url or sub.notification_url
        sub.renewals += 1
        sub.reauth_required = False
    return 200, {"@odata.context": f"{_host()}/v1.0/$metadata#subscriptions/$entity", **sub.resource_json()}


@bp.delete("/v1.0/subscriptions/<sid>")
@graph_call(scopes=READ_SCOPES, mailbox=False)
def delete_subscription(ctx: _Ctx, sid: str) -> tuple[int, Any]:
    _own(ctx, sid)
    state = _sb()
    with state.lock:
        state.subscriptions.pop(sid, None)
        state.counters["subscriptions_deleted"] += 1
    return 204, None


@bp.post("/v1.0/subscriptions/<sid>/reauthorize")
@graph_call(scopes=READ_SCOPES, mailbox=False)
def reauthorize_subscription(ctx: _Ctx, sid: str) -> tuple[int, Any]:
    sub = _own(ctx, sid)
    state = _sb()
    with state.lock:
        sub.reauthorizations += 1
        sub.reauth_required = False
    return 204, None
