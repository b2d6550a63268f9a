"""A local Azure Key Vault (secrets only) plus an App Service managed-identity endpoint. Never deployed.

It lets the real ``azure.identity.ManagedIdentityCredential`` and the real
``azure.keyvault.secrets.SecretClient`` run end to end on loopback, with no Azure and no internet:

**Managed identity endpoint (plain HTTP on loopback, like App Service / Azure Functions).**
App Service exposes a local token service through two environment variables, ``IDENTITY_ENDPOINT``
(an ``http://`` loopback URL) and ``IDENTITY_HEADER``; a client calls
``GET {IDENTITY_ENDPOINT}?resource=<resource>&api-version=2019-08-01`` with the header
``X-IDENTITY-HEADER: {IDENTITY_HEADER}`` (optional ``client_id`` / ``object_id`` / ``mi_res_id`` for
a user-assigned identity) and gets ``{"access_token","expires_on"(epoch seconds, string),"resource",
"token_type","client_id"}``.
(https://learn.microsoft.com/azure/app-service/overview-managed-identity#rest-endpoint-reference;
azure-identity picks its App Service credential when both variables are set and
``IDENTITY_SERVER_THUMBPRINT`` is not, and MSAL's ``_obtain_token_on_app_service`` makes exactly
that call.) Point the variables at :attr:`KeyVaultDouble.msi_endpoint` / :attr:`msi_header`.
Tokens for ``https://vault.azure.net`` are minted here (and only accepted by this vault); tokens for
any other resource — ``api://AzureADTokenExchange``, the managed identity's federated client
assertion — come from ``token_service(resource, client_id)``, which :func:`sandbox_token_service`
wires to the Microsoft sandbox (it signs them as Entra would), like the platform's endpoint asks Entra.

**Certificates.** A Key Vault certificate's private key is the *secret* of the same name;
:meth:`KeyVaultDouble.set_certificate` stores it the way Key Vault does (PEM key + certificate with
content type ``application/x-pem-file``, or base64 PKCS#12 with ``application/x-pkcs12``)
(https://learn.microsoft.com/azure/key-vault/certificates/about-certificates#composition-of-a-certificate).

**Key Vault data plane (HTTPS, signed by the devstack CA).**
* ``GET /secrets/{name}[/{version}]?api-version=…`` → the SecretBundle
  ``{"value","id","attributes":{"enabled","created","updated","recoveryLevel"[,"exp","nbf"]},"tags"
  [,"contentType","managed","kid"]}`` (https://learn.microsoft.com/rest/api/keyvault/secrets/get-secret/get-secret);
  a disabled version answers 403 ``Forbidden`` / ``SecretDisabled``, like Key Vault;
  ``PUT /secrets/{name}?api-version=…`` with ``{"value",…}`` creates a new version (set_secret).
* ``GET /secrets/{name}/versions?api-version=…[&maxresults=N]`` → ``{"value":[SecretItem…],"nextLink"}``:
  items are ``{"id","attributes","tags"[,"contentType","managed"]}`` without a value, at most
  ``maxresults`` (1-25, default 25) per page, in no particular order (Key Vault promises none), and
  ``nextLink`` is an absolute URL with ``$skiptoken`` while more remain, else ``null``
  (https://learn.microsoft.com/rest/api/keyvault/secrets/get-secret-versions/get-secret-versions).
  A name without versions gives an empty list.
* Errors use Key Vault's body ``{"error":{"code","message"}}``: 404 ``SecretNotFound``, 403
  ``Forbidden`` with ``innererror.code`` ``ForbiddenByRbac`` (what an RBAC vault answers when the
  identity lacks "Key Vault Secrets User"), 401 ``Unauthorized``
  (https://learn.microsoft.com/azure/key-vault/general/rest-error-codes).
* **Challenge authentication.** A request without a valid bearer token gets 401 with
  ``WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/<tenant>",
  resource="https://vault.azure.net"`` — the header Key Vault sends
  (https://learn.microsoft.com/azure/key-vault/general/authentication-requests-and-responses).
  The SDK's ``ChallengeAuthPolicy`` first sends each new vault's request *without* a token (and
  without its body), parses that challenge, asks the credential for ``<resource>/.default`` with the
  challenge's tenant, then resends the original request with ``Authorization: Bearer …``.
  The SDK also checks that the challenge resource's domain is a parent of the vault's host
  (``*.vault.azure.net``) unless the client is built with ``verify_challenge_resource=False``;
  ``127.0.0.1`` can never pass that check, so clients of this double must disable it
  (``shared.secret_store`` does so only for loopback vault URLs).
* The vault accepts only tokens its own identity endpoint issued for ``https://vault.azure.net``
  that have not expired or been revoked, so a missing or wrong token is really refused.

Test controls: :meth:`set_secret`, :meth:`set_certificate`, :meth:`update_version` (enable / disable,
expiry: what ``PATCH /secrets/{name}/{version}`` changes), :meth:`forbid` / :meth:`allow`,
:meth:`delete_secret`, :meth:`reads` (authenticated reads of values per secret), :meth:`listings`
(authenticated version-list pages per secret), :attr:`requests` (every vault request with whether
it carried a valid token — never the token), :attr:`token_requests`, :meth:`revoke_tokens`,
:meth:`issued_tokens` (for leak checks).
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from devstack.certs import CertPaths, ensure_certs

VAULT_RESOURCE = "https://vault.azure.net"
MSI_API_VERSION = "2019-08-01"
DEFAULT_TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
_NAME_RE = re.compile(r"[0-9A-Za-z-]{1,127}")  # Key Vault object names: alphanumerics and dashes
_VERSION_RE = re.compile(r"[0-9a-f]{32}")
MAX_PAGE_SIZE = 25  # Key Vault's maximum (and default) maxresults


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    auth: str  # "none" (no Authorization header), "valid" or "invalid"
    status: int


@dataclass
class _Version:
    version: str
    value: str
    content_type: str | None
    created: int
    tags: dict[str, str]
    enabled: bool = True
    expires: int | None = None  # attributes.exp (epoch seconds)
    not_before: int | None = None  # attributes.nbf
    managed: bool = False  # the secret backs a Key Vault certificate

    def attributes(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {"enabled": self.enabled, "created": self.created, "updated": self.created,
                                 "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90}
        if self.expires is not None:
            attrs["exp"] = self.expires
        if self.not_before is not None:
            attrs["nbf"] = self.not_before
        return attrs


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:  # request lines are noise in test output
        pass


def _kv_error(status: int, code: str, message: str, *, inner: str | None = None,
              headers: dict[str, str] | None = None) -> Response:
    err: dict[str, Any] = {"code": code, "message": message}
    if inner:
        err["innererror"] = {"code": inner}
    return Response(
        json.dumps({"error": err}), status=status, headers=headers or {}, content_type="application/json; charset=utf-8"
    )


class KeyVaultDouble:
    """A Key Vault secrets endpoint (HTTPS) and an App Service MSI endpoint (HTTP), both on loopback."""

    def __init__(
        self,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        msi_port: int = 0,
        tenant_id: str = DEFAULT_TENANT,
        identity_client_id: str | None = None,
        token_lifetime: int = 3600,
        certs: CertPaths | None = None,
        msi_header: str | None = None,
        token_service: Callable[[str, str], dict[str, Any]] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._msi_port = msi_port
        self.tenant_id = tenant_id
        self.identity_client_id = identity_client_id or str(uuid.uuid4())
        self.token_lifetime = token_lifetime
        self._certs = certs
        self._lock = threading.Lock()
        self._secrets: dict[str, list[_Version]] = {}
        self._forbidden: set[str] = set()
        self._tokens: dict[str, tuple[str, float]] = {}  # token -> (resource, expires_at)
        self._reads: Counter[str] = Counter()
        self._listings: Counter[str] = Counter()
        self._requests: list[RecordedRequest] = []
        self._token_requests = 0
        self.msi_header = msi_header or secrets.token_urlsafe(24)
        self.token_service = token_service  # (resource, client_id) -> App Service token body, other resources
        self._vault_server: BaseWSGIServer | None = None
        self._msi_server: BaseWSGIServer | None = None
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> KeyVaultDouble:
        certs = self._certs or ensure_certs()
        self.ca_cert = str(certs.ca_cert)
        self._vault_server = make_server(
            self._host, self._port, self._vault_app, threaded=True,
            ssl_context=(str(certs.server_cert), str(certs.server_key)), request_handler=_QuietHandler,
        )
        self._msi_server = make_server(
            self._host, self._msi_port, self._msi_app, threaded=True, request_handler=_QuietHandler
        )
        for server in (self._vault_server, self._msi_server):
            # A short poll interval keeps stop() fast (shutdown waits for the serve loop to notice).
            t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                 name="keyvault-double", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for server in (self._vault_server, self._msi_server):
            if server is not None:
                server.shutdown()
                server.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()

    def __enter__(self) -> KeyVaultDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._vault_server is not None, "start() first"
        return f"https://{self._host}:{self._vault_server.server_port}"

    @property
    def msi_endpoint(self) -> str:
        assert self._msi_server is not None, "start() first"
        return f"http://{self._host}:{self._msi_server.server_port}/msi/token"

    def identity_env(self) -> dict[str, str]:
        """The environment App Service gives a function app with a managed identity."""
        return {"IDENTITY_ENDPOINT": self.msi_endpoint, "IDENTITY_HEADER": self.msi_header}

    # ------------------------------------------------------------------ controls
    def set_secret(self, name: str, value: str, *, content_type: str | None = None, expires: int | None = None,
                   not_before: int | None = None, managed: bool = False) -> str:
        """Store a new version of ``name``; returns the version id."""
        if not _NAME_RE.fullmatch(name):
            raise ValueError("Key Vault secret names are 1-127 characters of 0-9 a-z A-Z -")
        v = _Version(uuid.uuid4().hex, value, content_type, int(time.time()), {}, expires=expires,
                     not_before=not_before, managed=managed)
        with self._lock:
            self._secrets.setdefault(name.lower(), []).append(v)  # names are case-insensitive
        return v.version

    def set_certificate(self, name: str, key_pem: str, cert_pem: str, *, pkcs12: bool = False) -> str:
        """Store a new version of certificate ``name``'s secret as Key Vault does (PEM bundle, or base64
        PKCS#12): ``managed``, with the certificate's validity as ``nbf`` / ``exp``. Returns the version id."""
        import base64

        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.serialization import pkcs12 as p12

        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        exp, nbf = int(cert.not_valid_after_utc.timestamp()), int(cert.not_valid_before_utc.timestamp())
        if not pkcs12:
            return self.set_secret(name, key_pem + cert_pem, content_type="application/x-pem-file", expires=exp,
                                   not_before=nbf, managed=True)
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
        blob = p12.serialize_key_and_certificates(name.encode(), key, cert, None,  # type: ignore[arg-type]
                                                  serialization.NoEncryption())
        return self.set_secret(name, base64.b64encode(blob).decode(), content_type="application/x-pkcs12",
                               expires=exp, not_before=nbf, managed=True)

    def update_version(self, name: str, version: str, *, enabled: bool | None = None,
                       expires: int | None = None) -> None:
        """Change a version's attributes, as ``PATCH /secrets/{name}/{version}`` (or the portal) does."""
        with self._lock:
            v = next(v for v in self._secrets[name.lower()] if v.version == version)
            if enabled is not None:
                v.enabled = enabled
            if expires is not None:
                v.expires = expires

    def delete_secret(self, name: str) -> None:
        with self._lock:
            self._secrets.pop(name.lower(), None)

    def forbid(self, name: str) -> None:
        """The identity loses access to ``name``: reads and writes get 403 Forbidden."""
        with self._lock:
            self._forbidden.add(name.lower())

    def allow(self, name: str) -> None:
        with self._lock:
            self._forbidden.discard(name.lower())

    def reads(self, name: str) -> int:
        """Authenticated GETs of ``name`` that reached the vault (whatever their outcome)."""
        with self._lock:
            return self._reads[name.lower()]

    def listings(self, name: str) -> int:
        """Authenticated pages of ``GET /secrets/{name}/versions`` served."""
        with self._lock:
            return self._listings[name.lower()]

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def token_requests(self) -> int:
        with self._lock:
            return self._token_requests

    def issued_tokens(self) -> list[str]:
        """Tokens issued and still accepted — only so tests can assert they never reach a log line."""
        with self._lock:
            return list(self._tokens)

    def revoke_tokens(self) -> None:
        """Every token issued so far stops being accepted (the vault answers 401 + challenge)."""
        with self._lock:
            self._tokens.clear()

    # ------------------------------------------------------------------ MSI endpoint
    def _msi_app(self, environ: dict[str, Any], start_response: Any) -> Any:
        req = Request(environ)
        resp = self._msi(req)
        return resp(environ, start_response)

    def _msi(self, req: Request) -> Response:
        def fail(status: int, message: str) -> Response:
            return Response(json.dumps({"statusCode": status, "message": message}), status=status,
                            content_type="application/json")

        if req.method != "GET" or req.path != "/msi/token":
            return fail(404, "Not found")
        if req.headers.get("X-IDENTITY-HEADER") != self.msi_header:
            return fail(401, "The X-IDENTITY-HEADER header is missing or wrong.")
        if req.args.get("api-version") != MSI_API_VERSION:
            return fail(400, f"api-version must be {MSI_API_VERSION}.")
        resource = req.args.get("resource")
        if not resource:
            return fail(400, "The resource parameter is required.")
        client_id = req.args.get("client_id")
        if client_id and client_id.lower() != self.identity_client_id.lower():
            return fail(400, "No user-assigned identity with this client_id is assigned to the app.")
        if resource.rstrip("/") != VAULT_RESOURCE and self.token_service is not None:
            return self._other_resource(resource, fail)
        token = "kvdouble." + secrets.token_urlsafe(32)
        expires_on = int(time.time()) + self.token_lifetime
        with self._lock:
            self._token_requests += 1
            self._tokens[token] = (resource.rstrip("/"), float(expires_on))
        body = {
            "access_token": token,
            "expires_on": str(expires_on),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": self.identity_client_id,
        }
        return Response(json.dumps(body), status=200, content_type="application/json")

    def _other_resource(self, resource: str, fail: Callable[[int, str], Response]) -> Response:
        assert self.token_service is not None
        try:
            body = self.token_service(resource, self.identity_client_id)
        except Exception as exc:  # the identity provider refused: App Service answers 400 with a message
            return fail(400, f"The token for {resource} could not be obtained ({type(exc).__name__}).")
        with self._lock:
            self._token_requests += 1
        return Response(json.dumps(body), status=200, content_type="application/json")

    # ------------------------------------------------------------------ vault
    def _vault_app(self, environ: dict[str, Any], start_response: Any) -> Any:
        req = Request(environ)
        auth = self._auth_state(req)
        if auth != "valid":
            resp = self._challenge(auth)
        else:
            resp = self._vault(req)
        with self._lock:
            self._requests.append(RecordedRequest(req.method, req.path, auth, resp.status_code))
        return resp(environ, start_response)

    def _auth_state(self, req: Request) -> str:
        header = req.headers.get("Authorization")
        if not header:
            return "none"
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "invalid"
        with self._lock:
            issued = self._tokens.get(token.strip())
        if issued is None:
            return "invalid"
        resource, expires_at = issued
        if resource != VAULT_RESOURCE or expires_at <= time.time():
            return "invalid"
        return "valid"

    def _challenge(self, auth: str) -> Response:
        # The challenge Key Vault sends: the Entra authority for the vault's tenant and the vault resource.
        header = f'Bearer authorization="https://login.microsoftonline.com/{self.tenant_id}", resource="{VAULT_RESOURCE}"'
        if auth == "none":
            message = "AKV10000: Request is missing a Bearer or PoP token."
        else:
            message = "AKV10022: Invalid audience, issuer or expired token (not issued by this vault's identity)."
        return _kv_error(401, "Unauthorized", message, headers={"WWW-Authenticate": header})

    def _vault(self, req: Request) -> Response:
        if not req.args.get("api-version"):
            return _kv_error(400, "BadParameter", "The api-version query parameter is required.")
        parts = [unquote(p) for p in req.path.strip("/").split("/")]
        if len(parts) < 2 or len(parts) > 3 or parts[0] != "secrets":
            return _kv_error(404, "NotFound", "The requested operation is not supported by the Key Vault double.")
        name = parts[1]
        if len(parts) == 3 and parts[2] == "versions" and _NAME_RE.fullmatch(name):
            if req.method != "GET":
                return _kv_error(405, "MethodNotAllowed", "The method is not supported by the Key Vault double.")
            return self._list_versions(req, name)
        version = parts[2] if len(parts) == 3 and parts[2] else None
        if not _NAME_RE.fullmatch(name) or (version is not None and not _VERSION_RE.fullmatch(version)):
            return _kv_error(400, "BadParameter", "The secret name or version is not valid.")
        if req.method == "GET":
            return self._get_secret(name, version)
        if req.method == "PUT" and version is None:
            return self._put_secret(req, name)
        return _kv_error(405, "MethodNotAllowed", "The method is not supported by the Key Vault double.")

    def _get_secret(self, name: str, version: str | None) -> Response:
        key = name.lower()
        with self._lock:
            self._reads[key] += 1
        if self._is_forbidden(key):
            return self._forbidden_response("getSecret", name)
        with self._lock:
            versions = list(self._secrets.get(key, ()))
        chosen = versions[-1] if versions and version is None else next(
            (v for v in versions if v.version == version), None
        )
        if chosen is None:
            what = name if version is None else f"{name}/{version}"
            return _kv_error(
                404, "SecretNotFound",
                f"A secret with (name/id) {what} was not found in this key vault. If you recently deleted this "
                "secret you may be able to recover it using the correct recovery command.",
            )
        if not chosen.enabled:
            return _kv_error(403, "Forbidden", "Operation get is not allowed on a disabled secret.",
                             inner="SecretDisabled")
        return self._bundle(name, chosen)

    def _put_secret(self, req: Request, name: str) -> Response:
        key = name.lower()
        if self._is_forbidden(key):
            return self._forbidden_response("setSecret", name)
        try:
            body = json.loads(req.get_data() or b"{}")
            value = body["value"]
            if not isinstance(value, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return _kv_error(400, "BadParameter", "The request body must be JSON with a string 'value'.")
        self.set_secret(name, value, content_type=body.get("contentType"))
        with self._lock:
            latest = self._secrets[key][-1]
            latest.tags = dict(body.get("tags") or {})
        return self._bundle(name, latest)

    def _list_versions(self, req: Request, name: str) -> Response:
        """One page of SecretItems (no values); ``nextLink`` carries ``$skiptoken`` while more remain."""
        key = name.lower()
        if self._is_forbidden(key):
            return self._forbidden_response("readMetadata", name)
        try:
            size = int(req.args.get("maxresults") or MAX_PAGE_SIZE)
            start = int(req.args.get("$skiptoken") or 0)
        except ValueError:
            return _kv_error(400, "BadParameter", "maxresults and $skiptoken must be numbers.")
        if not 1 <= size <= MAX_PAGE_SIZE or start < 0:
            return _kv_error(400, "BadParameter", f"maxresults must be between 1 and {MAX_PAGE_SIZE}.")
        with self._lock:
            self._listings[key] += 1
            # Key Vault promises no order; by version id is as good as random, so callers must sort.
            versions = sorted(self._secrets.get(key, ()), key=lambda v: v.version)
        page = versions[start:start + size]
        next_link = None
        if start + size < len(versions):
            next_link = (f"{self.url}/secrets/{name}/versions?api-version={req.args['api-version']}"
                         f"&$skiptoken={start + size}&maxresults={size}")
        return Response(json.dumps({"value": [self._item(name, v) for v in page], "nextLink": next_link}),
                        status=200, content_type="application/json; charset=utf-8")

    def _is_forbidden(self, key: str) -> bool:
        with self._lock:
            return key in self._forbidden

    def _forbidden_response(self, action: str, name: str) -> Response:
        return _kv_error(
            403, "Forbidden",
            "Caller is not authorized to perform action on resource.\r\n"
            f"Action: 'Microsoft.KeyVault/vaults/secrets/{action}/action'\r\n"
            f"Resource: 'secrets/{name}'\r\nDecisionReason: 'DeniedWithNoValidRBAC'",
            inner="ForbiddenByRbac",
        )

    def _item(self, name: str, v: _Version) -> dict[str, Any]:
        item: dict[str, Any] = {"id": f"{self.url}/secrets/{name}/{v.version}", "attributes": v.attributes(),
                                "tags": v.tags}
        if v.content_type:
            item["contentType"] = v.content_type
        if v.managed:
            item["managed"] = True
        return item

    def _bundle(self, name: str, v: _Version) -> Response:
        body = {"value": v.value, **self._item(name, v)}
        if v.managed:
            body["kid"] = f"{self.url}/keys/{name}/{v.version}"
        return Response(json.dumps(body), status=200, content_type="application/json; charset=utf-8")


def sandbox_token_service(control: Any) -> Callable[[str, str], dict[str, Any]]:
    """``token_service`` backed by the Microsoft sandbox (a ``SandboxControl``): the identity must be
    registered there (``control.add_managed_identity(client_id)``); it signs the token as Entra does."""

    def issue(resource: str, client_id: str) -> dict[str, Any]:
        return dict(control.managed_identity_token(client_id, resource))

    return issue


def main() -> None:  # pragma: no cover - manual use: python -m devstack.keyvault
    import os

    header = os.environ.get("IDENTITY_HEADER")  # reuse the caller's, else print a throw-away one
    service = None
    if os.environ.get("SANDBOX_URL"):  # managed identity as a federated credential against the sandbox
        from devstack.sandbox import SandboxControl

        control = SandboxControl(os.environ["SANDBOX_URL"], verify=os.environ.get("MS_CA_BUNDLE") or True)
        service = sandbox_token_service(control)
    double = KeyVaultDouble(port=int(os.environ.get("KEYVAULT_DOUBLE_PORT", "8443")), msi_header=header,
                            identity_client_id=os.environ.get("AZURE_CLIENT_ID"), token_service=service).start()
    if service is not None:
        info = control.add_managed_identity(double.identity_client_id)
        print(f"# federated credential: issuer={info['issuer']} subject={info['principal_id']}")
    print(f"export KEY_VAULT_URL={double.url}")
    print(f"export AZURE_CLIENT_ID={double.identity_client_id}")
    print(f"export IDENTITY_ENDPOINT={double.msi_endpoint}")
    if not header:
        print(f"export IDENTITY_HEADER={double.msi_header}  # throw-away, local double only")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        double.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
