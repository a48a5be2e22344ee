"""Time filters on the command line (`--since 2h`, `--since 2026-11-25`): parsing them, and the database's UTC format.

`parse_when` accepts:
- an ISO 8601 date, `2026-11-25` (midnight UTC that day);
- an ISO 8601 date-time, `2026-11-25T10:00`, `2026-11-25T10:00:00`, `2026-11-25T10:00:00.250`, with `T` or a
  space between date and time, and an optional offset: `Z`, `+01:00`, `+0100` or `+01`. A value without an
  offset is UTC, never local time: the database stores UTC, and a job on another machine must mean the same;
- a relative age, a whole number and one unit, `90s`, `15m`, `2h`, `3d`, `1w`: that long before `now`.

It returns an aware datetime in UTC; `to_utc_iso` turns one into the exact text the `*_utc` columns hold
(`2026-11-25T15:24:33.765+00:00`), so that comparing the strings in SQL compares the instants.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

FORMS = (
    "an ISO 8601 date (2026-11-25) or date-time (2026-11-25T10:00, 2026-11-25T10:00:00+01:00, "
    "2026-11-25T10:00:00Z; without an offset it is UTC), or an age before now: "
    "a whole number and s, m, h, d or w (90s, 15m, 2h, 3d, 1w)"
)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGE = re.compile(r"(\d+)([smhdw])", re.ASCII)
_DATE_TIME = re.compile(
    r"(?P<year>\d{4})-(?P<month>\d{2})-(?P<day>\d{2})"
    r"(?:[T ](?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?:[.,](?P<fraction>\d{1,6}))?)?"
    r"(?P<offset>[Zz]|(?P<sign>[+-])(?P<off_hour>\d{2})(?::?(?P<off_minute>\d{2}))?)?)?",
    re.ASCII,
)


def parse_when(text: str, now: datetime) -> datetime:
    """The instant `text` names, as an aware UTC datetime; ValueError listing the accepted forms otherwise.

    `now` is the reference for relative ages (a naive `now` is taken as UTC).
    """
    value = text.strip()
    age = _AGE.fullmatch(value)
    if age:
        try:
            return _as_utc(now) - timedelta(seconds=int(age[1]) * _UNITS[age[2]])
        except OverflowError:
            raise ValueError(f"{text!r}: too far back; expected {FORMS}") from None
    match = _DATE_TIME.fullmatch(value)
    if not match:
        raise ValueError(f"{text!r} is not a time; expected {FORMS}")
    part = match.groupdict()
    try:
        tz = timezone.utc
        if part["sign"]:
            offset = timedelta(hours=int(part["off_hour"]), minutes=int(part["off_minute"] or 0))
            tz = timezone(offset if part["sign"] == "+" else -offset)
        when = datetime(
            int(part["year"]),
            int(part["month"]),
            int(part["day"]),
            int(part["hour"] or 0),
            int(part["minute"] or 0),
            int(part["second"] or 0),
            int((part["fraction"] or "0").ljust(6, "0")),
            tzinfo=tz,
        )
        return when.astimezone(timezone.utc)
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"{text!r} is not a valid time ({exc}); expected {FORMS}") from None


def to_utc_iso(dt: datetime) -> str:
    """`dt` as the database's `*_utc` text, `2026-11-25T15:24:33.765+00:00` (a naive `dt` is taken as UTC).

    The same format as `datetime.now(timezone.utc).isoformat(timespec="milliseconds")`, which the store writes:
    fixed width and always +00:00, so string order is time order.
    """
    return _as_utc(dt).isoformat(timespec="milliseconds")


def _as_utc(dt: datetime) -> datetime:
    if dt.tzinfo is None or dt.utcoffset() is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)
