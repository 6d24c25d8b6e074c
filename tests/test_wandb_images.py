"""WandbHook against a real wandb in offline mode (the run's `.wandb` file is read back),
ImageFileLoggerHook, and the image conversions of `mini_trainer.images`."""

from __future__ import annotations

import glob
import json
import logging
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_trainer, regression_batches
from mini_trainer import REGISTRY, CheckpointingHook, LoggingHook, build_from_cfg, checkpoint
from mini_trainer.hooks import BaseHook, ImageFileLoggerHook, WandbHook
from mini_trainer.hooks import images as images_hook_module
from mini_trainer.hooks import wandb as wandb_hook_module
from mini_trainer.images import as_image_list, is_image_batch, to_pil

# ============================================================================ wandb helpers

_CLEARED_WANDB_VARS = (
    "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT",
    "WANDB_ENTITY", "WANDB_NAME", "WANDB_TAGS", "WANDB_BASE_URL", "WANDB_DIR", "WANDB_RUN_GROUP", "NETRC",
)


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """A wandb that touches nothing outside tmp_path and no network: offline, no credentials,
    no git / code / system-metrics collection, its home and config dirs in tmp_path.

    wandb reads WANDB_* variables once per process (its settings singleton), so it is torn
    down before and after: each test sees its own environment."""
    import wandb

    home = tmp_path / "home"
    home.mkdir()
    for name in _CLEARED_WANDB_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_DATA_DIR": str(home / "data"),
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_ERROR_REPORTING": "false",
        "WANDB_X_DISABLE_STATS": "true",  # no system-metrics sampler (nor its cloud-metadata probes)
        "WANDB_X_DISABLE_MACHINE_INFO": "true",
        "WANDB_CONSOLE": "off",  # leave pytest's stdout capture alone
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    wandb.teardown()
    yield tmp_path
    wandb.teardown()


def wandb_records(path: Path) -> list:
    """The records of a `.wandb` file: a LevelDB-style log (":W&B" header, 32 KiB blocks,
    each chunk `crc32 | length | type` then a serialized `wandb_internal_pb2.Record`).
    wandb 0.31 has no Python reader of its own any more (the Go core writes the file)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a .wandb file"
    # Cut at the last chunk written whole: the file may still be growing (see finished_records).
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        left_in_block = block - position % block
        if left_in_block < 7:  # a chunk header never straddles two blocks: the tail is padding
            position += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if (crc, length, kind) == (0, 0, 0):
            position += left_in_block
            continue
        chunk = data[position + 7 : position + 7 + length]
        if len(chunk) < length:
            break
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at byte {position}"
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def finished_records(path: Path, timeout: float = 10.0) -> list:
    """The records of a finished run. wandb 0.31's `run.finish()` can return (offline) a
    millisecond before wandb-core has written the file: wait for its exit record."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(path)
        if any(record.WhichOneof("record_type") == "exit" for record in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.005)


class OfflineRun:
    """What one offline run directory holds: id, history rows by step, config, exit code."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        (self.file,) = directory.glob("run-*.wandb")
        self.history: dict[int, dict] = {}
        self.config: dict = {}
        self.exit_code = None
        for record in finished_records(self.file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                self.id, self.project, self.tags = record.run.run_id, record.run.project, list(record.run.tags)
                self.start_time = (record.run.start_time.seconds, record.run.start_time.nanos)
                self.config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "history":
                self.history[record.history.step.num] = _history_row(record.history.item)
            elif kind == "exit":
                self.exit_code = record.exit.exit_code

    def metrics(self, key: str) -> dict[int, float]:
        return {step: row[key] for step, row in self.history.items() if key in row}


def _history_row(items) -> dict:
    """Media values come as one item per field, keyed by a path (`["val/batch", "count"]`)."""
    row: dict = {}
    for item in items:
        *parents, leaf = [item.key] if item.key else list(item.nested_key)
        node = row
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = json.loads(item.value_json)
    return row


def offline_runs(root: Path) -> list[OfflineRun]:
    """The offline runs under `<root>/wandb`, oldest first (directory names only have seconds)."""
    runs = [OfflineRun(Path(d)) for d in glob.glob(str(root / "wandb" / "offline-run-*"))]
    return sorted(runs, key=lambda run: run.start_time)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class ImageEveryStep(BaseHook):
    """Logs images at every step, as a forward() would."""

    def __init__(self, make_images):
        self.make_images = make_images

    def on_after_step(self, trainer):
        trainer.log_images(self.make_images(trainer.step))


def _pixels(seed: int, shape) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _expected_uint8(float_image: torch.Tensor | np.ndarray) -> np.ndarray:
    values = np.asarray(float_image, dtype=np.float32)
    return np.rint(np.clip(values, 0, 1) * 255).astype(np.uint8)


# ============================================================================ WandbHook


def test_logs_every_record_and_image_at_the_trainers_step(wandb_env, monkeypatch):
    wandb_root = wandb_env / "wandb_root"
    wandb_root.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(wandb_root))  # wins over the hook's dir=workspace
    workspace = wandb_env / "ws"
    hook = WandbHook(project="p", tags=None,
                     config={"lr": 0.1, "model": torch.nn.Linear(2, 2), "nested": {"t": torch.tensor(2.0)}})
    batch = _pixels(1, (2, 3, 5, 6))
    trainer = make_trainer(
        regression_batches(6, 4), max_steps=6, workspace=workspace,
        hooks=[LoggingHook(interval=2), hook, ImageEveryStep(lambda step: {"val/batch": batch} if step == 4 else {})],
    )
    grayscale = (np.arange(20, dtype=np.uint8) * 12).reshape(4, 5)
    trainer.log_images({"before": grayscale})  # before training: opens the run at once
    trainer.log({"eval": {"acc": torch.tensor(0.5)}})
    trainer.train()

    assert hook.run is None and hook.run_id is not None  # finished at the end of training
    assert not (workspace / "wandb").exists()
    (run,) = offline_runs(wandb_root)
    assert run.id == hook.run_id and run.project == "p" and run.tags == [] and run.exit_code == 0
    assert run.config["lr"] == 0.1 and run.config["model"].startswith("Linear(") and run.config["nested"] == {"t": 2.0}
    lines = jsonl(workspace / "metrics.jsonl")
    assert run.metrics("loss") == pytest.approx({line["step"]: line["loss"] for line in lines if "loss" in line})
    assert sorted(run.metrics("loss")) == [2, 4, 6]
    assert run.metrics("grad_norm").keys() == {2, 4, 6}
    assert run.metrics("eval/acc") == {0: 0.5}  # nested records flattened with "/", tensors as numbers

    single = run.history[0]["before"]
    assert single["_type"] == "image-file" and (single["width"], single["height"]) == (5, 4)
    assert np.array_equal(np.asarray(Image.open(run.directory / "files" / single["path"])), grayscale)
    logged_batch = run.history[4]["val/batch"]
    assert logged_batch["count"] == 2 and (logged_batch["width"], logged_batch["height"]) == (6, 5)
    for i, filename in enumerate(logged_batch["filenames"]):
        pixels = np.asarray(Image.open(run.directory / "files" / filename))
        assert np.array_equal(pixels, _expected_uint8(batch[i].permute(1, 2, 0)))


def test_lower_steps_are_skipped_in_training_and_moved_up_outside(wandb_env, caplog):
    hook = WandbHook(project="p")
    trainer = make_trainer(regression_batches(1, 4), max_steps=1, workspace=wandb_env / "ws", hooks=[hook])
    trainer.step = 4
    trainer.log({"before": 1.0})  # outside training: opens the run
    trainer.step = 2
    trainer.log({"late": 5.0})  # new data W&B would refuse at step 2: goes to step 4
    hook.on_before_train(trainer)
    trainer.step = 4
    trainer.log({"b": 2.0})  # the same step again: merged into its row
    trainer.step = 2
    with caplog.at_level(logging.WARNING, logger="mini_trainer"):
        trainer.log({"a": 9.0})  # in training: a step logged again after a resume, skipped
        trainer.log({"a": 8.0})
    trainer.step = 6
    trainer.log({"a": 3.0})
    hook.on_after_train(trainer)
    assert sum("already logged" in message for message in caplog.messages) == 1
    (run,) = offline_runs(wandb_env / "ws")  # dir=workspace when WANDB_DIR is not set
    expected = {"before": 1.0, "late": 5.0, "trainer/step": 2, "b": 2.0}
    assert {key: run.history[4][key] for key in expected} == expected
    assert run.metrics("a") == {6: 3.0}


def test_a_run_started_by_the_user_is_used_and_left_open(wandb_env):
    import wandb

    own = wandb.init(project="mine", dir=str(wandb_env))
    hook = WandbHook(project="p")
    make_trainer(regression_batches(2, 4), max_steps=2, workspace=wandb_env / "ws",
                 hooks=[LoggingHook(interval=1), hook]).train()
    assert hook.run_id == own.id and wandb.run is own  # not finished by the hook
    own.finish()
    (run,) = offline_runs(wandb_env)
    assert run.project == "mine" and sorted(run.metrics("loss")) == [1, 2]


def test_resume_continues_the_same_run_and_wandb_run_id_wins(wandb_env, monkeypatch, caplog):
    import wandb

    workspace = wandb_env / "ws"

    def train(max_steps, log_before=False):
        hook = WandbHook(project="p")
        trainer = make_trainer(regression_batches(8, 4), max_steps=max_steps, workspace=workspace,
                               hooks=[LoggingHook(interval=2), CheckpointingHook(interval=2), hook])
        if log_before:
            trainer.log({"eval": 1.0})  # opens a run before the checkpoint is restored
        trainer.train()
        return hook

    first = train(4)
    saved = checkpoint.load_checkpoint(workspace / "checkpoints" / "step_000000004")
    assert saved["hooks"]["wandb"] == {"run_id": first.run_id}
    second = train(6)
    runs = offline_runs(workspace)
    assert [run.id for run in runs] == [first.run_id] * 2 == [second.run_id] * 2
    assert sorted(runs[0].metrics("loss")) == [2, 4] and sorted(runs[1].metrics("loss")) == [6]

    with caplog.at_level(logging.WARNING, logger="mini_trainer"):
        third = train(8, log_before=True)
    early, resumed = offline_runs(workspace)[2:]
    assert early.id != first.run_id and early.metrics("eval") == {0: 1.0}
    assert resumed.id == third.run_id == first.run_id and sorted(resumed.metrics("loss")) == [8]
    assert any("opened before the checkpoint was restored" in message for message in caplog.messages)

    monkeypatch.setenv("WANDB_RUN_ID", "fromenv1")
    wandb.teardown()  # wandb reads the environment once per process
    fourth = train(10)
    assert fourth.run_id == "fromenv1" and offline_runs(workspace)[-1].id == "fromenv1"


def test_failed_training_finishes_the_run_with_exit_code_1(wandb_env):
    def forward(model, batch):
        x, y = batch
        if forward.calls == 3:
            raise RuntimeError("boom")
        forward.calls += 1
        return torch.nn.functional.mse_loss(model(x), y), {}

    forward.calls = 0
    hook = WandbHook()
    trainer = make_trainer(regression_batches(8, 4), max_steps=8, workspace=wandb_env / "ws", forward_fn=forward,
                           hooks=[LoggingHook(interval=2), hook])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    (run,) = offline_runs(wandb_env / "ws")
    assert hook.run is None and run.exit_code == 1
    assert sorted(run.metrics("loss")) == [2, 3]  # LoggingHook's flush on the failure came first


def test_a_run_that_fails_to_finish_still_gets_its_final_checkpoint(wandb_env, caplog):
    class FinishFails(WandbHook):
        def _finish(self, exit_code):
            super()._finish(exit_code)
            raise ConnectionError("upload failed")

    workspace = wandb_env / "ws"
    trainer = make_trainer(regression_batches(8, 4), max_steps=6, workspace=workspace,
                           hooks=[LoggingHook(interval=2), CheckpointingHook(interval=100), FinishFails()])
    with caplog.at_level(logging.ERROR, logger="mini_trainer"):
        trainer.train()
    assert (workspace / "checkpoints" / "step_000000006").is_dir()
    assert any("could not finish the W&B run: upload failed" in message for message in caplog.messages)


@pytest.mark.parametrize("error, code", [(SystemExit(), 0), (SystemExit(143), 143), (SystemExit("bye"), 1),
                                         (KeyboardInterrupt(), 1)])
def test_the_exit_code_of_a_run_that_ends_with_an_exception(wandb_env, error, code):
    hook = WandbHook()
    trainer = make_trainer(regression_batches(2, 4), max_steps=1, workspace=wandb_env / "ws", hooks=[hook])
    hook.on_before_train(trainer)
    hook.on_exception(trainer, error)
    (run,) = offline_runs(wandb_env / "ws")
    assert run.exit_code == code


def test_init_kwargs_defaults_environment_and_explicit_keywords(wandb_env, monkeypatch):
    trainer = make_trainer(regression_batches(1, 4), max_steps=1, workspace=wandb_env / "ws")
    monkeypatch.delenv("WANDB_MODE")
    # No credentials anywhere (HOME is empty): offline, in the workspace.
    kwargs = WandbHook(project="p", tags="a").wandb_init_kwargs(trainer)
    assert kwargs == {"project": "p", "tags": ["a"], "mode": "offline", "dir": str(wandb_env / "ws")}
    assert not wandb_hook_module.wandb_credentials_configured()
    # Explicit keywords are passed as given.
    explicit = WandbHook(mode="disabled", dir="elsewhere", id="x1").wandb_init_kwargs(trainer)
    assert (explicit["mode"], explicit["dir"], explicit["id"], explicit["resume"]) == (
        "disabled", "elsewhere", "x1", "allow")
    # A checkpoint's run id is continued.
    hook = WandbHook()
    hook.on_load_state_dict(trainer, {"hooks": {"wandb": {"run_id": "saved1"}}})
    assert (hook.wandb_init_kwargs(trainer)["id"], hook.wandb_init_kwargs(trainer)["resume"]) == ("saved1", "allow")
    assert "id" not in WandbHook(resume_run=False).wandb_init_kwargs(trainer)
    # Environment variables win over the hook's defaults (wandb reads them itself).
    for name, value in (("WANDB_MODE", "online"), ("WANDB_DIR", "/somewhere"), ("WANDB_RUN_ID", "env1")):
        monkeypatch.setenv(name, value)
    kwargs = hook.wandb_init_kwargs(trainer)
    assert "mode" not in kwargs and "dir" not in kwargs and "id" not in kwargs and kwargs["resume"] == "allow"


def test_credentials_are_found_in_env_and_netrc(wandb_env, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_hook_module.wandb_credentials_configured()
    monkeypatch.delenv("WANDB_API_KEY")
    (wandb_env / "home" / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    (wandb_env / "home" / ".netrc").chmod(0o600)
    wandb.teardown()
    assert wandb_hook_module.wandb_credentials_configured()
    assert wandb_hook_module._netrc_has_key("https://api.wandb.ai")
    monkeypatch.delenv("WANDB_MODE")
    trainer = make_trainer(regression_batches(1, 4), max_steps=1, workspace=wandb_env / "ws")
    assert "mode" not in WandbHook().wandb_init_kwargs(trainer)  # online: wandb's own default


def test_offline_without_credentials_and_disabled_env_wins(wandb_env, monkeypatch):
    import wandb

    monkeypatch.delenv("WANDB_MODE")
    trainer = make_trainer(regression_batches(2, 4), max_steps=2, workspace=wandb_env / "a",
                           hooks=[LoggingHook(interval=1), WandbHook(project="p")])
    trainer.train()
    assert [sorted(run.metrics("loss")) for run in offline_runs(wandb_env / "a")] == [[1, 2]]

    monkeypatch.setenv("WANDB_MODE", "disabled")
    wandb.teardown()
    hook = WandbHook(project="p")
    trainer = make_trainer(regression_batches(2, 4), max_steps=2, workspace=wandb_env / "b",
                           hooks=[LoggingHook(interval=1), hook])
    trainer.train()
    assert hook.run_id is not None and not (wandb_env / "b" / "wandb").exists()


def test_dry_run_and_other_ranks_never_start_wandb(tmp_path, monkeypatch):
    hook = WandbHook(project="p")
    trainer = make_trainer(regression_batches(2, 4), max_steps=2, workspace=tmp_path,
                           hooks=[LoggingHook(interval=1), hook])
    trainer.log({"x": 1.0}, dry_run=True)
    trainer.log_images({"x": torch.zeros(3, 2, 2)}, dry_run=True)
    assert hook.run is None
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now fails
    monkeypatch.setattr(wandb_hook_module, "is_main_process", lambda: False)
    trainer.train()
    trainer.log_images({"x": torch.zeros(3, 2, 2)})
    state = trainer.state_dict()
    assert hook.run is None and state["hooks"]["wandb"] == {"run_id": None}
    assert not (tmp_path / "wandb").exists()


def test_argument_validation_names_the_argument():
    assert WandbHook(tags=None).tags is None
    assert WandbHook(tags="a").tags == ["a"] and WandbHook(tags=("a", "b")).tags == ["a", "b"]
    for kwargs, match in (
        ({"tags": [1]}, "WandbHook.tags"), ({"tags": 3}, "WandbHook.tags"), ({"tags": [""]}, "WandbHook.tags"),
        ({"project": 3}, "WandbHook.project"), ({"name": ""}, "WandbHook.name"),
        ({"config": [1]}, "WandbHook.config"), ({"resume_run": "yes"}, "WandbHook.resume_run"),
    ):
        with pytest.raises(TypeError, match=match):
            WandbHook(**kwargs)
    config = WandbHook(config={"p": Path("/x"), "inf": float("inf"), "l": (1, torch.float32)}).config
    assert config == {"p": "/x", "inf": "inf", "l": [1, "torch.float32"]}


def test_hooks_are_registered_and_wandb_is_imported_lazily():
    assert "WandbHook" in REGISTRY and "ImageFileLoggerHook" in REGISTRY
    hook = build_from_cfg({"type": "ImageFileLoggerHook", "interval": 5, "format": "JPG"})
    assert isinstance(hook, ImageFileLoggerHook) and (hook.interval, hook.format) == (5, "jpg")
    code = ("import sys, mini_trainer; from mini_trainer.hooks import WandbHook; WandbHook(); "
            "assert 'wandb' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})


# ============================================================================ ImageFileLoggerHook


def _image_trainer(tmp_path, hook, make_images, max_steps=4, **kwargs):
    kwargs.setdefault("workspace", tmp_path)
    return make_trainer(regression_batches(max_steps, 4), max_steps=max_steps,
                        hooks=[hook, ImageEveryStep(make_images)], **kwargs)


def test_writes_every_interval_at_most_max_images_per_call(tmp_path):
    single = _pixels(0, (3, 5, 7))
    batch = _pixels(1, (4, 3, 5, 7))
    hook = ImageFileLoggerHook(interval=2, max_images=3)
    _image_trainer(tmp_path, hook, lambda step: {"single": single, "val/batch": batch}).train()
    root = tmp_path / "images"
    assert sorted(p.name for p in root.iterdir()) == ["2", "4"]  # steps 1 and 3 ignored
    files = sorted(str(p.relative_to(root / "4")) for p in (root / "4").rglob("*") if p.is_file())
    assert files == ["single.png", "val/batch_0.png", "val/batch_1.png"]  # 3 files in all
    assert np.array_equal(np.asarray(Image.open(root / "4" / "single.png")), _expected_uint8(single.permute(1, 2, 0)))
    assert np.array_equal(np.asarray(Image.open(root / "4/val/batch_1.png")),
                          _expected_uint8(batch[1].permute(1, 2, 0)))
    assert not list(root.rglob(".*.tmp"))


def test_path_without_workspace_is_the_current_directory_and_absolute_paths_are_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image = np.full((3, 4), 7, dtype=np.uint8)
    _image_trainer(tmp_path, ImageFileLoggerHook(interval=1, path="out"), lambda step: {"g": image},
                   max_steps=1, workspace=None).train()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "1" / "g.png")), image)
    absolute = tmp_path / "abs"
    _image_trainer(tmp_path / "ws", ImageFileLoggerHook(interval=1, path=absolute), lambda step: {"g": image},
                   max_steps=1).train()
    assert (absolute / "1" / "g.png").is_file()


@pytest.mark.parametrize("fmt", ["jpeg", "jpg", "webp", "bmp", "tiff", "gif"])
def test_other_formats_convert_modes_they_cannot_store(tmp_path, fmt):
    rgba = Image.new("RGBA", (8, 6), (200, 100, 50, 128))
    gray_alpha = Image.new("LA", (8, 6), (90, 255))
    hook = ImageFileLoggerHook(interval=1, format=fmt.upper())
    images = {"rgba": rgba, "la": gray_alpha, "list": [rgba, np.zeros((6, 8, 3), np.uint8)]}
    _image_trainer(tmp_path, hook, lambda step: images, max_steps=1).train()
    step_dir = tmp_path / "images" / "1"
    assert sorted(p.name for p in step_dir.iterdir()) == sorted(
        f"{n}.{fmt}" for n in ("rgba", "la", "list_0", "list_1"))
    written = Image.open(step_dir / f"rgba.{fmt}").convert("RGBA")
    assert written.size == (8, 6)
    if fmt in ("jpeg", "jpg"):
        assert Image.open(step_dir / f"rgba.{fmt}").mode == "RGB" and Image.open(step_dir / f"la.{fmt}").mode == "L"
        assert np.abs(np.asarray(written.convert("RGB"), dtype=int) - [200, 100, 50]).max() <= 3
        assert np.abs(np.asarray(Image.open(step_dir / f"la.{fmt}"), dtype=int) - 90).max() <= 3


def test_dry_run_and_other_ranks_write_nothing(tmp_path, monkeypatch):
    hook = ImageFileLoggerHook(interval=1)
    trainer = make_trainer(regression_batches(1, 4), max_steps=1, workspace=tmp_path, hooks=[hook])
    trainer.log_images({"x": torch.zeros(3, 2, 2)}, dry_run=True)
    monkeypatch.setattr(images_hook_module, "is_main_process", lambda: False)
    trainer.log_images({"x": torch.zeros(3, 2, 2)})
    assert not (tmp_path / "images").exists()


def test_bad_names_are_refused_at_every_step(tmp_path):
    trainer = make_trainer(regression_batches(1, 4), max_steps=1, workspace=tmp_path,
                           hooks=[ImageFileLoggerHook(interval=100)])
    trainer.step = 1  # not a multiple of the interval: nothing would be written, but names are checked
    for name in ("../x", "/abs", "a//b", "a/./b", "", "a\\b", "a/"):
        with pytest.raises(ValueError, match="image name") as info:
            trainer.log_images({name: torch.zeros(3, 2, 2)})
        assert repr(name) in str(info.value)
    with pytest.raises(TypeError, match="image name"):
        trainer.log_images({3: torch.zeros(3, 2, 2)})


def test_argument_validation(tmp_path):
    for kwargs, error, match in (
        ({"interval": 0}, ValueError, "ImageFileLoggerHook.interval"),
        ({"max_images": 1.5}, TypeError, "ImageFileLoggerHook.max_images"),
        ({"format": "xyz"}, ValueError,
         "ImageFileLoggerHook.format must be one of png, jpeg, jpg, webp, bmp, tiff, gif; got 'xyz'"),
        ({"path": 3}, TypeError, "ImageFileLoggerHook.path"),
    ):
        with pytest.raises(error, match=match):
            ImageFileLoggerHook(**kwargs)


def test_a_failed_write_leaves_neither_a_partial_file_nor_a_temporary(tmp_path, monkeypatch):
    hook = ImageFileLoggerHook(interval=1)
    trainer = make_trainer(regression_batches(1, 4), max_steps=1, workspace=tmp_path, hooks=[hook])

    def crash(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(images_hook_module.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        trainer.log_images({"x": torch.zeros(3, 2, 2)})
    assert [p for p in (tmp_path / "images").rglob("*") if p.is_file()] == []


# ============================================================================ mini_trainer.images


def test_to_pil_layouts_dtypes_and_values():
    chw = _pixels(0, (3, 4, 6))
    assert np.array_equal(np.asarray(to_pil(chw)), _expected_uint8(chw.permute(1, 2, 0)))
    hwc = (torch.arange(5 * 6 * 3) % 256).to(torch.uint8).reshape(5, 6, 3)
    assert np.array_equal(np.asarray(to_pil(hwc)), hwc.numpy())
    assert np.array_equal(np.asarray(to_pil(hwc.numpy())), hwc.numpy())
    assert np.array_equal(np.asarray(to_pil(chw.numpy().transpose(1, 2, 0))), _expected_uint8(chw.permute(1, 2, 0)))
    gray = to_pil(_pixels(1, (5, 7)))
    assert gray.mode == "L" and gray.size == (7, 5)
    assert to_pil(_pixels(1, (1, 5, 7))).mode == "L" and to_pil(np.zeros((5, 7, 1))).mode == "L"
    assert to_pil(_pixels(2, (4, 5, 7))).mode == "RGBA"
    grad = _pixels(3, (3, 4, 6)).requires_grad_()
    assert np.array_equal(np.asarray(to_pil(grad * 1)), _expected_uint8(grad.detach().permute(1, 2, 0)))
    assert np.asarray(to_pil(torch.full((2, 2), 0.5, dtype=torch.bfloat16))).tolist() == [[128, 128], [128, 128]]
    assert np.asarray(to_pil(torch.tensor([[True, False]]))).tolist() == [[255, 0]]
    assert np.asarray(to_pil(torch.tensor([[0, 200]]))).tolist() == [[0, 200]]  # int64 in 0..255
    assert np.asarray(to_pil(torch.tensor([[float("nan"), float("inf"), -0.2, 1.2]]))).tolist() == [[0, 255, 0, 255]]
    pil = Image.new("RGB", (2, 2))
    assert to_pil(pil) is pil
    # Both ends could be channels: tensors are CHW, arrays HWC.
    assert to_pil(torch.zeros(3, 4, 3)).size == (3, 4) and to_pil(np.zeros((3, 4, 3))).size == (4, 3)


def test_far_out_of_range_floats_are_clamped_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="mini_trainer"):
        first = to_pil(torch.full((2, 2), 200.0), name="scale255")
        to_pil(torch.full((2, 2), 200.0), name="scale255")
    assert np.asarray(first).tolist() == [[255, 255], [255, 255]]
    assert sum("divide by 255" in message for message in caplog.messages) == 1


def test_batches_and_lists():
    nchw = _pixels(0, (2, 3, 4, 5))
    images = as_image_list(nchw, "b")
    assert len(images) == 2 and all(image.size == (5, 4) for image in images)
    assert np.array_equal(np.asarray(images[1]), _expected_uint8(nchw[1].permute(1, 2, 0)))
    nhwc = (np.arange(2 * 4 * 5 * 3) % 256).astype(np.uint8).reshape(2, 4, 5, 3)
    assert [np.asarray(image).tolist() for image in as_image_list(nhwc)] == [nhwc[0].tolist(), nhwc[1].tolist()]
    mixed = as_image_list([Image.new("L", (3, 3)), torch.zeros(3, 3), np.zeros((3, 3, 4), np.uint8)])
    assert [image.mode for image in mixed] == ["L", "L", "RGBA"]
    assert as_image_list(torch.zeros(3, 2, 2))[0].size == (2, 2) and as_image_list([]) == []
    assert is_image_batch(nchw) and is_image_batch([]) and not is_image_batch(nchw[0])


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (torch.zeros(1, 2, 3, 4, 5), ValueError,
         r"image 'pic': a 5-D tensor of shape \(1, 2, 3, 4, 5\) \(torch.float32\) is not an image"),
        (torch.zeros(7), ValueError, "a 1-D tensor"),
        (torch.zeros(2, 5, 5), ValueError, "2 channels are ambiguous"),
        (np.zeros((5, 5, 2)), ValueError, "2 channels are ambiguous"),
        (torch.zeros(5, 6, 7), ValueError, r"\(5, 6, 7\).*neither the first nor the last"),
        (torch.zeros(3, 0, 4), ValueError, "empty dimension"),
        (torch.tensor([[0, 300]]), ValueError, r"values in 0\.\.300; allowed: 0\.\.255"),
        (torch.zeros(3, 2, 2, dtype=torch.complex64), TypeError, "complex"),
        (np.array([["a"]]), TypeError, "is not an image"),
        ("cat.png", TypeError, "image 'pic': got str; allowed: a PIL image"),
        (torch.zeros(2, 3, 4, 4), ValueError, "a batch of shape .* use as_image_list"),
    ],
)
def test_bad_images_name_the_image_shape_and_what_is_allowed(value, error, match):
    with pytest.raises(error, match=match):
        to_pil(value, name="pic")


def test_bad_batches_name_the_element():
    with pytest.raises(ValueError, match=r"image 'b\[1\]'.*2 channels"):
        as_image_list([torch.zeros(3, 2, 2), torch.zeros(2, 5, 5)], name="b")
    with pytest.raises(ValueError, match="a list of batches"):
        as_image_list([torch.zeros(1, 3, 2, 2)], name="b")
    with pytest.raises(ValueError, match="2 channels"):
        as_image_list(torch.zeros(4, 2, 5, 5), name="b")
