"""check_resume / `mini-trainer check-resume`: a user's trainer that resumes exactly passes;
each usual way of breaking resume is caught and named (an unsaved counter, a random
generator of its own, a plain shuffling DataLoader, a hook that does not restore its state,
a run that is not even deterministic)."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mini_trainer import (
    BaseHook,
    BaseTrainer,
    CheckpointingHook,
    CsvLoggerHook,
    EmaHook,
    EvalHook,
    LoggingHook,
    ProgressHook,
    WandbHook,
    check_resume,
)
from mini_trainer.cli import main
from mini_trainer.data import stateful_loader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dataset(n: int = 48) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, (x.sum(1) > 0).long())


class Classifier(BaseTrainer):
    """A small subclass that resumes exactly: a StatefulDataLoader, dropout (the global
    RNG), and its own state (a counter and a generator) saved in state_dict()."""

    def __init__(self, loader: str = "stateful", **kwargs):
        kwargs.setdefault("max_steps", 100)
        super().__init__(seed=0, device="cpu", **kwargs)
        self.loader = loader
        self.calls = 0
        self.noise = torch.Generator().manual_seed(1)

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.2), nn.Linear(12, 2))

    def build_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=1e-2)

    def build_data_loader(self):
        if self.loader == "plain":
            return DataLoader(dataset(), batch_size=6, shuffle=True)
        return stateful_loader(dataset(), batch_size=6, seed=0)

    def build_eval_loaders(self):
        return DataLoader(dataset(24), batch_size=12)

    def forward(self, batch):
        x, y = batch
        self.calls += 1
        x = x + 0.05 * torch.randn(x.shape, generator=self.noise)
        loss = nn.functional.cross_entropy(self.model(x), y)
        return loss * (1 + 0.01 * self.calls), {}

    def state_dict(self, **kwargs):
        state = super().state_dict(**kwargs)
        state["calls"] = self.calls
        state["noise"] = self.noise.get_state()
        return state

    def load_state_dict(self, state_dict, **kwargs):
        super().load_state_dict(state_dict, **kwargs)
        self.calls = state_dict["calls"]
        self.noise.set_state(state_dict["noise"])


class UnsavedCounter(Classifier):
    def state_dict(self, **kwargs):
        state = super().state_dict(**kwargs)
        del state["calls"]
        return state

    def load_state_dict(self, state_dict, **kwargs):
        calls = self.calls
        super().load_state_dict({**state_dict, "calls": calls}, **kwargs)


class UnsavedGenerator(Classifier):
    def state_dict(self, **kwargs):
        state = super().state_dict(**kwargs)
        del state["noise"]
        return state

    def load_state_dict(self, state_dict, **kwargs):
        super().load_state_dict({**state_dict, "noise": self.noise.get_state()}, **kwargs)


def test_a_subclass_that_saves_its_state_resumes_exactly_with_accumulation_ema_and_evaluation():
    def make():
        return Classifier(gradient_accumulation_steps=2, hooks=[EmaHook(decay=0.9), EvalHook(interval=5),
                                                                CheckpointingHook(interval=4)])

    report = check_resume(make, steps=14)
    assert report.exact, report.format()
    assert report.first_difference is None and not report.unsaved_attributes
    reasons = {i.reason for i in report.interruptions}
    assert {"end of epoch 0", "right after an evaluation"} <= reasons and len(report.interruptions) == 3
    assert all("1 of 2 micro-batches" in i.killed for i in report.interruptions)  # mid gradient-accumulation
    assert report.compared["steps"] == 14 and report.compared["batches"] == 28
    assert {"hook 'ema'", "hook 'eval'", "state entry 'calls'"} <= set(report.compared["components"])
    assert "EXACT" in str(report) and "NOT EXACT" not in str(report)
    json.dumps(report.to_dict())


def test_an_unsaved_counter_that_changes_the_loss_fails_and_is_named():
    report = check_resume(UnsavedCounter, steps=12, interrupts=2)
    assert not report.exact
    first = report.interruptions[0].step
    diff = report.first_difference
    assert (diff.step, diff.component, diff.resumed_at) == (first + 1, "loss", first)
    assert "self.calls" in diff.hint
    (unsaved,) = report.unsaved_attributes
    assert (unsaved.name, unsaved.kind, unsaved.before, unsaved.after_resume) == ("self.calls", "number", "0", "0")
    assert unsaved.at_interruption == str(first)
    text = str(report)
    assert "NOT EXACT" in text and f"self.calls (number): 0 before training, {first} at step {first}" in text


def test_an_unsaved_random_generator_fails_and_is_named_as_the_rng():
    report = check_resume(UnsavedGenerator, steps=12, interrupts=1)
    assert not report.exact
    assert report.first_difference.component == "loss"
    assert "self.noise, a random generator that is not saved" in report.first_difference.hint
    (unsaved,) = report.unsaved_attributes
    assert unsaved.name == "self.noise" and unsaved.kind == "generator" and "get_state()" in unsaved.hint


def test_a_plain_shuffling_dataloader_is_a_data_order_difference_with_the_fix():
    report = check_resume(lambda: Classifier(loader="plain"), steps=12, interrupts=3)
    assert not report.exact
    diff = report.first_difference
    assert diff.component == "data order" and "mini_trainer.data.stateful_loader" in diff.hint
    assert "RandomSampler" in diff.hint and diff.resumed_at is not None
    assert not report.unsaved_attributes


class ForgetfulHook(BaseHook):
    """Saves a count but does not read it back."""

    def __init__(self):
        self.count = 0

    def on_after_step(self, trainer):
        self.count += 1

    def on_state_dict(self, trainer, state_dict):
        state_dict["hooks"]["forgetful"] = {"count": self.count}


def test_a_hook_that_does_not_restore_its_state_is_named_right_after_loading():
    report = check_resume(lambda: Classifier(hooks=[ForgetfulHook()]), steps=8, interrupts=1)
    diff = report.first_difference
    stop = report.interruptions[0].step
    assert (diff.step, diff.resumed_at, diff.component) == (stop, stop, "hook 'forgetful'")
    assert "right after load_state_dict" in diff.detail and "on_load_state_dict" in diff.hint
    assert [a.name for a in report.unsaved_attributes] == ["ForgetfulHook.count"]


class Transient(Classifier):
    transient_attributes = ("started_at",)

    def forward(self, batch):
        self.started_at = getattr(self, "started_at", None) or self.step  # per-run bookkeeping, on purpose
        self.timing = time.perf_counter()  # differs between two identical runs: not judged
        return super().forward(batch)


def test_declared_transient_attributes_and_timings_are_not_judged():
    report = check_resume(Transient, steps=8, interrupts=1)
    assert report.exact, report.format()
    assert report.ignored_attributes == ["self.timing"]


class NotDeterministic(Classifier):
    def build_model(self) -> nn.Module:
        model = super().build_model()
        with torch.no_grad():
            model[0].weight.add_(torch.randn(model[0].weight.shape, generator=torch.Generator().manual_seed(
                time.perf_counter_ns())))
        return model


def test_a_run_that_is_not_deterministic_is_reported_as_such_before_any_interruption():
    report = check_resume(NotDeterministic, steps=6, interrupts=1)
    diff = report.first_difference
    assert diff.step == 1 and diff.resumed_at is None and diff.component.startswith("not deterministic")
    assert "seed" in diff.hint


def test_bad_arguments_are_errors_naming_the_argument():
    with pytest.raises(ValueError, match=r"check_resume\(steps\)"):
        check_resume(Classifier, steps=2)
    with pytest.raises(ValueError, match=r"check_resume\(interrupts\)"):
        check_resume(Classifier, interrupts=0)
    with pytest.raises(TypeError, match="make_trainer"):
        check_resume(Classifier())
    with pytest.raises(TypeError, match=r"check_resume\(workdir\) must be a str or os.PathLike"):
        check_resume(Classifier, workdir=3)
    with pytest.raises(TypeError, match=r"check_resume\(subprocess\) must be True or False"):
        check_resume(Classifier, subprocess=1)
    with pytest.raises(TypeError, match="picklable"):
        check_resume(lambda: Classifier(), subprocess=True)

    def built():
        trainer = Classifier()
        trainer.build()
        return trainer

    with pytest.raises(ValueError, match="already built"):
        check_resume(built, steps=4)


# ---------------------------------------------------------------------- the command line

CONFIG = os.path.join(REPO, "configs", "digits_mlp.py")


def test_cli_exact_config_exits_0_and_leaves_the_configs_workspace_alone(tmp_path, capsys):
    workspace = tmp_path / "existing_run"
    (workspace / "checkpoints" / "step_000000007").mkdir(parents=True)  # another run's: never touched
    code = main(["check-resume", CONFIG, f"trainer.workspace={str(workspace)!r}", "--steps", "8", "--interrupts",
                 "2", "--json"])
    out = capsys.readouterr().out
    report = json.loads(out)  # stdout is only the report (progress lines go to stderr)
    assert code == 0 and report["exact"] and report["steps"] == 8 and len(report["interruptions"]) == 2
    assert sorted(p.name for p in workspace.rglob("*")) == ["checkpoints", "step_000000007"]


def test_cli_not_exact_exits_1_with_the_report(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_trainers.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from test_resume_check import UnsavedCounter\n"
        "from mini_trainer import REGISTRY\n"
        "REGISTRY.register()(UnsavedCounter)\n"
    )
    config = tmp_path / "counter.py"
    config.write_text("imports = ['my_trainers']\ntrainer = dict(type='UnsavedCounter')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["check-resume", str(config), "--steps", "8", "--interrupts", "1"])
    out = capsys.readouterr().out
    assert code == 1
    assert "NOT EXACT" in out and "self.calls (number)" in out and "First difference" in out


def test_cli_usage_errors_exit_2(tmp_path, capsys):
    assert main(["check-resume", str(tmp_path / "missing.py")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["check-resume", CONFIG, "--steps", "2"]) == 2
    assert "--steps must be at least 3" in capsys.readouterr().err
    assert main(["check-resume", CONFIG, "trainer.model_cfg.type='NoSuchModel'"]) == 2
    assert "NoSuchModel" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["check-resume", "--help"])
    assert exit_info.value.code == 0 and "Exit status: 0 exact" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_subprocess_resumes_in_fresh_processes_from_checkpoints(capsys):
    code = main(["check-resume", CONFIG, "trainer.gradient_accumulation_steps=2", "--steps", "6", "--interrupts",
                 "1", "--subprocess", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["exact"], report["first_difference"]
    assert report["mode"] == "in fresh processes from checkpoint directories"
    assert "micro-batches" in report["interruptions"][0]["killed"]


# ---------------------------------------------------------------------- what is judged, what is left alone


class CountingProgress(ProgressHook):
    """A user's subclass of a library hook: its own counter is the user's state; the
    library's private attributes (start step, timers) are not."""

    def __init__(self):
        super().__init__(interval=100)
        self.lines = 0

    def on_after_step(self, trainer):
        super().on_after_step(trainer)
        self.lines += 1


class OwnScheduler(Classifier):
    def build_optimizer(self):
        optimizer = super().build_optimizer()
        self.warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # stepped, never saved
        return optimizer

    def forward(self, batch):
        self.warmup.step()
        return super().forward(batch)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_user_subclasses_of_library_hooks_and_their_own_schedulers_are_judged_on_their_own_state():
    report = check_resume(lambda: Classifier(hooks=[CountingProgress()]), steps=8, interrupts=1)
    assert [a.name for a in report.unsaved_attributes] == ["CountingProgress.lines"]
    report = check_resume(OwnScheduler, steps=8, interrupts=1)
    assert [(a.name, a.kind) for a in report.unsaved_attributes] == [("self.warmup", "optimizer or scheduler")]


def test_the_users_files_are_left_alone_and_the_runs_own_limits_kept(tmp_path):
    csv = tmp_path / "run" / "metrics.csv"
    csv.parent.mkdir()
    csv.write_text("step,loss\n" + "".join(f"{i},0.5\n" for i in range(1, 51)))
    before = csv.read_text()

    def make():
        return Classifier(max_epochs=1, hooks=[LoggingHook(interval=2), CsvLoggerHook(path=str(csv)),
                                               WandbHook(project="never-created")])

    report = check_resume(make, interrupts=1)
    assert csv.read_text() == before
    assert report.exact, report.format()
    assert report.steps == 8  # max_epochs=1: 48 samples in batches of 6
    assert any("WandbHook is left out" in n for n in report.notes)
    assert any("CsvLoggerHook.path" in n and "is absolute" in n for n in report.notes)
