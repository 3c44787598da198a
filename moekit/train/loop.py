"""The training loop: AdamW + warmup/cosine, clipping, accumulation, MoE aux losses, checkpoints.

One optimizer step: ``grad_accum`` micro-batches of ``(B, S)`` token windows; objective per
micro-batch ``(loss + aux_loss) / grad_accum`` where ``aux_loss`` is the model's weighted sum of the
MoE layers' load-balancing and z-losses (coefficients from the MoE config); clip; AdamW step.

Determinism: the model init, the data order (a pure function of seed and position) and every RNG
state are saved in each checkpoint, and validation runs under ``torch.random.fork_rng``, so on CPU a
run resumed from step N computes exactly the numbers the uninterrupted run computed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from moekit.core.losses import expert_counts
from moekit.train.checkpoint import (
    capture_rng_state,
    damaged,
    list_checkpoints,
    load_checkpoint,
    read_json,
    restore_rng_state,
)
from moekit.train.checkpoint import save_checkpoint as _save
from moekit.train.config import TrainConfig, resume_train_config
from moekit.train.data import TokenStream, validation_batches
from moekit.train.prepare import load_tokens, prepare_run
from moekit.train.run import METRICS_FILE, TOKENIZER_FILE, claim_run_dir, read_run_info, write_run_info
from moekit.train.tokenizer import load_tokenizer


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm of a step was not finite: training stopped before that step's
    update, so no checkpoint holds non-finite weights."""


@dataclass
class TrainResult:
    """What :func:`train` returns: where the run is and how it ended."""

    run_dir: Path
    step: int
    loss: float | None
    val_loss: float | None
    interrupted: bool
    checkpoint: Path | None


class _GracefulStop:
    """First SIGINT / SIGTERM: finish the current step, save, stop. Second SIGINT: abort at once."""

    def __init__(self, log: Callable[[str], None]):
        self.requested = False
        self._log = log
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        name = signal.Signals(signum).name
        self._log(f"\n{name}: saving a checkpoint after this step (Ctrl-C again aborts)")

    def __enter__(self) -> _GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Any:
    """SIGTERM outside the training loop (preparing the run, loading a checkpoint) acts as Ctrl-C
    does there: a KeyboardInterrupt, so a half-prepared run directory is removed, not left behind.
    Only where SIGTERM still has its default action (a caller's own handler is kept)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _memory_bytes(device: torch.device) -> int | None:
    """The device's total memory (CPU: physical RAM), or None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX
        return None


def _check_memory(model_config: Any, device: torch.device) -> None:
    """Refuse, before anything is written, a model whose float32 training state (weights, gradients
    and AdamW's two moments: 16 bytes per parameter) exceeds the device's whole memory."""
    from moekit.models import MoEForCausalLM

    with torch.device("meta"):  # shapes only: no memory
        params = MoEForCausalLM(model_config).num_parameters()
    need, have = 16 * params, _memory_bytes(device)
    if have is not None and need > have:
        raise ValueError(
            f"the model has {params / 1e9:.2f} B parameters: training it needs about {need / 2**30:,.0f} GiB "
            f"(float32 weights, gradients and AdamW moments), more than the {have / 2**30:,.0f} GiB of "
            f"{device.type}; choose a smaller --preset or model (nothing was written)"
        )


def _autocast(device: torch.device):
    # bf16 autocast on CUDA; fp32 on CPU (bf16 matmuls are slow on most CPUs).
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for param in model.parameters():  # unique parameters (tied weights once)
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # torch's fused AdamW (one kernel over all parameters) where it has one: 3-5x faster than the
    # per-parameter loop on CPU (docs/benchmarks.md, "Training throughput").
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device, ep: Any = None
) -> float:
    """Mean next-token cross-entropy over ``batches`` (each ``(b, S)``); leaves every RNG untouched.

    ``ep`` (an ``ExpertParallelRun``): each rank evaluates its own rows of every batch and the sums
    are all-reduced, so the experts (and a capacity) see each window once, as in one process.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _autocast(device):
        for batch in batches:
            batch = (batch if ep is None else ep.local_batch(batch, allow_uneven=True)).to(device)
            out = model(batch, labels=batch, return_logits=False)  # also with 0 rows: EP collectives
            n = batch.shape[0] * (batch.shape[1] - 1)
            if n:
                total += float(out.loss) * n
                count += n
    model.train(was_training)
    if ep is not None:
        sums = ep.sum_tensors([torch.tensor([total, count], dtype=torch.float64)])[0]
        total, count = float(sums[0]), float(sums[1])
    return total / count


def _load_stats(routing: list[Any] | None) -> list[torch.Tensor]:
    """Per MoE layer ``(2, E)``: the slots routed to each expert (the router's choice), and those it
    processed (after capacity drops)."""
    if not routing:
        return []
    return [torch.stack([expert_counts(info.expert_ids, info.tokens_per_expert.shape[0]).double(),
                         info.tokens_per_expert.double()]).cpu() for info in routing]


def _append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with (run_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics logged after ``step`` (they belong to steps the resume will recompute), and
    lines that do not parse."""
    file = run_dir / METRICS_FILE
    if not file.is_file():
        return
    kept = []
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # e.g. a line cut short by a crash while it was appended
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, file)


def _check_same_model(saved: Any, requested: Any) -> None:
    ids = {k: getattr(saved, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    requested = requested.replace(**ids)
    if requested != saved:
        a, b = saved.to_dict(), requested.to_dict()
        diff = [f"{k}: run has {a[k]!r}, asked for {b[k]!r}" for k in a if a[k] != b[k]]
        raise ValueError(
            "cannot resume: the checkpoint was trained with another model configuration ("
            + "; ".join(diff) + "); drop the model options or start a new run with another --out"
        )


def _check_checkpoint_config(path: Path, model_config: Any) -> None:
    state = read_json(path, "state.json")
    if not isinstance(state, dict):
        raise damaged(path, "state.json", TypeError(f"a JSON object expected, got {type(state).__name__}"))
    missing = [key for key in ("step", "data", "rng") if key not in state]
    if missing:
        raise damaged(path, "state.json", ValueError(f"no {', '.join(missing)}"))
    saved = state.get("model_config")
    if saved is not None and saved != model_config.to_dict():
        diff = [k for k in saved if saved.get(k) != model_config.to_dict().get(k)]
        raise ValueError(
            f"cannot resume: checkpoint {path} was written for another model configuration than the "
            f"run's (fields {diff}); nothing was changed"
        )


def train(
    out: str | os.PathLike,
    *,
    model_config: Any = None,
    train_config: TrainConfig | None = None,
    train_changes: dict[str, Any] | None = None,
    data: str | os.PathLike | None = None,
    resume: bool = False,
    show_progress: bool | None = True,
    log: Callable[[str], None] = print,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    expert_parallel: int = 0,
) -> TrainResult:
    """Train a :class:`moekit.models.MoEForCausalLM` into the run directory ``out``.

    Args:
        out: run directory; must be absent or empty for a new run, a moekit run for ``resume``.
        model_config: :class:`moekit.models.ModelConfig` (default: preset ``tiny``). On resume it
            is optional and must equal the run's.
        train_config: a full :class:`TrainConfig` for a new run (default ``TrainConfig()``); refused
            with ``resume``.
        train_changes: fields to change from ``train_config`` (new run) or from the run's saved
            config (resume; identity fields such as ``lr`` or ``batch_size`` may not change there).
        data: ``None`` = the embedded stdlib corpus; else see :func:`moekit.train.corpus.load_corpus`.
        resume: continue the newest checkpoint of ``out``.
        show_progress: tqdm progress bar; ``None``: only when stderr is a terminal (no ``\r`` bars in logs).
        log: where one-line messages go.
        on_step: called as ``on_step(step, metrics)`` after every optimizer step.
        expert_parallel: 0 = one process; ``N >= 1`` = join the torchrun job and split the experts
            over ``N`` ranks (see :mod:`moekit.distributed.training`; 1 = data parallel only).

    A SIGINT (Ctrl-C) or SIGTERM finishes the current step, saves a checkpoint and returns with
    ``interrupted=True``. A step whose loss or gradient norm is not finite raises
    :class:`TrainingDiverged` before its update (checkpoints saved so far stay). The run (rank 0 of a
    torchrun job) holds ``out/.moekit-lock`` while it runs, so a second ``train`` into the same
    directory fails at once.
    """
    if resume and train_config is not None:
        raise ValueError("train_config is for a new run; a resume continues the run's own config "
                         "(change max_steps or other non-identity fields with train_changes)")
    args = (model_config, train_config, train_changes, data, resume, show_progress, log, on_step)
    if not expert_parallel:
        with _terminate_as_interrupt(), claim_run_dir(out, new=not resume):
            return _train(Path(out), *args, ep=None)
    # A torchrun job: the ranks agree on the directory (e.g. a time-stamped default), rank 0 holds
    # its lock, prepares it and writes to it. The logic is in moekit.distributed.training.
    from moekit.distributed.training import ExpertParallelRun

    ep = ExpertParallelRun(expert_parallel)
    out = Path(ep.run_on_main(lambda: str(out), share_result=True))
    with contextlib.ExitStack() as held:
        ep.run_on_main(lambda: held.enter_context(claim_run_dir(out, new=not resume)))
        return _train(out, *args, ep=ep)


def _train(out: Path, model_config, train_config, train_changes, data, resume, show_progress, log, on_step,
           ep: Any) -> TrainResult:
    """``train``'s body; ``ep`` (an ``ExpertParallelRun`` or None) gives the hooks of a torchrun job."""
    from moekit.models import ModelConfig, MoEForCausalLM, get_preset

    if ep is not None and not ep.is_main:
        log, show_progress = (lambda *a, **k: None), False
    main = ep is None or ep.is_main
    if resume:
        info = read_run_info(out)
        saved_model = ModelConfig.from_dict(info["model_config"])
        if model_config is not None:
            _check_same_model(saved_model, model_config)
        model_config = saved_model
        if data is not None and Path(data).resolve() != Path(info["data"]["source"]).resolve():
            raise ValueError(
                f"cannot resume: the run was trained on {info['data']['source']}, not on --data {data}"
            )
        saved_cfg = TrainConfig.from_dict(info["train_config"])
        cfg = resume_train_config(saved_cfg, dict(train_changes or {}))
        device = _device(cfg.device)  # before anything is written
        checkpoints = list_checkpoints(out)
        if not checkpoints:
            raise ValueError(f"cannot resume {out}: it stopped before its first checkpoint; remove the "
                             "directory and start the run again")
        if cfg.max_steps <= checkpoints[-1][0]:
            raise ValueError(f"cannot resume {out}: its newest checkpoint is at step {checkpoints[-1][0]} "
                             f"and --max-steps is {cfg.max_steps}; give a larger --max-steps to train on")
        tokens = load_tokens(out)
        load_tokenizer(out / TOKENIZER_FILE)  # fail early on a damaged run
    else:
        cfg = (train_config or TrainConfig()).replace(**(train_changes or {}))
        device = _device(cfg.device)  # before anything is written
        model_config = model_config if model_config is not None else get_preset("tiny")
        if ep is None:  # (expert parallelism splits the experts: each rank holds a share)
            _check_memory(model_config, device)
            model_config, _, tokens = prepare_run(out, model_config, cfg, data, log=log)
        else:  # rank 0 prepares the run directory, every rank reads it
            ep.check_configs(model_config, cfg)  # before anything is written
            ep.run_on_main(lambda: prepare_run(out, model_config, cfg, data, log=log))
            model_config, tokens = ModelConfig.from_dict(read_run_info(out)["model_config"]), load_tokens(out)

    if ep is not None:
        device = ep.device(device)
        ep.check_configs(model_config, cfg)
    torch.manual_seed(cfg.seed)
    model = MoEForCausalLM(model_config).to(device)
    model.train()
    optimizer = _optimizer(model, cfg)
    stream = TokenStream(tokens["train"], cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    val_batches = validation_batches(tokens["validation"], cfg.seq_len, cfg.batch_size, cfg.eval_batches)
    step, val_loss, loss_value, state = 0, None, None, {}
    if resume:
        _check_checkpoint_config(checkpoints[-1][1], model_config)
        state = load_checkpoint(checkpoints[-1][1], model, optimizer, device=device)
        step = int(state["step"])
        stream.load_state_dict(state["data"])
        restore_rng_state(state["rng"])
        val_loss = state.get("val_loss")
        loss_value = state.get("loss")
        if main:  # only now that the checkpoint loaded: a failed resume leaves the run as it was
            write_run_info(out, {**{k: v for k, v in info.items() if k not in ("format", "version")},
                                 "train_config": cfg.to_dict()})
            _truncate_metrics(out, step)
        log(f"resuming {out} from step {step}")
        if saved_cfg.max_steps != cfg.max_steps and step >= cfg.warmup_steps:
            log(f"note: the cosine schedule now ends at step {cfg.max_steps}, not {saved_cfg.max_steps}: the "
                f"learning rate of step {step + 1} is {cfg.lr_at(step):.3g} (it would have been "
                f"{saved_cfg.lr_at(step):.3g}); a run resumed unchanged continues exactly")
    if ep is not None:  # same weights everywhere; now each rank its own noise (jitter, noisy top-k)
        ep.split_rng(state.get("rng_ranks"))
    fwd = torch.compile(model) if cfg.compile else model

    def save(at: int) -> Path:
        state = {"data": stream.state_dict(), "rng": capture_rng_state(), "loss": loss_value,
                 "val_loss": val_loss, "tokens_seen": stream.position * cfg.seq_len,
                 "model_config": model_config.to_dict(), "train_config": cfg.to_dict()}
        if ep is None:
            return _save(out, at, model, optimizer, state, keep_last=cfg.keep_last)
        state["rng_ranks"] = ep.gather_objects(state["rng"])
        with ep.unsharded(model, optimizer):  # one single-file checkpoint with every expert
            return ep.run_on_main(lambda: _save(out, at, model, optimizer, state, keep_last=cfg.keep_last),
                                  share_result=True)

    log(f"training {model.num_parameters():,} parameters ({model.num_parameters(active=True):,} active) "
        f"on {device} for {cfg.max_steps} steps of {cfg.tokens_per_step:,} tokens -> {out}")
    if ep is not None:  # after the count above: experts (and their Adam state) split over the EP group
        ep.shard(model, optimizer)
        log(ep.describe())
    disable = None if show_progress is None else not show_progress  # None: tqdm's check for a terminal
    bar = tqdm(total=cfg.max_steps, initial=step, disable=disable, unit="step", dynamic_ncols=True)
    interrupted, last_saved = False, None
    with _GracefulStop(log) as stop:
        while step < cfg.max_steps and not stop.requested:
            lr = cfg.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            loss_sum = aux_sum = 0.0
            loads: list[torch.Tensor] = []
            for _ in range(cfg.grad_accum):
                batch = stream.next_batch()
                batch = (batch if ep is None else ep.local_batch(batch)).to(device)
                with _autocast(device):
                    output = fwd(batch, labels=batch, output_routing=True, return_logits=False)
                ((output.loss + output.aux_loss) / cfg.grad_accum).backward()
                loss_sum += float(output.loss.detach())
                aux_sum += float(torch.as_tensor(output.aux_loss).detach())
                stats = _load_stats(output.routing)
                loads = stats if not loads else [a + b for a, b in zip(loads, stats)]
            clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            if ep is not None:  # gradients and logged numbers of the global batch
                loss_sum, aux_sum, loads = ep.mean(loss_sum), ep.mean(aux_sum), ep.sum_tensors(loads)
                grad_norm = ep.sync_and_clip(model, clip)
            else:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
                bar.close()
                newest = list_checkpoints(out)
                kept = (f"the newest checkpoint (step {newest[-1][0]}) is intact" if newest
                        else "no checkpoint saved yet")
                raise TrainingDiverged(
                    f"training diverged at step {step + 1}: loss {loss_sum / cfg.grad_accum:.4g}, gradient "
                    f"norm {grad_norm:.4g}; stopped before its update ({kept}). Start a new run with a "
                    "lower --lr, more --warmup-steps or --grad-clip")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.update_router_bias()  # sigmoid_bias routers: the load counted over this step
            step += 1
            elapsed = time.perf_counter() - t0
            loss_value = loss_sum / cfg.grad_accum
            routed = [t[0] for t in loads]
            cvs = [float(t.std(unbiased=False) / t.mean()) if t.sum() > 0 else 0.0 for t in routed]
            drops = [float(1 - t[1].sum() / t[0].sum()) if t[0].sum() > 0 else 0.0 for t in loads]
            metrics = {
                "step": step, "split": "train", "loss": loss_value, "aux_loss": aux_sum / cfg.grad_accum,
                "lr": lr, "grad_norm": grad_norm, "tokens_per_s": cfg.tokens_per_step / elapsed,
                "load_cv": sum(cvs) / len(cvs) if cvs else 0.0,
                "drop_rate": sum(drops) / len(drops) if drops else 0.0, "epoch": stream.epoch,
                "tokens_seen": stream.position * cfg.seq_len,
            }
            if main and (step % cfg.log_every == 0 or step == cfg.max_steps):
                record = dict(metrics, load_cv_per_layer=cvs,
                              expert_load=[(t / t.sum().clamp_min(1)).tolist() for t in routed])
                _append_metrics(out, record)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps:
                val_loss = evaluate(model, val_batches, device, ep)
                if main:
                    _append_metrics(out, {"step": step, "split": "validation", "val_loss": val_loss})
                metrics["val_loss"] = val_loss
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
                last_saved = (step, save(step))
            bar.update(1)
            if ep is not None:  # a signal seen by one rank stops every rank after the same step
                stop.requested = ep.any_rank(stop.requested)
            postfix = {"loss": f"{loss_value:.3f}", "aux": f"{metrics['aux_loss']:.4f}",
                       "tok/s": f"{metrics['tokens_per_s']:,.0f}", "cv": f"{metrics['load_cv']:.2f}"}
            if val_loss is not None:
                postfix["val"] = f"{val_loss:.3f}"
            bar.set_postfix(postfix, refresh=False)
            if on_step is not None:
                on_step(step, metrics)
        if stop.requested and step < cfg.max_steps:
            interrupted = True
            if last_saved is None or last_saved[0] != step:
                last_saved = (step, save(step))
            resume_cmd = f"moekit train --out {shlex.quote(str(out))} --resume"
            log(f"interrupted at step {step}; resume with: {resume_cmd}")
    bar.close()
    if last_saved is None:
        existing = list_checkpoints(out)
        last_saved = existing[-1] if existing else None
    checkpoint = last_saved[1] if last_saved else None
    return TrainResult(out, step, loss_value, val_loss, interrupted, checkpoint)
