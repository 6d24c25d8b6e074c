"""What check_resume found, and how to say it: `ResumeReport` (human text and JSON) and
`analyse`, which walks the interrupted run's steps against the uninterrupted run's and
stops at the first difference, naming the component and what usually causes it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from .segment import SegmentRecord, StepRecord

STATE_HINT = ("save it in state_dict() and restore it in load_state_dict(), or in a hook's "
              "on_state_dict/on_load_state_dict")
ATTRIBUTE_HINT = STATE_HINT + " (if it is saved already: load_state_dict does not put back what was saved)"
STATEFUL_LOADER = "mini_trainer.data.stateful_loader(dataset, batch_size, shuffle=True, seed=...)"


@dataclasses.dataclass
class Interruption:
    """Where a run was interrupted: the state was saved at the end of `step` (chosen for
    `reason`), and the run was killed afterwards (`killed`: where)."""

    step: int
    reason: str
    killed: str = ""


@dataclasses.dataclass
class Difference:
    """The first place the interrupted run differs from the uninterrupted one."""

    step: int
    component: str  # "data order", "loss", "model", "optimizer", "RNG streams", "hook 'ema'", ...
    detail: str
    hint: str
    resumed_at: int | None = None  # the interruption before it; None: no interruption had happened yet
    paths: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class UnsavedAttribute:
    """An attribute that changed during training and was not brought back by a resume."""

    name: str
    kind: str
    before: str
    at_interruption: str
    after_resume: str
    step: int
    hint: str


@dataclasses.dataclass
class ResumeReport:
    """The result of `check_resume`. `exact` is True when the interrupted run matched the
    uninterrupted one bit for bit and no attribute of the user's was lost on a resume.
    `str(report)` (or `format()`) is the human report, `to_dict()` the JSON one."""

    exact: bool
    trainer: str
    steps: int
    mode: str
    interruptions: list[Interruption]
    first_difference: Difference | None
    unsaved_attributes: list[UnsavedAttribute]
    ignored_attributes: list[str]
    compared: dict[str, Any]
    notes: list[str]
    seconds: float = 0.0

    def __bool__(self) -> bool:
        return self.exact

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return self.format()

    def format(self) -> str:
        verdict = "EXACT" if self.exact else "NOT EXACT"
        lines = [f"check-resume: {verdict} - {self.trainer}, {self.steps} steps, "
                 f"{len(self.interruptions)} interruption(s), {self.mode} ({self.seconds:.1f} s)"]
        for stop in self.interruptions:
            lines.append(f"  interrupted at step {stop.step} ({stop.reason}); killed {stop.killed}")
        diff = self.first_difference
        if diff is not None:
            where = "before any interruption"
            if diff.resumed_at is not None:
                where = f"after resuming at step {diff.resumed_at}"
            lines += ["", f"First difference: step {diff.step} ({where}): {diff.component}", f"  {diff.detail}",
                      f"  hint: {diff.hint}"]
        if self.unsaved_attributes:
            lines += ["", "Attributes that changed during training and came back different after resuming:"]
            for a in self.unsaved_attributes:
                lines.append(f"  {a.name} ({a.kind}): {a.before} before training, {a.at_interruption} at step "
                             f"{a.step}, {a.after_resume} after resuming at step {a.step}")
                lines.append(f"    -> {a.hint}")
        lines.append("")
        counts = self.compared
        until = " before the first difference" if diff is not None else ""
        lines.append(f"Compared bit for bit{until}: {counts.get('steps', 0)} steps' losses, {counts.get('batches', 0)} "
                     f"batches, {counts.get('state_entries', 0)} state entries after every step "
                     f"({', '.join(counts.get('components', []))}); {counts.get('attributes', 0)} attribute(s) "
                     "of your trainer and hooks inspected.")
        if self.ignored_attributes:
            lines.append("Not judged (they differ between two identical runs, e.g. timings): "
                         + ", ".join(self.ignored_attributes))
        lines += [f"Note: {note}" for note in self.notes]
        if self.exact:
            lines.append("Resuming gives the same training as not stopping, at every interruption tried.")
        return "\n".join(lines)


# ---------------------------------------------------------------------- naming components


def component_of(path: str, param_names: Sequence[str]) -> tuple[str, str]:
    """`(component, readable name)` of a state path such as `optimizer.state.3.exp_avg`."""
    parts = path.split(".")
    head = parts[0]
    if head == "model":
        return "model", f"parameter or buffer {'.'.join(parts[1:])}"
    if head == "optimizer":
        if len(parts) >= 4 and parts[1] == "state":
            index = parts[2]
            name = param_names[int(index)] if index.isdigit() and int(index) < len(param_names) else index
            return "optimizer", f"optimizer state {'.'.join(parts[3:])} of {name}"
        if len(parts) >= 3 and parts[1] == "param_groups":
            return "optimizer", f"optimizer param group {parts[2]}: {'.'.join(parts[3:])}"
        return "optimizer", path
    if head == "rng":
        stream = {"python": "python's random", "numpy": "numpy's global", "torch": "torch's CPU", "cuda": "CUDA"}
        return "RNG streams", f"the {stream.get(parts[1], parts[1]) if len(parts) > 1 else 'global'} generator"
    if head == "hooks":
        if len(parts) == 1:
            return "hooks", "the hooks' state"
        hook = parts[1]
        return f"hook '{hook}'", f"hook '{hook}' state {'.'.join(parts[2:])}".rstrip()
    if head in ("data_loader", "data_position", "epoch", "batch_in_epoch", "ranks"):
        return "data position", path
    names = {"lr_scheduler": "LR scheduler", "grad_scaler": "grad scaler", "step": "counters", "world_size": "counters"}
    if head in names:
        return names[head], path
    return f"state entry '{head}'", path


_ORDER = ("model", "optimizer", "LR scheduler", "grad scaler", "counters", "data position", "RNG streams")


def _first_component(paths: Sequence[str], param_names: Sequence[str]) -> tuple[str, list[str]]:
    named = [(component_of(p, param_names), p) for p in paths]
    rank = {c: i for i, c in enumerate(_ORDER)}
    named.sort(key=lambda item: rank.get(item[0][0], len(_ORDER)))
    component = named[0][0][0]
    return component, list(dict.fromkeys(readable for (c, readable), _ in named if c == component))


def _state_hint(component: str, suspects: str) -> str:
    if component == "RNG streams":
        return ("the global random streams differ: something drew random numbers between restoring and this "
                "step (in load_state_dict, on_before_train, building an iterator, re-initialising a module), "
                "or a load_state_dict override does not call super().load_state_dict")
    if component.startswith("hook "):
        return (f"{component} does not bring back its state: its on_state_dict and on_load_state_dict must "
                "save and restore everything it keeps that affects later steps")
    if component == "data position":
        return "the position in the data is not restored (a loader whose state_dict/load_state_dict is incomplete?)"
    if component.startswith("state entry"):
        return f"your own {component} is saved but comes back different: check load_state_dict restores it"
    base = (f"the {component} after this step differs although the batches and the loss matched: what the "
            "update uses (gradients, clipping, the learning rate, gradients_ready, an optimizer of your own) "
            "depends on something that is not saved")
    return base + (f": {suspects}" if suspects else "")


def _loss_hint(unsaved: Sequence[UnsavedAttribute]) -> str:
    generators = [a.name for a in unsaved if a.kind == "generator"]
    if generators:
        name = generators[0]
        return (f"the loss depends on {name}, a random generator that is not saved: put {name}.get_state() in "
                f"state_dict() and call {name}.set_state(...) in load_state_dict()")
    if unsaved:
        names = ", ".join(a.name for a in unsaved)
        return f"the loss depends on state that is not saved: {names} (see below); {STATE_HINT}"
    return ("something forward reads is not in state_dict(): a module-level variable, a cache, an attribute of "
            "an object check_resume does not look into, or a random generator of its own")


def _data_hint(loader: Mapping[str, Any], warnings: Sequence[str]) -> str:
    said = next((w for w in warnings if "order" in w or "skipped" in w), "")
    if not loader.get("saves_position"):
        if loader.get("random_sampler"):
            hint = (f"the training loader is a {loader.get('type')} that shuffles with a RandomSampler and cannot "
                    "save its position: after a resume the rest of the epoch comes in a new order. Use "
                    f"{STATEFUL_LOADER}: its position is saved and its order is a function of the seed and epoch")
        else:
            hint = (f"the training loader ({loader.get('type')}) cannot save its position; the trainer skips the "
                    "batches already drawn, which gives the same batches only if every pass is ordered the same "
                    f"way. Use {STATEFUL_LOADER}, or give the loader state_dict()/load_state_dict()")
    else:
        hint = (f"the training loader ({loader.get('type')}) saves its position, but the order after resuming "
                "differs: its order must be a function of the epoch (set_epoch), not of a generator's running "
                f"state. {STATEFUL_LOADER} is")
    return hint + (f" (the trainer warned: {said})" if said else "")


# ---------------------------------------------------------------------- the comparison


def _compare_step(ref: StepRecord, got: StepRecord, facts: Mapping[str, Any], warnings: Sequence[str],
                  unsaved: Sequence[UnsavedAttribute]) -> tuple[str, str, str, list[str]] | None:
    """`(component, detail, hint, paths)` of the first difference within one step, or None."""
    s = ref.step
    if got.batches != ref.batches:
        index = next((i for i, (a, b) in enumerate(zip(got.batches, ref.batches, strict=False)) if a != b), None)
        detail = (f"micro-batch {index} of step {s} is not the batch the uninterrupted run trained on" if index is
                  not None else f"step {s} drew {len(got.batches)} batch(es), the uninterrupted run {len(ref.batches)}")
        return "data order", detail, _data_hint(facts.get("loader", {}), warnings), []
    if got.loss_digest != ref.loss_digest:
        detail = (f"loss {got.loss!r} after resuming, {ref.loss!r} without interruption, on the same batches and "
                  "from the same saved state")
        return "loss", detail, _loss_hint(unsaved), []
    paths = _differing(ref.state, got.state)
    if paths:
        component, readable = _first_component(paths, facts.get("param_names", []))
        suspects = ", ".join(a.name for a in unsaved)
        detail = f"after step {s}, {component} differs: {'; '.join(readable[:4])}" + (
            f" (and {len(readable) - 4} more)" if len(readable) > 4 else "")
        return component, detail, _state_hint(component, suspects), paths
    return None


def _step(record: SegmentRecord, step: int | None) -> StepRecord:
    """The record of `step` in a segment (an empty one when the segment has none)."""
    found = next((s for s in record.steps if s.step == step), None)
    return found or StepRecord(step or 0, None, None, [], {}, 0, 0, False, {})


def _differing(a: Mapping[str, str], b: Mapping[str, str]) -> list[str]:
    """The paths whose fingerprints differ (or that only one side has), sorted."""
    return sorted(p for p in set(a) | set(b) if a.get(p) != b.get(p))


def unsaved_attributes(reference: SegmentRecord, segments: Sequence[SegmentRecord],
                       interruptions: Sequence[Interruption]) -> tuple[list[UnsavedAttribute], list[str]]:
    """Attributes that changed during training (from before training to an interruption)
    and came back different after the resume; and those not judged because two identical
    runs disagree on them (the uninterrupted run and the first segment, at the first
    interruption)."""
    first = interruptions[0].step if interruptions else None
    ignored: set[str] = set()
    ref_at, seg_at = _step(reference, first).attributes, _step(segments[0], first).attributes
    for name in set(ref_at) | set(seg_at):
        if ref_at.get(name) is None or seg_at.get(name) is None or ref_at[name].digest != seg_at[name].digest:
            ignored.add(name)
    initial, other = reference.initial_attributes, segments[0].initial_attributes
    for name in set(initial) | set(other):
        if initial.get(name) is None or other.get(name) is None or initial[name].digest != other[name].digest:
            ignored.add(name)
    found: dict[str, UnsavedAttribute] = {}
    for i, stop in enumerate(interruptions):
        captured = segments[i].captured_attributes or {}
        resumed = segments[i + 1].resumed_attributes if i + 1 < len(segments) else None
        if resumed is None:
            continue
        # After the first step from the resume: scratch state that every step rebuilds before
        # using it (the phase of this step, a flag) is equal again, and is no loss.
        next_step = stop.step + 1
        ref_next, got_next = _step(reference, next_step).attributes, _step(segments[i + 1], next_step).attributes
        for name, value in captured.items():
            if name in ignored or name in found:
                continue
            before = initial.get(name)
            changed = before is None or before.digest != value.digest
            after = resumed.get(name)
            ref_after, got_after = ref_next.get(name), got_next.get(name)
            rebuilt = (ref_after is not None and got_after is not None and ref_after.digest == got_after.digest
                       and not ref_after.digest.startswith("large:"))
            if changed and (after is None or after.digest != value.digest) and not rebuilt:
                hint = ATTRIBUTE_HINT
                if value.kind == "generator":
                    hint = f"a random generator: save {name}.get_state() in state_dict() and set_state() it on load"
                found[name] = UnsavedAttribute(name, value.kind, before.shown if before else "absent",
                                               value.shown, after.shown if after else "absent", stop.step, hint)
    return list(found.values()), sorted(ignored)


def analyse(reference: SegmentRecord, segments: Sequence[SegmentRecord], interruptions: Sequence[Interruption],
            facts: Mapping[str, Any], unsaved: Sequence[UnsavedAttribute]) -> tuple[Difference | None, dict[str, Any]]:
    """The first difference of the interrupted run (its segments) from the uninterrupted
    `reference`, walking forward in steps; and counts of what was compared."""
    ref_steps = {s.step: s for s in reference.steps}
    stops = [i.step for i in interruptions]
    counts = {"steps": 0, "batches": 0, "state_entries": len(reference.steps[-1].state) if reference.steps else 0}
    final = reference.steps[-1].state if reference.steps else {}
    components = {component_of(p, [])[0] for p in final if final[p] not in ("{}", "NoneType:None")}
    counts["components"] = sorted(components, key=lambda c: (_ORDER.index(c) if c in _ORDER else len(_ORDER), c))
    counts["attributes"] = len(reference.initial_attributes)
    for i, segment in enumerate(segments):
        resumed_at = stops[i - 1] if i > 0 else None
        last = stops[i] if i < len(stops) else None
        if resumed_at is not None and segment.restored_state is not None:
            saved = _step(segments[i - 1], resumed_at).state
            if saved and saved != segment.restored_state:
                paths = _differing(saved, segment.restored_state)
                component, readable = _first_component(paths, facts.get("param_names", []))
                detail = (f"right after load_state_dict, {component} differs from what was saved: "
                          f"{'; '.join(readable[:4])}")
                hint = "load_state_dict does not bring back what state_dict saved: " + _state_hint(component, "")
                return Difference(resumed_at, component, detail, hint, resumed_at, paths), counts
        for step in segment.steps:
            if last is not None and step.step > last:
                break  # the work a kill lost
            ref = ref_steps.get(step.step)
            if ref is None:
                detail = (f"the interrupted run went on to step {step.step}; the uninterrupted one ended at step "
                          f"{reference.steps[-1].step}")
                hint = "should_stop (e.g. early stopping) or the data's end is not restored"
                return Difference(step.step, "end of training", detail, hint, resumed_at), counts
            found = _compare_step(ref, step, facts, segment.warnings, unsaved)
            if found is not None:
                component, detail, hint, paths = found
                if resumed_at is None:
                    hint = ("two runs started the same way differ before any interruption, so resume cannot be "
                            "judged: seed the run (BaseTrainer(seed=...)), make make_trainer() build the same "
                            "trainer every time, avoid nondeterministic kernels "
                            "(torch.use_deterministic_algorithms(True)), and look for state outside the trainer "
                            "that carries over from one run to the next in this process (a module-level cache, a "
                            "class attribute): --subprocess runs each in a fresh process")
                    component = f"not deterministic ({component})"
                return Difference(step.step, component, detail, hint, resumed_at, paths), counts
            counts["steps"] += 1
            counts["batches"] += len(step.batches)
    final = segments[-1]
    got_last = final.steps[-1].step if final.steps else final.start_step
    ref_last = reference.steps[-1].step if reference.steps else 0
    if got_last != ref_last:
        return Difference(got_last, "end of training", f"the interrupted run ended at step {got_last}, the "
                          f"uninterrupted one at step {ref_last}", "should_stop or the data's end is not restored",
                          stops[-1] if stops else None), counts
    if final.end_state is not None and reference.end_state is not None and final.end_state != reference.end_state:
        paths = _differing(reference.end_state, final.end_state)
        component, readable = _first_component(paths, facts.get("param_names", []))
        return Difference(ref_last, component, f"after training ended (on_after_train), {component} differs: "
                          f"{'; '.join(readable[:4])}", _state_hint(component, ""), stops[-1] if stops else None,
                          paths), counts
    return None, counts
