"""Expert parallelism on torch.distributed: experts sharded across ranks, tokens moved by all-to-all."""

from moekit.distributed.comm import all_gather_rows, all_reduce_sum, all_to_all, exchange_counts
from moekit.distributed.groups import (
    ParallelGroups,
    check_same_across_ranks,
    config_hash,
    init_distributed,
    new_expert_parallel_groups,
    single_process_groups,
)

__all__ = [
    "ParallelGroups",
    "all_gather_rows",
    "all_reduce_sum",
    "all_to_all",
    "check_same_across_ranks",
    "config_hash",
    "exchange_counts",
    "init_distributed",
    "new_expert_parallel_groups",
    "single_process_groups",
]
