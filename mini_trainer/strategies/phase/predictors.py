"""Gradient predictors: from the recorded full gradients, the gradient of a later step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .config import PhaseConfig
from .history import GradientHistory

__all__ = ["LeastSquaresPredictor", "MomentumPredictor"]


class LeastSquaresPredictor:
    """Per element, g(t) = b + v t fitted by weighted least squares to the history (weights
    decay^age, t relative to the newest). The weights and times are the same for every
    element, so b and v are fixed linear combinations of the stored gradients: a few
    foreach multiply-adds per history entry, no loop over elements, no host sync.
    Prediction at step s: b + v (s - t_newest) + residual * residual_decay^(steps since
    the fit). CORRECT updates residual <- decay residual + (1 - decay) (actual - fit)."""

    def __init__(self, config: PhaseConfig) -> None:
        self.config = config
        self.history = GradientHistory(config.history_window, config.history_storage, config.seed, config.vsa_dim_ratio)
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
        s1 = sum(w * t for w, t in zip(ws, ts, strict=True))
        s2 = sum(w * t * t for w, t in zip(ws, ts, strict=True))
        det = s0 * s2 - s1 * s1
        if abs(det) < 1e-10:
            return [0.0] * (len(steps) - 1) + [1.0], [0.0] * len(steps)
        c = [w * (s2 - s1 * t) / det for w, t in zip(ws, ts, strict=True)]
        d = [w * (s0 * t - s1) / det for w, t in zip(ws, ts, strict=True)]
        return c, d

    def fit(self, step: int) -> None:
        c, d = self.coefficients()
        if self.history.storage == "full":
            # b and v for every element of a parameter at once: (2 x window) @ (window x numel).
            weights = torch.zeros(2, self.history.window)
            for (_, slot), ci, di in zip(self.history.entries, c, d, strict=True):
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
        for (_, stored), ci, di in zip(self.history.entries, c, d, strict=True):
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
        self.history = GradientHistory(2, config.history_storage, config.seed, config.vsa_dim_ratio)

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
