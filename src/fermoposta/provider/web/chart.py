"""A small SVG line chart, drawn on the server (no JavaScript).

Contract: `line_chart(series, now, span)` draws one line per named series
of (Unix time, value) points over the `span` seconds before `now`, with a
legend and the maximum on the y axis, as an SVG element (`markupsafe.Markup`
built only from numbers and escaped names, so it is safe to put in a page
as is).  No data: a short text instead of an empty frame.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from markupsafe import Markup, escape

WIDTH, HEIGHT, LEFT, BOTTOM, TOP, RIGHT = 640, 180, 40, 20, 10, 160
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf",
           "#7f7f7f")


def line_chart(series: Mapping[str, Sequence[tuple[float, int]]], now: float,
               span: float = 86400.0, *, title: str = "held messages, last 24 h") -> Markup:
    points = {name: [(t, v) for t, v in pts if now - span <= t <= now]
              for name, pts in series.items()}
    points = {name: pts for name, pts in points.items() if pts}
    if not points:
        return Markup('<p class="muted">No samples yet.</p>')
    top = max(1, max(v for pts in points.values() for _, v in pts))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(t: float) -> float:
        return LEFT + (t - (now - span)) / span * plot_w

    def y(v: int) -> float:
        return TOP + plot_h - v / top * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" class="chart" '
             f'width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}">',
             f"<title>{escape(title)}</title>",
             f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" '
             'fill="none" stroke="#ccc"/>',
             f'<text x="{LEFT - 4}" y="{TOP + 10}" text-anchor="end" font-size="11">{top}</text>',
             f'<text x="{LEFT - 4}" y="{TOP + plot_h}" text-anchor="end" font-size="11">0</text>',
             f'<text x="{LEFT}" y="{HEIGHT - 4}" font-size="11">-24 h</text>',
             f'<text x="{LEFT + plot_w}" y="{HEIGHT - 4}" text-anchor="end" '
             'font-size="11">now</text>']
    for i, (name, pts) in enumerate(sorted(points.items())):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                     f'points="{coords}"/>')
        if len(pts) == 1:
            t, v = pts[0]
            parts.append(f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}"/>')
        legend_y = TOP + 12 + 14 * i
        parts.append(f'<rect x="{LEFT + plot_w + 10}" y="{legend_y - 9}" width="10" '
                     f'height="10" fill="{colour}"/>')
        parts.append(f'<text x="{LEFT + plot_w + 24}" y="{legend_y}" font-size="11">'
                     f"{escape(name)} ({pts[-1][1]})</text>")
    parts.append("</svg>")
    return Markup("".join(parts))
