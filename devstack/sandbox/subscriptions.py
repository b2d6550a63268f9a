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

Rich notifications (https://learn.microsoft.com/graph/change-notifications-with-resource-data): a subscription
with ``includeResourceData`` must name its properties (``?$select=`` on an Outlook resource), give an
``encryptionCertificate`` (base64 DER, RSA key) and an ``encryptionCertificateId``, and lives at most 1,440
minutes. Each notification then carries ``encryptedContent`` (a fresh AES-256 key wrapped with RSA-OAEP SHA-1
under that certificate; the selected properties as JSON, AES-CBC with PKCS7 padding and the key's first 16 bytes
as IV; HMAC-SHA256 of the ciphertext under the key) and its batch ``validationTokens``: one JWT per app and
tenant, signed with the sandbox's identity key (published at ``/{tenant}/discovery/keys``), ``iss``
``https://sts.windows.net/{tid}/``, ``aud`` the subscribing app, ``appid`` Graph's change-tracking app.
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
from .graph import READ_SCOPES, _body_json, _Ctx, _host, _sb, graph_call, immutable_ids, resolve_target
from .mailbox import Mailbox

if TYPE_CHECKING:
    from .state import AccessTokenRecord, SandboxState

bp = Blueprint("subscriptions", __name__)

MAX_LIFETIME_S = 10_080 * 60  # Outlook message: 10,080 minutes (under 7 days)
RICH_MAX_LIFETIME_S = 1_440 * 60  # with resource data: 1,440 minutes
GRAPH_CHANGE_TRACKING_APP = "0bf30f3b-4a52-48df-9a82-234910c4a086"
VALIDATION_TOKEN_LIFETIME_S = 3600
VALIDATION_TIMEOUT_S = 10.0  # the endpoint must answer the handshake within 10 s
DELIVERY_TIMEOUT_S = 3.0  # notifications are POSTed with a 3-second timeout
MAX_CLIENT_STATE = 128
LIFECYCLE_EVENTS = ("reauthorizationRequired", "subscriptionRemoved", "missed")
_RESOURCE = re.compile(r"^/?(?:me|users/(?P<user>[^/?]+))/(?:mailFolders\('(?P<q>[^']+)'\)/messages|"
                       r"mailFolders/(?P<f>[^/?]+)/messages|(?P<all>messages))(?:\?\$select=(?P<select>[^&]+))?$",
                       re.IGNORECASE)


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
    select: list[str] | None = None  # the resource's $select (rich notifications)
    include_resource_data: bool = False
    encryption_certificate: str | None = field(default=None, repr=False)  # base64 DER, as given
    encryption_certificate_id: str | None = None

    def resource_json(self) -> dict[str, Any]:
        return {"id": self.id, "resource": self.resource, "applicationId": self.client_id,
                "changeType": ",".join(self.change_types), "clientState": self.client_state,
                "notificationUrl": self.notification_url, "notificationQueryOptions": None,
                "lifecycleNotificationUrl": self.lifecycle_url, "expirationDateTime": _iso_ms(self.expires_at),
                "creatorId": self.oid, "includeResourceData": self.include_resource_data,
                "latestSupportedTlsVersion": self.tls, "encryptionCertificate": self.encryption_certificate,
                "encryptionCertificateId": self.encryption_certificate_id, "notificationUrlAppId": None}

    def control_json(self) -> dict[str, Any]:
        """For tests: everything except the clientState."""
        return {"id": self.id, "user": self.upn, "resource": self.resource, "changeType": ",".join(self.change_types),
                "notificationUrl": self.notification_url, "lifecycleNotificationUrl": self.lifecycle_url,
                "expirationDateTime": _iso_ms(self.expires_at), "createdDateTime": _iso_ms(self.created_at),
                "renewals": self.renewals, "reauthorizations": self.reauthorizations,
                "reauthorizationRequired": self.reauth_required, "includeResourceData": self.include_resource_data,
                "encryptionCertificateId": self.encryption_certificate_id}


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
        self.signing_key: Any = None  # tokens.SigningKey, set by the app factory

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

    def change(self, sub: Subscription, msg: dict[str, Any], change_type: str = "created",
               regular_id: str | None = None) -> None:
        """A message was created in, changed in or removed from the subscribed resource (called with the state
        lock held). ``regular_id``: the id the message had there, when it differs from its current one (a move
        notified to a subscription without immutable ids names the id that is gone)."""
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
        mid = msg["_immutable"] if sub.immutable_ids else (regular_id or msg["id"])
        path = f"Users/{sub.oid}@{sub.tid}/Messages/{mid}"
        item = {"id": uuid.uuid4().hex[:16], "subscriptionId": sub.id,
                "subscriptionExpirationDateTime": _iso_ms(sub.expires_at), "clientState": sub.client_state,
                "changeType": change_type, "resource": path, "tenantId": sub.tid,
                "resourceData": {"@odata.type": "#Microsoft.Graph.Message", "@odata.id": path,
                                 "@odata.etag": f'W/"{msg["changeKey"]}"', "id": mid}}
        payload: dict[str, Any] = {"value": [item]}
        if sub.include_resource_data:
            payload["validationTokens"] = [self._validation_token(sub)]
            if change_type != "deleted":  # a deleted item has no data left to send
                item["encryptedContent"] = self._encrypted(sub, msg, path)
        for _ in range(copies):
            self._submit(sub.notification_url, payload, sub.id, "change", mid)

    def _validation_token(self, sub: Subscription) -> str:
        """A v1 token as Microsoft issues them for change notifications: signed by the identity platform."""
        now = int(self._state.now())
        return str(self.signing_key.sign({
            "aud": sub.client_id, "iss": f"https://sts.windows.net/{sub.tid}/", "iat": now, "nbf": now,
            "exp": now + VALIDATION_TOKEN_LIFETIME_S, "appid": GRAPH_CHANGE_TRACKING_APP, "appidacr": "2",
            "tid": sub.tid, "ver": "1.0", "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, GRAPH_CHANGE_TRACKING_APP))}))

    def _encrypted(self, sub: Subscription, msg: dict[str, Any], path: str) -> dict[str, Any]:
        import base64
        import hashlib
        import hmac
        import json
        import secrets

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, padding
        from cryptography.hazmat.primitives.asymmetric import padding as asym
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        mb = self._state.mailboxes[sub.upn]
        resource = mb.message_resource(msg, sub.select, immutable=sub.immutable_ids)
        resource = {"@odata.type": "#Microsoft.Graph.Message", "@odata.id": path, **resource}
        key = secrets.token_bytes(32)
        padder = padding.PKCS7(128).padder()
        plain = padder.update(json.dumps(resource).encode()) + padder.finalize()
        encryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
        data = encryptor.update(plain) + encryptor.finalize()
        cert = x509.load_der_x509_certificate(base64.b64decode(sub.encryption_certificate or ""))
        public = cert.public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        wrapped = public.encrypt(key, asym.OAEP(mgf=asym.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None))
        return {"data": base64.b64encode(data).decode(),
                "dataSignature": base64.b64encode(hmac.new(key, data, hashlib.sha256).digest()).decode(),
                "dataKey": base64.b64encode(wrapped).decode(),
                "encryptionCertificateId": sub.encryption_certificate_id,
                "encryptionCertificateThumbprint": cert.fingerprint(hashes.SHA1()).hex().upper()}

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


def _live(state: SandboxState, mb: Mailbox, change_type: str) -> list[Subscription]:
    now = state.now()
    return [s for s in state.subscriptions.values()
            if s.upn == mb.user.upn and s.expires_at > now and change_type in s.change_types]


def message_arrived(state: SandboxState, mb: Mailbox, msg: dict[str, Any]) -> None:
    """Mailbox hook (state lock held): notify every live subscription on the message's folder."""
    for sub in _live(state, mb, "created"):
        if sub.folder_id in (None, msg["parentFolderId"]):
            state.notifier.change(sub, msg)


def message_changed(state: SandboxState, mb: Mailbox, msg: dict[str, Any], change: str,
                    before: dict[str, Any]) -> None:
    """Mailbox hook (state lock held) for a message that changed, was deleted or moved.

    ``updated`` and ``deleted`` reach the subscriptions on the message's folder and on the whole mailbox
    (``me/messages``). A move leaves the old folder (``deleted`` there) and enters the new one (``created``
    there). For a mailbox-wide subscription the item stays the same one when the subscription asked for
    immutable ids (``updated``: its folder changed); without, the item Graph names is gone and a new one
    exists (``deleted`` for the old id, ``created`` for the new): the regular id changes on a move
    (https://learn.microsoft.com/graph/outlook-immutable-id)."""
    folder = msg["parentFolderId"]
    if change in ("updated", "deleted"):
        for sub in _live(state, mb, change):
            if sub.folder_id in (None, folder):
                state.notifier.change(sub, msg, change)
        return
    old_folder, old_id = before["parentFolderId"], before["id"]
    for sub in _live(state, mb, "deleted"):
        if sub.folder_id == old_folder or (sub.folder_id is None and not sub.immutable_ids):
            state.notifier.change(sub, msg, "deleted", regular_id=old_id)
    for sub in _live(state, mb, "created"):
        if sub.folder_id == folder or (sub.folder_id is None and not sub.immutable_ids):
            state.notifier.change(sub, msg, "created")
    for sub in _live(state, mb, "updated"):
        if sub.folder_id is None and sub.immutable_ids:
            state.notifier.change(sub, msg, "updated")


# ---------------------------------------------------------------------------------------------
# /v1.0/subscriptions
# ---------------------------------------------------------------------------------------------
def _resource_select(resource: str) -> list[str] | None:
    m = _RESOURCE.match(resource.strip())
    select = m.group("select") if m else None
    return [p.strip() for p in select.split(",") if p.strip()] if select else None


def _resource_folder(ctx: _Ctx, resource: Any) -> str | None:
    if not isinstance(resource, str):
        raise GraphError(400, "InvalidRequest", "resource is required.")
    m = _RESOURCE.match(resource.strip())
    if not m:
        raise GraphError(400, "ExtensionError", f"Operation: Create; Exception: [Status Code: BadRequest; Reason: "
                         f"The resource '{resource}' is not supported for change notifications.]")
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


def _expiry(value: Any, now: float, rich: bool = False) -> float:
    at = _parse_time(value, "expirationDateTime")
    limit = RICH_MAX_LIFETIME_S if rich else MAX_LIFETIME_S
    if at <= now:
        raise GraphError(400, "InvalidRequest", "Subscription expiration date must be in the future.")
    if at > now + limit:
        raise GraphError(400, "InvalidRequest", f"Subscription expiration can only be {limit // 60} "
                         "minutes in the future.")
    return at


def _encryption(body: dict[str, Any], select: list[str] | None) -> tuple[str, str]:
    """A rich subscription's certificate (base64 DER of an X.509 certificate with an RSA key) and its id."""
    import base64
    import binascii

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import rsa

    if not select:
        raise GraphError(400, "ExtensionError", "Operation: Create; Exception: [Status Code: BadRequest; Reason: "
                         "A $select query option is required on the resource when includeResourceData is true.]")
    cert, cert_id = body.get("encryptionCertificate"), body.get("encryptionCertificateId")
    if not isinstance(cert, str) or not cert:
        raise GraphError(400, "InvalidRequest", "encryptionCertificate is required when includeResourceData is "
                         "true.")
    if not isinstance(cert_id, str) or not cert_id or len(cert_id) > 128:
        raise GraphError(400, "InvalidRequest", "encryptionCertificateId is required when includeResourceData is "
                         "true.")
    try:
        parsed = x509.load_der_x509_certificate(base64.b64decode(cert, validate=True))
    except (binascii.Error, ValueError):
        raise GraphError(400, "InvalidRequest", "encryptionCertificate is not a base64 encoded X.509 "
                         "certificate.") from None
    if not isinstance(parsed.public_key(), rsa.RSAPublicKey):
        raise GraphError(400, "InvalidRequest", "encryptionCertificate must have an RSA public key.")
    return cert, cert_id


def _subscribed_user(ctx: _Ctx, resource: object) -> None:
    """The mailbox a subscription's resource names becomes the request's target: ``me/…`` for a delegated
    token; ``users/{id}/…`` for the signed-in user, or with an application token any mailbox of the tenant
    within the administrator's scope. Graph wraps the refusal as ExtensionError."""
    m = _RESOURCE.match(resource.strip()) if isinstance(resource, str) else None
    assert ctx.rec is not None
    if m is None:
        return  # _resource_folder names the resource that is not supported
    try:
        ctx.target = resolve_target(ctx.rec, m.group("user"))
    except GraphError as e:
        reason = "Forbidden" if e.status == 403 else "NotFound" if e.status == 404 else "BadRequest"
        raise GraphError(e.status, "ExtensionError", f"Operation: Create; Exception: [Status Code: {reason}; "
                         f"Reason: {e.message}]") from None
    if not ctx.user.has_mailbox:
        raise GraphError(404, "MailboxNotEnabledForRESTAPI",
                         "The mailbox is either inactive, soft-deleted, or is hosted on-premise.")


def _new_subscription(ctx: _Ctx, body: dict[str, Any]) -> Subscription:
    state = _sb()
    _subscribed_user(ctx, body.get("resource"))
    client_state = body.get("clientState")
    if client_state is not None and (not isinstance(client_state, str) or len(client_state) > MAX_CLIENT_STATE):
        raise GraphError(400, "InvalidRequest", f"clientState must be at most {MAX_CLIENT_STATE} characters.")
    lifecycle = body.get("lifecycleNotificationUrl")
    rec = ctx.rec
    assert rec is not None
    rich = body.get("includeResourceData", False)
    if not isinstance(rich, bool):
        raise GraphError(400, "InvalidRequest", "includeResourceData must be a boolean.")
    select = _resource_select(str(body.get("resource") or ""))
    cert, cert_id = _encryption(body, select) if rich else (None, None)
    return Subscription(
        id=str(uuid.uuid4()), client_id=rec.client_id, upn=ctx.user.upn, oid=ctx.user.oid, tid=ctx.user.tid,
        resource=str(body.get("resource")), folder_id=_resource_folder(ctx, body.get("resource")),
        change_types=_change_types(body.get("changeType")),
        notification_url=state.notifier.check_url(body.get("notificationUrl"), "notificationUrl"),
        lifecycle_url=None if lifecycle is None else state.notifier.check_url(lifecycle, "lifecycleNotificationUrl"),
        client_state=client_state, expires_at=_expiry(body.get("expirationDateTime"), state.now(), rich),
        tls=str(body.get("latestSupportedTlsVersion") or "v1_2"), created_at=state.now(),
        immutable_ids=immutable_ids(), select=select, include_resource_data=rich, encryption_certificate=cert,
        encryption_certificate_id=cert_id)


@bp.post("/v1.0/subscriptions")
@graph_call(scopes=READ_SCOPES, mailbox=False)
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


def _mine(rec: AccessTokenRecord, sub: Subscription) -> bool:
    """A delegated token sees the signed-in user's subscriptions; an application token its tenant's."""
    return sub.tid == rec.user.tid if rec.app else sub.upn == rec.user.upn


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
    if sub is None or sub.client_id != rec.client_id or not _mine(rec, sub):
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
                if s.client_id == rec.client_id and _mine(rec, s) and s.expires_at > now]
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
    expires = (_expiry(body["expirationDateTime"], state.now(), sub.include_resource_data)
               if "expirationDateTime" in body else sub.expires_at)
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
