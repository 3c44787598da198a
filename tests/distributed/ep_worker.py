"""One 2-rank gloo run that executes every distributed check (process start-up is the costly part).

Each section prints ``PASS <name> <seconds>`` on success; on a failure the rank prints the traceback
and exits at once, so its peer's next collective fails quickly instead of waiting for a timeout.
Usage (what ep_launch.launch does for each rank): ``python ep_worker.py TMP_DIR DATA_FILE``.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

import ep_checks_comm as comm_checks
import ep_checks_layer as layer_checks
import ep_checks_train as train_checks
import torch
import torch.distributed as dist

from moekit.distributed import groups as G


def main() -> None:
    tmp, data = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    G.init_distributed("gloo", timeout_s=120)
    rank = dist.get_rank()
    pg = G.new_expert_parallel_groups(2)
    sections = [
        ("exchange", lambda: comm_checks.check_exchange(rank)),
        ("all_reduce_gather", lambda: comm_checks.check_all_reduce_and_gather(rank)),
        ("groups", lambda: comm_checks.check_groups(rank)),
        ("timeout", lambda: comm_checks.check_timeout(rank)),
        *[(f"layer_{i}", lambda o=o: layer_checks.check_layer(o, pg))
          for i, o in enumerate(layer_checks.CONFIGS)],
        # EP size 1 inside 2-way data parallelism: expert gradients summed over the expert-DP group.
        ("layer_dp", lambda: layer_checks.check_layer({"router": "topk"}, G.new_expert_parallel_groups(1))),
        ("empty_experts", lambda: layer_checks.check_layer({"router": "topk"}, pg, only_upper=True)),
        ("layer_errors", lambda: layer_checks.check_errors(pg)),
        ("zero_tokens", lambda: layer_checks.check_zero_tokens(pg)),
        ("expert_choice", lambda: layer_checks.check_expert_choice(pg)),
        ("data_parallel_router_state", layer_checks.check_data_parallel_router_state),
        ("checkpoint", lambda: layer_checks.check_checkpoint(pg, tmp)),
        ("train", lambda: train_checks.check_train(tmp, data)),
        ("resume", lambda: train_checks.check_resume_across_sizes(tmp)),
        ("train_errors", lambda: train_checks.check_train_errors(tmp, data)),
        ("noise", lambda: train_checks.check_routing_noise_per_rank(tmp, data)),
        ("dead_peer", lambda: comm_checks.check_dead_peer(rank)),
    ]
    for name, fn in sections:
        t = time.perf_counter()
        try:
            fn()
        except BaseException:
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
            os._exit(1)
        print(f"PASS {name} {time.perf_counter() - t:.2f}s", flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
