"""TrainConfig: every knob of ``moekit train``, and the rules for resuming a run with changed knobs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# Knobs that decide which numbers the run computes; a resume must keep them, or it would not
# continue the same run. The others (step budget, cadence, device) may change on resume.
IDENTITY_FIELDS = (
    "batch_size", "seq_len", "grad_accum", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
    "beta1", "beta2", "grad_clip", "seed", "val_fraction", "max_train_chars", "max_val_chars",
    "tokenizer_chars",
)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Configuration of :func:`moekit.train.train`.

    Attributes:
        max_steps: optimizer steps in total (the cosine schedule ends here).
        batch_size: sequences per micro-batch ``B``.
        seq_len: tokens per sequence ``S`` (at most the model's ``max_position_embeddings``).
        grad_accum: micro-batches per optimizer step (tokens per step = ``B * S * grad_accum``).
        lr: peak learning rate, reached at the last of ``warmup_steps`` linear steps, then cosine
            decay to ``lr * min_lr_ratio``, the rate of the last step (``max_steps - 1``).
        weight_decay: AdamW decoupled weight decay on matrices (not on norms / biases).
        beta1, beta2: AdamW betas.
        grad_clip: clip the global gradient norm to this value (0 disables).
        eval_every: validation loss every this many steps (and at the end); 0 = only at the end.
        eval_batches: validation batches of ``batch_size`` sequences (fixed, first windows).
        save_every: checkpoint every this many steps (and at the end / on Ctrl-C); 0 = end only.
        keep_last: checkpoints kept on disk.
        log_every: metrics line every this many steps.
        seed: seeds the model init, the data order and every random draw in training.
        compile: wrap the model in ``torch.compile`` for training.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        val_fraction: share of documents held out for validation.
        max_train_chars / max_val_chars: character budgets of the two splits (None = all).
        tokenizer_chars: characters of the training split used to train the tokenizer.
    """

    max_steps: int = 150
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 15
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 50
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    compile: bool = False
    device: str = "auto"
    val_fraction: float = 0.05
    max_train_chars: int | None = 3_000_000
    max_val_chars: int | None = 200_000
    tokenizer_chars: int | None = 1_000_000

    def __post_init__(self) -> None:
        for name, minimum in (("max_steps", 1), ("batch_size", 1), ("seq_len", 2), ("grad_accum", 1),
                              ("warmup_steps", 0), ("eval_every", 0), ("eval_batches", 1),
                              ("save_every", 0), ("keep_last", 1), ("log_every", 1), ("seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"TrainConfig.{name} must be an int >= {minimum}, got {value!r}")
        if self.seed >= 2**63:  # torch.manual_seed takes 64 bits; the data order adds to the seed
            raise ValueError(f"TrainConfig.seed must be < 2**63, got {self.seed!r}")
        for name in ("max_train_chars", "max_val_chars", "tokenizer_chars"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"TrainConfig.{name} must be an int >= 1 or None, got {value!r}")
        for name in ("lr", "min_lr_ratio", "beta1", "beta2", "weight_decay", "grad_clip", "val_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"TrainConfig.{name} must be a finite number, got {value!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"TrainConfig.compile must be True or False, got {self.compile!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 < self.val_fraction <= 0.5:
            raise ValueError(f"TrainConfig.val_fraction must be in (0, 0.5], got {self.val_fraction!r}")
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda")
            or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            raise ValueError(
                f"TrainConfig.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
            )

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine decay."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        # The peak is the warmup's last step (or step 0 without warmup); the last step gets the floor.
        peak = max(0, self.warmup_steps - 1)
        progress = min(1.0, (step - peak) / max(1, self.max_steps - 1 - peak))
        floor = self.lr * self.min_lr_ratio
        return floor + 0.5 * (self.lr - floor) * (1 + math.cos(math.pi * progress))

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (validated again); unknown names raise ValueError."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {unknown}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig key(s): {unknown}; allowed: {sorted(names)}")
        return cls(**d)


def resume_train_config(saved: TrainConfig, changes: dict[str, Any]) -> TrainConfig:
    """``saved`` with ``changes`` applied, refusing changes to :data:`IDENTITY_FIELDS`.

    Raises:
        ValueError: naming each identity field whose requested value differs from the run's.
    """
    clashes = [
        f"{name}: run has {getattr(saved, name)!r}, asked for {value!r}"
        for name, value in changes.items()
        if name in IDENTITY_FIELDS and value != getattr(saved, name)
    ]
    if clashes:
        raise ValueError(
            "cannot resume: the run was trained with another configuration (" + "; ".join(clashes) + "); "
            "drop these options or start a new run with another --out"
        )
    return saved.replace(**changes)
