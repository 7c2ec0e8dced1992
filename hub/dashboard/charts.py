"""Charts drawn on the server as inline SVG: no JavaScript library, nothing fetched.

A chart is series of points by round, optionally with an interval per point (success and its
95 % Wilson interval). Every point is a ``<circle class="point">`` carrying its series and
values, so a browser test can count what a person sees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from markupsafe import Markup, escape

WIDTH, HEIGHT = 560, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 150, 14, 34
#: Ten distinguishable colours (matplotlib's tab10), the fleet's series in black.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip
#: Series drawn with their names beside the plot; more are drawn but not named.
LEGEND_ROWS = 12


@dataclass(frozen=True)
class Series:
    name: str
    #: (round, value) or (round, value, low, high)
    points: list[tuple[float, ...]]
    fleet: bool = False


@dataclass(frozen=True)
class Chart:
    title: str
    y_label: str
    series: list[Series]
    y_range: tuple[float, float] | None = None

    @property
    def points(self) -> int:
        return sum(len(s.points) for s in self.series)

    def svg(self) -> Markup:
        xs = [p[0] for s in self.series for p in s.points]
        ys = [v for s in self.series for p in s.points for v in p[1:]]
        if not xs:
            return Markup('<p class="empty">no data yet</p>')
        x0, x1 = min(xs), max(max(xs), min(xs) + 1)
        y0, y1 = self.y_range or (min(0.0, min(ys)), max(ys) * 1.05 or 1.0)
        plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

        def px(x: float) -> float:
            return LEFT + (x - x0) / (x1 - x0) * plot_w

        def py(y: float) -> float:
            return TOP + (1 - (y - y0) / ((y1 - y0) or 1.0)) * plot_h

        out = [
            f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
            f'aria-label="{escape(self.title)}" data-points="{self.points}">',
            f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" class="frame"/>',
        ]
        for tick in _ticks(y0, y1):
            out.append(
                f'<text x="{LEFT - 6}" y="{py(tick) + 4:.1f}" class="tick" '
                f'text-anchor="end">{tick:.3g}</text>'
            )
        for tick in range(int(x0), int(x1) + 1):
            out.append(
                f'<text x="{px(tick):.1f}" y="{HEIGHT - BOTTOM + 16}" class="tick" '
                f'text-anchor="middle">{tick}</text>'
            )
        out.append(
            f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 4}" class="axis" '
            'text-anchor="middle">round (0 = starting adapter)</text>'
        )
        out.append(
            f'<text x="12" y="{TOP + plot_h / 2}" class="axis" text-anchor="middle" '
            f'transform="rotate(-90 12 {TOP + plot_h / 2})">{escape(self.y_label)}</text>'
        )
        for index, series in enumerate(self.series):
            color = "#000" if series.fleet else PALETTE[index % len(PALETTE)]
            out.append(_series(series, color, px, py))
            if index < LEGEND_ROWS:
                y = TOP + 8 + index * 16
                out.append(
                    f'<circle cx="{WIDTH - RIGHT + 14}" cy="{y}" r="4" fill="{color}"/>'
                    f'<text x="{WIDTH - RIGHT + 24}" y="{y + 4}" class="legend">'
                    f"{escape(series.name)}</text>"
                )
        out.append("</svg>")
        return Markup("".join(out))


def _series(
    series: Series, color: str, px: Callable[[float], float], py: Callable[[float], float]
) -> str:
    name = escape(series.name)
    dash = ' stroke-dasharray="5 3"' if series.fleet else ""
    width = 2.2 if series.fleet else 1.2
    path = " ".join(f"{px(p[0]):.1f},{py(p[1]):.1f}" for p in series.points)
    parts = [
        f'<g class="series" data-series="{name}">',
        f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="{width}"{dash}/>',
    ]
    for point in series.points:
        x, y = px(point[0]), py(point[1])
        if len(point) == 4:
            low, high = py(point[2]), py(point[3])
            parts.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{low:.1f}" y2="{high:.1f}" '
                f'stroke="{color}" class="interval"/>'
            )
        values = ", ".join(f"{v:.4g}" for v in point[1:])
        parts.append(
            f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}" '
            f'data-round="{point[0]:g}"><title>{name}, round {point[0]:g}: {values}'
            "</title></circle>"
        )
    parts.append("</g>")
    return "".join(parts)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    step = (high - low) / (count - 1) if high > low else 1.0
    return [low + i * step for i in range(count)]
