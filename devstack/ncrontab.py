"""NCRONTAB (six fields: second minute hour day month day-of-week), as Azure Functions timers use.

https://learn.microsoft.com/azure/azure-functions/functions-bindings-timer#ncrontab-expressions
Parsing and matching are croniter's (a dev-only dependency: ``devstack/`` is never deployed).
"""

from __future__ import annotations

import datetime as dt

from croniter import CroniterError, croniter


class CronError(ValueError):
    pass


class NCrontab:
    """A timer schedule; ``source`` (e.g. ``%REFRESH_SCHEDULE%``) names where it came from in errors."""

    def __init__(self, expr: str, *, source: str | None = None) -> None:
        what = f"{source} ({expr!r})" if source and source != expr else repr(expr)
        # croniter also takes five or seven fields; the Functions host takes exactly six.
        if len(expr.split()) != 6:
            raise CronError(f"{what} is not NCRONTAB: it needs six fields (second minute hour day month weekday)")
        try:
            # day_or=False: NCRONTAB fires when day *and* weekday match (Vixie cron ORs them).
            self._cron = croniter(expr, second_at_beginning=True, day_or=False)
            self.next_after(dt.datetime.now(dt.UTC))  # e.g. "0 0 0 30 2 *" parses but never fires
        except (CroniterError, ValueError) as e:
            raise CronError(f"{what} is not a valid NCRONTAB expression: {e}") from None
        self.expr = expr

    def next_after(self, t: dt.datetime) -> dt.datetime:
        """The first matching instant strictly after ``t``, in UTC (the Functions default time zone)."""
        return self._cron.get_next(dt.datetime, start_time=t.astimezone(dt.UTC), update_current=False)
