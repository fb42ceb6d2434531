"""A plot of a search's scores as a standalone SVG file, drawn without a plotting library.

One point per evaluation (its score), and the best score so far as a step line. Failed
evaluations (no score) are left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from xml.sax.saxutils import escape

_WIDTH, _HEIGHT = 640, 360
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 32, 40


def scores_svg(scores: Sequence[float | None], *, higher_is_better: bool, title: str) -> str:
    """The SVG document: score per evaluation (dots and a line) and the best so far."""
    finite = [(i, s) for i, s in enumerate(scores) if s is not None and math.isfinite(s)]
    plot_w, plot_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" '
        f'viewBox="0 0 {_WIDTH} {_HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{_WIDTH}" height="{_HEIGHT}" fill="white"/>',
        f'<text x="{_LEFT}" y="20" font-size="14">{escape(title)}</text>',
        f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#888"/>',
    ]
    if finite:
        low = min(s for _, s in finite)
        high = max(s for _, s in finite)
        span = (high - low) or 1.0
        count = max(1, len(scores) - 1)

        def x(index: int) -> float:
            return _LEFT + plot_w * index / count

        def y(score: float) -> float:
            return _TOP + plot_h * (1 - (score - low) / span)

        points = " ".join(f"{x(i):.1f},{y(s):.1f}" for i, s in finite)
        parts.append(f'<polyline points="{points}" fill="none" stroke="#9ab" stroke-width="1"/>')
        parts += [f'<circle cx="{x(i):.1f}" cy="{y(s):.1f}" r="3" fill="#369"/>' for i, s in finite]
        best: list[str] = []
        current: float | None = None
        for i, s in finite:
            better = current is None or (s > current if higher_is_better else s < current)
            if better and current is not None:
                best.append(f"{x(i):.1f},{y(current):.1f}")  # a step: across, then down
            current = s if better or current is None else current
            best.append(f"{x(i):.1f},{y(current):.1f}")
        parts.append(
            f'<polyline points="{" ".join(best)}" fill="none" stroke="#c33" stroke-width="2"/>'
        )
        parts += [
            f'<text x="{_LEFT - 6}" y="{y(high) + 4:.1f}" text-anchor="end">{high:.4g}</text>',
            f'<text x="{_LEFT - 6}" y="{y(low) + 4:.1f}" text-anchor="end">{low:.4g}</text>',
        ]
    parts += [
        f'<text x="{_LEFT}" y="{_HEIGHT - 22}">1</text>',
        f'<text x="{_WIDTH - _RIGHT}" y="{_HEIGHT - 22}" text-anchor="end">{len(scores)}</text>',
        f'<text x="{_LEFT + plot_w / 2:.0f}" y="{_HEIGHT - 8}" text-anchor="middle">'
        "evaluation (dots: score, red: best so far)</text>",
        "</svg>",
    ]
    return "\n".join(parts) + "\n"
