import pytest
from ep_launch import launch

pytestmark = pytest.mark.distributed


def test_ep_layer_matches_single_process_and_checkpoints_reshard(tmp_path):
    outs = launch("worker_ep.py", str(tmp_path), nprocs=2, timeout=180)
    assert "rank 0 ok" in outs[0] and "rank 1 ok" in outs[1]
    assert (tmp_path / "two" / "sharding.json").is_file() and (tmp_path / "one" / "sharding.json").is_file()
