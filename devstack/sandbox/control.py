"""The sandbox control API (``/_sandbox/...``, JSON) used by tests and the dev stack."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from . import tokens
from .errors import GraphError
from .graph import _validate_message, check_file_attachment, deliver_to_sandbox_users, save_to_sent_items
from .mailbox import Mailbox, email
from .state import (
    ClientApp,
    FederatedCredential,
    Injection,
    ManagedIdentity,
    RegisteredCertificate,
    SandboxState,
)
from .users import CONTOSO_TENANT_ID, TEST_USERS, TestUser, resolve_tenant

bp = Blueprint("control", __name__, url_prefix="/_sandbox")


class ControlError(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


@bp.errorhandler(ControlError)
def _control_error(exc: ControlError) -> tuple[Response, int]:
    return jsonify({"error": "bad_request" if exc.status == 400 else "not_found", "message": exc.message}), exc.status


def _state() -> SandboxState:
    return current_app.extensions["sandbox"]["state"]


def _body() -> dict[str, Any]:
    if not request.get_data():
        return {}
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise ControlError("request body must be a JSON object")
    return data


def _user(upn: str) -> TestUser:
    user = TEST_USERS.get(upn.lower())
    if user is None:
        raise ControlError(f"unknown test user '{upn}'; known: {', '.join(TEST_USERS)}", 404)
    return user


def _get(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ..., *,
         check: Callable[[Any], bool] | None = None) -> Any:
    if name not in body or body[name] is None:
        if default is ...:
            raise ControlError(f"'{name}' is required")
        return default
    value = body[name]
    if isinstance(value, bool) and kind in (int, (int, float)):
        raise ControlError(f"'{name}' must be a number")
    if not isinstance(value, kind) or (check is not None and not check(value)):
        raise ControlError(f"'{name}' has an invalid value: {value!r}")
    return value


@bp.get("/health")
def health() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/users")
def users() -> Response:
    return jsonify([
        {"upn": u.upn, "displayName": u.display_name, "oid": u.oid, "tid": u.tid, "personal": u.personal,
         "hasMailbox": u.has_mailbox, "description": u.description}
        for u in TEST_USERS.values()
    ])


@bp.post("/reset")
def reset() -> Response:
    _state().reset(clients=bool(_get(_body(), "clients", bool, False)))
    return jsonify({"status": "reset"})


@bp.post("/clients")
def register_client() -> Response:
    body = _body()
    client_id = _get(body, "client_id", str, check=bool)
    secret = _get(body, "client_secret", str, None, check=bool)  # none: a secretless app (certificate, FIC)
    uris = _get(body, "redirect_uris", list, check=lambda v: all(isinstance(u, str) and u for u in v))
    name = _get(body, "name", str, "Sandbox app")
    state = _state()
    with state.lock:
        app = state.clients.get(client_id)
        if app is None:
            state.clients[client_id] = ClientApp(client_id, name, list(uris), {secret: True} if secret else {})
        else:
            app.redirect_uris = list(uris)
            if secret:
                app.secrets[secret] = True
            app.name = name
    return jsonify({"client_id": client_id, "redirect_uris": uris})


@bp.post("/clients/<client_id>/secrets")
def set_secret(client_id: str) -> Response:
    body = _body()
    secret = _get(body, "secret", str, check=bool)
    valid = _get(body, "valid", bool, True)
    state = _state()
    with state.lock:
        app = state.clients.get(client_id)
        if app is None:
            raise ControlError(f"unknown client '{client_id}'", 404)
        app.secrets[secret] = valid
    return jsonify({"client_id": client_id, "valid": valid})


def _client(state: SandboxState, client_id: str) -> ClientApp:
    app = state.clients.get(client_id)
    if app is None:
        raise ControlError(f"unknown client '{client_id}'", 404)
    return app


@bp.post("/clients/<client_id>/certificates")
def add_certificate(client_id: str) -> Response:
    """Upload a certificate's public part to the app (``valid: false`` = its end date has passed: AADSTS700027)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    body = _body()
    pem = _get(body, "certificate", str, check=lambda v: "-----BEGIN CERTIFICATE-----" in v)
    valid = _get(body, "valid", bool, True)
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        raise ControlError("'certificate' is not a PEM certificate") from None
    sha256 = cert.fingerprint(hashes.SHA256()).hex()
    reg = RegisteredCertificate(pem, cert.fingerprint(hashes.SHA1()).hex(), sha256, cert.public_key(), valid)
    state = _state()
    with state.lock:
        _client(state, client_id).certificates[sha256] = reg
    return jsonify({"client_id": client_id, "thumbprint_sha1": reg.thumbprint_sha1, "thumbprint_sha256": sha256,
                    "valid": valid})


@bp.post("/clients/<client_id>/federated_credentials")
def add_federated_credential(client_id: str) -> Response:
    body = _body()
    fic = FederatedCredential(
        name=_get(body, "name", str, "fic"), issuer=_get(body, "issuer", str, check=bool),
        subject=_get(body, "subject", str, check=bool),
        audiences=_get(body, "audiences", list, ["api://AzureADTokenExchange"],
                       check=lambda v: len(v) == 1 and all(isinstance(a, str) and a for a in v)))
    state = _state()
    with state.lock:
        app = _client(state, client_id)
        app.federated = [f for f in app.federated if f.name != fic.name] + [fic]
    return jsonify({"client_id": client_id, "name": fic.name, "issuer": fic.issuer, "subject": fic.subject,
                    "audiences": fic.audiences})


@bp.post("/managed_identities")
def add_managed_identity() -> Response:
    """A user-assigned identity the sandbox issues tokens for (its issuer is this sandbox's tenant issuer)."""
    body = _body()
    client_id = _get(body, "client_id", str, check=bool)
    mi = ManagedIdentity(client_id, _get(body, "principal_id", str, None) or str(uuid.uuid4()),
                         _get(body, "tenant_id", str, CONTOSO_TENANT_ID))
    state = _state()
    with state.lock:
        state.managed_identities[client_id.lower()] = mi
    return jsonify({"client_id": mi.client_id, "principal_id": mi.principal_id, "tenant_id": mi.tenant_id,
                    "issuer": f"{request.host_url.rstrip('/')}/{mi.tenant_id}/v2.0"})


@bp.post("/managed_identities/<client_id>/token")
def managed_identity_token(client_id: str) -> Response:
    """What the platform's local identity endpoint returns (App Service shape) for ``resource``."""
    body = _body()
    resource = _get(body, "resource", str, check=bool)
    lifetime = _get(body, "lifetime_s", int, 3600, check=lambda v: 60 <= v <= 86400)
    state = _state()
    with state.lock:
        mi = state.managed_identities.get(client_id.lower())
        if mi is None:
            raise ControlError(f"unknown managed identity '{client_id}'", 404)
        now = int(state.now())
        token = tokens.managed_identity_token(
            _key(), host=request.host_url.rstrip("/"), client_id=mi.client_id, principal_id=mi.principal_id,
            tenant_id=mi.tenant_id, audience=resource.rstrip("/"), now=now, expires_in=lifetime)
        state.issued.append(token)
    return jsonify({"access_token": token, "expires_on": str(now + lifetime), "resource": resource,
                    "token_type": "Bearer", "client_id": mi.client_id})


def _key() -> tokens.SigningKey:
    return current_app.extensions["sandbox"]["key"]


@bp.post("/users/<upn>/revoke_grants")
def revoke_grants(upn: str) -> Response:
    user = _user(upn)
    _state().revoke_grants(user.upn)
    return jsonify({"user": user.upn, "revoked": True})


@bp.post("/users/<upn>/expire_access_tokens")
def expire_access_tokens(upn: str) -> Response:
    user = _user(upn)
    return jsonify({"user": user.upn, "expired": _state().expire_access_tokens(user.upn)})


def _tenant(tenant: str) -> str:
    tid = resolve_tenant(tenant)
    if tid is None or tid in ("common", "organizations", "consumers"):
        raise ControlError(f"unknown tenant {tenant!r}", 404)
    return tid


@bp.route("/tenants/<tenant>/consent", methods=["GET", "DELETE"])
def tenant_consent(tenant: str) -> Response:
    """GET: has an administrator consented for ``client_id``? DELETE: an administrator deletes the app's
    service principal (consent removed): the next client-credentials request answers AADSTS7000229.
    ``expire_tokens`` also ends the application tokens already issued (as if they had run out)."""
    tid = _tenant(tenant)
    client_id = request.args.get("client_id", "")
    state = _state()
    with state.lock:
        if request.method == "GET":
            return jsonify({"tenant": tid, "consented": (tid, client_id) in state.admin_consented})
        state.admin_consented.discard((tid, client_id))
        expired = 0
        if request.args.get("expire_tokens", "true") == "true":
            for rec in state.access_tokens.values():
                if rec.app and rec.user.tid == tid and rec.client_id == client_id and not rec.expired:
                    rec.expired = True
                    expired += 1
    return jsonify({"tenant": tid, "consented": False, "expired": expired})


@bp.route("/tenants/<tenant>/app_scope", methods=["PUT", "DELETE"])
def app_scope(tenant: str) -> Response:
    """An administrator scopes the app to some mailboxes (RBAC for Applications): ``{"client_id",
    "mailboxes": [upn…]}``; DELETE removes the scope (every mailbox of the tenant reachable again)."""
    tid = _tenant(tenant)
    state = _state()
    if request.method == "DELETE":
        with state.lock:
            state.app_scopes.pop((tid, request.args.get("client_id", "")), None)
        return jsonify({"tenant": tid, "scope": None})
    body = _body()
    client_id = _get(body, "client_id", str)
    boxes = _get(body, "mailboxes", list)
    members = frozenset(_user(str(b)).upn for b in boxes)
    with state.lock:
        state.app_scopes[(tid, client_id)] = members
    return jsonify({"tenant": tid, "scope": sorted(members)})


@bp.post("/clients/<client_id>/app_roles")
def set_app_roles(client_id: str) -> Response:
    """The application permissions the registration declares (what admin consent grants)."""
    roles = _get(_body(), "roles", list)
    state = _state()
    with state.lock:
        _client(state, client_id).app_roles = tuple(str(r) for r in roles)
    return jsonify({"client_id": client_id, "roles": [str(r) for r in roles]})


@bp.post("/users/<upn>/conditional_access")
def conditional_access(upn: str) -> Response:
    user = _user(upn)
    blocked = _get(_body(), "blocked", bool)
    state = _state()
    with state.lock:
        state.ca_blocked[user.upn] = blocked
    return jsonify({"user": user.upn, "blocked": blocked})


@bp.get("/users/<upn>/refresh_tokens")
def live_refresh_tokens(upn: str) -> Response:
    user = _user(upn)
    client_id = request.args.get("client_id")
    minted = _state().live_refresh_tokens(user.upn, client_id)
    return jsonify({"user": user.upn, "live": len(minted), "minted": minted})


@bp.get("/users/<upn>/lost_rotations")
def lost_rotations(upn: str) -> Response:
    user = _user(upn)
    found = _state().lost_rotations(user.upn, request.args.get("client_id"))
    return jsonify({"user": user.upn, "rotations": [{"minted": m, "stalePresented": p} for m, p in found]})


@bp.post("/users/<upn>/messages")
def seed_messages(upn: str) -> Response:
    user = _user(upn)
    body = _body()
    folder = _get(body, "folder", str, "inbox")
    messages = body.get("messages")
    count = body.get("count")
    if messages is not None:
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ControlError("'messages' must be a list of objects")
        items: int | list[dict[str, Any]] = messages
    elif isinstance(count, int) and not isinstance(count, bool) and 0 <= count <= 10_000:
        items = count
    else:
        raise ControlError("give 'messages' (list) or 'count' (0..10000)")
    state = _state()
    with state.lock:
        mb = state.mailboxes.get(user.upn)
        if mb is None:
            raise ControlError(f"user '{user.upn}' has no mailbox")
        if mb.folder_id(folder) is None:
            raise ControlError(f"unknown folder '{folder}'")
        try:
            if isinstance(items, list):  # the same checks Graph applies to a message it is given
                for m in items:
                    _validate_message(m, for_send=False)
                    for att in m.get("attachments") or []:
                        if not isinstance(att, dict):
                            raise ControlError("each attachment must be an object")
                        check_file_attachment(att)
            ids = mb.seed(items, folder, state.now())
        except GraphError as exc:
            raise ControlError(f"invalid message: {exc.code}: {exc.message}") from None
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise ControlError(f"invalid message: {type(exc).__name__}: {exc}") from None
        immutable = [mb.messages[i]["_immutable"] for i in ids]
    # Both: what an app sees without and with `Prefer: IdType="ImmutableId"`.
    return jsonify({"ids": ids, "immutableIds": immutable})


OUTLOOK_ACTIONS = ("read", "unread", "flag", "unflag", "categorize", "move", "delete", "send")


@bp.post("/users/<upn>/outlook")
def outlook(upn: str) -> Response:
    """The person acts in Outlook, not through the app: Graph notifies the app's subscriptions as it would.

    ``{"action": "read"|"unread"|"flag"|"unflag"|"categorize"|"move"|"delete", "messageId": any id of the message,
    "categories": [...] (categorize), "folder": well-known name or id (move)}``, or
    ``{"action": "send", "message": {"subject", "toRecipients", ...}}`` (a Sent Items copy, and delivery to
    sandbox users). Answers the message's ``id`` and ``immutableId`` after the action."""
    user = _user(upn)
    body = _body()
    action = _get(body, "action", str, check=lambda a: a in OUTLOOK_ACTIONS)
    state = _state()
    with state.lock:
        mb = state.mailboxes.get(user.upn)
        if mb is None:
            raise ControlError(f"user '{user.upn}' has no mailbox")
        now = state.now()
        if action == "send":
            try:
                fields = _validate_message(_get(body, "message", dict), for_send=True)
            except GraphError as exc:
                raise ControlError(f"invalid message: {exc.code}: {exc.message}") from None
            fields.setdefault("from", email(mb.user.upn, mb.user.display_name))
            msg = save_to_sent_items(mb, fields, [], now)
            deliver_to_sandbox_users(state, mb, fields, [], now)
            return jsonify({"id": msg["id"], "immutableId": msg["_immutable"]})
        found = mb.find(_get(body, "messageId", str))
        if found is None:
            raise ControlError("no such message", 404)
        msg = found
        if action in ("read", "unread"):
            mb.update(msg, {"isRead": action == "read"}, now)
        elif action in ("flag", "unflag"):
            mb.update(msg, {"flag": {"flagStatus": "flagged" if action == "flag" else "notFlagged"}}, now)
        elif action == "categorize":
            cats = _get(body, "categories", list, check=lambda v: all(isinstance(c, str) for c in v))
            mb.update(msg, {"categories": list(cats)}, now)
        elif action == "move":
            fid = mb.folder_id(_get(body, "folder", str))
            if fid is None:
                raise ControlError("unknown folder")
            msg = mb.move(msg["id"], fid)
        else:
            mb.remove(msg)
        return jsonify({"id": msg["id"], "immutableId": msg["_immutable"]})


@bp.get("/users/<upn>/sent")
def sent(upn: str) -> Response:
    user = _user(upn)
    state = _state()
    with state.lock:
        mb: Mailbox | None = state.mailboxes.get(user.upn)
        return jsonify({"sent": list(mb.sent) if mb else []})


@bp.post("/inject")
def inject() -> Response:
    body = _body()
    prefix = _get(body, "path_prefix", str, check=lambda v: v.startswith("/") or "*" in v)
    status = _get(body, "status", int, None, check=lambda v: 100 <= v <= 599)
    retry_after = _get(body, "retry_after", int, None, check=lambda v: v >= 0)
    latency_ms = _get(body, "latency_ms", int, None, check=lambda v: 0 <= v <= 600_000)
    count = _get(body, "count", int, 1, check=lambda v: v >= 1)
    user = _get(body, "user", str, None)
    if user is not None:
        user = _user(user).upn
    if status is None and latency_ms is None:
        raise ControlError("give 'status' and/or 'latency_ms'")
    state = _state()
    with state.lock:
        state.injections.append(Injection(prefix, status, retry_after, latency_ms, count, body.get("body"), user))
    return jsonify({"injected": count})


@bp.delete("/inject")
def clear_injections() -> Response:
    """End every injected fault now (pending counts dropped; delays in progress released)."""
    state = _state()
    with state.lock:
        n = len(state.injections)
        state.injections.clear()
    state.release()
    return jsonify({"cleared": n})


@bp.post("/token_latency")
def token_latency() -> Response:
    ms = _get(_body(), "ms", int, check=lambda v: 0 <= v <= 600_000)
    state = _state()
    with state.lock:
        state.token_latency_ms = ms
    return jsonify({"ms": ms})


@bp.post("/token_lifetime")
def token_lifetime() -> Response:
    # Entra's configurable AccessTokenLifetime: 10 minutes to 1 day; null restores the default.
    seconds = _get(_body(), "seconds", int, default=None, check=lambda v: 600 <= v <= 86400)
    state = _state()
    with state.lock:
        state.access_token_lifetime_s = seconds
    return jsonify({"seconds": seconds})


@bp.post("/rotation")
def rotation() -> Response:
    strict = _get(_body(), "strict", bool)
    state = _state()
    with state.lock:
        state.strict_rotation = strict
    return jsonify({"strict": strict})


@bp.post("/clock")
def clock() -> Response:
    # Finite and at most ten years at a time: the offset must stay a valid JSON number and datetime.
    seconds = _get(_body(), "advance_seconds", (int, float), check=lambda v: 0 <= v <= 10 * 365 * 86400)
    state = _state()
    with state.lock:
        state.clock_offset += float(seconds)
        offset = state.clock_offset
    return jsonify({"offset_seconds": offset})


@bp.post("/release")
def release() -> Response:
    _state().release()
    return jsonify({"released": True})


@bp.get("/wait_inflight")
def wait_inflight() -> Response:
    user = _user(request.args.get("user", ""))
    try:
        n = int(request.args.get("n", "1"))
        timeout = float(request.args.get("timeout", "10"))
    except ValueError:
        raise ControlError("'n' and 'timeout' must be numbers") from None
    if not (0 <= timeout <= 60) or not (1 <= n <= 1000):  # also refuses nan and inf
        raise ControlError("'timeout' must be 0..60 seconds and 'n' 1..1000")
    ok = _state().wait_inflight(user.upn, n, timeout)
    return jsonify({"reached": ok})


@bp.get("/counters")
def counters() -> Response:
    return jsonify(_state().counters_snapshot())


@bp.get("/issued")
def issued() -> Response:
    """Every secret the sandbox ever issued (codes, tokens): for leak scans in tests only."""
    state = _state()
    with state.lock:
        return jsonify({"issued": list(state.issued)})


# -- change notifications (subscriptions.py) ----------------------------------------------------
@bp.get("/notifications")
def notifications() -> Response:
    """Delivery log (newest last) and the switches."""
    state = _state()
    with state.lock:
        return jsonify({"deliveries": list(state.notification_log), "inflight": state.notify_inflight,
                        "drop": state.notify_drop, "duplicate": state.notify_duplicate,
                        "allow_http": state.allow_http_notifications})


@bp.post("/notifications")
def notification_switches() -> Response:
    """``drop`` / ``duplicate``: the next N change notifications (-1: every one until set to 0);
    ``allow_http``: accept loopback http notification URLs (Graph requires https);
    ``validation_timeout_ms``: how long the validation handshake may take (Graph: 10 s)."""
    body = _body()
    drop = _get(body, "drop", int, None, check=lambda v: v >= -1)
    duplicate = _get(body, "duplicate", int, None, check=lambda v: v >= -1)
    allow_http = _get(body, "allow_http", bool, None)
    timeout_ms = _get(body, "validation_timeout_ms", int, None, check=lambda v: 100 <= v <= 10_000)
    state = _state()
    with state.lock:
        if timeout_ms is not None:
            state.validation_timeout_s = timeout_ms / 1000
        state.notify_drop = state.notify_drop if drop is None else drop
        state.notify_duplicate = state.notify_duplicate if duplicate is None else duplicate
        state.allow_http_notifications = state.allow_http_notifications if allow_http is None else allow_http
        return jsonify({"drop": state.notify_drop, "duplicate": state.notify_duplicate,
                        "allow_http": state.allow_http_notifications})


@bp.get("/subscriptions")
def list_subscriptions() -> Response:
    upn = request.args.get("user")
    user = _user(upn).upn if upn else None
    state = _state()
    with state.lock:
        now = state.now()
        subs = [s.control_json() for s in state.subscriptions.values()
                if (user is None or s.upn == user) and s.expires_at > now]
    return jsonify({"subscriptions": subs})


@bp.post("/subscriptions/<sid>/lifecycle")
def lifecycle(sid: str) -> Response:
    """Send a lifecycle notification now (``subscriptionRemoved`` also removes the subscription)."""
    from .subscriptions import LIFECYCLE_EVENTS

    event = _get(_body(), "event", str, check=lambda v: v in LIFECYCLE_EVENTS)
    state = _state()
    with state.lock:
        sub = state.subscriptions.get(sid)
        if sub is None:
            raise ControlError(f"unknown subscription '{sid}'", 404)
        if event == "subscriptionRemoved":
            del state.subscriptions[sid]
        elif event == "reauthorizationRequired":
            sub.reauth_required = True
        state.notifier.lifecycle(sub, event)
    return jsonify({"subscription": sid, "event": event})


@bp.route("/<path:rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def unknown(rest: str) -> tuple[Response, int]:
    return jsonify({"error": "not_found", "message": f"no control endpoint '/_sandbox/{rest}'"}), 404
