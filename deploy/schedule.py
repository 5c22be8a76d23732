"""Warm hours: PERCEPIANO_WARM_SCHEDULE, parsed and evaluated (plain Python and zoneinfo, no Modal).

Syntax: one or more rules separated by ``;``, each ``DAYS HH:MM-HH:MM ZONE min=N``:

    mon-fri 08:00-20:00 Europe/Berlin min=1; sat 10:00-14:00 Europe/Berlin min=1

* DAYS: ``mon``..``sun``, ranges (``mon-fri``, ``fri-mon`` wraps) and lists (``mon,wed,fri``), or ``daily``.
* HH:MM-HH:MM: local wall-clock time in ZONE, on quarter hours (the scheduler ticks every 15 min, see TICK_CRON);
  ``24:00`` ends at midnight; an end before the start runs past midnight into the next day (``22:00-06:00``).
* ZONE: an IANA time zone (``Europe/Berlin``, ``America/New_York``, ``UTC``); daylight saving is the zone's.
* min=N: containers kept warm inside the window (1..MAX_WARM). Outside every window: 0 (scale to zero).
  Overlapping windows keep the larger N.

Each rule's day gives one window: from the start's local time on that day to the end's. A local time that does
not exist (the spring-forward gap, e.g. 02:30 on Europe/Berlin's last Sunday of March) is read with the offset
before the change (PEP 495, fold=0), so it falls one hour later on the clock (03:30); an ambiguous one (the
repeated hour on the last Sunday of October) is its first occurrence. So a window 08:00-20:00 is 12 hours on
most days and covers the same wall-clock hours on the change days, and no window opens twice.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

ENV = "PERCEPIANO_WARM_SCHEDULE"
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # datetime.weekday() order
TICK_MINUTES = 15
TICK_CRON = f"*/{TICK_MINUTES} * * * *"  # in UTC: every quarter hour (every zone's offset is whole quarter hours)
MAX_WARM = 20  # a larger number is more likely a typo than a plan (each warm container is billed every second)
_RULE = re.compile(r"^(?P<days>\S+)\s+(?P<start>\d{1,2}:\d{2})-(?P<end>\d{1,2}:\d{2})\s+(?P<zone>\S+)"
                   r"\s+min=(?P<n>\S+)$")


class ScheduleError(ValueError):
    """A schedule that cannot be used; the message is one line naming the variable and the rule."""


@dataclass(frozen=True)
class Rule:
    """One window rule: on `days` (0 = Monday), from `start` to `end` minutes after local midnight, keep `warm`."""

    days: frozenset[int]
    start: int  # minutes after local midnight
    end: int  # minutes after local midnight (1440 = 24:00); <= start: ends the next day
    zone: ZoneInfo
    warm: int
    text: str

    def windows(self, first: date, last: date) -> Iterator[tuple[datetime, datetime]]:
        """The (start, end) instants in UTC of this rule's windows whose local day is in first..last."""
        day = first
        while day <= last:
            if day.weekday() in self.days:
                midnight = datetime.combine(day, time())
                end = self.end if self.end > self.start else self.end + 1440
                yield (_instant(midnight + timedelta(minutes=self.start), self.zone),
                       _instant(midnight + timedelta(minutes=end), self.zone))
            day += timedelta(days=1)


def _instant(wall: datetime, zone: ZoneInfo) -> datetime:
    """A naive local wall-clock time in `zone` as a UTC instant (fold=0: see the module docstring)."""
    return wall.replace(tzinfo=zone).astimezone(UTC)


@dataclass(frozen=True)
class Schedule:
    """The rules of PERCEPIANO_WARM_SCHEDULE (none: no warm hours, the deployment scales to zero as before)."""

    rules: tuple[Rule, ...] = ()

    def warm_at(self, instant: datetime) -> int:
        """Containers to keep warm at `instant` (an aware datetime): the largest N of the windows holding it."""
        instant = _aware(instant)
        best = 0
        for rule in self.rules:
            local = instant.astimezone(rule.zone).date()
            for start, end in rule.windows(local - timedelta(days=2), local + timedelta(days=1)):
                if start <= instant < end:
                    best = max(best, rule.warm)
        return best

    def changes(self, start: datetime, end: datetime) -> list[tuple[datetime, int]]:
        """Every instant in [start, end) at which the warm count changes, with the new count, in order."""
        start, end = _aware(start), _aware(end)
        edges: set[datetime] = set()
        for rule in self.rules:
            first = start.astimezone(rule.zone).date() - timedelta(days=2)
            for w in rule.windows(first, end.astimezone(rule.zone).date() + timedelta(days=1)):
                edges.update(t for t in w if start <= t < end)
        out, current = [], self.warm_at(start - timedelta(microseconds=1))
        for t in sorted(edges):
            n = self.warm_at(t)
            if n != current:
                out.append((t, n))
                current = n
        return out

    def warm_hours(self, start: datetime, end: datetime) -> float:
        """Container-hours kept warm in [start, end) (each warm container counts; 2 warm for 1 h = 2)."""
        start, end = _aware(start), _aware(end)
        total, at, n = 0.0, start, self.warm_at(start)
        for t, new in self.changes(start, end):
            total += n * (t - at).total_seconds()
            at, n = t, new
        return (total + n * (end - at).total_seconds()) / 3600


def _aware(instant: datetime) -> datetime:
    if instant.tzinfo is None:
        raise ValueError(f"{instant} has no time zone: give an aware datetime (e.g. datetime.now(UTC))")
    return instant.astimezone(UTC)


def parse(text: str) -> Schedule:
    """The schedule written in `text` (empty: no warm hours); a bad rule raises ScheduleError (one line)."""
    rules = []
    for n, raw in enumerate((part.strip() for part in (text or "").split(";")), 1):
        if raw:
            rules.append(_parse_rule(raw, n))
    return Schedule(tuple(rules))


def _parse_rule(raw: str, n: int) -> Rule:
    def bad(why: str) -> ScheduleError:
        return ScheduleError(f"{ENV} rule {n} {raw!r}: {why} (expected e.g. 'mon-fri 08:00-20:00 Europe/Berlin "
                             "min=1', rules separated by ';')")

    m = _RULE.match(" ".join(raw.split()))
    if not m:
        raise bad("not of the form DAYS HH:MM-HH:MM ZONE min=N")
    days = _days(m["days"].lower(), bad)
    start, end = _minutes(m["start"], bad), _minutes(m["end"], bad)
    if start == 1440:
        raise bad("a window cannot start at 24:00 (write 00:00 of the next day)")
    if start == end:
        raise bad("the window is empty (start equals end)")
    try:
        zone = ZoneInfo(m["zone"])
    except (ZoneInfoNotFoundError, ValueError):
        raise bad(f"unknown time zone {m['zone']!r} (an IANA name such as Europe/Berlin or UTC)") from None
    if not m["n"].isdigit() or not 1 <= int(m["n"]) <= MAX_WARM:
        raise bad(f"min={m['n']} must be a whole number of containers, 1 .. {MAX_WARM}")
    return Rule(days, start, end, zone, int(m["n"]), raw)


def _days(spec: str, bad) -> frozenset[int]:
    if spec == "daily":
        return frozenset(range(7))
    out: set[int] = set()
    for part in spec.split(","):
        ends = part.split("-")
        if len(ends) > 2 or any(e not in DAYS for e in ends):
            raise bad(f"days {spec!r}: use mon..sun, ranges (mon-fri), lists (sat,sun) or daily")
        a, b = DAYS.index(ends[0]), DAYS.index(ends[-1])
        out.update((a + i) % 7 for i in range((b - a) % 7 + 1))  # fri-mon wraps over the weekend
    return frozenset(out)


def _minutes(hhmm: str, bad) -> int:
    hours, minutes = (int(x) for x in hhmm.split(":"))
    if not (0 <= hours <= 23 and 0 <= minutes <= 59 or (hours, minutes) == (24, 0)):
        raise bad(f"{hhmm} is not a time of day (00:00 .. 24:00)")
    if minutes % TICK_MINUTES:
        raise bad(f"{hhmm} is not on a quarter hour (the schedule is applied every {TICK_MINUTES} min)")
    return hours * 60 + minutes


def from_env(env: Mapping[str, str]) -> Schedule:
    """PERCEPIANO_WARM_SCHEDULE of `env`, parsed (the deploy-time check: a bad value stops the deploy here)."""
    return parse(env.get(ENV, ""))


def apply(schedule: Schedule, now: datetime, service) -> int:
    """Set the service's warm containers to the schedule's count at `now` (`service`: a Modal Cls instance,
    whose update_autoscaler(min_containers=...) overrides the deployed value until the next deploy)."""
    warm = schedule.warm_at(now)
    service.update_autoscaler(min_containers=warm)
    return warm


def describe(schedule: Schedule) -> str:
    """One line for logs: the rules as given, or that there are none."""
    return "; ".join(r.text for r in schedule.rules) or "no warm hours (scale to zero)"
