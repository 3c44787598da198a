"""Matplotlib figures of recorded routing, written as PNG files (Agg canvas, no display needed).

Each function takes plain arrays / dicts (nothing model specific), writes one PNG atomically and
returns its path. Figures are built on ``matplotlib.figure.Figure`` directly, not ``pyplot``, so no
global state or GUI backend is involved.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 110


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    FigureCanvasAgg(fig)
    fig.savefig(tmp, format="png", dpi=DPI)  # constrained layout already fits the labels
    os.replace(tmp, path)
    return path


def expert_colors(num_experts: int) -> list[str]:
    """One distinct hex colour per expert (tab10 up to 10 experts, tab20 / hsv beyond)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    if num_experts <= 10:
        cmap, n = colormaps["tab10"], 10
    elif num_experts <= 20:
        cmap, n = colormaps["tab20"], 20
    else:
        cmap, n = colormaps["hsv"], num_experts
    return [to_hex(cmap(i / n if n > 20 else i)) for i in range(num_experts)]


def _heatmap(ax: Any, data: np.ndarray, *, cmap: str = "viridis", vmin: float | None = None,
             vmax: float | None = None, annotate: bool = False) -> Any:
    im = ax.imshow(data, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    if annotate and data.size <= 200:
        hi = np.nanmax(data) if np.isfinite(data).any() else 1.0
        for (i, j), v in np.ndenumerate(data):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 * hi else "white")
    return im


def _expert_ticks(ax: Any, num_experts: int, axis: str = "x", most: int = 16) -> None:
    """One tick per expert up to ``most`` experts; beyond, at most ~``most / 2`` integer ticks (one
    label per expert would collide)."""
    target = ax.xaxis if axis == "x" else ax.yaxis
    if num_experts <= most:
        target.set_ticks(range(num_experts))
    else:
        target.set_major_locator(MaxNLocator(nbins=most // 2, integer=True))


def plot_load_heatmap(fractions_LE: Any, layer_labels: Sequence[str], path: str | os.PathLike) -> Path:
    """Heatmap of the fraction of routed slots per expert (columns) for each layer (rows)."""
    data = np.asarray(fractions_LE, dtype=np.float64)
    L, E = data.shape
    fig = Figure(figsize=(min(16.0, max(4.5, 0.55 * E + 2)), max(2.2, 0.35 * L + 1.2)), layout="constrained")
    ax = fig.add_subplot()
    im = _heatmap(ax, data, vmin=0.0, annotate=E <= 16 and L <= 16)
    _expert_ticks(ax, E, most=32)
    ax.set_yticks(range(L), labels=list(layer_labels))
    ax.set_xlabel("expert")
    ax.set_title(f"Expert load (fraction of routed slots; uniform = {1 / E:.3f})")
    fig.colorbar(im, ax=ax, fraction=0.04)
    return _save(fig, path)


def _grid(n: int, panel: float = 3.2) -> tuple[Figure, list[Any]]:
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(panel * cols + 0.8, panel * rows + 0.4), layout="constrained")
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n)]


def plot_coselection(matrices: Sequence[Any], layer_labels: Sequence[str], tokens: Sequence[int],
                     path: str | os.PathLike) -> Path:
    """Co-selection heatmaps: fraction of tokens that chose both experts ``i != j`` (diagonal blanked)."""
    fig, axes = _grid(len(matrices))
    for ax, m, label, n in zip(axes, matrices, layer_labels, tokens):
        data = np.asarray(m, dtype=np.float64) / max(n, 1)
        np.fill_diagonal(data, np.nan)
        im = _heatmap(ax, data, cmap="magma", vmin=0.0)
        _expert_ticks(ax, data.shape[0], "x")
        _expert_ticks(ax, data.shape[0], "y")
        ax.set_title(f"{label}: P(i and j chosen)", fontsize=9)
        ax.set_xlabel("expert j", fontsize=8)
        ax.set_ylabel("expert i", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_consecutive(per_layer: Sequence[dict[str, Any]], layer_labels: Sequence[str],
                     path: str | os.PathLike) -> Path:
    """Per layer: rate at which consecutive tokens keep the first-choice expert / share an expert,
    against the uniform random baselines (dashed) and the random-pair baselines (dotted)."""
    L = len(per_layer)
    x = np.arange(L)
    fig = Figure(figsize=(max(5.0, 0.6 * L + 3), 3.6), layout="constrained")
    ax = fig.add_subplot()
    w = 0.38
    same = [m["same_first_rate"] for m in per_layer]
    share = [m["share_any_rate"] for m in per_layer]
    ax.bar(x - w / 2, same, w, label="same first choice", color="#1f77b4")
    ax.bar(x + w / 2, share, w, label="share >= 1 expert", color="#ff7f0e")
    for key, off, color, style, lab in (
        ("same_first_baseline", -w / 2, "#0b3c5d", "--", "uniform random"),
        ("share_any_baseline", w / 2, "#7a3b00", "--", None),
        ("same_first_pair_baseline", -w / 2, "#0b3c5d", ":", "random pair (same load)"),
        ("share_any_pair_baseline", w / 2, "#7a3b00", ":", None),
    ):
        for i, m in enumerate(per_layer):
            v = m.get(key, float("nan"))
            if np.isfinite(v):
                ax.hlines(v, x[i] + off - w / 2, x[i] + off + w / 2, colors=color, linestyles=style,
                          label=lab if i == 0 else None)
    ax.set_xticks(x, labels=list(layer_labels))
    ax.set_ylim(0, 1)
    ax.set_ylabel("rate over consecutive tokens")
    ax.set_title("Consecutive tokens routed alike (Mixtral Table 5)")
    ax.legend(fontsize=7, loc="upper right", ncols=2)
    return _save(fig, path)


def plot_layer_summary(per_layer: Sequence[dict[str, Any]], layer_labels: Sequence[str],
                       path: str | os.PathLike) -> Path:
    """Per layer: normalised gate entropy, normalised load entropy and load CV."""
    x = np.arange(len(per_layer))
    fig = Figure(figsize=(max(5.0, 0.6 * len(per_layer) + 3), 3.2), layout="constrained")
    ax = fig.add_subplot()
    for key, label, marker in (("gate_entropy_norm", "gate entropy / log E", "o"),
                               ("load_entropy_norm", "load entropy / log E", "s"),
                               ("load_cv", "load CV", "^")):
        ax.plot(x, [m[key] for m in per_layer], marker=marker, label=label)
    ax.set_xticks(x, labels=list(layer_labels))
    ax.set_ylim(bottom=0)
    ax.set_title("Gating sparsity and balance per layer")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_category_expert(tables: Sequence[Any], layer_labels: Sequence[str], categories: Sequence[str],
                         path: str | os.PathLike) -> Path:
    """Heatmaps of P(first-choice expert | token category) for each layer (rows normalised)."""
    fig, axes = _grid(len(tables), panel=3.6)
    for ax, t, label in zip(axes, tables, layer_labels):
        t = np.asarray(t, dtype=np.float64)
        keep = t.sum(axis=1) > 0
        rows = t[keep] / t[keep].sum(axis=1, keepdims=True)
        im = _heatmap(ax, rows, cmap="viridis", vmin=0.0)
        ax.set_yticks(range(int(keep.sum())), labels=[c for c, k in zip(categories, keep) if k], fontsize=8)
        _expert_ticks(ax, t.shape[1])
        ax.set_xlabel("expert", fontsize=8)
        ax.set_title(f"{label}: P(expert | category)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


_CURVE_GROUPS = (
    ("loss", lambda k: "loss" in k and "aux" not in k and "z_loss" not in k),
    ("auxiliary loss", lambda k: "aux" in k or "z_loss" in k or "balanc" in k),
    ("load balance", lambda k: "cv" in k or "load" in k or "dead" in k or "drop" in k),
)


def curve_keys(rows: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Numeric keys of metrics.jsonl rows grouped as loss / auxiliary loss / load balance."""
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in keys and k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.append(k)
    groups: dict[str, list[str]] = {}
    for k in keys:
        for title, match in _CURVE_GROUPS:
            if match(k.lower()):
                groups.setdefault(title, []).append(k)
                break
    return groups


def plot_training_curves(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """Training curves from ``metrics.jsonl`` rows (``step`` on x); None if nothing to plot."""
    groups = curve_keys(rows)
    if not groups:
        return None
    fig = Figure(figsize=(4.2 * len(groups) + 0.5, 3.2), layout="constrained")
    for i, (title, keys) in enumerate(groups.items()):
        ax = fig.add_subplot(1, len(groups), i + 1)
        for k in keys:
            pts = [(r.get("step", j), r[k]) for j, r in enumerate(rows)
                   if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=k, marker="." if len(pts) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)
