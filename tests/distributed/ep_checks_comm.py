"""Checks run by ep_worker.py: exchange, autograd, group set-up and failure modes on 2 ranks (gloo)."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from moekit.distributed import comm, groups

SEND = [[0, 3], [2, 4]]  # SEND[src][dst]: rows rank src sends to rank dst (one empty on purpose)


def check_exchange(rank: int) -> None:
    send = torch.tensor(SEND[rank])
    recv = comm.exchange_counts(send)
    assert recv.tolist() == [SEND[0][rank], SEND[1][rank]], recv
    sizes = [sum(row) for row in SEND]
    xs = [torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(r)) for r, n in
          enumerate(sizes)]
    x = xs[rank].clone().requires_grad_()
    y = comm.all_to_all(x, recv.tolist(), send.tolist())
    # Reference: every rank rebuilds both ranks' inputs from their seeds.
    ref = torch.cat([xs[src].split(SEND[src])[rank] for src in range(2)])
    assert torch.equal(y.detach(), ref)
    # Backward is the reverse exchange: d/dx sum(w * y) sends w back to the rows' owners.
    recv_sizes = [SEND[0][r] + SEND[1][r] for r in range(2)]
    ws = [torch.arange(n * 3, dtype=torch.float64).view(n, 3) + 100 * r for r, n in enumerate(recv_sizes)]
    (y * ws[rank]).sum().backward()
    grad_ref = torch.cat([ws[dst].split([SEND[0][dst], SEND[1][dst]])[rank] for dst in range(2)])
    assert torch.equal(x.grad, grad_ref), (x.grad, grad_ref)


def check_all_reduce_and_gather(rank: int) -> None:
    a = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True) * (rank + 1)
    s = comm.all_reduce_sum(a)
    assert torch.equal(s.detach(), torch.tensor([3.0, 6.0], dtype=torch.float64))
    leaf = torch.ones(2, dtype=torch.float64, requires_grad=True)
    (comm.all_reduce_sum(leaf) * (rank + 1)).sum().backward()
    # objective = sum_r (r+1) * sum(s): each input's gradient is 1 + 2.
    assert torch.equal(leaf.grad, torch.full((2,), 3.0, dtype=torch.float64))
    rows = torch.full((rank + 1, 2), float(rank))
    cat, sizes = comm.all_gather_rows(rows)
    assert sizes == [1, 2] and torch.equal(cat, torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))


def check_groups(rank: int) -> None:
    pg = groups.new_expert_parallel_groups(2)
    assert (pg.ep_size, pg.ep_rank, pg.expert_dp_size) == (2, rank, 1)
    pg1 = groups.new_expert_parallel_groups(1)
    assert (pg1.ep_size, pg1.ep_rank, pg1.expert_dp_size) == (1, 0, 2)
    assert dist.get_world_size(pg1.ep_group) == 1 and dist.get_world_size(pg1.expert_dp_group) == 2
    try:
        groups.new_expert_parallel_groups(3)
    except ValueError as e:
        assert "ep_size" in str(e) and "divisor" in str(e)
    else:
        raise AssertionError("ep_size=3 on 2 ranks must raise")
    groups.check_same_across_ranks({"a": 1, "b": [1, 2]})
    try:
        groups.check_same_across_ranks({"a": rank}, what="model config")
    except ValueError as e:
        assert "mismatched model config" in str(e) and "[1]" in str(e), e
    else:
        raise AssertionError("different configs must raise")


def check_timeout(rank: int) -> None:
    # A peer that never joins the collective: the waiting rank gets an error after the timeout.
    short = dist.new_group([0, 1], timeout=groups._timeout(1.5))
    if rank == 0:
        t = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1), group=short)
        except RuntimeError as e:
            assert time.monotonic() - t < 30, "the timeout was not honoured"
            assert "timed out" in str(e).lower() or "timeout" in str(e).lower(), e
        else:
            raise AssertionError("all_reduce without the peer must time out")
    dist.barrier()


def check_dead_peer(rank: int) -> None:
    """Last check of a run: rank 1 exits; rank 0's next collective fails instead of hanging."""
    dist.barrier()
    if rank == 1:
        print("PASS dead_peer (exiting)", flush=True)
        os._exit(0)
    time.sleep(0.5)
    try:
        dist.all_reduce(torch.ones(1))
    except RuntimeError:
        return
    raise AssertionError("all_reduce with a dead peer must fail")
