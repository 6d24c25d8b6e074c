"""Training as a stream of events, API-compatible with the `fitstream` package.

A training run is an iterable of dicts ("events"); everything else is a function that
transforms, enriches, cuts or consumes that iterable. Switching from fitstream means
changing the import only: the names, signatures, defaults and event keys are the same
(checked against fitstream 0.4.1).

    events = pipe(
        epoch_stream((X, y), model, optimizer, nn.CrossEntropyLoss(), batch_size=32),
        augment(validation_loss((X_val, y_val), nn.CrossEntropyLoss())),
        early_stop("val_loss", patience=10),
    )
    history = collect(events)

What fitstream lacks: `BaseTrainer.events()` turns any trainer (strategies, hooks,
checkpoints, DDP included) into a stream of per-step events, so the same stages work on a
full-featured run. Its events hold the step's loss and metrics as device tensors (reading
them is up to the consumer, so a stream costs no host sync of its own); `collect` and
`collect_jsonl` turn 0-d tensors into Python numbers, and exclude the `trainer` key along
with `model`.

Everything is lazy: a stage pulls one event at a time from the stage before it, so `take(n)`
and `early_stop(...)` end a training run by not asking for more. When they stop, they also
close a `trainer.events()` stream upstream of them, so the run's end (`on_after_train`: the
final checkpoint, a preemption exit code) happens right there, in the consumer's frame, and
an error in any stage reaches the trainer's hooks as the run's error (`on_exception`).

The package's modules, by role: `events` (Event, TrainerEvents and how stages stay linked
to their source), `sources` (epoch_stream, iter_batches), `stages` (pipe and the stages),
`sinks` (collect...), `augmenters` (evaluate, validation_loss, best_model) and `plotting`
(live_plot). Import from `mini_trainer.stream` itself: the split is not part of the API.
"""

# The underscore names were importable from the single-module `mini_trainer.stream`: they
# stay importable (`x as x` marks a re-export), but they are no API.
from .augmenters import BestModel, best_model, evaluate, validation_loss
from .augmenters import _copy_state as _copy_state
from .events import Event, TrainerEvents, Transform
from .events import _abort_run as _abort_run
from .events import _end_run as _end_run
from .events import _run_upstream as _run_upstream
from .events import _Stage as _Stage
from .events import _stage as _stage
from .plotting import LivePlot, live_plot
from .sinks import _NEVER_COLLECTED as _NEVER_COLLECTED
from .sinks import _check_include_exclude as _check_include_exclude
from .sinks import _select as _select
from .sinks import _write_jsonl as _write_jsonl
from .sinks import collect, collect_jsonl, collect_pd
from .sources import _batches as _batches
from .sources import _epochs as _epochs
from .sources import _sample_count as _sample_count
from .sources import epoch_stream, iter_batches
from .stages import augment, early_stop, ema, pipe, print_keys, take, tap, tick

__all__ = [
    "Event",
    "Transform",
    "TrainerEvents",
    "epoch_stream",
    "iter_batches",
    "pipe",
    "augment",
    "take",
    "tap",
    "tick",
    "print_keys",
    "ema",
    "early_stop",
    "collect",
    "collect_jsonl",
    "collect_pd",
    "evaluate",
    "validation_loss",
    "BestModel",
    "best_model",
    "LivePlot",
    "live_plot",
]
