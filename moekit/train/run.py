"""The run directory: what makes a directory a moekit run, and loading a trained model back.

Layout::

    RUN/run.json            {"format": "moekit-run", "version", "model_config", "train_config", "data"}
    RUN/tokenizer.json      the byte-level BPE tokenizer (HF tokenizers)
    RUN/data.safetensors    the tokenised train / validation streams (so a resume sees the same tokens)
    RUN/metrics.jsonl       one JSON object per logged step / validation
    RUN/checkpoints/step_XXXXXXX/  see moekit.train.checkpoint
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from moekit.train.checkpoint import list_checkpoints, load_checkpoint, write_json_atomic
from moekit.train.tokenizer import load_tokenizer

RUN_FORMAT = "moekit-run"
RUN_FILE = "run.json"
TOKENIZER_FILE = "tokenizer.json"
DATA_FILE = "data.safetensors"
METRICS_FILE = "metrics.jsonl"


def write_run_info(run_dir: str | os.PathLike, info: dict[str, Any]) -> None:
    """Write ``run.json`` atomically, adding the format marker and the moekit version."""
    from moekit import __version__

    write_json_atomic(Path(run_dir) / RUN_FILE, {"format": RUN_FORMAT, "version": __version__, **info})


def read_run_info(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``run.json`` of a moekit run; anything else raises ``ValueError`` saying it is not a run."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(f"{path} is not a moekit run: no such directory")
    file = path / RUN_FILE
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} is not a moekit run: it has no {RUN_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} is not a moekit run: {RUN_FILE} is not valid JSON") from None
    if not isinstance(info, dict) or info.get("format") != RUN_FORMAT:
        raise ValueError(f"{path} is not a moekit run: {RUN_FILE} lacks the format marker {RUN_FORMAT!r}")
    return info


def checkpoint_dir(run_dir: str | os.PathLike, step: int | None = None) -> Path:
    """The newest checkpoint of a run, or the one of ``step``; ValueError when there is none."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise ValueError(f"run {run_dir} has no checkpoint yet")
    if step is None:
        return checkpoints[-1][1]
    for s, path in checkpoints:
        if s == step:
            return path
    available = [s for s, _ in checkpoints]
    raise ValueError(f"run {run_dir} has no checkpoint of step {step}; available: {available}")


def load_run(
    run_dir: str | os.PathLike, step: int | None = None, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Tokenizer, dict[str, Any]]:
    """Load a trained model for inference.

    Args:
        run_dir: a directory written by ``moekit train``.
        step: checkpoint step; ``None`` = the newest.
        device: where to put the weights.

    Returns:
        ``(model, tokenizer, run_info)``: the :class:`moekit.models.MoEForCausalLM` in eval mode,
        the ``tokenizers.Tokenizer``, and ``run.json``'s content plus ``"step"`` and ``"checkpoint"``.

    Raises:
        ValueError: ``run_dir`` is not a moekit run, or has no (such) checkpoint.
    """
    from moekit.models import ModelConfig, MoEForCausalLM

    info = read_run_info(run_dir)
    config = ModelConfig.from_dict(info["model_config"])
    path = checkpoint_dir(run_dir, step)
    model = MoEForCausalLM(config)
    state = load_checkpoint(path, model, device=device)
    model.to(device).eval()
    tokenizer = load_tokenizer(Path(run_dir) / TOKENIZER_FILE)
    return model, tokenizer, {**info, "step": state["step"], "checkpoint": str(path)}
