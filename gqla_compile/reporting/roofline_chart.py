"""The roofline chart of the HTML report: the target's roof (bandwidth slope, peak, ridge) and each path's
operating points, drawn as inline SVG on log-log axes."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any

from ..paths import PATHS
from ..units import si

#: Point colours, by the path's place in ``paths.PATHS``; a path not in it gets ``_OTHER_COLOUR``.
_PALETTE = ("#cf222e", "#1a7f37", "#9a6700", "#0550ae")
_OTHER_COLOUR = "#6639ba"


def path_colour(name: str) -> str:
    order = list(PATHS)
    index = order.index(name) if name in order else len(_PALETTE)
    return _PALETTE[index] if index < len(_PALETTE) else _OTHER_COLOUR


@dataclass(frozen=True)
class _Axes:
    """Log-log axes: the data ranges and the plot rectangle they map onto."""

    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float
    left: int = 80
    top: int = 30
    width: int = 620  # the plot area, without the margins
    height: int = 350

    def x(self, value: float) -> float:
        lo, hi = math.log10(self.x_lo), math.log10(self.x_hi)
        return self.left + self.width * (math.log10(value) - lo) / (hi - lo)

    def y(self, value: float) -> float:
        lo, hi = math.log10(self.y_lo), math.log10(self.y_hi)
        return self.top + self.height * (1 - (math.log10(value) - lo) / (hi - lo))


def _operating_points(plan: dict[str, Any]) -> list[tuple[str, str, float, float]]:
    """(path, "core" or "total", arithmetic intensity, achieved FLOP/s) for every path with non-zero figures."""
    points = []
    for name, p in plan["paths"].items():
        for kind, figures in (("core", p["core"]), ("total", {"flops": p["flops"], "bytes": p["bytes"],
                                                              "time_s": p["layer_time_s"]})):
            if figures["bytes"] and figures["flops"] and figures["time_s"]:
                points.append((name, kind, figures["flops"] / figures["bytes"], figures["flops"] / figures["time_s"]))
    return points


def _axes(target: dict[str, Any], points: list, width: int, height: int) -> _Axes:
    intensities = [target["ridge"]] + [p[2] for p in points]
    x_lo = 10 ** math.floor(math.log10(min(intensities) / 2))
    return _Axes(x_lo=x_lo, x_hi=10 ** math.ceil(math.log10(max(intensities) * 4)),
                 y_lo=10 ** math.floor(math.log10(min([x_lo * target["memory_bandwidth"]] + [p[3] for p in points]) / 2)),
                 y_hi=10 ** math.ceil(math.log10(target["peak_flops"] * 1.5)), width=width - 100, height=height - 90)


def _grid(a: _Axes) -> list[str]:
    parts = []
    bottom = a.top + a.height
    for e in range(round(math.log10(a.x_lo)), round(math.log10(a.x_hi)) + 1):
        x = a.x(10 ** e)
        parts.append(f'<line x1="{x:.1f}" y1="{a.top}" x2="{x:.1f}" y2="{bottom}" stroke="#e3e8ef"/>')
        parts.append(f'<text x="{x:.1f}" y="{bottom + 16}" font-size="11" text-anchor="middle">1e{e}</text>')
    for e in range(round(math.log10(a.y_lo)), round(math.log10(a.y_hi)) + 1):
        y = a.y(10 ** e)
        parts.append(f'<line x1="{a.left}" y1="{y:.1f}" x2="{a.left + a.width}" y2="{y:.1f}" stroke="#e3e8ef"/>')
        parts.append(f'<text x="{a.left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">1e{e}</text>')
    return parts


def _roof(a: _Axes, target: dict[str, Any]) -> list[str]:
    peak, bandwidth, ridge = target["peak_flops"], target["memory_bandwidth"], target["ridge"]
    x0 = max(a.x_lo, a.y_lo / bandwidth)
    roof = [(x0, x0 * bandwidth), (ridge, peak), (a.x_hi, peak)]
    return [
        '<polyline class="roof" fill="none" stroke="#0969da" stroke-width="2.5" points="'
        + " ".join(f"{a.x(x):.1f},{a.y(y):.1f}" for x, y in roof) + '"/>',
        f'<line x1="{a.x(ridge):.1f}" y1="{a.y(peak):.1f}" x2="{a.x(ridge):.1f}" y2="{a.top + a.height}" '
        'stroke="#0969da" stroke-dasharray="4 3"/>',
        f'<text x="{a.x(ridge) + 4:.1f}" y="{a.top + a.height - 6}" font-size="11" fill="#0969da">'
        f'ridge {ridge:.1f} FLOP/B</text>',
        f'<text x="{a.x(a.x_hi) - 6:.1f}" y="{a.y(peak) - 6:.1f}" font-size="11" text-anchor="end" '
        f'fill="#0969da">peak {si(peak, "FLOP/s")}</text>',
        f'<text x="{a.x(x0) + 6:.1f}" y="{a.y(x0 * bandwidth) - 8:.1f}" font-size="11" fill="#0969da">'
        f'{si(bandwidth, "B/s")}</text>',
    ]


def _points(a: _Axes, points: list, chosen_path: str) -> list[str]:
    parts = []
    for index, (name, kind, ai, achieved) in enumerate(points):
        x, y = a.x(ai), a.y(achieved)
        colour = path_colour(name)
        chosen = " (chosen)" if name == chosen_path else ""
        shape = (f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{colour}"/>' if kind == "core" else
                 f'<rect x="{x - 5:.1f}" y="{y - 5:.1f}" width="10" height="10" fill="none" stroke="{colour}" '
                 'stroke-width="2"/>')
        parts.append(f'<g class="point" data-path="{name}" data-kind="{kind}">{shape}'
                     f'<text x="{x + 9:.1f}" y="{y + (12 if index % 2 else -8):.1f}" font-size="12" fill="{colour}">'
                     f'{html.escape(name)} {kind}{chosen}</text></g>')
    return parts


def roofline_svg(data: dict, width: int = 720, height: int = 440) -> str:
    """Log-log roofline of the target (bandwidth slope, peak line, ridge) with every path's operating points."""
    target = data["target"]
    points = _operating_points(data["plan"])
    a = _axes(target, points, width, height)
    middle = a.top + a.height / 2
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" id="roofline" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="roofline chart">',
             f'<rect x="{a.left}" y="{a.top}" width="{a.width}" height="{a.height}" fill="#fbfcfe" stroke="#8c959f"/>',
             *_grid(a), *_roof(a, target), *_points(a, points, data["path"]),
             f'<text x="{a.left + a.width / 2:.0f}" y="{height - 18}" font-size="13" text-anchor="middle">'
             'arithmetic intensity (FLOP/B)</text>',
             f'<text x="18" y="{middle:.0f}" font-size="13" text-anchor="middle" '
             f'transform="rotate(-90 18 {middle:.0f})">attainable FLOP/s</text>',
             f'<text x="{a.left}" y="18" font-size="13" font-weight="600">roofline of {html.escape(target["name"])} '
             f'({html.escape(target["dtype"])}): circles attention core, squares whole step per layer</text>',
             "</svg>"]
    return "\n".join(parts)
