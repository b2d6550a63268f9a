"""The scale model (`python -m bench scale`), quick: what each operation costs is measured, not assumed, and the
model built on it names a first limit and a cost at every size. Figures are not asserted against time: only what
must hold whatever the machine (which calls an operation makes, which partition scheme holds)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(600)


def test_quick_scale_model_measures_each_operation_and_models_every_size() -> None:
    from bench._stack import Stack
    from bench.scale import SIZES, Profile, _timer_speed, measure_all, model, report

    stack = Stack()
    try:
        costs = measure_all(stack, 3)
        rows_per_s = _timer_speed(stack, 100)
    finally:
        stack.stop()
    refresh = costs["refresh"]
    assert (refresh.entra, refresh.graph) == (1, 0)  # one token call, no Graph
    assert costs["event (rich): job"].graph == 0  # the event comes with its data
    assert costs["event (plain): job"].graph == 1  # one read of the message summary
    assert costs["event (plain): intake"].table == 0  # a clientState seen before is cached
    assert costs["send, small"].graph == 1 and costs["send, 3 MB attachment (upload session)"].graph >= 3
    assert all(c.cpu_ms > 0 for name, c in costs.items() if c.executions)
    rows = model(costs, Profile(), rows_per_s)
    assert [r["n"] for r in rows] == list(SIZES)
    # the due-time index's busiest partition takes about a sixteenth of the timer's writes, not all of them
    assert rows[-1]["partition_index"] < rows[-1]["partition_unsharded"] / 10
    assert all(r["cost"]["per_mailbox"] > 0 for r in rows)
    text = report(costs, Profile(), rows_per_s, True, 1.0)
    assert "| 1,000,000 |" in text and "first limit" in text and "Nylas" in text


def test_shards_spread_the_index_rows_evenly() -> None:
    from bench.scale import shard_peak

    assert 1 / 16 < shard_peak(200_000, 16) < 1.1 / 16
