"""Budget windows: the duration grammar and the period a moment falls in.

Two kinds of window, as in LiteLLM:

- **calendar** windows (key, team, team member, user, end user, org, project, global)
  reset on calendar boundaries in the configured time zone: ``1d``/``24h`` at
  midnight, ``7d``/``1w`` on Monday at midnight, ``30d``/``1mo`` on the 1st of the
  month; other lengths are aligned the same way (``2d``: every other midnight counted
  from Monday 1970-01-05, ``6h``: 00:00/06:00/12:00/18:00).
- **rolling** windows (tags; provider and deployment budgets) start at the first spend
  and run out ``duration`` later: the store's key TTL does that, set when the key is
  created.

A calendar window is part of the store key (``...:1d:20261123``), so a reset is a new
key: nothing is deleted, so no concurrent reset can lose spend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator

__all__ = [
    "Duration",
    "DurationText",
    "Period",
    "cached_duration",
    "calendar_period",
    "parse_duration",
    "zone",
]

_GRAMMAR = re.compile(r"^(\d{1,6})(mo|[smhdw]?)$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
#: A Monday: day and week periods count from here so ``7d`` starts on Mondays.
_MONDAY = date(1970, 1, 5)


@dataclass(frozen=True, slots=True)
class Duration:
    """A parsed ``budget_duration``: ``count`` of ``unit`` (``s m h d w mo``)."""

    count: int
    unit: str
    text: str

    @property
    def months(self) -> int | None:
        """Whole months for month windows (``Nmo``, and ``30d`` as LiteLLM reads it)."""
        if self.unit == "mo":
            return self.count
        if self.unit == "d" and self.count == 30:
            return 1
        return None

    @property
    def seconds(self) -> int:
        """The length in seconds (a month counts as 30 days), for rolling TTLs."""
        if self.unit == "mo":
            return self.count * 30 * 86_400
        return self.count * _SECONDS[self.unit]


def parse_duration(text: str) -> Duration:
    """Parse ``(\\d+)(mo|[smhdw]?)`` (no unit means seconds); ValueError otherwise."""
    match = _GRAMMAR.match(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a duration like 30s, 15m, 1h, 1d, 1w or 1mo")
    return Duration(int(match.group(1)), match.group(2) or "s", text.strip())


@lru_cache(maxsize=64)
def zone(name: str) -> ZoneInfo:
    """The time zone ``name`` (IANA); ValueError when unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r}") from exc


@lru_cache(maxsize=1024)
def _period_ident(start: datetime) -> str:
    return start.astimezone(UTC).strftime("%Y%m%dT%H%M%S")


@dataclass(frozen=True, slots=True)
class Period:
    """One calendar window: ``[start, end)`` in UTC, and a compact id for store keys."""

    start: datetime
    end: datetime

    @property
    def ident(self) -> str:
        return _period_ident(self.start)

    def seconds_left(self, now: datetime) -> float:
        return max(0.0, (self.end - now).total_seconds())


def _local_midnight(day: date, tz: ZoneInfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=tz)


def calendar_period(duration: Duration, now: datetime, tz: ZoneInfo) -> Period:
    """The calendar window of ``duration`` that ``now`` falls in, in time zone ``tz``."""
    start, end = _local_bounds(duration, now, tz)
    # Rule: aware datetimes sharing a tzinfo subtract as wall-clock times; in UTC the
    # lengths are real (a DST day has 23 or 25 hours).
    return Period(start.astimezone(UTC), end.astimezone(UTC))


def _local_bounds(duration: Duration, now: datetime, tz: ZoneInfo) -> tuple[datetime, datetime]:
    local = now.astimezone(tz)
    months = duration.months
    if months is not None:
        index = (local.year * 12 + local.month - 1) // months * months
        start = _local_midnight(date(index // 12, index % 12 + 1, 1), tz)
        end_index = index + months
        end = _local_midnight(date(end_index // 12, end_index % 12 + 1, 1), tz)
        return start, end
    length = duration.seconds
    if length % 86_400 == 0:
        days = length // 86_400
        offset = (local.date() - _MONDAY).days // days * days
        first = _MONDAY + timedelta(days=offset)
        return _local_midnight(first, tz), _local_midnight(first + timedelta(days), tz)
    # Shorter than a day (or not whole days): aligned within the local day.
    midnight = _local_midnight(local.date(), tz)
    into_day = (local.replace(tzinfo=None) - midnight.replace(tzinfo=None)).total_seconds()
    start_s = int(into_day) // length * length
    start = (midnight.replace(tzinfo=None) + timedelta(seconds=start_s)).replace(tzinfo=tz)
    end = min(start + timedelta(seconds=length), _local_midnight(local.date() + timedelta(1), tz))
    return start, end


def _checked(text: str) -> str:
    parse_duration(text)
    return text.strip()


#: A policy field holding a duration, validated when the policy loads.
DurationText = Annotated[str, AfterValidator(_checked)]


@lru_cache(maxsize=256)
def cached_duration(text: str) -> Duration:
    """:func:`parse_duration` for texts the policy already validated."""
    return parse_duration(text)
