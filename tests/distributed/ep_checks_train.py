"""Checks run by ep_worker.py: `moekit train --expert-parallel 2` on 2 ranks gives the losses of
single-process training on the same global batch, and its checkpoint loads in one process."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from moekit.cli import main as cli_main
from moekit.models import get_preset
from moekit.train import train
from moekit.train.config import TrainConfig

MODEL = {"vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1, "intermediate_size": 48, "moe_intermediate_size": 24, "num_experts": 4,
         "max_position_embeddings": 32, "router_z_loss_coef": 0.001}
TRAIN = {"max_steps": 3, "batch_size": 4, "seq_len": 16, "warmup_steps": 1, "lr": 0.01, "eval_every": 0,
         "eval_batches": 1, "save_every": 0, "log_every": 1, "device": "cpu", "max_train_chars": 30000,
         "max_val_chars": 4000, "tokenizer_chars": 30000}


def losses(run: Path) -> list[float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] + r["aux_loss"] for r in lines if r["split"] == "train"]


def check_train(tmp: Path, data: str) -> None:
    torch.set_default_dtype(torch.float64)  # so that only the reduction order differs
    argv = ["train", "--out", str(tmp / "ep"), "--data", data, "--expert-parallel", "2", "--no-progress"]
    argv += [f"--set={k}={v}" for k, v in MODEL.items()]
    for k, v in TRAIN.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    assert cli_main(argv) == 0
    rank = dist.get_rank()
    if rank == 0:
        ref = train(tmp / "single", model_config=get_preset("tiny", **MODEL),
                    train_config=TrainConfig(**TRAIN), data=data, show_progress=False, log=lambda *a: None)
        ep_losses, single = losses(tmp / "ep"), losses(tmp / "single")
        assert len(ep_losses) == TRAIN["max_steps"] == len(single)
        # The logits and the router run in float32 (by contract), so agreement is to float32 rounding.
        torch.testing.assert_close(torch.tensor(ep_losses), torch.tensor(single), rtol=2e-6, atol=0)
        assert single[-1] < single[0], "training did not reduce the loss"
        # The EP checkpoint holds every expert (single-file) and equals the single-process weights.
        ep_state = load_file(str(ref.checkpoint).replace("single", "ep") + "/model.safetensors")
        single_state = load_file(str(ref.checkpoint) + "/model.safetensors")
        assert ep_state.keys() == single_state.keys()
        worst = max(float((ep_state[k] - v).abs().max()) for k, v in single_state.items())
        print(f"losses ep {ep_losses} single {single}; max weight diff {worst:.2e}", flush=True)
        for k, v in single_state.items():
            torch.testing.assert_close(ep_state[k], v, rtol=1e-7, atol=1e-9, msg=k)
    dist.barrier()


def check_resume_across_sizes(tmp: Path) -> None:
    """Continue the single-process run under EP (2 ranks) and the EP run in one process: the
    checkpoints re-shard (weights and Adam state), and both give the same next losses."""
    argv = ["train", "--out", str(tmp / "single"), "--resume", "--max-steps", "5", "--expert-parallel", "2",
            "--no-progress"]
    assert cli_main(argv) == 0
    if dist.get_rank() == 0:
        quiet = {"show_progress": False, "log": lambda *a: None}
        train(tmp / "ep", train_changes={"max_steps": 5}, resume=True, **quiet)
        a, b = losses(tmp / "single"), losses(tmp / "ep")
        assert len(a) == len(b) == 5, (a, b)
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=2e-6, atol=0)
    dist.barrier()
