"""Tensor-name maps between checkpoint layouts and moekit's state_dict (= transformers v5 Mixtral names).

Layouts:
- **v5 stacked** (moekit, transformers' in-memory layout): ``model.layers.{i}.mlp.experts.gate_up_proj``
  ``(E, 2F, D)`` (gate rows first, then up rows) and ``...experts.down_proj`` ``(E, D, F)``; router
  ``model.layers.{i}.mlp.gate.weight`` ``(E, D)``.
- **per-expert** (what transformers writes to disk, and every released checkpoint): Mixtral
  ``model.layers.{i}.block_sparse_moe.experts.{e}.w1/w3/w2.weight`` (gate / up / down) and
  ``...block_sparse_moe.gate.weight``; Qwen2/3-MoE / OLMoE ``model.layers.{i}.mlp.experts.{e}.gate_proj/
  up_proj/down_proj.weight``. Stacking: ``gate_up_proj[e] = cat([w1_e, w3_e], 0)``, ``down_proj[e] = w2_e``.
- **Mistral** (``consolidated*.safetensors``): ``tok_embeddings``, ``norm``, ``output``,
  ``layers.{i}.attention.wq/wk/wv/wo``, ``attention_norm``, ``ffn_norm``, ``feed_forward.gate``,
  ``feed_forward.experts.{e}.w1/w2/w3``. Its q/k rows are in interleaved-pair RoPE order; HF / moekit
  use rotate-half order, so wq / wk are permuted per head (transformers' ``PermuteForRope``).

A plan maps each moekit tensor to a :class:`Source` and is a pure function of ``{name: shape}``, so it
is validated (names, shapes) before a single tensor is read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

Shape = tuple[int, ...]

_EXPERT_PARTS = {
    "w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"
}
_EXPERT_RE = re.compile(r"^(.+\.experts)\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
# Non-persistent buffers some old checkpoints carry; they are recomputed, never loaded.
_IGNORED_RE = re.compile(r"\.rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Source:
    """How one moekit tensor is built from checkpoint tensors.

    Attributes:
        op: ``"copy"`` (one tensor as is), ``"stack"`` (``out[e] = cat(parts[e], 0)``) or ``"rope"``
            (Mistral interleaved -> rotate-half rows, per head of ``head_dim`` rows).
        parts: checkpoint names; for ``stack`` one tuple per expert, else one tuple of one name.
        shape: shape of the built tensor.
        head_dim: rows per head, for ``rope``.
    """

    op: str
    parts: tuple[tuple[str, ...], ...]
    shape: Shape
    head_dim: int = 0

    @property
    def keys(self) -> list[str]:
        return [k for group in self.parts for k in group]


class KeyMapError(ValueError):
    """A checkpoint's tensor names or shapes do not form a moekit model."""


def _group_experts(
    renamed: dict[str, tuple[str, Shape]], plan: dict[str, Source]
) -> None:
    """Stack per-expert tensors (already renamed to ``...mlp.experts.{e}.{part}.weight``) into the plan."""
    groups: dict[str, dict[int, dict[str, tuple[str, Shape]]]] = {}
    for new, (old, shape) in renamed.items():
        m = _EXPERT_RE.match(new)
        if m is None:
            if new in plan:
                raise KeyMapError(f"checkpoint has two tensors for {new!r} (one is {old!r})")
            plan[new] = Source("copy", ((old,),), shape)
            continue
        prefix, e, part = m.group(1), int(m.group(2)), _EXPERT_PARTS[m.group(3)]
        groups.setdefault(prefix, {}).setdefault(e, {})[part] = (old, shape)
    for prefix, experts in groups.items():
        n = max(experts) + 1
        for e in range(n):
            have = experts.get(e, {})
            for part in ("gate", "up", "down"):
                if part not in have:
                    raise KeyMapError(f"checkpoint lacks the {part} weight of expert {e} under {prefix!r}")
        for target, names in ((f"{prefix}.gate_up_proj", ("gate", "up")), (f"{prefix}.down_proj", ("down",))):
            if target in plan:
                raise KeyMapError(f"checkpoint has both stacked {target!r} and per-expert tensors")
            parts = tuple(tuple(experts[e][p][0] for p in names) for e in range(n))
            shapes = [experts[e][p][1] for e in range(n) for p in names]
            if any(len(s) != 2 or s[1] != shapes[0][1] for s in shapes) or (
                len(names) == 2 and any(experts[e]["gate"][1] != experts[e]["up"][1] for e in range(n))
            ):
                raise KeyMapError(
                    f"per-expert tensors under {prefix!r} disagree in shape: {sorted(set(shapes))}"
                )
            rows = sum(experts[0][p][1][0] for p in names)
            plan[target] = Source("stack", parts, (n, rows, shapes[0][1]))


def plan_from_hf(shapes: Mapping[str, Shape]) -> dict[str, Source]:
    """Plan for an HF checkpoint in the v5 stacked or the per-expert (v4 / on-disk) layout."""
    renamed: dict[str, tuple[str, Shape]] = {}
    for name, shape in shapes.items():
        if _IGNORED_RE.search(name):
            continue
        new = name.replace(".block_sparse_moe.", ".mlp.")
        if new in renamed:
            raise KeyMapError(f"checkpoint has both {renamed[new][0]!r} and {name!r}")
        renamed[new] = (name, tuple(shape))
    plan: dict[str, Source] = {}
    _group_experts(renamed, plan)
    return plan


_MISTRAL_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
_MISTRAL_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.gate.weight": "mlp.gate.weight",
}
_MISTRAL_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def plan_from_mistral(shapes: Mapping[str, Shape], head_dim: int) -> dict[str, Source]:
    """Plan for Mistral's ``consolidated*.safetensors`` layout of a Mixtral model."""
    renamed: dict[str, tuple[str, Shape]] = {}
    rope: set[str] = set()
    for name, shape in shapes.items():
        new = _MISTRAL_TOP.get(name)
        m = _MISTRAL_LAYER_RE.match(name)
        if new is None and m is not None:
            rest = m.group(2)
            for old_prefix in ("feed_forward.experts.", "block_sparse_moe.experts."):
                if rest.startswith(old_prefix):
                    rest = "mlp.experts." + rest[len(old_prefix):]
                    break
            rest = _MISTRAL_LAYER.get(rest, rest if rest.startswith("mlp.experts.") else None)
            new = None if rest is None else f"model.layers.{m.group(1)}.{rest}"
        if new is None:
            raise KeyMapError(f"tensor {name!r} is not part of Mistral's Mixtral layout")
        renamed[new] = (name, tuple(shape))
        if new.endswith(("q_proj.weight", "k_proj.weight")):
            rope.add(new)
    plan: dict[str, Source] = {}
    _group_experts(renamed, plan)
    for new in rope:
        src = plan[new]
        if src.shape[0] % head_dim or head_dim % 2:
            raise KeyMapError(
                f"tensor {src.keys[0]!r} of shape {src.shape} is not made of heads of {head_dim} rows"
            )
        plan[new] = Source("rope", src.parts, src.shape, head_dim)
    return plan


def rope_interleaved_to_half(w: Tensor, head_dim: int) -> Tensor:
    """Rows of each head from interleaved pairs ``(x0, y0, x1, y1, ..)`` to halves ``(x.., y..)``."""
    rows = w.shape[0]
    return w.reshape(rows // head_dim, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_half_to_interleaved(w: Tensor, head_dim: int) -> Tensor:
    """Inverse of :func:`rope_interleaved_to_half`."""
    rows = w.shape[0]
    return w.reshape(rows // head_dim, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def build(
    src: Source,
    get: Callable[[str], Tensor],
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    mmap: bool = True,
) -> Tensor:
    """Materialise one planned tensor.

    ``get(name)`` returns a checkpoint tensor; when ``get`` also has ``read(name)`` and
    ``read_into(name, out)`` (a :class:`~moekit.hf.checkpoint.TensorReader`), tensors that are converted
    anyway are read with plain file reads instead of through the mmap. A ``copy`` whose dtype and device
    already match is ``get``'s own tensor (a zero-copy mmap view) unless ``mmap=False`` (streaming
    conversions: a read copy is freed once written, mapped pages would stay resident); ``stack`` writes
    each expert straight into one new tensor.
    """
    device = torch.device(device)
    read = getattr(get, "read", get)
    read_into = getattr(get, "read_into", None)
    if src.op == "copy":
        t = get(src.parts[0][0])
        if mmap and (dtype is None or t.dtype == dtype) and t.device == device:
            return t
        return read(src.parts[0][0]).to(dtype=dtype, device=device)
    if src.op == "rope":
        t = rope_interleaved_to_half(read(src.parts[0][0]), src.head_dim)
        return t.to(dtype=dtype, device=device).contiguous()
    if src.op != "stack":
        raise ValueError(f"Source.op must be 'copy', 'stack' or 'rope', got {src.op!r}")
    out = torch.empty(src.shape, dtype=dtype or get(src.parts[0][0]).dtype, device=device)
    for e, names in enumerate(src.parts):
        rows = src.shape[1] // len(names)  # gate and up parts have equal shapes (checked by the plan)
        for i, name in enumerate(names):
            part = out[e, i * rows:(i + 1) * rows]
            if read_into is not None:
                read_into(name, part)
            else:
                part.copy_(get(name))
    return out


def remap(state: Mapping[str, Tensor], plan: Mapping[str, Source]) -> dict[str, Tensor]:
    """Apply a plan to an in-memory ``{name: tensor}`` dict (tests, small models)."""
    return {name: build(src, state.__getitem__) for name, src in plan.items()}


def hf_from_state(
    state: Mapping[str, Tensor], model_type: str, tied: bool = False
) -> Iterator[tuple[str, Tensor]]:
    """moekit tensors in transformers' on-disk (per-expert) layout for ``model_type``.

    Yields views (no copies): ``gate_up_proj[e, :F]`` / ``[e, F:]`` and ``down_proj[e]`` are contiguous.
    ``tied`` drops ``lm_head.weight`` as transformers does for tied embeddings.
    """
    moe = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    gate, up, down = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for name, t in state.items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix = name[: -len(".mlp.experts.gate_up_proj")] + f".{moe}.experts"
            f = t.shape[1] // 2
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.{gate}.weight", t[e, :f]
                yield f"{prefix}.{e}.{up}.weight", t[e, f:]
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name[: -len(".mlp.experts.down_proj")] + f".{moe}.experts"
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.{down}.weight", t[e]
        elif name.endswith(".mlp.gate.weight"):
            yield name[: -len(".mlp.gate.weight")] + f".{moe}.gate.weight", t
        else:
            yield name, t


def mistral_from_state(
    state: Mapping[str, Tensor], head_dim: int
) -> Iterator[tuple[str, Tensor]]:
    """moekit tensors in Mistral's layout (q/k rows permuted back to interleaved RoPE order)."""
    inv_top = {v: k for k, v in _MISTRAL_TOP.items()}
    inv_layer = {v: k for k, v in _MISTRAL_LAYER.items()}
    for name, t in hf_from_state(state, "mixtral"):
        if name in inv_top:
            yield inv_top[name], t
            continue
        m = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
        if m is None:
            raise KeyMapError(f"tensor {name!r} has no place in Mistral's layout")
        rest = m.group(2)
        if rest.startswith("block_sparse_moe.experts."):
            yield f"layers.{m.group(1)}.feed_forward.experts.{rest[len('block_sparse_moe.experts.'):]}", t
            continue
        rest = inv_layer.get(rest.replace("block_sparse_moe.gate.", "mlp.gate."))
        if rest is None:
            raise KeyMapError(f"tensor {name!r} has no place in Mistral's layout")
        if rest in ("attention.wq.weight", "attention.wk.weight"):
            t = rope_half_to_interleaved(t, head_dim).contiguous()
        yield f"layers.{m.group(1)}.{rest}", t
