"""torch.distributed helpers: joining the process group torchrun describes, wrapping the
model (DDP or FSDP2), who am I, reductions that every backend supports, agreement between
ranks, and skipping gradient all-reduce on accumulation micro-steps.

Everything here degrades to the single-process answer when no process group is
initialised, so the trainer calls it unconditionally.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .utils import check_int

__all__ = [
    "PARALLELISM",
    "INIT_TIMEOUT",
    "note_failed_run",
    "launched_world",
    "rank_and_world",
    "init_from_env",
    "resolve_parallelism",
    "is_wrapped",
    "is_fsdp2",
    "wrap_model",
    "default_fsdp_units",
    "broadcast_object",
    "gather_objects",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "collective_device",
    "all_reduce_sum",
    "union_of_names",
    "agree_max",
    "check_process_limit",
    "prepare_model",
    "barrier",
    "gradient_sync",
    "all_reduce_gradients",
]


logger = logging.getLogger("mini_trainer")

#: What `BaseTrainer(parallelism=...)` accepts.
PARALLELISM = (None, "auto", "ddp", "fsdp")


# ---------------------------------------------------------------------------- joining


def launched_world() -> int:
    """The number of processes this run has: the process group's size once initialised,
    otherwise what a launcher (torchrun, SLURM via torchrun) put in WORLD_SIZE, else 1."""
    if is_distributed():
        return dist.get_world_size()
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size), also before the process group exists (from torchrun's
    environment), so that data loaders built first already shard for their rank."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    try:
        return int(os.environ.get("RANK", "0")), launched_world()
    except ValueError:
        return 0, 1


#: Seconds `init_from_env` waits for every process to join (the trainer's default; set it
#: before `build()` for ranks that start far apart). Processes torchrun starts together
#: arrive within seconds; torch's default (30 minutes on gloo) would make a group that
#: cannot form (a process died before joining) a half-hour wait.
INIT_TIMEOUT = 300.0


def init_from_env(device: torch.device, timeout: float | None = None, init_timeout: float | None = None) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
    environment): NCCL for CUDA devices, gloo otherwise. Does nothing and returns False when
    a group already exists or no launcher set WORLD_SIZE. The group is destroyed at exit.

    `timeout`: seconds a collective may wait (None: torch's default); `init_timeout`:
    seconds to wait for every process to join, then raise (None: `INIT_TIMEOUT`)."""
    if is_distributed() or "WORLD_SIZE" not in os.environ or not dist.is_available():
        return False
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {', '.join(missing)} is not: start the "
            "processes with torchrun (it sets all of them), or initialise the process group yourself"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    collective = datetime.timedelta(seconds=timeout) if timeout is not None else _default_timeout(backend)
    joining = datetime.timedelta(seconds=INIT_TIMEOUT if init_timeout is None else init_timeout)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        store = _join_store(rank, world, joining)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=joining, **kwargs)
    except RuntimeError as err:  # a store or connect timeout, a peer that went away
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        raise RuntimeError(
            f"rank {rank} could not join the process group of {world} processes within "
            f"{joining.total_seconds():.0f}s{f' (torchrun attempt {attempt})' if attempt else ''}: another "
            f"process did not start or died before joining (see its log). {type(err).__name__}: {err}"
        ) from err
    if joining != collective:  # joining is bounded; collectives get the usual patience
        dist.distributed_c10d._set_pg_timeout(collective)
        store.set_timeout(collective)
    atexit.register(_destroy_at_exit)
    return True


def _default_timeout(backend: str) -> datetime.timedelta:
    from torch.distributed import constants

    nccl = getattr(constants, "default_pg_nccl_timeout", None)
    return nccl if backend == "nccl" and nccl is not None else constants.default_pg_timeout


def _join_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """The store in torchrun's environment (what init_process_group's env:// makes), with
    keys of its own for each restart of the workers under torchrun.

    torchrun's agent (c10d rendezvous, e.g. `--standalone`; TORCHELASTIC_USE_AGENT_STORE)
    keeps one TCPStore for the whole job and hands it to every restart of the workers. The
    keys a process group writes there while forming (gloo: each rank's address; NCCL: its
    unique id) are the same each time, so a restarted rank may read the address of a dead
    rank of the previous attempt: its connect is refused (exit 1), or both ranks wait for
    the other to connect, forever (gloo's wait there has no timeout). The agent counts the
    restarts of its workers (TORCHELASTIC_RESTART_COUNT); with several nodes the counts
    agree when every node's workers fail and restart together."""
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
    prefix = "default_pg"  # init_process_group's own
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True):
        prefix = f"mini_trainer/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{prefix}"
    return dist.PrefixStore(prefix, store)


_failed_run = False


def note_failed_run() -> None:
    """Record that training on this rank ended with an error (not an agreed exit such as
    a preemption's SystemExit): the teardown at exit then does not wait for the others,
    which may be blocked in a collective this rank will never join. The trainer calls it,
    so a script that catches the error and exits with sys.exit(1) is covered too."""
    global _failed_run
    _failed_run = True


def _destroy_at_exit() -> None:
    """Tear the group down while the interpreter is still whole (gloo's worker threads
    must not outlive it), once every rank is done communicating; never raise at exit."""
    if not is_distributed():
        return
    try:
        # Not when the process dies of an uncaught exception (sys.exit(), and so the exit
        # 143 of a preemption, still waits): another rank may be blocked in a collective
        # this one never joins. The barrier's gloo work would wait for that rank, past
        # the barrier's own timeout, and freeing the group waits for that work: neither
        # process would exit, and torchrun, which restarts the group when one does, would
        # never know (seen: 30+ minutes).
        if getattr(sys, "last_value", None) is None and not _failed_run:
            barrier(timeout=30.0)  # a rank still sending would otherwise talk to a closed peer
        dist.destroy_process_group()
    except Exception as err:  # noqa: BLE001 - the run's work is done; report and exit
        logger.warning("could not tear down the process group cleanly at exit: %s", err)


def resolve_parallelism(parallelism: str | None, model: nn.Module) -> str | None:
    """What to wrap the model in: None, "ddp" or "fsdp". "auto" is DDP when there is more
    than one process and nothing otherwise; a model that is already wrapped stays as it is."""
    if parallelism not in PARALLELISM:
        raise ValueError(f"parallelism must be one of {', '.join(map(repr, PARALLELISM))}; got {parallelism!r}")
    if parallelism is None or is_wrapped(model):
        return None
    if parallelism == "auto":
        return "ddp" if get_world_size() > 1 else None
    if not is_distributed():
        # `python train.py` with parallelism="ddp"/"fsdp": one process, nothing to shard
        # or synchronise; the same config then runs unchanged under torchrun.
        return None
    return parallelism


def is_wrapped(model: nn.Module) -> bool:
    """Whether `model` already synchronises gradients itself (DDP, FSDP1, FSDP2)."""
    from torch.nn.parallel import DistributedDataParallel

    inner = getattr(model, "_orig_mod", model)  # through torch.compile
    return (
        isinstance(inner, DistributedDataParallel)
        or type(inner).__name__ == "FullyShardedDataParallel"
        or is_fsdp2(inner)
    )


def is_fsdp2(model: nn.Module) -> bool:
    """Whether `fully_shard` was applied to `model` or one of its submodules."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - very old torch
        return False
    inner = getattr(model, "_orig_mod", model)
    return any(isinstance(m, FSDPModule) for m in inner.modules())


def module_for_evaluation(model: nn.Module) -> nn.Module:
    """The module evaluation runs forwards on: DDP's inner module (DDP's own forward may
    broadcast buffers, a collective that ranks with different numbers of evaluation batches
    would not all reach); any other model as it is (FSDP2 needs its all-gathers)."""
    from torch.nn.parallel import DistributedDataParallel

    inner = getattr(model, "_orig_mod", model)  # through torch.compile
    return inner.module if isinstance(inner, DistributedDataParallel) else model


def default_fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The submodules that get their own `fully_shard` by default: the items of the
    outermost `nn.ModuleList`/`nn.Sequential` that hold parameters (a transformer's blocks,
    an MLP's layers), so that parameters are gathered one unit at a time and freed after
    it. A model without such a container is sharded as one unit (the root)."""
    containers = [model] if isinstance(model, (nn.ModuleList, nn.Sequential)) else []
    if not containers:
        queue = list(model.children())
        while queue and not containers:
            containers = [m for m in queue if isinstance(m, (nn.ModuleList, nn.Sequential))]
            if not containers:
                queue = [child for m in queue for child in m.children()]
    return [item for container in containers for item in container if any(True for _ in item.parameters())]


def check_process_limit(owner: str, limit: int | None, reason: str) -> None:
    """NotImplementedError before anything is built when this launch has more processes than
    `owner` (a trainer class) supports, with `reason` (its `max_processes_reason`)."""
    check_int(f"{owner}.max_processes", limit, minimum=1, allow_none=True)
    world = launched_world()  # known under torchrun before the process group exists
    if limit is not None and world > limit:
        allowed = "one process" if limit == 1 else f"at most {limit} processes"
        raise NotImplementedError(f"{owner} runs on {allowed}, and this run has {world}: {reason or 'no more'}")


def prepare_model(
    model: nn.Module,
    parallelism: str | None,
    device: torch.device,
    *,
    fsdp_units: Callable[[nn.Module], bool] | tuple[type, ...] | None,
    parallel_kwargs: Mapping[str, Any],
    optimizer_given: bool,
) -> tuple[nn.Module, str | None]:
    """`model` on `device`, wrapped as `parallelism` resolves here (see
    `resolve_parallelism`); returns it and what it was wrapped in (None, "ddp", "fsdp")."""
    parallel = resolve_parallelism(parallelism, model)
    if parallel == "fsdp" and optimizer_given:
        raise TypeError(
            "parallelism='fsdp' replaces the model's parameters with sharded ones, so a ready "
            "optimizer= would update the old ones: override build_optimizer() (or use "
            "optimizer_cfg in a config) so that the trainer builds it after sharding"
        )
    model = model.to(device)
    if parallel is not None:
        model = wrap_model(model, parallel, device, fsdp_units=fsdp_units, parallel_kwargs=parallel_kwargs)
    return model, parallel


def wrap_model(
    model: nn.Module,
    parallelism: str,
    device: torch.device,
    *,
    fsdp_units: Callable[[nn.Module], bool] | tuple[type, ...] | None = None,
    parallel_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """`DistributedDataParallel(model)` or FSDP2: `fully_shard` on each unit (see
    `default_fsdp_units`; or the modules for which `fsdp_units(module)` is true, or that
    are instances of the classes in `fsdp_units`), then on the root. `parallel_kwargs` go
    to `DistributedDataParallel(...)` or to every `fully_shard(...)` call."""
    kwargs = dict(parallel_kwargs or {})
    if parallelism == "ddp":
        if device.type == "cuda":
            kwargs.setdefault("device_ids", [device.index])
        return nn.parallel.DistributedDataParallel(model, **kwargs)
    if parallelism != "fsdp":
        raise ValueError(f"parallelism must be 'ddp' or 'fsdp' to wrap a model; got {parallelism!r}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    kwargs.setdefault("mesh", init_device_mesh(device.type, (get_world_size(),)))
    if fsdp_units is None:
        units = default_fsdp_units(model)
    elif isinstance(fsdp_units, tuple):
        units = [m for m in model.modules() if m is not model and isinstance(m, fsdp_units)]
    else:
        units = [m for m in model.modules() if m is not model and fsdp_units(m)]
    # Innermost first: fully_shard on a parent must see its children already sharded, so
    # that their parameters stay theirs.
    for unit in reversed(units):
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return model


# ---------------------------------------------------------------------------- who am I


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def collective_device() -> torch.device:
    """The device tensors must live on for this process group's collectives."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (returns the input unchanged in a single process)."""
    if is_distributed():
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def agree_max(value: int) -> int:
    """The largest `value` over ranks: every rank takes the same decision (e.g. "a rank got
    SIGTERM: all save and stop") at the same step. MAX works on gloo and NCCL alike."""
    if not is_distributed() or get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def barrier(timeout: float | None = None) -> bool:
    """Wait for every rank; False when `timeout` seconds passed first (the others may be
    gone). A no-op in a single process."""
    if not is_distributed() or get_world_size() == 1:
        return True
    work = dist.barrier(async_op=True)
    if timeout is None:
        work.wait()
        return True
    try:
        return bool(work.wait(timeout=datetime.timedelta(seconds=timeout)))
    except RuntimeError:  # gloo raises on timeout
        return False


def broadcast_object(value: Any, src: int = 0) -> Any:
    """`value` as rank `src` has it, on every rank (pickled: only for our own small
    decisions, such as which checkpoint to load)."""
    if not is_distributed() or get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, device=_object_device())
    return box[0]


def gather_objects(value: Any) -> list[Any] | None:
    """Every rank's `value`, in rank order, on rank 0 (None elsewhere)."""
    if not is_distributed() or get_world_size() == 1:
        return [value]
    gathered: list[Any] | None = [None] * get_world_size() if get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def _object_device() -> torch.device | None:
    return collective_device() if dist.get_backend() == "nccl" else None


def union_of_names(names: list[str]) -> list[str]:
    """Every rank's metric names, in one agreed order, so that reductions line up even
    when a record exists on some ranks only."""
    if not is_distributed():
        return list(names)
    gathered: list[list[str] | None] = [None] * get_world_size()
    dist.all_gather_object(gathered, list(names))
    merged: dict[str, None] = {}
    for other in gathered:  # in rank order, the same on every rank (own names first would not be)
        merged.update(dict.fromkeys(other or []))
    return list(merged)


def all_reduce_gradients(model: nn.Module, params: list[torch.Tensor]) -> None:
    """Average `params`' gradients over ranks by hand, for an accumulation step whose
    synchronising backward never ran. Every rank must call it at the same step."""
    if not is_distributed() or get_world_size() == 1:
        return
    if hasattr(model, "set_requires_gradient_sync"):
        raise RuntimeError(
            "FSDP2 cannot finish an accumulation step whose last micro-step returned no loss: "
            "return a loss on the last micro-step (e.g. 0 * model-output.sum())"
        )
    if not hasattr(model, "no_sync"):
        return  # not a DDP/FSDP1 wrapper: this model never syncs gradients itself
    for p in params:
        if p.grad is None:  # unused on this rank but maybe not on others: same collectives everywhere
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    for grad in grads:
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
    torch._foreach_div_(grads, float(get_world_size()))


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside, backward passes all-reduce gradients only when `enabled`.

    DDP and FSDP1 expose `no_sync()`; FSDP2 (`fully_shard`) modules expose
    `set_requires_gradient_sync()` instead, and forgetting it would silently sync on every
    micro-step. Plain modules need nothing.
    """
    if enabled:
        yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):  # DDP, FSDP1
        with model.no_sync():
            yield
    else:
        yield
