"""The problem catalogue: every code the connector raises has an entry, and docs/problems.md is generated from it."""

from __future__ import annotations

import re
from pathlib import Path

from shared import ms_errors
from shared.errors import AuthenticationError, ConnectorError, to_problem
from shared.problems import PROBLEMS, markdown, page, problem_type

ROOT = Path(__file__).resolve().parents[2]
# `code = "x"` (an exception class's code) and `code="x"` (a raise with its own code), anywhere in the package.
_CODE = re.compile(r"""\bcode(?:\s*:\s*str)?\s*=\s*["']([a-z][a-z0-9_]*)["']""")


def _codes_in_source() -> set[str]:
    codes: set[str] = set()
    for path in (ROOT / "shared").rglob("*.py"):
        codes.update(_CODE.findall(path.read_text(encoding="utf-8")))
    codes.update(info.code for info in ms_errors.AADSTS.values())
    codes.update(info.code for info in ms_errors.GRAPH.values())
    return codes


def test_every_code_the_connector_raises_is_described() -> None:
    codes = _codes_in_source()
    assert len(codes) > 40  # the scan finds the package's codes, not nothing
    missing = sorted(codes - PROBLEMS.keys())
    assert not missing, f"add these codes to shared/problems.py: {missing}"


def test_a_problem_type_points_to_its_anchor() -> None:
    body = to_problem(AuthenticationError("no token")).body
    assert body["type"] == "/api/problems#unauthorized" == problem_type("unauthorized")
    assert 'id="unauthorized"' in page()
    assert to_problem(RuntimeError("boom")).body["type"] == problem_type(ConnectorError.code)


def test_docs_problems_md_is_the_catalogue() -> None:
    # Regenerate with: python -c "from shared.problems import markdown; print(markdown(), end='')" > docs/problems.md
    assert (ROOT / "docs" / "problems.md").read_text(encoding="utf-8") == markdown()
