"""`mini-trainer check-resume CONFIG [key=value ...]`: check_resume on a config's trainer."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..builder import build_config_trainer
from ..config import load_config, parse_override
from ..trainer import BaseTrainer
from .check import check_resume

CHECK_RESUME_HELP = """\
Check that the trainer of CONFIG resumes exactly: train it for --steps steps without
interruption, then again interrupted at --interrupts hard points (the end of an epoch,
right after an evaluation, random ones), each time killed after more work than was saved
and continued in a fresh trainer from the saved state. Compares both runs bit for bit
(loss, batches, model, optimizer, scheduler, scaler, RNG, data position, every hook's
state, after every step) and names the first difference with a hint, and every attribute
of your trainer or hooks that changed during training but is not saved.

Nothing of an existing run is touched: every run gets its own temporary workspace.
Overrides are key.path=value pairs, as for `mini-trainer train`.

  mini-trainer check-resume configs/digits_mlp.py
  mini-trainer check-resume my_config.py trainer.gradient_accumulation_steps=4 --json

Exit status: 0 exact, 1 not exact (or training failed), 2 usage error.
"""


def trainer_from_config(path: str, overrides: Sequence[str]) -> BaseTrainer:
    """A fresh trainer from the config at `path` (a module-level function, so that
    `functools.partial` of it reaches fresh processes)."""
    trainer = build_config_trainer(load_config(path, list(overrides)))
    if not isinstance(trainer, BaseTrainer):
        raise TypeError(f"check-resume needs a mini_trainer BaseTrainer; the config built a {type(trainer).__name__}")
    return trainer


def add_check_resume_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add `check-resume` to an argparse `add_subparsers()` object; return its parser."""
    parser = subparsers.add_parser(
        "check-resume", help="check that a config's trainer resumes exactly", description=CHECK_RESUME_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", metavar="CONFIG", help="path to a Python config file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. trainer.seed=1")
    parser.add_argument("--steps", type=int, metavar="N",
                        help="steps to train (default: 32, or enough to reach the first evaluation and epoch end)")
    parser.add_argument("--interrupts", type=int, default=3, metavar="K", help="interruptions (default: 3)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="seed of the global RNGs and of the random interruption points (default: 0)")
    parser.add_argument("--subprocess", action="store_true",
                        help="resume in fresh processes from checkpoint directories (default: in this process "
                             "through state_dict/load_state_dict)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (for CI)")
    return parser


def run_check_resume(args: argparse.Namespace) -> int:
    """Run `mini-trainer check-resume` from parsed arguments; return the exit status."""
    try:
        for text in args.overrides:
            parse_override(text)
        if args.steps is not None and args.steps < 3:
            raise ValueError(f"--steps must be at least 3; got {args.steps}")
        if args.interrupts < 1:
            raise ValueError(f"--interrupts must be at least 1; got {args.interrupts}")
        make_trainer = functools.partial(trainer_from_config, str(args.config), tuple(args.overrides))
        with tempfile.TemporaryDirectory(prefix="mini_trainer-check-resume-") as tmp:
            trainer = make_trainer()  # config mistakes are usage errors: find them before any training
            trainer.workspace = Path(tmp)
            trainer.build()
            del trainer
    except (ValueError, KeyError, TypeError, ImportError, OSError) as err:
        text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        print(f"mini-trainer: error: {' '.join(text.split())}", file=sys.stderr)
        return 2
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the trainer's progress lines: stdout holds the report
            report = check_resume(make_trainer, args.steps, args.interrupts, seed=args.seed,
                                  subprocess=args.subprocess)
    except Exception as err:  # noqa: BLE001 - the user's training failed: show where, exit 1
        traceback.print_exc()
        print(f"mini-trainer: error: check-resume could not finish: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_dict(), indent=1) if args.json else report, flush=True)
    return 0 if report.exact else 1
