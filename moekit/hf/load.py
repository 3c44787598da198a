"""``from_pretrained``: an HF (Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE) or Mistral checkpoint ->
``MoEForCausalLM``.

Memory: the model is built on the meta device (no storage), every checkpoint header is validated
against the model (names, shapes) before any tensor is read, then each tensor is taken straight from
its file through an mmap (``safe_open``) and assigned to the model (``load_state_dict(assign=True)``).
Tensors whose dtype and device already match stay file-backed views; stacked experts are written
once into their final tensor. RAM never holds the model twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from moekit.hf import config_map, keymap
from moekit.hf.checkpoint import (
    INDEX_NAME,
    SINGLE_NAME,
    CheckpointError,
    TensorInfo,
    TensorReader,
    find_tensors,
    read_json_object,
)
from moekit.hf.resolve import resolve_path
from moekit.models import ModelConfig, MoEForCausalLM

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
}
_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float64": torch.float64}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None`` / ``"auto"`` (keep the checkpoint's), a ``torch.dtype`` or a name like ``"bf16"``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        return dtype
    if isinstance(dtype, str):
        if dtype == "auto":
            return None
        if dtype in _DTYPE_NAMES:
            return _DTYPE_NAMES[dtype]
    raise ValueError(f"dtype must be None, 'auto', a torch float dtype or one of {sorted(_DTYPE_NAMES)}, "
                     f"got {dtype!r}")


def detect_layout(root: Path) -> str:
    """``"hf"`` (config.json) or ``"mistral"`` (params.json); FileNotFoundError when neither is there.

    A directory with both (some hub repos ship both layouts) is read as HF when its HF weights are
    there, else as Mistral's.
    """
    hf_weights = (root / INDEX_NAME).is_file() or (root / SINGLE_NAME).is_file()
    if (root / "config.json").is_file() and (hf_weights or not (root / "params.json").is_file()):
        return "hf"
    if (root / "params.json").is_file():
        return "mistral"
    raise FileNotFoundError(f"{root}: neither config.json (Hugging Face) nor params.json (Mistral) found")


def read_config(root: Path) -> tuple[ModelConfig, str, dict[str, Any]]:
    """``(ModelConfig, layout, raw config dict)`` of a checkpoint directory."""
    layout = detect_layout(root)
    if layout == "hf":
        raw = read_json_object(root / "config.json")
        kwargs = config_map.hf_to_kwargs(raw, source=str(root / "config.json"))
    else:
        raw = read_json_object(root / "params.json")
        kwargs = config_map.mistral_to_kwargs(raw, source=str(root / "params.json"))
    try:
        return ModelConfig(**kwargs), layout, raw
    except ValueError as e:
        name = "config.json" if layout == "hf" else "params.json"
        raise ValueError(f"{root / name}: {e}") from None


def read_generation_config(root: Path) -> dict[str, Any] | None:
    """A checkpoint's generation defaults, as transformers reads them: ``generation_config.json`` when
    there, else ``config.json``'s bos / eos / pad ids (an eos list kept whole); ``None`` for neither."""
    if (root / "generation_config.json").is_file():
        return read_json_object(root / "generation_config.json")
    if detect_layout(root) != "hf":
        return None
    raw = read_json_object(root / "config.json")
    ids = {k: raw[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if raw.get(k) is not None}
    return ids or None


_INIT_FUNCTIONS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                   "xavier_uniform_", "xavier_normal_", "constant_", "zeros_", "ones_")


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Skip ``torch.nn.init`` while building on the meta device: every weight is overwritten by the
    checkpoint, and random init on meta tensors goes through torch's Python refs, whose first use
    imports ``torch._refs`` (seconds). transformers skips init the same way when it loads."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _describe(src: keymap.Source, infos: dict[str, TensorInfo]) -> str:
    key = src.keys[0]
    extra = f" (+{len(src.keys) - 1} more)" if len(src.keys) > 1 else ""
    return f"tensor {key!r}{extra} in {infos[key].file}"


def check_plan(
    plan: dict[str, keymap.Source], model: MoEForCausalLM, infos: dict[str, TensorInfo], cfg: ModelConfig
) -> dict[str, keymap.Source]:
    """Match a plan to the model's state_dict; raise naming the tensor and file on any mismatch.

    Returns the plan restricted to the model's tensors (a tied ``lm_head.weight`` may be absent, a
    checkpoint's zero-width Qwen2-MoE shared expert is dropped when the model has none).
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = cfg.tie_word_embeddings
    plan = dict(plan)
    if cfg.shared_expert_intermediate_size == 0:
        for name in [n for n in plan if ".mlp.shared_expert" in n]:
            if 0 in plan[name].shape or name.endswith("shared_expert_gate.weight"):
                del plan[name]
    unexpected = sorted(set(plan) - set(expected))
    if unexpected:
        listed = "; ".join(_describe(plan[n], infos) for n in unexpected[:5])
        raise CheckpointError(
            f"{len(unexpected)} checkpoint tensor(s) have no place in this "
            f"{cfg.num_hidden_layers}-layer model "
            f"(does config.json match the weights?): {listed}"
        )
    missing = sorted(set(expected) - set(plan) - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s) the config needs: {missing[:8]}")
    for name, src in plan.items():
        if src.shape != expected[name]:
            got = f"shape {src.shape}" if src.op != "stack" else (
                f"shape {infos[src.keys[0]].shape}, {len(src.parts)} experts stacking to {src.shape}"
            )
            raise CheckpointError(
                f"{_describe(src, infos)} has {got}, but the config needs {name} of shape {expected[name]}"
            )
    return plan


def _default_dtype(raw: dict[str, Any], infos: dict[str, TensorInfo]) -> torch.dtype:
    """The checkpoint's dtype: config.json's ``dtype`` / ``torch_dtype``, else the most bytes' dtype."""
    name = raw.get("dtype") or raw.get("torch_dtype")
    if isinstance(name, str) and name in _DTYPE_NAMES:
        return _DTYPE_NAMES[name]
    by_dtype: dict[str, int] = {}
    for info in infos.values():
        by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.nbytes
    floating = {k: v for k, v in by_dtype.items() if k in _SAFETENSORS_DTYPES}
    if not floating:
        raise CheckpointError("checkpoint has no floating-point tensors")
    return _SAFETENSORS_DTYPES[max(floating, key=floating.__getitem__)]


def _stored_head(
    cfg: ModelConfig, plan: dict[str, keymap.Source], infos: dict[str, TensorInfo], root: Path
) -> tuple[ModelConfig, dict[str, keymap.Source]]:
    """A tied config whose checkpoint also stores ``lm_head.weight``: the same tensor as the embedding
    is dropped (tied); a different one is kept and the model untied, with a warning, as transformers
    does (tying would silently replace the head the checkpoint was trained with)."""
    reader = TensorReader(infos)
    try:
        same = torch.equal(keymap.build(plan["lm_head.weight"], reader),
                           keymap.build(plan["model.embed_tokens.weight"], reader))
    finally:
        reader.close()
    if same:
        return cfg, {k: v for k, v in plan.items() if k != "lm_head.weight"}
    warnings.warn(f"{root}: the config ties the word embeddings, but the checkpoint's lm_head.weight "
                  "differs from the embedding; keeping the stored head (tie_word_embeddings=False)",
                  UserWarning, stacklevel=4)
    return dataclasses.replace(cfg, tie_word_embeddings=False), plan


def open_checkpoint(
    root: Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu", mmap: bool = True,
    show_progress: bool | None = None, desc: str = "loading",
) -> tuple[ModelConfig, torch.dtype, Iterator[tuple[str, torch.Tensor]]]:
    """Validate checkpoint directory ``root`` against its config, then stream its tensors.

    Returns ``(config, dtype, tensors)``: every name and shape has been checked before this returns;
    ``tensors`` yields ``(moekit name, tensor)`` one at a time in ``dtype`` (``None``: the checkpoint's)
    on ``device``, so a consumer that writes them out never holds the whole model. ``mmap=False``
    reads every tensor into fresh memory (see :func:`moekit.hf.keymap.build`). ``show_progress``: a
    progress bar (tqdm, on stderr) over the tensors, labelled ``desc``; ``None``: when stderr is a terminal.
    """
    cfg, layout, raw = read_config(root)
    infos = find_tensors(root, layout)
    shapes = {name: info.shape for name, info in infos.items()}
    plan = keymap.plan_from_hf(shapes) if layout == "hf" else keymap.plan_from_mistral(shapes, cfg.head_dim)
    with torch.device("meta"), _no_init():
        plan = check_plan(plan, MoEForCausalLM(cfg), infos, cfg)
    if cfg.tie_word_embeddings and "lm_head.weight" in plan:
        cfg, plan = _stored_head(cfg, plan, infos, root)
    dtype = dtype or _default_dtype(raw, infos)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        reader = TensorReader(infos)
        bar = tqdm(total=len(plan), desc=desc, unit="tensor", dynamic_ncols=True, leave=False,
                   disable=None if show_progress is None else not show_progress)
        try:
            for name, src in plan.items():
                yield name, keymap.build(src, reader, dtype, device, mmap=mmap)
                bar.update()
        finally:
            bar.close()
            reader.close()

    return cfg, dtype, tensors()


def from_pretrained(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    *,
    revision: str | None = None,
    show_progress: bool | None = None,
) -> MoEForCausalLM:
    """Load a Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE (HF) or Mixtral (Mistral layout) checkpoint.

    Args:
        path: a directory with ``config.json`` + ``model.safetensors`` (or the shards and
            ``model.safetensors.index.json``), or ``params.json`` + ``consolidated*.safetensors``; or a
            hub id already in the local Hugging Face cache (needs the optional ``huggingface_hub``).
        dtype: ``None`` / ``"auto"`` keeps the checkpoint's dtype; else a float dtype or its name.
        device: where the parameters live (``"cpu"``, ``"cuda"``, ...).
        revision: hub revision (only for hub ids).
        show_progress: a progress bar over the tensors read; ``None``: when stderr is a terminal.

    Returns:
        ``MoEForCausalLM`` in eval mode; its ``.config`` is the mapped ``ModelConfig``, its
        ``.generation_config`` the checkpoint's generation defaults (see :func:`read_generation_config`:
        :func:`moekit.generate` stops on all their eos ids, ``save_pretrained`` writes them back). The
        tokenizer comes from :func:`moekit.load_tokenizer` with the same ``path``.

    Raises:
        FileNotFoundError / CheckpointError / ValueError naming the file or tensor: missing files or
        shards, truncated / corrupt safetensors, pickle-only checkpoints, an unknown ``model_type``,
        a tensor whose shape disagrees with the config. Nothing is returned half-loaded.
    """
    root = resolve_path(path, revision=revision)
    cfg, _, tensors = open_checkpoint(root, parse_dtype(dtype), torch.device(device),
                                      show_progress=show_progress)
    with torch.device("meta"), _no_init():
        model = MoEForCausalLM(cfg)
    state = dict(tensors)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)  # the tensors become the parameters: no copy
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"internal error: tensors left unloaded: {leftover[:5]}")
    model.generation_config = read_generation_config(root)
    return model.eval()
