"""Single-row Table operations over the Table service REST API, through a small azure-core pipeline.

Why not ``TableClient`` for these: a refresh makes five single-row calls, and azure-data-tables
spends most of each call's CPU in its generated serialiser, its tracing decorator and an
eleven-policy pipeline. These calls are simple enough to write
down: one URL, a JSON body of plain properties, an ``If-Match`` header. What stays the same as the
SDK: the transport (so every fault and timeout looks identical), azure-core's retry policy with the
per-call budget options (:class:`shared.storage.Budget`), azure-core's error types (mapped once
by :func:`shared.storage.mapped`), and the credential. Queries, transactions and table creation
stay with ``TableClient``.

Protocol references:

* Operations: https://learn.microsoft.com/rest/api/storageservices/query-entities (one entity by
  its keys), ``insert-entity``, ``update-entity2`` (PUT), ``merge-entity`` (sent as PATCH, as the
  SDK does), ``insert-or-replace-entity``, ``insert-or-merge-entity``, ``delete-entity1``; an
  ``If-Match`` of ``*`` means "the row must exist", no ``If-Match`` on PUT/PATCH means "upsert".
* Keys in the URL: single quotes doubled (OData string literal), then percent-encoded.
* Property types: https://learn.microsoft.com/rest/api/storageservices/payload-format-for-table-service-operations
  — strings, booleans and 32-bit integers go as JSON values; other types carry an
  ``<name>@odata.type`` annotation (``Edm.Int64`` and ``Edm.Double`` specials as strings).
* Shared Key for the Table service (version 2009-09-19 and later):
  https://learn.microsoft.com/rest/api/storageservices/authorize-with-shared-key#table-service-shared-key-authorization
  — ``VERB\\nContent-MD5\\nContent-Type\\nDate\\nCanonicalizedResource``, with ``x-ms-date`` as the
  date and ``/<account><path>`` (plus ``?comp=`` if present, never here) as the resource.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from collections.abc import Mapping
from email.utils import formatdate
from typing import TYPE_CHECKING, TypedDict, Unpack
from urllib.parse import quote, urlsplit

from azure.core.exceptions import ClientAuthenticationError, HttpResponseError
from azure.core.pipeline.policies import SansIOHTTPPolicy
from azure.core.rest import HttpRequest

from shared._table_rows import EntityValue, Row, entity_to_json, row_from_json

if TYPE_CHECKING:
    from azure.core.credentials import AzureNamedKeyCredential
    from azure.core.pipeline import Pipeline, PipelineRequest
    from azure.core.rest import HttpResponse

API_VERSION = "2019-02-02"  # the version azure-data-tables 12.x speaks
_JSON = "application/json"
_READ_ACCEPT = "application/json;odata=minimalmetadata"  # properties + odata.etag, no type noise for strings
_AUTHENTICATION_FAILED = frozenset({"AuthenticationFailed", "InvalidAuthenticationInfo"})


#: The User-Agent product token of single-row calls (azure-core appends its own and Python's).
USER_AGENT = "outlook-connector/table-rest"


class RestCallOptions(TypedDict, total=False):
    """Per-call options of one pipeline run: transport timeouts and the retry policy's budget."""

    connection_timeout: float
    read_timeout: float
    retry_total: int
    retry_backoff_factor: float
    retry_backoff_max: float
    retry_on_methods: frozenset[str]


class RequestId(SansIOHTTPPolicy):
    """``x-ms-client-request-id`` (what Azure support traces a call by), a random UUID: azure-core's own policy
    builds a time-based one (uuid1), several times the CPU on a path that runs five times per token refresh."""

    def on_request(self, request: PipelineRequest[HttpRequest]) -> None:
        headers = request.http_request.headers
        if "x-ms-client-request-id" not in headers:
            headers["x-ms-client-request-id"] = str(uuid.uuid4())


class StorageHeaders(SansIOHTTPPolicy):
    """The version headers and a fresh ``x-ms-date`` on every attempt (it is signed: retries re-sign)."""

    def on_request(self, request: PipelineRequest[HttpRequest]) -> None:
        headers = request.http_request.headers
        headers["x-ms-version"] = API_VERSION
        headers["DataServiceVersion"] = "3.0"
        headers["x-ms-date"] = formatdate(usegmt=True)


class SharedKeyPolicy(SansIOHTTPPolicy):
    """Shared Key authorisation for the Table service (see the module docstring for the format)."""

    def __init__(self, credential: AzureNamedKeyCredential) -> None:
        super().__init__()
        self._credential = credential

    def string_to_sign(self, r: HttpRequest, name: str) -> str:
        return "\n".join((r.method, r.headers.get("Content-MD5", ""), r.headers.get("Content-Type", ""),
                          r.headers["x-ms-date"], f"/{name}{urlsplit(r.url).path}"))

    def on_request(self, request: PipelineRequest[HttpRequest]) -> None:
        r = request.http_request
        name, key = self._credential.named_key  # read per request: the key may be rotated in place
        to_sign = self.string_to_sign(r, name)
        try:
            secret = base64.b64decode(key)
        except ValueError:  # binascii.Error: as the SDK's signing error, an authentication failure
            raise ClientAuthenticationError("The storage account key is not valid base64.") from None
        digest = hmac.new(secret, to_sign.encode("utf-8"), hashlib.sha256).digest()
        r.headers["Authorization"] = f"SharedKey {name}:{base64.b64encode(digest).decode()}"


class TableRest:
    """Single-row operations on one table. Each raises azure-core's errors: ``HttpResponseError``
    (with the status) for a refusal, ``ServiceRequestError`` / ``ServiceResponseError`` when nothing
    answered."""

    def __init__(self, *, pipeline: Pipeline[HttpRequest, HttpResponse], endpoint: str, table: str,
                 sas: str = "") -> None:
        self._pipeline = pipeline
        self._base = f"{endpoint.rstrip('/')}/{quote(table, safe='')}"
        self._sas = sas.lstrip("?")

    def get(self, pk: str, rk: str, *, select: list[str] | None = None, **call: Unpack[RestCallOptions]) -> Row:
        query = f"$select={quote(','.join(select), safe=',')}" if select else ""
        response = self._run("GET", self._url(pk, rk, query), None, {"Accept": _READ_ACCEPT}, call)
        return row_from_json(json.loads(response.read()))

    def insert(self, entity: Mapping[str, EntityValue], **call: Unpack[RestCallOptions]) -> str:
        """Insert; 409 if the row exists. Returns the new ETag."""
        headers = {"Accept": _JSON, "Prefer": "return-no-content"}
        return self._etag(self._run("POST", self._with_sas(self._base), entity, headers, call))

    def update(self, entity: Mapping[str, EntityValue], *, merge: bool, etag: str | None,
               **call: Unpack[RestCallOptions]) -> str:
        """Replace (PUT) or merge (PATCH) an existing row: conditional on ``etag``, else on the row
        existing (``If-Match: *``). 404 if it does not exist, 412 if it changed. Returns the new ETag."""
        headers = {"Accept": _JSON, "If-Match": etag or "*"}
        return self._etag(self._run("PATCH" if merge else "PUT", self._entity_url(entity), entity, headers, call))

    def upsert(self, entity: Mapping[str, EntityValue], *, merge: bool, **call: Unpack[RestCallOptions]) -> str:
        """Insert or replace (PUT) / insert or merge (PATCH): no ``If-Match``. Returns the new ETag."""
        headers = {"Accept": _JSON}
        return self._etag(self._run("PATCH" if merge else "PUT", self._entity_url(entity), entity, headers, call))

    def delete(self, pk: str, rk: str, *, etag: str | None, **call: Unpack[RestCallOptions]) -> None:
        """Delete the row (conditional on ``etag`` when given). 404 if it is gone, 412 if it changed.

        A 404 to a retry is success: the retry policy only resends a DELETE whose earlier attempt got
        no answer (or a 5xx), and that attempt may have deleted the row.
        """
        self._run("DELETE", self._url(pk, rk), None, {"Accept": _JSON, "If-Match": etag or "*"}, call,
                  gone_after_retry_ok=True)

    # -- helpers ---------------------------------------------------------------------------------
    def _url(self, pk: str, rk: str, query: str = "") -> str:
        if not isinstance(pk, str) or not isinstance(rk, str):
            raise TypeError("PartitionKey and RowKey must be strings.")
        url = f"{self._base}(PartitionKey='{_key(pk)}',RowKey='{_key(rk)}')"
        return self._with_sas(url, query)

    def _entity_url(self, entity: Mapping[str, EntityValue]) -> str:
        return self._url(entity["PartitionKey"], entity["RowKey"])  # type: ignore[arg-type]

    def _with_sas(self, url: str, query: str = "") -> str:
        q = "&".join(p for p in (query, self._sas) if p)
        return f"{url}?{q}" if q else url

    def _run(self, method: str, url: str, entity: Mapping[str, EntityValue] | None, headers: dict[str, str],
             call: RestCallOptions, *, gone_after_retry_ok: bool = False) -> HttpResponse:
        body = None
        if entity is not None:
            headers["Content-Type"] = _JSON
            body = json.dumps(entity_to_json(entity), separators=(",", ":"))
        request = HttpRequest(method, url, headers=headers, content=body)
        result = self._pipeline.run(request, **call)
        response = result.http_response
        if gone_after_retry_ok and response.status_code == 404 and result.context.get("history"):
            return response
        raise_refusal(response)
        return response

    @staticmethod
    def _etag(response: HttpResponse) -> str:
        return str(response.headers.get("ETag") or "")


def raise_refusal(response: HttpResponse) -> None:
    """A non-2xx answer as azure-core's error. As the storage SDKs decide it: a refused signature or token is an
    authentication error (https://learn.microsoft.com/rest/api/storageservices/common-rest-api-error-codes)."""
    if 200 <= response.status_code < 300:
        return
    response.read()
    code = response.headers.get("x-ms-error-code", "")
    if response.status_code == 401 or code in _AUTHENTICATION_FAILED:
        raise ClientAuthenticationError(response=response)
    raise HttpResponseError(response=response)


def _key(value: str) -> str:
    return quote(value.replace("'", "''"), safe="")
