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

import ast
import collections
import dataclasses
import functools
import inspect
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
from ..hooks.wandb import WandbHook
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
    asks for its first batch)."""

    end_step: int
    capture_step: int | None = None
    kill_micro: int | None = None


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
    attributes: dict[str, Attribute]


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
    notes: list[str] = dataclasses.field(default_factory=list)

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


@functools.cache
def library_attributes(cls: type) -> frozenset[str]:
    """The attributes that mini_trainer's own classes in `cls`'s ancestry assign (`self.x = ...`
    anywhere in them): the library's, whose resume its own tests cover, not the user's."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] != "mini_trainer":
            continue
        try:
            tree = ast.parse(inspect.getsource(klass).strip() if klass.__module__ else "")
        except (OSError, TypeError, SyntaxError):
            continue
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                for leaf in (target.elts if isinstance(target, ast.Tuple) else [target]):
                    if isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name) and leaf.value.id == "self":
                        names.add(leaf.attr)
    return frozenset(names)


def inspected_attributes(trainer: BaseTrainer, large: bool = True, shown: bool = True) -> dict[str, Attribute]:
    """The user's attributes, when inspectable: those the trainer's and the hooks' own code
    sets (`self.<name>`, `<HookClass>.<name>`), not those of mini_trainer's classes (whose
    resume the library's tests cover; their state is compared anyway) nor the declared
    `transient_attributes`. `shown=False` skips the text for the report (per step)."""
    found: dict[str, Attribute] = {}
    owners: list[tuple[str, Any]] = [("self", trainer)]
    seen: collections.Counter[str] = collections.Counter()
    for hook in trainer.hooks:
        if isinstance(hook, _Probe):
            continue
        seen[type(hook).__name__] += 1
        count = seen[type(hook).__name__]
        owners.append((type(hook).__name__ if count == 1 else f"{type(hook).__name__}#{count}", hook))
    for label, owner in owners:
        skip = library_attributes(type(owner)) | set(getattr(type(owner), TRANSIENT, ()))
        if owner is trainer:
            skip |= base_attributes() | _PATCHED
        for name, value in vars(owner).items():
            if name not in skip and (attribute := inspect_value(value, large, shown)) is not None:
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
            # every step: to tell nondeterministic attributes (timings) and scratch state apart
            attributes=inspected_attributes(trainer, large=False, shown=False),
        )
        self.batches = []
        self.record.steps.append(step)
        if trainer.step == self.plan.capture_step and not self.armed:
            self.capture(trainer, state)
            self.record.captured_step = trainer.step
            self.record.captured_attributes = inspected_attributes(trainer)
            self.armed = True


#: Where mini_trainer's hooks write outside the trainer's workspace when given an absolute path.
_HOOK_PATHS = {"CheckpointingHook": "path", "CsvLoggerHook": "path", "TensorBoardHook": "log_dir",
               "ImageFileLoggerHook": "path"}


def _isolate_hooks(hooks: list[BaseHook], resumed: bool, notes: list[str]) -> list[BaseHook]:
    """Keep every hook of the run inside this segment's own workspace (an absolute path of
    a user's run would be written to, or trimmed on resume), leave out W&B (each run would be
    a W&B run of its own), and let a resumed segment take its state from check_resume, not
    from a checkpoint directory."""
    kept = []
    for hook in hooks:
        if isinstance(hook, WandbHook):
            _note(notes, "WandbHook is left out: check-resume runs would each create a W&B run")
            continue
        for cls in type(hook).__mro__:
            attribute = _HOOK_PATHS.get(cls.__name__) if cls.__module__.startswith("mini_trainer.") else None
            path = getattr(hook, attribute, None) if attribute else None
            if isinstance(path, Path) and path.is_absolute():
                _note(notes, f"{type(hook).__name__}.{attribute} {str(path)!r} is absolute: check-resume writes to "
                             f"{path.name!r} inside its own temporary workspace instead")
                setattr(hook, attribute, Path(path.name))
                break
        if resumed and isinstance(hook, CheckpointingHook):
            hook.load = None
        kept.append(hook)
    return kept


def _note(notes: list[str], text: str) -> None:
    if text not in notes:
        notes.append(text)


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
        return [*_isolate_hooks(list(build_hooks()), resumed, record.notes), recorder.probe]

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
        # The run's own limits stay (max_epochs, a max_steps a scheduler was sized from);
        # the check only ends it earlier. Set after build(): what was built from them is unchanged.
        trainer.max_steps = min(trainer.max_steps or plan.end_step, plan.end_step)
        try:
            trainer.train()
            record.end_state = state_fingerprints(trainer.state_dict())
        except Killed:
            pass
    finally:
        library_logger.removeHandler(recorder)
        # The wrappers refer to the trainer: without them it (and its loader's worker
        # processes) goes away now, not at some later garbage collection.
        for name in _PATCHED:
            trainer.__dict__.pop(name, None)
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
