"""Text corpora for training: the embedded default (the stdlib source) and ``--data`` paths.

A corpus is split into train / validation **by document** (a file, a ``.jsonl`` record, or a
chunk of a single ``.txt`` file) with a hash of the document's name, so the split does not depend
on the order files are listed in, on the machine, or on a random seed. Character budgets keep the
start-up short on the 31 MB standard library: documents are taken in hash order (a fixed
pseudo-random sample) until the budget is spent.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Directories of the stdlib that are not the standard library's own source; in --data directories
# only __pycache__ (and hidden directories) are skipped.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_DATA_SKIP_DIRS = frozenset({"__pycache__"})
# A single .txt file is cut into documents of about this many characters at line boundaries (a
# longer line is cut inside).
TXT_CHUNK_CHARS = 2000


@dataclass(frozen=True)
class Document:
    """One unit of the train/validation split: a stable ``name`` and its text."""

    name: str
    text: str


@dataclass
class Corpus:
    """A corpus split into train and validation documents.

    Attributes:
        source: human-readable description (``"stdlib:/usr/lib/python3.11"`` or the data path).
        train: training documents (in hash order).
        validation: validation documents (in hash order).
        num_documents: documents found before the character budgets were applied.
    """

    source: str
    train: list[Document] = field(default_factory=list)
    validation: list[Document] = field(default_factory=list)
    num_documents: int = 0

    @property
    def train_chars(self) -> int:
        return sum(len(d.text) for d in self.train)

    @property
    def validation_chars(self) -> int:
        return sum(len(d.text) for d in self.validation)


def default_corpus_root() -> Path:
    """Directory of the running interpreter's standard library source (``sysconfig``'s ``stdlib``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _doc_hash(name: str) -> int:
    # surrogateescape: a file name that is not UTF-8 (os.walk escapes its bytes) hashes its bytes
    return int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()[:8], "big")


def _read_text(path: Path) -> str | None:
    """UTF-8 text of ``path``, or None for binary / undecodable files."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _jsonl_documents(path: Path, prefix: str) -> Iterator[Document]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--data {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    for lineno, line in enumerate(text.split("\n"), start=1):  # JSON Lines: records end at \n only
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"--data {path}: line {lineno} is not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(
                f"--data {path}: line {lineno} must be a JSON object with a string field \"text\""
            )
        yield Document(f"{prefix}#{lineno}", record["text"])


def _txt_documents(text: str, prefix: str) -> Iterator[Document]:
    chunk: list[str] = []
    size = 0
    index = 0
    lines = text.splitlines(keepends=True)
    pieces = (line[i : i + TXT_CHUNK_CHARS] for line in lines for i in range(0, len(line), TXT_CHUNK_CHARS))
    for line in pieces:
        chunk.append(line)
        size += len(line)
        if size >= TXT_CHUNK_CHARS:
            yield Document(f"{prefix}#{index}", "".join(chunk))
            chunk, size, index = [], 0, index + 1
    if chunk:
        yield Document(f"{prefix}#{index}", "".join(chunk))


def _walk_files(root: Path, suffixes: tuple[str, ...] | None, skip_dirs: frozenset[str]) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if suffixes is None or name.endswith(suffixes):
                found.append(Path(dirpath) / name)
    return found


def _split(
    candidates: list[tuple[str, object]],
    read,
    *,
    val_fraction: float,
    max_train_chars: int | None,
    max_val_chars: int | None,
    source: str,
    min_documents: int,
) -> Corpus:
    """Split ``(name, handle)`` candidates by name hash; ``read(handle)`` gives text or None."""
    ordered = sorted(candidates, key=lambda c: (_doc_hash(c[0]), c[0]))
    n = len(ordered)
    if n < min_documents:
        need = "at least 2 are needed to split train/validation" if min_documents > 1 else "one is needed"
        raise ValueError(f"corpus {source} has {n} document(s); {need} (give more text)")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    corpus = Corpus(source=source, num_documents=n)
    # Validation: the first n_val readable, non-blank documents in hash order (a binary file among
    # them is passed over, not counted); training: the rest.
    start = 0
    for part, budget in ((corpus.validation, max_val_chars), (corpus.train, max_train_chars)):
        used, index = 0, start
        while index < n and (part is corpus.train or len(part) < n_val):
            if budget is not None and used >= budget:
                break
            name, handle = ordered[index]
            index += 1
            text = read(handle)
            if text is None or not text.strip():
                continue
            if budget is not None and used + len(text) > budget:
                text = text[: budget - used]
            part.append(Document(name, text))
            used += len(text)
        start = max(index, n_val)  # documents a full validation budget passed over stay out of training
    # min_documents=1 (analysis reads both splits together): one non-empty split is enough
    filled = (bool(corpus.train), bool(corpus.validation))
    if not (any(filled) if min_documents == 1 else all(filled)):
        raise ValueError(f"corpus {source} is empty: no non-blank text in its train or validation split")
    return corpus


def load_corpus(
    data: str | os.PathLike | None = None,
    *,
    val_fraction: float = 0.05,
    max_train_chars: int | None = None,
    max_val_chars: int | None = None,
    min_documents: int = 2,
) -> Corpus:
    """Load and split a corpus.

    Args:
        data: ``None`` for the embedded default (every ``.py`` file of the standard library of
            the running interpreter), a directory (every non-hidden UTF-8 text file, recursively;
            ``.jsonl`` files inside it are read record by record; a lone text file is cut as
            below), a ``.jsonl`` file (one JSON object with a ``"text"`` field per line), or any
            other text file (cut into chunks of about ``TXT_CHUNK_CHARS`` characters at line
            boundaries).
        val_fraction: share of documents held out for validation, in ``(0, 0.5]``.
        max_train_chars / max_val_chars: character budgets (``None`` = everything); the last
            document taken is truncated to fit.
        min_documents: 2 for training (one per split at least); 1 for a corpus that is not split
            (routing analysis): its documents may then lie in either split.

    Raises:
        ValueError: a missing path, no text, fewer than 2 documents, or bad ``.jsonl`` records.
    """
    if not 0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction!r}")
    for name, value in (("max_train_chars", max_train_chars), ("max_val_chars", max_val_chars)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {value!r}")
    kwargs = dict(val_fraction=val_fraction, max_train_chars=max_train_chars, max_val_chars=max_val_chars,
                  min_documents=min_documents)
    if data is None:
        root = default_corpus_root()
        files = _walk_files(root, (".py",), _STDLIB_SKIP_DIRS)
        if not files:
            raise ValueError(f"the default corpus {root} (the Python standard library) has no .py files")
        candidates = [(p.relative_to(root).as_posix(), p) for p in files]
        return _split(candidates, _read_text, source=f"stdlib:{root}", **kwargs)

    path = Path(data)
    if not path.exists():
        raise ValueError(f"--data {path}: no such file or directory")
    source = str(path.resolve())  # absolute: a resume or an analysis may run from another directory
    if path.is_dir():
        candidates: list[tuple[str, object]] = []
        for file in _walk_files(path, None, _DATA_SKIP_DIRS):
            rel = file.relative_to(path).as_posix()
            if file.suffix == ".jsonl":
                if _read_text(file) is None:
                    continue  # binary / not UTF-8, as for other files in a directory
                candidates.extend((d.name, d) for d in _jsonl_documents(file, rel))
            else:
                candidates.append((rel, file))  # read lazily in _split; binary files are skipped

        def read(handle: object) -> str | None:
            return handle.text if isinstance(handle, Document) else _read_text(handle)

        if not candidates:
            raise ValueError(f"--data {path}: the directory contains no files (hidden files and "
                             "directories and __pycache__ are skipped)")
        usable = []  # (name, handle, text) of readable, non-blank candidates, until enough to split
        for name, handle in candidates:
            text = read(handle)
            if text is not None and text.strip():
                usable.append((name, handle, text))
                if len(usable) >= min_documents:
                    break
        if not usable:
            raise ValueError(f"--data {path}: every file in the directory is empty, binary or not UTF-8 "
                             "(such files are skipped): no text to train on")
        if len(usable) < min_documents:  # one text file: cut into documents, as that file alone would be
            candidates = [(d.name, d) for name, handle, text in usable
                          for d in ([handle] if isinstance(handle, Document) else _txt_documents(text, name))]
        return _split(candidates, read, source=source, **kwargs)
    if path.suffix == ".jsonl":
        docs = list(_jsonl_documents(path, path.name))
    else:
        text = _read_text(path)
        if text is None:
            raise ValueError(f"--data {path}: not a UTF-8 text file")
        docs = list(_txt_documents(text, path.name))
    if not any(d.text.strip() for d in docs):
        raise ValueError(f"--data {path}: the file has no text")
    return _split([(d.name, d) for d in docs], lambda d: d.text, source=source, **kwargs)
