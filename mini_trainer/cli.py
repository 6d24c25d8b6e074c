"""`mini-trainer train CONFIG [key.path=value ...]`: build the config's trainer, train it,
evaluate it when it can, print the results. Only the main process prints; `python -m
mini_trainer` is the same entry point (what `torchrun -m mini_trainer` starts)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__, distributed
from .builder import build_config_trainer
from .checkpoint import CheckpointDirectoryError, CheckpointError
from .ckpt_cli import add_ckpt_command, run_ckpt
from .config import load_config, parse_override
from .hooks import CheckpointingHook, EmaHook
from .plot import add_plot_command, run_plot
from .resume_check.cli import add_check_resume_command, run_check_resume

DESCRIPTION = """\
mini_trainer command line.

  mini-trainer train configs/digits_mlp.py trainer.max_steps=500 trainer.optimizer_cfg.lr=3e-3
  mini-trainer plot runs/digits_mlp -o curves.png
  mini-trainer check-resume configs/digits_mlp.py
  mini-trainer ckpt list runs/digits_mlp

A config is a Python file; its `trainer` entry is built with mini_trainer.builder and
trained. Extra modules that register your own classes go in the config's `imports` list.
"""

TRAIN_HELP = """\
Train the trainer described by CONFIG (a Python file with a `trainer` dict).

Overrides are key.path=value pairs applied to the config before building; values are
Python literals (1e-3, [64, 64], None, 'text'); anything else is a string. List items
are addressed by index: trainer.hooks.0.interval=5.

After training, a trainer with an evaluate() method is evaluated and each result is
printed as a line `<split>_<metric> value` (e.g. `test_accuracy 0.9750`) and logged to
metrics.jsonl (as `test/accuracy`). When a CheckpointingHook keeps the best checkpoint
(keep_best=...), the best weights are loaded first and a line says which step they are.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mini-trainer", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"mini_trainer {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser(
        "train", help="train from a config file", description=TRAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", metavar="CONFIG", help="path to a Python config file")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. trainer.max_steps=100")
    train.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    train.add_argument("--no-eval", action="store_true", help="skip evaluate() after training")
    train.add_argument(
        "--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="Python logging level"
    )
    add_plot_command(commands)
    add_check_resume_command(commands)
    add_ckpt_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling the overrides at the first option (`CONFIG --no-eval k=v`):
    # the remaining key=value words are overrides too.
    takes_overrides = args.command in ("train", "check-resume")
    unknown = [word for word in extra if word.startswith("-") or not takes_overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "plot":
        return run_plot(args)
    if args.command == "check-resume":
        return run_check_resume(args)
    if args.command == "ckpt":
        return run_ckpt(args)
    # Under torchrun every rank would print the same warnings: the others show errors only.
    level = args.log_level if os.environ.get("RANK", "0") == "0" else "ERROR"
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        for text in args.overrides:
            parse_override(text)  # fail on syntax before doing any work
        cfg = load_config(args.config, args.overrides)
    except (ValueError, KeyError, TypeError, OSError) as err:
        parser.exit(2, f"mini-trainer: error: {_message(err)}\n")
    if args.print_config:
        print(json.dumps(cfg, indent=2, default=repr))
        return 0
    return run_train(cfg, evaluate=not args.no_eval)


def run_train(cfg: dict[str, Any], evaluate: bool = True) -> int:
    """Import the config's `imports`, build `cfg["trainer"]`, train, evaluate, report."""
    # Building (imports, trainer, model, optimizer, data, hooks) is where config mistakes
    # surface: report those as usage errors; failures during training keep their traceback.
    try:
        trainer = build_config_trainer(cfg)
        if callable(getattr(trainer, "build", None)):
            trainer.build()
        if callable(getattr(trainer, "check_limits", None)):
            trainer.check_limits()
    except (ValueError, KeyError, TypeError, ImportError, OSError) as err:
        return _usage_error(_message(err))
    try:
        trainer.train()
    except (CheckpointDirectoryError, CheckpointError) as err:
        # Before the first step these are the user's input: a checkpoint directory that
        # cannot be written or that another run holds, a checkpoint that is missing or
        # unusable (exit 2). Later (a rank failing a save) they end the run (exit 1).
        started = bool(getattr(trainer, "step_info", None))
        print(f"mini-trainer: error: {_message(err)}", file=sys.stderr)
        return 1 if started else 2
    if evaluate and callable(getattr(trainer, "evaluate", None)):
        _load_best(trainer)
        results: dict[str, float] = {}
        for hook in getattr(trainer, "hooks", []):
            if isinstance(hook, EmaHook) and hook.ema_model is not None:  # also score the averaged weights
                results.update({f"{hook.name}_{k}": v for k, v in trainer.evaluate(model=hook.ema_model).items()})
        results.update(trainer.evaluate())  # the trained weights' results come last
        if results:
            trainer.log(results, dry_run=not distributed.is_main_process())
            if distributed.is_main_process():
                for name, value in results.items():
                    # `test_accuracy 0.9750`: one word per result, as scripts grep it
                    print(f"{name.replace('/', '_')} {value:.4f}", flush=True)
    return 0


def _load_best(trainer: Any) -> None:
    """Load the best checkpoint when a CheckpointingHook keeps one (every rank does)."""
    for hook in getattr(trainer, "hooks", []):
        if isinstance(hook, CheckpointingHook) and hook.best is not None and hook.best.tracker.best_step is not None:
            path = hook.restore_best(trainer)
            if distributed.is_main_process():
                tracker = hook.best.tracker
                print(f"best checkpoint: {path} (step {trainer.step}, {tracker.monitor} {tracker.best:.4f})",
                      flush=True)
            return


def _usage_error(message: str) -> int:
    print(f"mini-trainer: error: {message}", file=sys.stderr)
    return 2


def _message(err: BaseException) -> str:
    # KeyError quotes its message; show it plainly. One line, of a readable length.
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(text.split())
    return text if len(text) <= 2000 else text[:1970] + f"... ({len(text)} characters)"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
