"""The seeds' central claim: at equal ACTIVE parameters and equal tokens, the sparse MoE learns more.

Trains (1) the ``tiny`` preset, 8 experts top-2 with expert width F=512, and (2) a dense model of the
same shape whose FFN width is 2 x 512 = 1024, so every token meets the same number of FFN weights
(the MoE adds only its router, D x E per layer). Both runs use the same TrainConfig (``moekit
train``'s defaults except the steps, data and validation budgets below), hence the same tokenizer,
the same batches in the same order and the same schedule; the table prints both validation losses
on the held-out stdlib files.

    .venv/bin/python bench/moe_vs_dense.py --threads 1 --parallel     # ~40 min on 2 cores
    .venv/bin/python bench/moe_vs_dense.py --max-steps 150 --max-train-chars 3000000 \
        --max-val-chars 200000 --eval-batches 16 --eval-every 50        # moekit train's defaults
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def configs():
    from moekit.models import get_preset

    moe = get_preset("tiny")
    dense = get_preset("tiny", num_experts=0, intermediate_size=moe.top_k * moe.moe_intermediate_size)
    return {"MoE 8x top-2": moe, "dense (same active)": dense}


def run_one(name: str, out: str, changes: dict, threads: int | None) -> dict:
    import torch

    from moekit.models import MoEForCausalLM
    from moekit.train import train

    if threads:
        torch.set_num_threads(threads)
    config = configs()[name]
    t0 = time.perf_counter()
    result = train(out, model_config=config, train_changes=changes, show_progress=False, log=lambda s: None)
    model = MoEForCausalLM(config)
    lines = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {
        "name": name, "total": model.num_parameters(), "active": model.num_parameters(active=True),
        "val_loss": result.val_loss, "train_loss": result.loss, "steps": result.step,
        "tokens": lines[-2]["tokens_seen"] if len(lines) > 1 else None, "seconds": time.perf_counter() - t0,
        "val_curve": [(x["step"], round(x["val_loss"], 4)) for x in lines if x["split"] == "validation"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Defaults: the setting that shows the claim (docs/benchmarks.md, runs F and G): 3000 steps on
    # fresh tokens (0.8 epoch of 25M characters), 64 validation batches of 600k held-out characters.
    # ~40 min on 2 cores with --threads 1 --parallel.
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--max-train-chars", type=int, default=25_000_000,
                    help="training text budget; large enough that no token is seen twice")
    ap.add_argument("--max-val-chars", type=int, default=600_000, help="validation text budget")
    ap.add_argument("--eval-batches", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=500, help="validation every N steps")
    ap.add_argument("--seed", type=int, default=None, help="model init and data order (default: train's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run")
    ap.add_argument("--parallel", action="store_true", help="train the two models in two processes at once")
    ap.add_argument("--out", default=None, help="keep the two runs under this directory")
    args = ap.parse_args()
    changes = {"eval_batches": args.eval_batches, "max_steps": args.max_steps, "eval_every": args.eval_every,
               "max_train_chars": args.max_train_chars, "max_val_chars": args.max_val_chars}
    if args.seed is not None:
        changes["seed"] = args.seed
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="moe_vs_dense-"))
    names = list(configs())
    jobs = [(n, str(root / n.split()[0].lower()), changes, args.threads) for n in names]
    if args.parallel:
        with ProcessPoolExecutor(max_workers=2) as pool:
            rows = list(pool.map(run_one, *zip(*jobs)))
    else:
        rows = [run_one(*job) for job in jobs]
    from moekit.train import TrainConfig

    cfg = TrainConfig().replace(**changes)
    print(f"default corpus (stdlib), {cfg.max_steps} steps x {cfg.tokens_per_step:,} tokens, lr {cfg.lr}, "
          f"seed {cfg.seed}; validation = {cfg.eval_batches} batches of the held-out files; runs in {root}")
    print(f"{'model':<22} {'total params':>13} {'active params':>14} {'train loss':>11} {'val loss':>9} "
          f"{'time s':>7}")
    for r in rows:
        print(f"{r['name']:<22} {r['total']:>13,} {r['active']:>14,} {r['train_loss']:>11.4f} "
              f"{r['val_loss']:>9.4f} {r['seconds']:>7.0f}")
    for r in rows:
        print(f"{r['name']} validation curve: {r['val_curve']}")
    moe, dense = rows
    verdict = "lower" if moe["val_loss"] < dense["val_loss"] else "NOT lower"
    print(f"MoE validation loss is {verdict} than dense: {moe['val_loss']:.4f} vs {dense['val_loss']:.4f} "
          f"({moe['val_loss'] - dense['val_loss']:+.4f})")


if __name__ == "__main__":
    main()
