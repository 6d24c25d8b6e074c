"""WandbHook: send `trainer.log()` records and `trainer.log_images()` images to a Weights &
Biases run, on the main process only, and keep one W&B run across resumes.

What decides how the run starts (`wandb.init`), strongest first:

1. the hook's own keyword arguments (`WandbHook(mode="online", id=...)`), passed as given;
2. `WANDB_*` environment variables (`WANDB_MODE`, `WANDB_DIR`, `WANDB_RUN_ID`, `WANDB_RESUME`,
   ...) and wandb's settings files, read by wandb itself;
3. the hook's defaults, used only where 1. and 2. say nothing:
   - `mode="offline"` when no W&B credentials are configured (no `WANDB_API_KEY`, no entry
     for the server in the netrc file, no key in wandb's settings): training never waits
     on a login prompt or the network; `wandb sync <run directory>` uploads the run later;
   - `dir=trainer.workspace`, so the run's files (`<workspace>/wandb/...`) sit with the
     checkpoints;
   - `id=<the run id saved in the checkpoint>` and `resume="allow"`, so a resumed training
     continues the same W&B run.
"""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..builder import REGISTRY
from ..distributed import is_main_process
from ..images import as_image_list, is_image_batch, to_pil
from ..plain import json_safe, to_plain
from ..utils import check_flag, flatten_dict
from .base import BaseHook

if TYPE_CHECKING:
    from ..trainer import BaseTrainer

logger = logging.getLogger("mini_trainer")

_STATE_KEY = "wandb"
_DEFAULT_HOST = "https://api.wandb.ai"


@REGISTRY.register()
class WandbHook(BaseHook):
    """Log to Weights & Biases: every `trainer.log()` record and `trainer.log_images()` image
    at the trainer's step, from the main process only (other ranks never import wandb).

    Args:
        project: the W&B project (None: wandb's default, or `WANDB_PROJECT`).
        name: the run's display name (None: wandb makes one up).
        config: the run's config (hyperparameters), a dict; values wandb cannot store as
            JSON (modules, paths, dtypes...) are stored as their `str()`.
        tags: a tag or a list of tags (None: no tags).
        resume_run: when training resumes from a checkpoint, continue the W&B run it was
            saved from (the run id is part of the checkpoint). False: a new run each time.
        **init_kwargs: anything else for `wandb.init` (`entity`, `group`, `mode`, `dir`,
            `id`, `resume`, `settings`, ...); given here, they win over environment
            variables and over the hook's defaults.

    The run starts when training starts (after a checkpoint restore, so it knows the run
    id to continue), or at the first log if that comes earlier (an evaluation before
    training). It is finished when training ends (`exit_code=1` if it failed, the exit code
    of a `SystemExit`); a log after that (an evaluation after training) reopens the same
    run. A run you started yourself with `wandb.init()` before is used as it is: the hook
    logs to it and leaves configuring and finishing it to you.

    Steps: each record is logged with `step=trainer.step`; W&B refuses a step lower than
    one the run already holds.

    - During training that happens after a resume: `LoggingHook` logs again the steps
      between the checkpoint and the crash, which the run already holds (with the same
      values: a resume is exact). Such records are skipped, with one warning.
    - Outside training (an evaluation logged after training, into the reopened run), the
      record is new: it goes to the lowest step W&B accepts, with the trainer's step in
      `trainer/step`.

    (An offline run that is resumed or reopened continues in a new local directory, which
    accepts any step; `wandb sync` uploads the directories of one run in order.)
    """

    # Finish the run after every other hook has logged its last records (LoggingHook flushes
    # in on_after_train / on_exception at priority 0).
    priority = {"on_after_train": 90, "on_exception": 90, "default": 0}

    def __init__(
        self,
        project: str | None = None,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        tags: str | Sequence[str] | None = None,
        *,
        resume_run: bool = True,
        **init_kwargs: Any,
    ) -> None:
        for arg, value in (("project", project), ("name", name)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise TypeError(
                    f"WandbHook.{arg} must be a non-empty string or None; got {type(value).__name__} {value!r}"
                )
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"WandbHook.config must be a dict or None; got {type(config).__name__} {config!r}")
        check_flag("WandbHook.resume_run", resume_run)
        self.project = project
        self.name = name
        self.config = json_safe(config, non_finite_as_text=True) if config is not None else None
        self.tags = _check_tags(tags)
        self.resume_run = resume_run
        self.init_kwargs = dict(init_kwargs)
        self.run: Any = None  # the wandb Run while one is open (main process only)
        self.run_id: str | None = None  # of the current or last run; saved with checkpoints
        self._saved_run_id: str | None = None  # from the checkpoint being resumed
        self._min_step = 0  # W&B refuses steps below this
        self._training = False
        self._owns_run = True  # False: the user's own wandb.init() run, not ours to finish
        self._warned_old_step = False

    # ------------------------------------------------------------------ events

    def on_before_train(self, trainer: BaseTrainer) -> None:
        self._training = True
        if is_main_process():
            self._ensure_run(trainer)

    def on_log(self, trainer: BaseTrainer, records: Mapping[str, Any], dry_run: bool = False) -> None:
        if dry_run or not is_main_process():
            return
        data = {key: to_plain(value) for key, value in flatten_dict(records, sep="/").items()}
        self._log(trainer, data)

    def on_log_images(self, trainer: BaseTrainer, records: Mapping[str, Any], dry_run: bool = False) -> None:
        if dry_run or not is_main_process():
            return
        import wandb

        data: dict[str, Any] = {}
        for name, value in records.items():
            if is_image_batch(value):
                data[name] = [wandb.Image(image) for image in as_image_list(value, name)]
            else:
                data[name] = wandb.Image(to_pil(value, name))
        self._log(trainer, data)

    def on_state_dict(self, trainer: BaseTrainer, state_dict: dict[str, Any]) -> None:
        state_dict["hooks"][_STATE_KEY] = {"run_id": self.run_id}

    def on_load_state_dict(self, trainer: BaseTrainer, state_dict: Mapping[str, Any]) -> None:
        saved = (state_dict.get("hooks") or {}).get(_STATE_KEY) or {}
        self._saved_run_id = saved.get("run_id") if self.resume_run else None
        if self.run is not None and self._owns_run and self._saved_run_id and self._chosen_run_id() != self.run.id:
            # A log before the restore (an evaluation before train()) opened a new run: close
            # it, so the rest of training goes to the run the checkpoint belongs to.
            logger.warning(
                "WandbHook: W&B run %s was opened before the checkpoint was restored; it is finished, "
                "and training continues in the checkpoint's run %s",
                self.run.id, self._saved_run_id,
            )
            self._finish_safely(exit_code=0)

    def on_after_train(self, trainer: BaseTrainer) -> None:
        self._training = False
        self._finish_safely(exit_code=0)

    def on_exception(self, trainer: BaseTrainer, error: BaseException) -> None:
        # A SystemExit carries the process's exit code (e.g. 143: preempted and saved);
        # sys.exit() and sys.exit(0) are successes.
        self._training = False
        if isinstance(error, SystemExit):
            code = 0 if error.code is None else error.code if isinstance(error.code, int) else 1
        else:
            code = 1
        self._finish_safely(exit_code=code)

    # ------------------------------------------------------------------ the run

    def _ensure_run(self, trainer: BaseTrainer) -> Any:
        if self.run is not None:
            return self.run
        import wandb

        if wandb.run is not None:
            # wandb.init() would return that run anyway (its reinit="return_previous"); say so.
            logger.info("WandbHook: logging to the W&B run %s started before training", wandb.run.id)
            self.run, self._owns_run = wandb.run, False
        else:
            self.run, self._owns_run = wandb.init(**self.wandb_init_kwargs(trainer)), True
        self.run_id = self.run.id
        try:
            self._min_step = int(self.run.step)  # > 0 when an online run resumed
        except Exception:  # noqa: BLE001 - e.g. shared mode has no step; wandb then checks
            self._min_step = 0
        return self.run

    def wandb_init_kwargs(self, trainer: BaseTrainer) -> dict[str, Any]:
        """The keyword arguments the hook passes to `wandb.init` (see the module docstring
        for what wins over what)."""
        kwargs: dict[str, Any] = {"project": self.project, "name": self.name, "config": self.config, "tags": self.tags}
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        kwargs.update(self.init_kwargs)
        if (
            not self._user_set(kwargs, "mode", "mode", "WANDB_MODE")
            and _default_mode_is_online()
            and not wandb_credentials_configured()
        ):
            kwargs["mode"] = "offline"
        if trainer.workspace is not None and not self._user_set(kwargs, "dir", "root_dir", "WANDB_DIR"):
            trainer.workspace.mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(trainer.workspace)
        run_id = self._chosen_run_id()
        if run_id is not None and not self._user_set(kwargs, "id", "run_id", "WANDB_RUN_ID"):
            kwargs["id"] = run_id
        # An id that may exist already: continue that run (wandb's default would refuse or
        # overwrite it, depending on the server).
        if run_id is not None and not self._user_set(kwargs, "resume", "resume", "WANDB_RESUME"):
            kwargs["resume"] = "allow"
        return kwargs

    def _chosen_run_id(self) -> str | None:
        """The run id to open, when it is ours to choose: WANDB_RUN_ID or an explicit `id`
        win; then the checkpoint's; then this hook's previous run (reopened after training)."""
        explicit = self.init_kwargs.get("id") or os.environ.get("WANDB_RUN_ID")
        return explicit or self._saved_run_id or self.run_id

    def _user_set(self, kwargs: Mapping[str, Any], keyword: str, setting: str, env: str) -> bool:
        """Whether the user chose this already: a keyword, a field of `settings=`, or an
        environment variable (which wandb reads itself)."""
        if kwargs.get(keyword) is not None or os.environ.get(env):
            return True
        settings = kwargs.get("settings")
        fields_set = getattr(settings, "model_fields_set", None) or (
            settings.keys() if isinstance(settings, Mapping) else ()
        )
        return setting in fields_set

    def _log(self, trainer: BaseTrainer, data: dict[str, Any]) -> None:
        if not data:
            return
        run = self._ensure_run(trainer)
        step = trainer.step
        if step < self._min_step:
            if self._training:
                if not self._warned_old_step:
                    self._warned_old_step = True
                    logger.warning(
                        "WandbHook: step %d is below step %d, already logged to W&B run %s (steps logged "
                        "again after a resume): such records are not sent again",
                        step, self._min_step, run.id,
                    )
                return
            data = {**data, "trainer/step": step}
            step = self._min_step
        run.log(data, step=step)
        self._min_step = step  # the same step again is fine: W&B merges it into that row

    def _finish_safely(self, exit_code: int) -> None:
        # A logging back end that fails to close must not cost the run its final checkpoint
        # (CheckpointingHook saves after this hook) or replace the training error.
        try:
            self._finish(exit_code=exit_code)
        except Exception as error:  # noqa: BLE001
            logger.error("WandbHook: could not finish the W&B run: %s", error)

    def _finish(self, exit_code: int) -> None:
        run, self.run = self.run, None
        if run is not None and self._owns_run:
            run.finish(exit_code=exit_code)


# ---------------------------------------------------------------------------- helpers


def wandb_credentials_configured() -> bool:
    """Whether wandb would find credentials for its server without asking: `WANDB_API_KEY`
    or `WANDB_IDENTITY_TOKEN_FILE`, an entry in the netrc file (`wandb login` writes it), or
    an API key in wandb's settings. Never prompts and never touches the network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        # wandb's own lookup (env, netrc, settings), as wandb.init does it; internal API.
        from wandb.errors import AuthenticationError
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth
    except ImportError:  # another wandb version: check the netrc file ourselves
        return _netrc_has_key(os.environ.get("WANDB_BASE_URL") or _DEFAULT_HOST)
    try:
        host = wandb_setup.singleton().settings.base_url
        return (
            wbauth.authenticate_session(host=host, source="WandbHook", prompt=False, update_session=False)
            is not None
        )
    except AuthenticationError:
        return True  # a key is there but malformed: let wandb.init say so rather than go offline silently
    except Exception:  # noqa: BLE001 - the internal API changed: check the netrc file ourselves
        return _netrc_has_key(os.environ.get("WANDB_BASE_URL") or _DEFAULT_HOST)


def _default_mode_is_online() -> bool:
    """False when wandb's settings files already choose a mode (`wandb offline` / `wandb disabled`)."""
    try:
        from wandb.sdk import wandb_setup

        return wandb_setup.singleton().settings.mode in ("online", "run")
    except Exception:  # noqa: BLE001 - internal API of another wandb version
        return True


def _netrc_has_key(host: str) -> bool:
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        entry = netrc.netrc(path).authenticators(urlsplit(host).netloc)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def _check_tags(tags: Any) -> list[str] | None:
    if tags is None:
        return None
    if isinstance(tags, str):
        tags = [tags]
    allowed = "None, a string, or a list of non-empty strings"
    if not isinstance(tags, Sequence) or not all(isinstance(tag, str) and tag.strip() for tag in tags):
        raise TypeError(f"WandbHook.tags must be {allowed}; got {type(tags).__name__} {tags!r}")
    return list(tags)
