"""``moekit analyze``: load a model, run it over text with a :class:`RoutingRecorder`, compute the
metrics and specialisation statistics, and write the report.

:func:`analyze_model` works on any ``nn.Module`` with ``moekit.MoE`` layers and a tokenizer;
:func:`run_analysis` adds the loading (a moekit run directory or a Hugging Face checkpoint), the
default data (the run's validation split) and the report files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn
from tqdm.auto import tqdm

from moekit.analysis.data import TokenWindows, encode_windows
from moekit.analysis.metrics import layer_metrics, overall_metrics
from moekit.analysis.recorder import LayerRecord, RoutingRecorder, layer_index, layer_label
from moekit.analysis.specialization import (
    category_entropy,
    mutual_information,
    shuffled_mutual_information,
    top_tokens,
)


@dataclass
class Analysis:
    """Everything the report shows (all plain data; ``records`` keeps the raw aggregates).

    Attributes:
        records: ``{module name: LayerRecord}`` of every MoE layer, in model order.
        per_layer / overall: :func:`metrics.layer_metrics` dicts and their pooled summary.
        detail_layers: module names shown in detail (co-selection, text sample, categories).
        sample_pieces: text of the first tokens, for the coloured sample (None: a separator).
        specialization: ``{module name: top_tokens(...)}`` for the detail layers.
        categories: ``{module name: {"mi_bits", "shuffled_mi_bits", "shuffled_mi_std",
            "category_entropy_bits"}}``, empty when the data holds no Python code.
        training_curves: rows of the run's ``metrics.jsonl`` (empty for a checkpoint).
        info: source, data, model facts for the header.
    """

    records: dict[str, LayerRecord]
    per_layer: list[dict[str, Any]]
    overall: dict[str, Any]
    detail_layers: list[str]
    sample_pieces: list[str | None] = field(default_factory=list)
    specialization: dict[str, list[dict[str, list[tuple[str, float]]]]] = field(default_factory=dict)
    categories: dict[str, dict[str, float]] = field(default_factory=dict)
    training_curves: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def labels(self, names: Sequence[str] | None = None) -> list[str]:
        """Short plot labels (``L3``) of ``names`` (default: every recorded layer)."""
        return [layer_label(n) for n in (self.records if names is None else names)]


def show_token(text: str) -> str:
    """A token's text made visible: spaces as ``␣``, line breaks / tabs escaped."""
    for raw, shown in (("\\", "\\\\"), ("\n", "\\n"), ("\t", "\\t"), ("\r", "\\r"), (" ", "␣")):
        text = text.replace(raw, shown)
    return text


def _default_detail(names: list[str]) -> list[str]:
    picks = [names[0], names[len(names) // 2], names[-1]] if names else []
    return list(dict.fromkeys(picks))


def analyze_model(
    model: nn.Module,
    tokenizer: Tokenizer,
    windows: TokenWindows,
    *,
    layers: Sequence[int | str] | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    top_k_tokens: int = 10,
    sample_tokens: int = 512,
    show_progress: bool = False,
) -> Analysis:
    """Run ``model`` over ``windows`` and compute the full :class:`Analysis`.

    Args:
        model: module whose ``forward(ids (B, S))`` runs its ``moekit.MoE`` layers.
        tokenizer: decodes token ids for the per-expert token tables.
        windows: from :func:`data.encode_windows`.
        layers: decoder layer indices / module names shown in detail (default: first, middle, last).
        show_progress: a progress bar over the windows (tqdm, on stderr).
    Raises:
        ValueError: the model has no MoE layer, or ``layers`` names a layer that is not one.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    recorder = RoutingRecorder(model, sample_tokens=sample_tokens)
    names = [n for n, _ in recorder.layers]
    if layers is None:
        detail = _default_detail(names)
    else:
        detail = [n for n, _ in RoutingRecorder(model, layers).layers]
    was_training = model.training
    model.eval()
    nll = count = 0.0
    try:
        num_windows = windows.ids_NS.shape[0]
        bar = tqdm(total=num_windows, disable=not show_progress, unit="window", dynamic_ncols=True,
                   desc="analyze", leave=False)
        with torch.inference_mode(), recorder, bar:
            for start in range(0, num_windows, batch_size):
                ids = torch.from_numpy(windows.ids_NS[start:start + batch_size])
                recorder.set_inputs(ids, windows.categories_NS[start:start + batch_size])
                out = model(ids.to(device))
                logits = getattr(out, "logits", None)
                if isinstance(logits, torch.Tensor) and logits.dim() == 3 and ids.shape[1] > 1:
                    target = ids[:, 1:].to(logits.device)
                    nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(),
                                                 reduction="sum"))
                    count += target.numel()
                bar.update(ids.shape[0])
    finally:
        model.train(was_training)
    missing = [n for n in names if n not in recorder.records]
    if missing:
        raise ValueError(f"MoE layers {missing} were not called by model.forward; nothing recorded for them")
    records = {n: recorder.records[n] for n in names}
    per_layer = [layer_metrics(records[n]) for n in names]

    def decode(i: int) -> str:
        return show_token(tokenizer.decode([i], skip_special_tokens=False))

    analysis = Analysis(records, per_layer, overall_metrics(per_layer), detail,
                        sample_pieces=list(windows.sample_pieces))
    for n in detail:
        analysis.specialization[n] = top_tokens(records[n].token_expert, decode, k=top_k_tokens,
                                                token_counts_V=records[n].token_counts)
    if windows.python_documents:
        for n in names:
            table = records[n].category_expert
            mean, std = shuffled_mutual_information(table)
            analysis.categories[n] = {
                "mi_bits": mutual_information(table), "shuffled_mi_bits": mean, "shuffled_mi_std": std,
                "category_entropy_bits": category_entropy(table),
            }
        mis = [c["mi_bits"] for c in analysis.categories.values()]
        analysis.overall["category_mi_bits"] = float(np.mean(mis))
        analysis.overall["category_mi_shuffled_bits"] = float(
            np.mean([c["shuffled_mi_bits"] for c in analysis.categories.values()]))
    if count:
        analysis.overall["loss"] = nll / count
        analysis.overall["perplexity"] = math.exp(min(nll / count, 50.0))
    analysis.info.update(tokens=windows.num_tokens, seq_len=int(windows.ids_NS.shape[1]),
                         documents=windows.documents, python_documents=windows.python_documents,
                         moe_layers=len(names), num_experts=per_layer[0]["num_experts"],
                         # None: a variable number of experts per token (expert_choice)
                         top_k=per_layer[0]["top_k"] if records[names[0]].fixed_k else None)
    return analysis


# ----------------------------------------------------------------------------- loading


def load_model(
    path: str | os.PathLike, device: str = "cpu", step: int | None = None, show_progress: bool | None = None
) -> tuple[nn.Module, Tokenizer, dict[str, Any]]:
    """A moekit run directory (``run.json``) or a checkpoint directory (HF ``config.json`` or Mistral
    ``params.json``, loaded by :func:`moekit.from_pretrained` with its ``tokenizer.json``).

    ``step`` picks a run's checkpoint (default: the newest). Returns ``(model, tokenizer, info)``;
    ``info["kind"]`` is ``"run"`` or ``"checkpoint"``. ``show_progress``: a checkpoint's loading bar
    (``None``: when stderr is a terminal).
    """
    p = Path(path)
    if not p.is_dir():
        what = "a file, not a directory" if p.exists() else "no such directory"
        raise ValueError(f"RUN_OR_MODEL {p}: {what} (give a moekit run dir or a HF "
                         "checkpoint dir)")
    if (p / "run.json").is_file():
        from moekit.train import load_run

        model, tokenizer, info = load_run(p, step=step, device=device)
        return model, tokenizer, {**info, "kind": "run", "path": str(p)}
    if (p / "config.json").is_file() or (p / "params.json").is_file():
        if step is not None:
            raise ValueError(f"--step applies to moekit runs; {p} is a checkpoint directory")
        from moekit.hf import from_pretrained, load_tokenizer

        model = from_pretrained(p, device=device, show_progress=show_progress)
        tok = load_tokenizer(p)
        return model, tok.tokenizer, {"kind": "checkpoint", "path": str(p), "eos_token_id": tok.eos_token_id}
    raise ValueError(
        f"{p} is neither a moekit run (run.json) nor a Hugging Face / Mistral checkpoint (config.json / "
        "params.json)"
    )


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of ``metrics.jsonl`` (malformed lines skipped); [] when the file is absent."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():  # a torn tail too
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def load_texts(
    data: str | os.PathLike | None, info: dict[str, Any], max_chars: int, tokenizer: Tokenizer | None = None
) -> tuple[list[str], str]:
    """Texts to analyse and a description: ``data`` (file, directory or .jsonl), else the run's
    validation split: its documents decoded from the run's ``data.safetensors`` (the very tokens
    validation used, wherever the corpus is now; needs the run's ``tokenizer``)."""
    from moekit.train.corpus import load_corpus

    if data is not None:
        p = Path(data)
        if p.is_file() and p.suffix != ".jsonl":
            try:
                text = p.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:  # as moekit train --data
                raise ValueError(f"--data {p}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            if not text.strip():
                raise ValueError(f"--data {p}: the file has no text")
            return [text[:max_chars]], str(p)
        # min_documents=1: a one-file directory or a one-record .jsonl is enough (nothing is split)
        corpus = load_corpus(p, val_fraction=0.5, max_train_chars=max_chars, max_val_chars=max_chars,
                             min_documents=1)
        return [d.text for d in corpus.validation + corpus.train], corpus.source
    if info.get("kind") != "run":
        raise ValueError("a Hugging Face checkpoint has no corpus of its own: pass --data PATH")
    from moekit.train.prepare import load_tokens

    ids = load_tokens(info["path"])["validation"]
    eos = info["model_config"]["eos_token_id"]
    texts, chars = [], 0
    for piece in np.split(ids, np.flatnonzero(ids == eos) + 1):  # one document per piece, eos last
        if chars >= max_chars:
            break
        doc = piece[piece != eos]
        if doc.size:
            texts.append(tokenizer.decode(doc.tolist(), skip_special_tokens=False))
            chars += len(texts[-1])
    return texts, f"{info.get('data', {}).get('source', '?')} (validation split)"


def run_analysis(
    source: str | os.PathLike,
    data: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    max_tokens: int = 16384,
    layers: Sequence[int | str] | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    step: int | None = None,
    log: Callable[[str], None] = print,
    show_progress: bool = False,
) -> tuple[Analysis, Path]:
    """Analyse the routing of ``source`` (run dir or checkpoint) and write the report to ``out_dir``
    (default: ``SOURCE/analysis`` for a run, ``./analysis-<checkpoint name>`` for a checkpoint, whose
    directory may be a read-only cache); ``show_progress``: a progress bar over the model's passes.
    Returns ``(analysis, path of report.html)``."""
    from moekit.analysis.report import text_summary, write_report

    if not isinstance(max_tokens, int) or max_tokens < 2:
        raise ValueError(f"max_tokens must be an int >= 2, got {max_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    model, tokenizer, info = load_model(source, device=device, step=step, show_progress=show_progress)
    if layers is not None:  # a wrong --layers is said before the data is read
        RoutingRecorder(model, layers)
    texts, data_desc = load_texts(data, info, max_chars=max_tokens * 16, tokenizer=tokenizer)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if seq_len is None:
        seq_len = int(info.get("train_config", {}).get("seq_len") or min(context or 512, 512))
    if context is not None and seq_len > context:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context (max_position_embeddings={context})")
    sep = info.get("eos_token_id")
    sep = tokenizer.token_to_id("<|endoftext|>") if sep is None else sep
    # "balanced": long documents are cut to a common length, so the sample spans many files and one
    # huge module (a long string table, say) cannot fill the whole budget
    windows = encode_windows(tokenizer, texts, seq_len, max(max_tokens, seq_len), separator_id=sep,
                             max_doc_tokens="balanced")
    log(f"analyzing {windows.num_tokens:,} tokens ({windows.ids_NS.shape[0]} windows of {seq_len}) "
        f"from {data_desc}")
    analysis = analyze_model(model, tokenizer, windows, layers=layers, batch_size=batch_size, device=device,
                             show_progress=show_progress)
    analysis.info.update(source=str(source), data=data_desc, kind=info["kind"], step=info.get("step"))
    if info["kind"] == "run":
        analysis.training_curves = read_metrics(source)
    if out_dir is None:
        name = Path(source).resolve().name
        out_dir = Path(source) / "analysis" if info["kind"] == "run" else Path(f"analysis-{name}")
    out = Path(out_dir)
    report = write_report(analysis, out)
    log(text_summary(analysis))
    log(f"report: {report}")
    return analysis, report


def layer_arg(values: Sequence[str] | None) -> list[int | str] | None:
    """``--layers`` strings -> ints where numeric (decoder layer indices), else module names."""
    if not values:
        return None
    return [int(v) if v.lstrip("-").isdigit() else v for v in values]


__all__ = ["Analysis", "analyze_model", "layer_arg", "layer_index", "load_model", "load_texts",
           "read_metrics", "run_analysis", "show_token"]
