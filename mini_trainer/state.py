"""Model and optimizer state: getting and setting it (plain state dicts, or through
`torch.distributed.checkpoint.state_dict` for FSDP2 and sharded checkpoints), optimizer layouts (by parameter index, as
`optimizer.state_dict()` has it, or by name, as DCP/FSDP2 state dicts have it) and the
checks a state must pass before anything of it is assigned to a live model.

`check_training_state` exists because PyTorch's own loaders check too little, too late:
`Module.load_state_dict` copies tensors one by one and reports a shape mismatch after the
ones before it were overwritten, and `Optimizer.load_state_dict` takes Adam moments of
any shape (the step then fails, or broadcasts silently). A state that does not fit is a
CheckpointError naming the key and both shapes, so a resume falls back to an older
checkpoint, and a model is never left half-loaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import distributed
from .checkpoint import CheckpointError
from .data_cursor import DataCursor
from .rng import rng_state, set_rng_state
from .utils import unwrap

# Optimizers whose every non-scalar per-parameter state (momentum, moments, sums) has the
# parameter's shape. Others (Adafactor's factored moments, LBFGS's history, your own) are
# checked against the live optimizer's state when it has some, and for structure always.
PARAMETER_SHAPED_STATE = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam,
    torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta, torch.optim.ASGD, torch.optim.Rprop,
)


def optimizer_state_by_name(state: Mapping[str, Any], names: Sequence[str]) -> Mapping[str, Any]:
    """An optimizer state dict keyed by parameter index (`optimizer.state_dict()`) turned
    into one keyed by parameter name (what DCP's `get_state_dict` gives and
    `set_state_dict` takes); a by-name one is returned as it is. `names[i]` is the name of
    the i-th parameter in the optimizer's order."""
    groups = state.get("param_groups") or []
    if all(isinstance(i, str) for group in groups for i in group.get("params", [])):
        return state

    def name(index: int) -> str:
        if not 0 <= index < len(names) or not names[index]:
            raise KeyError(
                f"the optimizer state refers to parameter #{index}, "
                f"but the optimizer has {len(names)} named parameters"
            )
        return names[index]

    return {
        "state": {name(int(i)): value for i, value in state.get("state", {}).items()},
        "param_groups": [{**group, "params": [name(int(i)) for i in group["params"]]} for group in groups],
    }


def optimizer_state_by_index(state: Mapping[str, Any], names: Sequence[str]) -> Mapping[str, Any]:
    """The inverse of `optimizer_state_by_name`: a by-name optimizer state dict (e.g. from
    an FSDP run) made loadable with `optimizer.load_state_dict`."""
    groups = state.get("param_groups") or []
    if not any(isinstance(i, str) for group in groups for i in group.get("params", [])):
        return state
    index = {n: i for i, n in enumerate(names)}

    def position(name: str) -> int:
        if name not in index:
            raise KeyError(f"the optimizer state names parameter {name!r}, which this model's optimizer does not have")
        return index[name]

    return {
        "state": {position(n): value for n, value in state.get("state", {}).items()},
        "param_groups": [{**group, "params": [position(n) for n in group["params"]]} for group in groups],
    }


def optimized_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The model's name for each parameter, in the optimizer's order (how the two optimizer
    state layouts translate into each other); "" for a parameter the model does not own."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(p), "") for group in optimizer.param_groups for p in group["params"]]


def check_training_state(
    state: Any, model: nn.Module, optimizer: torch.optim.Optimizer, *, sharded: bool = False, strict: bool = True
) -> None:
    """Raise CheckpointError unless `state` (a `BaseTrainer.state_dict()`) fits `model`
    (unwrapped) and `optimizer`: counters are integers >= 0, model tensors have the model's
    names and shapes, the optimizer has as many groups and parameters, and its state
    tensors the shapes they must have. `sharded`: model and optimizer come from DCP
    shards, which DCP checks against the live sharded state itself. `strict=False` (as in
    `StateDictOptions(strict=False)`) allows missing and unexpected model keys."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"a trainer state must be a dict from state_dict(); got {type(state).__name__}")
    missing = [k for k in ("step", "model", "optimizer") if k not in state]
    if missing:
        raise CheckpointError(f"the state has no {', '.join(map(repr, missing))} (keys: {', '.join(map(str, state))})")
    for counter, minimum in (("step", 0), ("epoch", 0), ("batch_in_epoch", 0), ("world_size", 1)):
        value = state.get(counter, minimum)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise CheckpointError(f"state[{counter!r}] is {value!r}; it must be an integer >= {minimum}")
    ranks = state.get("ranks")
    if ranks is not None and (
        not isinstance(ranks, list)
        or len(ranks) != state.get("world_size", 1)
        or not all(isinstance(r, Mapping) for r in ranks)
    ):
        raise CheckpointError(
            f"state['ranks'] must list one dict per process of the saved run ({state.get('world_size', 1)})"
        )
    if sharded:
        return
    _check_model_state(state["model"], model, strict)
    _check_optimizer_state(state["optimizer"], model, optimizer)


def _check_model_state(saved: Any, model: nn.Module, strict: bool) -> None:
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"state['model'] must be a dict of tensors; got {type(saved).__name__}")
    live = model.state_dict()  # for FSDP2 DTensors: their global shapes, nothing is gathered
    missing = [k for k in live if k not in saved]
    unexpected = [k for k in saved if k not in live]
    if strict and (missing or unexpected):
        parts = [
            f"missing {', '.join(map(repr, missing[:5]))}" if missing else "",
            f"unexpected {', '.join(map(repr, unexpected[:5]))}" if unexpected else "",
        ]
        raise CheckpointError(f"the model state does not fit this model: {'; '.join(p for p in parts if p)}")
    for key, expected in live.items():
        if isinstance(expected, torch.Tensor) and key in saved:
            _check_tensor(f"model.{key}", saved[key], expected)


def _check_optimizer_state(saved: Any, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    if (
        not isinstance(saved, Mapping)
        or not isinstance(saved.get("state"), Mapping)
        or not isinstance(saved.get("param_groups"), list)
    ):
        return  # another layout (e.g. flattened through your own state_dict_options): DCP's to check
    try:
        saved = optimizer_state_by_index(saved, optimized_param_names(model, optimizer))
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"the optimizer state does not fit this optimizer: {err}") from None
    groups = saved["param_groups"]
    live_groups = optimizer.param_groups
    if len(groups) != len(live_groups):
        raise CheckpointError(
            f"the optimizer state has {len(groups)} parameter group(s), the optimizer {len(live_groups)}"
        )
    params = [p for group in live_groups for p in group["params"]]
    for i, (group, live_group) in enumerate(zip(groups, live_groups, strict=True)):
        if (
            not isinstance(group, Mapping)
            or not isinstance(group.get("params"), list)
            or len(group["params"]) != len(live_group["params"])
        ):
            count = (
                len(group["params"]) if isinstance(group, Mapping) and isinstance(group.get("params"), list) else "no"
            )
            raise CheckpointError(
                f"optimizer param_groups[{i}] has {count} parameters, the optimizer's {len(live_group['params'])}"
            )
    shaped_like_params = type(optimizer) in PARAMETER_SHAPED_STATE
    for index, entry in saved["state"].items():
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(params):
            raise CheckpointError(
                f"the optimizer state refers to parameter #{index!r}; the optimizer has {len(params)}"
            )
        if not isinstance(entry, Mapping):
            raise CheckpointError(f"optimizer state[{index}] must be a dict; got {type(entry).__name__}")
        live_entry = optimizer.state.get(params[index], {})
        for name, value in entry.items():
            if not isinstance(value, torch.Tensor):
                continue
            key = f"optimizer.state.{index}.{name}"
            if isinstance(live_entry.get(name), torch.Tensor):
                _check_tensor(key, value, live_entry[name])
            elif shaped_like_params and value.ndim > 0:
                _check_tensor(key, value, params[index])


def _check_tensor(key: str, saved: Any, expected: torch.Tensor) -> None:
    if not isinstance(saved, torch.Tensor):
        raise CheckpointError(
            f"{key} is a {type(saved).__name__} in the checkpoint; "
            f"the model has a tensor of shape {tuple(expected.shape)}"
        )
    if saved.shape != expected.shape:
        raise CheckpointError(
            f"{key} has shape {tuple(saved.shape)} in the checkpoint, but {tuple(expected.shape)} here"
        )
    if saved.is_floating_point() != expected.is_floating_point() or saved.is_complex() != expected.is_complex():
        raise CheckpointError(f"{key} is {saved.dtype} in the checkpoint, but {expected.dtype} here")


def state_dict_options(user_options: Any, model: nn.Module, sharded: bool) -> Any:
    """The `StateDictOptions` to get/set `model`'s state through DCP with, or None for the
    modules' own state dicts. Sharded: each rank's DTensor shards. FSDP2 otherwise: full
    state gathered on CPU (rank 0 keeps it, the others get empty dicts), one portable file
    that loads onto any number of processes, with or without FSDP. `user_options` (the
    trainer's `state_dict_options`) wins when not sharded."""
    if user_options is not None and not sharded:
        return user_options
    if not (sharded or distributed.is_fsdp2(model)):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if sharded:
        return StateDictOptions(full_state_dict=False)
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def get_model_and_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, options: Any
) -> tuple[dict, dict]:
    """`(model state, optimizer state)`: the unwrapped module's and the optimizer's own state
    dicts, or DCP's `get_state_dict` with `options` (see `state_dict_options`)."""
    if options is not None:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        return get_state_dict(model, optimizer, options=options)
    return unwrap(model).state_dict(), optimizer.state_dict()


def set_model_and_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: Mapping, optim_state: Mapping, options: Any
) -> None:
    """Load what `get_model_and_optimizer_state` returned (the optimizer state in either
    layout: it is translated to the one the loader expects, by parameter name)."""
    names = optimized_param_names(unwrap(model), optimizer)
    if options is None:
        unwrap(model).load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state_by_index(optim_state, names))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if options.full_state_dict:
        # Every rank read the whole checkpoint: each takes its shard, no broadcast.
        options = StateDictOptions(**{**vars(options), "cpu_offload": False, "broadcast_from_rank0": False})
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optimizer_state_by_name(optim_state, names),
        options=options,
    )


def training_state(
    step: int,
    cursor: DataCursor,
    world: int,
    model_state: dict,
    optimizer_state: dict,
    *,
    lr_scheduler: Any,
    grad_scaler: Any,
) -> dict[str, Any]:
    """The trainer's `state_dict()` layout (the checkpoint format's `state`): counters, the
    data position, model/optimizer/scheduler/scaler state, this rank's RNG and loader
    state, an empty `"hooks"` for the hooks to fill, and, with several processes, every
    rank's RNG and loader state under `"ranks"` (a collective gather)."""
    local = {"rng": rng_state(), **cursor.state()}
    state: dict[str, Any] = {
        "step": step,
        "epoch": cursor.epoch,
        "batch_in_epoch": cursor.batch_in_epoch,
        "world_size": world,
        "data_position": cursor.position(world),
        "model": model_state,
        "optimizer": optimizer_state,
        "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
        "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
        **local,
        "hooks": {},
    }
    if world > 1:
        state["ranks"] = distributed.gather_objects(local)
    return state


def restore_training_state(
    state: Mapping[str, Any], *, cursor: DataCursor, world: int, lr_scheduler: Any, grad_scaler: Any
) -> None:
    """Put back what `training_state` saved, apart from the model, the optimizer and the
    step: scheduler, scaler, this rank's data position and RNG streams (rank 0's for a rank
    the saved run did not have). Onto another number of processes the data position moves
    (`DataCursor.move`) instead of taking the per-rank loader states."""
    if lr_scheduler is not None and state.get("lr_scheduler") is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    if grad_scaler is not None and state.get("grad_scaler") is not None:
        grad_scaler.load_state_dict(state["grad_scaler"])
    epoch, batch_in_epoch = int(state.get("epoch", 0)), int(state.get("batch_in_epoch", 0))
    saved_world = int(state.get("world_size", 1))
    ranks = state.get("ranks") or [state]
    rank = distributed.get_rank()
    local = ranks[rank] if rank < len(ranks) else ranks[0]
    if saved_world == world:
        cursor.restore(epoch, batch_in_epoch, state.get("data_position"), local.get("data_loader"))
    else:
        cursor.move(epoch, batch_in_epoch, state.get("data_position"), saved_world, world)
    if local.get("rng") is not None:
        set_rng_state(local["rng"])
