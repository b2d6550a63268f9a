"""The one place that imports azure-core's private modules (azure-core is pinned in requirements.txt).

The storage transport needs two things azure-core keeps private: whether a request is a ``azure.core.rest``
request (the pipeline also carries legacy ones), and azure-core's own adapter that turns an ``http.client``
answer into a REST response (the one it uses for batch sub-responses). An upgrade that moves either fails
``tests/shared/test_azure_core_adapter.py`` at import, not a request in production.
"""

from __future__ import annotations

import http.client
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from azure.core.rest import HttpRequest, HttpResponse


def is_rest_request(request: object) -> bool:
    """True for an ``azure.core.rest.HttpRequest`` (what Table and Queue clients send today)."""
    from azure.core.pipeline._tools import is_rest

    return bool(is_rest(request))


def rest_response(request: HttpRequest, raw: http.client.HTTPResponse) -> HttpResponse:
    """azure-core's REST response over an ``http.client`` answer, its body read (storage answers are small)."""
    from azure.core.rest._http_response_impl import RestHttpClientTransportResponse

    response = RestHttpClientTransportResponse(request=request, internal_response=raw)
    response.read()
    return response
