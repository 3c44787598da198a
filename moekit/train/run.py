"""The run directory: what makes a directory a moekit run, and loading a trained model back.

Layout::

    RUN/run.json            {"format": "moekit-run", "version", "model_config", "train_config", "data"}
    RUN/tokenizer.json      the byte-level BPE tokenizer (HF tokenizers)
    RUN/data.safetensors    the tokenised train / validation streams (so a resume sees the same tokens)
    RUN/metrics.jsonl       one JSON object per logged step / validation
    RUN/checkpoints/step_XXXXXXX/  see moekit.train.checkpoint
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from moekit.train.checkpoint import list_checkpoints, load_checkpoint, write_json_atomic
from moekit.train.tokenizer import load_tokenizer

LOCK_FILE = ".moekit-lock"
RUN_FORMAT = "moekit-run"
RUN_FILE = "run.json"
TOKENIZER_FILE = "tokenizer.json"
DATA_FILE = "data.safetensors"
METRICS_FILE = "metrics.jsonl"


def _acquire(lock: Path, out: Path) -> None:
    """Create ``lock`` (``"pid host"``) exclusively; a lock left by a dead process on this host is
    taken over, a live one is a ValueError."""
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = lock.read_text(encoding="utf-8", errors="replace").split()
            except FileNotFoundError:
                continue  # released in the meantime
            # (an empty lock: its owner is between creating and writing it, so it is alive)
            pid = int(owner[0]) if owner and owner[0].isdigit() else None
            host = owner[1] if len(owner) > 1 else "?"
            if pid is not None and host == socket.gethostname() and not _alive(pid):
                lock.unlink(missing_ok=True)  # stale: that run died (e.g. kill -9) without cleaning up
                continue
            raise ValueError(f"--out {out} is in use by another moekit run (pid {pid} on {host}); wait "
                             f"for it or choose another --out (if no run is left, delete {lock})") from None
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()} {socket.gethostname()}\n")
        return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    return True


@contextlib.contextmanager
def claim_run_dir(out: str | os.PathLike, new: bool) -> Iterator[Path]:
    """Hold ``RUN/.moekit-lock`` while this process prepares or trains the run in ``out``, so that a
    second ``moekit train`` on the same directory fails at once instead of mixing two runs' files.

    ``new``: create ``out`` (it must be absent or empty); if the body fails before ``run.json`` is
    written (a bad corpus, Ctrl-C during preparation), the directory is removed again when this
    call created it, and emptied again when it was an empty directory already.
    """
    path = Path(out)
    if not new and not path.is_dir():  # not a run at all: the caller's checks say so
        yield path
        return
    if new and path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} exists and is not a directory; choose another --out")
    created = new and not path.exists()
    emptied = new and not created and not any(path.iterdir())  # an empty directory of the user's
    # The missing parents this call creates too (``--out a/b/run`` with no ``a``): removed with it.
    made = [d for d in (path, *path.parents) if not d.exists()] if created else []
    if new:
        path.mkdir(parents=True, exist_ok=True)

    def remove_made() -> None:
        shutil.rmtree(path, ignore_errors=True)
        for parent in made[1:]:  # innermost first; only while still empty
            try:
                parent.rmdir()
            except OSError:
                break

    lock = path / LOCK_FILE
    try:
        _acquire(lock, path)
    except BaseException:
        if created:
            remove_made()
        raise
    try:
        yield path
    except BaseException:
        if (created or emptied) and not (path / RUN_FILE).exists():  # what this call made goes
            lock.unlink(missing_ok=True)
            if created:
                remove_made()
            else:
                for child in path.iterdir():
                    if child.is_dir():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
        raise
    finally:
        lock.unlink(missing_ok=True)


def write_run_info(run_dir: str | os.PathLike, info: dict[str, Any]) -> None:
    """Write ``run.json`` atomically, adding the format marker and the moekit version."""
    from moekit import __version__

    write_json_atomic(Path(run_dir) / RUN_FILE, {"format": RUN_FORMAT, "version": __version__, **info})


def read_run_info(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``run.json`` of a moekit run; anything else raises ``ValueError`` saying it is not a run."""
    path = Path(run_dir)
    if not path.is_dir():
        what = "a file, not a directory" if path.exists() else "no such directory"
        raise ValueError(f"{path} is not a moekit run: {what}")
    file = path / RUN_FILE
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} is not a moekit run: it has no {RUN_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} is not a moekit run: {RUN_FILE} is not valid JSON") from None
    if not isinstance(info, dict) or info.get("format") != RUN_FORMAT:
        raise ValueError(f"{path} is not a moekit run: {RUN_FILE} lacks the format marker {RUN_FORMAT!r}")
    missing = [k for k in ("model_config", "train_config", "data") if not isinstance(info.get(k), dict)]
    if missing:
        raise ValueError(f"{path / RUN_FILE} is damaged: it lacks {', '.join(missing)}")
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
