"""`mini-trainer ckpt list|inspect|verify|export`: look at checkpoints from the command line.

The work is done by `mini_trainer.checkpoint.inspection` (which Python code can call too);
this module only parses arguments and prints. `mini_trainer.cli` adds the command with
`add_ckpt_command` and runs it with `run_ckpt`. Exit codes: 0 fine; 1 a checkpoint is
damaged (verify, inspect) or unusable (export); 2 a usage error (a missing path, a
directory that holds no checkpoints of ours, an output that exists), one line on stderr.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .checkpoint import CheckpointError
from .checkpoint.inspection import (
    EXPORT_DTYPES,
    FileSummary,
    NotACheckpointError,
    Verification,
    describe_checkpoint,
    export_weights,
    list_checkpoint_root,
    locate,
    verify_checkpoint,
)
from .checkpoint.writing import STEP_DIR

CKPT_HELP = """\
Look at the checkpoints CheckpointingHook writes, without a trainer or a model.

  mini-trainer ckpt list runs/digits                  every checkpoint of the run, verified
  mini-trainer ckpt inspect runs/digits/checkpoints/step_000001000
  mini-trainer ckpt verify runs/digits                re-hash everything; exit 1 if damaged
  mini-trainer ckpt export runs/digits -o model.safetensors --dtype bf16

PATH may be a checkpoint directory (step_000001000/), a checkpoint root (the directory
holding step_* directories and `latest`), or a run directory (its checkpoints/ is used).
Nothing in a checkpoint is ever unpickled: directories from elsewhere are safe to look at.
Exit codes: 0 fine, 1 a damaged checkpoint, 2 a usage error (missing path, a directory
without checkpoints of mini_trainer: "foreign directory").
"""

LIST_HELP = """\
List every checkpoint of a run: step, epoch, creation time (local), size on disk, VALID or
DAMAGED (with the file and the reason), the `latest` and `best` markers, the evaluation
results recorded at that step, and the best checkpoint's metric and value. Each checkpoint
is verified in full (every file re-hashed; --quick checks sizes and headers only).
Temporaries of a killed save (.tmp-*) and copies a re-save displaced (step_N.replaced-*)
are listed as leftovers. Exit code 0 (damaged checkpoints are reported, not an error;
see `ckpt verify`), 2 for a path that holds no checkpoints.

  mini-trainer ckpt list runs/digits
  mini-trainer ckpt list runs/digits/checkpoints --quick
"""

INSPECT_HELP = """\
Describe one checkpoint: format version, step, epoch, creation time, markers, every file
with its size, tensors, elements (parameter count) and dtypes, the sharded/ (FSDP2, DCP)
files and tensors, the hooks whose state it holds, the optimizer's class (recorded, or
inferred from the state when an older checkpoint does not record it: marked "inferred")
and its param groups (hyperparameters, number of parameters), the per-parameter state
names, LR scheduler and grad scaler state, world size, the evaluation results recorded at
that step and the best-checkpoint entry. For a root or run directory: the checkpoint
`latest` names. Reads the manifest and the safetensors headers only (sizes are checked,
files are NOT re-hashed: use `ckpt verify`). Exit code 1 when what it read is damaged.

  mini-trainer ckpt inspect runs/digits/checkpoints/step_000001000
  mini-trainer ckpt inspect runs/digits
"""

VERIFY_HELP = """\
Verify checkpoints as loading does, re-hashing every file (sharded/ included) against the
manifest: one line per checkpoint, OK, or DAMAGED naming the file and why (hash or size
mismatch, missing file, symbolic link, bad manifest checksum, unreadable header, ...).
A checkpoint directory is verified alone; a root or run directory, every checkpoint in it.
Exit code 0 when all are valid, 1 when any is damaged, 2 for a usage error.

  mini-trainer ckpt verify runs/digits/checkpoints/step_000001000
  mini-trainer ckpt verify runs/digits && echo all good
"""

EXPORT_HELP = """\
Write a checkpoint's model weights as one plain safetensors file, under the names of the
unwrapped module (no `module.` of DDP, no `_orig_mod.` of torch.compile, no FSDP1 wrapper
parts), loadable without mini_trainer:

  model.load_state_dict(safetensors.torch.load_file("model.safetensors"))

A sharded (FSDP2) checkpoint is gathered on CPU in this one process. --ema writes the
EmaHook's averaged weights instead (--ema-hook NAME picks one of several EMA hooks).
--dtype casts floating-point tensors (integer buffers keep theirs). The header's metadata
records format "pt", step, epoch, source (the checkpoint's absolute path), weights (model
or ema), dtype (when cast) and the mini_trainer version. The checkpoint is verified in full
first. For a root or run directory the newest valid checkpoint is exported (the output
says which); to export the best one, give its directory (`ckpt list` shows which it is).
The file is written atomically, and an existing one is replaced only with --force.
Exit code 1 when the checkpoint is damaged, 2 for a usage error.

  mini-trainer ckpt export runs/digits -o model.safetensors
  mini-trainer ckpt export runs/digits/checkpoints/step_000001000 -o ema.safetensors --ema --dtype bf16
"""


def add_ckpt_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `ckpt` command (list, inspect, verify, export) to an argparse
    `add_subparsers()` object; return its parser."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = subparsers.add_parser(
        "ckpt", help="list, inspect, verify and export checkpoints", description=CKPT_HELP, formatter_class=raw
    )
    parser.set_defaults(ckpt_parser=parser)
    commands = parser.add_subparsers(dest="ckpt_command", metavar="SUBCOMMAND")
    path_help = "a checkpoint directory, a checkpoint root or a run directory"
    for name, summary, description in (
        ("list", "every checkpoint of a run, verified, with markers and metrics", LIST_HELP),
        ("inspect", "what one checkpoint holds (manifest and headers, no re-hash)", INSPECT_HELP),
        ("verify", "re-hash checkpoints: exit 0 valid, 1 damaged", VERIFY_HELP),
        ("export", "write the model (or EMA) weights as plain safetensors", EXPORT_HELP),
    ):
        command = commands.add_parser(name, help=summary, description=description, formatter_class=raw)
        command.add_argument("path", metavar="PATH", help=path_help)
        if name == "list":
            command.add_argument("--quick", action="store_true", help="check sizes and headers, do not re-hash")
    export = commands.choices["export"]
    export.add_argument("-o", "--output", required=True, metavar="FILE", help="the safetensors file to write")
    export.add_argument("--ema", action="store_true", help="export the EmaHook's averaged weights")
    export.add_argument("--ema-hook", metavar="NAME", help="which EMA hook's weights (its name; implies --ema)")
    export.add_argument("--dtype", choices=list(EXPORT_DTYPES), help="cast floating-point tensors to this dtype")
    export.add_argument("--force", action="store_true", help="replace FILE if it exists")
    return parser


def run_ckpt(args: argparse.Namespace) -> int:
    """Run `mini-trainer ckpt ...` from parsed arguments; return the exit code (0 fine, 1 a
    damaged checkpoint, 2 a usage error, printed as `mini-trainer: error: ...`)."""
    actions: dict[str, Callable[[argparse.Namespace], int]] = {
        "list": _list, "inspect": _inspect, "verify": _verify, "export": _export,
    }
    if getattr(args, "ckpt_command", None) not in actions:
        args.ckpt_parser.print_help(sys.stderr)
        return 2
    try:
        return actions[args.ckpt_command](args)
    except (NotACheckpointError, FileExistsError, ValueError) as err:
        return _error(err, 2)
    except CheckpointError as err:  # damaged or unusable: the data, not the command line
        return _error(err, 1)
    except OSError as err:  # e.g. the output cannot be written
        return _error(err, 2)


def _error(err: BaseException, code: int) -> int:
    print(f"mini-trainer: error: {' '.join(str(err).split())}", file=sys.stderr)
    return code


def _list(args: argparse.Namespace) -> int:
    listing = list_checkpoint_root(args.path, hash=not args.quick)
    print(f"checkpoints in {listing.root}" + (f" ({listing.note})" if listing.note else ""))
    if not listing.checkpoints:
        print("  none")
    rows = [("NAME", "STEP", "EPOCH", "CREATED", "SIZE", "STATUS", "MARKERS", "METRICS")]
    details = {}
    for checked in listing.checkpoints:
        markers = [n for n, p in (("latest", listing.latest), ("best", listing.best)) if p == checked.path]
        if ".replaced-" in checked.path.name:
            markers.append("displaced")
        rows.append((checked.path.name, _step(checked), _text(checked.get("epoch", int)),
                     _created(checked), _size(checked.size), "VALID" if checked.valid else "DAMAGED",
                     ",".join(markers) or "-", _metrics(checked.get("metrics", dict)) or "-"))
        details[len(rows) - 1] = [f"      {problem}" for problem in checked.problems]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for index, row in enumerate(rows if listing.checkpoints else []):
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
        for line in details.get(index, []):
            print(line)
    best = next((c for c in listing.checkpoints if c.path == listing.best), None)
    if best is not None and best.get("best", dict):
        entry = best.get("best", dict)
        print(f"best: {best.path.name}, {entry.get('metric')} = {_number(entry.get('value'))} ({entry.get('mode')})")
    for warning in listing.warnings:
        print(f"warning: {warning}")
    if listing.leftovers:
        print("leftovers (killed saves; the next save removes .tmp-*/.trash-*): " + ", ".join(listing.leftovers))
    damaged = sum(not c.valid for c in listing.checkpoints)
    hashed = "sizes and headers checked, not re-hashed" if args.quick else "re-hashed"
    print(f"{len(listing.checkpoints) - damaged} valid, {damaged} damaged ({hashed})")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    info = describe_checkpoint(args.path)
    checked = info.verification
    state = checked.state or {}
    fields = [
        ("checkpoint", f"{info.path}" + (f"\n{info.note}" if info.note else "")),
        ("format", f"{checked.get('format', str) or '?'} version {_text(checked.get('version'))}"),
        ("step", f"{_step(checked)}, epoch {_text(checked.get('epoch', int))}"),
        ("created", _created(checked)),
        ("markers", ", ".join(info.markers) or "-"),
        ("world size", _text(state.get("world_size"))),
        ("size", f"{_size(checked.size)} on disk (sizes and headers checked, not re-hashed: see `ckpt verify`)"),
    ]
    _fields(fields)
    print("files")
    _files(info.files)
    if info.sharded_files:
        print("sharded/ (FSDP2, torch.distributed.checkpoint)")
        _files(info.sharded_files, unit="chunks")
        for name, summary in info.sharded_tensors.items():
            print(f"  {name} state: {_tensors(summary)}")
    hooks = state.get("hooks") if isinstance(state.get("hooks"), Mapping) else {}
    inferred = " (inferred from the param groups: not recorded in this checkpoint)" if info.optimizer_inferred else ""
    unread = "? (the state cannot be read: see DAMAGED below)"
    optimizer = info.optimizer or ("unknown (not recorded, and the state fits no torch.optim class)"
                                   if info.param_groups or info.optimizer_slots else "-" if checked.state else unread)
    _fields([
        ("hooks", "\n".join(f"{k}: {_hook(v)}" for k, v in hooks.items()) or "none" if checked.state else unread),
        ("optimizer", optimizer + inferred),
    ])
    for index, group in enumerate(info.param_groups):
        settings = ", ".join(f"{k}={_number(v)}" for k, v in group.items() if k != "params")
        text = f"{_text(group.get('params'))} params; {settings}"
        print(textwrap.fill(text, 100, initial_indent=f"  group {index}: ", subsequent_indent=" " * 13,
                            break_on_hyphens=False))
    if info.optimizer_slots:
        print(f"  state per parameter: {', '.join(info.optimizer_slots)}")
    best = checked.get("best", dict)
    _fields([
        ("lr scheduler", _present(state.get("lr_scheduler"), ("last_epoch", "_last_lr")) if checked.state else unread),
        ("grad scaler", _present(state.get("grad_scaler"), ("scale", "_growth_tracker")) if checked.state else unread),
        ("metrics", _metrics(checked.get("metrics", dict)) or "none recorded"),
        ("best", f"{best.get('metric')} = {_number(best.get('value'))} ({best.get('mode')})" if best else "-"),
    ])
    return _problems(checked)


def _verify(args: argparse.Namespace) -> int:
    kind, path, note = locate(args.path)
    if kind == "checkpoint":
        results = [verify_checkpoint(path)]
    else:
        listing = list_checkpoint_root(path)
        results = listing.checkpoints
        print(f"verifying {len(results)} checkpoint(s) in {path}" + (f" ({note})" if note else ""))
    for checked in results:
        if checked.valid:
            files = len(checked.headers) + len((checked.get("directories", dict) or {}).get("sharded") or {})
            print(f"OK       {checked.path}  ({files} files, {_size(checked.size)} re-hashed)")
        for problem in checked.problems:
            print(f"DAMAGED  {checked.path}  {problem}")
    damaged = sum(not c.valid for c in results)
    if len(results) != 1:
        print(f"{len(results) - damaged} valid, {damaged} damaged")
    return 1 if damaged else 0


def _export(args: argparse.Namespace) -> int:
    ema = args.ema_hook or args.ema
    done = export_weights(args.path, args.output, ema=ema, dtype=args.dtype, force=args.force)
    meta = done.metadata
    what = "EMA weights" + (f" ({meta['hook']})" if meta.get("hook") else "") if ema else "model weights"
    print(f"exported the {what} of {done.source} (step {meta['step']}, epoch {meta['epoch']})"
          + (f"\n  ({done.note})" if done.note else ""))
    print(f"  to {done.output}: {done.tensors} tensors, {done.elements:,} elements"
          + (f", floating point cast to {meta['dtype']}" if "dtype" in meta else ""))
    if done.renamed:
        print(f"  {done.renamed} names lost wrapper prefixes (module., _orig_mod., ...)")
    if done.left_out:
        print(f"  left out (not tensors): {', '.join(done.left_out)}")
    return 0


def _problems(checked: Verification) -> int:
    for problem in checked.problems:
        print(f"DAMAGED  {problem}")
    return 1 if checked.problems else 0


def _fields(fields: Iterable[tuple[str, str]]) -> None:
    for name, value in fields:
        print(f"{name:<12} " + value.replace("\n", "\n" + " " * 13))


def _files(files: list[FileSummary], unit: str = "tensors") -> None:
    width = max((len(f.name) for f in files), default=0)
    for f in files:
        tensors = f"  {_tensors(f)}" if f.elements is not None else f"  {f.tensors} {unit}" if f.tensors else ""
        print(f"  {f.name:<{width}}  {_size(f.bytes):>10}{tensors}")


def _tensors(f: FileSummary) -> str:
    dtypes = ", ".join(f"{name} x{count}" for name, count in f.dtypes.items())
    return f"{f.tensors} tensors, {f.elements:,} elements ({dtypes or 'none'})"


def _hook(value: Any) -> str:
    if isinstance(value, Mapping) and isinstance(value.get("weights"), Mapping):
        weights = [t for t in value["weights"].values() if hasattr(t, "numel")]
        rest = [str(k) for k in value if k != "weights"]
        return f"weights ({len(weights)} tensors, {sum(t.numel() for t in weights):,} elements), " + ", ".join(rest)
    return ", ".join(map(str, value)) if isinstance(value, Mapping) else type(value).__name__


def _present(state: Any, keys: tuple[str, ...]) -> str:
    if not isinstance(state, Mapping):
        return "none"
    shown = ", ".join(f"{k.lstrip('_')}={_number(state[k])}" for k in keys if k in state)
    return "saved" + (f" ({shown})" if shown else "")


def _metrics(metrics: Mapping[str, Any] | None) -> str:
    return " ".join(f"{k}={_number(v)}" for k, v in (metrics or {}).items())


def _number(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(map(_number, value))
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    return _text(value)


def _text(value: Any) -> str:
    return "?" if value is None else str(value)


def _step(checked: Verification) -> str:
    """The manifest's step; for an unreadable manifest, the one in the directory's name."""
    match = STEP_DIR.match(checked.path.name)
    return _text(checked.get("step", int) if checked.manifest else int(match.group(1)) if match else None)


def _created(checked: Verification) -> str:
    created = checked.get("created", (int, float))
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) if created is not None else "?"


def _size(count: int | None) -> str:
    if count is None:
        return "?"
    if count < 1024:
        return f"{count} B"
    exponent = min(int(math.log(count, 1024)), 4)
    return f"{count / 1024 ** exponent:.1f} {'KMGT'[exponent - 1]}iB"
