"""Bar charts as inline SVG, so the pack's HTML page needs nothing from the network.

Two charts: the month's daily volume (settled amounts per business date, entries that pay the
merchant above the axis, those that take back below) and the per-merchant totals (settled,
fees, net). Bar lengths are scaled in integers; labels carry the exact figures in fen, so a
reader never has to trust a bar's length.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

COLOURS = ("#2f6f9f", "#c8553d", "#588157")
BAR_AREA = 220
LEFT = 56
FONT = 'font-family="sans-serif" font-size="11"'


@dataclass(frozen=True)
class Series:
    name: str
    values: list[int]


def _legend(series: list[Series], y: int) -> str:
    parts = []
    for index, item in enumerate(series):
        x = LEFT + index * 170
        colour = COLOURS[index % len(COLOURS)]
        parts.append(
            f'<rect x="{x}" y="{y}" width="12" height="12" fill="{colour}"/>'
            f'<text x="{x + 16}" y="{y + 10}" {FONT}>{escape(item.name)}</text>'
        )
    return "".join(parts)


def daily_chart(title: str, labels: list[str], above: Series, below: Series) -> str:
    """Vertical bars per day: `above` up from the axis, `below` (absolute values) down."""
    slot = 22
    width = LEFT + slot * max(len(labels), 1) + 20
    top = 30
    half = BAR_AREA // 2
    axis = top + half
    largest = max([1, *above.values, *below.values])
    parts = [
        f'<svg viewBox="0 0 {width} {top + BAR_AREA + 60}" width="{width}" '
        f'height="{top + BAR_AREA + 60}" role="img" aria-label="{escape(title)}">',
        f'<text x="{LEFT}" y="16" {FONT} font-weight="bold">{escape(title)}</text>',
        f'<line x1="{LEFT}" y1="{axis}" x2="{width - 10}" y2="{axis}" stroke="#333"/>',
        f'<text x="4" y="{top + 10}" {FONT}>{largest}</text>',
        f'<text x="4" y="{axis + 4}" {FONT}>0</text>',
    ]
    for index, label in enumerate(labels):
        x = LEFT + index * slot + 3
        up = above.values[index] * half // largest
        down = below.values[index] * half // largest
        parts.append(
            f'<rect x="{x}" y="{axis - up}" width="{slot - 6}" height="{up}" fill="{COLOURS[0]}">'
            f"<title>{escape(label)}: {above.values[index]} fen</title></rect>"
            f'<rect x="{x}" y="{axis}" width="{slot - 6}" height="{down}" fill="{COLOURS[1]}">'
            f"<title>{escape(label)}: {-below.values[index]} fen</title></rect>"
            f'<text x="{x}" y="{top + BAR_AREA + 14}" {FONT}>{escape(label[-2:])}</text>'
        )
    parts.append(_legend([above, below], top + BAR_AREA + 28))
    parts.append("</svg>")
    return "".join(parts)


def merchant_chart(title: str, labels: list[str], series: list[Series]) -> str:
    """Horizontal grouped bars, one group per merchant (values below zero drawn as zero)."""
    row = 14 * len(series) + 10
    label_width = 130
    bar_width = 420
    height = 40 + row * max(len(labels), 1) + 30
    width = label_width + bar_width + 140
    largest = max([1, *(value for item in series for value in item.values)])
    parts = [
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}">',
        f'<text x="4" y="16" {FONT} font-weight="bold">{escape(title)}</text>',
    ]
    for index, label in enumerate(labels):
        y = 30 + index * row
        parts.append(f'<text x="4" y="{y + 11}" {FONT}>{escape(label)}</text>')
        for number, item in enumerate(series):
            value = item.values[index]
            length = max(value, 0) * bar_width // largest
            bar_y = y + number * 14
            parts.append(
                f'<rect x="{label_width}" y="{bar_y}" width="{length}" height="12" '
                f'fill="{COLOURS[number % len(COLOURS)]}"><title>{escape(label)} '
                f"{escape(item.name)}: {value} fen</title></rect>"
                f'<text x="{label_width + length + 4}" y="{bar_y + 10}" {FONT}>{value}</text>'
            )
    parts.append(_legend(series, height - 20))
    parts.append("</svg>")
    return "".join(parts)
