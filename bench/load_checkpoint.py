"""Benchmark: loading a ~1 GB random Mixtral checkpoint with moekit.from_pretrained vs transformers.

The checkpoint is written once (HF on-disk layout: per-expert tensors, config.json, 500 MB shards) and
read once before timing so both sides load from the page cache. Each load runs in a fresh subprocess
(so its peak RSS is its own), alternating moekit / transformers for ``--repeats`` rounds; the script
prints medians (and the fastest round) side by side and the ratios of the medians. Per load it measures:

- ``load s``: ``from_pretrained`` returns (moekit keeps unconverted tensors as lazy mmap views);
- ``load+touch s``: plus summing every parameter once (every weight page read: the honest "ready" time);
- peak RSS (``VmHWM``) and peak minus the RSS right before loading (after imports).

The last-position logits of a fixed input are compared between the two sides (max abs diff).

    python bench/load_checkpoint.py                    # ~1.1 GB fp32, 3 rounds
    python bench/load_checkpoint.py --repeats 5 --dir /tmp/ckpt
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

IDS = [[1, 17, 923, 4051, 88, 31000, 5, 77]]


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def bench_config():
    from moekit.models import ModelConfig

    # 277M parameters: 1.11 GB in float32, 86% of it in the stacked experts
    return ModelConfig(vocab_size=32000, hidden_size=1024, num_hidden_layers=4, num_attention_heads=16,
                       num_key_value_heads=4, intermediate_size=2048, num_experts=8, top_k=2,
                       max_position_embeddings=4096, rope_theta=1e6, bos_token_id=1, eos_token_id=2)


def write_checkpoint(out: Path) -> None:
    """Random weights, one tensor at a time (never the whole model in RAM), in transformers' layout."""
    from moekit.hf import config_map, keymap
    from moekit.hf.checkpoint import atomic_write_text, write_sharded
    from moekit.models import MoEForCausalLM

    cfg = bench_config()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MoEForCausalLM(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)

    def tensors():
        for name, shape in shapes.items():
            norm = name.endswith("norm.weight")
            t = torch.ones(shape) if norm else torch.randn(shape, generator=gen) * 0.02
            yield from keymap.hf_from_state({name: t}, "mixtral")

    write_sharded(tensors(), out, max_shard_size="500MB")
    atomic_write_text(out / "config.json", json.dumps(config_map.hf_from_config(cfg, "mixtral"), indent=2))


def child(side: str, path: str) -> None:
    """One load in this process; prints a JSON line."""
    torch.set_num_threads(2)
    if side == "moekit":
        import moekit

        load = lambda: moekit.from_pretrained(path)  # noqa: E731
    else:
        import transformers
        import transformers.models.mixtral.modeling_mixtral  # noqa: F401 - its import is not timed

        load = lambda: transformers.AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()  # noqa: E731
    base = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    model = load()
    t1 = time.perf_counter()
    with torch.no_grad():
        total = sum(float(p.sum()) for p in model.parameters())
    t2 = time.perf_counter()
    peak = _rss_kb("VmHWM")
    with torch.no_grad():
        logits = model(torch.tensor(IDS)).logits[0, -1]
    print(json.dumps(dict(load=t1 - t0, touch=t2 - t0, peak_mb=peak / 1024, delta_mb=(peak - base) / 1024,
                          base_mb=base / 1024, checksum=total, logits=logits.tolist())))


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--dir", default="/tmp/moekit-bench-ckpt", help="checkpoint directory (made once)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=("moekit", "transformers"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dir)
        return
    path = Path(args.dir)
    if not (path / "config.json").is_file():
        print(f"writing the random checkpoint to {path} ...", flush=True)
        write_checkpoint(path)
    files = sorted(path.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    for f in files:  # page cache warm-up: both sides then read from memory, not disk
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    runs: dict[str, list[dict]] = {"moekit": [], "transformers": []}
    for _ in range(args.repeats):
        for side in runs:
            out = subprocess.run([sys.executable, __file__, "--child", side, "--dir", str(path)],
                                 check=True, capture_output=True, text=True).stdout
            runs[side].append(json.loads(out.strip().splitlines()[-1]))
    med = {side: {k: statistics.median(r[k] for r in rs) for k in ("load", "touch", "peak_mb", "delta_mb",
                                                                   "base_mb")} for side, rs in runs.items()}
    diff = max(abs(a - b) for a, b in zip(runs["moekit"][0]["logits"], runs["transformers"][0]["logits"]))
    print(f"checkpoint: {size / 1e9:.2f} GB = {size / 2**20:.0f} MiB float32 in {len(files)} shards, "
          f"{args.repeats} rounds, medians")
    print(f"{'':20s}{'load s':>9s}{'load+touch s':>14s}{'peak RSS MiB':>14s}{'peak-base MiB':>15s}")
    for side, m in med.items():
        print(f"{side:20s}{m['load']:9.2f}{m['touch']:14.2f}{m['peak_mb']:14.0f}{m['delta_mb']:15.0f}")
    best = {side: {k: min(r[k] for r in rs) for k in ("load", "touch")} for side, rs in runs.items()}
    for side, x in best.items():
        print(f"{side + ' (min)':20s}{x['load']:9.2f}{x['touch']:14.2f}")
    m, t = med["moekit"], med["transformers"]
    print(f"{'moekit/transformers':20s}{m['load'] / t['load']:8.2f}x{m['touch'] / t['touch']:13.2f}x"
          f"{m['peak_mb'] / t['peak_mb']:13.2f}x{m['delta_mb'] / t['delta_mb']:14.2f}x")
    for side, x in med.items():
        print(f"{side}: peak-base = {x['delta_mb'] * 2**20 / size:.2f}x the checkpoint size")
    print(f"last-position logits max |moekit - transformers| = {diff:.2e}")


if __name__ == "__main__":
    main()
