"""Setting up a run directory: corpus -> tokenizer -> token streams, all checked before writing."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from moekit.train.config import TrainConfig
from moekit.train.corpus import load_corpus
from moekit.train.data import _windows, encode_documents
from moekit.train.run import DATA_FILE, LOCK_FILE, TOKENIZER_FILE, write_run_info
from moekit.train.tokenizer import PAD_TOKEN, eos_token_id, save_tokenizer, train_tokenizer


def check_new_run_dir(out: str | os.PathLike) -> Path:
    """``out`` must not exist, or be an empty directory; otherwise ValueError (nothing is touched)."""
    path = Path(out)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"--out {path} exists and is not a directory; choose another --out")
        if any(p.name != LOCK_FILE for p in path.iterdir()):  # the lock: claim_run_dir's, ours
            raise ValueError(
                f"--out {path} already exists and is not empty; pass --resume to continue that run, "
                "or choose another --out (nothing was overwritten)"
            )
    return path


def prepare_run(
    out: str | os.PathLike,
    model_config: Any,
    train_config: TrainConfig,
    data: str | os.PathLike | None = None,
    log=print,
) -> tuple[Any, Tokenizer, dict[str, np.ndarray]]:
    """Build a new run in ``out``: split the corpus, train the tokenizer, tokenise, write ``run.json``.

    Every check (corpus present and non-empty, enough tokens for one window, ``seq_len`` within the
    model's context) happens before the first file is written.

    Returns:
        ``(model_config, tokenizer, {"train": ids, "validation": ids})``; ``model_config`` has the
        tokenizer's special token ids filled in.
    """
    path = check_new_run_dir(out)
    if train_config.seq_len > model_config.max_position_embeddings:
        raise ValueError(
            f"--seq-len {train_config.seq_len} exceeds the model's context "
            f"(max_position_embeddings={model_config.max_position_embeddings})"
        )
    t0 = time.perf_counter()
    corpus = load_corpus(
        data,
        val_fraction=train_config.val_fraction,
        max_train_chars=train_config.max_train_chars,
        max_val_chars=train_config.max_val_chars,
    )
    tokenizer = train_tokenizer(
        (d.text for d in corpus.train), model_config.vocab_size, max_chars=train_config.tokenizer_chars
    )
    eos = eos_token_id(tokenizer)
    tokens = {
        "train": encode_documents(tokenizer, (d.text for d in corpus.train), eos),
        "validation": encode_documents(tokenizer, (d.text for d in corpus.validation), eos),
    }
    _windows(tokens["train"], train_config.seq_len, "training")
    _windows(tokens["validation"], train_config.seq_len, "validation")
    model_config = model_config.replace(
        bos_token_id=eos, eos_token_id=eos, pad_token_id=tokenizer.token_to_id(PAD_TOKEN)
    )
    data_info = {
        "source": corpus.source,
        "documents": corpus.num_documents,
        "train_documents": len(corpus.train),
        "validation_documents": len(corpus.validation),
        "train_chars": corpus.train_chars,
        "validation_chars": corpus.validation_chars,
        "train_tokens": int(len(tokens["train"])),
        "validation_tokens": int(len(tokens["validation"])),
        "tokenizer_vocab_size": tokenizer.get_vocab_size(),
    }
    path.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, path / TOKENIZER_FILE)
    tmp = path / f".{DATA_FILE}.tmp-{os.getpid()}"
    save_file({k: torch.from_numpy(v) for k, v in tokens.items()}, str(tmp))
    os.replace(tmp, path / DATA_FILE)
    write_run_info(
        path,
        {"model_config": model_config.to_dict(), "train_config": train_config.to_dict(), "data": data_info},
    )
    log(
        f"corpus {corpus.source}: {len(corpus.train)} train / {len(corpus.validation)} validation documents, "
        f"{data_info['train_tokens']:,} / {data_info['validation_tokens']:,} tokens "
        f"(vocab {data_info['tokenizer_vocab_size']}, prepared in {time.perf_counter() - t0:.1f}s)"
    )
    return model_config, tokenizer, tokens


def load_tokens(run_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """The token streams a run was prepared with."""
    file = Path(run_dir) / DATA_FILE
    if not file.is_file():
        raise ValueError(f"run {run_dir} has no {DATA_FILE}; it cannot be resumed")
    try:
        return {k: v.numpy() for k, v in load_file(str(file)).items()}
    except SafetensorError as err:
        raise ValueError(f"run {run_dir}: {DATA_FILE} is damaged ({err}); it cannot be resumed") from None
