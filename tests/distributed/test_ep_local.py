"""Single-process tests of the expert-parallel pieces that need no peers: the regroup permutation,
re-sharding of expert-sharded checkpoints between any EP sizes (ranks emulated one after another),
and argument checks."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import MoE, MoEConfig
from moekit.distributed.checkpoint import load_sharded, read_index, save_sharded
from moekit.distributed.dispatch import source_major_to_expert_major
from moekit.distributed.groups import ParallelGroups, config_hash
from moekit.distributed.training import resolve_expert_parallel

CFG = MoEConfig(hidden_size=6, intermediate_size=5, num_experts=8, top_k=2)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.data())
def test_regroup_is_the_expert_major_permutation(ranks, local, data):
    counts = data.draw(st.lists(st.integers(0, 4), min_size=ranks * local, max_size=ranks * local))
    counts_PE = torch.tensor(counts, dtype=torch.int64).view(ranks, local)
    # Label each source-major row by (expert, source, index within chunk) and check the order.
    labels = [(e, p, i) for p in range(ranks) for e in range(local) for i in range(int(counts_PE[p, e]))]
    perm = source_major_to_expert_major(counts_PE).tolist()
    assert sorted(perm) == list(range(len(labels)))
    assert [labels[j] for j in perm] == sorted(labels)


def _groups(ep_size: int, ep_rank: int) -> ParallelGroups:
    # A rank of an EP group, emulated in one process (world_size 1: no collectives are made).
    return ParallelGroups(ep_size, ep_rank, None, 1, None, 1, ep_rank, None)


def _shard(moe: MoE, ep_size: int, ep_rank: int) -> MoE:
    per = CFG.num_experts // ep_size
    for name, p in list(moe.experts.named_parameters(recurse=False)):
        rows = p.detach()[ep_rank * per : (ep_rank + 1) * per].clone()
        setattr(moe.experts, name, torch.nn.Parameter(rows))
    return moe


@pytest.mark.parametrize(("saved", "loaded"), [(1, 2), (2, 1), (4, 2), (2, 4), (1, 8), (8, 1)])
def test_expert_sharded_checkpoint_reshards(tmp_path, saved, loaded):
    torch.manual_seed(0)
    full = MoE(CFG)
    for rank in range(saved):  # rank 0 first: it creates the directory
        save_sharded(_shard_copy(full, saved, rank), tmp_path, _groups(saved, rank))
    assert read_index(tmp_path)["ep_size"] == saved
    for rank in range(loaded):
        target = _shard(MoE(CFG), loaded, rank)
        load_sharded(target, tmp_path, _groups(loaded, rank))
        expect = _shard_copy(full, loaded, rank).state_dict()
        for k, v in target.state_dict().items():
            assert torch.equal(v, expect[k]), k


def _shard_copy(full: MoE, ep_size: int, ep_rank: int) -> MoE:
    moe = MoE(CFG)
    moe.load_state_dict(full.state_dict())
    return _shard(moe, ep_size, ep_rank)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="not an expert-sharded moekit checkpoint"):
        load_sharded(MoE(CFG), tmp_path)
    save_sharded(MoE(CFG), tmp_path / "a")
    other = MoE(MoEConfig(hidden_size=6, intermediate_size=5, num_experts=8, top_k=2, activation="gelu"))
    with pytest.raises(ValueError, match="expert tensors differ"):
        load_sharded(other, tmp_path / "a")
    with pytest.raises(ValueError, match="not divisible by ep_size=3"):
        load_sharded(MoE(CFG), tmp_path / "a", _groups(3, 0))
    index = json.loads((tmp_path / "a" / "sharding.json").read_text())
    (tmp_path / "a" / "sharding.json").write_text(json.dumps({**index, "format": "other"}))
    with pytest.raises(ValueError, match="format"):
        read_index(tmp_path / "a")


def test_resolve_expert_parallel_and_config_hash(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_expert_parallel(None) == 0
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_expert_parallel(None) == 1
    assert resolve_expert_parallel(2) == 2
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="--expert-parallel"):
            resolve_expert_parallel(bad)
    assert config_hash({"a": 1, "b": CFG}) == config_hash({"b": CFG, "a": 1})
    assert config_hash(CFG) != config_hash(MoEConfig(hidden_size=6, intermediate_size=5, num_experts=4))
