"""Every KQL query in infra/ (the alert rules and the operations workbook) parses and type-checks with
Microsoft's Kusto language service against the Application Insights schema (tests/infra/kql_check.js), so a
broken query fails CI rather than an alert rule deployment or an empty workbook chart."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "infra" / "modules" / "operations.bicep"
WORKBOOK = ROOT / "infra" / "modules" / "operations-workbook.json"
# Values for the Bicep interpolations in the alert queries (a list of codes, numeric thresholds).
SUBSTITUTE = {"codeList": '"invalid_client", "invalid_client_assertion"'}


def alert_queries() -> list[tuple[str, str]]:
    text = OPS.read_text()
    found = []
    for m in re.finditer(r"^\s*key: '([^']+)'.*?^\s*query: '((?:[^'\\]|\\.)*)'", text, re.M | re.S):
        query = m.group(2).replace("\\n", "\n").replace("\\'", "'")
        query = re.sub(r"\$\{(\w+)\}", lambda v: SUBSTITUTE.get(v.group(1), "1"), query)
        found.append((f"alert {m.group(1)}", query))
    return found


def workbook_queries() -> list[tuple[str, str]]:
    doc = json.loads(WORKBOOK.read_text())
    found = []

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "query" and isinstance(v, str):
                    found.append((f"workbook {path}", v))
                walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(doc, "")
    return found


def test_every_kql_query_in_infra_is_valid() -> None:
    queries = alert_queries() + workbook_queries()
    assert len(alert_queries()) >= 5 and len(workbook_queries()) >= 8  # the extraction finds them all
    node = shutil.which("node")
    assert node, "node is needed (the same one that runs Azurite)"
    proc = subprocess.run([node, str(ROOT / "tests" / "infra" / "kql_check.js")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, input=json.dumps([{"where": w, "query": q} for w, q in queries]))
    assert proc.returncode == 0, proc.stderr
    errors = {r["where"]: r["errors"] for r in json.loads(proc.stdout) if r["errors"]}
    assert errors == {}


def test_the_checker_catches_a_broken_query() -> None:
    node = shutil.which("node")
    assert node
    bad = [{"where": "typo", "query": "customMetric | take 1"},
           {"where": "aggregate", "query": "customMetrics | summarize v = iff(name == 'x', sum(valueSum), 0.0) by name"}]
    proc = subprocess.run([node, str(ROOT / "tests" / "infra" / "kql_check.js")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, input=json.dumps(bad))
    results = json.loads(proc.stdout)
    assert all(r["errors"] for r in results), results
