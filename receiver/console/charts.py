"""Server-side SVG charts for the console: no JavaScript, no CDN, readable offline.

A stacked bar chart is a few dozen rectangles; drawing them here is less code
than vendoring a chart library, and the page reads the same without scripts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

#: Colour-blind-safe palette (Okabe-Ito), one per series in order.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000")
UNKNOWN_COLOUR = "#999999"


@dataclass(frozen=True)
class Series:
    """One stacked series: a value per category (None: nothing to draw there)."""

    name: str
    values: Sequence[float | None]


def stacked_bars(
    categories: Sequence[str],
    series: Sequence[Series],
    *,
    unknown: Sequence[int] = (),
    unit: str = "$",
    title: str = "",
    width: int = 960,
    height: int = 320,
) -> str:
    """An SVG of ``series`` stacked per category, and beneath the axis a lane of ``unknown``
    counts (tasks whose value is unknown: counted, never drawn as 0)."""
    left, right, top, bottom = 70, 170, 20, 70
    plot_w, plot_h = width - left - right, height - top - bottom
    totals = [sum(v or 0.0 for v in (s.values[i] for s in series)) for i in range(len(categories))]
    peak = max(totals, default=0.0) or 1.0
    step = plot_w / max(len(categories), 1)
    bar = max(step * 0.7, 1.0)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}"'
        f' role="img" aria-label="{escape(title)}" class="chart">',
        f"<title>{escape(title)}</title>",
    ]
    for tick in range(5):
        value = peak * tick / 4
        y = top + plot_h - plot_h * tick / 4
        out.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{unit}{value:,.4g}</text>'
        )
    for i, category in enumerate(categories):
        x = left + i * step + (step - bar) / 2
        base = float(top + plot_h)
        for n, s in enumerate(series):
            known = s.values[i]
            if not known:
                continue
            value = known
            h = plot_h * value / peak
            base -= h
            colour = PALETTE[n % len(PALETTE)]
            out.append(
                f'<rect x="{x:.1f}" y="{base:.1f}" width="{bar:.1f}" height="{h:.1f}"'
                f' fill="{colour}" data-series="{escape(s.name)}">'
                f"<title>{escape(category)} {escape(s.name)}: {unit}{value:,.4f}</title></rect>"
            )
        if i < len(unknown) and unknown[i]:
            out.append(
                f'<rect x="{x:.1f}" y="{top + plot_h + 22}" width="{bar:.1f}" height="12"'
                f' fill="{UNKNOWN_COLOUR}" data-series="unknown cost">'
                f"<title>{escape(category)}: {unknown[i]} task(s) of unknown cost</title></rect>"
                f'<text x="{x + bar / 2:.1f}" y="{top + plot_h + 46}" text-anchor="middle"'
                f' class="small">{unknown[i]}</text>'
            )
        if len(categories) <= 16 or i % max(len(categories) // 8, 1) == 0:
            out.append(
                f'<text x="{x + bar / 2:.1f}" y="{top + plot_h + 16}" text-anchor="middle"'
                f' class="small">{escape(category[5:] if len(category) == 10 else category)}</text>'
            )
    out.append(
        f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}"'
        ' class="axis"/>'
    )
    legend = [(s.name, PALETTE[n % len(PALETTE)]) for n, s in enumerate(series)]
    legend.append(("unknown cost (tasks)", UNKNOWN_COLOUR))
    for n, (name, colour) in enumerate(legend):
        y = top + n * 18
        out.append(
            f'<rect x="{left + plot_w + 16}" y="{y}" width="12" height="12" fill="{colour}"/>'
            f'<text x="{left + plot_w + 34}" y="{y + 10}">{escape(name)}</text>'
        )
    out.append("</svg>")
    return "".join(out)
