"""One run of a user's trainer under observation: a *segment* of check_resume.

A segment builds a fresh trainer with `make_trainer()`, optionally restores a saved state
into it, trains up to a step, and records what happened at every step: the loss, a
fingerprint of every batch drawn, fingerprints of the whole `state_dict()` after the step,
where in the data it was, whether it evaluated. A segment with a capture step saves the
state at the end of that step (what a checkpoint would hold) and then keeps training into
the next step until it is *killed* there: halfway through the gradient accumulation of the
next step, or (without accumulation) when the step after that asks for its batch. The work
done after the capture is lost, as it is when a job is preempted between two checkpoints.

The observation uses the trainer's public surface only: a hook that runs last after each
step and first before it (`_Probe`), a wrapper around the trainer's `next_batch` (to
fingerprint batches and to kill), and a wrapper around `build_hooks` that adds the probe.
A segment's record holds only plain data, so that it can come back from a fresh process.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..checkpoint.format import join_state, split_state
from ..hooks.base import BaseHook
from ..hooks.checkpointing import CheckpointingHook
from ..rng import seed_everything
from ..trainer import END_OF_DATA, BaseTrainer
from .fingerprint import Attribute, batch_fingerprint, inspect_value, state_fingerprints, tensor_digest

#: A class attribute listing attributes that are deliberately not saved (per-call
#: bookkeeping, caches rebuilt before use): check_resume does not judge them.
TRANSIENT = "transient_attributes"
#: Instance attributes check_resume sets on the trainer itself (not the user's state).
_PATCHED = frozenset({"next_batch", "build_hooks"})
_base_attributes: frozenset[str] | None = None


class Killed(BaseException):
    """Raised inside a doomed segment where it is killed (a BaseException, so that the
    user's `except Exception` does not swallow it; hooks see it in `on_exception`)."""


@dataclasses.dataclass
class Plan:
    """What a segment does: train until `end_step`; with `capture_step`, save the state at
    the end of that step and get killed after it (`kill_micro`: when micro-batch
    `kill_micro` of the next step is requested; None: when the step after the next one
    asks for its first batch). `every_step_attributes`: fingerprint the inspected
    attributes after every step (the uninterrupted run does, to tell nondeterministic
    ones such as timings apart)."""

    end_step: int
    capture_step: int | None = None
    kill_micro: int | None = None
    every_step_attributes: bool = False


@dataclasses.dataclass
class StepRecord:
    step: int
    loss: float | None
    loss_digest: str | None
    batches: list[str]
    state: dict[str, str]
    epoch: int
    batch_in_epoch: int
    evaluated: bool
    attributes: dict[str, Attribute] | None = None


@dataclasses.dataclass
class SegmentRecord:
    start_step: int
    steps: list[StepRecord] = dataclasses.field(default_factory=list)
    initial_attributes: dict[str, Attribute] = dataclasses.field(default_factory=dict)
    restored_state: dict[str, str] | None = None  # right after load_state_dict
    resumed_attributes: dict[str, Attribute] | None = None  # before the first step after a resume
    captured_step: int | None = None
    captured_attributes: dict[str, Attribute] | None = None
    killed: str | None = None  # where it was killed
    end_state: dict[str, str] | None = None  # after the run ended normally (after on_after_train)
    warnings: list[str] = dataclasses.field(default_factory=list)
    checkpointing_notes: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SegmentRecord:
        data = json.loads(text)

        def attributes(value: Any) -> dict[str, Attribute] | None:
            return None if value is None else {k: Attribute(*v) for k, v in value.items()}

        steps = [StepRecord(**{**s, "attributes": attributes(s["attributes"])}) for s in data.pop("steps")]
        for key in ("initial_attributes", "resumed_attributes", "captured_attributes"):
            data[key] = attributes(data[key])
        return cls(steps=steps, **data)


def base_attributes() -> frozenset[str]:
    """The attributes BaseTrainer keeps itself (saved by it, or not state): not the user's."""
    global _base_attributes
    if _base_attributes is None:
        _base_attributes = frozenset(vars(BaseTrainer(device="cpu"))) | {"_autocast_factory"}
    return _base_attributes


def inspected_attributes(trainer: BaseTrainer, large: bool = True) -> dict[str, Attribute]:
    """The user's attributes: those a subclass adds to the trainer (`self.<name>`) and those
    of hooks that are not mini_trainer's own (`<HookClass>.<name>`), when inspectable."""
    found: dict[str, Attribute] = {}
    skip = base_attributes() | _PATCHED | set(getattr(type(trainer), TRANSIENT, ()))
    for name, value in vars(trainer).items():
        if name not in skip and (attribute := inspect_value(value, large)) is not None:
            found[f"self.{name}"] = attribute
    seen: collections.Counter[str] = collections.Counter()
    for hook in trainer.hooks:
        cls = type(hook)
        if isinstance(hook, _Probe) or cls.__module__.split(".")[0] == "mini_trainer":
            continue  # our hooks' resume is tested by our own suite; their state is compared anyway
        seen[cls.__name__] += 1
        label = cls.__name__ if seen[cls.__name__] == 1 else f"{cls.__name__}#{seen[cls.__name__]}"
        transient = set(getattr(cls, TRANSIENT, ()))
        for name, value in vars(hook).items():
            if name not in transient and (attribute := inspect_value(value, large)) is not None:
                found[f"{label}.{name}"] = attribute
    return found


def snapshot_state(state: Any) -> Any:
    """A deep copy of a trainer state as a checkpoint would give it back: through the
    checkpoint format's split into a JSON skeleton and tensors (so that state a checkpoint
    cannot hold fails here as it would on disk), tensors copied to the CPU."""
    skeleton, tensors = split_state(state)
    skeleton = json.loads(json.dumps(skeleton, allow_nan=False))
    copied = {file: {k: t.detach().to("cpu", copy=True) for k, t in ts.items()} for file, ts in tensors.items()}
    return join_state(skeleton, copied)


class _Probe(BaseHook):
    """Runs first before each step and last after it (after the checkpointing hook)."""

    priority = {"on_before_step": -(10**9), "default": 10**9}

    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder

    def on_before_step(self, trainer: BaseTrainer) -> None:
        self.recorder.before_step(trainer)

    def on_after_step(self, trainer: BaseTrainer) -> None:
        self.recorder.after_step(trainer)


class _Recorder(logging.Handler):
    """Collects a segment's record; also a logging handler that keeps the library's warnings."""

    def __init__(self, record: SegmentRecord, plan: Plan, capture: Callable[[BaseTrainer, dict], None]) -> None:
        super().__init__(logging.WARNING)
        self.record, self.plan, self.capture = record, plan, capture
        self.probe = _Probe(self)
        self.resuming = False
        self.batches: list[str] = []
        self.armed = False

    def emit(self, record: logging.LogRecord) -> None:
        self.record.warnings.append(record.getMessage())

    def before_step(self, trainer: BaseTrainer) -> None:
        if self.resuming and self.record.resumed_attributes is None:
            self.record.resumed_attributes = inspected_attributes(trainer)

    def next_batch(self, trainer: BaseTrainer, original: Callable[[], Any]) -> Any:
        if self.armed:
            capture, micro = self.plan.capture_step, self.plan.kill_micro
            if micro is not None and trainer.step == capture and trainer.micro_step >= micro:
                self.record.killed = f"after {micro} of {trainer.gradient_accumulation_steps} micro-batches " \
                                     f"of step {capture + 1}"
                raise Killed
            if micro is None and trainer.step >= capture + 1:
                self.record.killed = f"after step {capture + 1}, as step {capture + 2} began"
                raise Killed
        batch = original()
        self.batches.append("end of data" if batch is END_OF_DATA else batch_fingerprint(batch))
        return batch

    def after_step(self, trainer: BaseTrainer) -> None:
        info = trainer.step_info
        loss = info.get("loss")
        state = trainer.state_dict()
        step = StepRecord(
            step=trainer.step,
            loss=float(loss) if isinstance(loss, torch.Tensor) else None,
            loss_digest=tensor_digest(loss) if isinstance(loss, torch.Tensor) else None,
            batches=self.batches,
            state=state_fingerprints(state),
            epoch=trainer.epoch,
            batch_in_epoch=trainer.batch_in_epoch,
            evaluated="eval" in info,
            attributes=inspected_attributes(trainer, large=False) if self.plan.every_step_attributes else None,
        )
        self.batches = []
        self.record.steps.append(step)
        if trainer.step == self.plan.capture_step and not self.armed:
            self.capture(trainer, state)
            self.record.captured_step = trainer.step
            self.record.captured_attributes = inspected_attributes(trainer)
            self.armed = True


def _adapt_checkpointing(hooks: list[BaseHook], resumed: bool, notes: list[str]) -> None:
    """Keep the user's checkpointing hooks inside this segment's own workspace, and let a
    resumed segment take its state from check_resume, not from a directory."""
    for hook in hooks:
        if not isinstance(hook, CheckpointingHook):
            continue
        if hook.path.is_absolute():
            notes.append(f"CheckpointingHook.path {str(hook.path)!r} is absolute: check-resume writes its "
                         f"checkpoints to {hook.path.name!r} inside its own temporary workspace instead")
            hook.path = Path(hook.path.name)
        if resumed:
            hook.load = None


def run_segment(
    make_trainer: Callable[[], BaseTrainer],
    plan: Plan,
    *,
    workspace: Path,
    seed: int,
    resume_state: Any = None,
    resume_from: Path | None = None,
    capture_to: Path | None = None,
    end_step: Callable[[BaseTrainer], int] | None = None,
) -> tuple[SegmentRecord, Any]:
    """Run one segment (see the module docstring) in a fresh `workspace`, after seeding the
    global RNGs with `seed` (a resumed segment's seed differs: a fresh process starts with
    other random states, which a correct resume overwrites). The state comes from
    `resume_state` (in memory) or the checkpoint `resume_from`; the captured state is
    returned (in memory), or written to `capture_to` as a checkpoint. `end_step(trainer)`,
    when given, decides the plan's end step once the trainer is built. Returns
    `(record, captured state or None)`."""
    seed_everything(seed)
    trainer = make_trainer()
    if not isinstance(trainer, BaseTrainer):
        raise TypeError(f"make_trainer() must return a mini_trainer BaseTrainer; got {type(trainer).__name__}")
    if trainer.is_built:
        raise ValueError("make_trainer() returned a trainer that is already built: return it before build(), "
                         "train() or fit(), so that check_resume can observe it from the start")
    resumed = resume_state is not None or resume_from is not None
    record = SegmentRecord(start_step=0)
    captured: list[Any] = []

    def capture(trainer: BaseTrainer, state: dict) -> None:
        if capture_to is not None:
            checkpoint.save_checkpoint(state, capture_to, fsync=False)
        else:
            captured.append(snapshot_state(state))

    recorder = _Recorder(record, plan, capture)
    recorder.resuming = resumed
    build_hooks, next_batch = trainer.build_hooks, trainer.next_batch

    def observed_hooks() -> list[BaseHook]:
        hooks = list(build_hooks())
        _adapt_checkpointing(hooks, resumed, record.checkpointing_notes)
        return [*hooks, recorder.probe]

    trainer.build_hooks = observed_hooks  # type: ignore[method-assign]
    trainer.next_batch = lambda: recorder.next_batch(trainer, next_batch)  # type: ignore[method-assign]
    trainer.workspace = workspace
    library_logger = logging.getLogger("mini_trainer")
    library_logger.addHandler(recorder)
    try:
        trainer.build()
        record.initial_attributes = inspected_attributes(trainer)
        if end_step is not None:
            plan.end_step = end_step(trainer)
        if resumed:
            state = resume_state
            if resume_from is not None:
                state = checkpoint.load_checkpoint(resume_from, check=trainer.check_state_dict)
            trainer.load_state_dict(state)
            record.restored_state = state_fingerprints(trainer.state_dict())
        record.start_step = trainer.step
        try:
            trainer.fit(steps=max(plan.end_step - trainer.step, 1))
            record.end_state = state_fingerprints(trainer.state_dict())
        except Killed:
            pass
    finally:
        library_logger.removeHandler(recorder)
    return record, (captured[0] if captured else None)


def warm_up(make_trainer: Callable[[], BaseTrainer], workspace: Path) -> None:
    """Build one trainer and throw it away, so that modules imported on first use are
    imported before the compared runs: some draw from python's `random` at import time
    (rich, scikit-learn), which would make the first run of a process differ from later
    ones for reasons that have nothing to do with resuming."""
    trainer = make_trainer()
    if isinstance(trainer, BaseTrainer) and not trainer.is_built:
        trainer.workspace = workspace
        trainer.build()


def torch_settings() -> dict[str, Any]:
    """The process-wide torch settings that change results (threads split reductions
    differently): a fresh process gets the parent's, so that it computes the same numbers."""
    return {
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "default_dtype": str(torch.get_default_dtype()).removeprefix("torch."),
        "cudnn": (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark),
    }


def apply_torch_settings(settings: dict[str, Any]) -> None:
    torch.set_num_threads(settings["threads"])
    torch.use_deterministic_algorithms(settings["deterministic"])
    torch.set_float32_matmul_precision(settings["matmul_precision"])
    torch.set_default_dtype(getattr(torch, settings["default_dtype"]))
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = settings["cudnn"]


def run_segment_in_child(make_trainer: Callable[[], BaseTrainer], plan: Plan, options: dict[str, Any],
                         result: str) -> None:
    """The entry point of a fresh process (multiprocessing's spawn): run a segment and
    write its record, or the error, to the file `result`."""
    import sys
    import traceback

    sys.stdout = sys.stderr  # the parent's stdout is for its report
    try:
        apply_torch_settings(options.pop("torch_settings"))
        warm_up(make_trainer, Path(options["workspace"]) / "warm-up")
        record, _ = run_segment(make_trainer, plan, **options)
        text = json.dumps({"record": record.to_json()})
    except BaseException as err:  # noqa: BLE001 - reported by the parent
        text = json.dumps({"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()})
    Path(result).write_text(text)
