"""CheckpointingHook: save every N steps and at the end, resume automatically, and turn
SIGTERM/SIGINT (preemption, Ctrl-C) into "finish this step, save, exit 128+signal".

The contract users rely on: kill the process at any instant, start the same command again,
and the run ends with the same weights, bit for bit, as one that never stopped. The state
saved is `trainer.state_dict()` (model, optimizer, scheduler, scaler, counters, data-loader
position, RNG, hook states) written by `mini_trainer.checkpoint` (atomic, hashed, no pickle).
While a run trains, rank 0 holds a lock on the checkpoint directory: a second run started
into it fails at once instead of deleting and resuming from this run's checkpoints.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .. import checkpoint, distributed
from ..builder import REGISTRY
from ..utils import check_choice, check_flag, check_int, check_number, in_workspace
from .base import BaseHook
from .best_checkpoint import STATE_KEY as BEST_STATE_KEY
from .best_checkpoint import BestCheckpoint, step_metrics
from .evaluation import evaluation_results
from .exit_signals import ExitSignals, check_exit_signals

if TYPE_CHECKING:
    from ..trainer import BaseTrainer

logger = logging.getLogger("mini_trainer")
_T = TypeVar("_T")

_EXIT_CODE_FROM_SIGNAL = "128+signal"


@REGISTRY.register()
class CheckpointingHook(BaseHook):
    """Save checkpoints every `interval` steps and at the end; resume on start.

    Args:
        interval: steps between two checkpoints (None: only at the end and on a signal).
        keep_previous: how many of the newest checkpoints to keep (>= 1).
        keep_interval: also keep every checkpoint whose step is a multiple of this.
        path: the checkpoint directory; a relative path is taken inside `trainer.workspace`
            when the trainer has one. It is created, probed for writing and locked for
            this run before the first step (`CheckpointDirectoryError` otherwise: not
            writable, or in use by another run, named with its pid and host).
        load: where to resume from when training starts (a relative path is taken from the
            current directory, unlike `path`).
            "latest": the newest valid checkpoint in `path` (none: start from scratch).
            "best": the checkpoint `<path>/best` names (see `keep_best`), e.g. to evaluate
            or fine-tune the best weights of a finished run.
            a path (a checkpoint directory, another run's checkpoint directory, or a
            `.pt` state dict): start from it, unless `path` already holds a checkpoint of
            this run, which then wins, so a preempted job restarted with the same command
            continues instead of starting over.
            None: never resume; `path` must not hold checkpoints already (they would mix
            with this run's).
        exit_signals: signals that mean "save and stop": the current step finishes, a
            checkpoint is written, and the process exits with `exit_code`. A second
            signal of the same kind gets its previous behaviour (e.g. Ctrl-C twice stops
            at once; the checkpoint on disk stays valid whatever happens).
        exit_code: "128+signal" (143 for SIGTERM, 130 for SIGINT, as shells report a
            death by signal) or a fixed integer.
        exit_wait: in a distributed run, seconds to wait for the other ranks to finish
            their own save before exiting.
        save_at_end: also save when training ends normally.
        fsync: flush files to the disk before a checkpoint counts as written (switch off
            only for throwaway runs on slow network disks).
        sharded: save FSDP2 model and optimizer state as each rank's shards through
            `torch.distributed.checkpoint` (a `sharded/` directory inside the checkpoint,
            hashed in the manifest; the rest of the state as usual). No rank ever holds the
            whole model, and DCP reshards on load, so it also resumes onto another number
            of processes. False (default): rank 0 writes the full state as safetensors
            (for FSDP2, gathered on CPU): any safetensors reader opens it.
        async_save: copy the state into reused CPU buffers (pinned for CUDA tensors) and
            write, hash and fsync it in a background thread while training goes on. The
            step waits only for the copy; the cost is host memory for one more copy of the
            state. One save is in flight at a time; training's end, a signal exit and the
            next save wait for it, and a failed background write is raised there.
        keep_best: an evaluation result to keep the best checkpoint by, e.g. "val/loss"
            (an `EvalHook` must produce it). After each evaluation that improves on it,
            that step is saved, `<path>/best` names it, pruning never removes it, and its
            manifest records the metric and value. `load="best"` resumes from it.
        best_mode: "min" (lower is better) or "max".
    """

    # Restore before any other hook starts (progress and ETA then see the resumed step);
    # save after every other hook finished the step (the EMA weights saved are this step's).
    priority = {"on_before_train": -100, "default": 100}

    def __init__(
        self,
        interval: int | None = 1000,
        keep_previous: int = 2,
        keep_interval: int | None = None,
        path: str | os.PathLike = "checkpoints",
        load: str | os.PathLike | None = "latest",
        exit_signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
        exit_code: int | str = _EXIT_CODE_FROM_SIGNAL,
        exit_wait: float = 60.0,
        save_at_end: bool = True,
        fsync: bool = True,
        async_save: bool = False,
        sharded: bool = False,
        keep_best: str | None = None,
        best_mode: str = "min",
    ) -> None:
        check_int("CheckpointingHook.interval", interval, minimum=1, allow_none=True)
        check_int("CheckpointingHook.keep_previous", keep_previous, minimum=1)
        check_int("CheckpointingHook.keep_interval", keep_interval, minimum=1, allow_none=True)
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"CheckpointingHook.path must be a str or Path; got {type(path).__name__} {path!r}")
        if load is not None and not isinstance(load, (str, os.PathLike)):
            raise TypeError(
                f"CheckpointingHook.load must be 'latest', a path or None; got {type(load).__name__} {load!r}"
            )
        signals = check_exit_signals(exit_signals)
        if exit_code != _EXIT_CODE_FROM_SIGNAL:
            check_int("CheckpointingHook.exit_code", exit_code, minimum=0)
            if exit_code > 255:
                raise ValueError(
                    f"CheckpointingHook.exit_code must be '128+signal' or an integer in 0..255; got {exit_code!r}"
                )
        for flag, value in (("save_at_end", save_at_end), ("fsync", fsync), ("async_save", async_save),
                            ("sharded", sharded)):
            check_flag(f"CheckpointingHook.{flag}", value)
        if async_save and sharded:
            raise ValueError("CheckpointingHook: async_save=True with sharded=True is not supported; choose one")
        check_choice("CheckpointingHook.best_mode", best_mode, ("min", "max"))
        if keep_best is not None and (not isinstance(keep_best, str) or not keep_best):
            raise TypeError(f"CheckpointingHook.keep_best must be an evaluation result such as 'val/loss', or None; "
                            f"got {keep_best!r}")
        check_number("CheckpointingHook.exit_wait", exit_wait, allow_none=False)
        if exit_wait < 0:
            raise ValueError(f"CheckpointingHook.exit_wait must be >= 0 seconds; got {exit_wait!r}")

        self.interval = interval
        self.keep_previous = keep_previous
        self.keep_interval = keep_interval
        self.path = Path(path)
        self.load = load
        self.exit_signals = signals
        self.exit_code = exit_code
        self.exit_wait = float(exit_wait)
        self.save_at_end = bool(save_at_end)
        self.fsync = bool(fsync)
        self.async_save = bool(async_save)
        self.sharded = bool(sharded)
        self.keep_best, self.best_mode = keep_best, best_mode
        self.best = BestCheckpoint(keep_best, best_mode) if keep_best is not None else None

        self.directory: Path | None = None  # `path` resolved against the workspace
        self.last_saved: Path | None = None
        self.resumed_from: Path | None = None
        self._started = False  # resume only on the first train() of this hook
        self._last_saved_step: int | None = None
        self._saved_results: Any = None  # the evaluation results of the step last saved
        self._signals = ExitSignals(signals)
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: concurrent.futures.Future | None = None
        self._staging = checkpoint.StagingBuffers()
        self._cleaned = False
        self._lock: checkpoint.DirectoryLock | None = None

    # ------------------------------------------------------------------ events

    def on_before_train(self, trainer: BaseTrainer) -> None:
        if self.best is not None:
            self.best.check_hooks(trainer)
        self.directory = self._resolve(trainer)
        # Before any training time is spent: a directory we cannot write would lose the
        # whole run at its first save; one that another run writes would mix the two.
        _agreed(self._claim_directory)
        if not self._started:
            self._started = True
            self._resume(trainer)
        self._signals.install()

    def _claim_directory(self) -> None:
        if not distributed.is_main_process():
            return
        assert self.directory is not None
        checkpoint.prepare_directory(self.directory)
        if self._lock is None or self._lock.root != self.directory:
            self._release_directory()
            self._lock = checkpoint.DirectoryLock(self.directory)
        self._lock.acquire()

    def _release_directory(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def on_after_step(self, trainer: BaseTrainer) -> None:
        signum = self._signals.agreed()
        new_best = self.best is not None and self.best.judge(trainer)  # every rank: same results
        if signum or new_best or (self.interval is not None and trainer.step % self.interval == 0):
            self.save(trainer)
        if signum:
            self._exit(trainer, signum)

    def on_after_train(self, trainer: BaseTrainer) -> None:
        try:
            new_best = self.best is not None and self.best.judge(trainer)  # an evaluation at the end
            # Saved already at this step, but evaluated since (EvalHook's at_end): save again, so
            # that a rerun of the finished command knows this step was evaluated.
            evaluated_since = evaluation_results(trainer) is not self._saved_results
            if new_best or (self.save_at_end and (trainer.step != self._last_saved_step or evaluated_since)):
                self.save(trainer)
            signum = self._signals.agreed()
            if signum:  # arrived after the last step: the final checkpoint above has it all
                if trainer.step != self._last_saved_step:
                    self.save(trainer)
                self._exit(trainer, signum)
            self.wait()  # training is over when its last checkpoint is on disk
        finally:
            self._signals.restore()
            self._staging = checkpoint.StagingBuffers()  # give the copy's memory back between runs
            self._release_directory()

    def on_exception(self, trainer: BaseTrainer, error: BaseException) -> None:
        # No new save: a step that raised may have left the state half-updated. A save in
        # flight holds a consistent earlier snapshot: let it land.
        self._signals.restore()
        try:
            self.wait()
        except Exception as write_error:  # noqa: BLE001 - the training error is the one to raise
            logger.error("the checkpoint being written when training failed was lost: %s", write_error)
        finally:
            self._release_directory()

    # ------------------------------------------------------------------ saving

    def save(self, trainer: BaseTrainer) -> Path | None:
        """Write a checkpoint of the trainer's current state now (every rank must call it;
        the main process writes, and with `sharded` every rank writes its shard). Returns
        its directory on the main process, or None when `async_save` is writing it in the
        background (`wait()` returns it then)."""
        directory = self.directory or self._resolve(trainer)
        # One save in flight at most (its buffers are reused, and saves land in order). A
        # failed background write on rank 0 must stop every rank, not leave them waiting in
        # the gathers of state_dict() below.
        _agreed(self.wait)
        started = time.perf_counter()
        if self.sharded:
            written = self._save_sharded(trainer, directory, started)
            self._last_saved_step, self._saved_results = trainer.step, evaluation_results(trainer)
            return written
        state = trainer.state_dict()

        def write_on_main() -> Path | None:
            if not distributed.is_main_process():
                return None
            prepared = self._prepare(trainer, state)
            if not self.async_save:
                return self._write(prepared, directory, started)
            prepared = self._staging.stage(prepared)  # from here on training may change the state
            if self._writer is None:
                self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
            self._pending = self._writer.submit(self._write, prepared, directory, started)
            return None

        # Also a barrier: nobody runs ahead (or exits) before the checkpoint exists.
        written = _agreed(write_on_main)
        self._last_saved_step, self._saved_results = trainer.step, evaluation_results(trainer)
        return written

    def _save_sharded(self, trainer: BaseTrainer, directory: Path, started: float) -> Path | None:
        """Every rank writes its model/optimizer shards with DCP into one temporary
        directory; then rank 0 adds the rest, hashes everything and renames it into place."""
        state = trainer.state_dict(sharded=True)
        shards = {"model": state["model"], "optimizer": state["optimizer"]}
        state = {**state, "model": {}, "optimizer": {}, "sharded": True}
        main = distributed.is_main_process()
        temporary = _agreed(lambda: checkpoint.new_temporary(directory, trainer.step) if main else None)
        temporary = Path(distributed.broadcast_object(str(temporary) if main else None))
        checkpoint.save_sharded(shards, temporary / checkpoint.SHARDED_DIR)

        def write_on_main() -> Path | None:
            if not main:
                return None
            prepared = self._prepare(trainer, state)
            prepared.directories = (checkpoint.SHARDED_DIR,)
            return self._write(prepared, directory, started, temporary=temporary)

        return _agreed(write_on_main)

    def wait(self) -> Path | None:
        """Block until an asynchronous save in flight is on disk (raising its error if the
        write failed); returns its directory."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def _write(
        self, prepared: checkpoint.PreparedCheckpoint, directory: Path, started: float, temporary: Path | None = None
    ) -> Path:
        if not self._cleaned:
            checkpoint.remove_temporaries(directory, keep=temporary)  # what a killed run left behind
            self._cleaned = True
        written = checkpoint.write_checkpoint(prepared, directory, fsync=self.fsync, temporary=temporary)
        if "best" in prepared.manifest_extra:  # only once the checkpoint is complete on disk
            checkpoint.write_pointer(directory, checkpoint.BEST, written, fsync=self.fsync)
        best = checkpoint.read_pointer(directory, checkpoint.BEST)
        protect = [written] if best is None else [written, best]
        checkpoint.prune_checkpoints(directory, self.keep_previous, self.keep_interval, protect=protect)
        self.last_saved = written
        logger.info("saved checkpoint %s in %.2fs", written, time.perf_counter() - started)
        return written

    def _prepare(self, trainer: BaseTrainer, state: dict[str, Any]) -> checkpoint.PreparedCheckpoint:
        """The state split for writing, with this step's evaluation results (and, for the
        best checkpoint, the monitored metric) for the manifest."""
        prepared = checkpoint.prepare_checkpoint(state, self._extra_files(trainer))
        prepared.manifest_extra.update(step_metrics(trainer))
        optimizer = type(trainer.optimizer)  # the state alone does not say (`mini-trainer ckpt inspect` shows it)
        prepared.manifest_extra["optimizer_class"] = f"{optimizer.__module__}.{optimizer.__qualname__}"
        if self.best is not None and self.best.is_best(trainer.step):
            prepared.manifest_extra.update(self.best.manifest_entry())
        return prepared

    def on_state_dict(self, trainer: BaseTrainer, state_dict: dict[str, Any]) -> None:
        if self.best is not None:
            state_dict["hooks"][BEST_STATE_KEY] = self.best.state()

    def on_load_state_dict(self, trainer: BaseTrainer, state_dict: Mapping[str, Any]) -> None:
        if self.best is not None:
            self.best.restore(state_dict)

    @staticmethod
    def _extra_files(trainer: BaseTrainer) -> dict[str, str]:
        """Files of their own for hook tensors (e.g. `EmaHook` -> ema.safetensors)."""
        files: dict[str, str] = {}
        for hook in trainer.hooks:
            for prefix, name in (getattr(hook, "checkpoint_files", None) or {}).items():
                if name in files.values() or name in (checkpoint.MODEL_FILE, checkpoint.DEFAULT_FILE):
                    raise ValueError(
                        f"two hooks want their tensors in {name}: "
                        "give them different names (e.g. EmaHook(name=...))"
                    )
                files[prefix] = name
        return files

    # ------------------------------------------------------------------ resuming

    def _resolve(self, trainer: BaseTrainer) -> Path:
        return in_workspace(trainer.workspace, self.path)

    def restore_best(self, trainer: BaseTrainer) -> Path:
        """Load the best checkpoint (`<path>/best`, see `keep_best`) into `trainer`, e.g. to
        evaluate the best weights after training; every rank calls it. Returns its directory."""
        self.directory = self.directory or self._resolve(trainer)
        self._resume(trainer, self._best_source)
        assert self.resumed_from is not None
        return self.resumed_from

    def _resume(self, trainer: BaseTrainer, choose: Callable[[BaseTrainer], Any] | None = None) -> None:
        """Rank 0 chooses what to resume from (verifying it) and tells the others, so that
        every rank loads the same checkpoint even if one of them sees the files change."""
        assert self.directory is not None
        choice: tuple[str, str | None] = ("none", None)
        loaded: checkpoint.LoadedCheckpoint | None = None
        error: Exception | None = None
        if distributed.is_main_process():
            try:
                choice, loaded = (choose or self._choose_source)(trainer)
            except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
                if not distributed.is_distributed():
                    raise
                choice, error = ("error", f"{type(err).__name__}: {err}"), err
        kind, detail = distributed.broadcast_object(choice)
        if kind == "error":
            if error is not None:
                raise error
            raise checkpoint.CheckpointError(f"rank 0 could not resume: {detail}")
        if kind == "none":
            return
        source = Path(detail)
        # Every rank but 0 reads it now (rank 0 has, and hashed the DCP shard files too);
        # all agree, so that one failing read does not leave the others waiting.
        mine = loaded
        loaded = _agreed(
            lambda: mine
            if mine is not None
            else checkpoint.read_checkpoint(source, sharded=self.sharded, verify_directories=False)
        )
        state = loaded.state
        if kind == "own":
            self._last_saved_step = int(state["step"])
        if loaded.sharded_files is not None:
            self._load_shards(trainer, loaded)
        else:
            trainer.load_state_dict(state)
        self.resumed_from = source
        if self.best is not None and kind != "own":
            self.best.forget()  # another run's best is not a checkpoint in this directory
        elif self.best is not None:
            self.best.reconcile(self.directory)
        logger.info("resumed from %s at step %d (epoch %d)", source, trainer.step, trainer.epoch)

    def _choose_source(self, trainer: BaseTrainer) -> tuple[tuple[str, str | None], checkpoint.LoadedCheckpoint | None]:
        """(("own" | "load" | "none", path), checkpoint) on the main process. Only
        checkpoints that verify and fit the trainer are chosen; in this run's own directory
        an unusable newest one is skipped for the one before (with a warning)."""
        assert self.directory is not None
        if self.load is None:
            existing = checkpoint.list_checkpoints(self.directory)
            if existing:
                raise FileExistsError(
                    f"CheckpointingHook(load=None): {self.directory} already holds checkpoints "
                    f"({existing[-1][1].name}, ...) of an earlier run; use load='latest' to continue it, "
                    "or a different path to start a new run"
                )
            return ("none", None), None

        if self.load == "best":
            return self._best_source(trainer)
        own = checkpoint.latest_checkpoint(self.directory, sharded=self.sharded, check=_fits(trainer))
        if own is not None:
            return ("own", str(own.path)), own
        if self.load != "latest":
            loaded = checkpoint.read_checkpoint(Path(self.load), sharded=self.sharded, check=_fits(trainer))
            return ("load", str(loaded.path)), loaded
        logger.info("no checkpoint in %s: starting from scratch", self.directory)
        return ("none", None), None

    def _best_source(self, trainer: BaseTrainer) -> tuple[tuple[str, str | None], checkpoint.LoadedCheckpoint]:
        assert self.directory is not None
        best = checkpoint.read_pointer(self.directory, checkpoint.BEST)
        if best is None:
            raise checkpoint.CheckpointError(
                f"load='best': {self.directory} has no `best` file naming a checkpoint (keep_best was not set, "
                "or no evaluation finished)")
        return ("own", str(best)), checkpoint.read_checkpoint(best, sharded=self.sharded, check=_fits(trainer))

    @staticmethod
    def _load_shards(trainer: BaseTrainer, loaded: checkpoint.LoadedCheckpoint) -> None:
        """Read model/optimizer shards into this rank's sharded state (DCP reshards when the
        number of processes changed), then restore the whole state. The shards are read
        only from `sharded/` inside the checkpoint, never from a path the checkpoint names."""
        model_state, optim_state = trainer.model_and_optimizer_state(sharded=True)
        shards = {"model": model_state, "optimizer": optim_state}
        assert loaded.sharded_files is not None
        checkpoint.load_sharded(shards, loaded.path / checkpoint.SHARDED_DIR, loaded.sharded_files)
        trainer.load_state_dict({**loaded.state, **shards}, sharded=True)

    # ------------------------------------------------------------------ signals

    def _exit(self, trainer: BaseTrainer, signum: int) -> None:
        self.wait()
        code = 128 + signum if self.exit_code == _EXIT_CODE_FROM_SIGNAL else int(self.exit_code)
        name = signal.Signals(signum).name if signum in set(signal.valid_signals()) else str(signum)
        logger.warning(
            "%s received: saved %s at step %d; exiting with code %d",
            name,
            self.last_saved or "a checkpoint",
            trainer.step,
            code,
        )
        if not distributed.barrier(timeout=self.exit_wait):
            logger.warning("other ranks did not reach the exit within %.0fs; exiting anyway", self.exit_wait)
        trainer.should_stop = True
        self._signals.received = None  # handled: a later train() in this process starts clean
        self._signals.restore()
        raise SystemExit(code)


def _fits(trainer: BaseTrainer) -> Callable[[Any], None]:
    """A check that a checkpoint's state fits `trainer` (CheckpointError otherwise)."""
    return lambda state: trainer.check_state_dict(state, sharded=bool(state.get("sharded")))


def _agreed(action: Callable[[], _T]) -> _T:
    """Run `action` on this rank; if it fails on any rank, every rank raises (the failing
    one its own error), instead of the others waiting forever in the next collective.
    Doubles as a barrier in a distributed run; just `action()` in a single process."""
    try:
        result, error = action(), None
    except Exception as err:  # noqa: BLE001 - re-raised below, after the others know
        result, error = None, err
    if distributed.agree_max(int(error is not None)):
        if error is not None:
            raise error
        raise checkpoint.CheckpointError("another rank failed while saving or loading a checkpoint (see its log)")
    return result  # type: ignore[return-value]
