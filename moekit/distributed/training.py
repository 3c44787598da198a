"""What ``moekit train`` needs to run under ``torchrun`` with experts split across processes.

``torchrun --nproc-per-node 2 -m moekit train --expert-parallel 2 ...``: every rank builds the same
model from the same seed and reads the same global batch of ``batch_size`` windows, keeps its
``batch_size / W`` rows, and holds ``E / ep_size`` experts of every MoE layer. Rank 0 prepares the run
directory, logs and writes checkpoints; a checkpoint is the ordinary single-file one (experts gathered),
so ``moekit generate`` / ``load_run`` use it in one process and a resume may change the EP size.
The training loop calls the methods below; all logic lives here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.distributed.groups import (
    DEFAULT_TIMEOUT_S,
    check_same_across_ranks,
    init_distributed,
    new_expert_parallel_groups,
)
from moekit.distributed.parallel import clip_grad_norm_, moe_layers, parallelize_moe, sync_gradients

T = TypeVar("T")


def resolve_expert_parallel(flag: int | None) -> int:
    """The EP size for ``moekit train``: ``0`` = one process without torch.distributed.

    ``None`` (flag not given) is 1 (data parallel only) when launched by torchrun with several ranks,
    else 0.
    """
    if flag is None:
        return 1 if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    if not isinstance(flag, int) or isinstance(flag, bool) or flag < 1:
        raise ValueError(f"--expert-parallel must be an int >= 1, got {flag!r}")
    return flag


class ExpertParallelRun:
    """One rank's view of an expert-parallel training job (joins it on construction).

    Raises:
        ValueError: ``ep_size`` does not divide the number of ranks.
        ValueError: not launched by torchrun (no ``RANK`` / ``WORLD_SIZE`` in the environment).
    """

    def __init__(self, ep_size: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        init_distributed(timeout_s=timeout_s)
        self.groups = new_expert_parallel_groups(ep_size, timeout_s)
        self.rank, self.world_size = self.groups.rank, self.groups.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """One GPU per rank (``LOCAL_RANK``) on CUDA; unchanged on CPU."""
        if device.type == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return device

    def run_on_main(self, fn: Callable[[], T], share_result: bool = False) -> T | None:
        """Run ``fn`` on rank 0 only; every rank raises if it failed there (no rank waits forever).

        Returns ``fn()``'s result on rank 0, and on the other ranks too when ``share_result`` (it is
        then pickled and broadcast: keep it small), else ``None`` there.
        """
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as err:  # re-raised below, after telling the other ranks
                error = err
        box = [None if error is None else f"{type(error).__name__}: {error}",
               result if share_result and error is None else None]
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if box[0] is not None:  # a usage error on rank 0 stays a usage error on every rank
            kind = ValueError if box[0].startswith(("ValueError", "TypeError")) else RuntimeError
            raise kind(f"rank 0 failed: {box[0]}")
        return result if self.is_main else box[1]

    def split_rng(self, saved: list[Any] | None = None) -> None:
        """Give each rank its own torch RNG stream (routing noise must differ between the ranks'
        tokens): ``saved[rank]`` when a checkpoint of as many ranks holds them (an exact resume), else
        one seed drawn alike on every rank (same state), plus the rank."""
        from moekit.train.checkpoint import restore_rng_state

        if saved is not None and len(saved) == self.world_size:
            restore_rng_state(saved[self.rank])
            return
        torch.manual_seed(int(torch.randint(0, 2**62, ())) + self.rank)

    def gather_objects(self, obj: T) -> list[T]:
        """``obj`` of every rank, in rank order (pickled: keep it small)."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any (e.g. a stop signal seen by one rank)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def check_configs(self, model_config: Any, train_config: Any) -> None:
        """Same model and training config on every rank; the global batch and the experts split evenly."""
        if getattr(train_config, "compile", False):
            raise ValueError("--compile is not supported with --expert-parallel (collectives in the graph)")
        batch = int(train_config.batch_size)
        if batch % self.world_size:
            raise ValueError(
                f"--batch-size {batch} (the global batch) must be divisible by the number of ranks "
                f"{self.world_size}"
            )
        experts, ep_size = int(getattr(model_config, "num_experts", 0)), self.groups.ep_size
        if experts and experts % ep_size:
            raise ValueError(f"num_experts={experts} is not divisible by --expert-parallel {ep_size}")
        check_same_across_ranks({"model": model_config, "train": train_config}, what="model/train config")

    def shard(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
        """Split the experts of ``model`` (and their optimizer state) across the EP group."""
        return parallelize_moe(model, self.groups, optimizer)

    def describe(self) -> str:
        """One log line: ranks, EP layout, backend."""
        g = self.groups
        return (f"expert parallel: {g.world_size} ranks ({dist.get_backend()}), EP groups of {g.ep_size} "
                f"(each rank holds 1/{g.ep_size} of the experts), {g.expert_dp_size} data-parallel "
                f"cop{'y' if g.expert_dp_size == 1 else 'ies'} of each expert shard")

    def local_batch(self, batch: Tensor, allow_uneven: bool = False) -> Tensor:
        """This rank's rows of the global batch ``(B, S)`` -> ``(B / W, S)``; with ``allow_uneven``
        ``B`` need not divide (``torch.tensor_split``: the first ``B % W`` ranks get one row more)."""
        if batch.shape[0] % self.world_size and not allow_uneven:
            raise ValueError(f"a batch of {batch.shape[0]} rows does not split over {self.world_size} ranks")
        return torch.tensor_split(batch, self.world_size)[self.rank]

    def mean(self, value: float) -> float:
        """Mean of a Python float over all ranks."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def sum_tensors(self, tensors: list[Tensor]) -> list[Tensor]:
        """Element-wise sum over all ranks of a list of tensors (e.g. per-layer expert loads)."""
        if not tensors:
            return tensors
        flat = torch.cat([t.reshape(-1).double() for t in tensors]).to(self._comm_device())
        dist.all_reduce(flat)
        out, offset = [], 0
        for t in tensors:
            out.append(flat[offset : offset + t.numel()].view_as(t).to(t.device, t.dtype))
            offset += t.numel()
        return out

    def sync_and_clip(self, model: nn.Module, max_norm: float) -> float:
        """Average gradients across ranks, clip by the global norm; returns the norm."""
        sync_gradients(model, self.groups)
        return float(clip_grad_norm_(model, max_norm, self.groups))

    def barrier(self) -> None:
        dist.barrier()

    def _comm_device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @contextlib.contextmanager
    def unsharded(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Iterator[None]:
        """Inside: every expert tensor (and its optimizer state) holds all ``E`` experts on every rank,
        so ``model.state_dict()`` is the single-process one; the shards come back on exit."""
        groups = self.groups
        swapped: list[tuple[Tensor, Tensor]] = []

        def gather(t: Tensor) -> Tensor:
            parts = [torch.empty_like(t) for _ in range(groups.ep_size)]
            dist.all_gather(parts, t.detach().contiguous(), group=groups.ep_group)
            return torch.cat(parts)

        with torch.no_grad():
            for _, moe in moe_layers(model):
                for p in moe.experts.parameters(recurse=False):
                    local = p.shape[0]
                    tensors = [p]
                    if optimizer is not None and p in optimizer.state:
                        tensors += [v for v in optimizer.state[p].values()
                                    if torch.is_tensor(v) and v.dim() and v.shape[0] == local]
                    for t in tensors:
                        swapped.append((t, t.data))
                        t.data = gather(t)
        try:
            yield
        finally:
            for t, data in swapped:
                t.data = data
            dist.barrier()
