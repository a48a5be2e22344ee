"""The charts page's pictures: TTFT and decode speed over time, answers per hour, drawn by pygal as inline SVG.

pygal writes plain SVG; its optional tooltip script would come from a CDN, so it is left out (`js=[]`) and the
charts need no network.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import pygal

# the newest answers the time charts draw (older ones are in the database, and in the canned queries)
POINTS = 2000

TIMINGS_SQL = (
    "SELECT created_utc, ttft_ms, tokens_per_s FROM results WHERE error IS NULL AND ttft_ms IS NOT NULL "
    f"ORDER BY created_utc DESC LIMIT {POINTS}"
)
PER_HOUR_SQL = (
    "SELECT substr(created_utc, 1, 13) AS hour, count(*) FROM results WHERE error IS NULL "
    "GROUP BY hour ORDER BY hour DESC LIMIT 72"
)


def _chart(kind: type, title: str, y_title: str, **options: object) -> pygal.Graph:
    return kind(
        title=title,
        y_title=y_title,
        js=[],
        width=900,
        height=320,
        show_legend=False,
        x_label_rotation=30,
        disable_xml_declaration=True,
        no_data_text="no answers yet",
        **options,
    )


def _over_time(title: str, y_title: str) -> pygal.Graph:
    when = lambda moment: moment.strftime("%m-%d %H:%M:%S")  # noqa: E731
    return _chart(pygal.DateTimeLine, title, y_title, dots_size=2, x_value_formatter=when)


def timing_charts(rows: Sequence[tuple[str, float, float | None]]) -> list[str]:
    """TTFT (ms) and decode speed (tokens/s) of each answer, by when it was recorded (rows: newest first)."""
    points = [(datetime.fromisoformat(when), ttft, speed) for when, ttft, speed in reversed(rows)]
    ttft = _over_time("Time to first token", "ms")
    ttft.add("TTFT", [(when, value) for when, value, _ in points])
    speed = _over_time("Decode speed", "tokens/s")
    speed.add("tokens/s", [(when, value) for when, _, value in points if value is not None])
    return [ttft.render(is_unicode=True), speed.render(is_unicode=True)]


def per_hour_chart(rows: Sequence[tuple[str, int]]) -> str:
    """Answers generated in each UTC hour (rows: hour as YYYY-MM-DDTHH, newest first)."""
    chart = _chart(pygal.Bar, "Answers per hour (UTC)", "answers")
    ordered = list(reversed(rows))
    chart.x_labels = [hour.replace("T", " ") + ":00" for hour, _ in ordered]
    chart.add("answers", [count for _, count in ordered])
    return chart.render(is_unicode=True)
