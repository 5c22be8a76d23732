"""Warm hours (deploy/schedule.py, deploy/modal_app.py's scheduler): parsing, time zones and daylight saving,
which adjustment is made at which instant, and the Modal objects the app file declares; no credentials.

Expected instants are written out in UTC from the zones' published rules (the EU changes clocks at 01:00 UTC on
the last Sunday of March and of October; CET = UTC+1, CEST = UTC+2; New York: 2nd Sunday of March, 1st of
November at 02:00 local), with the Sundays found by the calendar module, not by zoneinfo.
"""

from __future__ import annotations

import calendar
import os
import subprocess
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from deploy.schedule import TICK_CRON, ScheduleError, apply, parse

REPO = Path(__file__).resolve().parents[1]
BERLIN_WORKDAYS = "mon-fri 08:00-20:00 Europe/Berlin min=1"


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def last_sunday(year: int, month: int) -> date:
    weeks = calendar.monthcalendar(year, month)
    return date(year, month, max(week[calendar.SUNDAY] for week in weeks))


def test_the_eu_change_days_of_2026_are_the_ones_the_expectations_use():
    assert last_sunday(2026, 3) == date(2026, 3, 29) and last_sunday(2026, 10) == date(2026, 10, 25)


def test_berlin_workday_hours_move_in_utc_across_the_spring_change():
    s = parse(BERLIN_WORKDAYS)
    # Fri 27 March: CET (UTC+1), 08:00-20:00 = 07:00-19:00 UTC; Mon 30 March: CEST (UTC+2) = 06:00-18:00 UTC
    assert s.changes(utc(2026, 3, 27), utc(2026, 3, 31)) == [
        (utc(2026, 3, 27, 7), 1), (utc(2026, 3, 27, 19), 0), (utc(2026, 3, 30, 6), 1), (utc(2026, 3, 30, 18), 0)]


def test_berlin_workday_hours_move_back_across_the_autumn_change():
    s = parse(BERLIN_WORKDAYS)
    assert s.changes(utc(2026, 10, 23), utc(2026, 10, 27)) == [
        (utc(2026, 10, 23, 6), 1), (utc(2026, 10, 23, 18), 0), (utc(2026, 10, 26, 7), 1), (utc(2026, 10, 26, 19), 0)]


def test_warm_at_the_edges_start_inclusive_end_exclusive():
    s = parse(BERLIN_WORKDAYS)
    assert s.warm_at(utc(2026, 3, 30, 5, 59)) == 0
    assert s.warm_at(utc(2026, 3, 30, 6)) == 1
    assert s.warm_at(utc(2026, 3, 30, 17, 59)) == 1
    assert s.warm_at(utc(2026, 3, 30, 18)) == 0
    assert s.warm_at(utc(2026, 3, 28, 12)) == 0  # Saturday
    # the same instant written in another zone is the same instant
    assert s.warm_at(datetime(2026, 3, 30, 8, tzinfo=ZoneInfo("Europe/Berlin"))) == 1


def test_a_window_starting_in_the_spring_gap_opens_once_after_it():
    # 02:30 does not exist on 29 March 2026 in Berlin; read with the offset before the change (+01:00): 01:30 UTC
    s = parse("daily 02:30-04:00 Europe/Berlin min=1")
    assert s.changes(utc(2026, 3, 28), utc(2026, 3, 30)) == [
        (utc(2026, 3, 28, 1, 30), 1), (utc(2026, 3, 28, 3), 0),  # CET: 02:30-04:00 = 01:30-03:00 UTC
        (utc(2026, 3, 29, 1, 30), 1), (utc(2026, 3, 29, 2), 0)]  # 03:30-04:00 CEST on the change day


def test_a_window_over_the_repeated_autumn_hour_opens_once():
    # 02:30 happens twice on 25 October 2026 (CEST, then CET): the window starts at the first and does not flap
    s = parse("daily 02:30-03:00 Europe/Berlin min=2")
    assert s.changes(utc(2026, 10, 25), utc(2026, 10, 26)) == [(utc(2026, 10, 25, 0, 30), 2), (utc(2026, 10, 25, 2), 0)]
    assert s.warm_hours(utc(2026, 10, 25), utc(2026, 10, 26)) == pytest.approx(2 * 1.5)


def test_new_york_changes_on_its_own_days():
    s = parse("daily 09:00-17:00 America/New_York min=1")
    # 2026: DST starts Sun 8 March, ends Sun 1 November; EST = UTC-5, EDT = UTC-4
    assert s.changes(utc(2026, 3, 7), utc(2026, 3, 9)) == [
        (utc(2026, 3, 7, 14), 1), (utc(2026, 3, 7, 22), 0), (utc(2026, 3, 8, 13), 1), (utc(2026, 3, 8, 21), 0)]


def test_overnight_wrapping_days_and_overlaps():
    s = parse("fri 22:00-06:00 UTC min=2")
    assert s.changes(utc(2026, 12, 4), utc(2026, 12, 7)) == [(utc(2026, 12, 4, 22), 2), (utc(2026, 12, 5, 6), 0)]
    weekend = parse("fri-mon 10:00-11:00 UTC min=1")  # wraps over the week's end: fri, sat, sun, mon
    assert [t.weekday() for t, n in weekend.changes(utc(2026, 12, 1), utc(2026, 12, 8)) if n] == [4, 5, 6, 0]
    both = parse("mon-fri 08:00-20:00 UTC min=1; mon-fri 12:00-14:00 UTC min=3")
    assert both.changes(utc(2026, 12, 7), utc(2026, 12, 8)) == [
        (utc(2026, 12, 7, 8), 1), (utc(2026, 12, 7, 12), 3), (utc(2026, 12, 7, 14), 1), (utc(2026, 12, 7, 20), 0)]
    assert parse("daily 00:00-24:00 UTC min=1").changes(utc(2026, 12, 7), utc(2026, 12, 9)) == []


def test_warm_hours_of_a_month_count_the_workdays():
    s = parse(BERLIN_WORKDAYS)  # March 2026 holds the spring change (on a Sunday): every workday is still 12 h
    workdays = sum(1 for d in range(1, 32) if date(2026, 3, d).weekday() < 5)
    start = datetime(2026, 3, 1, tzinfo=ZoneInfo("Europe/Berlin"))
    end = datetime(2026, 4, 1, tzinfo=ZoneInfo("Europe/Berlin"))
    assert workdays == 22
    assert s.warm_hours(start, end) == pytest.approx(12 * workdays)


@pytest.mark.parametrize("zone", ["Europe/Berlin", "Asia/Kolkata", "Asia/Kathmandu", "Australia/Adelaide",
                                  "America/St_Johns", "Pacific/Chatham"])
def test_every_change_falls_on_a_tick_of_the_15_minute_utc_cron(zone):
    assert TICK_CRON == "*/15 * * * *"
    s = parse(f"mon-fri 08:45-17:15 {zone} min=1; sat 23:30-01:00 {zone} min=1")
    changes = s.changes(utc(2026, 1, 1), utc(2027, 1, 1))
    assert len(changes) > 500
    assert all(t.minute % 15 == 0 and t.second == 0 and t.microsecond == 0 for t, _ in changes)


@pytest.mark.parametrize(("text", "why"), [
    ("mon-fri 08:00-20:00 Europe/Berln min=1", "unknown time zone 'Europe/Berln'"),
    ("mon-fry 08:00-20:00 UTC min=1", "days 'mon-fry'"),
    ("mon-fri 08:10-20:00 UTC min=1", "08:10 is not on a quarter hour"),
    ("mon-fri 08:00-25:00 UTC min=1", "25:00 is not a time of day"),
    ("mon-fri 08:00-08:00 UTC min=1", "empty"),
    ("mon-fri 08:00-20:00 UTC min=0", "min=0 must be"),
    ("mon-fri 08:00-20:00 UTC min=many", "min=many must be"),
    ("mon-fri 08:00-20:00 UTC", "not of the form"),
    ("mon-fri 8-20 UTC min=1", "not of the form"),
    ("daily 24:00-06:00 UTC min=1", "cannot start at 24:00"),
])
def test_bad_rules_are_refused_in_one_line_naming_the_rule(text, why):
    with pytest.raises(ScheduleError) as err:
        parse(f"daily 09:00-10:00 UTC min=1; {text}")
    message = str(err.value)
    assert "\n" not in message and why in message
    assert message.startswith(f"PERCEPIANO_WARM_SCHEDULE rule 2 {text!r}: ")


def test_empty_schedules_and_spacing():
    assert parse("").rules == () and parse(" ; ").rules == ()
    s = parse("  Mon-Fri   08:00-20:00  Europe/Berlin  min=1 ;")
    assert len(s.rules) == 1 and s.rules[0].days == frozenset(range(5)) and s.rules[0].warm == 1
    with pytest.raises(ValueError, match="no time zone"):
        s.warm_at(datetime(2026, 3, 30, 8))


class RecordingService:
    """Stands in for a Modal Cls instance: records update_autoscaler's keyword arguments."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def update_autoscaler(self, **kwargs) -> None:
        self.calls.append(kwargs)


def test_apply_sets_min_containers_for_the_instant():
    s = parse(BERLIN_WORKDAYS)
    service = RecordingService()
    assert apply(s, utc(2026, 3, 30, 6, 0), service) == 1  # Monday 08:00 CEST
    assert apply(s, utc(2026, 3, 30, 18, 0), service) == 0  # 20:00 CEST: back to zero
    assert service.calls == [{"min_containers": 1}, {"min_containers": 0}]


# --- the Modal objects the app file declares --------------------------------------------------------------------


def test_the_app_declares_the_scheduler_on_a_15_minute_cron(monkeypatch):
    pytest.importorskip("modal")
    from modal_recording import import_recording, options

    m, calls = import_recording(monkeypatch, PERCEPIANO_WARM_SCHEDULE=BERLIN_WORKDAYS)
    try:
        opts = options(calls, "function", "apply_warm_schedule")
        cron = opts["schedule"].proto_message.cron
        assert (cron.cron_string, cron.timezone) == ("*/15 * * * *", "UTC")
        assert opts["image"] is m.scheduler_image and opts["image"] is not m.image  # no model, no onnxruntime
        assert "gpu" not in opts
        assert m.WARM_SCHEDULE == parse(BERLIN_WORKDAYS)
        # the scheduler's own import of the file must see the same schedule and the same app
        env = [kw["args"][0] for kind, name, kw in calls if kind == "image" and name == "env"]
        wanted = {"PERCEPIANO_WARM_SCHEDULE": BERLIN_WORKDAYS, "PERCEPIANO_MODAL_TARGET": "gpu"}
        assert wanted.items() <= env[-1].items()
        # the method it calls exists on the deployed class's instances, with the keyword it passes
        assert "update_autoscaler" in dir(m.Service())
    finally:
        sys.modules.pop("deploy.modal_app", None)


def test_without_a_schedule_the_scheduler_never_runs(monkeypatch):
    pytest.importorskip("modal")
    from modal_recording import import_recording, options

    monkeypatch.delenv("PERCEPIANO_WARM_SCHEDULE", raising=False)
    m, calls = import_recording(monkeypatch)
    try:
        assert options(calls, "function", "apply_warm_schedule").get("schedule") is None
        assert m.WARM_SCHEDULE.rules == ()
    finally:
        sys.modules.pop("deploy.modal_app", None)


def test_the_scheduler_function_applies_the_schedule_to_the_service(monkeypatch):
    pytest.importorskip("modal")
    from modal_recording import import_recording

    m, _ = import_recording(monkeypatch, PERCEPIANO_WARM_SCHEDULE="daily 00:00-24:00 UTC min=2")
    try:
        service, looked_up = RecordingService(), []
        monkeypatch.setattr(m.modal.Cls, "from_name", lambda *names: looked_up.append(names) or (lambda: service))
        assert m.apply_warm_schedule.local()["min_containers"] == 2
        assert service.calls == [{"min_containers": 2}]
        assert looked_up == [("percepiano", "Service")]  # the deployed app's class, by the names it deploys under
    finally:
        sys.modules.pop("deploy.modal_app", None)


def test_a_bad_schedule_stops_the_deploy_with_one_line(tmp_path):
    pytest.importorskip("modal")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "PERCEPIANO_"))}
    env.update(HOME=str(tmp_path), MODAL_CONFIG_PATH=str(tmp_path / "none.toml"), PYTHONPATH=str(REPO),
               PERCEPIANO_WARM_SCHEDULE="mon-fri 08:00-20:00 Mars/Olympus min=1")
    out = subprocess.run([sys.executable, "-c", "import deploy.modal_app"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == (
        "deploy.schedule.ScheduleError: PERCEPIANO_WARM_SCHEDULE rule 1 'mon-fri 08:00-20:00 Mars/Olympus min=1': "
        "unknown time zone 'Mars/Olympus' (an IANA name such as Europe/Berlin or UTC) (expected e.g. "
        "'mon-fri 08:00-20:00 Europe/Berlin min=1', rules separated by ';')")


# --- what a schedule costs (benchmarks/cost.py) -----------------------------------------------------------------

TOY_PRICES = {"read_on": "2026-01-01", "rates": {"gpu_per_s": {}, "cpu_core_per_s": 1e-4, "memory_gib_per_s": 0.0},
              "containers": {"toy": {"gpu": None, "cpu_cores": 1, "memory_gib": 0, "scaledown_window_s": 100}}}


def test_a_schedule_is_priced_warm_hours_against_the_cold_starts_they_avoid():
    import math

    from benchmarks.cost import price_schedule

    # half of every day warm with 2 containers; 2592 requests in 30 days: one every 1000 s on average, inside and
    # outside the warm hours alike (spread evenly); the module's model, written out: idle m(1 - e^(-W/m)),
    # cold share e^(-W/m), with m = 1000 s and W = 100 s
    r = price_schedule(parse("daily 00:00-12:00 UTC min=2"), utc(2026, 12, 1), "toy", TOY_PRICES,
                       requests_per_month=2592, cold_s=5.0, warm_s=1.0)
    cold_share, idle = math.exp(-0.1), 1000 * (1 - math.exp(-0.1))
    assert r["warm_container_hours"] == pytest.approx(2 * 12 * 30)
    assert r["warm_share_of_requests"] == pytest.approx(0.5)
    assert r["usd_warm_hours"] == pytest.approx(2 * 12 * 30 * 3600 * 1e-4)
    assert r["usd_month_without"] == pytest.approx(2592 * (1.0 + idle + cold_share * 5.0) * 1e-4)
    assert r["usd_month_with"] == pytest.approx(r["usd_warm_hours"] + 1296 * (1.0 + idle + cold_share * 5.0) * 1e-4)
    assert r["cold_starts_without"] == pytest.approx(2592 * cold_share)
    assert r["cold_starts_avoided"] == pytest.approx(1296 * cold_share)


def test_always_warm_has_no_cold_starts_and_costs_the_month():
    from benchmarks.cost import price_schedule

    r = price_schedule(parse("daily 00:00-24:00 UTC min=1"), utc(2026, 12, 1), "toy", TOY_PRICES,
                       requests_per_month=1000, cold_s=5.0, warm_s=1.0)
    assert r["cold_starts_with"] == 0 and r["usd_month_with"] == pytest.approx(30 * 86400 * 1e-4)


def test_the_modal_app_prices_itself_as_a_container_of_the_table(monkeypatch):
    pytest.importorskip("modal")
    from modal_recording import import_recording

    from runtime.serve.prices import load_prices

    containers = load_prices()["containers"]
    for target in ("gpu", "cpu"):
        m, _ = import_recording(monkeypatch, PERCEPIANO_MODAL_TARGET=target)
        try:
            priced = containers[m.SERVICE_ENV["PERCEPIANO_PRICE_CONTAINER"]]
            if target == "cpu":  # the table's container is the one the app reserves
                assert (priced["cpu_cores"], priced["memory_gib"] * 1024) == (m.CPU_CORES, m.CPU_MEMORY_MB)
            else:
                assert priced["gpu"] == m.GPU
            assert priced["scaledown_window_s"] == m.SCALEDOWN_WINDOW
        finally:
            sys.modules.pop("deploy.modal_app", None)
