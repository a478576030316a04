"""The studies' figures, drawn with matplotlib (Agg backend, no display) as PNG and SVG.

Each function takes plain numbers (and :class:`~selfscale.study.tables.Stats`), writes
``STEM.png`` and ``STEM.svg`` and returns the PNG's path. Output is reproducible: no dates in the
files, a fixed SVG hash salt.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from selfscale.study.tables import Stats

DPI = 120
STYLE = {"svg.hashsalt": "selfscale", "font.size": 9, "axes.grid": True, "grid.alpha": 0.3,
         "axes.spines.top": False, "axes.spines.right": False}
MARKERS = "osD^vP*Xh<>"


def _save(fig, stem: Path) -> Path:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, svg = stem.with_suffix(".png"), stem.with_suffix(".svg")
    fig.savefig(png, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(svg, bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return png


def threshold_panels(series: dict[str, Sequence[tuple[float, Stats, Stats]]], stem: Path, *,
                     title: str) -> Path:
    """Fig 4.2's manner: left the score drop (1 − final/base), right the masks removed, both
    against the threshold; one line per strategy (``series``: strategy → [(threshold, drop,
    removed)]), error bars ± one standard deviation, a small horizontal offset per strategy so
    the bars do not hide each other."""
    with plt.rc_context(STYLE):
        fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.8))
        thresholds = sorted({t for points in series.values() for t, _, _ in points})
        step = min((b - a for a, b in itertools.pairwise(thresholds)), default=0.05)
        spread = 0.25 * step
        n = max(len(series), 1)
        for i, (name, points) in enumerate(series.items()):
            points = sorted(points, key=lambda p: p[0])
            dx = (i - (n - 1) / 2) * spread / max(n - 1, 1)
            xs = [t + dx for t, _, _ in points]
            style = {"marker": MARKERS[i % len(MARKERS)], "capsize": 3, "ms": 4, "lw": 1.3,
                     "label": name}
            left.errorbar(xs, [d.mean for _, d, _ in points], yerr=[d.std for _, d, _ in points],
                          **style)
            right.errorbar(xs, [r.mean for _, _, r in points],
                           yerr=[r.std for _, _, r in points], **style)
        for ax, label in ((left, "score drop (1 − final/base)"), (right, "masks removed")):
            ax.set_xlabel("threshold")
            ax.set_ylabel(label)
            ax.set_xticks(thresholds, [f"{t:.2f}" for t in thresholds])
        left.axhline(0, color="0.4", lw=0.8)
        right.yaxis.get_major_locator().set_params(integer=True)
        right.legend(title="strategy", fontsize=8, loc="best")
        fig.suptitle(title)
        fig.tight_layout()
        return _save(fig, stem)


def grid_panels(configs: Sequence[tuple[tuple[int, ...], Stats, int]],
                minimizer: Sequence[tuple[float, tuple[int, ...], float, int]],
                heat: tuple[list[list[float]], int] | None, stem: Path, *, title: str) -> Path:
    """Grid search against the minimizer. ``configs``: (widths, score/full stats, MACs per pixel)
    of every configuration; ``minimizer``: (threshold, widths, mean final/full score, MACs) per
    threshold; ``heat``: the (w1, w2, 1) grid's mean score/full as rows w1 = 1..N, columns
    w2 = 1..N, and N (None: no such panel)."""
    with plt.rc_context(STYLE):
        panels = 2 if heat is not None else 1
        fig, axes = plt.subplots(1, panels, figsize=(4.8 * panels, 4.0), squeeze=False)
        ax = axes[0][0]
        xs = [macs for _, _, macs in configs]
        ax.errorbar(xs, [s.mean for _, s, _ in configs], yerr=[s.std for _, s, _ in configs],
                    fmt="o", ms=4, capsize=2, color="0.35", label="grid: trained from scratch")
        for widths, s, macs in configs:
            if not math.isnan(s.mean):
                ax.annotate("/".join(map(str, widths)), (macs, s.mean), fontsize=6,
                            xytext=(3, 2), textcoords="offset points", color="0.35")
        cmap = plt.get_cmap("viridis")
        for i, (threshold, widths, score, macs) in enumerate(minimizer):
            ax.plot([macs], [score], marker="*", ms=11, ls="none",
                    color=cmap(i / max(len(minimizer) - 1, 1)),
                    label=f"minimizer, threshold {threshold:.2f}: {'/'.join(map(str, widths))}")
        ax.set_xlabel("MACs per pixel")
        ax.set_ylabel("score / full network's score")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2,
                  frameon=False)
        if heat is not None:
            grid, n = heat
            hx = axes[0][1]
            image = hx.imshow(grid, origin="lower", cmap="viridis", vmin=0,
                              vmax=max(1.0, max((v for row in grid for v in row
                                                 if not math.isnan(v)), default=1.0)))
            for r in range(n):
                for c in range(n):
                    if not math.isnan(grid[r][c]):
                        hx.text(c, r, f"{grid[r][c]:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if grid[r][c] < 0.6 else "black")
            hx.set_xticks(range(n), [str(w) for w in range(1, n + 1)])
            hx.set_yticks(range(n), [str(w) for w in range(1, n + 1)])
            hx.set_xlabel("w2 (second layer)")
            hx.set_ylabel("w1 (first layer)")
            hx.set_title("(w1, w2, 1): mean score / full", fontsize=9)
            hx.grid(False)
            fig.colorbar(image, ax=hx, shrink=0.8)
        fig.suptitle(title)
        fig.tight_layout()
        return _save(fig, stem)


def drop_gain_panels(points: Sequence[tuple[int, int, int, float, float, float]],
                     layers: Sequence[int], stem: Path, *, title: str) -> Path:
    """Fig 4.1: drop against gain per mask. ``points``: (seed, layer, mask, drop, gain, best)
    per mask. First panel every layer (colour per layer), then one panel per layer; in each,
    every choice as a dot and the best choice per network (the mask with the highest *best* of
    its seed among the panel's masks) as a star."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 1 + len(layers), figsize=(3.6 * (1 + len(layers)), 3.5),
                                 squeeze=False, sharex=True, sharey=True)
        colours = plt.get_cmap("tab10")
        for ax, shown in zip(axes[0], [tuple(layers)] + [(layer,) for layer in layers]):
            pts = [p for p in points if p[1] in shown]
            for i, layer in enumerate(layers):
                mine = [p for p in pts if p[1] == layer]
                if mine:
                    ax.plot([p[3] for p in mine], [p[4] for p in mine], "o", ms=4, alpha=0.6,
                            color=colours(i), label=f"layer {layer}")
            best: dict[int, tuple] = {}
            for p in pts:
                if not math.isnan(p[5]) and (p[0] not in best or p[5] > best[p[0]][5]):
                    best[p[0]] = p
            if best:
                ax.plot([p[3] for p in best.values()], [p[4] for p in best.values()], "*",
                        ms=11, color="black", mfc="gold", label="best choice per network")
            ax.axhline(0, color="0.4", lw=0.8)
            ax.axvline(0, color="0.4", lw=0.8)
            ax.set_title("all layers" if len(shown) > 1 else f"layer {shown[0]}", fontsize=9)
            ax.set_xlabel("drop (1 − rel. score after disabling)")
        axes[0][0].set_ylabel("gain (best − rel. score after disabling)")
        axes[0][0].legend(fontsize=7, loc="best")
        fig.suptitle(title)
        fig.tight_layout()
        return _save(fig, stem)
