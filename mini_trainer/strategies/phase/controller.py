"""The phase machine: which phase each step is in, and the predictor it feeds and asks."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..compression import gradient_cosine
from .config import Phase, PhaseConfig
from .predictors import LeastSquaresPredictor, MomentumPredictor

__all__ = ["PhaseStep", "PhaseController"]


@dataclass
class PhaseStep:
    """Where the step `PhaseController.begin_step()` opened stands in the schedule.

    phase: what the step does. phase_step: steps already taken in this phase (CORRECT
    steps count towards their PREDICT phase). total_step: steps before this one. cycle:
    FULL phases entered since warmup. phase_changed: this step starts a new phase (or,
    with `predict_steps=0`, a new FULL-only cycle).
    """

    phase: Phase
    phase_step: int
    total_step: int
    cycle: int
    phase_changed: bool


class PhaseController:
    """The phase machine and the predictor, for any loop:

        info = controller.begin_step()
        if controller.should_compute_full():
            loss.backward(); controller.record_full_gradients(grads)   # CORRECT refits too
        else:
            grads = controller.predicted_gradients()
        ... optimizer step ...
        controller.end_step(loss)

    Losses may be device tensors: they are only read when a cycle starts (adaptive
    lengths) and by `get_stats()`.
    """

    def __init__(self, config: PhaseConfig | None = None) -> None:
        self.config = config or PhaseConfig()
        self.full_steps = self.config.full_steps
        self.predict_steps = self.config.predict_steps
        predictor = LeastSquaresPredictor if self.config.predictor == "least_squares" else MomentumPredictor
        self.predictor: LeastSquaresPredictor | MomentumPredictor = predictor(self.config)
        self.reset()

    def reset(self) -> None:
        """Back to the start: phase, counters, losses and the predictor's history."""
        self.predictor.reset()
        self.full_steps, self.predict_steps = self.config.full_steps, self.config.predict_steps
        self.phase = Phase.WARMUP if self._warmup_length() else Phase.FULL
        self.phase_step = 0
        self.total_step = 0
        self.cycle = 0
        self.counts = {phase: 0 for phase in Phase}
        self.loss_sums: dict[Phase, Any] = {phase: 0.0 for phase in Phase}
        self.loss_counts = {phase: 0 for phase in Phase}  # steps that reported a loss
        self.recent_losses: deque[Any] = deque(maxlen=100)
        self.early_correct = False
        self.cosine_sum: Any = 0.0
        self.cosine_count = 0
        self._last_error: list[torch.Tensor] | None = None

    def _warmup_length(self) -> int:
        """`warmup_steps`, but never fewer than the predictor needs for a slope (2)."""
        return max(self.config.warmup_steps, 2) if self.config.warmup_steps else 0

    # ------------------------------------------------------------------ the machine

    def _next_phase(self) -> Phase:
        if self.phase is Phase.WARMUP:
            return Phase.FULL if self.phase_step >= self._warmup_length() else Phase.WARMUP
        if self.phase is Phase.FULL:
            return Phase.PREDICT if self.phase_step >= self.full_steps and self.predict_steps > 0 else Phase.FULL
        if self.phase is Phase.PREDICT:
            if self.early_correct or (self.phase_step > 0 and self.phase_step % self.config.correct_every == 0):
                return Phase.CORRECT
            if self.phase_step >= self.predict_steps:
                return Phase.FULL
            return Phase.PREDICT
        # CORRECT is one step; phase_step keeps counting through it.
        return Phase.PREDICT if self.phase_step < self.predict_steps else Phase.FULL

    def begin_step(self) -> PhaseStep:
        new = self._next_phase()
        changed = new is not self.phase
        if self.phase is Phase.FULL and new is Phase.FULL and self.phase_step >= self.full_steps:
            # predict_steps == 0: every cycle is FULL only; still a new cycle.
            changed = True
        if changed:
            old, self.phase = self.phase, new
            if new is Phase.FULL:
                if old is not Phase.WARMUP:
                    self.cycle += 1
                self.phase_step = 0
                self.early_correct = False  # FULL refits on fresh gradients anyway
                if self.config.adaptive_phases:
                    self._adapt_lengths()
            elif new is Phase.PREDICT and old is Phase.FULL:
                self.phase_step = 0
            elif new is Phase.CORRECT:
                self.early_correct = False
        return PhaseStep(self.phase, self.phase_step, self.total_step, self.cycle, changed)

    def _adapt_lengths(self) -> None:
        """On entering FULL: loss rising -> more full, fewer predict steps; falling by more
        than 5% -> fewer full, more predict steps (the deterministic trainer's bounds)."""
        if len(self.recent_losses) < 20:
            return
        values = list(self.recent_losses)
        device = next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
        losses = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in values])
        early, late = torch.stack([losses[:10].mean(), losses[-10:].mean()]).tolist()  # one read per cycle
        # The crate's bounds, never past what the config asked for (predict_steps=0 stays 0).
        lowest_full, lowest_predict = min(3, self.config.full_steps), min(5, self.config.predict_steps)
        if late > early * (1.0 + self.config.loss_threshold):
            self.full_steps = min(self.full_steps + 2, max(30, self.config.full_steps))
            self.predict_steps = max(self.predict_steps - 5, lowest_predict)
        elif late < early * 0.95:
            self.full_steps = max(self.full_steps - 1, lowest_full)
            if self.config.predict_steps:
                self.predict_steps = min(self.predict_steps + 3, max(50, self.config.predict_steps))
            else:
                self.predict_steps = 0

    def should_compute_full(self) -> bool:
        return self.phase is not Phase.PREDICT

    # ------------------------------------------------------------------ gradients

    def record_full_gradients(self, grads: Sequence[torch.Tensor]) -> None:
        """The real gradients of this step (WARMUP, FULL or CORRECT)."""
        if self.phase is Phase.CORRECT and self._has_history():
            # How good the predictions are: cosine(predicted, actual), kept on the device.
            self.cosine_sum = self.cosine_sum + gradient_cosine(self.predictor.predict(self.total_step), grads)
            self.cosine_count += 1
            self._last_error = self.predictor.correct(grads, self.total_step)
            ratio = self.predictor.residual_ratio()
            # One host read per CORRECT step (not per step): is the residual too big to wait?
            self.early_correct = ratio is not None and bool(ratio > self.config.residual_threshold)
        else:
            self.predictor.record(grads, self.total_step)

    def _has_history(self) -> bool:
        return len(self.predictor.history) > 0

    def predicted_gradients(self) -> list[torch.Tensor]:
        return self.predictor.predict(self.total_step)

    def apply_correction(self, grads: list[torch.Tensor]) -> None:
        """Add the last CORRECT step's measured error to `grads` in place, once, e.g. to the
        next real gradients (the crate's legacy behaviour; PhaseTrainer does not use it).

        The error is the real gradient minus what the predictor had fitted for that step:
        for "least_squares" the trend b + v dt, without the residual; for "momentum" its
        prediction. With no CORRECT step since the last call (or since `reset()` /
        `load_state_dict()`), `grads` is left as it is."""
        if self._last_error is not None:
            torch._foreach_add_(grads, self._last_error)
            self._last_error = None

    def end_step(self, loss: torch.Tensor | float | None) -> None:
        if loss is not None:
            value = loss.detach().float() if isinstance(loss, torch.Tensor) else float(loss)
            self.recent_losses.append(value)
            self.loss_sums[self.phase] = self.loss_sums[self.phase] + value
            self.loss_counts[self.phase] += 1
        self.counts[self.phase] += 1
        self.phase_step += 1
        self.total_step += 1

    # ------------------------------------------------------------------ reporting

    @property
    def backward_steps(self) -> int:
        return self.counts[Phase.WARMUP] + self.counts[Phase.FULL] + self.counts[Phase.CORRECT]

    def speedup(self) -> float:
        """Forward steps / backward steps (the crate's figure; wall time is measured elsewhere)."""
        return self.total_step / max(self.backward_steps, 1)

    def get_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "total_steps": self.total_step,
            "full_steps": self.counts[Phase.WARMUP] + self.counts[Phase.FULL],
            "predict_steps": self.counts[Phase.PREDICT],
            "correct_steps": self.counts[Phase.CORRECT],
            "cycles": self.cycle,
            "speedup": self.speedup(),
            "current_full_steps": self.full_steps,
            "current_predict_steps": self.predict_steps,
            "history_bytes": self.predictor.history.nbytes,
        }
        if self.cosine_count:
            stats["mean_correct_cosine"] = float(self.cosine_sum) / self.cosine_count
        for phase in Phase:
            if self.loss_counts[phase]:
                stats[f"mean_loss_{phase.value}"] = float(self.loss_sums[phase]) / self.loss_counts[phase]
        return stats

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase.value,
            "phase_step": self.phase_step,
            "total_step": self.total_step,
            "cycle": self.cycle,
            "full_steps": self.full_steps,
            "predict_steps": self.predict_steps,
            "counts": {p.value: n for p, n in self.counts.items()},
            "loss_counts": {p.value: n for p, n in self.loss_counts.items()},
            "loss_sums": {p.value: torch.as_tensor(v, dtype=torch.float32).cpu() for p, v in self.loss_sums.items()},
            "recent_losses": [torch.as_tensor(v, dtype=torch.float32).cpu() for v in self.recent_losses],
            "early_correct": self.early_correct,
            "cosine_sum": torch.as_tensor(self.cosine_sum, dtype=torch.float32).cpu(),
            "cosine_count": self.cosine_count,
            "predictor": self.predictor.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | str = "cpu") -> None:
        device = torch.device(device)
        self.phase = Phase(state["phase"])
        self.phase_step = int(state["phase_step"])
        self.total_step = int(state["total_step"])
        self.cycle = int(state["cycle"])
        self.full_steps = int(state["full_steps"])
        self.predict_steps = int(state["predict_steps"])
        self.counts = {p: int(state["counts"][p.value]) for p in Phase}
        self.loss_counts = {p: int(state["loss_counts"][p.value]) for p in Phase}
        self.loss_sums = {p: state["loss_sums"][p.value].to(device) for p in Phase}
        self.recent_losses = deque((v.to(device) for v in state["recent_losses"]), maxlen=100)
        self.early_correct = bool(state["early_correct"])
        self.cosine_sum = state["cosine_sum"].to(device)
        self.cosine_count = int(state["cosine_count"])
        self._last_error = None
        self.predictor.load_state_dict(state["predictor"], device)
