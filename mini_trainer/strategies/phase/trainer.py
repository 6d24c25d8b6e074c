"""PhaseTrainer: BaseTrainer driving a `PhaseController`, backward skipped on PREDICT steps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...builder import REGISTRY
from ...trainer import END_OF_DATA, BaseTrainer
from ..compression import TernaryGradientAccumulator
from ..config_fields import pop_config_fields
from .config import PhaseConfig
from .controller import PhaseController, PhaseStep

__all__ = ["PhaseTrainer"]


@REGISTRY.register()
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
        given = pop_config_fields(PhaseConfig, kwargs, shared=("seed",))
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
        self._step_begun = False  # begin_step() ran for the optimizer step under way (micro-steps share it)
        self._current_step: PhaseStep | None = None
        self._predicting = False
        self._had_grad: list[bool] = []  # which parameters had a gradient in the last real step
        self._accumulator = TernaryGradientAccumulator(seed=phase.seed) if phase.ternary_accumulation else None

    # ------------------------------------------------------------------ the step

    def accumulate_gradients(self, info: dict[str, Any]) -> bool:
        if not self._step_begun:
            self._current_step = self.controller.begin_step()
            self._step_begun = True
        step = self._current_step
        assert step is not None
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
            for p, g, had_grad in zip(params, predicted, self._had_grad, strict=False):
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
        for p, total in zip(params, totals, strict=False):  # no totals: nothing was accumulated
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
