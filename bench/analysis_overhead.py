"""Benchmark: cost of recording routing (moekit.analysis.RoutingRecorder) on a model's forward pass.

One run times the same forward passes with and without the recorder, interleaved round by round,
and prints the best round of each (the least disturbed by other processes on a shared machine), the
ratio, and the recorder's memory after 1x and 8x as many tokens (streaming aggregates: it must not
grow with the tokens seen).

    python bench/analysis_overhead.py                  # tiny preset (D=256, 4 layers, E=8, top-2), CPU
    python bench/analysis_overhead.py --device cuda
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from moekit.analysis import RoutingRecorder
from moekit.cli import device_arg
from moekit.models import MoEForCausalLM, get_preset


def recorder_bytes(rec: RoutingRecorder) -> int:
    total = 0
    for r in rec.records.values():
        arrays = [r.choice_counts, r.kept_counts, r.first_counts, r.coselection, r.token_expert,
                  r.category_expert, *r.reservoir()]
        total += sum(a.nbytes for a in arrays) + 8 * len(r.sample_first)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", type=device_arg, default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batches", type=int, default=4, help="forward passes per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = MoEForCausalLM(cfg).to(args.device).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=g)
               for _ in range(args.batches)]
    cats = [np.random.default_rng(i).integers(-1, 10, size=b.shape) for i, b in enumerate(batches)]

    def plain() -> None:
        for ids in batches:
            model(ids.to(args.device))

    rec = RoutingRecorder(model)
    in_hooks = [0.0]
    observe = rec._observe

    def timed_observe(*a):  # time spent inside the hooks: robust to noise in the totals
        t0 = time.perf_counter()
        observe(*a)
        in_hooks[0] += time.perf_counter() - t0

    rec._observe = timed_observe

    def recorded() -> None:
        with rec:
            for ids, c in zip(batches, cats):
                rec.set_inputs(ids, c)
                model(ids.to(args.device))

    best = {"plain forward": float("inf"), "forward + recorder": float("inf")}
    with torch.inference_mode():
        plain()
        recorded()  # warm-up both
        for _ in range(args.rounds):
            for name, fn in (("plain forward", plain), ("forward + recorder", recorded)):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                best[name] = min(best[name], time.perf_counter() - t0)
        tokens = args.batches * args.batch * args.seq_len
        print(f"tiny preset, {tokens:,} tokens per round ({args.batches} x {args.batch} x {args.seq_len}), "
              f"{args.device}, best of {args.rounds} rounds")
        for name, t in best.items():
            print(f"  {name:<20} {t * 1e3:9.1f} ms  {tokens / t:12,.0f} tok/s")
        ratio = best['forward + recorder'] / best['plain forward']
        per_round = in_hooks[0] / (args.rounds + 1)
        print(f"  forward + recorder / plain forward: x{ratio:.3f}; time inside the hooks: "
              f"{per_round * 1e3:.1f} ms per round = {per_round / best['plain forward']:.1%} "
              "of the plain forward")
        small = RoutingRecorder(model)
        with small:
            for ids, c in zip(batches, cats):
                small.set_inputs(ids, c)
                model(ids.to(args.device))
        once = recorder_bytes(small)
        with small:
            for _ in range(7):
                for ids, c in zip(batches, cats):
                    small.set_inputs(ids, c)
                    model(ids.to(args.device))
        print(f"  recorder memory: {once / 1e6:.2f} MB after {tokens:,} tokens, "
              f"{recorder_bytes(small) / 1e6:.2f} MB after {8 * tokens:,} tokens "
              f"({len(small.records)} layers, vocab {cfg.vocab_size})")


if __name__ == "__main__":
    main()
