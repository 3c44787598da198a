"""Expert parallelism on torch.distributed: experts sharded across processes, tokens moved by all-to-all.

    init_distributed()                                  # torchrun env, gloo (CPU) or nccl (GPU), timeouts
    groups = new_expert_parallel_groups(ep_size=2)      # EP groups inside data parallel
    parallelize_moe(model, groups)                      # shard experts along E, swap the dispatcher
    (loss + aux_loss).backward(); sync_gradients(model, groups); clip_grad_norm_(model, 1.0, groups)
    save_sharded(model, "ckpt", groups)                 # load_sharded(...) into any EP size, 1 included
"""

from moekit.distributed.checkpoint import load_sharded, save_sharded
from moekit.distributed.comm import all_gather_rows, all_reduce_sum, all_to_all, exchange_counts
from moekit.distributed.dispatch import ExpertParallelDispatcher, ExpertParallelMeta
from moekit.distributed.groups import (
    ParallelGroups,
    check_same_across_ranks,
    config_hash,
    init_distributed,
    new_expert_parallel_groups,
    single_process_groups,
)
from moekit.distributed.parallel import (
    GlobalBatchStats,
    clip_grad_norm_,
    gather_experts,
    parallelize_moe,
    sync_gradients,
)

__all__ = [
    "ExpertParallelDispatcher",
    "ExpertParallelMeta",
    "GlobalBatchStats",
    "ParallelGroups",
    "all_gather_rows",
    "all_reduce_sum",
    "all_to_all",
    "check_same_across_ranks",
    "clip_grad_norm_",
    "config_hash",
    "exchange_counts",
    "gather_experts",
    "init_distributed",
    "load_sharded",
    "new_expert_parallel_groups",
    "parallelize_moe",
    "save_sharded",
    "single_process_groups",
    "sync_gradients",
]
