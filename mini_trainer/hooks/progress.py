"""ProgressHook: a live tqdm bar on a terminal, one plain line per interval otherwise
(log files, CI, notebooks without a TTY). Only the main process prints.

    Step 100/10000: step 0.2500s data 0.0100s eta 0:41:40 loss 0.5234 grad_norm 2.3400 lr 1.00e-03 | accuracy 0.9100

`step` is the wall-clock time per optimizer step over the interval (on CUDA this includes
kernels still queued when the step returned, unlike `step_info["step_time"]`), `data` the
time spent waiting for batches, `eta` the remaining time extrapolated from the steps after
`eta_warmup` (so compilation and warm-up do not inflate it). `samples/s` and `tokens/s`
(all ranks together) and `mfu` (per device, with `MfuHook`) follow when known; see
docs/throughput.md.

Evaluation results that a hook running before this one (e.g. `EvalHook`) leaves in
`trainer.step_info["eval"]` (`{"val/loss": 0.12, ...}`), after a step or at the end of
training, get a line of their own, once per results dict:

    Step 300/1200: eval val/loss 0.1234 val/accuracy 0.9600
"""

from __future__ import annotations

import datetime
import math
import sys
import time
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING, Any

from ..builder import REGISTRY
from ..distributed import is_main_process
from ..metrics import RESERVED_NAMES, StepMetrics
from ..utils import check_int, flatten_dict
from .base import BaseHook

if TYPE_CHECKING:
    from ..trainer import BaseTrainer

_MAIN_KEYS = ("loss", "grad_norm")


@REGISTRY.register()
class ProgressHook(BaseHook):
    """Print progress every `interval` steps.

    Args:
        interval: steps between two progress lines (the bar itself moves every step).
        with_records: also print the user's records (after a `|`).
        sync: average the printed metrics across ranks (every rank must run this hook).
        eta_warmup: steps ignored by the ETA estimate.
        file: where to print (default: standard output).
        bar: True/False forces the tqdm bar on/off; None uses it when `file` is a TTY.
    """

    priority = 10  # after hooks that add to step_info (e.g. memory), before checkpointing

    def __init__(
        self,
        interval: int = 10,
        with_records: bool = True,
        sync: bool = False,
        eta_warmup: int = 10,
        file: IO[str] | None = None,
        bar: bool | None = None,
    ) -> None:
        check_int("ProgressHook.interval", interval, minimum=1)
        check_int("ProgressHook.eta_warmup", eta_warmup, minimum=0)
        self.interval = interval
        self.with_records = bool(with_records)
        self.sync = bool(sync)
        self.eta_warmup = eta_warmup
        self.file = file
        self.bar = bar
        self._metrics = StepMetrics()
        self._tqdm: Any = None
        # The results dict printed last, by identity: it stays in step_info until the next
        # step, and an end-of-training evaluation brings a new one.
        self._last_eval: Any = None

    def on_before_train(self, trainer: BaseTrainer) -> None:
        self._metrics.reset()
        self._start_step = trainer.step
        self._eta_anchor: tuple[int, float] | None = (
            (trainer.step, time.perf_counter()) if self.eta_warmup == 0 else None
        )
        self._out = self.file or sys.stdout
        self._tqdm = None
        self._last_eval = None
        use_bar = self.bar if self.bar is not None else _isatty(self._out)
        if use_bar and is_main_process():
            from tqdm.auto import tqdm

            self._tqdm = tqdm(
                total=trainer.estimated_total_steps(),
                initial=trainer.step,
                file=self._out,
                dynamic_ncols=True,
                unit="step",
            )

    def on_after_step(self, trainer: BaseTrainer) -> None:
        self._metrics.add(trainer.step_info)
        if self._tqdm is not None:
            self._tqdm.update(1)
        if self._eta_anchor is None and trainer.step - self._start_step >= self.eta_warmup:
            self._eta_anchor = (trainer.step, time.perf_counter())
        if trainer.step % self.interval == 0:
            self._report(trainer)
        self._report_eval(trainer)

    def on_after_train(self, trainer: BaseTrainer) -> None:
        if self._metrics.steps:
            self._report(trainer)
        self._report_eval(trainer)
        self._close()

    def on_exception(self, trainer: BaseTrainer, error: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None

    # ------------------------------------------------------------------ formatting

    def _report(self, trainer: BaseTrainer) -> None:
        values = self._metrics.compute(sync=self.sync)
        self._metrics.reset()
        if not is_main_process():
            return
        text = self.format(values, self._eta(trainer))
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(text, refresh=True)
        else:
            print(f"{self._where(trainer)}: {text}", file=self._out, flush=True)

    def _report_eval(self, trainer: BaseTrainer) -> None:
        results = trainer.step_info.get("eval")
        if results is None or results is self._last_eval:
            return
        self._last_eval = results
        if not is_main_process() or not isinstance(results, Mapping) or not results:
            return
        text = " ".join(f"{k} {_fmt(v)}" for k, v in flatten_dict(results).items())
        line = f"{self._where(trainer)}: eval {text}"
        if self._tqdm is not None:
            self._tqdm.write(line, file=self._out)  # above the bar, which is redrawn below it
        else:
            print(line, file=self._out, flush=True)

    def _where(self, trainer: BaseTrainer) -> str:
        total = trainer.estimated_total_steps()
        return f"Step {trainer.step}/{total}" if total else f"Step {trainer.step}"

    def _eta(self, trainer: BaseTrainer) -> float | None:
        total = trainer.estimated_total_steps()
        if total is None or self._eta_anchor is None or trainer.step <= self._eta_anchor[0]:
            return None
        anchor_step, anchor_time = self._eta_anchor
        per_step = (time.perf_counter() - anchor_time) / (trainer.step - anchor_step)
        return max(total - trainer.step, 0) * per_step

    def format(self, values: Mapping[str, Any], eta: float | None) -> str:
        parts = []
        if "wall_time" in values:
            parts.append(f"step {values['wall_time']:.4f}s")
        if "data_time" in values:
            parts.append(f"data {values['data_time']:.4f}s")
        if eta is not None:
            parts.append(f"eta {datetime.timedelta(seconds=round(eta))}")
        for key in _MAIN_KEYS:
            if key in values:
                parts.append(f"{key} {_fmt(values[key])}")
        if "lr" in values:
            parts.append(f"lr {values['lr']:.2e}")
        if "samples_per_s" in values:
            parts.append(f"samples/s {_si(values['samples_per_s'])}")
        if "tokens_per_s" in values:
            parts.append(f"tokens/s {_si(values['tokens_per_s'])}")
        if "mfu" in values:
            parts.append(f"mfu {100 * values['mfu']:.1f}%")
        for key in ("max_memory", "max_rss"):
            if key in values:
                parts.append(f"{key} {values[key]:.2f}GiB")
        if values.get("retries"):
            parts.append(f"retries {values['retries']:.2f}")
        text = " ".join(parts)
        if self.with_records:
            extra = {k: v for k, v in flatten_dict(values).items() if k not in RESERVED_NAMES}
            if extra:
                text += " | " + " ".join(f"{k} {_fmt(v)}" for k, v in extra.items())
        return text


def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value) and value != 0 and abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _si(value: float) -> str:
    """3 significant digits with a k/M/G/T suffix: 1234.5 -> '1.23k'."""
    for suffix in ("", "k", "M", "G"):
        if abs(value) < 999.5:  # .3g would round 999.5 up to '1e+03'
            return f"{value:.3g}{suffix}"
        value /= 1000
    return f"{value:.3g}T"


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
