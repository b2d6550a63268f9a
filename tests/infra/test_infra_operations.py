"""infra/modules/operations.bicep (alert rules, action group, workbook), parsed offline with pycep, checked
against what the app really exports (shared/telemetry.py) and what docs/operations.md explains."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

pycep = pytest.importorskip("pycep", reason="pycep-parser is needed to parse Bicep offline")

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ALERTS = {"invalid-client", "refresh-failure-rate", "reauth-spike", "webhooks-abandoned", "poison-messages"}
CHARTS = {"refresh-outcomes", "accounts-by-status", "send-latency", "throttling", "top-errors"}


@pytest.fixture(scope="module")
def ops() -> dict[str, Any]:
    return pycep.BicepParser().parse(file_path=INFRA / "modules" / "operations.bicep")


@pytest.fixture(scope="module")
def main() -> dict[str, Any]:
    return pycep.BicepParser().parse(file_path=INFRA / "main.bicep")


def _alerts(ops: dict[str, Any]) -> list[dict[str, Any]]:
    value = ops["variables"]["alerts"]["value"]
    return [{k: v for k, v in item.items()} for item in value]


def _text(expr: Any) -> str:
    return expr if isinstance(expr, str) else json.dumps(expr)


def exported_instruments() -> set[str]:
    """The instrument names shared/telemetry.py creates."""
    src = (ROOT / "shared" / "telemetry.py").read_text()
    return set(re.findall(r'create_(?:counter|gauge|histogram|observable_gauge)\(\s*"(connector\.[a-z_.]+)"', src))


def exported_names() -> set[str]:
    """Instrument names plus the ``connector.*`` span attributes the invocation spans carry."""
    src = (ROOT / "shared" / "telemetry.py").read_text() + (ROOT / "shared" / "blueprints" / "_http.py").read_text()
    attributes = {"connector.error.code", "connector.correlation_id", "connector.account_id"}
    assert all(f'"{a}"' in src for a in attributes)
    return exported_instruments() | attributes


def test_main_wires_the_operations_module(main: dict[str, Any]) -> None:
    mod = main["modules"]["operations"]
    assert mod["detail"]["path"] == "modules/operations.bicep"
    params = mod["config"]["params"]
    assert "alertEmail" in params and "applicationInsightsName" in params
    assert "alertEmail" in main["parameters"]
    mapping = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    assert mapping["alertEmail"]["value"] == "${OPERATIONS_ALERT_EMAIL=}"


def test_every_alert_is_a_scheduled_query_on_application_insights(ops: dict[str, Any]) -> None:
    alerts = _alerts(ops)
    assert {a["key"] for a in alerts} == ALERTS
    rules = ops["resources"]["rules"]
    assert rules["type"] == "Microsoft.Insights/scheduledQueryRules"
    body = json.dumps(rules["config"])
    assert "appInsights" in body and "actionGroup" in body and "alertEmail" in body
    group = ops["resources"]["actionGroup"]
    assert group["type"] == "Microsoft.Insights/actionGroups" and "alertEmail" in json.dumps(group["config"]["condition"])


def test_alert_queries_use_what_the_app_exports(ops: dict[str, Any]) -> None:
    names = exported_names()
    assert {"connector.refresh", "connector.accounts", "connector.send", "connector.graph.throttled",
            "connector.webhook.delivery", "connector.notification.lag"} <= names
    for alert in _alerts(ops):
        query = _text(alert["query"])
        used = set(re.findall(r'"(connector\.[a-z_.]+)"', query))
        assert used <= names, (alert["key"], used - names)
        assert _text(alert["measure"]) in query, alert["key"]


def test_invalid_client_alert_knows_every_rejected_credential_code(ops: dict[str, Any]) -> None:
    from shared.ms_errors import CLIENT_CREDENTIAL_REJECTED

    codes = set(ops["variables"]["credentialRejectedCodes"]["value"])
    assert codes == set(CLIENT_CREDENTIAL_REJECTED) | {"invalid_client", "unknown_client"}


def test_poison_alert_matches_host_json_max_dequeue_count(ops: dict[str, Any]) -> None:
    host = json.loads((ROOT / "host.json").read_text())
    [poison] = [a for a in _alerts(ops) if a["key"] == "poison-messages"]
    count = host["extensions"]["queues"]["maxDequeueCount"]
    assert f'delivery_attempt"]) >= {count}' in _text(poison["query"])


def test_workbook_json_has_the_operator_charts(ops: dict[str, Any]) -> None:
    wb = json.loads((INFRA / "modules" / "operations-workbook.json").read_text())
    assert wb["version"] == "Notebook/1.0"
    queries = {i["name"]: i["content"]["query"] for i in wb["items"] if i["type"] == 3}
    assert CHARTS <= set(queries)
    names = exported_names()
    for name, query in queries.items():
        assert set(re.findall(r'"(connector\.[a-z_.]+)"', query)) <= names, name
    assert "send_mail" in queries["send-latency"] and "hints" in queries["top-errors"]
    assert not re.search(r"[\w.+-]+@[\w-]+\.[\w.]+", json.dumps(wb)), "an address in the workbook"
    assert "loadTextContent('operations-workbook.json')" in (INFRA / "modules" / "operations.bicep").read_text()


def test_host_and_worker_run_opentelemetry() -> None:
    host = json.loads((ROOT / "host.json").read_text())
    assert host["telemetryMode"] == "OpenTelemetry"
    from tests.infra.test_infra_bicep import app_settings, load_templates

    settings = app_settings(load_templates())
    assert settings.get("PYTHON_ENABLE_OPENTELEMETRY") == "true"
    assert "PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY" not in settings


def test_operations_doc_explains_every_alert(ops: dict[str, Any]) -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    for alert in _alerts(ops):
        anchor = _text(alert["description"]).rsplit("docs/operations.md#", 1)[1].rstrip("'\"")
        heading = anchor.replace("-", " ")
        assert re.search(rf"^### {re.escape(heading)}$", doc, re.M | re.I), f"docs/operations.md lacks '### {heading}'"
    for name in exported_instruments():
        assert f"`{name}`" in doc, name


def test_queries_over_invocations_read_requests_too_and_rules_skip_validation(ops: dict[str, Any]) -> None:
    """Queue invocations are CONSUMER spans, which Application Insights stores in `requests` (HTTP and timer
    ones are INTERNAL, in `dependencies`): a query over invocations that reads `dependencies` alone misses
    them. And alert rules skip query validation, which fails on a workspace that has no `requests` yet."""
    wb = json.loads((INFRA / "modules" / "operations-workbook.json").read_text())
    queries = {a["key"]: _text(a["query"]) for a in _alerts(ops)}
    queries.update({i["name"]: i["content"]["query"] for i in wb["items"] if i["type"] == 3})
    for name, query in queries.items():
        spans = "customDimensions[\"connector.error.code\"]" in query or "delivery_attempt" in query
        if spans:
            assert "union requests, dependencies" in query, name
    assert "skipQueryValidation: true" in (INFRA / "modules" / "operations.bicep").read_text()
    assert json.loads(json.dumps(ops["resources"]["rules"]["config"]))  # parsed by pycep, not only grepped
    assert "skipQueryValidation" in json.dumps(ops["resources"]["rules"]["config"])


def test_the_workbook_falls_back_to_the_application_insights_component(ops: dict[str, Any]) -> None:
    """The template file leaves fallbackResourceIds empty; the Bicep fills in the component's id."""
    wb = json.loads((INFRA / "modules" / "operations-workbook.json").read_text())
    assert wb["fallbackResourceIds"] == []
    config = json.dumps(ops["resources"]["workbook"]["config"])
    assert "fallbackResourceIds" in config and "appInsights.id" in config and "sourceId" in config
