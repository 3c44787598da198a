"""``moekit <command>``: argparse -> library calls, no logic of its own.

Each subcommand has an ``_add_<name>(subparsers)`` that declares its flags and a ``_cmd_<name>(args)``
that calls the library. Bad input surfaces as ``moekit: error: <message>`` and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shlex
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

# (flag, TrainConfig field, type, help). Defaults come from TrainConfig and are shown in --help.
_TRAIN_KNOBS: list[tuple[str, str, Any, str]] = [
    ("--max-steps", "max_steps", int, "optimizer steps in total (the cosine schedule ends here)"),
    ("--batch-size", "batch_size", int, "sequences per micro-batch"),
    ("--seq-len", "seq_len", int, "tokens per sequence (<= the model's context)"),
    ("--grad-accum", "grad_accum", int, "micro-batches per optimizer step"),
    ("--lr", "lr", float, "peak learning rate (AdamW)"),
    ("--min-lr-ratio", "min_lr_ratio", float, "final learning rate as a fraction of --lr (cosine)"),
    ("--warmup-steps", "warmup_steps", int, "linear warmup steps"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay on matrices"),
    ("--beta1", "beta1", float, "AdamW beta1"),
    ("--beta2", "beta2", float, "AdamW beta2"),
    ("--grad-clip", "grad_clip", float, "clip the global gradient norm (0 = off)"),
    ("--eval-every", "eval_every", int, "validation loss every N steps (0 = at the end only)"),
    ("--eval-batches", "eval_batches", int, "validation batches"),
    ("--save-every", "save_every", int, "checkpoint every N steps (0 = at the end only)"),
    ("--keep-last", "keep_last", int, "checkpoints kept on disk"),
    ("--log-every", "log_every", int, "metrics.jsonl line every N steps"),
    ("--seed", "seed", int, "seed of init, data order and every random draw"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N (bf16 autocast on CUDA, fp32 on CPU)"),
    ("--val-fraction", "val_fraction", float, "share of documents held out for validation"),
    ("--max-train-chars", "max_train_chars", int, "characters of training text used"),
    ("--max-val-chars", "max_val_chars", int, "characters of validation text used"),
    ("--tokenizer-chars", "tokenizer_chars", int, "training characters the BPE tokenizer learns from"),
]


def parse_key_values(items: list[str], flag: str, what: str, key_ok: Any = bool) -> dict[str, Any]:
    """``KEY=VALUE`` flag items -> ``{KEY: VALUE}``, VALUE read as JSON when it parses, else as text;
    an item without ``=`` or whose key fails ``key_ok`` is a ValueError naming ``flag`` and ``what``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key_ok(key):
            raise ValueError(f"{flag} expects KEY=VALUE {what}, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _add_train(sub: argparse._SubParsersAction) -> None:
    from moekit.train.config import TrainConfig

    defaults = {f.name: f.default for f in fields(TrainConfig)}
    p = sub.add_parser("train", help="train an MoE language model (default: tiny preset, stdlib corpus)")
    p.add_argument("--preset", default=None, help="model preset (tiny, small, ...); default tiny")
    p.add_argument("--data", default=None,
                   help="directory of text files, a .txt file or a .jsonl file with a \"text\" field; "
                        "default: the Python standard library source of this interpreter")
    p.add_argument("--out", default=None, help="run directory; default runs/<preset>-<YYYYmmdd-HHMMSS>")
    p.add_argument("--resume", action="store_true", help="continue the newest checkpoint of --out")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default: the preset's)")
    p.add_argument("--aux-loss-coef", type=float, default=None,
                   help="load-balancing loss coefficient (default: the preset's router_aux_loss_coef)")
    p.add_argument("--z-loss-coef", type=float, default=None,
                   help="router z-loss coefficient (default: the preset's router_z_loss_coef)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any ModelConfig field, e.g. --set num_hidden_layers=2 (repeatable)")
    for flag, name, typ, text in _TRAIN_KNOBS:
        p.add_argument(flag, dest=name, type=typ, default=None, help=f"{text} (default {defaults[name]})")
    p.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model for training (default off; --no-compile turns it off "
                        "again on --resume)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it shows only when stderr is a terminal)")
    p.add_argument("--expert-parallel", type=int, default=None, metavar="N",
                   help="split the experts over N ranks of a torchrun job, e.g. `torchrun --nproc-per-node 2 "
                        "-m moekit train --expert-parallel 2` (default: 1 under torchrun, else off)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from moekit.models import get_preset
    from moekit.train import train

    changes = {name: getattr(args, name) for _, name, _, _ in _TRAIN_KNOBS if getattr(args, name) is not None}
    if args.compile is not None:
        changes["compile"] = args.compile
    overrides = parse_key_values(args.set, "--set", "(a ModelConfig field)")
    for name, value in (("vocab_size", args.vocab_size), ("router_aux_loss_coef", args.aux_loss_coef),
                        ("router_z_loss_coef", args.z_loss_coef)):
        if value is not None:
            overrides[name] = value
    model_config = None
    if args.resume and args.out is None:
        raise ValueError("--resume needs --out RUN_DIR (the run to continue)")
    if args.resume and args.preset is None:
        if overrides:  # compared with the run's own model, not with a preset
            from moekit.models import ModelConfig
            from moekit.train.run import read_run_info

            model_config = ModelConfig.from_dict(read_run_info(args.out)["model_config"]).replace(**overrides)
    else:
        model_config = get_preset(args.preset or "tiny", **overrides)
    out = args.out
    if out is None:  # runs/<preset>-<time>, with -2, -3, ... when another run started in the same second
        stem = f"runs/{args.preset or 'tiny'}-{time.strftime('%Y%m%d-%H%M%S')}"
        out = next(name for n in itertools.count(1)
                   if not Path(name := stem if n == 1 else f"{stem}-{n}").exists())
    from moekit.distributed.training import resolve_expert_parallel

    expert_parallel = resolve_expert_parallel(args.expert_parallel)
    result = train(out, model_config=model_config, train_changes=changes, data=args.data, log=_log_line,
                   resume=args.resume, show_progress=False if args.no_progress else None,
                   expert_parallel=expert_parallel)
    if expert_parallel and int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports
        return 130 if result.interrupted else 0
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    loss = f", train loss {result.loss:.4f}" if result.loss is not None else ""
    print(f"run saved to {result.run_dir} (step {result.step}{loss}{val}; checkpoint {result.checkpoint})")
    if result.interrupted:
        return 130
    print(f"generate with: moekit generate {shlex.quote(str(result.run_dir))} --prompt 'def '")
    return 0


def _top_p_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (1 = off), got {text}")
    return value


def _top_k_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = all), got {text}")
    return value


def device_arg(name: str) -> str:
    """argparse type of ``--device`` (the inference commands, the benchmarks): cpu, cuda or cuda:N, and
    CUDA must be there."""
    if name != "cpu" and re.fullmatch(r"cuda(:\d+)?", name) is None:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {name!r}")
    if name != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{name}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if int(name.partition(":")[2] or 0) >= count:
            raise argparse.ArgumentTypeError(f"{name}: this machine has {count} CUDA device(s)")
    return name


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: X)`` to a flag's help unless the help names its default already or there is
    nothing to say (``None``, off switches, empty lists)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default == []
        if "default" in text or nothing or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action) or text


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a trained run",
                       formatter_class=_HelpFormatter)
    p.add_argument("run_dir", nargs="?", default=None,
                   help="a run directory written by `moekit train` (or use --model PATH)")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text; repeat for a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt at most")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=_top_k_arg, default=50, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=_top_p_arg, default=0.95, help="nucleus sampling mass in (0, 1] (1 = all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (row b uses seed + b)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--no-stream", action="store_true", help="print results at the end, no streaming")
    from moekit.hf.chat import add_generate_flags

    add_generate_flags(p)  # --model PATH (HF / Mistral checkpoint), --chat, --system, --dtype
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    from moekit.train import load_run

    system = [] if args.system is None else [args.system]
    for flag, values in (("--prompt", args.prompt or []), ("--stop", args.stop), ("--system", system)):
        for value in values:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as lone surrogates
                raise ValueError(f"{flag} {value!r} is not valid UTF-8 text (check the terminal's "
                                 "encoding)") from None

    if args.model is not None:
        from moekit.hf.chat import cmd_generate

        if args.run_dir is not None or args.step is not None:
            raise ValueError("give RUN_DIR (with --step) or --model PATH, not both")
        return cmd_generate(args)
    if args.run_dir is None or not args.prompt:
        raise ValueError("generate needs RUN_DIR and --prompt (or --model PATH for a checkpoint)")
    checkpoint_only = {"--chat": args.chat, "--system": args.system, "--template-var": args.template_var,
                       "--dtype": args.dtype}
    for flag, value in checkpoint_only.items():
        if value:
            raise ValueError(f"{flag} applies to --model PATH checkpoints, not to a training run")
    model, tokenizer, info = load_run(args.run_dir, step=args.step, device=args.device)
    print_generations(
        model, tokenizer, args.prompt, no_stream=args.no_stream, max_new_tokens=args.max_new_tokens,
        stop=args.stop, temperature=args.temperature, top_k=args.top_k or None,
        top_p=args.top_p if args.top_p < 1 else None, seed=args.seed,
        stop_token_ids=[info["model_config"]["eos_token_id"]],
    )
    return 0


def print_generations(model: Any, tokenizer: Any, prompts: list[str], no_stream: bool, **kwargs: Any) -> None:
    """``generate_text`` for the CLI: one prompt streams to the terminal (echoed once generation has
    started, so a prompt that is rejected prints nothing but the error; with ``no_stream`` the same text
    at the end), several print one block each. After a Ctrl-C, the text generated so far is printed
    before the ``KeyboardInterrupt`` goes on."""
    from moekit.inference import generate_text

    one = len(prompts) == 1 and not no_stream
    echoed = False
    so_far: list[list[str]] = [[] for _ in prompts]  # each row's final text, for a Ctrl-C

    def stream(row: int, piece: str) -> None:
        nonlocal echoed
        so_far[row].append(piece)
        if not one:
            return
        if not echoed:
            sys.stdout.write(prompts[0])
            echoed = True
        sys.stdout.write(piece)
        sys.stdout.flush()

    def show(texts: list[str]) -> None:
        if len(prompts) == 1:  # (streamed, or --no-stream: the same text at the end)
            print("" if echoed else prompts[0] + texts[0])
            return
        for i, (prompt, text) in enumerate(zip(prompts, texts)):
            print(f"--- [{i}] ---\n{prompt}{text}")

    try:
        texts = generate_text(model, tokenizer, prompts, stream=stream, **kwargs)
    except KeyboardInterrupt:  # what was generated is shown, then the interruption goes on
        if echoed or not one:
            show(["".join(pieces) for pieces in so_far])
        raise
    show(texts)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameters, memory and FLOPs of a preset, a run or a checkpoint")
    p.add_argument("source", nargs="?", default=None, metavar="RUN_OR_MODEL",
                   help="a run directory or an HF / Mistral checkpoint directory (or cached hub id); "
                        "only its config is read")
    p.add_argument("--preset", default=None, help="preset name (tiny, small, mixtral-8x7b, ...)")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    from moekit.models import ModelConfig, get_preset
    from moekit.models.info import describe

    if (args.source is None) == (args.preset is None):
        raise ValueError("info needs one of --preset NAME or RUN_OR_MODEL (a run or checkpoint directory)")
    if args.preset is not None:
        config = get_preset(args.preset)  # an unknown name fails here with the list of presets
    elif (Path(args.source) / "run.json").is_file():
        from moekit.train.run import read_run_info

        config = ModelConfig.from_dict(read_run_info(args.source)["model_config"])
    else:
        from moekit.hf.load import read_config
        from moekit.hf.resolve import resolve_path

        config = read_config(resolve_path(args.source))[0]
    print(describe(config))
    return 0


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="routing analysis of a run or checkpoint: metrics, plots, report.html",
                       formatter_class=_HelpFormatter)
    p.add_argument("source", metavar="RUN_OR_MODEL",
                   help="a run directory written by `moekit train`, or a Hugging Face checkpoint directory")
    p.add_argument("--data", default=None,
                   help="text to analyse: a file, a directory or a .jsonl "
                        "(default: the run's validation split)")
    p.add_argument("--out", default=None,
                   help="report directory (default: RUN/analysis; ./analysis-NAME for a checkpoint)")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens of text run through the model")
    p.add_argument("--layers", nargs="+", default=None, metavar="LAYER",
                   help="decoder layer indices (or module names) shown in detail "
                        "(default: first, middle, last)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the run's seq_len)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: the newest)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_analyze)


def _cmd_analyze(args: argparse.Namespace) -> int:
    from moekit.analysis.analyze import layer_arg, run_analysis

    run_analysis(args.source, data=args.data, out_dir=args.out, max_tokens=args.max_tokens,
                 layers=layer_arg(args.layers), seq_len=args.seq_len, batch_size=args.batch_size,
                 device=args.device, step=args.step, show_progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from moekit import __version__

    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts toolkit")
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_generate(sub)
    _add_info(sub)
    _add_analyze(sub)
    from moekit.hf.chat import add_convert_parser

    add_convert_parser(sub)  # moekit convert SRC DST --to hf|mistral
    return parser


def _quiet_stdout() -> None:
    """Send what is left of stdout to /dev/null: its reader is gone."""
    with contextlib.suppress(OSError, ValueError):  # no second error when Python flushes at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _log_line(line: str) -> None:
    """A training log line on stdout; when its reader leaves (``moekit train | head``), the run
    goes on quietly to its end and checkpoints instead of dying unsaved."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        _quiet_stdout()


def main(argv: list[str] | None = None) -> int:
    from safetensors import SafetensorError

    from moekit.train.loop import TrainingDiverged

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
        return code
    except BrokenPipeError:  # `moekit info | head`: the reader left; say nothing more
        _quiet_stdout()
        return 1
    except (ValueError, TypeError, OSError, SafetensorError, TrainingDiverged) as err:
        # OSError / SafetensorError: a missing / unreadable path, a full disk
        print(f"moekit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moekit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
