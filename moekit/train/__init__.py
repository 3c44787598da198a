"""Training: corpus + tokenizer, token streams, the loop, checkpoints and run directories."""

from moekit.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from moekit.train.config import TrainConfig
from moekit.train.corpus import Corpus, Document, default_corpus_root, load_corpus
from moekit.train.data import TokenStream, encode_documents, validation_batches
from moekit.train.loop import TrainingDiverged, TrainResult, evaluate, train
from moekit.train.run import load_run, read_run_info
from moekit.train.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

__all__ = [
    "Corpus",
    "Document",
    "TokenStream",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "default_corpus_root",
    "encode_documents",
    "evaluate",
    "list_checkpoints",
    "load_checkpoint",
    "load_corpus",
    "load_run",
    "load_tokenizer",
    "read_run_info",
    "save_checkpoint",
    "save_tokenizer",
    "train",
    "train_tokenizer",
    "validation_batches",
]
