"""Expert parallelism: tokens/s and all-to-all time share, 1 process vs N processes, one run.

    python bench/expert_parallel.py                         # CPU: 1 process, then 2 ranks on gloo
    python bench/expert_parallel.py --backend nccl --nprocs 1 2 4   # one GPU per rank

The same global batch of ``--tokens`` tokens goes through one ``moekit.MoE`` layer, forward +
backward, on 1 process (the local dispatcher, no torch.distributed: the anchor) and on N ranks with
the experts split N ways (``parallelize_moe``, each rank holding ``tokens / N`` of the batch). Each
rank uses ``--threads`` intra-op threads (default 1, so N ranks use N cores). Printed per setting:
step time, tokens/s, speed-up vs 1 process, and the share of the step spent inside the token
exchange (``all_to_all_single`` of counts and payload, forward and backward, rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moekit import MoE, MoEConfig


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="global batch (tokens per step, all ranks)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512, help="expert intermediate size")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=None, help="default: dropless")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    p.add_argument("--nprocs", type=int, nargs="+", default=[2], help="rank counts to compare with 1 process")
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)  # internal: worker output file
    return p.parse_args(argv)


def _layer(args: argparse.Namespace, device: torch.device) -> MoE:
    cfg = MoEConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_experts=args.experts,
                    top_k=args.top_k, capacity_factor=args.capacity_factor)
    torch.manual_seed(0)
    return MoE(cfg).to(device).train()


def _time_steps(moe: MoE, x: torch.Tensor, args: argparse.Namespace, sync) -> float:
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            sync()
            start = time.perf_counter()
            from moekit.distributed.comm import EXCHANGE_TIMER

            EXCHANGE_TIMER.reset()
        y, info = moe(x)
        (y.square().mean() + info.aux_loss).backward()
        moe.zero_grad(set_to_none=True)
    sync()
    return (time.perf_counter() - start) / args.steps


def run_single(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.backend == "nccl" else "cpu")
    moe = _layer(args, device)
    x = torch.randn(args.tokens, args.hidden, device=device, generator=None)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step = _time_steps(moe, x, args, sync)
    return {"nprocs": 1, "step_s": step, "exchange_s": 0.0}


def run_rank(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from moekit.distributed import init_distributed, new_expert_parallel_groups, parallelize_moe
    from moekit.distributed.comm import EXCHANGE_TIMER

    torch.set_num_threads(args.threads)
    init_distributed(args.backend, timeout_s=120)
    world, rank = dist.get_world_size(), dist.get_rank()
    on_gpu = args.backend == "nccl"
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if on_gpu else torch.device("cpu")
    groups = new_expert_parallel_groups(world)
    moe = parallelize_moe(_layer(args, device), groups)
    gen = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(args.tokens // world, args.hidden, generator=gen).to(device)
    EXCHANGE_TIMER.enabled = True

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()

    step = _time_steps(moe, x, args, sync)
    exchange = EXCHANGE_TIMER.seconds / args.steps
    stats = torch.tensor([step, exchange], dtype=torch.float64, device=device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    if rank == 0 and args.result:
        Path(args.result).write_text(json.dumps({"nprocs": world, "step_s": float(stats[0]),
                                                 "exchange_s": exchange}))
    dist.destroy_process_group()


def launch(args: argparse.Namespace, nprocs: int, argv: list[str]) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        procs = []
        for rank in range(nprocs):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(args.threads))
            cmd = [sys.executable, __file__, *argv, "--result", str(result)]
            procs.append(subprocess.Popen(cmd, env=env))
        codes = [p.wait(timeout=900) for p in procs]
        if any(codes):
            raise RuntimeError(f"a rank failed (exit codes {codes})")
        return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _args(argv)
    if "RANK" in os.environ:
        run_rank(args)
        return
    for n in args.nprocs:
        if args.experts % n or args.tokens % n:
            raise SystemExit(f"--experts {args.experts} and --tokens {args.tokens} must be divisible by {n}")
    rows = [run_single(args)] + [launch(args, n, argv) for n in args.nprocs]
    device = "cuda (nccl)" if args.backend == "nccl" else f"cpu ({args.backend})"
    print(f"MoE layer fwd+bwd, {args.tokens} tokens/step, D={args.hidden} F={args.ffn} E={args.experts} "
          f"top-{args.top_k}, capacity_factor={args.capacity_factor}, {args.threads} thread(s)/process, "
          f"{device}")
    print(f"{'processes':>9} {'step ms':>9} {'tokens/s':>10} {'vs 1 proc':>9} {'all-to-all share':>17}")
    base = rows[0]["step_s"]
    for r in rows:
        share = r["exchange_s"] / r["step_s"]
        print(f"{r['nprocs']:>9} {r['step_s'] * 1e3:>9.1f} {args.tokens / r['step_s']:>10.0f} "
              f"{base / r['step_s']:>8.2f}x {share:>16.1%}")


if __name__ == "__main__":
    main()
