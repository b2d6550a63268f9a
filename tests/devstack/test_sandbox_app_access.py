"""Application access in the sandbox (admin consent, client credentials, /users/{id}, admin scope), proven
with the real MSAL library's ``acquire_token_for_client``."""

from __future__ import annotations

import datetime as dt

import jwt
import msal
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from devstack.sandbox import CONTOSO_TENANT_ID, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, SandboxServer

from .conftest import REDIRECT_URI
from .conftest import query_of as query

GRAPH_DEFAULT = "https://graph.microsoft.com/.default"
SUPPORT = "support@contoso.onmicrosoft.com"
SALES = "sales@contoso.onmicrosoft.com"


def consent(server: SandboxServer, http: requests.Session, login_hint: str | None, *,
            tenant: str = "contoso.onmicrosoft.com", **extra: str) -> requests.Response:
    params = {"client_id": DEFAULT_CLIENT_ID, "redirect_uri": REDIRECT_URI, "state": "st-1", "scope": GRAPH_DEFAULT,
              **extra}
    if login_hint:
        params["login_hint"] = login_hint
    return http.get(f"{server.url}/{tenant}/v2.0/adminconsent", params=params, allow_redirects=False, timeout=10)


def app_for(server: SandboxServer, http: requests.Session, tenant: str = CONTOSO_TENANT_ID,
            credential: object = DEFAULT_CLIENT_SECRET) -> msal.ConfidentialClientApplication:
    return msal.ConfidentialClientApplication(DEFAULT_CLIENT_ID, client_credential=credential,
                                              authority=f"{server.url}/{tenant}", http_client=http,
                                              instance_discovery=False)


def graph(server: SandboxServer, http: requests.Session, token: str, path: str, method: str = "GET",
          **kw: object) -> requests.Response:
    return http.request(method, f"{server.url}/v1.0/{path}", headers={"Authorization": f"Bearer {token}"},
                        timeout=10, **kw)  # type: ignore[arg-type]


def test_admin_consent_needs_an_administrator(sandbox_server, ctl, http):
    page = consent(sandbox_server, http, None)
    assert page.status_code == 200 and "admin@contoso.onmicrosoft.com" in page.text  # sign-in first
    denied = query(consent(sandbox_server, http, "adele@contoso.onmicrosoft.com").headers["Location"])
    assert denied["error"] == "access_denied" and denied["error_description"].startswith("AADSTS90093: ")
    assert denied["state"] == "st-1" and "admin_consent" not in denied
    assert not ctl.admin_consented(CONTOSO_TENANT_ID, DEFAULT_CLIENT_ID)
    shared = consent(sandbox_server, http, SUPPORT)
    assert shared.status_code == 400 and "AADSTS50057" in shared.text  # a shared mailbox cannot sign in
    other = consent(sandbox_server, http, "admin@fabrikam.onmicrosoft.com")
    assert other.status_code == 400 and "AADSTS50020" in other.text
    ok = query(consent(sandbox_server, http, "admin@contoso.onmicrosoft.com").headers["Location"])
    assert ok == {"admin_consent": "True", "tenant": CONTOSO_TENANT_ID, "scope": GRAPH_DEFAULT, "state": "st-1"}
    assert ctl.admin_consented(CONTOSO_TENANT_ID, DEFAULT_CLIENT_ID)
    # organizations: the tenant is the administrator's
    org = query(consent(sandbox_server, http, "admin@contoso.onmicrosoft.com", tenant="organizations")
                .headers["Location"])
    assert org["tenant"] == CONTOSO_TENANT_ID


def test_client_credentials_with_msal_before_and_after_consent(sandbox_server, ctl, http):
    app = app_for(sandbox_server, http)
    before = app.acquire_token_for_client([GRAPH_DEFAULT])
    assert before["error"] == "invalid_client" and before["error_codes"] == [7000229], before
    assert before["error_description"].startswith(f"AADSTS7000229: The client application {DEFAULT_CLIENT_ID} is "
                                                  f"missing service principal in the tenant {CONTOSO_TENANT_ID}.")
    consent(sandbox_server, http, "admin@contoso.onmicrosoft.com")
    result = app_for(sandbox_server, http).acquire_token_for_client([GRAPH_DEFAULT])
    assert result["token_type"] == "Bearer" and "refresh_token" not in result, result
    claims = jwt.decode(result["access_token"], options={"verify_signature": False})
    assert claims["idtyp"] == "app" and claims["tid"] == CONTOSO_TENANT_ID and "scp" not in claims
    assert sorted(claims["roles"]) == ["Mail.ReadWrite", "Mail.Send"] and claims["appid"] == DEFAULT_CLIENT_ID

    # a tenant is required, and only /.default
    common = app_for(sandbox_server, http, tenant="common").acquire_token_for_client([GRAPH_DEFAULT])
    assert common["error_codes"] == [9001023], common
    scoped = app_for(sandbox_server, http).acquire_token_for_client(["https://graph.microsoft.com/Mail.Read"])
    assert scoped["error"] == "invalid_scope" and scoped["error_codes"] == [1002012], scoped

    # removing the service principal ends consent: the next request is refused
    ctl.remove_admin_consent(CONTOSO_TENANT_ID, DEFAULT_CLIENT_ID)
    after = app_for(sandbox_server, http).acquire_token_for_client([GRAPH_DEFAULT])
    assert after["error_codes"] == [7000229], after
    gone = graph(sandbox_server, http, result["access_token"], f"users/{SUPPORT}/mailFolders/inbox")
    assert gone.status_code == 401  # and the tokens issued before are ended (expire_tokens)


def test_client_credentials_with_a_certificate_assertion(sandbox_server, ctl, http):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "connector")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    ctl.add_certificate(DEFAULT_CLIENT_ID, pem)
    consent(sandbox_server, http, "admin@contoso.onmicrosoft.com")
    credential = {"private_key": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()).decode(),
                  "thumbprint": cert.fingerprint(hashes.SHA1()).hex()}
    result = app_for(sandbox_server, http, credential=credential).acquire_token_for_client([GRAPH_DEFAULT])
    assert "access_token" in result, result
    assert ctl.counters()["client_auth_by_method"].get("certificate", 0) >= 1, ctl.counters()["client_auth_by_method"]


def test_application_token_reaches_any_mailbox_by_users_path_within_the_admin_scope(sandbox_server, ctl, http):
    consent(sandbox_server, http, "admin@contoso.onmicrosoft.com")
    token = app_for(sandbox_server, http).acquire_token_for_client([GRAPH_DEFAULT])["access_token"]
    me = graph(sandbox_server, http, token, "me/messages")
    assert me.status_code == 400 and me.json()["error"] == {
        "code": "BadRequest", "message": "/me request is only valid with delegated authentication flow.",
        "innerError": me.json()["error"]["innerError"]}
    for ref in (SUPPORT, "5a990000-0000-4000-8000-00000000a009", "adele@contoso.onmicrosoft.com"):
        r = graph(sandbox_server, http, token, f"users/{ref}/mailFolders/inbox/messages", params={"$top": "1"})
        assert r.status_code == 200, (ref, r.text)
    unknown = graph(sandbox_server, http, token, "users/nobody@contoso.onmicrosoft.com/messages")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "ErrorInvalidUser"
    other_tenant = graph(sandbox_server, http, token, "users/user@fabrikam.onmicrosoft.com/messages")
    assert other_tenant.status_code == 404

    ctl.set_app_scope(CONTOSO_TENANT_ID, DEFAULT_CLIENT_ID, [SUPPORT])
    assert graph(sandbox_server, http, token, f"users/{SUPPORT}/messages").status_code == 200
    outside = graph(sandbox_server, http, token, f"users/{SALES}/messages")
    assert outside.status_code == 403
    assert outside.json()["error"]["code"] == "ErrorAccessDenied"
    assert "AppOnly AccessPolicy" in outside.json()["error"]["message"]
    sub = graph(sandbox_server, http, token, "subscriptions", "POST", json={
        "changeType": "created", "resource": f"users/{SALES}/mailFolders('Inbox')/messages",
        "notificationUrl": "https://example.invalid/n", "expirationDateTime": "2030-01-01T00:00:00Z"})
    assert sub.status_code == 403 and sub.json()["error"]["code"] == "ExtensionError"

    # send as the shared mailbox with the application's Mail.Send
    sent = graph(sandbox_server, http, token, f"users/{SUPPORT}/sendMail", "POST", json={"message": {
        "subject": "From support", "body": {"contentType": "Text", "content": "hi"},
        "toRecipients": [{"emailAddress": {"address": "adele@contoso.onmicrosoft.com"}}]}})
    assert sent.status_code == 202, sent.text
    record, = ctl.sent(SUPPORT)
    assert record["message"]["subject"] == "From support"
    assert record["message"]["from"]["emailAddress"]["address"] == SUPPORT

    # without the Mail.Send application permission
    ctl.set_app_roles(DEFAULT_CLIENT_ID, ["Mail.ReadWrite"])
    narrow = app_for(sandbox_server, http).acquire_token_for_client([GRAPH_DEFAULT])["access_token"]
    refused = graph(sandbox_server, http, narrow, f"users/{SUPPORT}/sendMail", "POST", json={"message": {
        "subject": "x", "toRecipients": [{"emailAddress": {"address": "adele@contoso.onmicrosoft.com"}}]}})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "ErrorAccessDenied"


def test_delegated_token_reaches_only_its_own_mailbox_through_users(sandbox_server, ctl, flows, http):
    tokens = flows.sign_in("adele@contoso.onmicrosoft.com")
    at = tokens["access_token"]
    assert graph(sandbox_server, http, at, "users/adele@contoso.onmicrosoft.com/messages").status_code == 200
    other = graph(sandbox_server, http, at, f"users/{SUPPORT}/messages")
    assert other.status_code == 403 and other.json()["error"]["code"] == "ErrorAccessDenied"
    signin, _ = flows.authorize(SUPPORT)
    assert signin.status_code == 400 and "AADSTS50057" in signin.text


@pytest.mark.parametrize("tenant", ["common", "consumers"])
def test_admin_consent_refuses_multi_tenant_aliases(sandbox_server, ctl, http, tenant):
    r = consent(sandbox_server, http, "admin@contoso.onmicrosoft.com", tenant=tenant)
    assert r.status_code == 400 and "AADSTS90002" in r.text


def test_id_tokens_name_an_administrators_directory_roles(sandbox_server, ctl, flows):
    global_admin = "62e90394-69f5-4237-9190-012177145e10"
    admin = jwt.decode(flows.sign_in("admin@contoso.onmicrosoft.com")["id_token"], options={"verify_signature": False})
    user = jwt.decode(flows.sign_in("adele@contoso.onmicrosoft.com")["id_token"], options={"verify_signature": False})
    assert global_admin in admin["wids"] and global_admin not in user.get("wids", [])


def test_msal_over_the_connectors_token_http_client(sandbox_server, ctl, http):
    """The connector's own MSAL http_client (shared._token_http) with real MSAL: discovery, the grant, an error."""
    from shared._http import ca_bundle_path
    from shared._token_http import TokenHttpClient

    client = TokenHttpClient(ca_file=ca_bundle_path(sandbox_server.ca_path))
    app = msal.ConfidentialClientApplication(DEFAULT_CLIENT_ID, client_credential=DEFAULT_CLIENT_SECRET,
                                             authority=f"{sandbox_server.url}/{CONTOSO_TENANT_ID}",
                                             http_client=client, instance_discovery=False)
    refused = app.acquire_token_for_client([GRAPH_DEFAULT])
    assert refused["error_codes"] == [7000229] and "access_token" not in refused
    consent(sandbox_server, http, "admin@contoso.onmicrosoft.com")
    ok = msal.ConfidentialClientApplication(DEFAULT_CLIENT_ID, client_credential=DEFAULT_CLIENT_SECRET,
                                            authority=f"{sandbox_server.url}/{CONTOSO_TENANT_ID}",
                                            http_client=client, instance_discovery=False)
    assert "access_token" in ok.acquire_token_for_client([GRAPH_DEFAULT])
    # without the sandbox's CA the TLS handshake is refused: trust is what the client was given, nothing else
    with pytest.raises(ValueError, match="Unable to get authority configuration") as refused_tls:
        msal.ConfidentialClientApplication(
            DEFAULT_CLIENT_ID, client_credential=DEFAULT_CLIENT_SECRET, instance_discovery=False,
            authority=f"{sandbox_server.url}/{CONTOSO_TENANT_ID}",
            http_client=TokenHttpClient(ca_file=ca_bundle_path(None)))
    assert "CERTIFICATE_VERIFY_FAILED" in repr(refused_tls.value.__context__)


def test_response_headers_are_split_on_the_first_colon_and_folded_lines_continue() -> None:
    from shared._storage_transport import parse_header_lines

    msg = parse_header_lines([b"ETag: W/\"datetime'2026'\"\r\n", b"x-ms-error-code:ResourceNotFound\r\n",
                    b"X-Long: first\r\n", b"  second\r\n", b"Location: https://h/p?a=b:c\r\n", b"\r\n"])
    assert msg.get("etag") == "W/\"datetime'2026'\"" and msg.get("X-MS-ERROR-CODE") == "ResourceNotFound"
    assert msg.get("x-long") == "first second" and msg.get("location") == "https://h/p?a=b:c"
