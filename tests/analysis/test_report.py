"""The report on a toy model: every section present, the HTML parses, every image decodes, offline."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import pytest

from moekit.analysis import analyze_model, encode_windows, text_summary, write_report
from moekit.analysis.analyze import show_token
from moekit.analysis.report import SECTIONS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.images.append(a.get("src", ""))
        for key in ("href", "src"):
            if key in a and tag != "img":
                self.links.append(a[key])

    def handle_data(self, data):
        self.text.append(data)


def check_report(path: Path) -> _Collect:
    """Parse ``report.html``; assert sections, decodable images, and nothing fetched from outside."""
    html = path.read_text(encoding="utf-8")
    parser = _Collect()
    parser.feed(html)
    parser.close()
    assert parser.ids == [sid for sid, _ in SECTIONS]
    assert parser.images, "no image in the report"
    for src in parser.images:
        if src.startswith("data:"):
            head, _, payload = src.partition(",")
            assert head == "data:image/png;base64"
            raw = base64.b64decode(payload, validate=True)
        else:  # an image written beside the report
            raw = (path.parent / src).read_bytes()
        assert raw.startswith(PNG_MAGIC)
        img = matplotlib.image.imread(io.BytesIO(raw), format="png")
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert all(link.startswith("#") for link in parser.links), parser.links
    assert "<script" not in html and "http://" not in html and "https://" not in html
    return parser


@pytest.fixture
def toy_analysis(make_toy, bpe, python_source):
    text = python_source * 6
    tok = bpe([text], vocab=300)
    model = make_toy(vocab=tok.get_vocab_size())
    prose = "Plain words; it's not code (at all\n" * 20
    sep = tok.token_to_id("<|endoftext|>")
    windows = encode_windows(tok, [text, prose], seq_len=24, max_tokens=2000, separator_id=sep)
    return analyze_model(model, tok, windows, batch_size=4), tok, windows


def test_report_has_every_section_and_decodable_images(toy_analysis, tmp_path):
    analysis, _, windows = toy_analysis
    analysis.training_curves = [
        {"step": s, "split": "train", "loss": 5.0 - 0.1 * s, "aux_loss": 0.02, "load_cv": 0.3 + 0.01 * s,
         "load_cv_per_layer": [0.3, 0.4]} for s in range(1, 11)
    ] + [{"step": 10, "split": "validation", "val_loss": 4.2}]
    path = write_report(analysis, tmp_path / "rep")
    parser = check_report(path)
    assert len(parser.images) == 6  # summary, load, co-selection, consecutive, categories, training
    text = "".join(parser.text)
    for label in ("L0", "L2"):
        assert label in text
    assert "expert 7" in text  # legend of the coloured sample
    assert "No Python code" not in text and "No training metrics" not in text
    for png in ("load", "coselection", "consecutive", "categories", "training", "layer_summary"):
        assert (tmp_path / "rep" / "plots" / f"{png}.png").read_bytes().startswith(PNG_MAGIC)
    saved = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert len(saved["per_layer"]) == 2 and set(saved["categories"]) == {"layers.0.mlp", "layers.2.mlp"}
    assert saved["overall"]["tokens"] == windows.num_tokens


def test_metrics_json_is_strict_json_with_undefined_values_as_null(toy_analysis, tmp_path):
    import copy

    analysis = copy.copy(toy_analysis[0])  # the fixture stays as it is
    analysis.per_layer = [{**analysis.per_layer[0], "gate_entropy_norm": float("nan")},  # as at E=1
                          *analysis.per_layer[1:]]
    write_report(analysis, tmp_path / "rep")

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    saved = json.loads((tmp_path / "rep" / "metrics.json").read_text(), parse_constant=refuse)
    assert saved["per_layer"][0]["gate_entropy_norm"] is None
    for name, rec in analysis.records.items():  # the tallies behind the heatmaps are there too
        counts = saved["counts"][name]
        assert counts["coselection"] == rec.coselection.tolist()
        assert counts["choice"] == rec.choice_counts.tolist()
        assert list(counts["category_expert"].values()) == rec.category_expert.tolist()
    assert sorted(saved["specialization"]) == analysis.detail_layers


def test_analysis_numbers_are_consistent(toy_analysis):
    analysis, _, windows = toy_analysis
    assert analysis.detail_layers == ["layers.0.mlp", "layers.2.mlp"]
    assert analysis.info["python_documents"] == 1 and analysis.info["documents"] == 2
    for m in analysis.per_layer:
        assert m["tokens"] == windows.num_tokens
        assert sum(m["load_fraction"]) == pytest.approx(1.0)
        assert 0 <= m["gate_entropy_norm"] <= 1 and 0 <= m["load_entropy_norm"] <= 1
        assert m["consecutive_pairs"] == windows.ids_NS.shape[0] * (windows.ids_NS.shape[1] - 1)
        assert m["share_any_baseline"] == pytest.approx(1 - 15 / 28)
    for c in analysis.categories.values():
        assert 0 <= c["mi_bits"] <= c["category_entropy_bits"] + 1e-9
    rec = analysis.records["layers.0.mlp"]
    # categories are only counted for the Python document's tokens
    assert 0 < rec.category_expert.sum() < windows.num_tokens
    assert rec.category_expert.sum() == (windows.categories_NS >= 0).sum()
    assert "loss" not in analysis.overall  # the toy returns hidden states, no logits


def test_report_without_python_or_training_says_so(make_toy, bpe, tmp_path):
    prose = "Plain words; it's not code (at all\n" * 30
    tok = bpe([prose], vocab=280)
    windows = encode_windows(tok, [prose], seq_len=16, max_tokens=400)
    analysis = analyze_model(make_toy(vocab=tok.get_vocab_size()), tok, windows, layers=[2])
    assert analysis.detail_layers == ["layers.2.mlp"] and not analysis.categories
    (tmp_path / "plots").mkdir()  # an earlier report's plots this one has not, beside a user's file
    for name in ("categories.png", "training.png", "mine.png"):
        (tmp_path / "plots" / name).write_bytes(PNG_MAGIC)
    parser = check_report(write_report(analysis, tmp_path))
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "consecutive.png", "coselection.png", "layer_summary.png", "load.png", "mine.png"]
    text = "".join(parser.text)
    assert "No Python code" in text and "No training metrics" in text
    summary = text_summary(analysis)
    assert "routing summary" in summary and "L0" in summary and "L2" in summary


def test_report_header_of_expert_choice_says_variable_experts_per_token(make_toy, bpe, tmp_path):
    text = "def f(x):\n    return x + 1\n" * 20
    tok = bpe([text], vocab=280)
    windows = encode_windows(tok, [text], seq_len=16, max_tokens=200)
    model = make_toy(vocab=tok.get_vocab_size(), num_experts=4, router="expert_choice", capacity_factor=1.0)
    analysis = analyze_model(model, tok, windows)
    assert analysis.info["top_k"] is None  # 4 slots per token in the tensors, not 4 experts each
    page = "".join(check_report(write_report(analysis, tmp_path)).text)
    assert "variable (expert choice)" in page


def test_text_summary_lists_layers_and_baselines(toy_analysis):
    summary = text_summary(toy_analysis[0])
    assert "46.43%" in summary and "12.5%" in summary
    assert summary.count("\nL") == 2


def test_show_token_makes_blanks_visible():
    assert show_token(" self\n\t") == "␣self\\n\\t"



def test_plots_of_many_experts_keep_their_tick_labels_apart(tmp_path, monkeypatch):
    """64 experts get a few integer ticks, not 64 colliding labels; 8 experts get one tick each."""
    import numpy as np

    from moekit.analysis import plots

    figures = {}

    def keep(fig, path):
        figures[Path(path).stem] = fig
        return Path(path)

    monkeypatch.setattr(plots, "_save", keep)
    rng = np.random.default_rng(0)
    plots.plot_load_heatmap(rng.random((2, 64)), ["L0", "L1"], tmp_path / "load.png")
    plots.plot_category_expert([rng.random((3, 64))], ["L0"], ["a", "b", "c"], tmp_path / "cat.png")
    plots.plot_coselection([rng.random((64, 64))], ["L0"], [10], tmp_path / "co.png")
    plots.plot_load_heatmap(rng.random((2, 8)), ["L0", "L1"], tmp_path / "load8.png")

    def expert_ticks(name):
        ax = figures[name].axes[0]  # the heatmap; the colorbar comes after it
        return [t for t in ax.get_xticks() if 0 <= t < 64]

    for name in ("load", "cat", "co"):
        assert 2 <= len(expert_ticks(name)) <= 17, (name, expert_ticks(name))
    assert expert_ticks("load8") == list(range(8))
