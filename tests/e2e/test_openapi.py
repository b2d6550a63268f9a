"""The OpenAPI document matches the code: every route described, real responses validate, fuzzing finds no 5xx."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from tests.conftest import ARTIFACTS, ROOT, Host, connect


@pytest.fixture(scope="module")
def doc(host: Host) -> dict[str, Any]:
    r = host.http.get(host.url + "/api/openapi.json", timeout=30)
    assert r.status_code == 200
    return dict(r.json())


def _registered_routes(env: dict[str, str]) -> set[tuple[str, str]]:
    code = ("import json, function_app\n"
            "out = []\n"
            "for f in function_app.app.get_functions():\n"
            "    d = f.get_trigger().get_dict_repr()\n"
            "    if d['type'] == 'httpTrigger':\n"
            "        for m in d['methods']:\n"
            "            out.append(['/api/' + d['route'], str(getattr(m, 'value', m)).lower()])\n"
            "print(json.dumps(out))\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                       check=True)
    return {(path, method) for path, method in json.loads(p.stdout)}


def _described(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method) for path, ops in doc["paths"].items() for method in ops}


def test_every_registered_route_is_described(host: Host, doc: dict[str, Any]) -> None:
    registered = _registered_routes(host.env)
    described = _described(doc)
    assert registered - described == set(), "routes without an OpenAPI description"
    assert described - registered == set(), "described routes that do not exist"


def test_document_is_openapi_31_with_security_and_examples(doc: dict[str, Any]) -> None:
    assert doc["openapi"].startswith("3.1")
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    validator = Draft202012Validator(doc["components"]["schemas"]["Account"])
    for example in doc["components"]["schemas"]["Account"]["examples"]:  # JSON Schema 2020-12: a list
        validator.validate(example)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op.get("operationId") and op.get("responses"), (path, method)


class Checker:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        from referencing.jsonschema import DRAFT202012

        resource = Resource.from_contents(doc, default_specification=DRAFT202012)
        self.registry = Registry().with_resource("urn:openapi", resource)
        self.templates = [(re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", p) + "$"), p) for p in doc["paths"]]
        self.checked: set[tuple[str, str, int]] = set()

    def check(self, method: str, url_path: str, resp: Any) -> None:
        template = next(p for rx, p in self.templates if rx.match(url_path))
        op = self.doc["paths"][template][method.lower()]
        spec = op["responses"].get(str(resp.status_code))
        assert spec is not None, f"{method} {template} answered {resp.status_code}, which is not described"
        if "$ref" in spec:
            spec = self.doc["components"]["responses"][spec["$ref"].rsplit("/", 1)[-1]]
        ctype = resp.headers.get("Content-Type", "").split(";")[0]
        content = spec.get("content")
        if not content:
            return
        media = content.get(ctype) or content.get("*/*")
        assert media is not None, f"{method} {template} {resp.status_code}: {ctype} is not described"
        if ctype.endswith("json"):
            schema = {"$ref": "urn:openapi#" + _pointer(template, method, resp.status_code, ctype, op, spec)}
            Draft202012Validator(schema, registry=self.registry).validate(resp.json())
        self.checked.add((method, template, resp.status_code))


def _pointer(template: str, method: str, status: int, ctype: str, op: dict[str, Any], spec: dict[str, Any]) -> str:
    ref = op["responses"][str(status)].get("$ref")
    if ref:
        return ref[1:] + "/content/" + ctype.replace("/", "~1") + "/schema"
    return ("/paths/" + template.replace("~", "~0").replace("/", "~1") + f"/{method.lower()}/responses/{status}"
            "/content/" + ctype.replace("/", "~1") + "/schema")


def test_real_responses_validate(host: Host, doc: dict[str, Any], browser_session: Any, control: Any) -> None:
    c = Checker(doc)
    owner = "owner-openapi"

    def call(method: str, path: str, sub: str | None = owner, **kw: Any) -> Any:
        r = host.api(method, path, sub=sub, **kw)
        c.check(method, path.split("?")[0], r)
        return r

    call("GET", "/api/health", sub=None)
    call("GET", "/api/openapi.json", sub=None)
    call("GET", "/api/accounts", sub=None)
    call("GET", "/api/connect/microsoft", params={"returnUrl": "https://evil.example.com/"})
    call("GET", "/api/connect/microsoft", params={"returnUrl": "https://app.example.com/connected"})
    r = host.http.get(host.url + "/api/connect/microsoft/callback", params={"state": "bad"}, timeout=30)
    c.check("GET", "/api/connect/microsoft/callback", r)
    acc = connect(host, browser_session, sub=owner, login_hint="adele@contoso.onmicrosoft.com")
    c.check("POST", "/api/connect/microsoft/callback", acc["response"])
    c.check("GET", "/api/connect/microsoft/keys", host.http.get(host.url + "/api/connect/microsoft/keys", timeout=30))
    aid = acc["result"]["accountId"]
    call("GET", "/api/accounts")
    call("GET", f"/api/accounts/{aid}")
    call("GET", "/api/accounts/acc_nothere")
    call("POST", f"/api/accounts/{aid}/refresh")
    call("POST", f"/api/accounts/{aid}/send", json={"to": ["a@example.com"], "subject": "openapi"})
    call("POST", f"/api/accounts/{aid}/send", json={"to": ["nope"]})
    [mid] = control.seed_messages("adele@contoso.onmicrosoft.com", [{
        "subject": "schema", "attachments": [{"name": "a.txt", "contentType": "text/plain", "contentBytes": "aGk="}]}])
    call("GET", f"/api/accounts/{aid}/messages", params={"top": 2})
    call("GET", f"/api/accounts/{aid}/messages", params={"top": 0})
    detail = call("GET", f"/api/accounts/{aid}/messages/{mid}").json()
    call("GET", f"/api/accounts/{aid}/messages/{mid}/attachments/{detail['attachments'][0]['id']}")
    call("GET", f"/api/accounts/{aid}/folders")
    call("GET", f"/api/accounts/{aid}/diagnose")
    call("DELETE", f"/api/accounts/{aid}")
    assert len(c.checked) >= 18


def test_schemathesis_finds_no_5xx(host: Host, tmp_path: Any, browser_session: Any) -> None:
    """Bounded property-based fuzzing of every operation against the running host, with a real account."""
    token = host.token("owner-fuzz")
    acc = connect(host, browser_session, sub="owner-fuzz", login_hint="megan@contoso.onmicrosoft.com")
    config = tmp_path / "schemathesis.toml"
    account_id = acc["result"]["accountId"]
    config.write_text(f'[parameters]\n"path.accountId" = "{account_id}"\n')
    report = tmp_path / "junit.xml"
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", host.url + "/api/openapi.json",
           "--url", host.url, "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance",
           "--max-examples", os.environ.get("FUZZ_MAX_EXAMPLES", "25"), "--header", f"Authorization: Bearer {token}",
           "--phases", "examples,coverage,fuzzing", "--report", "junit", "--report-junit-path", str(report),
           "--request-timeout", "30", "--suppress-health-check", "all", "--no-color", "--seed", "1"]
    # cwd: schemathesis keeps a crash cache in .schemathesis/ of its working directory.
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    (ARTIFACTS / "schemathesis.txt").write_text(out)
    m = re.search(r"(\d+) generated, (\d+) passed", out)
    failures = re.findall(r"(?m)^_+ (.+?) _+$|^\s*\d+\. .*$|^\s*\[\d{3}\].*$|Received.*$", out)
    assert p.returncode == 0, f"see test-artifacts/schemathesis.txt; {failures[:20]}"
    assert m is not None, out[-2000:]
    print(f"schemathesis: {m.group(1)} generated requests, {m.group(2)} passed, no 5xx")
    assert int(m.group(1)) >= 100


def test_document_validates_against_the_oas_31_meta_schema(doc: dict[str, Any]) -> None:
    """The served document against the OpenAPI 3.1 schema (openapi-spec-validator), with no deprecated
    ``example`` left anywhere and ``info.version`` the package's version."""
    import json
    import tomllib

    from openapi_spec_validator import validate

    from shared import __version__
    from tests.conftest import ROOT

    validate(doc)
    assert '"example":' not in json.dumps(doc)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert doc["info"]["version"] == __version__ == project["version"]
