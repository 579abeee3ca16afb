"""Heatmap figures: interactive plotly, plus a static SVG copy for viewers that run no JavaScript.

A notebook saved with plotly output shows nothing on GitHub (its renderer drops scripts), and
plotly's own static export needs kaleido. :class:`Figure` is a plotly figure whose notebook output
also carries ``image/svg+xml``, drawn here from the heatmap's own numbers; ``fig.to_svg()`` gives
the same SVG for files.
"""

from __future__ import annotations

import html
import math

import plotly.graph_objects as go

CELL, LEFT, TOP, BAR = 36, 80, 40, 16


def _rgb(color: str) -> tuple[float, ...]:
    color = color.strip()
    if color.startswith("#"):
        return tuple(int(color[k : k + 2], 16) for k in (1, 3, 5))
    return tuple(float(x) for x in color[color.index("(") + 1 : color.index(")")].split(",")[:3])


def _color(scale, t: float) -> str:
    """The colour at t in [0, 1] of a plotly colorscale ((fraction, colour) pairs), interpolated."""
    if not math.isfinite(t):
        return "#dddddd"
    t = min(max(t, 0.0), 1.0)
    for (f0, c0), (f1, c1) in zip(scale, scale[1:]):
        if t <= f1:
            w = 0.0 if f1 == f0 else (t - f0) / (f1 - f0)
            return "#" + "".join(f"{round(x + (y - x) * w):02x}" for x, y in zip(_rgb(c0), _rgb(c1)))
    return "#" + "".join(f"{round(x):02x}" for x in _rgb(scale[-1][1]))


def heatmap_svg(fig: go.Figure) -> str:
    """The figure's first heatmap trace as a standalone SVG: cells, axis ticks, title, value range."""
    trace = next(t for t in fig.data if t.type == "heatmap")
    rows = [list(r) for r in trace.z]
    n_rows, n_cols = len(rows), max((len(r) for r in rows), default=0)
    xs = list(trace.x) if trace.x is not None else list(range(n_cols))
    ys = list(trace.y) if trace.y is not None else list(range(n_rows))
    values = [float(v) for r in rows for v in r if v is not None and math.isfinite(float(v))]
    lo = trace.zmin if trace.zmin is not None else min(values, default=0.0)
    hi = trace.zmax if trace.zmax is not None else max(values, default=1.0)
    span = (hi - lo) or 1.0
    stops = [(float(f), c) for f, c in (trace.colorscale or go.Heatmap(z=[[0]]).colorscale)]
    width, height = LEFT + n_cols * CELL + 90, TOP + n_rows * CELL + 50
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11">']
    title = fig.layout.title.text or ""
    out.append(f'<text x="{LEFT}" y="20" font-size="13">{html.escape(str(title))}</text>')
    for i, row in enumerate(rows):
        y = TOP + i * CELL
        out.append(f'<text x="{LEFT - 6}" y="{y + CELL / 2 + 4}" text-anchor="end">{html.escape(str(ys[i]))}</text>')
        for j, v in enumerate(row):
            v = float("nan") if v is None else float(v)
            out.append(f'<rect x="{LEFT + j * CELL}" y="{y}" width="{CELL}" height="{CELL}" '
                       f'fill="{_color(stops, (v - lo) / span)}"><title>{html.escape(str(ys[i]))}, '
                       f'{html.escape(str(xs[j]))}: {v:.4g}</title></rect>')
    for j, x in enumerate(xs[:n_cols]):
        out.append(f'<text x="{LEFT + j * CELL + CELL / 2}" y="{TOP + n_rows * CELL + 14}" '
                   f'text-anchor="middle">{html.escape(str(x))}</text>')
    axis = fig.layout.xaxis.title.text or ""
    out.append(f'<text x="{LEFT + n_cols * CELL / 2}" y="{TOP + n_rows * CELL + 32}" '
               f'text-anchor="middle">{html.escape(str(axis))}</text>')
    bar_x = LEFT + n_cols * CELL + 20
    for k in range(10):  # the colour bar, high at the top
        out.append(f'<rect x="{bar_x}" y="{TOP + k * n_rows * CELL / 10}" width="{BAR}" '
                   f'height="{n_rows * CELL / 10 + 0.5}" fill="{_color(stops, 1 - (k + 0.5) / 10)}"/>')
    out.append(f'<text x="{bar_x + BAR + 4}" y="{TOP + 10}">{hi:.3g}</text>')
    out.append(f'<text x="{bar_x + BAR + 4}" y="{TOP + n_rows * CELL}">{lo:.3g}</text>')
    out.append("</svg>")
    return "\n".join(out)


class Figure(go.Figure):
    """A plotly figure whose notebook output also holds a static SVG (shown where JavaScript is not)."""

    def _repr_mimebundle_(self, include=None, exclude=None, validate=True, **kwargs):
        bundle = super()._repr_mimebundle_(include, exclude, validate, **kwargs)
        bundle["image/svg+xml"] = heatmap_svg(self)
        return bundle

    def _ipython_display_(self):  # plotly displays through this hook, not _repr_mimebundle_
        from IPython.display import display  # optional: only inside a notebook, where IPython is there

        display(self._repr_mimebundle_(), raw=True)

    def to_svg(self) -> str:
        return heatmap_svg(self)
