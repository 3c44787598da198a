"""Write a ``MoEForCausalLM`` as an HF checkpoint directory or in Mistral's layout, and convert between them.

HF output is what transformers itself writes: ``config.json`` (``model_type`` mixtral / qwen2_moe /
qwen3_moe / olmoe), per-expert tensor names, ``model.safetensors`` or
``model-0000k-of-0000n.safetensors`` shards with ``model.safetensors.index.json`` above
``max_shard_size``. Expert tensors are written as views
of the stacked parameters, one shard at a time, so saving needs no second copy of the model.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from moekit.hf import config_map, keymap
from moekit.hf.checkpoint import atomic_write_text, write_sharded
from moekit.hf.load import open_checkpoint, parse_dtype
from moekit.hf.tokenizer import HFTokenizer
from moekit.models import MoEForCausalLM

_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                      torch.float64: "float64"}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "generation_config.json", "tokenizer.model", "tekken.json",
)
TEMPLATES_DIR = "additional_chat_templates"  # transformers 5's named chat templates, one file each


def _check_model(model: Any) -> MoEForCausalLM:
    if not isinstance(model, MoEForCausalLM):
        raise TypeError(f"model must be a moekit MoEForCausalLM, got {type(model).__name__}")
    return model


def _state(model: MoEForCausalLM, dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    state = {k: v.detach() for k, v in model.state_dict().items()}
    floats = [v.dtype for v in state.values() if v.dtype.is_floating_point]
    out_dtype = dtype or (max(set(floats), key=floats.count) if floats else torch.float32)
    return state, out_dtype


def _cast(items: Any, dtype: torch.dtype | None) -> Any:
    """Cast floating tensors one at a time, as the shard writer pulls them."""
    for name, t in items:
        yield name, (t.to(dtype) if dtype is not None and t.dtype.is_floating_point else t)


# Written by the other layout: removed after a save, so a directory never holds two models.
_LAYOUT_FILES = {
    "hf": ("config.json", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json"),
    "mistral": ("params.json", "consolidated*.safetensors", "consolidated*.pth", "consolidated*.pt"),
}


def _remove_other_layout(out: Path, layout: str) -> bool:
    """Delete the files of the layout other than ``layout`` (just written) from ``out``; True if any."""
    other = "mistral" if layout == "hf" else "hf"
    stale = [path for pattern in _LAYOUT_FILES[other] for path in out.glob(pattern)]
    for path in stale:
        path.unlink()
    return bool(stale)


def _hf_tokenizer(tokenizer: Any, cfg: Any) -> HFTokenizer:
    """``tokenizer`` as an ``HFTokenizer``: a plain ``tokenizers.Tokenizer`` (what ``load_run`` gives)
    gets ``cfg``'s eos token as its ``eos_token``. TypeError for anything else, before a file is written."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer
    if isinstance(tokenizer, Tokenizer):
        eos = None if cfg.eos_token_id is None else tokenizer.id_to_token(cfg.eos_token_id)
        return HFTokenizer(tokenizer, special_tokens={} if eos is None else {"eos_token": eos})
    raise TypeError("tokenizer must be a moekit.HFTokenizer or a tokenizers.Tokenizer, "
                    f"got {type(tokenizer).__name__} (nothing was written)")


def save_tokenizer(tokenizer: HFTokenizer, save_directory: str | Path) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (special tokens, chat template).

    The directory's other tokenizer files (a chat template file, ``special_tokens_map.json``, a slow
    tokenizer's ``tokenizer.model`` / ``tekken.json``, named templates) are removed: they would take
    precedence over, or disagree with, what was written, so the result is what an empty directory gets.
    """
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if name not in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            (out / name).unlink(missing_ok=True)
    if (out / TEMPLATES_DIR).is_dir():
        shutil.rmtree(out / TEMPLATES_DIR)
    atomic_write_text(out / "tokenizer.json", tokenizer.tokenizer.to_str())
    cfg: dict[str, Any] = dict(tokenizer.special_tokens)
    if tokenizer.chat_template is not None:
        tpl = tokenizer.chat_template
        cfg["chat_template"] = tpl if isinstance(tpl, str) else [
            {"name": k, "template": v} for k, v in tpl.items()
        ]
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    atomic_write_text(out / "tokenizer_config.json", json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def save_pretrained(
    model: MoEForCausalLM,
    save_directory: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    model_type: str | None = None,
    dtype: torch.dtype | str | None = None,
    tokenizer: HFTokenizer | Tokenizer | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory that transformers loads as is.

    Args:
        save_directory: created if needed; a checkpoint there is replaced (its shards, the files
            of the Mistral layout, and with ``tokenizer`` its tokenizer files).
        max_shard_size: bytes per shard (int or ``"5GB"`` / ``"500MB"``); one ``model.safetensors``
            when everything fits.
        model_type: ``"mixtral"``, ``"qwen2_moe"``, ``"qwen3_moe"`` or ``"olmoe"``; ``None`` picks the
            one whose math matches the config (ValueError when none does, e.g. an expert-choice router).
        dtype: cast floating tensors to this dtype while writing (default: keep).
        tokenizer: also write its ``tokenizer.json`` / ``tokenizer_config.json``: a
            ``moekit.HFTokenizer`` or a ``tokenizers.Tokenizer`` (its eos token: the config's).

    ``generation_config.json`` holds ``model.generation_config`` (a loaded checkpoint's, eos list
    and sampling defaults included) or else the config's bos / eos / pad ids.

    Returns:
        The directory.
    """
    model = _check_model(model)
    dtype = parse_dtype(dtype)
    if tokenizer is not None:
        tokenizer = _hf_tokenizer(tokenizer, model.config)
    state, out_dtype = _state(model, dtype)
    return _write_hf(model.config, _cast(state.items(), dtype), Path(save_directory), out_dtype,
                     max_shard_size=max_shard_size, model_type=model_type, tokenizer=tokenizer,
                     generation=model.generation_config)


def _write_hf(
    cfg: Any,
    items: Iterator[tuple[str, torch.Tensor]],
    out: Path,
    out_dtype: torch.dtype,
    *,
    max_shard_size: int | str,
    model_type: str | None,
    tokenizer: HFTokenizer | None,
    generation: dict[str, Any] | None = None,
) -> Path:
    """Write moekit-named tensors ``items`` (pulled one at a time) as an HF checkpoint of ``cfg``;
    ``generation``: the generation defaults to write (else ``cfg``'s bos / eos / pad ids)."""
    hf_type = model_type or config_map.pick_model_type(cfg)
    hf_cfg = config_map.hf_from_config(cfg, hf_type, dtype=_TORCH_DTYPE_NAMES.get(out_dtype, "float32"))
    tensors = (pair for name, t in items
               for pair in keymap.hf_from_state({name: t}, hf_type, tied=cfg.tie_word_embeddings))
    if hf_type == "qwen2_moe" and cfg.shared_expert_intermediate_size == 0:
        tensors = _with_empty_shared_experts(tensors, cfg, out_dtype)
    write_sharded(tensors, out, max_shard_size=max_shard_size)
    atomic_write_text(out / "config.json", json.dumps(hf_cfg, indent=2) + "\n")
    gen = generation or {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                         if hf_cfg[k] is not None}
    atomic_write_text(out / "generation_config.json", json.dumps(gen, indent=2) + "\n")
    _remove_other_layout(out, "hf")
    if tokenizer is not None:
        save_tokenizer(tokenizer, out)
    return out


def _check_destination(dst_dir: Path) -> None:
    """A destination is new, empty or a checkpoint (replaced, as ``save_pretrained`` would): never a
    ``moekit train`` run or another folder with files of its own, which convert would mix into."""
    if not dst_dir.is_dir() or not any(dst_dir.iterdir()):
        return
    if (dst_dir / "run.json").is_file():
        raise ValueError(f"{dst_dir} is a moekit train run; convert to another directory "
                         "(nothing was written)")
    if not ((dst_dir / "config.json").is_file() or (dst_dir / "params.json").is_file()):
        raise ValueError(f"{dst_dir} is not empty and holds no checkpoint (config.json / params.json); "
                         "convert to a new or empty directory (nothing was written)")


def _with_empty_shared_experts(tensors: Any, cfg: Any, dtype: torch.dtype) -> Any:
    """Qwen2-MoE always has a shared expert; a model without one gets a zero-width one (output 0)."""
    yield from tensors
    d = cfg.hidden_size
    for i in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(i):
            p = f"model.layers.{i}.mlp.shared_expert"
            yield f"{p}.gate_proj.weight", torch.zeros(0, d, dtype=dtype)
            yield f"{p}.up_proj.weight", torch.zeros(0, d, dtype=dtype)
            yield f"{p}.down_proj.weight", torch.zeros(d, 0, dtype=dtype)
            yield f"{p}_gate.weight", torch.zeros(1, d, dtype=dtype)


def save_mistral(
    model: MoEForCausalLM,
    save_directory: str | Path,
    *,
    max_shard_size: int | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Write ``model`` in Mistral's layout: ``params.json`` + ``consolidated.safetensors`` (or
    ``consolidated-0000k-of-0000n.safetensors`` with ``max_shard_size``). Mixtral math only."""
    model = _check_model(model)
    dtype = parse_dtype(dtype)
    state, _ = _state(model, dtype)
    return _write_mistral(model.config, _cast(state.items(), dtype), Path(save_directory), max_shard_size)


def _write_mistral(
    cfg: Any, items: Iterator[tuple[str, torch.Tensor]], out: Path, max_shard_size: int | str | None
) -> Path:
    params = config_map.mistral_from_config(cfg)  # validates before anything is written
    tensors = (pair for name, t in items for pair in keymap.mistral_from_state({name: t}, cfg.head_dim))
    limit = max_shard_size if max_shard_size is not None else 2**62
    write_sharded(tensors, out, max_shard_size=limit, prefix="consolidated", index=False)
    atomic_write_text(out / "params.json", json.dumps(params, indent=2) + "\n")
    if _remove_other_layout(out, "mistral"):  # an HF model was replaced: its generation defaults too
        (out / "generation_config.json").unlink(missing_ok=True)
    return out


def convert(
    src: str | Path,
    dst: str | Path,
    to: str = "hf",
    *,
    max_shard_size: int | str | None = None,
    dtype: torch.dtype | str | None = None,
    model_type: str | None = None,
    show_progress: bool | None = None,
) -> Path:
    """Convert checkpoint ``src`` to ``dst`` in layout ``to`` (``"hf"`` or ``"mistral"``).

    ``src`` is an HF or Mistral checkpoint directory (tokenizer files are copied along) or a
    ``moekit train`` run directory (its newest checkpoint; its tokenizer is written as tokenizer.json).
    A checkpoint is validated first, then streamed: each tensor (one layer's stacked experts at most) is
    read, renamed / permuted and written out one shard at a time, so RAM never holds the model.
    ``show_progress``: a progress bar over the tensors; ``None``: when stderr is a terminal.
    """
    from moekit.hf.resolve import resolve_path

    if to not in ("hf", "mistral"):
        raise ValueError(f"to must be 'hf' or 'mistral', got {to!r}")
    src_dir = resolve_path(src)
    dst_dir = Path(dst)
    if dst_dir.resolve() == src_dir.resolve():
        raise ValueError(f"convert needs a destination other than the source ({src_dir})")
    _check_destination(dst_dir)
    if to == "mistral" and model_type not in (None, "mixtral"):
        raise ValueError("the Mistral layout holds Mixtral models only; drop model_type")
    tokenizer = None
    if (src_dir / "run.json").is_file():  # a `moekit train` run: its newest checkpoint and tokenizer
        from moekit.train import load_run

        model, tok, _ = load_run(src_dir)
        tokenizer = _hf_tokenizer(tok, model.config)
        cast = parse_dtype(dtype)
        state, out_dtype = _state(model, cast)
        cfg, items = model.config, _cast(state.items(), cast)
    else:  # stream: one tensor (one layer's stacked experts at most) in memory at a time
        cfg, out_dtype, items = open_checkpoint(src_dir, parse_dtype(dtype), mmap=False,
                                                show_progress=show_progress, desc="converting")
    if to == "hf":
        _write_hf(cfg, items, dst_dir, out_dtype, max_shard_size=max_shard_size or "5GB",
                  model_type=model_type, tokenizer=tokenizer)
    else:
        _write_mistral(cfg, items, dst_dir, max_shard_size)
        if tokenizer is not None:
            save_tokenizer(tokenizer, dst_dir)
            (dst_dir / "generation_config.json").unlink(missing_ok=True)  # none for a run: not another's
    if tokenizer is None:  # a checkpoint: its tokenizer files and generation defaults come along
        _copy_tokenizer_files(src_dir, dst_dir)
    return dst_dir


def _copy_tokenizer_files(src_dir: Path, dst_dir: Path) -> None:
    """Make ``dst_dir``'s tokenizer files (and ``generation_config.json``, whose eos list and sampling
    defaults the source knows better than the config) those of ``src_dir``: copied over, and the
    ones the source lacks removed, so a converted directory never keeps another model's tokenizer."""
    for name in TOKENIZER_FILES:
        source, target = src_dir / name, dst_dir / name
        if source.is_file():
            tmp = target.with_name(f".{name}.tmp-{os.getpid()}")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        elif name != "generation_config.json":  # (the one just written stays when the source has none)
            target.unlink(missing_ok=True)
    if (dst_dir / TEMPLATES_DIR).is_dir():
        shutil.rmtree(dst_dir / TEMPLATES_DIR)
    if (src_dir / TEMPLATES_DIR).is_dir():
        shutil.copytree(src_dir / TEMPLATES_DIR, dst_dir / TEMPLATES_DIR)
