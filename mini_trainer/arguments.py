"""What `BaseTrainer(...)` accepts, checked at construction: a wrong value is an error that
names the argument, the value and what is allowed, before anything is built or any
training time is spent."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .evaluation import check_eval_loaders
from .utils import check_directory_path, check_int, check_number

__all__ = [
    "STILL_RUNNING",
    "check_built",
    "check_limits",
    "check_optional_type",
    "check_run_arguments",
    "check_scheduler",
    "check_trainer_arguments",
]

STILL_RUNNING = (
    "this trainer is still in a run: a stream from trainer.events() was left unfinished "
    "(a break, an error outside a stage, or a variable still holding it). Close it first "
    "(events.close()), or use `with trainer.events() as events:` so that it closes itself"
)


def check_trainer_arguments(args: Mapping[str, Any]) -> None:
    """Raise TypeError/ValueError for the first constructor argument in `args` (the
    constructor's keyword arguments by name) that BaseTrainer cannot use."""
    check_int("max_steps", args["max_steps"], minimum=0, allow_none=True)
    check_int("max_epochs", args["max_epochs"], minimum=0, allow_none=True)
    check_number("grad_clip", args["grad_clip"], positive=True, allow_none=True)
    check_int("max_non_finite_grad_retries", args["max_non_finite_grad_retries"], minimum=0, allow_none=True)
    check_int("gradient_accumulation_steps", args["gradient_accumulation_steps"], minimum=1)
    # seed: what torch.manual_seed takes
    check_int("seed", args["seed"], minimum=-(2**63), maximum=2**64 - 1, allow_none=True)
    check_optional_type("workspace", args["workspace"], (str, Path))
    if args["workspace"] is not None:
        check_directory_path("workspace", args["workspace"])
    check_optional_type("logger", args["logger"], logging.Logger)
    check_optional_type("model", args["model"], nn.Module)
    check_optional_type("optimizer", args["optimizer"], torch.optim.Optimizer)
    check_optional_type("grad_scaler", args["grad_scaler"], torch.amp.GradScaler)
    check_eval_loaders(args["eval_loaders"], "eval_loaders")
    if not isinstance(args["compile"], (bool, Mapping)):
        raise TypeError(f"compile must be a bool or a dict of torch.compile keywords; got {args['compile']!r}")
    forward_fn = args["forward_fn"]
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError(f"forward_fn must be callable as forward_fn(model, batch); got {forward_fn!r}")
    hooks = args["hooks"]
    if hooks is not None and not isinstance(hooks, (list, tuple)):
        raise TypeError(f"hooks must be a list of BaseHook instances; got {type(hooks).__name__}")
    parallelism = args["parallelism"]
    if parallelism not in distributed.PARALLELISM:
        allowed = ", ".join(map(repr, distributed.PARALLELISM))
        raise ValueError(f"parallelism must be one of {allowed}; got {parallelism!r}")
    units = args["fsdp_units"]
    if units is not None and not callable(units) and not (
        isinstance(units, tuple) and all(isinstance(t, type) for t in units)
    ):
        raise TypeError(
            f"fsdp_units must be a tuple of module classes, a function module -> bool, or None; got {units!r}"
        )
    parallel_kwargs = args["parallel_kwargs"]
    if parallel_kwargs is not None and not isinstance(parallel_kwargs, Mapping):
        raise TypeError(f"parallel_kwargs must be a dict of keywords; got {type(parallel_kwargs).__name__}")
    if args["state_dict_options"] is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        check_optional_type("state_dict_options", args["state_dict_options"], StateDictOptions)


def check_run_arguments(epochs: Any, steps: Any, data_loader: Any = None) -> None:
    """What `fit()` and `events()` accept: relative limits >= 1 and an iterable loader."""
    check_int("epochs", epochs, minimum=1, allow_none=True)
    check_int("steps", steps, minimum=1, allow_none=True)
    if data_loader is not None and not isinstance(data_loader, Iterable):
        raise TypeError(f"data_loader must be an iterable of batches; got {type(data_loader).__name__}")


def check_limits(max_steps: int | None, max_epochs: int | None) -> None:
    """What `train()` needs: an end (`max_steps` or `max_epochs`)."""
    if max_steps is None and max_epochs is None:
        raise ValueError("train() needs a limit: set max_steps or max_epochs (or call fit(steps=..., epochs=...))")


def check_built(method: str, value: Any, kind: type, description: str) -> Any:
    """`value`, what a `build_*` method returned, unless it is not a `kind`."""
    if not isinstance(value, kind):
        raise TypeError(f"{method} must return {description}; got {type(value).__name__}")
    return value


def check_scheduler(scheduler: Any) -> Any:
    """What `build_lr_scheduler()` returned, unless it is neither None nor has `step()`."""
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        raise TypeError(f"build_lr_scheduler() must return an object with step(); got {scheduler!r}")
    return scheduler


def check_optional_type(name: str, value: Any, types: type | tuple[type, ...]) -> None:
    """TypeError naming `name` unless `value` is None or one of `types`."""
    if value is not None and not isinstance(value, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise TypeError(f"{name} must be a {names} or None; got {type(value).__name__} {value!r}")
