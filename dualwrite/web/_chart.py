"""Divergences over time: divergence log entries bucketed per hour or per UTC day, laid out as the
bars of an SVG chart drawn by the template (no JavaScript).

Hourly buckets when every entry is from the last 48 hours, daily ones (up to 60 days) otherwise; bars
are stacked by divergence kind.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from dualwrite.ledger import DivergenceRecord

__all__ = ["KIND_COLOURS", "Bucket", "Chart", "Segment", "divergence_chart"]

HOUR = 3600
DAY = 86_400
MAX_HOURS = 48
MIN_HOURS = 24
MAX_DAYS = 60
MIN_DAYS = 14
WIDTH = 720
HEIGHT = 170
LEFT = 44
RIGHT = 8
TOP = 10
BOTTOM = 24
MAX_X_LABELS = 8

KIND_COLOURS = {
    "shadow_refused": "#dc2626",
    "shadow_expired": "#d97706",
    "late_refusal": "#7c3aed",
    "translated": "#2563eb",
}
_OTHER_COLOUR = "#6b7280"

Unit = Literal["hour", "day"]


@dataclass(frozen=True, slots=True)
class Segment:
    """One kind's part of a bar."""

    kind: str
    count: int
    y: float
    height: float
    colour: str


@dataclass(frozen=True, slots=True)
class Bucket:
    """One hour or day: its label, total and stacked segments, placed at ``x``."""

    start: int
    label: str
    total: int
    x: float
    segments: tuple[Segment, ...]


@dataclass(frozen=True, slots=True)
class Chart:
    """Everything the template needs to draw the chart and its data table."""

    unit: Unit
    buckets: tuple[Bucket, ...]
    peak: int
    """The value at the top of the axis (a round number at least the highest bar)."""
    bar_width: float
    y_ticks: tuple[tuple[int, float], ...]
    x_labels: tuple[tuple[float, str], ...]
    legend: tuple[tuple[str, str], ...]
    shown: int
    """Entries inside the chart's window."""
    older: int
    """Entries older than the window (counted, not drawn)."""
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right_edge: int = WIDTH - RIGHT
    baseline: int = HEIGHT - BOTTOM


def _nice_ceiling(value: int) -> int:
    if value <= 1:
        return 1
    magnitude = int(10 ** math.floor(math.log10(value)))
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude  # pragma: no cover - the loop always returns (10 * magnitude >= value)


def _label(start: int, unit: Unit, *, full: bool) -> str:
    moment = datetime.fromtimestamp(start, tz=UTC)
    if unit == "hour":
        return moment.strftime("%Y-%m-%d %H:00Z" if full else "%H:00")
    return moment.strftime("%Y-%m-%d" if full else "%b %d")


def divergence_chart(records: Sequence[DivergenceRecord], *, now: float) -> Chart:
    """Bucket ``records`` (any order) up to ``now``."""
    oldest = min((record.at for record in records), default=now)
    if now - oldest <= MAX_HOURS * HOUR:
        unit: Unit = "hour"
        size = HOUR
        count = min(max(MIN_HOURS, int((now - oldest) // HOUR) + 1), MAX_HOURS)
    else:
        unit, size = "day", DAY
        count = min(max(MIN_DAYS, int(now // DAY - oldest // DAY) + 1), MAX_DAYS)
    last = int(now // size) * size
    first = last - (count - 1) * size
    counts: list[dict[str, int]] = [{} for _ in range(count)]
    older = 0
    for record in records:
        if record.at < first:
            older += 1
            continue
        # An entry stamped after ``now`` (another process's clock) lands in the last bucket.
        index = min(int((record.at - first) // size), count - 1)
        counts[index][record.kind] = counts[index].get(record.kind, 0) + 1
    peak = _nice_ceiling(max((sum(bucket.values()) for bucket in counts), default=0))
    plot_width = WIDTH - LEFT - RIGHT
    plot_height = HEIGHT - TOP - BOTTOM
    slot = plot_width / count
    bar_width = round(slot * 0.8, 2)
    kinds = sorted({kind for bucket in counts for kind in bucket}, key=_kind_order)
    buckets = []
    for index, by_kind in enumerate(counts):
        x = round(LEFT + index * slot + (slot - bar_width) / 2, 2)
        top = float(HEIGHT - BOTTOM)
        segments = []
        for kind in kinds:
            if not by_kind.get(kind):
                continue
            height = by_kind[kind] / peak * plot_height
            top -= height
            colour = KIND_COLOURS.get(kind, _OTHER_COLOUR)
            segments.append(Segment(kind, by_kind[kind], round(top, 2), round(height, 2), colour))
        start = first + index * size
        buckets.append(
            Bucket(start, _label(start, unit, full=True), sum(by_kind.values()), x, tuple(segments))
        )
    step = math.ceil(count / MAX_X_LABELS)
    x_labels = tuple(
        (round(bucket.x + bar_width / 2, 2), _label(bucket.start, unit, full=False))
        for bucket in buckets[::-1][::step]
    )
    ticks = [0, peak] if peak % 2 else [0, peak // 2, peak]
    y_ticks = tuple((tick, round(HEIGHT - BOTTOM - tick / peak * plot_height, 2)) for tick in ticks)
    return Chart(
        unit=unit,
        buckets=tuple(buckets),
        peak=peak,
        bar_width=bar_width,
        y_ticks=y_ticks,
        x_labels=x_labels,
        legend=tuple((kind, KIND_COLOURS.get(kind, _OTHER_COLOUR)) for kind in kinds),
        shown=len(records) - older,
        older=older,
    )


def _kind_order(kind: str) -> tuple[int, str]:
    order = list(KIND_COLOURS)
    return (order.index(kind), kind) if kind in order else (len(order), kind)
