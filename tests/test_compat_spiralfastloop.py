"""mini_trainer.compat.spiralfastloop: the seed README's Quickstart and Trigger hook blocks run
verbatim with only the module names pointed at ours; FastTrainer is a BaseTrainer that
resumes bit for bit; train_one_epoch's metrics; the trigger injects only when losses are
uniform; SpiralFastLoop providers and their weights; best-effort compile; argument errors."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import mini_trainer.compat.spiralfastloop as sfl
from mini_trainer import BaseTrainer, CheckpointingHook
from mini_trainer.hooks import BaseHook
from mini_trainer.strategies import HardestK
from mini_trainer.strategies import LossStdTrigger as OurTrigger

REPO = Path(__file__).resolve().parents[1]
ALIASES = ("spiralfastloop", "spiralfastloop.utils", "spiralfastloop.extras.trigger_mix")

# The seed README's two blocks, verbatim (/work/shared/seeds/spiralfastloop-README.txt).
QUICKSTART = """\
from spiralfastloop import FastTrainer
from spiralfastloop.utils import dataloader_from_dataset
import torch, torch.nn as nn
from torch.utils.data import TensorDataset

X = torch.randn(50_000, 128)
y = torch.randint(0, 10, (50_000,))
ds = TensorDataset(X, y)
loader = dataloader_from_dataset(ds, batch_size=256, device="auto")

model = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 10))
opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
crit = nn.CrossEntropyLoss()

trainer = FastTrainer(model, opt, grad_accum=2, log_interval=50)
metrics = trainer.train_one_epoch(loader, crit, steps=200)
print(metrics)
"""

TRIGGER_HOOK_API = """\
from spiralfastloop.extras.trigger_mix import LossStdTrigger, LossStdConfig

def my_provider(k, device, ctx):
    # Return k extra hard samples (inputs, targets)
    # Example: reuse batch subset with highest loss, or generate on-the-fly.
    loss_vec = ctx["loss_vec"]
    inputs, targets = ctx["inputs"], ctx["targets"]
    idx = loss_vec.topk(min(k, loss_vec.numel())).indices
    return inputs[idx], targets[idx]

trigger = LossStdTrigger(my_provider, LossStdConfig(std_threshold=0.15, inject_ratio=0.08))
trainer = FastTrainer(model, opt, trigger_hook=trigger)
"""


def test_readme_blocks_run_verbatim_through_module_aliases(monkeypatch, capsys):
    for name in ALIASES:
        monkeypatch.setitem(sys.modules, name, sfl)  # removed again when the test ends
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(QUICKSTART, "README-quickstart", "exec"), namespace)  # noqa: S102 - the README's own code
    metrics = namespace["metrics"]
    # 50_000 / 256 -> 196 batches, 2 per step: the epoch ends at step 98, before steps=200.
    assert metrics["step"] == 98 and math.isfinite(metrics["loss"])
    assert "'loss': " in capsys.readouterr().out
    exec(compile(TRIGGER_HOOK_API, "README-trigger", "exec"), namespace)  # noqa: S102
    trainer, trigger = namespace["trainer"], namespace["trigger"]
    assert isinstance(trainer, sfl.FastTrainer) and trainer.trigger is trigger
    metrics = trainer.train_one_epoch(namespace["loader"], nn.CrossEntropyLoss(reduction="none"), steps=12)
    assert metrics["step"] == 12 and math.isfinite(metrics["loss"])
    assert metrics["trigger_fired"] == trigger.fired > 0 and metrics["trigger_injected"] == trigger.injected > 0
    monkeypatch.undo()
    assert not any(name in sys.modules for name in ALIASES)


def data(n=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))


def hardest(k, device, ctx):
    idx = ctx["loss_vec"].topk(min(k, ctx["loss_vec"].numel())).indices
    return ctx["inputs"][idx], ctx["targets"][idx]


def test_fast_trainer_is_a_base_trainer_and_resumes_bit_for_bit(tmp_path):
    def run(workspace, steps):
        torch.manual_seed(0)
        model = mlp()
        trigger = sfl.LossStdTrigger(hardest, sfl.LossStdConfig(std_threshold=0.8, budget_frac=0.2,
                                                                inject_ratio=0.25, pulse_every=5))
        trainer = sfl.FastTrainer(
            model, torch.optim.Adam(model.parameters(), lr=1e-2), grad_accum=2, log_interval=None,
            trigger_hook=trigger, device="cpu", criterion=nn.CrossEntropyLoss(reduction="none"),
            data_loader=sfl.dataloader_from_dataset(data(), batch_size=16, device="cpu", seed=2),
            max_steps=steps, seed=0, workspace=workspace, hooks=[CheckpointingHook(interval=5, path="ckpt")],
        )
        trainer.train()
        return trainer

    straight = run(tmp_path / "a", 20)
    assert isinstance(straight, BaseTrainer)
    run(tmp_path / "b", 12)
    resumed = run(tmp_path / "b", 20)
    assert straight.trigger.fired > 0
    counters = lambda t: (t.trigger.fired, t.trigger.injected, t.trigger.credit, t.trigger.seen)  # noqa: E731
    assert counters(resumed) == counters(straight)
    for a, b in zip(resumed.model.parameters(), straight.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_train_one_epoch_resumes_and_counts_the_trigger_from_the_resume(tmp_path):
    def trainer():
        torch.manual_seed(0)
        model = mlp()
        trigger = sfl.LossStdTrigger(hardest, sfl.LossStdConfig(std_threshold=10.0, budget_frac=0.2))
        return sfl.FastTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), trigger_hook=trigger,
                               log_interval=None, device="cpu", workspace=tmp_path, seed=0,
                               hooks=[CheckpointingHook(interval=100, path="ckpt")])

    loader = lambda: sfl.dataloader_from_dataset(data(256), batch_size=16, device="cpu")  # noqa: E731
    first = trainer().train_one_epoch(loader(), nn.CrossEntropyLoss(reduction="none"), steps=4)
    assert first["step"] == 4 and first["trigger_seen"] == 64 and first["trigger_fired"] > 0
    resumed = trainer()
    metrics = resumed.train_one_epoch(loader(), nn.CrossEntropyLoss(reduction="none"), steps=3)
    assert metrics["step"] == 7 and metrics["trigger_seen"] == 48 and resumed.trigger.seen == 112
    assert metrics["trigger_fired"] == resumed.trigger.fired - first["trigger_fired"]


class StepLosses(BaseHook):
    def __init__(self):
        self.losses = []

    def on_after_step(self, trainer):
        self.losses.append(float(trainer.step_info["loss"]))


def test_train_one_epoch_averages_the_loss_and_stops_at_the_epoch_end():
    torch.manual_seed(0)
    model, recorder = mlp(), StepLosses()
    trainer = sfl.FastTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), grad_accum=2, log_interval=None,
                              device="cpu", hooks=[recorder])
    loader = sfl.dataloader_from_dataset(data(), batch_size=16, device="cpu")  # 6 batches: 3 steps an epoch
    metrics = trainer.train_one_epoch(loader, nn.CrossEntropyLoss())
    assert metrics["step"] == 3 and metrics["epoch"] == 1
    assert metrics["loss"] == pytest.approx(sum(recorder.losses) / 3)
    assert "trigger_fired" not in metrics
    metrics = trainer.train_one_epoch(loader, nn.CrossEntropyLoss(reduction="none"), steps=2)  # per-sample: mean
    assert metrics["step"] == 5 and metrics["loss"] == pytest.approx(sum(recorder.losses[3:]) / 2)
    metrics = trainer.train_one_epoch(loader, nn.CrossEntropyLoss(), steps=50)  # the started epoch's last step
    assert metrics["step"] == 6


def test_sample_weighted_batches_without_a_trigger():
    torch.manual_seed(0)
    x, y, w = torch.randn(6, 8), torch.randint(0, 2, (6,)), torch.rand(6) + 0.5
    model = mlp()
    trainer = sfl.FastTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), device="cpu",
                              criterion=nn.CrossEntropyLoss(reduction="none"), data_loader=[(x, y, w)])
    trainer.build()
    loss, _ = trainer.forward((x, y, w))
    per_sample = nn.functional.cross_entropy(model(x), y, reduction="none")
    torch.testing.assert_close(loss, (w * per_sample).sum() / w.sum())
    trainer.criterion = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="reduction='none'"):
        trainer.forward((x, y, w))


class Rows(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 2)
        self.rows = []

    def forward(self, x):
        self.rows.append(x.shape[0])
        return self.linear(x)


def controlled_loss(outputs, targets):
    """Per-sample losses equal to the targets (plus a tiny term with a gradient)."""
    return targets.float() + 1e-3 * outputs.sum(1)


@pytest.mark.parametrize("uniform", [True, False])
def test_the_trigger_injects_only_when_the_losses_are_uniform(uniform):
    targets = torch.full((64,), 2) if uniform else torch.tensor([1, 9] * 32)  # cv 0, or 0.8
    calls = []

    def provider(k, device, ctx):
        calls.append(k)
        assert device == torch.device("cpu") and ctx["loss_vec"].shape == (8,)
        return ctx["inputs"][:k], ctx["targets"][:k]

    trigger = sfl.LossStdTrigger(provider, sfl.LossStdConfig(std_threshold=0.15, inject_ratio=0.25,
                                                             budget_frac=1.0, pulse_every=10_000))
    model = Rows()
    trainer = sfl.FastTrainer(model, torch.optim.SGD(model.parameters(), lr=0.01), trigger_hook=trigger,
                              log_interval=None, device="cpu")
    loader = sfl.dataloader_from_dataset(TensorDataset(torch.randn(64, 1), targets), batch_size=8, device="cpu")
    metrics = trainer.train_one_epoch(loader, controlled_loss)
    assert metrics["step"] == 8 and metrics["trigger_seen"] == 64
    if uniform:  # every batch but the first (the decision reads the previous batch's cv)
        assert (metrics["trigger_fired"], metrics["trigger_injected"]) == (7, 14) and calls == [2] * 7
        assert model.rows == [8] + [8, 2] * 7  # only the injected samples go through the model again
    else:
        assert (metrics["trigger_fired"], metrics["trigger_injected"], calls) == (0, 0, [])
        assert model.rows == [8] * 8


def weighted_trainer(provider, alpha=1.5):
    trigger = sfl.LossStdTrigger(provider, sfl.LossStdConfig(std_threshold=100.0, inject_ratio=0.25,
                                                             budget_frac=1.0, weight_alpha=alpha))
    trigger.decide(torch.ones(8))  # a previous micro-step: the next decision fires
    model = mlp()
    trainer = sfl.FastTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), trigger_hook=trigger,
                              device="cpu", criterion=nn.CrossEntropyLoss(reduction="none"), data_loader=[0])
    trainer.build()
    return trainer, model


def test_provider_weights_for_the_injected_or_the_concatenated_batch():
    torch.manual_seed(0)
    x, y = torch.randn(8, 8), torch.randint(0, 2, (8,))
    extra_w = torch.tensor([2.0, 3.0])
    trainer, model = weighted_trainer(lambda k, device, ctx: (ctx["inputs"][:k], ctx["targets"][:k], extra_w))
    loss, _ = trainer.forward((x, y))
    l = nn.functional.cross_entropy(model(x), y, reduction="none")  # noqa: E741
    injected = 1.5 * extra_w  # weights of the injected samples: times weight_alpha
    torch.testing.assert_close(loss, (l.sum() + (injected * l[:2]).sum()) / (8 + injected.sum()))
    # SpiralFastLoop's form: one weight per sample of the concatenated batch, used as given.
    joined = torch.cat([torch.ones(8), extra_w])
    trainer, model = weighted_trainer(lambda k, device, ctx: (ctx["inputs"][:k], ctx["targets"][:k], joined))
    loss, _ = trainer.forward((x, y))
    l = nn.functional.cross_entropy(model(x), y, reduction="none")  # noqa: E741
    torch.testing.assert_close(loss, (l.sum() + (extra_w * l[:2]).sum()) / joined.sum())
    # A weighted batch: injected samples without weights of their own weigh weight_alpha x 1.
    w = torch.rand(8) + 0.5
    trainer, model = weighted_trainer(lambda k, device, ctx: (ctx["inputs"][:k], ctx["targets"][:k]))
    loss, _ = trainer.forward((x, y, w))
    l = nn.functional.cross_entropy(model(x), y, reduction="none")  # noqa: E741
    torch.testing.assert_close(loss, ((w * l).sum() + 1.5 * l[:2].sum()) / (w.sum() + 3.0))
    bad = torch.ones(5)
    trainer, _ = weighted_trainer(lambda k, device, ctx: (ctx["inputs"][:k], ctx["targets"][:k], bad))
    with pytest.raises(ValueError, match=r"1-D tensor of 2 \(the injected samples\) or 10"):
        trainer.forward((x, y))
    trainer, _ = weighted_trainer(lambda k, device, ctx: (ctx["inputs"][:k], ctx["targets"][:k], -extra_w))
    with pytest.raises(ValueError, match="positive"):
        trainer.forward((x, y))
    trainer, _ = weighted_trainer(lambda k, device, ctx: ctx["inputs"][:k])
    with pytest.raises(TypeError, match=r"must return \(inputs, targets\)"):
        trainer.forward((x, y))


def test_our_providers_are_used_as_they_are():
    trigger = sfl.LossStdTrigger(HardestK())
    assert isinstance(trigger, OurTrigger) and isinstance(trigger.provider, HardestK)
    assert isinstance(sfl.LossStdTrigger(hardest).provider, sfl.SeedProvider)


def test_bad_arguments_name_the_argument():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="grad_accum must be an integer >= 1; got 0"):
        sfl.FastTrainer(model, opt, grad_accum=0)
    with pytest.raises(ValueError, match="log_interval must be an integer >= 1 or None; got 0"):
        sfl.FastTrainer(model, opt, log_interval=0)
    with pytest.raises(ValueError, match="amp must be"):
        sfl.FastTrainer(model, opt, amp="fp8")
    with pytest.raises(ValueError, match="compile must be"):
        sfl.FastTrainer(model, opt, compile="sometimes")
    with pytest.raises(TypeError, match="trigger_hook must be a LossStdTrigger"):
        sfl.FastTrainer(model, opt, trigger_hook=hardest)
    with pytest.raises(TypeError, match="grad_accum= instead of gradient_accumulation_steps="):
        sfl.FastTrainer(model, opt, gradient_accumulation_steps=2)
    trainer = sfl.FastTrainer(model, opt, trigger_hook=sfl.LossStdTrigger(hardest), device="cpu", log_interval=None)
    loader = sfl.dataloader_from_dataset(data(), batch_size=16, device="cpu")
    with pytest.raises(ValueError, match=r"reduction='mean'.*needs reduction='none'"):
        trainer.train_one_epoch(loader, nn.CrossEntropyLoss(), steps=1)
    with pytest.raises(ValueError, match="needs reduction='none'"):  # a function: found at its first loss
        trainer.train_one_epoch(loader, nn.functional.cross_entropy, steps=1)
    with pytest.raises(ValueError, match="steps must be an integer >= 1 or None"):
        trainer.train_one_epoch(loader, nn.CrossEntropyLoss(reduction="none"), steps=0)


def test_amp_maps_to_mixed_precision():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert sfl.FastTrainer(model, opt, device="cpu").autocast_dtype is None  # "auto": full precision on CPU
    assert sfl.FastTrainer(model, opt, device="cpu", amp="bf16").autocast_dtype == torch.bfloat16
    assert sfl.FastTrainer(model, opt, device="cpu", amp=False).mixed_precision is None


def failing_backend(graph_module, example_inputs):
    raise RuntimeError("no compiler here")


def test_compile_is_best_effort():
    torch.manual_seed(0)
    model = mlp()
    trainer = sfl.FastTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), device="cpu", log_interval=None)
    trainer.train_one_epoch(sfl.dataloader_from_dataset(data(), batch_size=16, device="cpu"), nn.CrossEntropyLoss())
    assert trainer.model is model  # compile="auto": eager on the CPU
    trainer = sfl.FastTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), device="cpu", log_interval=None,
                              compile={"backend": failing_backend})
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*no compiler here.*running eagerly"):
        metrics = trainer.train_one_epoch(sfl.dataloader_from_dataset(data(), batch_size=16, device="cpu"),
                                          nn.CrossEntropyLoss())
    assert trainer.model is model and metrics["step"] == 6 and math.isfinite(metrics["loss"])


def test_dataloader_from_dataset_chooses_for_the_device(monkeypatch):
    loader = sfl.dataloader_from_dataset(data(), batch_size=16, device="cpu")
    assert (loader.num_workers, loader.pin_memory, len(loader)) == (0, False, 6)
    assert callable(loader.state_dict)  # resumable
    monkeypatch.setattr(sfl, "resolve_device", lambda device: torch.device("cuda"))
    loader = sfl.dataloader_from_dataset(data(), batch_size=16, device="cuda")
    assert loader.pin_memory and loader.num_workers >= 1 and loader.persistent_workers
    assert sfl.dataloader_from_dataset(data(), batch_size=16, num_workers=0).num_workers == 0


@pytest.mark.slow  # a subprocess importing torch; about 6 s on an idle 2-core machine
def test_quickstart_example_runs():
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "spiralfastloop_quickstart.py")], cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "quickstart {'loss': " in proc.stdout and "'step': 98" in proc.stdout
    assert int(proc.stdout.rsplit("trigger fired ", 1)[1].split()[0]) > 0
