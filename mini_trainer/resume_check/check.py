"""`check_resume(make_trainer)`: does a user's trainer resume exactly?

It trains a fresh trainer for N steps without interruption (the reference), then trains
again and interrupts the run at K points chosen to be hard: the end of an epoch, right
after an evaluation, random ones; each interrupted run is killed after more work than was
saved (halfway through the next step's gradient accumulation, or a whole step later), and
the run continues in a *fresh* trainer from the saved state: in this process through
`state_dict()` / `load_state_dict()` (passed through the checkpoint format in memory), or
with `subprocess=True` through a checkpoint directory, in a fresh Python process.

The two runs are compared bit for bit at every step (loss, batches, every entry of the
state), and the user's own attributes are inspected at every resume (report.py says how).
"""

from __future__ import annotations

import gc
import json
import math
import multiprocessing
import pickle
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import RandomSampler

from ..state import optimized_param_names
from ..trainer import BaseTrainer
from ..utils import as_path, check_flag, check_int
from .report import Interruption, ResumeReport, analyse, unsaved_attributes
from .segment import Plan, SegmentRecord, run_segment, run_segment_in_child, torch_settings, warm_up

#: Steps run when `steps` is not given, unless the first evaluation or the end of the
#: first epoch comes a little later (up to AUTO_MAX): then the run reaches them.
AUTO_STEPS, AUTO_MAX = 32, 200


def trainer_facts(trainer: BaseTrainer) -> dict[str, Any]:
    """What the report needs to know about a built trainer: its loader, accumulation, the
    optimizer's parameter names, where its first evaluation and epoch end come."""
    loader = trainer.data_loader
    try:
        per_epoch = len(loader)  # type: ignore[arg-type]
    except TypeError:
        per_epoch = None
    saves = callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))
    intervals = [h.interval for h in trainer.hooks if type(h).__name__ == "EvalHook" and getattr(h, "interval", None)]
    return {
        "trainer": type(trainer).__qualname__,
        "accumulation": trainer.gradient_accumulation_steps,
        "batches_per_epoch": per_epoch,
        "first_evaluation": min(intervals) if intervals else None,
        "loader": {"type": f"{type(loader).__module__}.{type(loader).__qualname__}", "saves_position": saves,
                   "random_sampler": isinstance(getattr(loader, "sampler", None), RandomSampler)},
        "param_names": optimized_param_names(trainer.unwrapped_model, trainer.optimizer),
    }


def auto_steps(facts: dict[str, Any]) -> int:
    """A few dozen steps, or enough to reach the first evaluation and epoch end (+ a few)."""
    per_epoch = facts["batches_per_epoch"]
    epoch_end = math.ceil(per_epoch / facts["accumulation"]) if per_epoch else None
    wanted = [point + 6 for point in (facts["first_evaluation"], epoch_end) if point is not None]
    return max([AUTO_STEPS, *(w for w in wanted if w <= AUTO_MAX)])


def choose_interruptions(reference: SegmentRecord, facts: dict[str, Any], count: int,
                         seed: int) -> tuple[list[Interruption], list[str]]:
    """Up to `count` distinct steps to interrupt at, the hard ones first: the end of an
    epoch, right after an evaluation, then random ones (seeded by `seed`)."""
    records = {s.step: s for s in reference.steps}
    last = reference.steps[-1].step if reference.steps else 0
    valid = [s for s in sorted(records) if 1 <= s <= last - 2]  # a step to lose, and one to compare after it
    if not valid:
        raise ValueError(f"the uninterrupted run trained {last} step(s): check_resume needs at least 3 "
                         "(raise steps, or the trainer's data and limits)")
    per_epoch, notes, chosen = facts["batches_per_epoch"], [], []
    boundaries = [s for s in valid if (per_epoch and records[s].batch_in_epoch >= per_epoch)
                  or (not per_epoch and s + 1 in records and records[s + 1].epoch > records[s].epoch)]
    # With accumulation an epoch may end inside a step: then right after that step.
    inside = [s for s in valid if s - 1 in records and records[s].epoch > records[s - 1].epoch]
    if boundaries:
        chosen.append(Interruption(boundaries[0], f"end of epoch {records[boundaries[0]].epoch}"))
    elif inside:
        epoch = records[inside[0]].epoch - 1
        chosen.append(Interruption(inside[0], f"right after the step in which epoch {epoch} ended"))
    else:
        notes.append(f"no epoch ended before step {last - 1}, so no interruption is at an epoch's end (one needs "
                     "two more steps after it: raise steps to include one)")
    evaluated = [s for s in valid if records[s].evaluated and s not in {c.step for c in chosen}]
    if evaluated:
        chosen.append(Interruption(evaluated[0], "right after an evaluation"))
    else:
        notes.append(f"no evaluation happened before step {last - 1}, so no interruption follows one (raise steps, "
                     "or the EvalHook's frequency, to include one)")
    rng = random.Random(seed)
    remaining = [s for s in valid if s not in {c.step for c in chosen}]
    while len(chosen) < count and remaining:
        step = remaining.pop(rng.randrange(len(remaining)))
        chosen.append(Interruption(step, "random"))
    if len(chosen) < count:
        notes.append(f"only {len(chosen)} interruption(s) fit in {last} steps")
    return sorted(chosen[:count], key=lambda c: c.step), notes


def _run_in_child(make_trainer: Callable[[], BaseTrainer], plan: Plan, options: dict[str, Any],
                  result: Path) -> SegmentRecord:
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of this one carries over
    process = context.Process(target=run_segment_in_child, args=(make_trainer, plan, options, str(result)))
    process.start()
    process.join()
    if not result.exists():
        raise RuntimeError(
            f"the fresh process running a segment of check_resume died (exit code {process.exitcode}). With "
            "subprocess=True, make_trainer must be importable by a fresh interpreter (a module-level function "
            "of a module, or a functools.partial of one), and a script that calls check_resume must do so under "
            "`if __name__ == \"__main__\":` (the fresh process imports the script again)")
    data = json.loads(result.read_text())
    if "error" in data:
        raise RuntimeError(f"a segment of check_resume failed in its fresh process: {data['error']}\n"
                           f"{data['traceback']}")
    return SegmentRecord.from_json(data["record"])


def _fresh(directory: Path) -> Path:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


def check_resume(
    make_trainer: Callable[[], BaseTrainer],
    steps: int | None = None,
    interrupts: int = 3,
    *,
    seed: int = 0,
    subprocess: bool = False,
    workdir: str | Path | None = None,
) -> ResumeReport:
    """Check that the trainers `make_trainer()` builds resume exactly; returns a `ResumeReport`
    (`report.exact`, `print(report)`, `report.to_dict()`).

    Args:
        make_trainer: builds a fresh, not yet built trainer each time it is called (once per
            run, plus once to warm up each process). Its workspace is replaced by a temporary
            one, so nothing of an existing run is touched or resumed.
        steps: optimizer steps to train (None: a few dozen, more when the first evaluation
            or epoch end comes a little later).
        interrupts: how many times to interrupt the run (>= 1).
        seed: seeds the global random generators before each fresh run, and the choice of
            random interruption points.
        subprocess: resume each time in a fresh Python process from a checkpoint directory
            (make_trainer must then be picklable: a module-level function or a
            functools.partial of one), instead of in this process through
            state_dict()/load_state_dict().
        workdir: where the temporary workspaces and checkpoints go (default: a temporary
            directory, removed afterwards).
    """
    if not callable(make_trainer):
        raise TypeError(f"check_resume(make_trainer) must be a function that returns a new trainer; "
                        f"got {type(make_trainer).__name__}")
    check_int("check_resume(steps)", steps, minimum=3, allow_none=True)
    check_int("check_resume(interrupts)", interrupts, minimum=1)
    check_int("check_resume(seed)", seed)
    check_flag("check_resume(subprocess)", subprocess)
    workdir = as_path("check_resume(workdir)", workdir) if workdir is not None else None
    if subprocess:
        try:
            pickle.dumps(make_trainer)
        except Exception as err:  # noqa: BLE001 - any reason it cannot reach a fresh process
            raise TypeError("check_resume(subprocess=True) runs make_trainer in fresh processes, so it must be "
                            f"picklable (a module-level function or a functools.partial of one): {err}") from None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mini_trainer-check-resume-", dir=workdir) as tmp:
        root = Path(tmp)
        workspace = root / "run"  # the same path for every run: state that records paths compares equal
        facts: dict[str, Any] = {}

        def observe(trainer: BaseTrainer) -> int:
            facts.update(trainer_facts(trainer))
            total = trainer.estimated_total_steps()  # a run shorter than the default is checked whole
            planned = steps if steps is not None else auto_steps(facts)
            facts["planned_steps"] = min(planned, total) if steps is None and total else planned
            return facts["planned_steps"]

        warm_up(make_trainer, _fresh(workspace))  # fresh processes do the same first
        _fresh(workspace)
        reference, _ = run_segment(make_trainer, Plan(end_step=0), workspace=workspace,
                                   seed=seed, end_step=observe)
        gc.collect()
        end = reference.steps[-1].step if reference.steps else 0
        interruptions, notes = choose_interruptions(reference, facts, interrupts, seed)
        kill_micro = max(1, facts["accumulation"] // 2) if facts["accumulation"] > 1 else None
        target = facts["planned_steps"]
        segments: list[SegmentRecord] = []
        state: Any = None
        previous: Path | None = None
        for i in range(len(interruptions) + 1):
            capture = interruptions[i].step if i < len(interruptions) else None
            plan = Plan(end_step=target, capture_step=capture, kill_micro=kill_micro)
            options: dict[str, Any] = {"workspace": _fresh(workspace), "seed": seed if i == 0 else seed + 7919 * i}
            if subprocess:
                options["resume_from"] = previous
                options["torch_settings"] = torch_settings()
                options["capture_to"] = previous = root / f"checkpoint_{i}" if capture is not None else None
                record = _run_in_child(make_trainer, plan, options, root / f"segment_{i}.json")
            else:
                record, state = run_segment(make_trainer, plan, resume_state=state, **options)
            segments.append(record)
            gc.collect()  # the finished trainer and its loader's worker processes go now
            if capture is not None:
                interruptions[i].killed = record.killed or "not: training ended first"
                if record.captured_step is None:
                    break  # it stopped before the interruption: the analysis reports where it went apart
        unsaved, ignored = unsaved_attributes(reference, segments, interruptions)
        difference, counts = analyse(reference, segments, interruptions, facts, unsaved)
    for record in (reference, *segments):
        notes += [n for n in record.notes if n not in notes]
    if end < target:
        notes.append(f"the uninterrupted run stopped by itself at step {end} (should_stop, e.g. early stopping, "
                     "or the end of max_epochs)")
    return ResumeReport(
        exact=difference is None and not unsaved,
        trainer=facts["trainer"],
        steps=end,
        mode="in fresh processes from checkpoint directories" if subprocess else "in-process",
        interruptions=interruptions,
        first_difference=difference,
        unsaved_attributes=unsaved,
        ignored_attributes=ignored,
        compared=counts,
        notes=notes,
        seconds=time.perf_counter() - started,
    )


__all__ = ["ResumeReport", "check_resume", "choose_interruptions"]
