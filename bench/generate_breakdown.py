"""Where a decode step's time goes (tiny preset, one thread, process CPU time; companion of generate.py).

Prints, per batch size: the matmul-only floor (the projections, the experts the step must touch and
the head, nothing else, each through moekit's fastest product here, ``moekit.kernels.linear``),
moekit's ``decode_one_token``, the same step with every MoE layer replaced by the identity (so the
MoE share), transformers' ``generate`` CPU time per new token (same weights; its 32-token prefill
included, ~7% of it here, so that column is a little above HF's own decode step), and top-level
aten ops per new token; then ``moekit.MoE`` against transformers' ``MixtralSparseMoeBlock`` at
decode sizes T = 1..16. No options.

    .venv/bin/python bench/generate_breakdown.py
"""

from __future__ import annotations

import argparse
import time

import torch
from generate import build
from torch.profiler import profile

from moekit.core.types import MoEOutput
from moekit.inference import StaticKVCache, decode_one_token, generate
from moekit.kernels import cpu, linear


def cpu_time(fn, calls: int, repeats: int = 5) -> float:
    """Best mean CPU seconds per call over ``repeats`` rounds of ``calls`` calls."""
    best = float("inf")
    for _ in range(repeats):
        c0 = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - c0) / calls)
    return best


def matmul_floor(model, batch: int) -> float:
    """The matmuls any implementation must do in one decode step (per-expert rows as in a balanced batch)."""
    x = torch.randn(batch, model.config.hidden_size)
    inter = model.config.moe_intermediate_size
    experts_hit = 2 if batch == 1 else model.config.num_experts
    rows = max(1, 2 * batch // model.config.num_experts)

    def step():
        for layer in model.model.layers:
            a = layer.self_attn
            for w in (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight):
                linear(x, w)
            e = layer.mlp.experts
            for j in range(experts_hit):
                h = linear(x[:rows], e.gate_up_proj[j])
                linear(h[:, :inter], e.down_proj[j])
        linear(x, model.lm_head.weight)

    return cpu_time(step, 30)


class _Identity(torch.nn.Module):
    def forward(self, x):
        return MoEOutput(x, None)


def decode_step(model, batch: int) -> float:
    cache = StaticKVCache(model.config, batch, 400)
    slots = torch.arange(400)
    # Distinct tokens per row, so a batch routes to many experts as real text does.
    tok = torch.randint(
        0, model.config.vocab_size, (batch, 1), generator=torch.Generator().manual_seed(batch)
    )
    pos = iter(range(10**9))
    return cpu_time(lambda: decode_one_token(model, tok, cache, slots[40 + next(pos) % 300 :][:1]), 40)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help; no options
    torch.set_num_threads(1)
    ours, hf = build(0)
    print("per decode step, CPU ms (one thread)")
    print(
        f"{'batch':>5} {'matmul floor':>13} {'moekit step':>12} {'w/o MoE':>8} {'MoE share':>10} "
        f"{'HF grouped_mm per new token':>28} {'ops moekit':>11} {'ops HF':>7}"
    )
    # As generate() does: numpy's OpenBLAS on one thread (the matrix-vector path of moekit.kernels.cpu).
    with torch.no_grad(), cpu.single_threaded_blas():
        for batch in (1, 8):
            floor = matmul_floor(ours, batch)
            full = decode_step(ours, batch)
            saved = [layer.mlp for layer in ours.model.layers]
            for layer in ours.model.layers:
                layer.mlp = _Identity()
            no_moe = decode_step(ours, batch)
            for layer, mlp in zip(ours.model.layers, saved):
                layer.mlp = mlp
            prompt = torch.randint(
                0, ours.config.vocab_size, (batch, 32), generator=torch.Generator().manual_seed(1)
            )
            new = 32

            def hf_gen(p=prompt, n=new):
                return hf.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

            hf.set_experts_implementation("grouped_mm")
            hf_step = cpu_time(hf_gen, 1, repeats=3) / new
            counts = []
            for fn in (lambda p=prompt, n=new: generate(ours, p.tolist(), n), hf_gen):
                with profile() as prof:
                    fn()
                counts.append(sum(1 for e in prof.events() if e.cpu_parent is None) / new)
            print(
                f"{batch:>5} {floor * 1e3:>13.2f} {full * 1e3:>12.2f} {no_moe * 1e3:>8.2f} "
                f"{(full - no_moe) / full:>10.0%} {hf_step * 1e3:>28.2f} {counts[0]:>11.0f} {counts[1]:>7.0f}"
            )

        import transformers

        moe = ours.model.layers[0].mlp
        blocks = {}
        for impl in ("eager", "grouped_mm"):
            cfg = transformers.MixtralConfig(
                hidden_size=ours.config.hidden_size,
                intermediate_size=ours.config.moe_intermediate_size,
                num_local_experts=ours.config.num_experts,
                num_experts_per_tok=ours.config.top_k,
            )
            cfg._experts_implementation = impl
            block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(cfg).eval()
            block.load_state_dict(moe.state_dict())
            blocks[impl] = block
        print("\nMoE layer at decode sizes, CPU us per call: moekit.MoE / HF eager / HF grouped_mm")
        for T in (1, 2, 4, 8, 16):
            x = torch.randn(1, T, ours.config.hidden_size)
            times = [
                cpu_time(lambda f=f, x=x: f(x), 40) * 1e6
                for f in (moe, blocks["eager"], blocks["grouped_mm"])
            ]
            print(f"T={T:>2}: {times[0]:7.0f} {times[1]:7.0f} {times[2]:7.0f}")


if __name__ == "__main__":
    main()
