"""A bar chart of usage over time as SVG geometry, drawn server-side (no script, no library):
the template turns these numbers into <rect>s, and a table beside it gives the same data to
screen readers and to anyone who wants the exact values."""

from dataclasses import dataclass

WIDTH, HEIGHT = 640, 200  # the viewBox; the SVG scales to its container
MARGIN_LEFT, MARGIN_BOTTOM, MARGIN_TOP = 56, 28, 8


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str  # the day or hour
    value: int


@dataclass(frozen=True)
class Chart:
    bars: list[Bar]
    max_value: int
    width: int = WIDTH
    height: int = HEIGHT
    left: int = MARGIN_LEFT
    bottom: float = HEIGHT - MARGIN_BOTTOM  # the x axis' y
    top: int = MARGIN_TOP


def bar_chart(points: list[tuple[str, int]]) -> Chart:
    """Bars for (label, value) points in order; every bar shares one scale from zero."""
    top = max((value for _, value in points), default=0) or 1
    plot_width = WIDTH - MARGIN_LEFT - 8
    plot_height = HEIGHT - MARGIN_BOTTOM - MARGIN_TOP
    step = plot_width / max(len(points), 1)
    bars = []
    for i, (label, value) in enumerate(points):
        height = plot_height * value / top
        bars.append(Bar(MARGIN_LEFT + i * step + step * 0.1, HEIGHT - MARGIN_BOTTOM - height,
                        step * 0.8, height, label, value))
    return Chart(bars, top)
