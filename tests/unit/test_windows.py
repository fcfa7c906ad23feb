"""Budget windows: duration grammar and calendar periods in a time zone."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from extproc.core.windows import calendar_period, parse_duration, zone

NY = zone("America/New_York")


@pytest.mark.parametrize(
    ("text", "count", "unit", "seconds"),
    [
        ("30s", 30, "s", 30),
        ("45", 45, "s", 45),
        ("15m", 15, "m", 900),
        ("2h", 2, "h", 7200),
        ("1d", 1, "d", 86_400),
        ("1w", 1, "w", 604_800),
        ("1mo", 1, "mo", 2_592_000),
    ],
)
def test_parse_duration(text: str, count: int, unit: str, seconds: int) -> None:
    parsed = parse_duration(text)
    assert (parsed.count, parsed.unit, parsed.seconds) == (count, unit, seconds)


@pytest.mark.parametrize("text", ["", "0d", "1y", "-1d", "1.5h", "d", "1 d x", "9999999s"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def iso(duration: str, now: datetime, tz: str = "UTC") -> tuple[str, str]:
    period = calendar_period(parse_duration(duration), now, zone(tz))
    assert period.start <= now < period.end
    local = zone(tz)
    return period.start.astimezone(local).isoformat(), period.end.astimezone(local).isoformat()


NOW = datetime(2026, 11, 25, 15, 30, tzinfo=UTC)  # a Wednesday


@pytest.mark.parametrize(
    ("duration", "tz", "start", "end"),
    [
        ("1d", "UTC", "2026-11-25T00:00:00+00:00", "2026-11-26T00:00:00+00:00"),
        ("24h", "UTC", "2026-11-25T00:00:00+00:00", "2026-11-26T00:00:00+00:00"),
        # midnight in New York, not in UTC
        ("1d", "America/New_York", "2026-11-25T00:00:00-05:00", "2026-11-26T00:00:00-05:00"),
        # weeks start on Monday
        ("7d", "UTC", "2026-11-23T00:00:00+00:00", "2026-11-30T00:00:00+00:00"),
        ("1w", "UTC", "2026-11-23T00:00:00+00:00", "2026-11-30T00:00:00+00:00"),
        # 30d is a calendar month, as in LiteLLM
        ("30d", "UTC", "2026-11-01T00:00:00+00:00", "2026-12-01T00:00:00+00:00"),
        ("1mo", "UTC", "2026-11-01T00:00:00+00:00", "2026-12-01T00:00:00+00:00"),
        ("3mo", "UTC", "2026-10-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00"),
        ("6h", "UTC", "2026-11-25T12:00:00+00:00", "2026-11-25T18:00:00+00:00"),
        ("15m", "UTC", "2026-11-25T15:30:00+00:00", "2026-11-25T15:45:00+00:00"),
    ],
)
def test_calendar_periods(duration: str, tz: str, start: str, end: str) -> None:
    assert iso(duration, NOW, tz) == (start, end)


def test_month_window_rolls_over_the_year() -> None:
    now = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    assert iso("1mo", now) == ("2026-12-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00")


def test_day_window_across_a_dst_change() -> None:
    # 2026-11-01: New York falls back; that local day has 25 hours.
    now = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    period = calendar_period(parse_duration("1d"), now, NY)
    assert period.start.astimezone(NY).isoformat() == "2026-11-01T00:00:00-04:00"
    assert (period.end - period.start).total_seconds() == 25 * 3600


def test_next_period_starts_where_the_last_ended() -> None:
    day = parse_duration("1d")
    first = calendar_period(day, NOW, NY)
    second = calendar_period(day, first.end, NY)
    assert second.start == first.end
    assert second.ident != first.ident


def test_unknown_zone() -> None:
    with pytest.raises(ValueError, match="unknown time zone"):
        zone("Nowhere/City")
