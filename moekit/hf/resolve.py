"""Resolve a checkpoint argument to a local directory: a path, or a hub id found in the local HF cache.

moekit never touches the network: a hub id (``org/name``) is looked up only in huggingface_hub's local
cache (``HF_HUB_CACHE`` / ``HF_HOME``), and only when that optional package is installed.
"""

from __future__ import annotations

import re
from pathlib import Path

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_path(path: str | Path, revision: str | None = None) -> Path:
    """The local directory of ``path``: an existing directory, or the cached snapshot of a hub id.

    Raises ``FileNotFoundError`` with what to do when neither exists.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise NotADirectoryError(f"{local}: expected a checkpoint directory, got a file")
    text = str(path)
    if not _HUB_ID.match(text):
        raise FileNotFoundError(f"{text}: no such checkpoint directory")
    offline = (
        f"{text}: not a local directory, and moekit works offline: it only reads hub ids already in "
        "the local Hugging Face cache"
    )
    if local.parent.is_dir():  # "out/x" may be a mistyped local path as well as a hub id
        offline = (f"{text}: no such local directory (./{local.parent} has no {local.name!r}), and moekit "
                   "works offline: it only reads hub ids already in the local Hugging Face cache")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise FileNotFoundError(
            f"{offline}, which needs the optional package huggingface_hub (`pip install huggingface_hub`). "
            "Or pass the path of a downloaded checkpoint directory."
        ) from None
    try:
        return Path(snapshot_download(text, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        raise FileNotFoundError(
            f"{offline}, and {text!r} is not there. Download it first where you have network access "
            f"(`hf download {text}`), or pass the path of a checkpoint directory."
        ) from None
