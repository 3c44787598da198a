import pytest
from ep_launch import launch

pytestmark = pytest.mark.distributed


def test_exchange_groups_and_failures_on_two_ranks():
    outs = launch("worker_comm.py", nprocs=2, timeout=120)
    assert "dead peer detected" in outs[0] and "rank 0 ok" in outs[0]
