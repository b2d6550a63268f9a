"""The chaos run, short: about a minute of traffic with every fault injected once, so that a
regression of any promise (no duplicate send, no lost refresh token, no unmapped error, no leaked
secret, every webhook delivered) fails the build. The full run is ``make chaos`` (a benchmark)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(600)


def test_short_chaos_run_keeps_every_promise() -> None:
    from bench.chaos import Options, run, table

    result = run(Options(mailboxes=16, minutes=1.0, clients=4, hosts=2, write_results=False))
    report = table(result)
    print(report)
    from tests.conftest import ARTIFACTS

    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "chaos-report.md").write_text(report)  # kept for a failed build (audit.json: bench/.out/chaos)
    assert result.ops > 200, report  # the traffic really ran
    assert len(result.faults) >= 11, report  # every fault was injected
    assert result.audit.outcomes["2xx"] > 0 and result.audit.sends.get("delivered", 0) > 0, report
    assert result.ok, report
