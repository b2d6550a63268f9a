"""Single-row Table calls over the REST API (shared/_table_rest.py): the wire format, Shared Key, SAS
and bearer-token authorisation, against real Azurite and a loopback HTTPS server."""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import json
import math
import ssl
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from shared._table_rows import Row, entity_to_json, row_from_json
from shared.errors import ConnectorError, NotFoundError, StorageUnavailableError
from shared.storage import Storage, Table
from tests.conftest import storage_settings

_TYPED: dict[str, Any] = {"s": "text", "i": 7, "neg": -(2**31), "big": 2**40, "f": 1.5, "b": True, "raw": b"\x00\xff",
                          "empty": ""}


@pytest.fixture()
def table(azurite: Any) -> Iterator[Table]:
    t = Storage(storage_settings(azurite.connection_string)).table("tr" + uuid.uuid4().hex[:12])
    t.create_if_missing()
    yield t


# -- the wire format (pure) -----------------------------------------------------------------------
def test_values_are_written_with_the_documented_type_annotations() -> None:
    body = entity_to_json({**_TYPED, "nan": math.nan, "inf": -math.inf, "none": None})
    assert body["s"] == "text" and "s@odata.type" not in body  # strings, Int32 and booleans are inferred
    assert body["i"] == 7 and body["neg"] == -(2**31) and body["b"] is True
    assert (body["big"], body["big@odata.type"]) == (str(2**40), "Edm.Int64")
    assert (body["f"], body["f@odata.type"]) == (1.5, "Edm.Double")
    assert (body["nan"], body["inf"]) == ("NaN", "-Infinity")
    assert (body["raw"], body["raw@odata.type"]) == (base64.b64encode(b"\x00\xff").decode(), "Edm.Binary")
    assert "none" not in body  # as the SDK: a None property is not sent
    with pytest.raises(TypeError, match="'when'"):
        entity_to_json({"when": dt.datetime.now()})  # type: ignore[dict-item]


def test_a_read_row_has_plain_values_and_its_etag() -> None:
    wire = {"odata.metadata": "m", "odata.etag": "W/\"x\"", "Timestamp": "2026-01-01T00:00:00Z",
            **entity_to_json({**_TYPED, "nan": math.nan})}
    row = row_from_json(wire)
    assert isinstance(row, Row) and row.etag == "W/\"x\""
    assert {k: v for k, v in row.items() if k != "nan"} == _TYPED and math.isnan(row["nan"])  # type: ignore[arg-type]
    assert "Timestamp" not in row and not any(k.startswith("odata.") for k in row)


# -- against Azurite ---------------------------------------------------------------------------------
def test_rows_round_trip_through_both_paths_with_awkward_keys(table: Table) -> None:
    """Written by the REST path, read back by it and by the SDK's query: the same values. Keys with
    quotes, spaces, percent signs and non-ASCII must survive URL quoting and OData escaping."""
    keys = [("p'1", "r'1"), ("p 2%20", "r+2&x=y"), ("pé", "rø😀")]
    for pk, rk in keys:
        etag = table.create({"PartitionKey": pk, "RowKey": rk, **_TYPED})
        got = table.get(pk, rk)
        assert got.etag == etag and dict(got) == {"PartitionKey": pk, "RowKey": rk, **_TYPED}
        [queried] = table.query("PartitionKey eq @pk and RowKey eq @rk", parameters={"pk": pk, "rk": rk})
        assert dict(queried) == dict(got) and queried.etag == got.etag
        etag2 = table.merge({"PartitionKey": pk, "RowKey": rk, "i": 8}, etag=etag)
        assert table.get(pk, rk, select=["i", "s"]) == {"i": 8, "s": "text"} and etag2 != etag
        assert table.delete_if_present(pk, rk, etag=etag) is False  # that version is gone
        assert table.delete_if_present(pk, rk, etag=etag2) is True
        assert table.delete_if_present(pk, rk) is False  # already gone: 404, not an error


def test_a_delete_whose_answer_was_lost_is_a_delete(azurite: Any) -> None:
    """The first DELETE lands but its answer is lost; the retry policy resends it and gets 404. The row
    was deleted by this call: delete_if_present must say so (account deletion depends on it)."""
    from azure.core.exceptions import ServiceResponseError

    from devstack.transport import WrappingTransport

    class _LoseFirstDeleteAnswer(WrappingTransport):
        lost = 0

        def send(self, request: Any, **kwargs: Any) -> Any:
            response = super().send(request, **kwargs)
            if request.method == "DELETE" and not self.lost:
                self.lost += 1
                raise ServiceResponseError("connection reset after the request was processed (test)")
            return response

    transport = _LoseFirstDeleteAnswer()
    t = Storage(storage_settings(azurite.connection_string), transport=transport).table("td" + uuid.uuid4().hex[:12])
    t.create_if_missing()
    for etag in (None, "row's"):
        written = t.create({"PartitionKey": "p", "RowKey": "r", "v": "x"})
        transport.lost = 0
        assert t.delete_if_present("p", "r", etag=written if etag else None) is True
        assert transport.lost == 1
        with pytest.raises(NotFoundError):
            t.get("p", "r")
    assert t.delete_if_present("p", "r") is False  # no retry: a row that was not there


def test_a_malformed_account_key_is_an_authentication_failure() -> None:
    """As the SDK's signing error: 503 (the credential failed), never a raw binascii error (500)."""
    cs = "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=not*base64;" \
         "TableEndpoint=http://127.0.0.1:1/devstoreaccount1;QueueEndpoint=http://127.0.0.1:1/devstoreaccount1"
    with pytest.raises(StorageUnavailableError) as err:
        Storage(storage_settings(cs)).table("accounts").get("p", "r")
    assert "credential failed" in str(err.value) and "not*base64" not in str(err.value)


def test_merge_needs_the_row_and_upsert_creates_it(table: Table) -> None:
    with pytest.raises(NotFoundError):
        table.merge({"PartitionKey": "p", "RowKey": "r", "v": "x"})  # If-Match: * — never re-creates a row
    table.upsert({"PartitionKey": "p", "RowKey": "r", "v": "x"})
    table.upsert({"PartitionKey": "p", "RowKey": "r", "w": "y"})  # insert-or-merge keeps v
    assert dict(table.get("p", "r")) == {"PartitionKey": "p", "RowKey": "r", "v": "x", "w": "y"}
    table.replace({"PartitionKey": "p", "RowKey": "r", "w": "z"}, etag=None)  # insert-or-replace drops v
    assert dict(table.get("p", "r")) == {"PartitionKey": "p", "RowKey": "r", "w": "z"}


def test_shared_key_matches_the_sdk_and_a_wrong_key_is_refused(azurite: Any) -> None:
    """The signature equals azure-data-tables' own for the same request (an independent implementation
    of the documented format), and Azurite, which checks it, refuses one made with another key."""
    from azure.core.credentials import AzureNamedKeyCredential
    from azure.core.pipeline import PipelineContext, PipelineRequest
    from azure.core.rest import HttpRequest
    from azure.data.tables._authentication import SharedKeyCredentialPolicy as SdkPolicy

    from shared._table_rest import SharedKeyPolicy, StorageHeaders

    cred = AzureNamedKeyCredential("devstoreaccount1", base64.b64encode(b"k" * 64).decode())
    entity = "t(PartitionKey='a%27%27b',RowKey='r')"
    urls = ("http://127.0.0.1:1/devstoreaccount1/" + entity,  # path-style (Azurite)
            "https://devstoreaccount1.table.core.windows.net/" + entity,  # virtual-hosted (production)
            "https://devstoreaccount1.table.core.windows.net/t")  # an insert posts to the table
    verbs = (("GET", ""), ("PUT", "application/json"), ("PATCH", "application/json"), ("DELETE", ""),
             ("POST", "application/json"))  # read, replace/upsert, merge, delete, insert
    for url in urls:
        for method, ctype in verbs:
            ours = HttpRequest(method, url, headers={"Content-Type": ctype} if ctype else {})
            StorageHeaders().on_request(PipelineRequest(ours, PipelineContext(None)))
            theirs = HttpRequest(method, ours.url, headers=dict(ours.headers))
            SharedKeyPolicy(cred).on_request(PipelineRequest(ours, PipelineContext(None)))
            SdkPolicy(cred).on_request(PipelineRequest(theirs, PipelineContext(None)))
            assert ours.headers["Authorization"] == theirs.headers["Authorization"], (method, url)

    good = azurite.connection_string
    account_key = next(p.split("=", 1)[1] for p in good.split(";") if p.startswith("AccountKey="))
    wrong = good.replace(account_key, base64.b64encode(b"w" * 64).decode())
    wrong_storage = Storage(storage_settings(wrong))
    # Azurite answers 403 AuthorizationFailure; the REST path and the SDK's query path map it alike.
    for call in (lambda: wrong_storage.table("accounts").get("p", "r"),
                 lambda: wrong_storage.table("accounts").query("PartitionKey eq 'p'")):
        with pytest.raises(ConnectorError) as refused:
            call()
        assert refused.value.code == "storage_rejected" and "403" in str(refused.value)


def test_a_sas_connection_string_works_for_single_rows_and_queries(azurite: Any, table: Table) -> None:
    from azure.core.credentials import AzureNamedKeyCredential
    from azure.data.tables import AccountSasPermissions, ResourceTypes, generate_account_sas

    parts = dict(p.split("=", 1) for p in azurite.connection_string.split(";") if p)
    sas = generate_account_sas(AzureNamedKeyCredential(parts["AccountName"], parts["AccountKey"]),
                               resource_types=ResourceTypes(object=True, container=True),
                               permission=AccountSasPermissions(read=True, write=True, delete=True, list=True,
                                                                add=True, update=True),
                               expiry=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
    t = Storage(storage_settings(f"TableEndpoint={parts['TableEndpoint']};SharedAccessSignature={sas}")).table(table.name)
    etag = t.create({"PartitionKey": "p", "RowKey": "r", "v": "x"})
    t.merge({"PartitionKey": "p", "RowKey": "r", "v": "y"}, etag=etag)
    assert t.get("p", "r")["v"] == "y" and [dict(r) for r in t.query("PartitionKey eq 'p'")] == [dict(t.get("p", "r"))]
    assert t.delete_if_present("p", "r") is True


# -- a bearer token (managed identity) over HTTPS ------------------------------------------------------
class _TokenCredential:
    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        self.scopes.append(scopes)
        return AccessToken("storage-token-for-test", int(dt.datetime.now().timestamp()) + 3600)


class _TableServer(http.server.ThreadingHTTPServer):
    """An HTTPS stand-in for the Table service that records each request's path and Authorization."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []
        self.headers: list[dict[str, str]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                outer.seen.append((self.command, self.path, self.headers.get("Authorization", "")))
                outer.headers.append(dict(self.headers.items()))
                body = json.dumps({"odata.etag": "W/\"1\"", "PartitionKey": "p", "RowKey": "r", "v": "x"}).encode()
                denied = "denied" in self.path  # Azure's answer to a token it does not accept
                self.send_response(403 if denied else 200)
                if denied:
                    self.send_header("x-ms-error-code", "AuthenticationFailed")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        from devstack.certs import ensure_certs

        certs = ensure_certs()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certs.server_cert, certs.server_key)
        self.socket = ctx.wrap_socket(self.socket, server_side=True)
        self.ca = str(certs.ca_cert)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_an_identity_based_account_sends_a_cached_storage_bearer_token() -> None:
    from shared._storage_transport import StorageTransport

    server = _TableServer()
    try:
        credential = _TokenCredential()
        transport = StorageTransport(ssl_context=ssl.create_default_context(cafile=server.ca))
        settings = storage_settings("", AzureWebJobsStorage__tableServiceUri=f"https://localhost:{server.server_port}",
                             AzureWebJobsStorage__queueServiceUri=f"https://localhost:{server.server_port}",
                             AzureWebJobsStorage__accountName="acct")
        t = Storage(settings, credential=credential, transport=transport).table("accounts")  # type: ignore[arg-type]
        assert t.get("p", "r") == {"PartitionKey": "p", "RowKey": "r", "v": "x"}
        assert t.get("p", "r").etag == "W/\"1\""
        assert [s[1] for s in server.seen] == ["/accounts(PartitionKey='p',RowKey='r')"] * 2
        assert {s[2] for s in server.seen} == {"Bearer storage-token-for-test"}
        assert credential.scopes == [("https://storage.azure.com/.default",)]  # one token, reused
        # As the SDK's pipeline: a client request id per call (Azure support traces it) and a User-Agent.
        ids = [h.get("x-ms-client-request-id") for h in server.headers]
        assert all(ids) and len(set(ids)) == len(ids)
        assert all("outlook-connector/table-rest" in h.get("User-Agent", "") for h in server.headers)
        with pytest.raises(StorageUnavailableError) as refused:  # as azure-data-tables maps it: 503, retry later
            t.get("p", "denied")
        assert "credential failed: ClientAuthenticationError" in str(refused.value)
    finally:
        server.shutdown()
        server.server_close()


def test_a_claim_whose_write_landed_but_lost_its_answer_is_held(azurite: Any) -> None:
    """Table.claim's conditional take-over (replace, or merge) lands, its answer is lost, the retry fails its
    ETag check: the claimer reads the row back, finds its own claimId, and holds it."""
    from azure.core.exceptions import ServiceResponseError

    from devstack.transport import WrappingTransport

    class _LoseFirstWriteAnswer(WrappingTransport):
        lose = 0

        def send(self, request: Any, **kwargs: Any) -> Any:
            response = super().send(request, **kwargs)
            if request.method in ("PUT", "PATCH") and self.lose:
                self.lose -= 1
                raise ServiceResponseError("connection reset after the request was processed (test)")
            return response

    transport = _LoseFirstWriteAnswer()
    t = Storage(storage_settings(azurite.connection_string), transport=transport).table("tc" + uuid.uuid4().hex[:12])
    t.create_if_missing()
    for merge in (False, True):
        t.upsert({"PartitionKey": "p", "RowKey": "r", "state": "stale", "keep": "yes"})
        transport.lose = 1
        claim = t.claim({"PartitionKey": "p", "RowKey": "r", "state": "mine"}, merge=merge,
                        take_over=lambda row: row.get("state") == "stale")
        assert transport.lose == 0 and claim.held, merge
        row = t.get("p", "r")
        assert row["state"] == "mine" and claim.etag == row.etag
        assert ("keep" in row) is merge  # a merge keeps the other columns
    # Held by someone else: not held, and the row that holds it is returned.
    other = t.claim({"PartitionKey": "p", "RowKey": "r", "state": "theirs"}, take_over=lambda row: False)
    assert not other.held and other.row is not None and other.row["state"] == "mine"
    # Claiming a row that must exist (create=False) and does not: not held, no row created.
    none = t.claim({"PartitionKey": "p", "RowKey": "absent", "x": 1}, create=False, take_over=lambda row: True)
    assert not none.held and none.row is None
    with pytest.raises(NotFoundError):
        t.get("p", "absent")
