"""--since/--until values: ISO dates and date-times (naive = UTC, offsets converted), relative ages, refusals."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pytest

from batch.service.store.timefilter import parse_when, to_utc_iso

UTC = timezone.utc
NOW = datetime(2026, 11, 25, 15, 24, 33, 765432, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-25", datetime(2026, 11, 25, tzinfo=UTC)),
        ("2026-11-25T10:00", datetime(2026, 11, 25, 10, tzinfo=UTC)),
        ("2026-11-25 10:00", datetime(2026, 11, 25, 10, tzinfo=UTC)),
        ("2026-11-25T10:00:07", datetime(2026, 11, 25, 10, 0, 7, tzinfo=UTC)),
        ("2026-11-25T10:00:07.25", datetime(2026, 11, 25, 10, 0, 7, 250000, tzinfo=UTC)),
        ("2026-11-25T10:00:00Z", datetime(2026, 11, 25, 10, tzinfo=UTC)),
        ("2026-11-25T10:00:00+01:00", datetime(2026, 11, 25, 9, tzinfo=UTC)),
        ("2026-11-25T10:00:00-05:30", datetime(2026, 11, 25, 15, 30, tzinfo=UTC)),
        ("2026-11-25T10:00+0100", datetime(2026, 11, 25, 9, tzinfo=UTC)),
        ("2026-11-25T00:30:00+02", datetime(2026, 11, 24, 22, 30, tzinfo=UTC)),  # the day before, in UTC
        ("  2026-11-25  ", datetime(2026, 11, 25, tzinfo=UTC)),
    ],
)
def test_iso_dates_and_times_become_utc(text, expected):
    when = parse_when(text, NOW)
    assert when == expected
    assert when.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("text", "age"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("2h", timedelta(hours=2)),
        ("3d", timedelta(days=3)),
        ("1w", timedelta(weeks=1)),
        ("0s", timedelta(0)),
    ],
)
def test_relative_ages_count_back_from_now(text, age):
    assert parse_when(text, NOW) == NOW - age


def test_relative_ages_from_a_local_now_are_returned_in_utc():
    local_now = NOW.astimezone(timezone(timedelta(hours=-8)))
    when = parse_when("2h", local_now)
    assert when == NOW - timedelta(hours=2) and when.utcoffset() == timedelta(0)
    assert parse_when("1d", NOW.replace(tzinfo=None)) == NOW - timedelta(days=1)  # naive now: UTC


@pytest.mark.parametrize(
    "text",
    [
        "foo",
        "2h30",
        "",
        "   ",
        "-3d",
        "2026-13-01",
        "2026-02-30",
        "2026-11-25T24:00",
        "2026-11-25T10:00+25:00",
        "3 d",
        "1.5h",
        "3y",
        "2H",
        "20261125",
        "2026-W48",
        "99999999999999w",
    ],
)
def test_anything_else_is_refused_with_the_accepted_forms(text):
    with pytest.raises(ValueError) as info:
        parse_when(text, NOW)
    message = str(info.value)
    for form in ("2026-11-25", "2026-11-25T10:00", "+01:00", "Z", "90s", "15m", "2h", "3d", "1w", "UTC"):
        assert form in message, form


def test_to_utc_iso_is_the_text_the_database_stores():
    assert to_utc_iso(NOW) == "2026-11-25T15:24:33.765+00:00"
    assert to_utc_iso(NOW) == NOW.isoformat(timespec="milliseconds")
    plus_one = NOW.astimezone(timezone(timedelta(hours=1)))
    assert to_utc_iso(plus_one) == "2026-11-25T15:24:33.765+00:00"
    assert to_utc_iso(NOW.replace(tzinfo=None)) == "2026-11-25T15:24:33.765+00:00"  # naive: UTC
    assert to_utc_iso(datetime(2026, 1, 2, tzinfo=UTC)) == "2026-01-02T00:00:00.000+00:00"


def test_to_utc_iso_has_the_shape_of_the_stores_timestamps_and_sorts_like_time():
    from batch.service.store.store import utc_now

    shape = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00")
    stored = utc_now()
    hour_ago = to_utc_iso(parse_when("1h", datetime.now(UTC)))
    assert shape.fullmatch(stored) and shape.fullmatch(hour_ago)
    assert hour_ago < stored
    # 10:30+00:45 is 09:45 UTC: earlier than 10:00Z, and so is its text once converted
    ten_utc = parse_when("2026-11-25T10:00:00Z", NOW)
    quarter_to_ten_utc = parse_when("2026-11-25T10:30:00+00:45", NOW)
    assert quarter_to_ten_utc < ten_utc
    assert to_utc_iso(quarter_to_ten_utc) < to_utc_iso(ten_utc)
