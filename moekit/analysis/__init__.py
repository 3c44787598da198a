"""Routing analysis: record what the router of every ``moekit.MoE`` layer does, measure it, report it.

* :class:`RoutingRecorder` - forward hooks folding each call's routing into bounded aggregates;
* :mod:`moekit.analysis.metrics` - load balance, entropies, co-selection, consecutive-token rates;
* :mod:`moekit.analysis.specialization` - Python token categories, per-expert tokens, mutual information;
* :func:`run_analysis` - ``moekit analyze``: model + text -> ``report.html`` and a terminal summary.
"""

from moekit.analysis.analyze import Analysis, analyze_model, load_model, run_analysis
from moekit.analysis.data import TokenWindows, encode_windows
from moekit.analysis.recorder import LayerRecord, RoutingRecorder, find_moe_layers
from moekit.analysis.report import text_summary, write_report

__all__ = [
    "Analysis", "LayerRecord", "RoutingRecorder", "TokenWindows", "analyze_model", "encode_windows",
    "find_moe_layers", "load_model", "run_analysis", "text_summary", "write_report",
]
