"""Turn a model into its expert-parallel shard, and keep the shards' gradients right.

    groups = new_expert_parallel_groups(ep_size)
    parallelize_moe(model, groups)          # every moekit.MoE: experts[E] -> experts[E/P], EP dispatcher
    loss.backward(); sync_gradients(model, groups); clip_grad_norm_(model, 1.0, groups); opt.step()

Gradient rule (``W`` ranks, each a different slice of the global batch, objective = mean of the ranks'
losses): a replicated parameter's gradient is the world mean; an expert shard's local gradient already
sums the contributions of every rank of its EP group (through the all-to-all backward), so it is summed
over the expert-DP group and divided by ``W``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.core.losses import BalanceStats
from moekit.core.moe import MoE
from moekit.distributed.dispatch import ExpertParallelDispatcher
from moekit.distributed.groups import ParallelGroups, check_same_across_ranks


class GlobalBatchStats(BalanceStats):
    """Routed-slot counts of the *global* batch for the load-balancing loss's ``f``.

    Unlike :class:`BalanceStats` nothing accumulates between calls: each training forward sums the
    current micro-batch's counts over ``group`` (default: every rank, i.e. the data-parallel world),
    so ``mean over ranks of aux_loss`` equals the single-process loss of the concatenated batch when
    the ranks hold equal token counts (``P`` is each rank's own mean).
    """

    def __init__(self, num_experts: int, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(num_experts)
        self.group = group

    def add(self, counts_E: Tensor) -> Tensor:
        counts_E = counts_E.detach().float().clone()
        dist.all_reduce(counts_E, group=self.group)
        return counts_E


def moe_layers(module: nn.Module) -> Iterator[tuple[str, MoE]]:
    """Every ``moekit.MoE`` in ``module`` (itself included), with its qualified name."""
    for name, sub in module.named_modules():
        if isinstance(sub, MoE):
            yield name, sub


def expert_parameters(module: nn.Module) -> set[int]:
    """``id()`` of every routed-expert parameter (sharded along E under EP)."""
    return {id(p) for _, moe in moe_layers(module) for p in moe.experts.parameters()}


def _shard_rows(p: Tensor, rank: int, size: int) -> Tensor:
    per = p.shape[0] // size
    return p.detach()[rank * per : (rank + 1) * per].clone()


@torch.no_grad()
def parallelize_moe(
    module: nn.Module, groups: ParallelGroups, optimizer: torch.optim.Optimizer | None = None
) -> nn.Module:
    """Shard every ``moekit.MoE`` in ``module`` over ``groups.ep_group`` in place; returns ``module``.

    Each rank keeps experts ``[ep_rank * E/P, (ep_rank + 1) * E/P)`` of the stacked weights (state_dict
    names unchanged, dim 0 shorter), the router and everything else stay replicated, and the layer's
    dispatcher becomes an :class:`ExpertParallelDispatcher` (with ``ep_size == 1`` the experts stay whole
    and local: data parallelism). Every layer's balance statistics become global-batch ones
    (:class:`GlobalBatchStats`). Call it on every rank with identical
    weights (same seed, or loaded from the same checkpoint). ``optimizer``, when given, has its
    parameters and per-parameter state (e.g. Adam moments) sharded the same way.

    Raises:
        ValueError: the MoE layers' configs differ across ranks, a layer's ``num_experts`` is not
            divisible by ``groups.ep_size``, or a layer is already sharded.
    """
    if not isinstance(groups, ParallelGroups):
        raise TypeError(
            f"groups must be ParallelGroups (from new_expert_parallel_groups), got {type(groups).__name__}"
        )
    if groups.ep_group is None:
        raise ValueError("parallelize_moe needs groups from new_expert_parallel_groups (ep_group is None)")
    layers = list(moe_layers(module))
    # Collective, before any local check can raise on some ranks only: same layers everywhere.
    check_same_across_ranks([(name, moe.config) for name, moe in layers], what="MoE layer configs")
    replaced: dict[int, nn.Parameter] = {}
    for name, moe in layers:
        num_experts = moe.config.num_experts
        if num_experts % groups.ep_size:
            raise ValueError(
                f"{name or 'MoE'}: num_experts={num_experts} is not divisible by ep_size={groups.ep_size}"
            )
        if isinstance(moe.dispatcher, ExpertParallelDispatcher):
            raise ValueError(f"{name or 'MoE'} is already expert-parallel")
        moe.balance_stats = GlobalBatchStats(num_experts, groups.dp_group)
        if groups.ep_size == 1:  # data parallel only: every rank keeps all experts, nothing to exchange
            continue
        for pname, param in list(moe.experts.named_parameters(recurse=False)):
            if param.shape[0] != num_experts:
                raise ValueError(
                    f"{name}.experts.{pname}: dim 0 is {param.shape[0]}, expected E={num_experts}"
                )
            shard = nn.Parameter(_shard_rows(param, groups.ep_rank, groups.ep_size), param.requires_grad)
            setattr(moe.experts, pname, shard)
            replaced[id(param)] = shard
            if optimizer is not None and param in optimizer.state:
                optimizer.state[shard] = {
                    k: _shard_rows(v, groups.ep_rank, groups.ep_size)
                    if torch.is_tensor(v) and v.dim() and v.shape[0] == num_experts else v
                    for k, v in optimizer.state.pop(param).items()
                }
        moe.experts.num_experts = num_experts // groups.ep_size

        def capacity_fn(num_tokens: int, moe: MoE = moe) -> int | None:
            return moe.config.capacity(num_tokens, moe.training)

        moe.dispatcher = ExpertParallelDispatcher(num_experts, groups.ep_group, capacity_fn)
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["params"] = [replaced.get(id(p), p) for p in group["params"]]
    return module


def _all_reduce_grads(params: list[nn.Parameter], group: dist.ProcessGroup | None, scale: float) -> None:
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective per group, not one per tensor
    dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def sync_gradients(module: nn.Module, groups: ParallelGroups) -> None:
    """Average gradients after ``backward`` so every rank holds the gradient of the mean objective.

    Replicated parameters: world mean. Expert shards: sum over the expert-DP group, divided by the
    world size. Parameters without a gradient get zeros first (every rank must join each collective).
    """
    if groups.world_size == 1:
        return
    experts = expert_parameters(module)
    replicated, sharded = [], []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (sharded if id(p) in experts else replicated).append(p)
    _all_reduce_grads(replicated, groups.dp_group, 1.0 / groups.world_size)
    if groups.expert_dp_size > 1:
        _all_reduce_grads(sharded, groups.expert_dp_group, 1.0 / groups.world_size)
    else:
        for p in sharded:
            p.grad.mul_(1.0 / groups.world_size)


@torch.no_grad()
def clip_grad_norm_(module: nn.Module, max_norm: float, groups: ParallelGroups) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole (sharded) model, after :func:`sync_gradients`.

    The norm counts every replicated gradient once and every expert shard of the EP group once, so it
    equals the single-process norm. Returns the total norm (before clipping): float64 if a gradient
    is, else float32 (it is summed in float64).
    """
    experts = expert_parameters(module)
    params = [p for p in module.parameters() if p.grad is not None]
    rep = [p.grad for p in params if id(p) not in experts]
    shard = [p.grad for p in params if id(p) in experts]
    device = params[0].grad.device if params else torch.device("cpu")
    zero = torch.zeros((), dtype=torch.float64, device=device)
    rep_sq = sum((g.double().square().sum() for g in rep), zero)
    shard_sq = sum((g.double().square().sum() for g in shard), zero.clone())
    if groups.ep_size > 1:
        dist.all_reduce(shard_sq, group=groups.ep_group)
    total = (rep_sq + shard_sq).sqrt()
    if math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in params:
            p.grad.mul_(coef.to(p.grad.dtype))
    return total.to(torch.float64 if any(g.dtype == torch.float64 for g in rep + shard) else torch.float32)


@torch.no_grad()
def gather_experts(module: nn.Module, groups: ParallelGroups) -> dict[str, Tensor]:
    """Full ``(E, ...)`` expert tensors of a sharded ``module`` by state_dict name (collective over EP).

    With :func:`moekit.distributed.checkpoint.save_sharded` nothing needs gathering; this serves the
    single-file checkpoints of the training loop (``model.safetensors`` loadable by one process).
    """
    out: dict[str, Tensor] = {}
    for name, moe in moe_layers(module):
        head = f"{name}.experts." if name else "experts."
        for pname, param in moe.experts.named_parameters(recurse=False):
            parts = [torch.empty_like(param) for _ in range(groups.ep_size)]
            dist.all_gather(parts, param.detach().contiguous(), group=groups.ep_group)
            out[head + pname] = torch.cat(parts)
    return out
