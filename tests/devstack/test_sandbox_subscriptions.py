"""Sandbox change notifications: /v1.0/subscriptions with the validation handshake, notifications on
Inbox arrival, lifecycle events, drop/duplicate switches, and message delta queries."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from devstack.sandbox import SandboxControl, SandboxServer
from tests.conftest import wait_for
from tests.devstack.conftest import DEFAULT_CLIENT_ID, SandboxFlows

ADELE = "adele@contoso.onmicrosoft.com"
MEGAN = "megan@contoso.onmicrosoft.com"


class Endpoint:
    """A notification endpoint: answers the handshake the way it is told to, records everything."""

    def __init__(self) -> None:
        self.mode = "ok"  # ok | wrong | json | slow | 500
        self.validations: list[str] = []
        self.posts: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                q = parse_qs(urlsplit(self.path).query)
                if "validationToken" in q:
                    token = q["validationToken"][0]
                    with outer.lock:
                        outer.validations.append(urlsplit(self.path).path)
                    self._answer(token)
                    return
                with outer.lock:
                    outer.posts.append({"path": urlsplit(self.path).path, "doc": json.loads(body)})
                self.send_response(202)
                self.end_headers()

            def _answer(self, token: str) -> None:
                if outer.mode == "slow":
                    outer.release.wait(5)
                status = 500 if outer.mode == "500" else 200
                ctype = "application/json" if outer.mode == "json" else "text/plain; charset=utf-8"
                data = (token + "x" if outer.mode == "wrong" else token).encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def items(self, path: str = "/notify") -> list[dict[str, Any]]:
        with self.lock:
            return [i for p in self.posts if p["path"] == path for i in p["doc"]["value"]]


@pytest.fixture()
def endpoint() -> Iterator[Endpoint]:
    e = Endpoint()
    yield e
    e.release.set()
    e.server.shutdown()


@pytest.fixture()
def graph(ctl: SandboxControl, flows: SandboxFlows, sandbox_server: SandboxServer) -> Any:
    ctl.notification_switches(allow_http=True)
    token = flows.sign_in(ADELE)["access_token"]
    s = requests.Session()
    s.trust_env = False
    s.verify = sandbox_server.ca_path
    s.headers["Authorization"] = f"Bearer {token}"
    base = sandbox_server.url + "/v1.0"

    def call(method: str, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 30)
        return s.request(method, path if path.startswith("https://") else base + path, **kw)

    return call


def _body(endpoint: Endpoint, **over: Any) -> dict[str, Any]:
    expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2)
    body = {"changeType": "created", "notificationUrl": endpoint.url + "/notify",
            "lifecycleNotificationUrl": endpoint.url + "/lifecycle", "resource": "me/mailFolders('Inbox')/messages",
            "expirationDateTime": expires.isoformat().replace("+00:00", "Z"), "clientState": "s3cr3t-state"}
    body.update(over)
    return body


def test_create_validates_both_urls_then_notifies_on_inbox_arrival(graph: Any, endpoint: Endpoint,
                                                                  ctl: SandboxControl) -> None:
    r = graph("POST", "/subscriptions", json=_body(endpoint))
    assert r.status_code == 201, r.text
    sub = r.json()
    assert sorted(endpoint.validations) == ["/lifecycle", "/notify"]
    assert sub["clientState"] == "s3cr3t-state" and sub["changeType"] == "created"
    [mid] = ctl.seed_messages(ADELE, [{"subject": "hello"}])
    ctl.seed_messages(ADELE, [{"subject": "elsewhere"}], folder="archive")  # not the subscribed folder
    [item] = wait_for(lambda: endpoint.items(), what="a change notification")
    assert item["subscriptionId"] == sub["id"] and item["clientState"] == "s3cr3t-state"
    assert item["changeType"] == "created" and item["resourceData"]["id"] == mid
    wait_for(lambda: ctl.notifications()["inflight"] == 0, what="deliveries to finish")
    assert len(endpoint.items()) == 1
    assert graph("GET", f"/subscriptions/{sub['id']}").json()["id"] == sub["id"]
    assert [s["id"] for s in graph("GET", "/subscriptions").json()["value"]] == [sub["id"]]


def test_mail_from_another_sandbox_user_lands_in_the_inbox(graph: Any, endpoint: Endpoint, flows: SandboxFlows,
                                                           sandbox_server: SandboxServer) -> None:
    assert graph("POST", "/subscriptions", json=_body(endpoint)).status_code == 201
    megan = flows.sign_in(MEGAN)["access_token"]
    r = requests.post(sandbox_server.url + "/v1.0/me/sendMail", verify=sandbox_server.ca_path, timeout=30,
                      headers={"Authorization": f"Bearer {megan}"},
                      json={"message": {"subject": "from megan", "body": {"contentType": "text", "content": "hi"},
                                        "toRecipients": [{"emailAddress": {"address": ADELE}}]}})
    assert r.status_code == 202, r.text
    [item] = wait_for(lambda: endpoint.items(), what="a notification for megan's mail")
    msg = graph("GET", f"/me/messages/{item['resourceData']['id']}").json()
    assert msg["subject"] == "from megan" and msg["from"]["emailAddress"]["address"] == MEGAN


@pytest.mark.parametrize("mode,fragment", [("wrong", "exactly match"), ("json", "text/plain"),
                                           ("500", "200 OK"), ("slow", "timeout")])
def test_validation_failure_refuses_the_subscription(graph: Any, endpoint: Endpoint, ctl: SandboxControl,
                                                     mode: str, fragment: str) -> None:
    endpoint.mode = mode
    ctl.notification_switches(validation_timeout_ms=300)
    r = graph("POST", "/subscriptions", json=_body(endpoint))
    assert r.status_code == 400 and r.json()["error"]["code"] == "ValidationError", r.text
    assert fragment in r.json()["error"]["message"]
    assert ctl.subscriptions(ADELE) == []


def test_https_required_unless_told(graph: Any, endpoint: Endpoint, ctl: SandboxControl) -> None:
    ctl.notification_switches(allow_http=False)
    r = graph("POST", "/subscriptions", json=_body(endpoint))
    assert r.status_code == 400 and "https" in r.json()["error"]["message"]
    assert endpoint.validations == []


@pytest.mark.parametrize("over,code", [
    ({"expirationDateTime": (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=8)).isoformat()}, "InvalidRequest"),
    ({"expirationDateTime": "2001-01-01T00:00:00Z"}, "InvalidRequest"),
    ({"clientState": "x" * 129}, "InvalidRequest"),
    ({"changeType": "exploded"}, "InvalidRequest"),
    ({"resource": "me/events"}, "ExtensionError"),
])
def test_bad_subscription_requests_get_graph_errors(graph: Any, endpoint: Endpoint, over: dict[str, Any],
                                                    code: str) -> None:
    r = graph("POST", "/subscriptions", json=_body(endpoint, **over))
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text


def test_renew_reauthorize_delete_and_lifecycle(graph: Any, endpoint: Endpoint, ctl: SandboxControl) -> None:
    sid = graph("POST", "/subscriptions", json=_body(endpoint)).json()["id"]
    later = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=6)).isoformat().replace("+00:00", "Z")
    r = graph("PATCH", f"/subscriptions/{sid}", json={"expirationDateTime": later})
    assert r.status_code == 200 and r.json()["expirationDateTime"].startswith(later[:16])
    assert graph("POST", f"/subscriptions/{sid}/reauthorize").status_code == 204
    [info] = ctl.subscriptions(ADELE)
    assert (info["renewals"], info["reauthorizations"]) == (1, 1) and "clientState" not in info
    for event in ("missed", "reauthorizationRequired"):
        ctl.lifecycle_event(sid, event)
    events = wait_for(lambda: len(endpoint.items("/lifecycle")) == 2 and endpoint.items("/lifecycle"), what="events")
    assert sorted(e["lifecycleEvent"] for e in events) == ["missed", "reauthorizationRequired"]
    assert all(e["clientState"] == "s3cr3t-state" for e in events)
    assert graph("DELETE", f"/subscriptions/{sid}").status_code == 204
    gone = graph("GET", f"/subscriptions/{sid}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "ResourceNotFound"
    assert graph("PATCH", f"/subscriptions/{sid}", json={"expirationDateTime": later}).status_code == 404


def test_subscription_removed_event_removes_it(graph: Any, endpoint: Endpoint, ctl: SandboxControl) -> None:
    sid = graph("POST", "/subscriptions", json=_body(endpoint)).json()["id"]
    ctl.lifecycle_event(sid, "subscriptionRemoved")
    wait_for(lambda: endpoint.items("/lifecycle"), what="subscriptionRemoved")
    assert graph("GET", f"/subscriptions/{sid}").status_code == 404


def test_drop_and_duplicate_switches(graph: Any, endpoint: Endpoint, ctl: SandboxControl) -> None:
    assert graph("POST", "/subscriptions", json=_body(endpoint)).status_code == 201
    ctl.notification_switches(drop=1, duplicate=1)
    dropped, doubled, plain = ctl.seed_messages(ADELE, 3)
    wait_for(lambda: len(endpoint.items()) >= 3, what="3 deliveries")
    wait_for(lambda: ctl.notifications()["inflight"] == 0, what="deliveries to finish")
    ids = [i["resourceData"]["id"] for i in endpoint.items()]
    assert dropped not in ids and ids.count(doubled) == 2 and ids.count(plain) == 1
    log = ctl.notifications()["deliveries"]
    assert any(d["status"] == "dropped" and d["messageId"] == dropped for d in log)


def test_delta_rounds_pages_and_tokens(graph: Any, ctl: SandboxControl) -> None:
    since = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    now_iso = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=60)).strftime("%Y-%m-%dT%H:%M:%SZ")
    ids = ctl.seed_messages(ADELE, [{"subject": f"d{i}", "receivedDateTime": now_iso} for i in range(5)])
    params = {"changeType": "created", "$select": "id,subject,receivedDateTime",
              "$filter": f"receivedDateTime ge {since}"}
    seen: list[str] = []
    r = graph("GET", "/me/mailFolders/inbox/messages/delta", params=params, headers={"Prefer": "odata.maxpagesize=2"})
    pages = 0
    while True:
        assert r.status_code == 200, r.text
        doc = r.json()
        pages += 1
        seen += [v["id"] for v in doc["value"]]
        if "@odata.deltaLink" in doc:
            break
        r = graph("GET", doc["@odata.nextLink"], headers={"Prefer": "odata.maxpagesize=2"})
    assert sorted(seen) == sorted(ids) and pages == 3  # the seeded defaults are older than the filter
    link = doc["@odata.deltaLink"]
    assert graph("GET", link).json()["value"] == []
    [new] = ctl.seed_messages(ADELE, [{"subject": "new", "receivedDateTime": now_iso}])
    doc = graph("GET", link).json()
    assert [v["id"] for v in doc["value"]] == [new] and doc["value"][0]["subject"] == "new"
    assert graph("GET", link.split("$deltatoken=")[0] + "$deltatoken=nope").status_code == 410
    assert graph("GET", "/me/mailFolders/inbox/messages/delta", params={"$filter": "subject eq 'x'"}).status_code == 400


def test_updates_moves_and_deletions_notify_as_graph_does(graph: Any, endpoint: Endpoint,
                                                          ctl: SandboxControl) -> None:
    """A mailbox-wide subscription made with immutable ids sees one ``updated`` per change and for a move; a
    folder subscription sees a move as ``deleted`` there; a deletion is ``deleted``."""
    immutable = {"Prefer": 'IdType="ImmutableId"'}
    r = graph("POST", "/subscriptions", headers=immutable,
              json=_body(endpoint, resource="me/messages", changeType="updated,deleted"))
    assert r.status_code == 201, r.text
    folder = graph("POST", "/subscriptions", json=_body(endpoint, notificationUrl=endpoint.url + "/inbox",
                                                        changeType="deleted")).json()
    [mid] = ctl.seed_messages(ADELE, [{"subject": "watched"}], immutable=True)
    before = graph("GET", f"/me/messages/{mid}", headers=immutable).json()["changeKey"]
    assert graph("PATCH", f"/me/messages/{mid}", json={"isRead": True}, headers=immutable).status_code == 200
    assert graph("GET", f"/me/messages/{mid}", headers=immutable).json()["changeKey"] != before  # a new changeKey
    ctl.outlook(ADELE, "move", mid, folder="archive")
    ctl.outlook(ADELE, "delete", mid)
    wait_for(lambda: len(endpoint.items()) >= 3 and len(endpoint.items("/inbox")) >= 1, what="the notifications")
    wait_for(lambda: ctl.notifications()["inflight"] == 0, what="deliveries to finish")
    assert [(i["changeType"], i["resourceData"]["id"]) for i in endpoint.items()] == [
        ("updated", mid), ("updated", mid), ("deleted", mid)]
    [left] = endpoint.items("/inbox")  # the Inbox subscription (regular ids) saw the message leave
    assert left["changeType"] == "deleted" and left["subscriptionId"] == folder["id"]


def test_sent_mail_keeps_its_extended_property_in_sent_items(graph: Any, ctl: SandboxControl) -> None:
    prop = "String {5d6c3b1e-8f0a-4c2e-9b7d-3a1f0e4c6b28} Name Tracking"
    msg = {"subject": "tracked", "toRecipients": [{"emailAddress": {"address": "x@example.com"}}],
           "singleValueExtendedProperties": [{"id": prop, "value": "t-1"}]}
    assert graph("POST", "/me/sendMail", json={"message": msg}).status_code == 202
    [sent] = [m for m in graph("GET", "/me/mailFolders/sentitems/messages").json()["value"]
              if m["subject"] == "tracked"]
    assert "singleValueExtendedProperties" not in sent  # only when asked for
    expand = f"singleValueExtendedProperties($filter=id eq '{prop}')"
    got = graph("GET", f"/me/messages/{sent['id']}", params={"$expand": expand}).json()
    assert got["singleValueExtendedProperties"] == [{"id": prop, "value": "t-1"}]
    bad = {**msg, "singleValueExtendedProperties": [{"id": prop}]}
    assert graph("POST", "/me/sendMail", json={"message": bad}).json()["error"]["code"] == "RequestBodyRead"


def test_rich_notifications_follow_microsofts_format(graph: Any, endpoint: Endpoint, ctl: SandboxControl,
                                                     sandbox_server: SandboxServer) -> None:
    """Decrypted and validated here by the documented recipe, independently of the connector."""
    import base64
    import hashlib
    import hmac

    import jwt
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, padding, serialization
    from cryptography.hazmat.primitives.asymmetric import padding as asym
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from devstack.certs import new_client_certificate

    key_pem, cert_pem = new_client_certificate("rich")
    cert_b64 = base64.b64encode(x509.load_pem_x509_certificate(cert_pem.encode()).public_bytes(
        serialization.Encoding.DER)).decode()
    rich = {"includeResourceData": True, "encryptionCertificate": cert_b64, "encryptionCertificateId": "v1"}
    far = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2)).isoformat().replace("+00:00", "Z")
    assert graph("POST", "/subscriptions", json=_body(endpoint, **rich)).json()["error"]["code"] == "ExtensionError"
    selected = "me/mailFolders('Inbox')/messages?$select=id,subject,isRead"
    too_long = graph("POST", "/subscriptions", json=_body(endpoint, resource=selected, expirationDateTime=far, **rich))
    assert too_long.status_code == 400 and "1440" in too_long.json()["error"]["message"]
    soon = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=20)).isoformat().replace("+00:00", "Z")
    r = graph("POST", "/subscriptions", json=_body(endpoint, resource=selected, expirationDateTime=soon, **rich))
    assert r.status_code == 201, r.text
    [mid] = ctl.seed_messages(ADELE, [{"subject": "secret subject"}])  # regular ids: the subscription's
    wait_for(lambda: endpoint.items(), what="a rich notification")
    [post] = [p["doc"] for p in endpoint.posts if p["path"] == "/notify"]
    [item] = post["value"]
    content = item["encryptedContent"]
    assert content["encryptionCertificateId"] == "v1" and "secret subject" not in json.dumps(post)

    [token] = post["validationTokens"]
    jwks = requests.get(f"{sandbox_server.url}/common/discovery/keys", verify=sandbox_server.ca_path,
                        timeout=10).json()
    kid = jwt.get_unverified_header(token)["kid"]
    public = jwt.PyJWK({k: v for k, v in next(k for k in jwks["keys"] if k["kid"] == kid).items()
                        if k in ("kty", "n", "e", "kid")}).key
    claims = jwt.decode(token, public, algorithms=["RS256"], audience=DEFAULT_CLIENT_ID)
    assert claims["iss"] == f"https://sts.windows.net/{claims['tid']}/" and claims["tid"] == item["tenantId"]
    assert claims["appid"] == "0bf30f3b-4a52-48df-9a82-234910c4a086"

    private = serialization.load_pem_private_key(key_pem.encode(), password=None)
    data = base64.b64decode(content["data"])
    sym = private.decrypt(base64.b64decode(content["dataKey"]),  # type: ignore[union-attr]
                          asym.OAEP(mgf=asym.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None))
    assert hmac.compare_digest(hmac.new(sym, data, hashlib.sha256).digest(),
                               base64.b64decode(content["dataSignature"]))
    dec = Cipher(algorithms.AES(sym), modes.CBC(sym[:16])).decryptor()
    unpad = padding.PKCS7(128).unpadder()
    resource = json.loads(unpad.update(dec.update(data) + dec.finalize()) + unpad.finalize())
    assert resource["id"] == mid == item["resourceData"]["id"] and resource["subject"] == "secret subject"
    assert set(resource) - {"@odata.type", "@odata.id", "@odata.etag"} == {"id", "subject", "isRead"}
