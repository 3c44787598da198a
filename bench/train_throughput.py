"""Training throughput: moekit vs transformers' MixtralForCausalLM (eager / grouped_mm experts), one run.

Config (issue 3): D=256, F=512, 4 layers, 8 experts top-2, 8 heads / 2 KV heads, vocab 4096, seq 256,
batch 8 (= the ``tiny`` preset). Every model starts from the same weights and trains with AdamW on the
same random token batches; one timed step = forward (loss + router aux loss) + backward + optimizer
step. The three contenders take turns, round after round, so machine load hits them alike; the
table gives each one's median tok/s and moekit's ratio to each transformers variant.

The last line is the measured floor: a step's FLOPs (3x the forward FLOPs of ``moekit info``) at the
best matrix-product rate measured in the same run (torch's MKL or oneDNN, whichever is faster, on
a ``2048 x 256 x 1024`` float32 product with the same threads), next to 2x transformers' best.

    .venv/bin/python bench/train_throughput.py [--rounds 5] [--steps 3] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moekit.cli import device_arg
from moekit.models import MoEForCausalLM, get_preset
from moekit.models.info import flops_per_token


def build_models(seed: int, device: str) -> dict[str, torch.nn.Module]:
    import transformers

    cfg = get_preset("tiny")
    hf_cfg = transformers.MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
        router_aux_loss_coef=cfg.router_aux_loss_coef, output_router_logits=True,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    torch.manual_seed(seed)
    ours = MoEForCausalLM(cfg)
    models = {"moekit": ours}
    for impl in ("eager", "grouped_mm"):
        hf = transformers.MixtralForCausalLM(hf_cfg)
        hf.load_state_dict(ours.state_dict(), strict=True)
        hf.set_experts_implementation(impl)
        models[f"HF {impl}"] = hf
    return {k: m.to(device).train() for k, m in models.items()}


def make_step(name: str, model: torch.nn.Module, device: str):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else None

    def step(batch: torch.Tensor) -> float:
        """One optimizer step; returns the language-model loss (without the router aux loss, whose
        normalisation differs: transformers' is top_k times moekit's, over all layers' tokens at once)."""
        with autocast if autocast is not None else torch.autocast("cpu", enabled=False):
            if name == "moekit":
                out = model(batch, labels=batch, return_logits=False)
                loss, lm_loss = out.loss + out.aux_loss, out.loss
            else:
                out = model(input_ids=batch, labels=batch)  # .loss includes coef * aux_loss
                loss, lm_loss = out.loss, out.loss - model.config.router_aux_loss_coef * out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(lm_loss.detach())

    return step


def gemm_rate(device: str) -> float:
    """Best measured float32 FLOP/s of a ``2048 x 256 x 1024`` product: torch's own or oneDNN's (CPU)."""
    x, w = torch.randn(2048, 256, device=device), torch.randn(1024, 256, device=device)
    products = [lambda: x @ w.T]
    if device == "cpu" and torch.backends.mkldnn.is_available():
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))
    best = float("inf")
    for product in products:
        for _ in range(3):
            product()
        for _ in range(5):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                product()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t0) / 10)
    return 2 * 2048 * 256 * 1024 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds of --steps steps per contender")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", type=device_arg, default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    models = build_models(args.seed, args.device)
    steps = {name: make_step(name, m, args.device) for name, m in models.items()}
    g = torch.Generator().manual_seed(args.seed)
    vocab = models["moekit"].config.vocab_size
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(args.device) for _ in range(4)]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {args.device}, "
          f"threads {torch.get_num_threads()}; tiny preset (D=256, F=512, L=4, E=8 top-2, 8/2 heads, "
          "V=4096), "
          f"batch {args.batch} x seq {args.seq}, AdamW, {args.rounds} rounds x {args.steps} steps")
    first = {name: step(batches[0]) for name, step in steps.items()}  # warm-up; same weights -> same loss
    print("first-step language-model loss (same weights, so equal): "
          + ", ".join(f"{k} {v:.4f}" for k, v in first.items()))
    rates: dict[str, list[float]] = {name: [] for name in steps}
    tokens = args.batch * args.seq * args.steps
    for r in range(args.rounds):
        for name, step in steps.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(args.steps):
                step(batches[(r * args.steps + i) % len(batches)])
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            rates[name].append(tokens / (time.perf_counter() - t0))
    med = {name: statistics.median(v) for name, v in rates.items()}
    print(f"{'':>14} {'tok/s (median)':>15} {'min':>8} {'max':>8} {'moekit / this':>14}")
    for name, v in rates.items():
        ratio = med["moekit"] / med[name]
        print(f"{name:>14} {med[name]:>15,.0f} {min(v):>8,.0f} {max(v):>8,.0f} {ratio:>13.2f}x")
    step_flops = 3 * flops_per_token(models["moekit"].config, args.seq)["total"] * args.batch * args.seq
    rate = gemm_rate(args.device)
    best_hf = max(med["HF eager"], med["HF grouped_mm"])
    print(f"floor: {step_flops / 1e9:.1f} GFLOP per step at {rate / 1e9:.0f} GFLOP/s (best measured product "
          f"rate) = {args.batch * args.seq * rate / step_flops:,.0f} tok/s; 2x transformers' best = "
          f"{2 * best_hf:,.0f} tok/s")


if __name__ == "__main__":
    main()
