"""Evaluation during training: `evaluate()` (exact sample means, splits, other weights, the
state it leaves), `EvalHook`'s schedule (also across a resume), and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from helpers import flat_params, make_model, make_trainer, mse_forward, regression_batches
from mini_trainer import BaseHook, CheckpointingHook, EmaHook, EvalHook, LoggingHook, build_from_cfg
from mini_trainer.evaluation import rank_batches


def val_data(n: int = 23, seed: int = 5) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g))


def exact_mse_and_mae(model: nn.Module, data: TensorDataset) -> tuple[float, float]:
    x, y = data.tensors
    with torch.no_grad():
        pred = model(x)
    return nn.functional.mse_loss(pred, y).item(), (pred - y).abs().mean().item()


# =========================================================================== evaluate()


def test_evaluate_is_the_mean_over_samples_not_over_batches():
    data = val_data(23)  # batches of 5, 5, 5, 5, 3: a mean of batch means would be off
    trainer = make_trainer(regression_batches(4, 8), max_steps=1, eval_loaders=DataLoader(data, batch_size=5))
    results = trainer.evaluate()
    mse, mae = exact_mse_and_mae(trainer.model, data)
    assert set(results) == {"val/loss", "val/mae"}  # one loader is the split "val"
    assert results["val/loss"] == pytest.approx(mse, rel=1e-6)
    assert results["val/mae"] == pytest.approx(mae, rel=1e-6)
    batch_means = [mse_forward(trainer.model, b)[0].item() for b in DataLoader(data, batch_size=5)]
    assert abs(sum(batch_means) / len(batch_means) - mse) > 1e-4  # the test can tell the two apart


def test_evaluate_splits_loaders_argument_and_list_batches():
    a, b = val_data(11, seed=1), val_data(6, seed=2)
    loaders = {"val": DataLoader(a, batch_size=4), "test": list(DataLoader(b, batch_size=4))}
    trainer = make_trainer(regression_batches(4, 8), max_steps=1, eval_loaders=loaders)
    results = trainer.evaluate()
    assert list(results) == ["val/loss", "val/mae", "test/loss", "test/mae"]
    assert results["test/loss"] == pytest.approx(exact_mse_and_mae(trainer.model, b)[0], rel=1e-6)
    only = trainer.evaluate({"other": DataLoader(b, batch_size=6)})
    assert only == pytest.approx({"other/loss": results["test/loss"], "other/mae": results["test/mae"]}, rel=1e-6)


def test_evaluate_other_weights_eval_mode_no_grad_and_rng_untouched():
    seen = {}

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_model(3)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            seen["training"], seen["grad"] = self.training, torch.is_grad_enabled()
            return self.drop(self.net(x))

    model = Probe()
    other = make_model(4)
    trainer = make_trainer(regression_batches(4, 8), model=model, max_steps=1, eval_loaders=[val_data(8)[:]])
    trainer.build()
    model.net.train()
    model.net[0].eval()  # a half-frozen model gets its own modes back
    state = torch.get_rng_state()
    first = trainer.evaluate()
    assert seen == {"training": False, "grad": False}
    assert first == trainer.evaluate()  # no dropout in eval mode: the same numbers twice
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training and model.net.training and not model.net[0].training
    scored = trainer.evaluate(model=other)
    assert scored["val/loss"] == pytest.approx(exact_mse_and_mae(other, val_data(8))[0], rel=1e-6)
    assert trainer.model is model  # put back


def test_evaluate_restores_modes_and_model_when_eval_forward_raises():
    class Failing(type(make_trainer([], max_steps=1))):
        def eval_forward(self, batch):
            raise RuntimeError("boom")

    model = make_model()
    trainer = Failing(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), forward_fn=mse_forward,
                      data_loader=regression_batches(2, 4), eval_loaders=regression_batches(2, 4), max_steps=1)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.evaluate()
    assert model.training and trainer.model is model


def test_eval_forward_override_and_samples_weight():
    class TokenWeighted(type(make_trainer([], max_steps=1))):
        def eval_forward(self, batch):
            x, _ = batch
            return {"value": x[:, 0].mean(), "samples": 10 * len(x), "constant": 2}

    model = make_model()
    data = val_data(9)
    trainer = TokenWeighted(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                            forward_fn=mse_forward, data_loader=regression_batches(2, 4),
                            eval_loaders={"val": DataLoader(data, batch_size=4)}, max_steps=1)
    results = trainer.evaluate()
    assert results["val/value"] == pytest.approx(data.tensors[0][:, 0].mean().item(), rel=1e-6)
    assert results["val/constant"] == 2.0 and "val/samples" not in results


def test_training_with_evaluation_equals_training_without():
    """Evaluating (with a DataLoader, which draws a seed from the global RNG) between steps
    changes nothing in the training: same weights bit for bit, with dropout on."""
    def run(hooks, eval_loaders=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.Linear(16, 1))
        trainer = make_trainer(regression_batches(6, 8), model=model, max_steps=12, seed=0, hooks=hooks,
                               eval_loaders=eval_loaders)
        trainer.train()
        return flat_params(trainer.model)

    loader = DataLoader(val_data(13), batch_size=4, shuffle=True)
    assert torch.equal(run([]), run([EvalHook(interval=2, every_epoch=True)], loader))


def test_rank_batches_gives_each_rank_its_batches_once():
    data = val_data(23)
    loader = DataLoader(data, batch_size=5)
    everything = torch.cat([x for x, _ in loader])
    for world in (2, 3):
        parts = [list(rank_batches(loader, rank, world)) for rank in range(world)]
        assert [len(p) for p in parts] == [len(range(r, 5, world)) for r in range(world)]
        order = [batch for index in range(5) for batch in [parts[index % world][index // world]]]
        assert torch.equal(torch.cat([x for x, _ in order]), everything)
        as_list = [list(rank_batches(list(loader), rank, world)) for rank in range(world)]
        assert [len(p) for p in as_list] == [len(p) for p in parts]


# =========================================================================== EvalHook


class Recorder(BaseHook):
    """The steps evaluated in this process (reads step_info after EvalHook)."""

    priority = 50

    def __init__(self):
        self.evaluated = []

    def on_after_step(self, trainer):
        if "eval" in trainer.step_info:
            self.evaluated.append((trainer.step, dict(trainer.step_info["eval"])))

    def on_after_train(self, trainer):
        results = trainer.step_info.get("eval")
        if results is not None and (not self.evaluated or self.evaluated[-1][1] is not results):
            if not self.evaluated or self.evaluated[-1] != (trainer.step, results):
                self.evaluated.append((trainer.step, dict(results)))


def test_eval_hook_schedule_interval_epochs_and_end(tmp_path):
    # 7 batches per epoch, accumulation 2: epochs end inside steps 4, 7, 11, 14 (the 7th
    # step draws batch 7 of epoch 0... see below) and training stops at step 15.
    loader = DataLoader(TensorDataset(*[t for t in val_data(28).tensors]), batch_size=4)  # 7 batches
    recorder = Recorder()
    trainer = make_trainer(loader, max_steps=15, gradient_accumulation_steps=2, workspace=tmp_path,
                           eval_loaders=DataLoader(val_data(9), batch_size=4),
                           hooks=[EvalHook(interval=5, every_epoch=True), recorder, LoggingHook(interval=100)])
    trainer.train()
    # batches drawn after step s: 2s; epoch k (7 batches) is complete once 7(k+1) are drawn.
    by_epoch = [math.ceil(7 * (k + 1) / 2) for k in range(4)]  # 4, 7, 11, 14
    expected = sorted({5, 10, 15} | set(by_epoch))
    assert [step for step, _ in recorder.evaluated] == expected
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "val/loss" in r] == expected
    assert all(set(r) == {"step", "epoch", "val/loss", "val/mae"} for r in logged if "val/loss" in r)


def test_eval_hook_at_end_once_and_splits_and_ema():
    recorder = Recorder()
    loaders = {"val": regression_batches(2, 5, seed=3), "test": regression_batches(2, 5, seed=4)}
    trainer = make_trainer(regression_batches(4, 8), max_steps=6, eval_loaders=loaders,
                           hooks=[EvalHook(interval=3, splits=["val"], ema=True), EmaHook(decay=0.5), recorder])
    trainer.train()
    assert [s for s, _ in recorder.evaluated] == [3, 6]  # the end is step 6, evaluated already
    assert set(recorder.evaluated[-1][1]) == {"val/loss", "val/mae", "ema_val/loss", "ema_val/mae"}
    ema = next(h for h in trainer.hooks if isinstance(h, EmaHook)).ema_model
    assert recorder.evaluated[-1][1]["ema_val/loss"] == trainer.evaluate(loaders, model=ema)["val/loss"]


def test_eval_hook_resumed_run_evaluates_at_the_same_steps(tmp_path):
    """Killed mid-epoch right after an evaluation that came after its last checkpoint: the
    resumed run evaluates again exactly where the uninterrupted one did, with the same
    numbers (tests/test_resume_reliability.py does this with real SIGKILLs)."""
    loader = DataLoader(TensorDataset(*val_data(40).tensors), batch_size=4, shuffle=False)  # 10 batches/epoch
    val = DataLoader(val_data(9), batch_size=4)

    class Crash(BaseHook):
        priority = 75  # after EvalHook (5) evaluated step 8, before the checkpointing hook (100) could save it

        def on_after_step(self, trainer):
            if trainer.step == 8:
                raise KeyboardInterrupt

    def run(workspace, *extra):
        recorder = Recorder()
        trainer = make_trainer(loader, max_steps=20, gradient_accumulation_steps=3, workspace=workspace,
                               eval_loaders=val, seed=0,
                               hooks=[EvalHook(interval=4, every_epoch=True), recorder,
                                      CheckpointingHook(interval=7), *extra])
        try:
            trainer.train()
        except KeyboardInterrupt:
            pass
        return recorder.evaluated

    reference = run(tmp_path / "a")
    first = run(tmp_path / "b", Crash())  # dies after step 8 (mid-epoch 2: 24 batches); step 7 was saved
    second = run(tmp_path / "b")
    steps = [s for s, _ in reference]
    epoch_ends = {math.ceil(10 * k / 3) for k in range(1, 7)}  # 3 batches a step: 4, 7, 10, 14, 17, 20
    assert steps == sorted({4, 8, 12, 16, 20} | epoch_ends)
    assert [s for s, _ in first] == [4, 7, 8]  # it died having evaluated step 8, which was never saved
    assert [s for s, _ in second] == [s for s in steps if s > 7]  # step 8 is evaluated again, nothing else
    assert dict(first) | dict(second) == dict(reference)  # bit-identical results


# =========================================================================== bad input


def test_bad_eval_loaders_name_the_argument():
    def build(**kwargs):
        return make_trainer(regression_batches(2, 4), max_steps=1, **kwargs)

    with pytest.raises(TypeError, match=r"eval_loaders must be an iterable of batches .* got int"):
        build(eval_loaders=3)
    with pytest.raises(TypeError, match=r"eval_loaders\['test'\] must be an iterable"):
        build(eval_loaders={"val": [], "test": 1.5})
    with pytest.raises(TypeError, match=r"eval_loaders is an iterator \(generator\)"):
        build(eval_loaders=(b for b in regression_batches(2, 4)))
    with pytest.raises(ValueError, match="split names must be non-empty strings without '/'"):
        build(eval_loaders={"a/b": []})
    data = val_data(8)
    sampler = DistributedSampler(data, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="DistributedSampler, which pads"):
        build(eval_loaders=DataLoader(data, sampler=sampler))
    with pytest.raises(TypeError, match=r"evaluate\(loaders\) must be an iterable"):
        build(eval_loaders=[]).evaluate(loaders="text")
    with pytest.raises(TypeError, match=r"evaluate\(model\) must be an nn.Module .* got str"):
        build(eval_loaders=[]).evaluate(model="ema")


@pytest.mark.parametrize(
    "records, error, needle",
    [
        ([1.0], TypeError, "must return a dict of numbers; got list"),
        ({"x": "high"}, TypeError, "record 'x' of type str"),
        ({"x": torch.ones(3)}, TypeError, "record 'x' as a tensor of shape \\(3,\\)"),
        ({"x": 1.0, "samples": 0}, ValueError, "cannot weight this batch"),
    ],
)
def test_eval_forward_returning_non_numbers_is_an_error(records, error, needle):
    class Bad(type(make_trainer([], max_steps=1))):
        def eval_forward(self, batch):
            return records

    model = make_model()
    trainer = Bad(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), forward_fn=mse_forward,
                  data_loader=regression_batches(2, 4), eval_loaders=regression_batches(2, 4), max_steps=1)
    with pytest.raises(error, match=f"Bad.eval_forward.*{needle}|{needle}"):
        trainer.evaluate()


@pytest.mark.parametrize(
    "kwargs, error, needle",
    [
        (dict(interval=0), ValueError, "EvalHook.interval must be an integer >= 1"),
        (dict(interval=-2), ValueError, "EvalHook.interval must be an integer >= 1"),
        (dict(every_epoch=1), TypeError, "EvalHook.every_epoch must be True or False"),
        (dict(ema=3), TypeError, "EvalHook.ema must be True, False or an EmaHook name"),
        (dict(splits="val"), TypeError, "EvalHook.splits must be a list"),
        (dict(at_end=False), ValueError, "would never evaluate"),
    ],
)
def test_eval_hook_bad_arguments(kwargs, error, needle):
    with pytest.raises(error, match=needle):
        EvalHook(**kwargs)


def test_eval_hook_checks_what_it_needs_before_the_first_step():
    for hooks, loaders, needle in [
        ([EvalHook(interval=1)], None, "the trainer has no eval_loaders"),
        ([EvalHook(interval=1, splits=["test"])], {"val": []}, r"EvalHook.splits: \['test'\] not in"),
        ([EvalHook(interval=1, ema=True)], {"val": []}, "no such EmaHook"),
    ]:
        trainer = make_trainer(regression_batches(2, 4), max_steps=3, hooks=hooks, eval_loaders=loaders)
        with pytest.raises(ValueError, match=needle):
            trainer.train()
        assert trainer.step == 0


def test_every_new_hook_is_registered():
    from mini_trainer import REGISTRY

    for name in ("EvalHook", "EarlyStoppingHook", "TensorBoardHook", "CsvLoggerHook", "MfuHook"):
        assert name in REGISTRY, name


def test_hooks_build_from_a_config():
    hook = build_from_cfg({"type": "EvalHook", "interval": 5, "splits": ["val"]})
    assert isinstance(hook, EvalHook) and hook.interval == 5 and hook.splits == ["val"]
    stopper = build_from_cfg({"type": "EarlyStoppingHook", "monitor": "val/accuracy", "mode": "max"})
    assert stopper.monitor == "val/accuracy"


# =========================================================================== edge cases


def test_two_eval_hooks_merge_their_results_and_keep_their_own_state(tmp_path):
    loaders = {"val": regression_batches(2, 5, seed=3), "test": regression_batches(2, 5, seed=4)}
    recorder = Recorder()

    def build(max_steps):
        return make_trainer(regression_batches(4, 8), max_steps=max_steps, eval_loaders=loaders, workspace=tmp_path,
                            hooks=[EvalHook(interval=2, splits=["val"]),
                                   EvalHook(every_epoch=True, splits=["test"], name="test_eval"),
                                   CheckpointingHook(interval=3, keep_best="val/loss"), recorder])

    build(8).train()
    at = dict(recorder.evaluated)
    assert set(at[4]) == {"val/loss", "val/mae", "test/loss", "test/mae"}  # step 4 ends epoch 0: both evaluated
    assert set(at[2]) == {"val/loss", "val/mae"}
    saved = json.loads((tmp_path / "checkpoints" / "step_000000006" / "manifest.json").read_text())["state"]["hooks"]
    assert saved["eval"] == {"last_step": 6, "epochs_evaluated": 1}
    assert saved["test_eval"] == {"last_step": 4, "epochs_evaluated": 1}
    with pytest.raises(ValueError, match="two EvalHooks are named 'eval'"):
        make_trainer(regression_batches(4, 8), max_steps=2, eval_loaders=loaders,
                     hooks=[EvalHook(interval=1), EvalHook(at_end=True)]).train()


def test_a_finished_run_started_again_does_not_evaluate_again(tmp_path):
    def run(max_steps):
        recorder = Recorder()
        trainer = make_trainer(regression_batches(4, 8), max_steps=max_steps, workspace=tmp_path,
                               eval_loaders=regression_batches(2, 5, seed=3),
                               hooks=[EvalHook(interval=10), CheckpointingHook(interval=5), recorder])
        trainer.train()
        return [step for step, _ in recorder.evaluated]

    assert run(25) == [10, 20, 25]  # 25: at the end, after step 25's checkpoint was written: saved again
    assert run(25) == []


def test_a_tensor_samples_count_weights_without_a_host_read():
    class Tokens(type(make_trainer([], max_steps=1))):
        def eval_forward(self, batch):
            x, _ = batch
            mask = x[:, 0] > 0
            return {"positive_mean": (x[:, 1] * mask).sum() / mask.sum().clamp_min(1), "samples": mask.sum()}

    data = val_data(40)
    model = make_model()
    trainer = Tokens(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), forward_fn=mse_forward,
                     data_loader=regression_batches(2, 4), eval_loaders=DataLoader(data, batch_size=6), max_steps=1)
    x = data.tensors[0]
    assert trainer.evaluate()["val/positive_mean"] == pytest.approx(x[x[:, 0] > 0, 1].mean().item(), rel=1e-6)


def test_rank_batches_of_shuffling_and_iterable_loaders():
    data = TensorDataset(torch.arange(23.0))
    shuffled = DataLoader(data, batch_size=4, shuffle=True)  # each rank would shuffle its own way
    seen = []
    for rank in range(2):
        torch.manual_seed(rank)
        seen += [v for (batch,) in rank_batches(shuffled, rank, 2) for v in batch.tolist()]
    assert sorted(seen) == list(range(23))  # every sample once

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(torch.arange(10.0))

    streamed = [v for rank in range(2) for batch in rank_batches(DataLoader(Stream(), batch_size=3), rank, 2)
                for v in batch.tolist()]
    assert sorted(streamed) == list(range(10))


def test_classification_trainer_scores_plain_cross_entropy():
    from mini_trainer import ClassificationTrainer

    data = val_data(20)
    x, y = data.tensors[0], (data.tensors[1][:, 0] > 0).long()
    model = nn.Linear(4, 2)
    trainer = ClassificationTrainer(model_cfg=model, optimizer_cfg={"type": "torch.optim.SGD", "lr": 0.1},
                                    data_cfg={"type": lambda: DataLoader(TensorDataset(x, y), batch_size=8)},
                                    label_smoothing=0.3, eval_loaders=DataLoader(TensorDataset(x, y), batch_size=6),
                                    max_steps=1, device="cpu")
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model(x), y).item()  # without the smoothing
    assert trainer.evaluate()["val/loss"] == pytest.approx(expected, rel=1e-6)
