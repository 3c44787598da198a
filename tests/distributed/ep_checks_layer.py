"""Checks run by ep_worker.py: the EP layer equals the single-process layer (float64),
for dropless and capacity routers, and sharded checkpoints round-trip 2 -> 1 -> 2."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist
from torch.testing import assert_close

from moekit import MoE, MoEConfig
from moekit.distributed import groups as G
from moekit.distributed.checkpoint import load_sharded, save_sharded
from moekit.distributed.parallel import clip_grad_norm_, gather_experts, parallelize_moe, sync_gradients

TOL = {"atol": 1e-12, "rtol": 1e-12}
CONFIGS = [
    {"router": "topk", "top_k": 2},  # dropless
    {"router": "topk", "top_k": 2, "capacity_factor": 0.5, "shared_expert_intermediate_size": 8},
    {"router": "switch", "top_k": 1, "capacity_factor": 1.0, "router_z_loss_coef": 1e-3},
    {"router": "sigmoid_bias", "top_k": 2, "activation": "gelu"},
]


def check_layer(
    overrides: dict, pg: G.ParallelGroups, tokens_per_rank: int = 13, only_upper: bool = False
) -> None:
    """``only_upper``: route every token to experts 4..7 (EP rank 0's experts get no rows at all)."""
    world, rank = pg.world_size, pg.rank
    cfg = MoEConfig(hidden_size=12, intermediate_size=16, num_experts=8, **overrides)
    torch.manual_seed(0)
    full = MoE(cfg).double().train()
    gen = torch.Generator().manual_seed(1)
    x_all = torch.randn(world * tokens_per_rank, 12, dtype=torch.float64, generator=gen)
    if only_upper:  # positive inputs, gate rows 0..3 zero and 4..7 positive: experts 4..7 win
        x_all = x_all.abs()
        with torch.no_grad():
            full.gate.weight[:4] = 0.0
            full.gate.weight[4:] = full.gate.weight[4:].abs() + 0.1
    ep = parallelize_moe(copy.deepcopy(full), pg)
    g_all = torch.randn(world * tokens_per_rank, 12, dtype=torch.float64, generator=gen)
    rows = slice(rank * tokens_per_rank, (rank + 1) * tokens_per_rank)

    xf = x_all.clone().requires_grad_()
    yf, info_f = full(xf)
    ((yf * g_all).sum() + info_f.aux_loss).backward()

    x = x_all[rows].clone().requires_grad_()
    y, info = ep(x)
    # Each rank's objective; their mean is the single-process objective.
    (world * (y * g_all[rows]).sum() + info.aux_loss).backward()
    sync_gradients(ep, pg)

    what = f"{overrides}"
    assert_close(y, yf[rows].detach(), **TOL, msg=f"output {what}")
    assert torch.equal(info.kept, info_f.kept[rows]), what
    aux = info.aux_loss.detach().clone()
    dist.all_reduce(aux)
    assert_close(aux / world, info_f.aux_loss.detach(), **TOL, msg=f"aux {what}")
    tpe = info.tokens_per_expert.clone()
    dist.all_reduce(tpe)
    assert torch.equal(tpe, info_f.tokens_per_expert), (what, tpe, info_f.tokens_per_expert)
    dropped = info.dropped.clone()
    dist.all_reduce(dropped)
    assert int(dropped) == int(info_f.dropped), what
    if "capacity_factor" in overrides:
        assert int(info_f.dropped) > 0, f"capacity case drops nothing: {what}"
    assert_close(x.grad / world, xf.grad[rows], **TOL, msg=f"input grad {what}")
    per = cfg.num_experts // pg.ep_size
    full_params = dict(full.named_parameters())
    for name, p in ep.named_parameters():
        ref = full_params[name].grad
        if name.startswith("experts."):
            ref = ref[pg.ep_rank * per : (pg.ep_rank + 1) * per]
        assert_close(p.grad, ref, **TOL, msg=f"grad {name} {what}")
    norm, ref_norm = clip_grad_norm_(ep, 1e-3, pg), torch.nn.utils.clip_grad_norm_(full.parameters(), 1e-3)
    assert norm.dtype == torch.float64 and float(ref_norm) > 1e-3, (norm, ref_norm)
    assert_close(norm, ref_norm, **TOL, msg=f"grad norm {what}")
    for name, p in ep.named_parameters():  # clipped alike
        ref = full_params[name].grad
        if name.startswith("experts."):
            ref = ref[pg.ep_rank * per : (pg.ep_rank + 1) * per]
        assert_close(p.grad, ref, **TOL, msg=f"clipped grad {name} {what}")


def check_errors(pg: G.ParallelGroups) -> None:
    try:
        parallelize_moe(MoE(MoEConfig(hidden_size=4, intermediate_size=4, num_experts=3, top_k=1)), pg)
    except ValueError as e:
        assert "num_experts=3" in str(e) and "ep_size=2" in str(e), e
    else:
        raise AssertionError("num_experts=3 on ep_size=2 must raise")
    try:  # rank 1 builds another layer: every rank learns it before any exchange could hang
        parallelize_moe(MoE(MoEConfig(hidden_size=4, intermediate_size=4, top_k=1 + pg.rank)), pg)
    except ValueError as e:
        assert "mismatched MoE layer configs" in str(e), e
    else:
        raise AssertionError("different layer configs across ranks must raise")


def check_checkpoint(pg: G.ParallelGroups, tmp: Path) -> None:
    cfg = MoEConfig(hidden_size=12, intermediate_size=16, num_experts=8, top_k=2)
    torch.manual_seed(2)
    ep = parallelize_moe(MoE(cfg).double(), pg)
    with torch.no_grad():  # make the shards differ from any fresh init
        for p in ep.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x_all = torch.randn(2 * 9, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    rows = slice(pg.rank * 9, (pg.rank + 1) * 9)
    y_ep = ep.eval()(x_all[rows]).output
    full_ref = {**{k: v for k, v in ep.state_dict().items() if not k.startswith("experts.")},
                **gather_experts(ep, pg)}
    save_sharded(ep, tmp / "two", pg)  # 2 ranks -> files
    if pg.rank == 0:  # -> 1 process
        one = MoE(cfg).double().eval()
        load_sharded(one, tmp / "two")
        for k, v in one.state_dict().items():
            assert torch.equal(v, full_ref[k]), k
        y_one = one(x_all).output
        assert_close(y_one[rows], y_ep, **TOL)
        save_sharded(one, tmp / "one")
    dist.barrier()
    y_one_all = torch.empty(18, 12, dtype=torch.float64)
    if pg.rank == 0:
        y_one_all.copy_(y_one)
    dist.broadcast(y_one_all, 0)
    assert_close(y_ep, y_one_all[rows], **TOL)
    # 1 -> 2 ranks again: identical shards and outputs.
    again = parallelize_moe(MoE(cfg).double(), pg)
    load_sharded(again, tmp / "one", pg)
    for k, v in ep.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert torch.equal(again.eval()(x_all[rows]).output, y_ep)


def check_zero_tokens(pg: G.ParallelGroups) -> None:
    """A rank with no tokens still joins the exchange: no hang, and the other rank's result is exact
    (capacity routing, and DeepSeek-V3's group-limited routing)."""
    for overrides in ({"capacity_factor": 1.0},
                      {"router": "sigmoid_bias", "n_group": 4, "topk_group": 2, "norm_topk_prob": True}):
        cfg = MoEConfig(hidden_size=12, intermediate_size=16, num_experts=8, top_k=2, **overrides)
        _check_zero_tokens(cfg, pg)


def _check_zero_tokens(cfg: MoEConfig, pg: G.ParallelGroups) -> None:
    torch.manual_seed(4)
    full = MoE(cfg).double().train()
    ep = parallelize_moe(copy.deepcopy(full), pg)
    x_all = torch.randn(7, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x = (x_all if pg.rank == 0 else x_all[:0]).clone().requires_grad_()
    y, info = ep(x)
    y.sum().backward()
    assert y.shape == x.shape and info.tokens_per_expert.shape == (8,)
    sync_gradients(ep, pg)
    if pg.rank == 0:
        y_ref, _ = full(x_all)
        assert_close(y, y_ref.detach(), **TOL)


def check_data_parallel_router_state() -> None:
    """Plain data parallelism (no EP): a rank with an empty micro-batch still joins BalanceStats'
    all-reduce, and under DistributedDataParallel (which copies rank 0's buffers before each forward)
    update_bias uses the global load of every micro-batch since the last call."""
    from torch.nn.parallel import DistributedDataParallel

    from moekit.core import BalanceStats

    rank = dist.get_rank()
    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden_size=4, intermediate_size=4, num_experts=2, top_k=1)).train()
    moe.balance_stats = BalanceStats(2)
    moe(torch.randn(6 if rank == 0 else 0, 4))
    assert moe.balance_stats.counts_E.sum() == 6
    moe(torch.randn(6, 4))
    assert moe.balance_stats.counts_E.sum() == 18

    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden_size=8, intermediate_size=8, num_experts=4, top_k=1, router="sigmoid_bias"))
    ddp = DistributedDataParallel(moe)
    gen = torch.Generator().manual_seed(100 + rank)
    centre = torch.randn(8, generator=torch.Generator().manual_seed(7 + rank)) * 3  # ranks differ
    mine = torch.zeros(4)
    for _ in range(3):  # gradient accumulation: three forwards per optimizer step
        y, info = ddp(torch.randn(10, 8, generator=gen) * 0.1 + centre)
        mine += torch.bincount(info.expert_ids.flatten(), minlength=4).float()
        (y.square().mean() + info.aux_loss).backward()
    dist.all_reduce(mine)
    before = moe.gate.e_score_correction_bias.clone()
    assert moe.update_bias().tolist() == mine.tolist()
    step = moe.config.bias_update_rate * torch.sign(mine.mean() - mine)
    assert_close(moe.gate.e_score_correction_bias - before, step)


def check_expert_choice(pg: G.ParallelGroups) -> None:
    """expert_choice picks among each rank's own tokens: the EP layer equals one process applied to
    this rank's batch (output, input gradient), while the experts are still sharded."""
    cfg = MoEConfig(hidden_size=12, intermediate_size=16, num_experts=8, router="expert_choice",
                    capacity_factor=2.0)
    torch.manual_seed(6)
    full = MoE(cfg).double().train()
    ep = parallelize_moe(copy.deepcopy(full), pg)
    x_all = torch.randn(2, 10, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    x = x_all[pg.rank].clone().requires_grad_()
    xf = x_all[pg.rank].clone().requires_grad_()
    y, _ = ep(x)
    yf, _ = full(xf)
    y.square().sum().backward()
    yf.square().sum().backward()
    assert_close(y, yf.detach(), **TOL)
    assert_close(x.grad, xf.grad, **TOL)
