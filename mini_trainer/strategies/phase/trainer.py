"""PhaseTrainer: predicted gradients replace most backward passes (after vsa-optim-rs).

Training runs in cycles: FULL steps (forward + backward) record the real gradients; then
PREDICT steps set each parameter's gradient to a prediction fitted on that history and
skip backward (the forward runs under `torch.no_grad()` only to report the loss, or not at
all with `skip_forward=True`); inside PREDICT, every `correct_every`-th step is a CORRECT
step, a real backward that measures the prediction's error and refits. The optimizer,
clipping, AMP and hooks see an ordinary step every time.

    FULL x full_steps -> PREDICT (CORRECT when phase_step > 0 and phase_step % correct_every == 0,
    phase_step not reset by it) until phase_step reaches predict_steps -> FULL (next cycle)

An optional WARMUP of full steps comes first, at least as long as the predictor needs history.

`PhaseController` is the machine alone, for a loop of your own; `PhaseTrainer` drives it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

import torch

from ... import distributed
from ...trainer import END_OF_DATA, BaseTrainer
from ...utils import check_int, check_number
from ..compression import TernaryCode, TernaryGradientAccumulator, VSACode, VSAGradientCompressor, gradient_cosine, ternarize

__all__ = ["Phase", "PhaseConfig", "StepInfo", "PhaseController", "PhaseTrainer", "LeastSquaresPredictor", "MomentumPredictor"]

_PREDICTORS = ("least_squares", "momentum")
_STORAGE = ("full", "ternary", "vsa")


class Phase(str, Enum):
    WARMUP = "warmup"
    FULL = "full"
    PREDICT = "predict"
    CORRECT = "correct"


@dataclass
class PhaseConfig:
    """Phase lengths and predictor settings; defaults as in the crate's deterministic trainer.

    Args:
        warmup_steps: full steps before the first cycle (at least 2: the fit needs history).
        full_steps / predict_steps: length of the FULL and PREDICT phases of a cycle.
        correct_every: a CORRECT step at every multiple of this inside PREDICT.
        history_window: full gradients the least-squares fit uses.
        adaptive_phases: adjust the lengths on entering FULL from the last 100 losses.
        loss_threshold: relative loss rise that means "more full steps".
        max_grad_norm: clipping (the trainer's `grad_clip` when that is not given).
        predictor: "least_squares" or "momentum" (g[-1] + beta (g[-1] - g[-2])).
        momentum_beta: beta of the momentum predictor.
        weight_decay: weight 0.95^age of older gradients in the fit.
        residual_decay: the residual's EMA decay at CORRECT, and its fade per predicted step.
        residual_threshold: a CORRECT step comes early when ||residual|| / ||last gradient||
            exceeds this (read once per CORRECT step, not per step).
        history_storage: "full" (float copies), "ternary" (packed 2-bit, 16x smaller) or
            "vsa" (one ternary hypervector of `vsa_dim_ratio` x the size per entry).
        vsa_dim_ratio: hypervector size relative to the number of parameters.
        ternary_accumulation: with gradient accumulation, hold the running sum of the
            micro-steps' gradients as packed trits between micro-steps (stochastic,
            unbiased) instead of float32.
        skip_forward: PREDICT steps do not run the model at all (no loss is reported).
        extrapolate: least squares predicts b + v dt (the crate); False predicts the fitted
            value at the newest gradient, b, for every step (no extrapolation of the
            minibatch noise along the slope).
        seed: seeds the stochastic quantisation and the VSA projection.
    """

    warmup_steps: int = 10
    full_steps: int = 5
    predict_steps: int = 20
    correct_every: int = 5
    history_window: int = 8
    adaptive_phases: bool = False
    loss_threshold: float = 0.1
    max_grad_norm: float | None = 1.0
    predictor: str = "least_squares"
    momentum_beta: float = 0.9
    weight_decay: float = 0.95
    residual_decay: float = 0.95
    residual_threshold: float = 0.5
    history_storage: str = "full"
    vsa_dim_ratio: float = 0.25
    ternary_accumulation: bool = False
    skip_forward: bool = False
    extrapolate: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("PhaseConfig.warmup_steps", self.warmup_steps, minimum=0)
        check_int("PhaseConfig.full_steps", self.full_steps, minimum=1)
        check_int("PhaseConfig.predict_steps", self.predict_steps, minimum=0)
        check_int("PhaseConfig.correct_every", self.correct_every, minimum=1)
        check_int("PhaseConfig.history_window", self.history_window, minimum=2)
        check_int("PhaseConfig.seed", self.seed)
        check_number("PhaseConfig.loss_threshold", self.loss_threshold, positive=True)
        check_number("PhaseConfig.max_grad_norm", self.max_grad_norm, positive=True, allow_none=True)
        check_number("PhaseConfig.vsa_dim_ratio", self.vsa_dim_ratio, positive=True)
        check_number("PhaseConfig.residual_threshold", self.residual_threshold, positive=True)
        for name in ("momentum_beta", "weight_decay", "residual_decay"):
            value = getattr(self, name)
            check_number(f"PhaseConfig.{name}", value)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"PhaseConfig.{name} must be in [0, 1]; got {value!r}")
        if self.predictor not in _PREDICTORS:
            raise ValueError(f"PhaseConfig.predictor must be one of {_PREDICTORS}; got {self.predictor!r}")
        if self.history_storage not in _STORAGE:
            raise ValueError(f"PhaseConfig.history_storage must be one of {_STORAGE}; got {self.history_storage!r}")
        for name in ("adaptive_phases", "ternary_accumulation", "skip_forward", "extrapolate"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"PhaseConfig.{name} must be True or False; got {getattr(self, name)!r}")


@dataclass
class StepInfo:
    phase: Phase
    phase_step: int
    total_step: int
    cycle: int
    phase_changed: bool


# ---------------------------------------------------------------------------- history


class _History:
    """The last `window` full gradients with their step, stored as configured. Float
    copies live in one ring buffer per parameter, shaped (window, *shape): recording is a
    copy into a slot, and a fit is one matrix product per parameter over all slots."""

    def __init__(self, window: int, storage: str, seed: int, vsa_dim_ratio: float = 0.25) -> None:
        self.window = window
        self.entries: deque[tuple[int, Any]] = deque(maxlen=window)
        self.storage = storage
        self.seed = seed
        self.vsa = VSAGradientCompressor(dim_ratio=vsa_dim_ratio, seed=seed) if storage == "vsa" else None
        self.buffers: list[torch.Tensor] = []  # "full" storage: the ring buffers
        self._next_slot = 0
        self._like: list[torch.Tensor] = []
        self._generator: torch.Generator | None = None  # on the gradients' device, made at first use

    def add(self, step: int, grads: Sequence[torch.Tensor]) -> None:
        self._like = [torch.empty((), dtype=g.dtype, device=g.device).expand(g.shape) for g in grads]
        if self.storage == "full":
            if [b.shape[1:] for b in self.buffers] != [g.shape for g in grads]:
                self.buffers = [torch.zeros((self.window, *g.shape), dtype=g.dtype, device=g.device) for g in grads]
                self.entries.clear()
                self._next_slot = 0
            stored: Any = self._next_slot
            self._next_slot = (self._next_slot + 1) % self.window
            torch._foreach_copy_([b[stored] for b in self.buffers], [g.detach() for g in grads])
        elif self.storage == "ternary":
            generator = self._generator_on(grads[0].device)
            stored = [ternarize(g, "stochastic", generator=generator) for g in grads]
        else:
            assert self.vsa is not None
            stored = self.vsa.compress(grads)
        self.entries.append((step, stored))

    def _generator_on(self, device: torch.device) -> torch.Generator:
        """The quantiser's own RNG (the user's random streams stay untouched)."""
        if self._generator is None or self._generator.device.type != device.type:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def tensors(self, stored: Any) -> list[torch.Tensor]:
        if self.storage == "full":
            return [b[stored] for b in self.buffers]  # views: valid until that slot is reused
        if self.storage == "ternary":
            return [code.decode() for code in stored]
        assert self.vsa is not None
        return self.vsa.decompress(stored, self._like)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def nbytes(self) -> int:
        total = 0
        for _, stored in self.entries:
            if self.storage == "full":
                total += sum(b[stored].numel() * b.element_size() for b in self.buffers)
            elif self.storage == "ternary":
                total += sum(code.nbytes for code in stored)
            else:
                total += stored.nbytes
        return total

    def state_dict(self) -> dict[str, Any]:
        def encode(stored: Any) -> Any:
            if self.storage == "full":
                return [b[stored].clone() for b in self.buffers]
            if self.storage == "ternary":
                return [_code_state(c) for c in stored]
            return {"code": _code_state(stored.code), "slot": stored.slot}

        return {
            "steps": [step for step, _ in self.entries],
            "entries": [encode(stored) for _, stored in self.entries],
            "slots": [stored for _, stored in self.entries] if self.storage == "full" else [],
            "next_slot": self._next_slot,
            "like": [list(t.shape) for t in self._like],
            "dtypes": [str(t.dtype).removeprefix("torch.") for t in self._like],
            "generator": self._generator.get_state() if self._generator is not None else None,
            "generator_device": self._generator.device.type if self._generator is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        def decode(value: Any) -> Any:
            if self.storage == "full":
                return [t.to(device) for t in value]
            if self.storage == "ternary":
                return [_code_from_state(v, device) for v in value]
            return VSACode(_code_from_state(value["code"], device), value["slot"])

        self.entries.clear()
        self._like = [
            torch.empty((), dtype=getattr(torch, dtype), device=device).expand(shape)
            for shape, dtype in zip(state["like"], state["dtypes"])
        ]
        self.buffers = []
        if self.storage == "full" and state["steps"]:
            # Back into the very slots they had: a fit adds the slots in buffer order.
            self.buffers = [torch.zeros((self.window, *t.shape), dtype=t.dtype, device=device) for t in self._like]
        for step, value, slot in zip(state["steps"], state["entries"], state["slots"] or [None] * len(state["steps"])):
            if self.storage == "full":
                torch._foreach_copy_([b[slot] for b in self.buffers], decode(value))
                self.entries.append((int(step), int(slot)))
            else:
                self.entries.append((int(step), decode(value)))
        self._next_slot = int(state["next_slot"])
        self._generator = None
        if state.get("generator") is not None:
            self._generator = torch.Generator(device=state["generator_device"])
            self._generator.set_state(state["generator"].clone())


def _code_state(code: TernaryCode) -> dict[str, Any]:
    return {"packed": code.packed, "scale": code.scale, "shape": list(code.shape), "dtype": str(code.dtype).removeprefix("torch.")}


def _code_from_state(state: Mapping[str, Any], device: torch.device) -> TernaryCode:
    return TernaryCode(state["packed"].to(device), state["scale"].to(device), torch.Size(state["shape"]), getattr(torch, state["dtype"]))


# ---------------------------------------------------------------------------- predictors


class LeastSquaresPredictor:
    """Per element, g(t) = b + v t fitted by weighted least squares to the history (weights
    decay^age, t relative to the newest). The weights and times are the same for every
    element, so b and v are fixed linear combinations of the stored gradients: a few
    foreach multiply-adds per history entry, no loop over elements, no host sync.
    Prediction at step s: b + v (s - t_newest) + residual * residual_decay^(steps since
    the fit). CORRECT updates residual <- decay residual + (1 - decay) (actual - fit)."""

    def __init__(self, config: PhaseConfig) -> None:
        self.config = config
        self.history = _History(config.history_window, config.history_storage, config.seed, config.vsa_dim_ratio)
        self.base: list[torch.Tensor] | None = None
        self.slope: list[torch.Tensor] | None = None
        self.residual: list[torch.Tensor] | None = None
        self.fitted_at = 0
        self._stale_at: int | None = None

    def record(self, grads: Sequence[torch.Tensor], step: int) -> None:
        self.history.add(step, grads)
        self._stale_at = step  # refit lazily: FULL steps in a row need no fit in between

    def _ensure_fit(self) -> None:
        if self._stale_at is not None:
            self.fit(self._stale_at)

    def coefficients(self) -> tuple[list[float], list[float]]:
        """(c_i, d_i) with b = sum c_i g_i and v = sum d_i g_i (falls back to the newest
        gradient with no slope when the 2x2 system is singular, e.g. one entry)."""
        steps = [s for s, _ in self.history.entries]
        newest = steps[-1]
        ts = [s - newest for s in steps]
        ws = [self.config.weight_decay ** (len(steps) - 1 - i) for i in range(len(steps))]
        s0 = sum(ws)
        s1 = sum(w * t for w, t in zip(ws, ts))
        s2 = sum(w * t * t for w, t in zip(ws, ts))
        det = s0 * s2 - s1 * s1
        if abs(det) < 1e-10:
            return [0.0] * (len(steps) - 1) + [1.0], [0.0] * len(steps)
        c = [w * (s2 - s1 * t) / det for w, t in zip(ws, ts)]
        d = [w * (s0 * t - s1) / det for w, t in zip(ws, ts)]
        return c, d

    def fit(self, step: int) -> None:
        c, d = self.coefficients()
        if self.history.storage == "full":
            # b and v for every element of a parameter at once: (2 x window) @ (window x numel).
            weights = torch.zeros(2, self.history.window)
            for (_, slot), ci, di in zip(self.history.entries, c, d):
                weights[0, slot], weights[1, slot] = ci, di
            self.base, self.slope = [], []
            for buffer in self.history.buffers:
                both = torch.mm(weights.to(buffer.device, buffer.dtype), buffer.reshape(self.history.window, -1))
                self.base.append(both[0].reshape(buffer.shape[1:]))
                self.slope.append(both[1].reshape(buffer.shape[1:]))
            self.fitted_at = step
            self._stale_at = None
            return
        base: list[torch.Tensor] | None = None
        slope: list[torch.Tensor] | None = None
        for (_, stored), ci, di in zip(self.history.entries, c, d):
            grads = self.history.tensors(stored)
            if base is None:
                base = torch._foreach_mul(grads, ci)
                slope = torch._foreach_mul(grads, di)
            else:
                torch._foreach_add_(base, grads, alpha=ci)
                torch._foreach_add_(slope, grads, alpha=di)
        self.base, self.slope = base, slope
        self.fitted_at = step
        self._stale_at = None

    def _trend(self, step: int) -> list[torch.Tensor]:
        self._ensure_fit()
        assert self.base is not None and self.slope is not None
        newest = self.history.entries[-1][0]
        dt = float(step - newest) if self.config.extrapolate else 0.0
        return torch._foreach_add(self.base, self.slope, alpha=dt)

    def predict(self, step: int) -> list[torch.Tensor]:
        if not len(self.history):
            raise RuntimeError("the predictor has no history yet: record full gradients first")
        predicted = self._trend(step)
        if self.residual is not None:
            fade = self.config.residual_decay ** max(step - self.fitted_at, 0)
            torch._foreach_add_(predicted, self.residual, alpha=fade)
        return predicted

    def correct(self, actual: Sequence[torch.Tensor], step: int) -> list[torch.Tensor]:
        """Update the residual from the real gradient at `step`, then record it and refit.
        Returns the error (actual - trend)."""
        error = torch._foreach_sub([a.detach() for a in actual], self._trend(step))
        decay = self.config.residual_decay
        if self.residual is None:
            self.residual = torch._foreach_mul(error, 1.0 - decay)
        else:
            torch._foreach_mul_(self.residual, decay)
            torch._foreach_add_(self.residual, error, alpha=1.0 - decay)
        self.record(actual, step)
        return error

    def residual_ratio(self) -> torch.Tensor | None:
        """||residual|| / ||newest gradient||, on the device."""
        if self.residual is None:
            return None
        newest = self.history.tensors(self.history.entries[-1][1])
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self.residual)))
        ref = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(newest)))
        return norm / ref.clamp_min(1e-12)

    def state_dict(self) -> dict[str, Any]:
        # The step the current fit belongs to (or the pending refit's): refitting there on
        # load gives back the very same fit.
        fit_step = self._stale_at if self._stale_at is not None else self.fitted_at
        return {"history": self.history.state_dict(), "residual": self.residual, "fitted_at": fit_step}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        self.history.load_state_dict(state["history"], device)
        residual = state.get("residual")
        self.residual = [t.to(device) for t in residual] if residual is not None else None
        self.fitted_at = int(state["fitted_at"])
        self.base = self.slope = None
        self._stale_at = self.fitted_at if len(self.history) else None  # the fit is recomputed, exactly

    def reset(self) -> None:
        self.history.entries.clear()
        self.base = self.slope = self.residual = None
        self.fitted_at = 0
        self._stale_at = None


class MomentumPredictor:
    """g_pred = g[-1] + beta (g[-1] - g[-2]) from the last two full gradients."""

    def __init__(self, config: PhaseConfig) -> None:
        self.config = config
        self.history = _History(2, config.history_storage, config.seed, config.vsa_dim_ratio)

    def record(self, grads: Sequence[torch.Tensor], step: int) -> None:
        self.history.add(step, grads)

    def predict(self, step: int) -> list[torch.Tensor]:
        if not len(self.history):
            raise RuntimeError("the predictor has no history yet: record full gradients first")
        last = self.history.tensors(self.history.entries[-1][1])
        if len(self.history) < 2:
            return [g.clone() for g in last]
        before = self.history.tensors(self.history.entries[-2][1])
        beta = self.config.momentum_beta
        predicted = torch._foreach_mul(last, 1.0 + beta)
        torch._foreach_add_(predicted, before, alpha=-beta)
        return predicted

    def correct(self, actual: Sequence[torch.Tensor], step: int) -> list[torch.Tensor]:
        error = torch._foreach_sub([a.detach() for a in actual], self.predict(step))
        self.record(actual, step)
        return error

    def residual_ratio(self) -> torch.Tensor | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        self.history.load_state_dict(state["history"], device)

    def reset(self) -> None:
        self.history.entries.clear()


# ---------------------------------------------------------------------------- controller


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
        self.predictor = LeastSquaresPredictor(self.config) if self.config.predictor == "least_squares" else MomentumPredictor(self.config)
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

    def begin_step(self) -> StepInfo:
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
        return StepInfo(self.phase, self.phase_step, self.total_step, self.cycle, changed)

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
            self.predict_steps = min(self.predict_steps + 3, max(50, self.config.predict_steps)) if self.config.predict_steps else 0

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
        """Add the last CORRECT step's measured error (actual - predicted) to `grads` in
        place, e.g. to the next real gradients (the crate's legacy behaviour)."""
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


# ---------------------------------------------------------------------------- trainer


class PhaseTrainer(BaseTrainer):
    """BaseTrainer whose PREDICT steps replace backward with predicted gradients.

    Write the model, data and `forward` as for BaseTrainer (subclass, or ready objects
    with `forward_fn`); pass `phase=PhaseConfig(...)` or its fields as keywords. Every step
    reports `records["phase"]` (`backward`: 1 on steps that ran one, `speedup`, `cycle`),
    so Progress/Logging/W&B show them; `trainer.get_stats()` has the totals and per-phase
    mean losses. The controller's state (phase, counters, predictor history) is part of
    `state_dict()` and resumes exactly. `phase.max_grad_norm` is the clipping unless
    `grad_clip` is given. One process only; fp16 predictions are scaled like real gradients.
    """

    max_processes = 1
    max_processes_reason = "predicted gradients are not synchronised between ranks"

    def __init__(self, *, phase: PhaseConfig | None = None, **kwargs: Any) -> None:
        names = {f.name for f in fields(PhaseConfig)}
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in names and k != "seed"}
        if phase is None:
            if "seed" in kwargs and kwargs["seed"] is not None:
                given["seed"] = kwargs["seed"]
            phase = PhaseConfig(**given)
        elif not isinstance(phase, PhaseConfig):
            raise TypeError(f"phase must be a PhaseConfig; got {type(phase).__name__}")
        elif given:
            raise TypeError(f"give PhaseConfig fields either in phase= or as keywords, not both: {sorted(given)}")
        if kwargs.get("grad_clip") is None:
            kwargs["grad_clip"] = phase.max_grad_norm
        super().__init__(**kwargs)
        self.phase_config = phase
        self.controller = PhaseController(phase)
        self._step_begun = False
        self._predicting = False
        self._had_grad: list[bool] = []  # which parameters had a gradient in the last real step
        self._accumulator = TernaryGradientAccumulator(seed=phase.seed) if phase.ternary_accumulation else None

    # ------------------------------------------------------------------ the step

    def accumulate_gradients(self, info: dict[str, Any]) -> bool:
        if not self._step_begun:
            self._step_info = self.controller.begin_step()
            self._step_begun = True
        step = self._step_info
        self._predicting = not self.controller.should_compute_full()
        if not self._predicting:
            ok = super().accumulate_gradients(info)
            if ok and self._accumulator is not None and self._accumulator.codes is not None:
                # BaseTrainer rescaled p.grad by n / micro-steps when some were missing; the
                # part held by the accumulator needs the same factor.
                ran = info.get("micro_steps") or self.gradient_accumulation_steps
                self._finish_ternary_accumulation(self.optimized_params, self.gradient_accumulation_steps / ran)
        elif self.phase_config.skip_forward:
            ok = self._draw_batches(info)
        else:
            with torch.no_grad():
                ok = super().accumulate_gradients(info)
        if not ok:
            return False
        if self._predicting:
            params = self.optimized_params
            predicted = self.controller.predicted_gradients()
            if self.active_scaler is not None and predicted:
                # The trainer unscales before stepping: scale the prediction like a real
                # gradient (scale() also sets the scale up after a resume into PREDICT).
                torch._foreach_mul_(predicted, self.active_scaler.scale(torch.ones((), device=predicted[0].device)))
            for p, g, had_grad in zip(params, predicted, self._had_grad):
                # A parameter without a gradient in the last real step gets none now either:
                # the optimizer must not decay or update what the loss does not touch.
                p.grad = g.to(p.dtype) if had_grad else None
        info["records"] = {
            **(info.get("records") or {}),
            "phase": {
                "backward": 0.0 if self._predicting else 1.0,
                "cycle": float(step.cycle),
                "speedup": self.controller.speedup(),
            },
        }
        return True

    def backward(self, loss: torch.Tensor) -> None:
        if self._predicting:
            return  # PREDICT: no backward at all
        super().backward(loss)
        if self._accumulator is not None and self._micro_steps_left():
            # Between micro-steps the running sum lives as packed trits, not float32.
            params = self.optimized_params
            self._accumulator.add([_grad_or_zeros(p) for p in params])
            for p in params:
                p.grad = None

    def _micro_steps_left(self) -> bool:
        return self.micro_step < self.gradient_accumulation_steps - 1

    def _finish_ternary_accumulation(self, params: list[torch.Tensor], factor: float) -> None:
        assert self._accumulator is not None
        totals = self._accumulator.total() or []
        if factor != 1.0:
            torch._foreach_mul_(totals, factor)
        for p, total in zip(params, totals):
            p.grad = total.to(p.dtype) if p.grad is None else p.grad + total.to(p.dtype)
        self._accumulator.reset()

    def _draw_batches(self, info: dict[str, Any]) -> bool:
        """`skip_forward`: consume this step's batches (the data position stays that of
        an ordinary step) without running the model."""
        drawn = 0
        for _ in range(self.gradient_accumulation_steps):
            if self.next_batch() is END_OF_DATA:
                break
            drawn += 1
        info["loss"] = None
        info["records"] = {}
        info["micro_steps"] = 0
        return drawn > 0

    def gradients_ready(self, skipped: bool) -> None:
        # The real gradients are recorded once they are final: unscaled (fp16), clipped as
        # the optimizer will use them, and finite (a step that is retried records nothing).
        if not self._predicting and not skipped:
            params = self.optimized_params
            self._had_grad = [p.grad is not None for p in params]
            self.controller.record_full_gradients([_grad_or_zeros(p) for p in params])

    def optimizer_step(self) -> bool:
        took = super().optimizer_step()
        if took:
            self.controller.end_step(self.step_info.get("loss"))
            self._step_begun = False
        return took

    # ------------------------------------------------------------------ reporting, state

    def get_stats(self) -> dict[str, Any]:
        """Totals: steps per phase, cycles, speedup (forward / backward steps), current
        phase lengths, per-phase mean loss, bytes of predictor history."""
        return self.controller.get_stats()

    def state_dict(self, **kwargs: Any) -> dict[str, Any]:
        state = super().state_dict(**kwargs)
        state["phase_controller"] = self.controller.state_dict()
        state["phase_controller"]["had_grad"] = list(self._had_grad)
        if self._accumulator is not None:
            state["phase_controller"]["accumulator"] = self._accumulator.state_dict()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], **kwargs: Any) -> None:
        super().load_state_dict(state_dict, **kwargs)
        saved = state_dict.get("phase_controller")
        if saved is not None:
            self.controller.load_state_dict(saved, self.device)
            self._had_grad = [bool(h) for h in saved.get("had_grad", [])] or [True] * len(self.optimized_params)
            if self._accumulator is not None and saved.get("accumulator") is not None:
                self._accumulator.load_state_dict(saved["accumulator"])
        self._step_begun = False


def _grad_or_zeros(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)
