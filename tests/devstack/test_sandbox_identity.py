"""The sandbox's identity side, proven with the real MSAL library."""

from __future__ import annotations

import json
import socket

import jwt
import msal
import pytest
import requests

from devstack.sandbox import (
    CONSUMER_TENANT_ID,
    CONTOSO_TENANT_ID,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    SandboxControl,
    SandboxServer,
    main,
)

from .conftest import REDIRECT_URI
from .conftest import query_of as query

pytestmark = pytest.mark.filterwarnings("ignore:response_mode=.form_post.:UserWarning")

SCOPES = ["User.Read", "Mail.ReadWrite", "Mail.Send"]
ADELE = "adele@contoso.onmicrosoft.com"


def new_app(server: SandboxServer, http: requests.Session, secret: str = DEFAULT_CLIENT_SECRET,
            **kw: object) -> msal.ConfidentialClientApplication:
    kw.setdefault("instance_discovery", False)
    return msal.ConfidentialClientApplication(
        DEFAULT_CLIENT_ID, client_credential=secret, authority=f"{server.url}/common", http_client=http, **kw,
    )


def run_flow(app: msal.ConfidentialClientApplication, http: requests.Session, login_hint: str,
             **kw: object) -> tuple[dict, dict]:
    flow = app.initiate_auth_code_flow(SCOPES, redirect_uri=REDIRECT_URI, login_hint=login_hint, **kw)
    r = http.get(flow["auth_uri"], allow_redirects=False, timeout=10)
    assert r.status_code == 302, r.text[:300]
    return flow, query(r.headers["Location"])


def assert_entra_error(result: dict, error: str, code: int) -> None:
    assert result.get("error") == error, result
    assert code in result.get("error_codes", []), result
    assert result["error_description"].startswith(f"AADSTS{code}: "), result
    for field in ("trace_id", "correlation_id", "timestamp", "error_uri"):
        assert field in result, (field, result)
    assert "\r\nTrace ID: " in result["error_description"]


def test_discovery_jwks_and_signed_id_token(sandbox_server, ctl, http, flows):
    cfg = http.get(f"{sandbox_server.url}/common/v2.0/.well-known/openid-configuration", timeout=10).json()
    assert cfg["authorization_endpoint"] == f"{sandbox_server.url}/common/oauth2/v2.0/authorize"
    assert cfg["token_endpoint"] == f"{sandbox_server.url}/common/oauth2/v2.0/token"
    assert cfg["issuer"] == f"{sandbox_server.url}/{{tenantid}}/v2.0"
    consumers = http.get(f"{sandbox_server.url}/consumers/v2.0/.well-known/openid-configuration", timeout=10).json()
    assert consumers["issuer"].endswith(f"/{CONSUMER_TENANT_ID}/v2.0")
    bad = http.get(f"{sandbox_server.url}/nosuchtenant/v2.0/.well-known/openid-configuration", timeout=10)
    assert bad.status_code == 400 and bad.json()["error_codes"] == [90002]

    keys = http.get(cfg["jwks_uri"], timeout=10).json()["keys"]
    tokens = flows.sign_in(ADELE)
    kid = jwt.get_unverified_header(tokens["id_token"])["kid"]
    jwk = next(k for k in keys if k["kid"] == kid)
    claims = jwt.decode(tokens["id_token"], jwt.PyJWK(jwk).key, algorithms=["RS256"], audience=DEFAULT_CLIENT_ID)
    assert claims["tid"] == CONTOSO_TENANT_ID and claims["ver"] == "2.0"
    assert claims["iss"] == f"{sandbox_server.url}/{CONTOSO_TENANT_ID}/v2.0"
    # Work-account access tokens are Graph JWTs carrying scp.
    at = jwt.decode(tokens["access_token"], options={"verify_signature": False})
    assert at["aud"] == "00000003-0000-0000-c000-000000000000"
    assert set(at["scp"].split()) == set(SCOPES) and at["appid"] == DEFAULT_CLIENT_ID
    assert 3600 <= tokens["expires_in"] <= 5399 and isinstance(tokens["expires_in"], int)
    assert set(tokens["scope"].split()) >= set(SCOPES)


def test_msal_auth_code_flow_then_rotation_kills_old_refresh_token(sandbox_server, ctl, http):
    app = new_app(sandbox_server, http)
    flow, qp = run_flow(app, http, ADELE)
    assert qp["state"] == flow["state"] and "client_info" in qp
    result = app.acquire_token_by_auth_code_flow(flow, qp)  # MSAL checks state and the nonce hash
    assert "access_token" in result, result
    claims = result["id_token_claims"]
    assert claims["tid"] == CONTOSO_TENANT_ID and claims["oid"] == "a1de1e00-0000-4000-8000-00000000a001"
    assert claims["nonce"]
    old_rt = result["refresh_token"]
    assert ctl.live_refresh_tokens(ADELE) == 1

    account = app.get_accounts()[0]
    assert account["home_account_id"] == f"{claims['oid']}.{CONTOSO_TENANT_ID}"
    refreshed = app.acquire_token_silent(SCOPES, account=account, force_refresh=True)
    assert refreshed and "access_token" in refreshed, refreshed
    assert refreshed["refresh_token"] != old_rt
    assert ctl.live_refresh_tokens(ADELE) == 1  # strict rotation: exactly one live refresh token

    assert ctl.lost_rotations(ADELE) == []
    stale = new_app(sandbox_server, http).acquire_token_by_refresh_token(old_rt, SCOPES)
    assert_entra_error(stale, "invalid_grant", 70000)
    counters = ctl.counters()
    assert counters["token_requests_by_grant_type"] == {"authorization_code": 1, "refresh_token": 2}
    # The exchanged token came back while its successor was never used: the audit's "lost rotation".
    [(minted, presented)] = ctl.lost_rotations(ADELE, DEFAULT_CLIENT_ID)
    assert minted <= presented
    used = new_app(sandbox_server, http).acquire_token_by_refresh_token(refreshed["refresh_token"], SCOPES)
    assert "access_token" in used, used
    assert ctl.lost_rotations(ADELE) == []  # the successor was redeemed after all: nothing was lost


def test_relaxed_rotation_keeps_old_refresh_token_valid(sandbox_server, ctl, http, flows):
    ctl.set_rotation(strict=False)  # how Entra itself behaves
    tokens = flows.sign_in(ADELE)
    first = new_app(sandbox_server, http).acquire_token_by_refresh_token(tokens["refresh_token"], SCOPES)
    assert "access_token" in first
    again = new_app(sandbox_server, http).acquire_token_by_refresh_token(tokens["refresh_token"], ["User.Read"])
    assert "access_token" in again and again["scope"].split()[0] == "User.Read"  # a subset may be asked for


def test_wrong_and_expired_client_secret(sandbox_server, ctl, http):
    app = new_app(sandbox_server, http, secret="not-the-secret")
    flow, qp = run_flow(app, http, ADELE)
    result = app.acquire_token_by_auth_code_flow(flow, qp)
    assert_entra_error(result, "invalid_client", 7000215)

    ctl.set_client_secret_valid(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, False)
    app = new_app(sandbox_server, http)
    flow, qp = run_flow(app, http, ADELE)
    assert_entra_error(app.acquire_token_by_auth_code_flow(flow, qp), "invalid_client", 7000222)


def test_invalid_client_is_http_401_and_unknown_client_400(sandbox_server, ctl, http):
    url = f"{sandbox_server.url}/common/oauth2/v2.0/token"
    r = http.post(url, data={"client_id": DEFAULT_CLIENT_ID, "client_secret": "x", "grant_type": "refresh_token",
                             "refresh_token": "x"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    r = http.post(url, data={"client_id": "00000000-1111-2222-3333-444444444444", "client_secret": "x",
                             "grant_type": "refresh_token", "refresh_token": "x"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "unauthorized_client"
    assert r.json()["error_codes"] == [700016]


def test_pkce_mismatch_and_code_replay(sandbox_server, ctl, http):
    app = new_app(sandbox_server, http)
    flow, qp = run_flow(app, http, ADELE)
    tampered = dict(flow, code_verifier=flow["code_verifier"][::-1])
    assert_entra_error(app.acquire_token_by_auth_code_flow(tampered, qp), "invalid_grant", 501481)

    app = new_app(sandbox_server, http)
    flow, qp = run_flow(app, http, ADELE)
    assert "access_token" in app.acquire_token_by_auth_code_flow(flow, qp)
    replay = new_app(sandbox_server, http).acquire_token_by_auth_code_flow(flow, qp)
    assert_entra_error(replay, "invalid_grant", 54005)


def test_code_expires_after_ten_minutes(sandbox_server, ctl, http):
    app = new_app(sandbox_server, http)
    flow, qp = run_flow(app, http, ADELE)
    ctl.advance_clock(601)
    assert_entra_error(app.acquire_token_by_auth_code_flow(flow, qp), "invalid_grant", 70008)


def test_redirect_uri_rules(sandbox_server, ctl, http, flows):
    r, _ = flows.authorize(ADELE, redirect_uri="https://evil.example/callback")
    assert r.status_code == 400 and "Location" not in r.headers  # an error page, never a redirect
    assert "AADSTS50011" in r.text

    app = new_app(sandbox_server, http)
    flow, qp = run_flow(app, http, ADELE)
    other = "http://127.0.0.1:7071/api/connect/microsoft/callback"  # registered, but not the one used
    res = app.acquire_token_by_auth_code_flow(dict(flow, redirect_uri=other), qp)
    assert_entra_error(res, "invalid_grant", 500112)


def test_personal_account_gets_consumer_tenant_and_opaque_access_token(sandbox_server, ctl, http, flows):
    app = new_app(sandbox_server, http)
    flow, qp = run_flow(app, http, "pat@outlook.com")
    result = app.acquire_token_by_auth_code_flow(flow, qp)
    assert result["id_token_claims"]["tid"] == CONSUMER_TENANT_ID
    assert "." not in result["access_token"]  # MSA access tokens are not JWTs
    account = app.get_accounts()[0]
    assert account["home_account_id"] == f"{result['id_token_claims']['oid']}.{CONSUMER_TENANT_ID}"
    # a work account cannot use the /consumers authority
    r, _ = flows.authorize(ADELE, tenant="consumers")
    assert query(r.headers["Location"])["error"] == "access_denied"


def test_admin_consent_tenant_then_admin_grants_consent(sandbox_server, ctl, http):
    app = new_app(sandbox_server, http)
    flow, qp = run_flow(app, http, "user@fabrikam.onmicrosoft.com")
    assert qp["error"] == "consent_required" and qp["state"] == flow["state"]
    assert qp["error_description"].startswith("AADSTS65001: ")
    result = app.acquire_token_by_auth_code_flow(flow, qp)
    assert result["error"] == "consent_required"

    # Interactive: the "Need admin approval" page (AADSTS90094), no redirect.
    r = http.get(flow["auth_uri"].replace("login_hint=", "x_hint="), allow_redirects=False, timeout=10)
    page = http.post(f"{sandbox_server.url}/common/oauth2/v2.0/authorize/signin",
                     data={"ctx": r.text.split("name='ctx' value='")[1].split("'")[0],
                           "user": "user@fabrikam.onmicrosoft.com"}, allow_redirects=False, timeout=10)
    assert page.status_code == 200 and "AADSTS90094" in page.text

    consent = http.get(f"{sandbox_server.url}/fabrikam.onmicrosoft.com/v2.0/adminconsent", params={
        "client_id": DEFAULT_CLIENT_ID, "redirect_uri": REDIRECT_URI, "state": "s1",
        "scope": "https://graph.microsoft.com/.default", "login_hint": "admin@fabrikam.onmicrosoft.com"},
        allow_redirects=False, timeout=10)
    assert query(consent.headers["Location"])["admin_consent"] == "True"
    app = new_app(sandbox_server, http)
    flow, qp = run_flow(app, http, "user@fabrikam.onmicrosoft.com")
    assert "access_token" in app.acquire_token_by_auth_code_flow(flow, qp)


def test_conditional_access_block_at_authorize_and_at_refresh(sandbox_server, ctl, http, flows):
    r, _ = flows.authorize("blocked@contoso.onmicrosoft.com")
    q = query(r.headers["Location"])
    assert q["error"] == "access_denied" and q["error_description"].startswith("AADSTS53003: ")

    tokens = flows.sign_in(ADELE)
    ctl.set_conditional_access(ADELE, True)  # a policy change after the grant
    res = new_app(sandbox_server, http).acquire_token_by_refresh_token(tokens["refresh_token"], SCOPES)
    assert_entra_error(res, "interaction_required", 53003)
    assert res["suberror"] == "message_only"


def test_revoked_grants_answer_50173(sandbox_server, ctl, http, flows):
    tokens = flows.sign_in(ADELE)
    ctl.revoke_grants(ADELE)
    assert ctl.live_refresh_tokens(ADELE) == 0
    raw = http.post(f"{sandbox_server.url}/common/oauth2/v2.0/token", data={
        "client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET, "grant_type": "refresh_token",
        "refresh_token": tokens["refresh_token"], "scope": " ".join(SCOPES)}, timeout=10)
    assert raw.status_code == 400
    body = raw.json()
    assert_entra_error(body, "invalid_grant", 50173)
    assert "TokensValidFrom" in body["error_description"]


def test_refresh_token_expires_after_90_days_of_inactivity(sandbox_server, ctl, http, flows):
    tokens = flows.sign_in(ADELE)
    ctl.advance_clock(91 * 24 * 3600)
    res = new_app(sandbox_server, http).acquire_token_by_refresh_token(tokens["refresh_token"], SCOPES)
    assert_entra_error(res, "invalid_grant", 700082)


def test_interactive_sign_in_and_consent_pages(sandbox_server, ctl, http, flows):
    r, _ = flows.authorize("", prompt="select_account")
    assert r.status_code == 200 and "Pick an account" in r.text
    ctx = r.text.split("name='ctx' value='")[1].split("'")[0]
    consent = http.post(f"{sandbox_server.url}/common/oauth2/v2.0/authorize/signin",
                        data={"ctx": ctx, "user": "megan@contoso.onmicrosoft.com"}, timeout=10)
    assert "Permissions requested" in consent.text and "Mail.Send" in consent.text
    cancel = http.post(f"{sandbox_server.url}/common/oauth2/v2.0/authorize/consent",
                       data={"ctx": ctx, "decision": "cancel"}, allow_redirects=False, timeout=10)
    q = query(cancel.headers["Location"])
    assert q["error"] == "access_denied" and q["error_description"].startswith("AADSTS65004: ")
    assert q["error_subcode"] == "cancel"

    r, _ = flows.authorize("")
    ctx = r.text.split("name='ctx' value='")[1].split("'")[0]
    http.post(f"{sandbox_server.url}/common/oauth2/v2.0/authorize/signin",
              data={"ctx": ctx, "user": "megan@contoso.onmicrosoft.com"}, timeout=10)
    accept = http.post(f"{sandbox_server.url}/common/oauth2/v2.0/authorize/consent",
                       data={"ctx": ctx, "decision": "accept"}, allow_redirects=False, timeout=10)
    assert "code" in query(accept.headers["Location"])


def test_msal_with_sandbox_instance_discovery_endpoint(sandbox_server, ctl, http):
    app = new_app(sandbox_server, http, instance_discovery=f"{sandbox_server.url}/common/discovery/instance")
    flow, qp = run_flow(app, http, "megan@contoso.onmicrosoft.com")
    assert "access_token" in app.acquire_token_by_auth_code_flow(flow, qp)


def test_injected_token_endpoint_failures_and_latency(sandbox_server, ctl, http):
    ctl.inject("/common/oauth2/v2.0/token", status=503, retry_after=7)
    r = http.post(f"{sandbox_server.url}/common/oauth2/v2.0/token", data={"grant_type": "refresh_token"},
                  timeout=10)
    assert r.status_code == 503 and r.headers["Retry-After"] == "7"
    assert r.json()["error"] == "temporarily_unavailable"
    ctl.inject("*/oauth2/v2.0/token", status=429, retry_after=3)
    r = http.post(f"{sandbox_server.url}/organizations/oauth2/v2.0/token", data={}, timeout=10)
    assert r.status_code == 429 and r.headers["Retry-After"] == "3"
    # the next request is no longer affected
    r = http.post(f"{sandbox_server.url}/common/oauth2/v2.0/token", data={}, timeout=10)
    assert r.status_code == 400 and r.json()["error_codes"] == [900144]


def test_control_api_rejects_bad_input(sandbox_server, ctl, http):
    base = f"{sandbox_server.url}/_sandbox"
    r = http.post(f"{base}/inject", json={"path_prefix": "/v1.0", "status": "soon"}, timeout=10)
    assert r.status_code == 400 and "status" in r.json()["message"]
    r = http.post(f"{base}/users/nobody@example.com/revoke_grants", timeout=10)
    assert r.status_code == 404
    r = http.post(f"{base}/rotation", data="not json", headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400
    assert http.get(f"{base}/nope", timeout=10).status_code == 404
    assert isinstance(ctl, SandboxControl)


def test_cli_reports_a_taken_port_in_one_line(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert main(["--port", str(port), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"port {port} is already in use" in err[0]


def test_no_secrets_in_error_bodies(sandbox_server, ctl, http):
    r = http.post(f"{sandbox_server.url}/common/oauth2/v2.0/token", data={
        "client_id": DEFAULT_CLIENT_ID, "client_secret": "wrong-secret-value", "grant_type": "authorization_code",
        "code": "abc"}, timeout=10)
    assert "wrong-secret-value" not in json.dumps(r.json())


@pytest.mark.parametrize("tenant", ["organizations", CONTOSO_TENANT_ID, "contoso.onmicrosoft.com"])
def test_work_account_on_other_authorities(sandbox_server, ctl, http, tenant, flows):
    tokens = flows.sign_in(ADELE, tenant=tenant)
    assert "refresh_token" in tokens


def test_a_code_issued_without_a_challenge_refuses_a_verifier(sandbox_server, ctl, http):
    """RFC 9700 §4.8.2 (PKCE downgrade): an authorization request stripped of its code_challenge still gets a
    code (a confidential client may do without PKCE, as Entra allows), but a token request that then brings a
    code_verifier is refused: the attacker removed the challenge the client had sent."""
    def code() -> str:
        r = http.get(f"{sandbox_server.url}/common/oauth2/v2.0/authorize", allow_redirects=False, timeout=10,
                     params={"client_id": DEFAULT_CLIENT_ID, "response_type": "code", "redirect_uri": REDIRECT_URI,
                             "scope": "User.Read offline_access", "state": "s", "login_hint": ADELE})
        assert r.status_code == 302, r.text[:300]
        return query(r.headers["Location"])["code"]

    token_url = f"{sandbox_server.url}/common/oauth2/v2.0/token"
    form = {"client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET,
            "grant_type": "authorization_code", "redirect_uri": REDIRECT_URI, "scope": "User.Read offline_access"}
    downgraded = http.post(token_url, data={**form, "code": code(), "code_verifier": "v" * 43}, timeout=10)
    assert downgraded.status_code == 400 and downgraded.json()["error"] == "invalid_grant", downgraded.text
    assert http.post(token_url, data={**form, "code": code()}, timeout=10).status_code == 200  # no PKCE at all
