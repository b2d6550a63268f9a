"""The sandbox's /token client authentication with client assertions, proven with the real MSAL library:
certificates (x5t#S256 / PS256 and the SHA-1 x5t / RS256 form) and a managed identity's token as a
federated identity credential; each wrong assertion gets Entra's AADSTS error."""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt
import msal
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from devstack.certs import new_client_certificate
from devstack.sandbox import CONTOSO_TENANT_ID, DEFAULT_CLIENT_ID, SandboxControl, SandboxServer
from devstack.sandbox.assertions import JWT_BEARER

from .test_sandbox_identity import ADELE, SCOPES, assert_entra_error, run_flow

pytestmark = pytest.mark.filterwarnings("ignore:response_mode=.form_post.:UserWarning")
EXCHANGE = "api://AzureADTokenExchange"


def cert_app(server: SandboxServer, http: requests.Session, credential: dict[str, Any],
             tenant: str = "common") -> msal.ConfidentialClientApplication:
    return msal.ConfidentialClientApplication(DEFAULT_CLIENT_ID, client_credential=credential,
                                              authority=f"{server.url}/{tenant}", http_client=http,
                                              instance_discovery=False)


def sha1_hex(cert_pem: str) -> str:
    return x509.load_pem_x509_certificate(cert_pem.encode()).fingerprint(hashes.SHA1()).hex()


def sign_in_and_refresh(app: msal.ConfidentialClientApplication, http: requests.Session) -> dict[str, Any]:
    flow, qp = run_flow(app, http, ADELE)
    result = app.acquire_token_by_auth_code_flow(flow, qp)
    assert "access_token" in result, result
    refreshed = app.acquire_token_by_refresh_token(result["refresh_token"], SCOPES)
    assert "access_token" in refreshed, refreshed
    return refreshed


def test_certificate_sha256_and_sha1_forms_sign_in_and_refresh(sandbox_server, ctl, http):
    key_pem, cert_pem = new_client_certificate()
    ctl.add_certificate(DEFAULT_CLIENT_ID, cert_pem)
    # What shared.client_credentials hands MSAL: x5t#S256 computed from the certificate, PS256, x5c.
    sign_in_and_refresh(cert_app(sandbox_server, http, {"private_key": key_pem, "public_certificate": cert_pem}), http)
    # MSAL's {"private_key", "thumbprint"} form: SHA-1 x5t, RS256.
    sign_in_and_refresh(cert_app(sandbox_server, http, {"private_key": key_pem, "thumbprint": sha1_hex(cert_pem)}),
                        http)
    assert ctl.counters()["client_auth_by_method"] == {"certificate": 4}


def test_wrong_certificate_gives_700027_with_reason(sandbox_server, ctl, http):
    key_pem, cert_pem = new_client_certificate()
    other_key, other_cert = new_client_certificate()
    app = cert_app(sandbox_server, http, {"private_key": other_key, "public_certificate": other_cert})
    flow, qp = run_flow(app, http, ADELE)
    result = app.acquire_token_by_auth_code_flow(flow, qp)
    assert_entra_error(result, "invalid_client", 700027)
    assert "The key was not found." in result["error_description"]

    ctl.add_certificate(DEFAULT_CLIENT_ID, cert_pem)  # the registered certificate, signed with another key
    forged = cert_app(sandbox_server, http, {"private_key": other_key, "thumbprint": sha1_hex(cert_pem)})
    flow, qp = run_flow(forged, http, ADELE)
    result = forged.acquire_token_by_auth_code_flow(flow, qp)
    assert_entra_error(result, "invalid_client", 700027)
    assert "did not match the expected signature value" in result["error_description"]

    ctl.add_certificate(DEFAULT_CLIENT_ID, cert_pem, valid=False)  # its end date has passed
    expired = cert_app(sandbox_server, http, {"private_key": key_pem, "public_certificate": cert_pem})
    flow, qp = run_flow(expired, http, ADELE)
    result = expired.acquire_token_by_auth_code_flow(flow, qp)
    assert_entra_error(result, "invalid_client", 700027)
    assert "The key used is expired." in result["error_description"]


def _post_assertion(server: SandboxServer, http: requests.Session, assertion: str,
                    assertion_type: str | None = JWT_BEARER) -> dict[str, Any]:
    data = {"client_id": DEFAULT_CLIENT_ID, "grant_type": "refresh_token", "refresh_token": "x",
            "client_assertion": assertion}
    if assertion_type:
        data["client_assertion_type"] = assertion_type
    r = http.post(f"{server.url}/common/oauth2/v2.0/token", data=data, timeout=10)
    assert r.status_code in (400, 401), r.text
    return r.json()


def _hand_made(key_pem: str, cert_pem: str, **claims: Any) -> str:
    import base64

    now = int(time.time())
    body = {"aud": None, "iss": DEFAULT_CLIENT_ID, "sub": DEFAULT_CLIENT_ID, "jti": str(uuid.uuid4()),
            "nbf": now, "exp": now + 600}
    body.update(claims)
    digest = x509.load_pem_x509_certificate(cert_pem.encode()).fingerprint(hashes.SHA256())
    x5t = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    return jwt.encode(body, key_pem, algorithm="PS256", headers={"x5t#S256": x5t})


@pytest.mark.parametrize(("claims", "code"), [
    ({"exp": int(time.time()) - 3600, "nbf": int(time.time()) - 4000}, 700024),
    ({"nbf": int(time.time()) + 3600, "exp": int(time.time()) + 4000}, 700024),
    ({"aud": "https://login.example.com/common/oauth2/v2.0/token"}, 50027),
    ({"sub": "someone-else"}, 700021),
    ({"jti": None}, 50027),
])
def test_hand_made_certificate_assertions_get_entra_errors(sandbox_server, ctl, http, claims, code):
    key_pem, cert_pem = new_client_certificate()
    ctl.add_certificate(DEFAULT_CLIENT_ID, cert_pem)
    claims = {"aud": f"{sandbox_server.url}/common/oauth2/v2.0/token", **claims}
    body = _post_assertion(sandbox_server, http, _hand_made(key_pem, cert_pem, **claims))
    assert body["error_codes"] == [code], body
    assert body["error_description"].startswith(f"AADSTS{code}: ")


def test_malformed_assertion_and_missing_type(sandbox_server, ctl, http):
    assert _post_assertion(sandbox_server, http, "not-a-jwt")["error_codes"] == [50027]
    body = _post_assertion(sandbox_server, http, "a.b.c", assertion_type=None)
    assert body["error"] == "invalid_request" and body["error_codes"] == [900144]


def _managed_identity(ctl: SandboxControl) -> dict[str, Any]:
    mi = ctl.add_managed_identity(str(uuid.uuid4()), tenant_id=CONTOSO_TENANT_ID)
    assert mi["issuer"].endswith(f"/{CONTOSO_TENANT_ID}/v2.0")
    return mi


def _fic_app(server: SandboxServer, http: requests.Session, ctl: SandboxControl, mi: dict[str, Any],
             resource: str = EXCHANGE) -> msal.ConfidentialClientApplication:
    def assertion() -> str:
        return str(ctl.managed_identity_token(mi["client_id"], resource)["access_token"])

    return cert_app(server, http, {"client_assertion": assertion}, tenant="organizations")


def test_managed_identity_as_federated_credential(sandbox_server, ctl, http):
    mi = _managed_identity(ctl)
    token = jwt.decode(ctl.managed_identity_token(mi["client_id"], EXCHANGE)["access_token"],
                       options={"verify_signature": False})
    assert (token["iss"], token["sub"], token["aud"], token["idtyp"]) == (
        mi["issuer"], mi["principal_id"], EXCHANGE, "app")
    app = _fic_app(sandbox_server, http, ctl, mi)
    flow, qp = run_flow(app, http, ADELE)
    assert_entra_error(app.acquire_token_by_auth_code_flow(flow, qp), "invalid_request", 70021)  # no FIC yet

    ctl.add_federated_credential(DEFAULT_CLIENT_ID, issuer=mi["issuer"], subject=mi["principal_id"])
    sign_in_and_refresh(_fic_app(sandbox_server, http, ctl, mi), http)
    assert ctl.counters()["client_auth_by_method"]["federated"] == 3


def test_federated_credential_mismatches(sandbox_server, ctl, http):
    mi = _managed_identity(ctl)
    other = _managed_identity(ctl)
    ctl.add_federated_credential(DEFAULT_CLIENT_ID, issuer=mi["issuer"], subject=mi["principal_id"])
    for app in (_fic_app(sandbox_server, http, ctl, other),  # another identity: wrong subject
                _fic_app(sandbox_server, http, ctl, mi, resource="api://SomethingElse")):  # wrong audience
        flow, qp = run_flow(app, http, ADELE)
        result = app.acquire_token_by_auth_code_flow(flow, qp)
        assert_entra_error(result, "invalid_request", 70021)
        assert "Assertion Subject" in result["error_description"]
    # An expired token of the right identity: AADSTS700024.
    stale = ctl.managed_identity_token(mi["client_id"], EXCHANGE, lifetime_s=60)["access_token"]
    ctl.advance_clock(3600)
    app = cert_app(sandbox_server, http, {"client_assertion": lambda: stale}, tenant="organizations")
    flow, qp = run_flow(app, http, ADELE)
    assert_entra_error(app.acquire_token_by_auth_code_flow(flow, qp), "invalid_client", 700024)
