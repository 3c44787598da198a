"""Checkpoints: safetensors for the model and the optimizer, JSON for the rest, written atomically.

Layout of one checkpoint, ``RUN/checkpoints/step_XXXXXXX/``:
    model.safetensors      the model's state_dict (tied weights stored once)
    optimizer.safetensors  every tensor of the optimizer state, keyed ``state.{param}.{name}``
    optimizer.json         the rest of the optimizer state_dict (param_groups, non-tensor values)
    state.json             step, RNG states, data position, anything the loop adds
A checkpoint is written into a hidden temporary directory next to its final place, flushed to disk
(fsync) and moved there with one ``os.replace``: a reader sees either the whole checkpoint or none
of it, and a crash or power loss never leaves a half-written one in its place.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

CHECKPOINT_DIR = "checkpoints"
_PREFIX = "step_"
_OLD = ".old-"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def capture_rng_state() -> dict[str, Any]:
    """JSON-serialisable RNG states of Python's ``random``, torch CPU and (if present) CUDA."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer ``state_dict`` into safetensors-ready tensors and a JSON index."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, per_param in state_dict["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{name}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    index = {"param_groups": state_dict["param_groups"], "scalars": scalars}
    return tensors, index


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], index: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, values in index["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    groups = []
    for group in index["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:07d}"


def _step_of(name: str) -> int | None:
    """The step of ``step_XXXXXXX``, or of ``.old-step_XXXXXXX-PID`` (a checkpoint being replaced)."""
    if name.startswith(_OLD):
        name = name[len(_OLD) :].rsplit("-", 1)[0]
    digits = name[len(_PREFIX) :]
    return int(digits) if name.startswith(_PREFIX) and digits.isdigit() else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as ``(step, path)``, oldest first.

    A step whose directory is missing but whose previous copy (``.old-step_*``, left by a crash while
    a step was saved again) is complete counts with that copy; :func:`save_checkpoint` puts it back.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for path in sorted(root.iterdir(), key=lambda p: p.name.startswith(_OLD)):  # finals first
        step = _step_of(path.name)
        complete = all((path / name).is_file() for name in ("state.json", "model.safetensors"))
        if step is not None and complete and step not in found:
            found[step] = path
    return sorted(found.items())


def _tidy(root: Path) -> None:
    """Remove what an interrupted save left (``.tmp-*``), put back a step whose replacement was cut
    short (``.old-*`` without its final directory). Only the run's writer calls it (the run lock)."""
    for path in root.iterdir():
        if path.name.startswith(".tmp-step_"):
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(_OLD) and (step := _step_of(path.name)) is not None:
            final = root / checkpoint_name(step)
            if final.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.replace(path, final)


def _fsync_tree(path: Path) -> None:
    """Flush the files of ``path`` and the directory itself to disk (a power loss keeps them)."""
    for child in path.iterdir():
        with open(child, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and delete all but the newest ``keep_last`` ones.

    ``state`` (JSON-serialisable) is stored in ``state.json`` together with ``step``.
    Returns the checkpoint directory.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last!r}")
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    _tidy(root)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_model(model, str(tmp / "model.safetensors"))
        if optimizer is not None:
            tensors, index = flatten_optimizer_state(optimizer.state_dict())
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            write_json_atomic(tmp / "optimizer.json", index)
        write_json_atomic(tmp / "state.json", {**state, "step": step})
        _fsync_tree(tmp)
    except BaseException:  # a full disk, a second Ctrl-C: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # re-saving a step (e.g. an interrupt right after a periodic save)
        old = root / f"{_OLD}{checkpoint_name(step)}-{os.getpid()}"
        os.replace(final, old)  # a crash from here to the next line leaves `old`: list_checkpoints takes it
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
        _fsync_dir(root)
    if keep_last is not None:
        for _, path in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(path)
    return final


def damaged(path: Path, name: str, err: Exception) -> ValueError:
    """The error for an unreadable file of a checkpoint (``name`` inside the directory ``path``)."""
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ValueError(
        f"checkpoint {path} is damaged ({name}: {reason}); remove that directory to fall back to the "
        "previous checkpoint (generate and analyze also take --step N)"
    )


def read_json(path: Path, name: str) -> Any:
    """The JSON file ``name`` of the checkpoint directory ``path``; :func:`damaged` if unreadable."""
    try:
        return json.loads((path / name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise damaged(path, name, err) from None


def load_checkpoint(
    checkpoint_dir: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load a checkpoint's weights into ``model`` (and ``optimizer``); returns its ``state.json``."""
    path = Path(checkpoint_dir)
    if not (path / "state.json").is_file() or not (path / "model.safetensors").is_file():
        raise ValueError(f"{path} is not a moekit checkpoint (no state.json / model.safetensors)")
    state = read_json(path, "state.json")
    try:
        file = str(path / "model.safetensors")
        missing, unexpected = load_model(model, file, strict=False, device=str(device))
    except SafetensorError as err:  # truncated / corrupt file
        raise damaged(path, "model.safetensors", err) from None
    except RuntimeError as err:  # shape mismatch: torch's heading line, then one line per tensor
        lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        more = f" (and {len(lines) - 3} more)" if len(lines) > 3 else ""
        detail = "; ".join(lines[:3]) or str(err)
        raise ValueError(f"checkpoint {path} does not fit this model: {detail}{more}") from None
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit this model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    if optimizer is not None:
        if not (path / "optimizer.safetensors").is_file():
            raise ValueError(f"checkpoint {path} has no optimizer state; cannot resume training from it")
        try:
            tensors = load_file(str(path / "optimizer.safetensors"), device=str(device))
        except SafetensorError as err:
            raise damaged(path, "optimizer.safetensors", err) from None
        index = read_json(path, "optimizer.json")
        optimizer.load_state_dict(unflatten_optimizer_state(tensors, index))
    return state
