"""The step loop: accumulation, precision, non-finite retries, clipping, schedulers,
epochs, the fit() API and state round trips."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from helpers import flat_params, make_model, make_trainer, mse_forward, regression_batches
from mini_trainer import BaseHook, BaseTrainer, NonFiniteGradientError

# ----------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("accumulation", [2, 4])
def test_accumulated_gradients_equal_one_big_batch(accumulation):
    big = regression_batches(3, 32, seed=1)
    small = [(x[i : i + 32 // accumulation], y[i : i + 32 // accumulation])
             for x, y in big for i in range(0, 32, 32 // accumulation)]
    one = make_trainer(big, max_steps=3)
    many = make_trainer(small, max_steps=3, gradient_accumulation_steps=accumulation)
    one.train()
    many.train()
    assert many.step == one.step == 3
    torch.testing.assert_close(flat_params(many.model), flat_params(one.model), rtol=1e-5, atol=1e-6)
    # The logged loss is the mean over micro-batches, i.e. the big batch's loss.
    assert math.isclose(float(many.step_info["loss"]), float(one.step_info["loss"]), rel_tol=1e-5)


def test_none_loss_skips_the_micro_step_and_the_rest_are_averaged():
    batches = regression_batches(4, 8, seed=2)

    def forward_skipping_odd(model, batch):
        x, y = batch
        if x[0, 0] > 100:  # marker batch
            return None, {}
        return mse_forward(model, batch)

    marker = (torch.full((8, 4), 1000.0), torch.zeros(8, 1))
    with_skips = make_trainer([batches[0], marker, batches[1], marker], forward_fn=forward_skipping_odd,
                              gradient_accumulation_steps=2, max_steps=2)
    plain = make_trainer([batches[0], batches[1]], max_steps=2)
    with_skips.train()
    plain.train()
    torch.testing.assert_close(flat_params(with_skips.model), flat_params(plain.model))
    assert with_skips.step_info["micro_steps"] == 1


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_forward_runs_under_autocast(precision, dtype):
    seen = []

    def forward(model, batch):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return mse_forward(model, batch)

    trainer = make_trainer(regression_batches(3, 8), forward_fn=forward, mixed_precision=precision, max_steps=3)
    trainer.train()
    assert seen == [(True, dtype)] * 3
    assert (trainer.grad_scaler is not None) == (precision == "fp16")
    assert torch.isfinite(flat_params(trainer.model)).all()


def test_fp16_scaler_skips_inf_steps_instead_of_failing():
    batches = regression_batches(6, 8)
    batches[2] = (torch.full((8, 4), float("inf")), torch.zeros(8, 1))
    trainer = make_trainer(batches, mixed_precision="fp16", max_steps=6, max_non_finite_grad_retries=0)
    trainer.build()
    start_scale = trainer.grad_scaler.get_scale()
    trainer.train()
    assert trainer.step == 6
    assert trainer.grad_scaler.get_scale() < start_scale  # the scaler backed off
    assert torch.isfinite(flat_params(trainer.model)).all()


def test_auto_precision_is_full_precision_on_cpu():
    trainer = make_trainer(regression_batches(1, 4), mixed_precision="auto", max_steps=1)
    assert trainer.autocast_dtype is None


# ----------------------------------------------------------------------------- non-finite


def _nan_batches(n_bad: int, total: int = 8):
    batches = regression_batches(total, 8, seed=3)
    for i in range(n_bad):
        batches[i] = (torch.full((8, 4), float("nan")), torch.zeros(8, 1))
    return batches


def test_non_finite_gradients_are_retried_with_fresh_batches():
    trainer = make_trainer(_nan_batches(2), max_non_finite_grad_retries=2, max_steps=1)
    seen = []

    class Spy(BaseHook):
        def on_after_step(self, trainer):
            seen.append(dict(trainer.step_info))

    trainer._given["hooks"] = [Spy()]
    trainer.train()
    assert trainer.step == 1
    assert seen[0]["retries"] == 2
    assert trainer.batch_in_epoch == 3  # two discarded batches, then a fresh good one
    assert torch.isfinite(flat_params(trainer.model)).all()


def test_non_finite_gradients_raise_after_the_limit_naming_the_step():
    trainer = make_trainer(_nan_batches(5), max_non_finite_grad_retries=2, max_steps=3)
    trainer.build()
    before = flat_params(trainer.model).clone()
    with pytest.raises(NonFiniteGradientError, match=r"step 1 .*max_non_finite_grad_retries=2"):
        trainer.train()
    torch.testing.assert_close(flat_params(trainer.model), before)  # nothing was applied


def test_unchecked_mode_applies_whatever_the_optimizer_gets():
    trainer = make_trainer(_nan_batches(1), max_non_finite_grad_retries=None, max_steps=1)
    trainer.train()
    assert not torch.isfinite(flat_params(trainer.model)).all()


# ----------------------------------------------------------------------------- clipping / lr


def test_grad_norm_is_reported_before_clipping_and_the_update_is_clipped():
    batches = regression_batches(1, 16)
    reference = make_model()
    loss, _ = mse_forward(reference, batches[0])
    loss.backward()
    expected = torch.norm(torch.stack([p.grad.norm() for p in reference.parameters()]))
    trainer = make_trainer(batches, grad_clip=0.01, lr=1.0, max_steps=1)
    trainer.build()
    before = flat_params(trainer.model).clone()
    trainer.train()
    assert math.isclose(float(trainer.step_info["grad_norm"]), float(expected), rel_tol=1e-5)
    assert float((flat_params(trainer.model) - before).norm()) == pytest.approx(0.01, rel=1e-4)


def test_scheduler_steps_once_per_optimizer_step():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trainer = BaseTrainer(model=model, optimizer=opt, lr_scheduler=sched, data_loader=regression_batches(12, 4),
                          forward_fn=mse_forward, gradient_accumulation_steps=3, max_steps=4, device="cpu")
    trainer.train()
    assert sched.last_epoch == 4
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5**4)
    assert trainer.step_info["lr"] == pytest.approx(0.5**3)  # the lr the last step used


# ----------------------------------------------------------------------------- epochs


class RecordingSampler(torch.utils.data.Sampler):
    def __init__(self, n):
        self.n, self.epochs = n, []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self):
        return self.n


def _loader(n_samples=16, batch_size=4):
    x, y = regression_batches(1, n_samples)[0]
    sampler = RecordingSampler(n_samples)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, sampler=sampler)
    return loader, sampler


def test_finite_loaders_roll_over_epochs_and_call_set_epoch():
    loader, sampler = _loader()  # 4 batches per epoch
    trainer = make_trainer(loader, max_steps=10)
    trainer.train()
    assert trainer.step == 10
    assert trainer.epoch == 2 and trainer.batch_in_epoch == 2
    assert sampler.epochs == [0, 1, 2]


def test_max_epochs_stops_at_the_epoch_end_even_mid_accumulation():
    loader, sampler = _loader()  # 4 batches: one step of 3 micro-batches + one partial step
    trainer = make_trainer(loader, max_epochs=1, gradient_accumulation_steps=3)
    steps = []

    class Spy(BaseHook):
        def on_before_step(self, trainer):
            steps.append(trainer.step)

    trainer._given["hooks"] = [Spy()]
    trainer.train()
    assert trainer.step == 2 and trainer.epoch == 1
    assert steps == [0, 1]  # no phantom step after the data ran out
    assert trainer.step_info["micro_steps"] == 1


def test_a_generator_that_cannot_restart_gets_a_clear_error():
    trainer = make_trainer((b for b in regression_batches(2, 4)), max_steps=5)
    with pytest.raises(ValueError, match="data_loader yielded no batches"):
        trainer.train()


# ----------------------------------------------------------------------------- fit API


def test_fit_returns_averaged_metrics_and_counts_epochs():
    loader, _ = _loader()
    trainer = make_trainer(None, lr=0.05)
    first = trainer.fit(loader, epochs=2)
    assert first["step"] == 8 and first["epoch"] == 2
    assert set(first) >= {"loss", "mae", "grad_norm", "step", "epoch"}
    second = trainer.fit(epochs=1)
    assert second["step"] == 12 and second["epoch"] == 3
    assert second["loss"] < first["loss"]
    third = trainer.fit(steps=3)
    assert third["step"] == 15


class SubclassTrainer(BaseTrainer):
    def build_data_loader(self):
        return regression_batches(4, 8)

    def build_model(self):
        return make_model()

    def build_optimizer(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.1)

    def forward(self, batch):
        return mse_forward(self.model, batch)


def test_subclass_and_ready_objects_train_identically():
    sub = SubclassTrainer(max_steps=6, device="cpu")
    ready = make_trainer(regression_batches(4, 8), max_steps=6)
    sub.train()
    ready.train()
    torch.testing.assert_close(flat_params(sub.model), flat_params(ready.model))


def test_seed_makes_initialisation_reproducible():
    class Seeded(SubclassTrainer):
        def build_model(self):
            return nn.Linear(4, 1)

    a, b = Seeded(max_steps=1, seed=7, device="cpu"), Seeded(max_steps=1, seed=7, device="cpu")
    a.build(), b.build()
    torch.testing.assert_close(flat_params(a.model), flat_params(b.model))


# ----------------------------------------------------------------------------- state


def test_state_dict_round_trip_restores_training_state():
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    trainer = BaseTrainer(model=model, optimizer=opt, lr_scheduler=sched, data_loader=regression_batches(4, 8),
                          forward_fn=mse_forward, max_steps=6, device="cpu")
    trainer.train()
    state = trainer.state_dict()

    other_model = make_model(seed=5)
    other_opt = torch.optim.Adam(other_model.parameters(), lr=1e-2)
    other = BaseTrainer(model=other_model, optimizer=other_opt,
                        lr_scheduler=torch.optim.lr_scheduler.StepLR(other_opt, step_size=2, gamma=0.5),
                        data_loader=regression_batches(4, 8), forward_fn=mse_forward, max_steps=6, device="cpu")
    other.load_state_dict(state)
    assert (other.step, other.epoch, other.batch_in_epoch) == (6, 1, 2)
    torch.testing.assert_close(flat_params(other.model), flat_params(trainer.model))
    torch.testing.assert_close(other.optimizer.state_dict(), trainer.optimizer.state_dict())
    assert other.lr_scheduler.state_dict() == trainer.lr_scheduler.state_dict()
    other.train()  # already at max_steps: nothing to do
    assert other.step == 6


def test_compiled_model_unwraps_for_state_and_trains():
    pytest.importorskip("torch._dynamo")
    trainer = make_trainer(regression_batches(2, 8), max_steps=2, compile={"backend": "eager"})
    trainer.train()
    assert trainer.model is not trainer.unwrapped_model
    assert set(trainer.state_dict()["model"]) == set(make_model().state_dict())


# ----------------------------------------------------------------------------- edge cases


def test_only_the_optimizers_parameters_are_clipped_checked_and_measured():
    model = make_model()
    frozen_out = list(model[0].parameters())  # require grad, but the optimizer never sees them
    opt = torch.optim.SGD(model[2].parameters(), lr=0.0)
    batch = regression_batches(1, 8)[0]
    trainer = BaseTrainer(model=model, optimizer=opt, data_loader=[batch] * 4, forward_fn=mse_forward,
                          max_steps=4, device="cpu")
    norms = []

    class Spy(BaseHook):
        def on_after_step(self, trainer):
            norms.append(float(trainer.step_info["grad_norm"]))

    trainer._given["hooks"] = [Spy()]
    trainer.train()
    assert norms == pytest.approx([norms[0]] * 4)  # no build-up from the first layer's stale grads
    assert all(p.grad is not None for p in frozen_out)  # the user's business, as in plain PyTorch


def test_parameters_unfrozen_later_are_clipped_too():
    model = make_model()
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1)
    trainer = BaseTrainer(model=model, optimizer=opt, data_loader=regression_batches(4, 8), forward_fn=mse_forward,
                          max_steps=2, grad_clip=1e-3, device="cpu")
    trainer.train()
    opt.add_param_group({"params": list(model[0].parameters())})
    before = flat_params(model[0]).clone()
    trainer.max_steps = 3
    trainer.train()
    assert 0 < float((flat_params(model[0]) - before).norm()) <= 0.1 * 1e-3 * 1.0001


def test_records_are_detached_and_may_not_shadow_step_metrics():
    def forward(model, batch):
        loss, _ = mse_forward(model, batch)
        return loss, {"raw": loss, "nested": {"raw": loss * 2}}

    trainer = make_trainer(regression_batches(2, 4), forward_fn=forward, max_steps=1)
    trainer.train()
    records = trainer.step_info["records"]
    assert not records["raw"].requires_grad and not records["nested"]["raw"].requires_grad

    clash = make_trainer(regression_batches(2, 4), forward_fn=lambda m, b: (mse_forward(m, b)[0], {"lr": 1.0}),
                         max_steps=1)
    with pytest.raises(ValueError, match=r"records named \['lr'\].*rename"):
        clash.train()


def test_fp16_overflow_step_does_not_advance_the_schedule():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    batches = regression_batches(4, 8)
    batches[1] = (torch.full((8, 4), float("inf")), torch.zeros(8, 1))
    skipped = []

    class Spy(BaseHook):
        def on_after_step(self, trainer):
            skipped.append(trainer.step_info["skipped"])

    trainer = BaseTrainer(model=model, optimizer=opt, lr_scheduler=sched, data_loader=batches, forward_fn=mse_forward,
                          mixed_precision="fp16", grad_scaler=torch.amp.GradScaler("cpu", init_scale=16.0),
                          hooks=[Spy()], max_steps=4, device="cpu")
    with warnings_as_errors():
        trainer.train()
    assert skipped == [False, True, False, False]
    assert sched.last_epoch == 3


def warnings_as_errors():
    import warnings

    class _Ctx:
        def __enter__(self):
            self._cm = warnings.catch_warnings()
            self._cm.__enter__()
            warnings.simplefilter("error", UserWarning)

        def __exit__(self, *exc):
            return self._cm.__exit__(*exc)

    return _Ctx()


def test_resume_mid_epoch_skips_the_batches_already_seen_with_a_plain_loader():
    batches = regression_batches(6, 4)
    seen = []

    def forward(model, batch):
        seen.append(batch[0][0, 0].item())
        return mse_forward(model, batch)

    first = make_trainer(batches, forward_fn=forward, max_steps=2)
    first.train()
    state = first.state_dict()
    seen.clear()
    second = make_trainer(batches, forward_fn=forward, max_steps=4)
    second.load_state_dict(state)
    second.train()
    assert seen == [batches[2][0][0, 0].item(), batches[3][0][0, 0].item()]


def test_resume_at_an_epoch_end_with_a_stateful_loader_keeps_every_epoch():
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader():
        x, y = regression_batches(1, 20)[0]
        return StatefulDataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True,
                                  generator=torch.Generator().manual_seed(0))

    epochs_seen = []

    class Spy(BaseHook):
        def on_after_step(self, trainer):
            epochs_seen.append(trainer.epoch)

    straight = make_trainer(loader(), max_epochs=3, hooks=[Spy()])
    straight.train()
    reference, epochs_seen[:] = list(epochs_seen), []

    first = make_trainer(loader(), max_epochs=1, hooks=[Spy()])
    first.train()
    state = first.state_dict()
    second = make_trainer(loader(), max_epochs=3, hooks=[Spy()])
    second.load_state_dict(state)
    second.train()
    assert (second.step, second.epoch) == (15, 3)
    assert epochs_seen == reference == [0] * 5 + [1] * 5 + [2] * 5


def test_fit_uses_the_given_loader_with_a_subclass_and_restores_limits():
    trainer = SubclassTrainer(max_steps=100, device="cpu")
    loader, sampler = _loader()
    metrics = trainer.fit(loader, steps=3)
    assert sampler.epochs == [0] and trainer.data_loader is loader
    assert metrics["step"] == 3 and (trainer.max_steps, trainer.max_epochs) == (100, None)
    mid = trainer.fit(epochs=1)  # the rest of the current epoch counts as one
    assert (mid["step"], mid["epoch"]) == (4, 1)


def test_train_twice_continues_and_should_stop_ends_early():
    trainer = make_trainer(regression_batches(4, 4), max_steps=2)
    trainer.train()
    trainer.max_steps = 5
    trainer.train()
    assert trainer.step == 5

    class StopAt(BaseHook):
        def on_after_step(self, trainer):
            trainer.should_stop = trainer.step >= 2

    stopper = make_trainer(regression_batches(4, 4), max_steps=10, hooks=[StopAt()])
    stopper.train()
    assert stopper.step == 2


def test_state_dict_before_the_first_batch_changes_nothing_that_follows():
    # StatefulDataLoader.state_dict() without an iterator creates one: right after a resume
    # that used up the restored position (the epoch started over) and drew from the global
    # RNG. Found by check_resume; a checkpoint taken right after resuming must be harmless.
    from mini_trainer.data import tensor_loader

    def trainer() -> BaseTrainer:
        torch.manual_seed(0)  # the same initial weights every time
        g = torch.Generator().manual_seed(0)
        x = torch.randn(40, 4, generator=g)
        loader = tensor_loader(x, x.sum(1, keepdim=True), batch_size=4, seed=0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))
        return make_trainer(loader, model=model, seed=0)

    reference = trainer()
    reference.fit(steps=6)
    saved = trainer()
    saved.fit(steps=3)
    state = saved.state_dict()
    for touch in (False, True):
        resumed = trainer()
        resumed.build()
        resumed.load_state_dict(state)
        if touch:
            resumed.state_dict()  # e.g. a save right after resuming
        resumed.fit(steps=3)
        assert torch.equal(flat_params(resumed.model), flat_params(reference.model)), f"touched={touch}"
    fresh = trainer()
    fresh.state_dict()  # before the first batch
    fresh.fit(steps=6)
    assert torch.equal(flat_params(fresh.model), flat_params(reference.model))
