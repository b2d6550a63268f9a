"""NCRONTAB (six fields: second minute hour day month day-of-week), as Azure Functions timers use.

https://learn.microsoft.com/azure/azure-functions/functions-bindings-timer#ncrontab-expressions
"""

from __future__ import annotations

import datetime as dt

_RANGES = ((0, 59), (0, 59), (0, 23), (1, 31), (1, 12), (0, 6))
_NAMES = {
    4: {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())},
    5: {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())},
}


class CronError(ValueError):
    pass


def _field(text: str, idx: int) -> frozenset[int]:
    lo, hi = _RANGES[idx]
    out: set[int] = set()
    for part in text.lower().split(","):
        step = 1
        if "/" in part:
            part, s = part.split("/", 1)
            step = int(s)
            if step < 1:
                raise CronError(f"bad step in {text!r}")
        if part == "*":
            a, b = lo, hi
        elif "-" in part:
            x, y = part.split("-", 1)
            a, b = _value(x, idx), _value(y, idx)
        else:
            a = _value(part, idx)
            b = hi if step > 1 else a
        if not (lo <= a <= hi and lo <= b <= hi and a <= b):
            raise CronError(f"{text!r} is out of range {lo}-{hi}")
        out.update(range(a, b + 1, step))
    return frozenset(out)


def _value(s: str, idx: int) -> int:
    names = _NAMES.get(idx, {})
    if s in names:
        return names[s]
    try:
        return int(s)
    except ValueError:
        raise CronError(f"{s!r} is not a number") from None


class NCrontab:
    def __init__(self, expr: str) -> None:
        parts = expr.split()
        if len(parts) != 6:
            raise CronError(f"NCRONTAB needs six fields (second minute hour day month weekday): {expr!r}")
        try:
            self.fields = [_field(p, i) for i, p in enumerate(parts)]
        except ValueError as e:
            raise CronError(f"invalid NCRONTAB {expr!r}: {e}") from None
        self.expr = expr

    def next_after(self, t: dt.datetime) -> dt.datetime:
        """The first matching instant strictly after ``t`` (second resolution)."""
        sec, mins, hours, days, months, wdays = self.fields
        c = t.replace(microsecond=0) + dt.timedelta(seconds=1)
        for _ in range(366 * 24 * 60 * 2):  # bounded search: about a year of minutes
            if c.month not in months:
                c = (c.replace(day=1, hour=0, minute=0, second=0) + dt.timedelta(days=32)).replace(day=1)
                continue
            if c.day not in days or (c.isoweekday() % 7) not in wdays:
                c = c.replace(hour=0, minute=0, second=0) + dt.timedelta(days=1)
                continue
            if c.hour not in hours:
                c = c.replace(minute=0, second=0) + dt.timedelta(hours=1)
                continue
            if c.minute not in mins:
                c = c.replace(second=0) + dt.timedelta(minutes=1)
                continue
            if c.second not in sec:
                c += dt.timedelta(seconds=1)
                continue
            return c
        raise CronError(f"{self.expr!r} never fires")
