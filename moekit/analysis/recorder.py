"""Record routing of every ``moekit.MoE`` layer of a model while it runs, with bounded memory.

``RoutingRecorder(model)`` registers a forward hook on each ``moekit.MoE`` submodule; each call's
``MoEOutput.routing`` (a :class:`moekit.core.types.RoutingInfo`) is folded into a per-layer
:class:`LayerRecord` of streaming aggregates, so memory does not grow with the corpus:

* per-expert counts (router choices, slots kept after capacity drops, first choices),
* the ``(E, E)`` co-selection matrix, the sum of gate entropies,
* consecutive-token counts (Mixtral Table 5) over each sequence of the batch,
* ``(E, V)`` token x expert counts and ``(C, E)`` category x first-choice counts when the caller
  passes the batch's token ids / token categories with :meth:`RoutingRecorder.set_inputs`,
* the first choices of the first ``sample_tokens`` tokens (for the coloured text), and a
  reservoir sample of per-token choices (the load-aware "random pair" baseline).

Usage::

    with RoutingRecorder(model) as rec:
        for ids_BS in batches:
            rec.set_inputs(ids_BS)
            model(ids_BS)
    records = rec.records  # {"model.layers.0.mlp": LayerRecord, ...}
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from moekit.analysis.metrics import consecutive_counts, coselection, first_choice
from moekit.analysis.specialization import CATEGORIES
from moekit.core.types import RoutingInfo

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """Decoder layer index parsed from a module name (``model.layers.3.mlp`` -> 3), else None."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def layer_label(name: str) -> str:
    """Short label for plots: ``L3`` for ``model.layers.3.mlp``, else the module name."""
    i = layer_index(name)
    return f"L{i}" if i is not None else (name or "moe")


@dataclass
class LayerRecord:
    """Streaming aggregates of one MoE layer's routing (see the module docstring).

    Attributes:
        name: module name in the model.
        num_experts / top_k: ``E`` and the slots per token ``K`` of the routing tensors.
        fixed_k: True while every token had exactly ``K`` valid slots (token choice).
        choice_counts ``(E,)``: routed slots per expert (router decisions, before capacity drops).
        kept_counts ``(E,)``: slots each expert processed (``RoutingInfo.tokens_per_expert``).
        first_counts ``(E,)``: tokens whose first choice was the expert.
        coselection ``(E, E)``: tokens choosing both experts; diagonal = tokens choosing each.
        consecutive: ``(pairs, same_first, share_any)`` counts over neighbouring tokens.
        token_expert ``(E, V)`` int32: how often each token id was routed to each expert (any slot).
        token_counts ``(V,)``: how often each token id occurred (once per occurrence, not per slot).
        category_expert ``(C, E)``: token category (``specialization.CATEGORIES``) x first choice.
        sample_first: first choices of the first ``sample_tokens`` tokens seen.
    """

    name: str
    num_experts: int
    top_k: int
    sample_tokens: int = 512
    reservoir_size: int = 2048
    seed: int = 0
    fixed_k: bool = True
    num_tokens: int = 0
    num_slots: int = 0
    num_dropped: int = 0
    entropy_sum: float = 0.0
    consecutive: tuple[int, int, int] = (0, 0, 0)
    choice_counts: np.ndarray = field(init=False)
    kept_counts: np.ndarray = field(init=False)
    first_counts: np.ndarray = field(init=False)
    coselection: np.ndarray = field(init=False)
    token_expert: np.ndarray = field(init=False)
    token_counts: np.ndarray = field(init=False)
    category_expert: np.ndarray = field(init=False)
    sample_first: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        E = self.num_experts
        self.choice_counts = np.zeros(E, dtype=np.int64)
        self.kept_counts = np.zeros(E, dtype=np.int64)
        self.first_counts = np.zeros(E, dtype=np.int64)
        self.coselection = np.zeros((E, E), dtype=np.int64)
        self.token_expert = np.zeros((E, 0), dtype=np.int32)  # E x V: int32 halves the largest table
        self.token_counts = np.zeros(0, dtype=np.int64)
        self.category_expert = np.zeros((len(CATEGORIES), E), dtype=np.int64)
        self._res_ids = np.full((self.reservoir_size, self.top_k), -1, dtype=np.int64)
        self._res_first = np.full(self.reservoir_size, -1, dtype=np.int64)
        self._rng = np.random.default_rng(self.seed)

    def update(
        self,
        ids_TK: np.ndarray,
        weights_TK: np.ndarray,
        entropy_T: np.ndarray,
        kept_E: np.ndarray,
        dropped: int,
        shape_BS: tuple[int, int],
        token_ids_T: np.ndarray | None = None,
        categories_T: np.ndarray | None = None,
    ) -> None:
        """Fold one call's routing of ``T = B * S`` tokens (row-major over ``shape_BS``) in."""
        E, T = self.num_experts, ids_TK.shape[0]
        if ids_TK.shape[1] != self.top_k:
            raise ValueError(f"layer {self.name}: K changed from {self.top_k} to {ids_TK.shape[1]}")
        valid = ids_TK >= 0
        self.fixed_k = self.fixed_k and bool(valid.all())
        first_T = first_choice(ids_TK, weights_TK)
        self.num_tokens += T
        self.num_slots += int(valid.sum())
        self.num_dropped += int(dropped)
        self.entropy_sum += float(entropy_T.sum())
        self.choice_counts += np.bincount(ids_TK[valid], minlength=E)
        self.kept_counts += kept_E.astype(np.int64)
        self.first_counts += np.bincount(first_T[first_T >= 0], minlength=E)
        self.coselection += coselection(ids_TK, E)
        B, S = shape_BS
        pairs = consecutive_counts(ids_TK.reshape(B, S, ids_TK.shape[1]), first_T.reshape(B, S), E)
        self.consecutive = tuple(a + b for a, b in zip(self.consecutive, pairs))  # type: ignore[assignment]
        if token_ids_T is not None:
            self._add_tokens(ids_TK, token_ids_T)
        if categories_T is not None:
            ok = (categories_T >= 0) & (first_T >= 0)
            np.add.at(self.category_expert, (categories_T[ok], first_T[ok]), 1)
        room = self.sample_tokens - len(self.sample_first)
        if room > 0:
            self.sample_first.extend(int(e) for e in first_T[:room])
        self._reservoir_add(ids_TK, first_T)

    def _add_tokens(self, ids_TK: np.ndarray, token_ids_T: np.ndarray) -> None:
        token_ids_T = token_ids_T.astype(np.int64)
        tok = np.broadcast_to(token_ids_T[:, None], ids_TK.shape)[ids_TK >= 0]
        exp = ids_TK[ids_TK >= 0]
        if token_ids_T.size == 0:
            return
        if token_ids_T.min() < 0:
            raise ValueError(f"token ids must be >= 0, got {int(token_ids_T.min())}")
        V = self.token_expert.shape[1]
        need = int(token_ids_T.max()) + 1
        if need > V:  # grow geometrically; the table is bounded by E x vocabulary size
            grown = np.zeros((self.num_experts, max(need, 2 * V)), dtype=np.int32)
            grown[:, :V] = self.token_expert
            self.token_expert = grown
            self.token_counts = np.concatenate([self.token_counts, np.zeros(grown.shape[1] - V, np.int64)])
        V = self.token_expert.shape[1]
        self.token_counts += np.bincount(token_ids_T, minlength=V)
        counts = np.bincount(exp * V + tok, minlength=self.num_experts * V).reshape(-1, V)
        self.token_expert += counts.astype(np.int32)

    def _reservoir_add(self, ids_TK: np.ndarray, first_T: np.ndarray) -> None:
        """Algorithm R over tokens: a uniform sample of ``reservoir_size`` tokens of the stream."""
        R, seen = self.reservoir_size, self.num_tokens - ids_TK.shape[0]
        idx = np.arange(seen, seen + ids_TK.shape[0])
        fill = idx < R
        self._res_ids[idx[fill]] = ids_TK[fill]
        self._res_first[idx[fill]] = first_T[fill]
        rest = np.flatnonzero(~fill)
        if rest.size:
            j = self._rng.integers(0, idx[rest] + 1)
            for t, slot in zip(rest[j < R], j[j < R]):  # in stream order, so later tokens win
                self._res_ids[slot] = ids_TK[t]
                self._res_first[slot] = first_T[t]

    def reservoir(self) -> tuple[np.ndarray, np.ndarray]:
        """The reservoir sample ``(ids (N, K), first (N,))`` with ``N = min(tokens, reservoir_size)``."""
        n = min(self.num_tokens, self.reservoir_size)
        return self._res_ids[:n].copy(), self._res_first[:n].copy()


def _moe_class() -> type:
    import moekit

    return moekit.MoE


def find_moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every ``moekit.MoE`` submodule of ``model`` (``model`` itself included)."""
    cls = _moe_class()
    return [(name, m) for name, m in model.named_modules() if isinstance(m, cls)]


def _select(
    layers: list[tuple[str, nn.Module]], wanted: Iterable[int | str] | None
) -> list[tuple[str, nn.Module]]:
    if wanted is None:
        return layers
    wanted = list(wanted)
    chosen = [(n, m) for n, m in layers if n in wanted or layer_index(n) in wanted]
    found = {n for n, _ in chosen} | {layer_index(n) for n, _ in chosen}
    missing = [w for w in wanted if w not in found]
    if missing:
        avail = [layer_index(n) if layer_index(n) is not None else n for n, _ in layers]
        raise ValueError(f"layers {missing} are not MoE layers of the model; MoE layers: {avail}")
    return chosen


class RoutingRecorder:
    """Forward hooks on the ``moekit.MoE`` layers of ``model`` that fold routing into :class:`LayerRecord`.

    Args:
        model: any ``nn.Module`` containing ``moekit.MoE`` submodules.
        layers: decoder layer indices or module names to record (None = every MoE layer).
        sample_tokens: first choices kept per layer for the coloured text sample.
        reservoir_size: tokens kept per layer for the random-pair baseline.
        keep_raw: also keep every call's raw routing in ``raw[name]`` as a list of
            ``(ids_TK, weights_TK, logits_TE)`` NumPy arrays; memory then grows with the tokens, so
            this is for short texts (the aggregates never need it).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[int | str] | None = None,
        *,
        sample_tokens: int = 512,
        reservoir_size: int = 2048,
        seed: int = 0,
        keep_raw: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, value in (("sample_tokens", sample_tokens), ("reservoir_size", reservoir_size)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        found = find_moe_layers(model)
        if not found:
            raise ValueError(f"model {type(model).__name__} has no moekit.MoE layer to record")
        self.layers = _select(found, layers)
        self.sample_tokens, self.reservoir_size, self.seed = sample_tokens, reservoir_size, seed
        self.records: dict[str, LayerRecord] = {}
        self.keep_raw = keep_raw
        self.raw: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        self._token_ids: np.ndarray | None = None
        self._categories: np.ndarray | None = None
        self._pending: set[str] = set()  # layers that have not yet seen the declared inputs
        self._handles: list[Any] = []

    def set_inputs(self, token_ids_BS: Any, categories_BS: Any | None = None) -> None:
        """Declare the ``(B, S)`` token ids (and optional category ids, -1 = unknown) of the next forward.

        They apply to that forward only: each recorded layer uses them once, and a layer that sees
        them twice means a new forward began without ``set_inputs`` (which then records no token
        tables). ValueError in the forward when a layer's token count is not ``B * S``.
        """
        ids = np.asarray(token_ids_BS.cpu() if isinstance(token_ids_BS, torch.Tensor) else token_ids_BS)
        if ids.ndim != 2:
            raise ValueError(f"token_ids_BS must be 2-D (B, S), got shape {ids.shape}")
        cats = None
        if categories_BS is not None:
            cats = np.asarray(categories_BS, dtype=np.int64)
            if cats.shape != ids.shape:
                raise ValueError(f"categories_BS shape {cats.shape} must equal token_ids_BS {ids.shape}")
            if cats.size and cats.max() >= len(CATEGORIES):
                raise ValueError(f"categories_BS values must be < {len(CATEGORIES)} (or -1 = unknown)")
        self._token_ids, self._categories = ids, cats
        self._pending = {name for name, _ in self.layers}

    def start(self) -> RoutingRecorder:
        """Register the hooks (idempotent)."""
        if not self._handles:
            for name, module in self.layers:
                self._handles.append(module.register_forward_hook(self._make_hook(name), with_kwargs=True))
        return self

    def stop(self) -> None:
        """Remove the hooks; the records stay."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> RoutingRecorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            self._observe(name, args[0] if args else kwargs.get("x"), output)

        return hook

    def _observe(self, name: str, x: Any, output: Any) -> None:
        info = getattr(output, "routing", None)
        if info is None and isinstance(output, tuple) and len(output) == 2:
            info = output[1]
        if not isinstance(info, RoutingInfo):
            raise TypeError(
                f"MoE layer {name} returned {type(output).__name__}, expected MoEOutput(output, routing)"
            )
        with torch.no_grad():
            ids = info.expert_ids.detach().cpu().numpy().astype(np.int64)
            weights = info.expert_weights.detach().float().cpu().numpy()
            log_p = info.router_logits.detach().double().log_softmax(-1)
            # gate entropy per token (nats); entr(p) = -p log p with 0 log 0 = 0 (masked, -inf logits)
            ent = torch.special.entr(log_p.exp()).sum(-1).cpu().numpy()
            kept = info.tokens_per_expert.detach().cpu().numpy()
            dropped = int(info.dropped.detach().cpu())
        T = ids.shape[0]
        shape = (1, T)
        tok = cats = None
        if name not in self._pending:  # a forward without set_inputs: the declared ones are spent
            self._pending.clear()
            self._token_ids = self._categories = None
        if self._token_ids is not None:
            self._pending.discard(name)
            if self._token_ids.size != T:
                raise ValueError(f"MoE layer {name} routed {T} tokens, but set_inputs declared "
                                 f"{self._token_ids.shape} = {self._token_ids.size}")
            shape = self._token_ids.shape
            tok = self._token_ids.reshape(-1)
            cats = None if self._categories is None else self._categories.reshape(-1)
        elif isinstance(x, torch.Tensor) and x.dim() >= 3 and x.shape[:-1].numel() == T:
            shape = (int(x.shape[:-2].numel()), int(x.shape[-2]))
        rec = self.records.get(name)
        if rec is None:
            rec = self.records[name] = LayerRecord(
                name, int(info.router_logits.shape[-1]), ids.shape[1],
                sample_tokens=self.sample_tokens, reservoir_size=self.reservoir_size, seed=self.seed,
            )
        rec.update(ids, weights, ent, kept, dropped, shape, tok, cats)
        if self.keep_raw:
            logits = info.router_logits.detach().float().cpu().numpy()
            self.raw.setdefault(name, []).append((ids, weights, logits))
