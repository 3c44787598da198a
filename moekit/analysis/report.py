"""The routing report: one self-contained ``report.html`` (PNG plots embedded as base64 data URIs,
inline CSS, no script, no CDN: it opens offline) plus the same PNGs and a ``metrics.json`` beside
it, and a plain-text summary for the terminal."""

from __future__ import annotations

import base64
import json
import math
import os
from pathlib import Path
from typing import Any

import jinja2
from matplotlib.colors import to_rgb

from moekit.analysis import plots
from moekit.analysis.analyze import Analysis
from moekit.analysis.specialization import CATEGORIES

SECTIONS = (
    ("summary", "Summary"),
    ("layers", "Per-layer metrics"),
    ("load", "Expert load"),
    ("coselection", "Co-selection of the top-k experts"),
    ("consecutive", "Consecutive tokens"),
    ("sample", "Text coloured by first-choice expert"),
    ("specialization", "Per-expert tokens"),
    ("categories", "Token category x expert"),
    ("training", "Training curves"),
)

_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>moekit routing report</title>
<style>
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1150px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .5em;
text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}
img{max-width:100%;height:auto;border:1px solid #eee}
.sample{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.8em;white-space:pre-wrap;
line-height:1.5;border:1px solid #ddd;padding:.6em;max-height:28em;overflow:auto}
.legend span{display:inline-block;padding:0 .5em;margin:.1em;font-family:monospace}
.note{color:#555;font-size:.9em}code{background:#f4f4f4;padding:0 .2em}
</style></head><body>
<h1>moekit routing report</h1>
<p class="note">{{ header }}</p>
<nav>{% for id, title in sections %}<a href="#{{ id }}">{{ title }}</a>
{% if not loop.last %} &middot; {% endif %}{% endfor %}</nav>
<h2 id="summary">Summary</h2>
<table>{% for k, v in overall %}<tr><th class="l">{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}</table>
<h2 id="layers">Per-layer metrics</h2>
<table><tr>{% for h in layer_head %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in layer_rows %}<tr>{% for c in row %}<td{% if loop.first %} class="l"{% endif %}>{{ c }}</td>
{% endfor %}</tr>{% endfor %}</table>
<p class="note">load CV = std/mean of routed slots per expert; H = entropy / log E (gate: per token softmax of
the router logits, averaged; load: of the expert-load distribution); eff. = exp(H_load) experts in use.</p>
<img src="{{ img.summary }}" alt="per-layer entropy and balance">
<h2 id="load">Expert load</h2><img src="{{ img.load }}" alt="expert load heatmap">
<h2 id="coselection">Co-selection of the top-k experts</h2>
<p class="note">Fraction of tokens that chose both experts i and j (diagonal left out).</p>
<img src="{{ img.coselection }}" alt="co-selection heatmaps">
<h2 id="consecutive">Consecutive tokens</h2>
<p class="note">As in Mixtral's Table 5: how often token t+1 gets the same first-choice expert as token t, and
how often the two share at least one of their top-k experts. Dashed: uniform random routing
(1/E and 1 - C(E-K,K)/C(E,K)); dotted: two random tokens of this data (same load imbalance).</p>
<img src="{{ img.consecutive }}" alt="consecutive-token rates">
<h2 id="sample">Text coloured by first-choice expert</h2>
<div class="legend">{% for c in legend %}<span style="background:{{ c.bg }}">expert {{ c.e }}</span>
{% endfor %}</div>
{% for s in samples %}<h3>{{ s.label }}</h3><div class="sample">{% for piece, bg, e in s.spans %}<span
style="background:{{ bg }}" title="expert {{ e }}">{{ piece }}</span>{% endfor %}</div>{% endfor %}
<h2 id="specialization">Per-expert tokens</h2>
<p class="note">Most frequent tokens of each expert (share of its slots) and most distinctive ones (lift =
P(expert | token) / P(expert), tokens seen at least 5 times).</p>
{% for s in specialization %}<h3>{{ s.label }}</h3><table><tr><th>expert</th><th class="l">most frequent</th>
<th class="l">most distinctive</th></tr>{% for e in s.experts %}<tr><td>{{ loop.index0 }}</td>
<td class="l">{{ e.frequent }}</td><td class="l">{{ e.distinctive }}</td></tr>{% endfor %}</table>{% endfor %}
<h2 id="categories">Token category x expert</h2>
{% if categories %}<p class="note">Python token categories from the standard library's <code>tokenize</code>,
mapped onto the model's tokens by character offsets. Mutual information between category and first-choice
expert, against the same statistic with the categories shuffled across tokens (mean &plusmn; std of 20).</p>
<table><tr><th class="l">layer</th><th>MI (bits)</th><th>shuffled MI (bits)</th>
<th>H(category) (bits)</th></tr>
{% for row in categories %}<tr>{% for c in row %}<td{% if loop.first %} class="l"{% endif %}>{{ c }}</td>
{% endfor %}</tr>{% endfor %}</table><img src="{{ img.categories }}" alt="category x expert heatmaps">
{% else %}<p class="note">No Python code in the analysed data, so no token categories.</p>{% endif %}
<h2 id="training">Training curves</h2>
{% if img.training %}<img src="{{ img.training }}" alt="training curves">
{% else %}<p class="note">No training metrics: {{ training_note }}</p>{% endif %}
</body></html>
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return "n/a"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, list):
        return ", ".join(map(str, v)) if v else "none"
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _bg(hex_color: str, alpha: float = 0.45) -> str:
    r, g, b = (round(255 * c) for c in to_rgb(hex_color))
    return f"rgba({r},{g},{b},{alpha})"


def _pct(rate: float, base: float) -> str:
    return f"{_fmt(100 * rate)}% (rand {_fmt(100 * base)}%)"


def layer_table(a: Analysis) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-layer metrics table (shared by the HTML and text summaries)."""
    head = ["layer", "load CV", "max/mean", "dead", "dropped", "H_gate", "H_load", "eff.",
            "same 1st", "share any", "MI cat (bits)"]
    rows = []
    for name, m in zip(a.records, a.per_layer):
        mi = a.categories.get(name)
        rows.append([
            a.labels([name])[0], _fmt(m["load_cv"]), _fmt(m["max_mean_load"]), str(len(m["dead_experts"])),
            f"{100 * m['dropped_fraction']:.2f}%", _fmt(m["gate_entropy_norm"]), _fmt(m["load_entropy_norm"]),
            _fmt(m["effective_experts"]), _pct(m["same_first_rate"], m["same_first_baseline"]),
            _pct(m["share_any_rate"], m["share_any_baseline"]),
            f"{mi['mi_bits']:.3f} (shuf {mi['shuffled_mi_bits']:.3f})" if mi else "n/a",
        ])
    return head, rows


def _overall_rows(a: Analysis) -> list[tuple[str, str]]:
    o, i = a.overall, a.info
    top_k = i.get("top_k") or "variable (expert choice)"
    shape = f"{i.get('moe_layers')} / {i.get('num_experts')} / {top_k}"
    rows = [("MoE layers / experts / top-k", shape), ("tokens analysed", _fmt(i.get("tokens", 0)))]
    if "loss" in o:
        rows.append(("loss / perplexity on this data", f"{o['loss']:.4f} / {o['perplexity']:.2f}"))
    for key, label in (
        ("load_cv", "load CV (mean over layers)"), ("max_mean_load", "max/mean load"),
        ("dead_experts", "dead experts (all layers)"), ("dropped_fraction", "dropped fraction"),
        ("gate_entropy_norm", "gate entropy / log E"), ("load_entropy_norm", "load entropy / log E"),
        ("effective_experts", "effective experts"),
    ):
        rows.append((label, _fmt(o[key])))
    rows.append(("same first choice, consecutive", _pct(o["same_first_rate"], o["same_first_baseline"])))
    rows.append(("share >= 1 expert, consecutive", _pct(o["share_any_rate"], o["share_any_baseline"])))
    if "category_mi_bits" in o:
        rows.append(("MI(category; expert) (bits)",
                     f"{o['category_mi_bits']:.3f} (shuffled {o['category_mi_shuffled_bits']:.3f})"))
    return rows


_PLOT_NAMES = {f"{name}.png" for name in
               ("layer_summary", "load", "coselection", "consecutive", "categories", "training")}


def write_report(a: Analysis, out_dir: str | os.PathLike) -> Path:
    """Write ``report.html``, ``plots/*.png`` and ``metrics.json`` into ``out_dir``; returns the HTML path."""
    out = Path(out_dir)
    pdir = out / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    detail = a.detail_layers
    E = a.per_layer[0]["num_experts"]
    colors = plots.expert_colors(E)
    recs = [a.records[n] for n in detail]
    files = {
        "summary": plots.plot_layer_summary(a.per_layer, a.labels(), pdir / "layer_summary.png"),
        "load": plots.plot_load_heatmap([m["load_fraction"] for m in a.per_layer], a.labels(),
                                        pdir / "load.png"),
        "coselection": plots.plot_coselection([r.coselection for r in recs], a.labels(detail),
                                              [r.num_tokens for r in recs], pdir / "coselection.png"),
        "consecutive": plots.plot_consecutive(a.per_layer, a.labels(), pdir / "consecutive.png"),
    }
    if a.categories:
        files["categories"] = plots.plot_category_expert([r.category_expert for r in recs], a.labels(detail),
                                                         CATEGORIES, pdir / "categories.png")
    if a.training_curves:
        training = plots.plot_training_curves(a.training_curves, pdir / "training.png")
        if training is not None:
            files["training"] = training
    for stale in _PLOT_NAMES - {p.name for p in files.values()}:  # an earlier report's, not this one's
        (pdir / stale).unlink(missing_ok=True)
    img = {k: _data_uri(p) for k, p in files.items()}
    img.setdefault("training", "")
    img.setdefault("categories", "")
    samples = []
    for n in detail:
        firsts = a.records[n].sample_first
        spans = [("\u2396" if piece is None else piece, _bg(colors[e]) if e >= 0 else "#fff", e)
                 for piece, e in zip(a.sample_pieces, firsts)]
        samples.append({"label": a.labels([n])[0] + f" ({n})", "spans": spans})
    specialization = [
        {"label": a.labels([n])[0],
         "experts": [{"frequent": "  ".join(f"{t} ({100 * s:.1f}%)" for t, s in e["frequent"]),
                      "distinctive": "  ".join(f"{t} (x{lift:.1f})" for t, lift in e["distinctive"])}
                     for e in a.specialization[n]]}
        for n in detail
    ]
    cat_rows = [[a.labels([n])[0], f"{c['mi_bits']:.4f}", f"{c['shuffled_mi_bits']:.4f} ± "
                 f"{c['shuffled_mi_std']:.4f}", f"{c['category_entropy_bits']:.3f}"]
                for n, c in a.categories.items()]
    head, rows = layer_table(a)
    i = a.info
    step = f" (step {i['step']})" if i.get("step") is not None else ""
    header = (f"source: {i.get('source', 'model')}{step} · data: {i.get('data', 'given windows')} · "
              f"{i.get('tokens', 0):,} tokens in windows of {i.get('seq_len')} · "
              f"{i.get('python_documents', 0)} of {i.get('documents', 0)} documents parse as Python")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    html = env.from_string(_TEMPLATE).render(
        header=header, sections=SECTIONS,
        overall=_overall_rows(a), layer_head=head, layer_rows=rows, img=img, samples=samples,
        legend=[{"e": e, "bg": _bg(c)} for e, c in enumerate(colors)], specialization=specialization,
        categories=cat_rows, training_note="this is not a moekit run, or its metrics.jsonl is empty",
    )
    _write_text(out / "report.html", html)
    _write_text(out / "metrics.json", json.dumps(_strict_json(
        {"overall": a.overall, "per_layer": a.per_layer, "categories": a.categories, "info": a.info,
         "counts": {n: _counts(r) for n, r in a.records.items()}, "specialization": a.specialization}),
        indent=1, default=str, allow_nan=False))
    return out / "report.html"


def _counts(rec: Any) -> dict[str, Any]:
    """The raw tallies behind one layer's statistics and heatmaps (all but the token x expert table)."""
    pairs, same_first, share_any = rec.consecutive
    return {
        "choice": rec.choice_counts, "kept": rec.kept_counts, "first": rec.first_counts,
        "coselection": rec.coselection,
        "consecutive": {"pairs": pairs, "same_first": same_first, "share_any": share_any},
        "category_expert": dict(zip(CATEGORIES, rec.category_expert)),
    }


def _strict_json(o: Any) -> Any:
    """``o`` with NumPy values as Python ones and NaN / inf (an undefined statistic) as ``null``, so
    the file is strict JSON (JavaScript's ``JSON.parse`` reads it)."""
    if isinstance(o, dict):
        return {k: _strict_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_strict_json(v) for v in o]
    if hasattr(o, "tolist"):
        return _strict_json(o.tolist())
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def text_summary(a: Analysis) -> str:
    """A short plain-text summary for the terminal: the overall numbers and one line per layer."""
    lines = ["routing summary", "==============="]
    width = max(len(k) for k, _ in _overall_rows(a))
    lines += [f"{k:<{width}}  {v}" for k, v in _overall_rows(a)]
    head, rows = layer_table(a)
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(head)]
    lines.append("")
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)
