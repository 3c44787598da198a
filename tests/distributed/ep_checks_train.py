"""Checks run by ep_worker.py: `moekit train --expert-parallel 2` on 2 ranks gives the losses of
single-process training on the same global batch, and its checkpoint loads in one process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
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
         "max_position_embeddings": 32, "router_z_loss_coef": 0.001, "capacity_factor": 1.25}
TRAIN = {"max_steps": 3, "batch_size": 4, "seq_len": 16, "warmup_steps": 1, "lr": 0.01, "eval_every": 0,
         "eval_batches": 1, "save_every": 0, "log_every": 1, "device": "cpu", "max_train_chars": 30000,
         "max_val_chars": 4000, "tokenizer_chars": 30000}


def losses(run: Path, split: str = "train") -> list[float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    key = lambda r: r["loss"] + r["aux_loss"] if split == "train" else r["val_loss"]  # noqa: E731
    return [key(r) for r in lines if r["split"] == split]


def ep_train_argv(data: str, **model_changes: object) -> list[str]:
    """``moekit train`` on 2 EP ranks with MODEL (changed by ``model_changes``) and TRAIN; add --out."""
    argv = ["train", "--data", data, "--expert-parallel", "2", "--no-progress"]
    argv += [f"--set={k}={v}" for k, v in {**MODEL, **model_changes}.items()]
    return argv + [arg for k, v in TRAIN.items() for arg in (f"--{k.replace('_', '-')}", str(v))]


def check_train(tmp: Path, data: str) -> None:
    torch.set_default_dtype(torch.float64)  # so that only the reduction order differs
    assert cli_main([*ep_train_argv(data), "--out", str(tmp / "ep")]) == 0
    rank = dist.get_rank()
    if rank == 0:
        ref = train(tmp / "single", model_config=get_preset("tiny", **MODEL),
                    train_config=TrainConfig(**TRAIN), data=data, show_progress=False, log=lambda *a: None)
        ep_losses, single = losses(tmp / "ep"), losses(tmp / "single")
        assert len(ep_losses) == TRAIN["max_steps"] == len(single)
        # The logits and the router run in float32 (by contract), so agreement is to float32 rounding.
        torch.testing.assert_close(torch.tensor(ep_losses), torch.tensor(single), rtol=2e-6, atol=0)
        assert single[-1] < single[0], "training did not reduce the loss"
        # Validation: each rank evaluates its rows, so the capacity sees every window once.
        ep_val, single_val = losses(tmp / "ep", "validation"), losses(tmp / "single", "validation")
        assert len(ep_val) == 1 == len(single_val)
        torch.testing.assert_close(torch.tensor(ep_val), torch.tensor(single_val), rtol=2e-6, atol=0)
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


def fails(argv: list[str], message: str) -> bool:
    """``moekit ARGV`` exits with 2 and prints ``message``."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli_main(argv)
    assert code == 2 and message in err.getvalue(), (code, err.getvalue())
    return True


def check_train_errors(tmp: Path, data: str) -> None:
    """An EP run takes rank 0's lock on the run directory, and an EP size that does not divide the
    experts fails on every rank before anything is written."""
    base = ep_train_argv(data)
    busy = tmp / "busy"
    if dist.get_rank() == 0:  # held by this live process, as by a one-process run training there
        busy.mkdir()
        (busy / ".moekit-lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")
    dist.barrier()
    assert fails([*base, "--out", str(busy)], "is in use by another moekit run")
    assert sorted(p.name for p in busy.iterdir()) == [".moekit-lock"]
    odd = tmp / "odd"
    assert fails([*base, "--out", str(odd), "--set=num_experts=3"], "num_experts=3 is not divisible")
    dist.barrier()  # rank 0 removes the directory it created for the lock
    assert not odd.exists()


def check_routing_noise_per_rank(tmp: Path, data: str) -> None:
    """Each rank draws its own routing noise (jitter here), and an EP run resumed on as many ranks
    continues its streams exactly: resumed from step 2 of 4, it logs the losses of 4 straight steps."""
    base = [*ep_train_argv(data, router_jitter_noise=0.5), "--max-steps", "4"]
    assert cli_main([*base, "--out", str(tmp / "noise-full")]) == 0
    assert cli_main([*base, "--out", str(tmp / "noise-cut"), "--save-every", "2"]) == 0
    dist.barrier()
    if dist.get_rank() == 0:  # as if stopped after step 2: its checkpoint is the newest
        shutil.rmtree(next((tmp / "noise-cut" / "checkpoints").glob("step_*4")))
    dist.barrier()
    assert cli_main(["train", "--out", str(tmp / "noise-cut"), "--resume", "--expert-parallel", "2",
                     "--no-progress"]) == 0
    if dist.get_rank() == 0:
        assert losses(tmp / "noise-full") == losses(tmp / "noise-cut")
        saved = next((tmp / "noise-cut" / "checkpoints").glob("step_*2/state.json"))
        streams = json.loads(saved.read_text())["rng_ranks"]
        assert len(streams) == 2 and streams[0]["torch"] != streams[1]["torch"]
    dist.barrier()
