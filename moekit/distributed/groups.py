"""Process groups for expert parallelism inside data parallelism.

With ``W`` ranks and expert-parallel size ``P`` (``W % P == 0``), rank ``r`` is in

* the **EP group** ``{P*(r//P), ..., P*(r//P)+P-1}``: consecutive ranks that share one copy of the
  experts, each holding ``E/P`` of them; tokens move inside this group by all-to-all;
* the **expert-DP group** ``{r % P, r % P + P, ...}``: ranks holding the same expert shard (one per
  EP group); expert gradients are summed there;
* the **world**: every rank sees different data, so replicated (non-expert) parameters are
  averaged over all ranks and the global-batch balance statistics are summed over all ranks.

Every group is made with a timeout, so a dead or mismatched peer ends in an error, not a hang.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

DEFAULT_TIMEOUT_S = 300.0


def _timeout(timeout_s: float) -> datetime.timedelta:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    return datetime.timedelta(seconds=float(timeout_s))


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the job that ``torchrun`` (or any launcher setting ``RANK``/``WORLD_SIZE``/``MASTER_*``) started.

    No-op when the default process group already exists. ``backend`` defaults to ``"nccl"`` when
    CUDA is available, else ``"gloo"``. Collectives that wait longer than ``timeout_s`` raise.
    """
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(
            f"expert parallelism needs the launcher's environment variables (missing {missing}); "
            "start the job with `torchrun --nproc-per-node N ...`"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=_timeout(timeout_s))


@dataclass(frozen=True)
class ParallelGroups:
    """The groups one rank belongs to (see the module docstring).

    Attributes:
        ep_size: ranks per EP group ``P``; ``ep_rank`` this rank's index in it (its expert shard).
        ep_group: the EP group (``None`` only when running without torch.distributed).
        expert_dp_group: ranks holding the same expert shard; ``expert_dp_size = W / P``.
        world_size / rank: the whole job; ``dp_group`` is the world group.
    """

    ep_size: int
    ep_rank: int
    ep_group: ProcessGroup | None
    expert_dp_size: int
    expert_dp_group: ProcessGroup | None
    world_size: int
    rank: int
    dp_group: ProcessGroup | None


def single_process_groups() -> ParallelGroups:
    """The trivial layout of a run without torch.distributed."""
    return ParallelGroups(1, 0, None, 1, None, 1, 0, None)


def new_expert_parallel_groups(ep_size: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelGroups:
    """Create the EP and expert-DP groups; a collective call: every rank must call it with the same args.

    Raises:
        ValueError: ``ep_size`` is not a positive divisor of the world size.
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "new_expert_parallel_groups needs torch.distributed; call init_distributed() first"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1 or world % ep_size:
        raise ValueError(f"ep_size must be a positive divisor of the world size {world}, got {ep_size!r}")
    # Both layouts must agree on every rank before any group is built, or new_group would hang.
    check_same_across_ranks({"ep_size": ep_size, "world_size": world}, what="expert-parallel set-up")
    timeout = _timeout(timeout_s)
    ep_lists = [list(range(s, s + ep_size)) for s in range(0, world, ep_size)]
    edp_lists = [list(range(j, world, ep_size)) for j in range(ep_size)]
    ep_group = edp_group = None
    # new_group is collective over the world: every rank creates every group, in the same order.
    for ranks in ep_lists:
        g = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            ep_group = g
    for ranks in edp_lists:
        g = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            edp_group = g
    return ParallelGroups(
        ep_size=ep_size,
        ep_rank=rank % ep_size,
        ep_group=ep_group,
        expert_dp_size=world // ep_size,
        expert_dp_group=edp_group,
        world_size=world,
        rank=rank,
        dp_group=dist.group.WORLD,
    )


def config_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (dicts sorted by key; dataclasses via ``to_dict``/vars)."""

    def default(o: Any) -> Any:
        if hasattr(o, "to_dict"):
            return o.to_dict()
        if hasattr(o, "__dataclass_fields__"):
            return {k: getattr(o, k) for k in o.__dataclass_fields__}
        return repr(o)

    text = json.dumps(obj, sort_keys=True, default=default)
    return hashlib.sha256(text.encode()).hexdigest()


def check_same_across_ranks(obj: Any, what: str = "config", group: ProcessGroup | None = None) -> str:
    """All-gather the hash of ``obj`` and fail on every rank if any rank differs.

    Raises:
        ValueError: naming ``what`` and the ranks whose hash differs from rank 0's.
    """
    digest = config_hash(obj)
    if not dist.is_initialized():
        return digest
    world = dist.get_world_size(group)
    # A fixed-size uint8 tensor keeps this a plain all_gather (works on gloo and nccl alike).
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    hashes = [bytes(p.cpu().tolist()).hex() for p in parts]
    bad = [i for i, h in enumerate(hashes) if h != hashes[0]]
    if bad:
        raise ValueError(
            f"mismatched {what} across ranks: ranks {bad} differ from rank 0 "
            f"(hash {hashes[0][:12]} vs {[hashes[i][:12] for i in bad]}); every rank must use the same {what}"
        )
    return digest
