"""The sandbox control API (``/_sandbox/...``, JSON) used by tests and the dev stack."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from .errors import GraphError
from .graph import _validate_message, check_file_attachment
from .mailbox import Mailbox
from .state import ClientApp, Injection, SandboxState
from .users import TEST_USERS, TestUser

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
    secret = _get(body, "client_secret", str, check=bool)
    uris = _get(body, "redirect_uris", list, check=lambda v: all(isinstance(u, str) and u for u in v))
    name = _get(body, "name", str, "Sandbox app")
    state = _state()
    with state.lock:
        app = state.clients.get(client_id)
        if app is None:
            state.clients[client_id] = ClientApp(client_id, name, list(uris), {secret: True})
        else:
            app.redirect_uris = list(uris)
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


@bp.post("/users/<upn>/revoke_grants")
def revoke_grants(upn: str) -> Response:
    user = _user(upn)
    _state().revoke_grants(user.upn)
    return jsonify({"user": user.upn, "revoked": True})


@bp.post("/users/<upn>/expire_access_tokens")
def expire_access_tokens(upn: str) -> Response:
    user = _user(upn)
    return jsonify({"user": user.upn, "expired": _state().expire_access_tokens(user.upn)})


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
    return jsonify({"user": user.upn, "live": _state().live_refresh_tokens(user.upn, client_id)})


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
    return jsonify({"ids": ids})


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


@bp.route("/<path:rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def unknown(rest: str) -> tuple[Response, int]:
    return jsonify({"error": "not_found", "message": f"no control endpoint '/_sandbox/{rest}'"}), 404
