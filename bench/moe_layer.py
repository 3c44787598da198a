"""Benchmark: moekit.MoE against transformers' MixtralSparseMoeBlock (eager and grouped_mm experts).

One run times every implementation on the same weights and inputs, interleaved round by round, and
prints the best round of each (the least disturbed by other processes on a shared machine) and the
ratios; forward runs under ``torch.no_grad()``, forward+backward calls ``y.backward(g)``.

    python bench/moe_layer.py                 # CPU: D=256, F=512, E=8, k=2, fp32, T in {1, 64, 2048}
    python bench/moe_layer.py --device cuda   # Mixtral-8x7B shapes, bf16, T up to 16384, plus the floor

The forward rows end with the floor ``max(FLOPs / peak, bytes / bandwidth)``, both measured in the
same run (FLOPs of the experts' products, bytes of the experts the tokens hit): on CUDA the bf16
matmul peak and the copy bandwidth; on the CPU the best float32 product rate (torch's MKL or oneDNN,
``2048 x 256 x 1024``) and the rate at which a ``sum`` streams the layer's expert weights, so the
row says how far each T is from what the machine allows. transformers is a benchmark dependency only.

The whole run holds numpy's OpenBLAS on one thread (``moekit.kernels.cpu.single_threaded_blas``, as
``moekit.inference.generate`` does), which turns on moekit's matrix-vector path for decode-sized
inputs on the CPUs where it is faster; transformers does not use numpy's BLAS.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch

from moekit import MoE, MoEConfig
from moekit.cli import device_arg
from moekit.kernels import cpu

CPU_SHAPES = dict(hidden=256, inter=512, experts=8, top_k=2, tokens=(1, 64, 2048), dtype=torch.float32)
CUDA_SHAPES = dict(hidden=4096, inter=14336, experts=8, top_k=2,
                   tokens=(1, 8, 64, 512, 2048, 8192, 16384), dtype=torch.bfloat16)


def build(shapes: dict, device: str, backend: str) -> dict[str, torch.nn.Module]:
    """moekit and both transformers variants sharing one set of weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    ours = MoE(MoEConfig(hidden_size=shapes["hidden"], intermediate_size=shapes["inter"],
                         num_experts=shapes["experts"], top_k=shapes["top_k"], backend=backend))
    ours = ours.to(device=device, dtype=shapes["dtype"]).eval()
    modules: dict[str, torch.nn.Module] = {"moekit": ours}
    for impl in ("eager", "grouped_mm"):
        config = MixtralConfig(hidden_size=shapes["hidden"], intermediate_size=shapes["inter"],
                               num_local_experts=shapes["experts"], num_experts_per_tok=shapes["top_k"])
        config = copy.deepcopy(config)
        config._experts_implementation = impl
        block = MixtralSparseMoeBlock(config).to(device=device, dtype=shapes["dtype"]).eval()
        block.load_state_dict(ours.state_dict())
        modules[f"hf_{impl}"] = block
    return modules


def forward_fn(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = module(x)
    return out[0] if isinstance(out, tuple) else out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCK: Callable[[], float] = time.perf_counter


def time_call(fn: Callable[[], object], device: str, repeat: int) -> float:
    """Seconds per call, averaged over ``repeat`` back-to-back calls."""
    sync(device)
    start = CLOCK()
    for _ in range(repeat):
        fn()
    sync(device)
    return (CLOCK() - start) / repeat


def measure(modules: dict[str, torch.nn.Module], x: torch.Tensor, backward: bool, rounds: int,
            device: str) -> dict[str, float]:
    """Best-round milliseconds per call of each module, interleaving the modules round by round."""
    grad = torch.randn_like(x)

    def make(module: torch.nn.Module) -> Callable[[], object]:
        if not backward:
            def run() -> object:
                with torch.no_grad():
                    return forward_fn(module, x)
            return run

        def run_bwd() -> object:
            xg = x.detach().requires_grad_(True)
            forward_fn(module, xg).backward(grad)
            return xg.grad
        return run_bwd

    calls = {name: make(m) for name, m in modules.items()}
    one = {name: time_call(fn, device, 1) for name, fn in calls.items()}  # warm-up, sizes the repeat
    repeat = {name: max(1, int(0.02 / max(t, 1e-6))) for name, t in one.items()}
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            samples[name].append(time_call(fn, device, repeat[name]))
    return {name: min(s) * 1e3 for name, s in samples.items()}


def experts_only_ms(moe: MoE, x: torch.Tensor, rounds: int, device: str) -> float:
    """Best-round ms of the routed experts alone (``Experts.forward``, whichever of its paths) on the
    already-sorted buffer: the part of the forward that reads the expert weights. At T=1 the layer
    itself takes its slot path instead, so the two are not comparable there."""
    with torch.no_grad():
        x_TD = x.reshape(-1, x.shape[-1])
        routing = moe.gate(x_TD)
        x_SD, counts_E, _ = moe.dispatcher.dispatch(x_TD, routing, None)

        def run() -> object:
            return moe.experts(x_SD, counts_E)

        repeat = max(1, int(0.02 / max(time_call(run, device, 1), 1e-6)))
        return min(time_call(run, device, repeat) for _ in range(rounds)) * 1e3


def check_parity(modules: dict[str, torch.nn.Module], x: torch.Tensor) -> float:
    with torch.no_grad():
        ours = forward_fn(modules["moekit"], x).float()
        ref = forward_fn(modules["hf_eager"], x).float()
    return float((ours - ref).norm() / ref.norm().clamp_min(1e-30))


def cpu_peaks(moe: MoE) -> tuple[float, float]:
    """Measured (float32 product FLOP/s, weight-streaming bytes/s) on the CPU, with torch's threads."""
    x, w = torch.randn(2048, 256), torch.randn(1024, 256)
    products = [lambda: x @ w.T]
    if torch.backends.mkldnn.is_available():
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))
    seconds = min(time_call(fn, "cpu", 10) for fn in products for _ in range(5))
    weights = [p.detach() for p in moe.experts.parameters()]
    nbytes = sum(p.numel() * p.element_size() for p in weights)
    stream = min(time_call(lambda: [p.sum() for p in weights], "cpu", 10) for _ in range(5))
    return 2 * 2048 * 256 * 1024 / seconds, nbytes / stream


def device_peaks(dtype: torch.dtype) -> tuple[float, float]:
    """Measured (matmul FLOP/s, copy bytes/s) on the current CUDA device."""
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    seconds = min(time_call(lambda: a @ b, "cuda", 10) for _ in range(3))
    flops = 2 * n**3 / seconds
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = min(time_call(lambda: dst.copy_(src), "cuda", 10) for _ in range(3))
    return flops, 2 * src.numel() / seconds


def floor_ms(shapes: dict, num_tokens: int, experts_hit: int, flops: float, bandwidth: float) -> float:
    d, f, k = shapes["hidden"], shapes["inter"], shapes["top_k"]
    size = torch.finfo(shapes["dtype"]).bits // 8
    work = 2 * num_tokens * k * 3 * d * f
    traffic = experts_hit * 3 * d * f * size + 2 * num_tokens * d * size
    return max(work / flops, traffic / bandwidth) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="grouped")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tokens", type=int, nargs="*", help="override the token counts")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu = this process's CPU time (with --threads 1: robust on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    shapes = dict(CUDA_SHAPES if args.device.startswith("cuda") else CPU_SHAPES)
    if args.tokens:
        shapes["tokens"] = tuple(args.tokens)
    modules = build(shapes, args.device, args.backend)
    print(f"# device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"D={shapes['hidden']} F={shapes['inter']} E={shapes['experts']} k={shapes['top_k']} "
          f"dtype={shapes['dtype']} backend={args.backend} clock={args.clock}")
    if args.device.startswith("cuda"):
        torch.cuda.set_device(args.device)  # the peaks are measured on the device the layers run on
        peaks = device_peaks(shapes["dtype"])
        print(f"# measured peak {peaks[0] / 1e12:.1f} TFLOP/s, copy bandwidth {peaks[1] / 1e9:.0f} GB/s")
    else:
        peaks = cpu_peaks(modules["moekit"])
        print(f"# measured float32 product rate {peaks[0] / 1e9:.0f} GFLOP/s, expert weights streamed at "
              f"{peaks[1] / 1e9:.1f} GB/s")
    header = ("| pass | T | moekit ms | hf eager ms | hf grouped_mm ms | eager/moekit | grouped_mm/moekit "
              "| experts' matmuls alone ms |")
    header += " floor ms | moekit / floor |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for num_tokens in shapes["tokens"]:
        x = torch.randn(1, num_tokens, shapes["hidden"], device=args.device, dtype=shapes["dtype"])
        error = check_parity(modules, x)
        if error > (1e-5 if shapes["dtype"] == torch.float32 else 2e-2):
            print(f"# T={num_tokens}: moekit vs transformers relative error {error:.1e} (bf16 routing ties?)")
        for backward in (False, True):
            ms = measure(modules, x, backward, args.rounds, args.device)
            ours, eager, grouped = ms["moekit"], ms["hf_eager"], ms["hf_grouped_mm"]
            alone = experts_only_ms(modules["moekit"], x, args.rounds, args.device) if not backward else None
            matmuls = "" if alone is None else f"{alone:.3f}"
            row = (f"| {'fwd+bwd' if backward else 'fwd'} | {num_tokens} | {ours:.3f} | {eager:.3f} | "
                   f"{grouped:.3f} | {eager / ours:.2f} | {grouped / ours:.2f} | {matmuls} |")
            if not backward:
                with torch.no_grad():
                    _, info = modules["moekit"](x)
                hit = int((info.tokens_per_expert > 0).sum())
                floor = floor_ms(shapes, num_tokens, hit, *peaks)
                row += f" {floor:.3f} | {ms['moekit'] / floor:.2f} |"
            else:
                row += " | |"
            print(row, flush=True)


if __name__ == "__main__":
    with cpu.single_threaded_blas():
        main()
