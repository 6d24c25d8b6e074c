"""PhaseTrainer and its parts: the phase machine, the predictors on trajectories whose
answer is known, packed ternary codes, VSA compression, and the trainer (no backward on
PREDICT steps, records, exact resume)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mini_trainer import BaseHook, CheckpointingHook
from mini_trainer.data import tensor_loader
from mini_trainer.strategies import (
    LeastSquaresPredictor,
    MomentumPredictor,
    Phase,
    PhaseConfig,
    PhaseController,
    PhaseStep,
    PhaseTrainer,
    TernaryGradientAccumulator,
    VSAGradientCompressor,
    reconstruction_cosine,
    ternarize,
)


def phases(config: PhaseConfig, steps: int) -> str:
    controller = PhaseController(config)
    letters = []
    for _ in range(steps):
        info = controller.begin_step()
        letters.append(info.phase.value[0].upper())
        controller.end_step(1.0)
    return "".join(letters)


@pytest.mark.parametrize(
    "config, expected",
    [
        # phase_step is not reset by CORRECT: C at phase_step 3 and 6, FULL once it reaches 7.
        (PhaseConfig(warmup_steps=0, full_steps=2, predict_steps=7, correct_every=3), "FFPPPCPPC" * 2 + "FF"),
        # A CORRECT at phase_step == predict_steps too (20 % 5 == 0), as the crate does.
        (PhaseConfig(warmup_steps=0, full_steps=5, predict_steps=20, correct_every=5),
         "FFFFF" + "PPPPPC" + "PPPPC" * 3 + "F"),
        # Warmup first (at least 2 steps for a slope), then cycles.
        (PhaseConfig(warmup_steps=1, full_steps=1, predict_steps=2, correct_every=9), "WWFPPFPPF"),
        (PhaseConfig(warmup_steps=0, full_steps=3, predict_steps=0), "FFFFFFF"),
    ],
)
def test_phase_sequence(config, expected):
    assert phases(config, len(expected)) == expected


def test_cycles_and_speedup_are_counted():
    controller = PhaseController(PhaseConfig(warmup_steps=0, full_steps=2, predict_steps=7, correct_every=3))
    for _ in range(18):
        controller.begin_step()
        controller.end_step(torch.tensor(2.0))
    stats = controller.get_stats()
    assert (stats["cycles"], stats["full_steps"], stats["predict_steps"], stats["correct_steps"]) == (1, 4, 10, 4)
    assert stats["speedup"] == pytest.approx(18 / 8)
    assert stats["mean_loss_predict"] == pytest.approx(2.0)


def test_adaptive_lengths_follow_the_loss():
    rising = PhaseController(PhaseConfig(warmup_steps=0, full_steps=2, predict_steps=20, correct_every=50,
                                         adaptive_phases=True))
    for i in range(23):  # through one cycle, losses rising by 10% per step
        rising.begin_step()
        rising.end_step(1.1**i)
    assert rising.begin_step().phase.value == "full"
    assert (rising.full_steps, rising.predict_steps) == (4, 15)
    falling = PhaseController(PhaseConfig(warmup_steps=0, full_steps=2, predict_steps=20, correct_every=50,
                                          adaptive_phases=True))
    for i in range(23):
        falling.begin_step()
        falling.end_step(0.9**i)
    falling.begin_step()
    # -1 full step (the crate's floor of 3 is not applied above the 2 asked for), +3 predict.
    assert (falling.full_steps, falling.predict_steps) == (2, 23)
    disabled = PhaseController(PhaseConfig(warmup_steps=0, full_steps=2, predict_steps=0, adaptive_phases=True))
    for i in range(30):
        disabled.begin_step()
        disabled.end_step(1.1**i)
    assert disabled.predict_steps == 0 and disabled.get_stats()["predict_steps"] == 0


@pytest.mark.parametrize("predictor", ["least_squares", "momentum"])
def test_apply_correction_adds_the_last_correct_steps_error_once(predictor):
    config = PhaseConfig(warmup_steps=0, full_steps=3, predict_steps=6, correct_every=2, predictor=predictor)
    controller = PhaseController(config)
    g = torch.Generator().manual_seed(0)
    ones = [torch.ones(3, 2), torch.ones(2)]
    controller.apply_correction(ones)  # nothing measured yet: left as it is
    assert all(torch.equal(t, torch.ones_like(t)) for t in ones)
    expected = None
    while expected is None:
        info = controller.begin_step()
        assert isinstance(info, PhaseStep)
        if controller.should_compute_full():
            actual = [torch.randn(3, 2, generator=g), torch.randn(2, generator=g)]
            if info.phase is Phase.CORRECT:  # the first one: no residual yet, so fit == prediction
                expected = [a - p for a, p in zip(actual, controller.predicted_gradients(), strict=True)]
            controller.record_full_gradients(actual)
        controller.end_step(1.0)
    grads = [torch.full((3, 2), 0.5), torch.full((2,), 0.5)]
    controller.apply_correction(grads)
    for got, error in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, error + 0.5)
    controller.apply_correction(grads)  # once only
    for got, error in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, error + 0.5)
    assert any(e.abs().max() > 0.1 for e in expected)  # an error there was to add
    controller.reset()
    controller.apply_correction(ones)
    assert all(torch.equal(t, torch.ones_like(t)) for t in ones)


def test_step_info_is_a_deprecated_name_of_phase_step():
    import mini_trainer.strategies as strategies
    import mini_trainer.strategies.phase as phase

    for module in (strategies, phase):
        with pytest.warns(DeprecationWarning, match="PhaseStep"):
            assert module.StepInfo is PhaseStep


def trajectory(t: float) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=g), torch.randn(4, generator=g)
    da, db = torch.randn(5, 3, generator=g), torch.randn(4, generator=g)
    return [a + da * t, b + db * t]


def test_least_squares_predicts_a_linear_trend_exactly():
    predictor = LeastSquaresPredictor(PhaseConfig(history_window=5))
    for step in (0, 1, 2, 4, 7, 8):  # uneven spacing, more entries than the window
        predictor.record(trajectory(step), step)
    for step in (9, 12, 20):
        for got, expected in zip(predictor.predict(step), trajectory(step), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_without_extrapolation_the_fit_at_the_newest_gradient_is_predicted():
    predictor = LeastSquaresPredictor(PhaseConfig(history_window=5, extrapolate=False))
    for step in range(6):
        predictor.record(trajectory(step), step)
    for got, expected in zip(predictor.predict(20), trajectory(5), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_least_squares_with_one_gradient_repeats_it_and_corrects_with_a_residual():
    config = PhaseConfig(residual_decay=0.5)
    predictor = LeastSquaresPredictor(config)
    predictor.record([torch.ones(3)], 0)
    torch.testing.assert_close(predictor.predict(5)[0], torch.ones(3))
    error = predictor.correct([torch.full((3,), 3.0)], 1)  # fit says 1 at step 1: error 2
    torch.testing.assert_close(error[0], torch.full((3,), 2.0))
    torch.testing.assert_close(predictor.residual[0], torch.full((3,), 1.0))  # 0.5 * 0 + 0.5 * 2
    # Two points now (1 at step 0, 3 at step 1): the line gives 5 at step 2, plus the residual faded once.
    torch.testing.assert_close(predictor.predict(2)[0], torch.full((3,), 5.0 + 0.5))


def test_momentum_predictor():
    predictor = MomentumPredictor(PhaseConfig(momentum_beta=0.9))
    predictor.record([torch.tensor([1.0, 2.0])], 0)
    predictor.record([torch.tensor([2.0, 0.0])], 1)
    torch.testing.assert_close(predictor.predict(2)[0], torch.tensor([2.0 + 0.9 * 1.0, 0.0 - 0.9 * 2.0]))


@pytest.mark.parametrize("storage", ["ternary", "vsa"])
def test_compressed_history_is_smaller(storage):
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(256, 64, generator=g), torch.randn(256, generator=g)]
    full = LeastSquaresPredictor(PhaseConfig(history_window=4))
    small = LeastSquaresPredictor(PhaseConfig(history_window=4, history_storage=storage))
    for step in range(4):
        full.record(grads, step)
        small.record(grads, step)
    ratio = small.history.nbytes / full.history.nbytes
    assert ratio < (1 / 15 if storage == "ternary" else 1 / 60)
    if storage == "vsa":  # the hypervector size follows vsa_dim_ratio
        larger = LeastSquaresPredictor(PhaseConfig(history_window=4, history_storage="vsa", vsa_dim_ratio=1.0))
        larger.record(grads, 0)
        assert larger.history.nbytes > 3.5 * small.history.nbytes / 4
    # The price: each stored gradient is only ~0.4-0.55 cosine-similar to the real one here.
    assert reconstruction_cosine(grads, small.predict(4)) > (0.4 if storage == "ternary" else 0.3)


def test_ternary_codes_are_packed_and_unbiased():
    g = torch.randn(1001)
    code = ternarize(g, "stochastic", generator=torch.Generator().manual_seed(0))
    assert code.packed.dtype == torch.uint8 and code.packed.numel() == math.ceil(1001 / 4)
    decoded = code.decode()
    assert set(torch.unique(decoded / code.scale).tolist()) <= {-1.0, 0.0, 1.0}
    draws = torch.stack([ternarize(g, generator=torch.Generator().manual_seed(i)).decode() for i in range(4000)])
    # Standard error of the mean of 4000 draws is at most max|g| / (2 sqrt(4000)) ~ 0.008 max|g|.
    assert (draws.mean(0) - g).abs().max() < 0.05 * g.abs().max()
    threshold = ternarize(g, "threshold", threshold=0.3).decode()
    assert ((threshold != 0) == (g.abs() > 0.3 * g.abs().max())).all()


def test_ternary_accumulator_holds_an_unbiased_packed_sum():
    grads = [[torch.randn(50) for _ in range(2)] for _ in range(3)]
    exact = [sum(step[i] for step in grads) for i in range(2)]
    totals = []
    for seed in range(400):
        accumulator = TernaryGradientAccumulator(seed=seed)
        for step in grads:
            accumulator.add(step)
        assert accumulator.nbytes == 2 * (math.ceil(50 / 4) + 4)
        totals.append(torch.cat(accumulator.total()))
    mean = torch.stack(totals).mean(0)
    assert (mean - torch.cat(exact)).abs().max() < 0.35 * torch.cat(exact).abs().max()
    assert reconstruction_cosine([torch.cat(exact)], [mean]) > 0.98


def test_vsa_round_trip_quality_and_memory():
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(300, 100, generator=g), torch.randn(100, generator=g)]
    fp32_bytes = sum(t.numel() * 4 for t in grads)
    cosines = {}
    for ratio in (0.25, 1.0):
        vsa = VSAGradientCompressor(dim_ratio=ratio, seed=1)
        code = vsa.compress(grads)
        assert code.nbytes <= fp32_bytes * ratio / 16 + 8
        cosines[ratio] = reconstruction_cosine(grads, vsa.decompress(code, grads))
    assert cosines[0.25] > 0.35 and cosines[1.0] > 0.6 and cosines[1.0] > cosines[0.25]
    vsa = VSAGradientCompressor(dim_ratio=1.0, seed=1)
    other = [torch.randn_like(t) for t in grads]
    bundle = vsa.bundle([vsa.compress(grads, slot=0), vsa.compress(other, slot=1)])
    back = vsa.decompress(vsa.unbundle(bundle, 0), grads)
    assert reconstruction_cosine(grads, back) > 0.25 > abs(reconstruction_cosine(other, back))


# ---------------------------------------------------------------- the trainer


def make_data(n: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 0.5).long()
    return x, y


class Classifier(PhaseTrainer):
    def build_model(self):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 3))

    def build_optimizer(self):
        return torch.optim.AdamW(self.model.parameters(), lr=1e-2)

    def build_data_loader(self):
        return tensor_loader(*make_data(), batch_size=32, seed=1)

    def forward(self, batch):
        x, y = batch
        return F.cross_entropy(self.model(x), y), {}


def count_backward(trainer: PhaseTrainer) -> list[int]:
    calls = [0]
    trainer.build()
    trainer.model[0].weight.register_hook(lambda grad: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_predict_steps_run_no_backward_and_report_the_phase():
    trainer = Classifier(max_steps=40, device="cpu", seed=0,
                         warmup_steps=2, full_steps=2, predict_steps=6, correct_every=4)
    calls = count_backward(trainer)
    result = trainer.fit()
    stats = trainer.get_stats()
    assert calls[0] == stats["full_steps"] + stats["correct_steps"] < 40
    assert stats["predict_steps"] > 20
    assert 0.0 < result["phase"]["backward"] < 1.0  # averaged over the run
    assert result["phase"]["speedup"] > 1.0


def test_phase_trainer_learns():
    trainer = Classifier(max_steps=300, device="cpu", seed=0)
    result = trainer.fit()
    assert result["loss"] < 0.6
    assert trainer.get_stats()["speedup"] > 2.0


@pytest.mark.parametrize("options", [{}, {"history_storage": "ternary"}, {"history_storage": "vsa"},
                                     {"predictor": "momentum"},
                                     {"gradient_accumulation_steps": 2, "ternary_accumulation": True}])
def test_resume_is_exact(tmp_path, options):
    def run(workspace, steps):
        hooks = [CheckpointingHook(interval=7, path="ckpt")]
        trainer = Classifier(max_steps=steps, device="cpu", seed=0, workspace=workspace, hooks=hooks,
                             warmup_steps=2, full_steps=2, predict_steps=6, correct_every=4, history_window=3,
                             **options)
        trainer.train()
        return trainer

    straight = run(tmp_path / "straight", 30)
    run(tmp_path / "resumed", 17)  # checkpoints at 7, 14 and 17 (the end)
    resumed = run(tmp_path / "resumed", 30)
    assert resumed.get_stats() == straight.get_stats()
    for a, b in zip(resumed.model.parameters(), straight.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_ternary_accumulation_frees_float_gradients_between_micro_steps():
    seen = []

    class Watching(Classifier):
        def forward(self, batch):
            if self.micro_step == 1 and not self._predicting:
                seen.append((all(p.grad is None for p in self.model.parameters()), self._accumulator.nbytes))
            return super().forward(batch)

    trainer = Watching(max_steps=6, device="cpu", seed=0, gradient_accumulation_steps=2, ternary_accumulation=True,
                       warmup_steps=2)
    trainer.train()
    params = sum(p.numel() for p in trainer.model.parameters())
    assert seen and all(freed and 0 < nbytes < params for freed, nbytes in seen)


def test_skip_forward_reports_no_loss_on_predict_steps():
    losses = []

    class Watch(BaseHook):
        def on_after_step(self, t):
            losses.append(t.step_info["loss"])

    trainer = Classifier(max_steps=12, device="cpu", seed=0,
                         warmup_steps=2, full_steps=2, predict_steps=4, correct_every=9,
                         skip_forward=True, hooks=[Watch()])
    trainer.train()
    assert [loss is None for loss in losses] == [False] * 4 + [True] * 4 + [False] * 2 + [True] * 2


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"full_steps": 0}, ValueError, "full_steps"),
        ({"predictor": "linear"}, ValueError, "predictor"),
        ({"history_storage": "zip"}, ValueError, "history_storage"),
        ({"history_window": 1}, ValueError, "history_window"),
        ({"momentum_beta": 1.5}, ValueError, "momentum_beta"),
        ({"skip_forward": "yes"}, TypeError, "skip_forward"),
    ],
)
def test_bad_config_is_named(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PhaseConfig(**kwargs)


def test_phase_trainer_refuses_several_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(NotImplementedError, match="one process"):
        Classifier(max_steps=1, device="cpu").build()


def test_fp16_predictions_reach_the_optimizer_unscaled(tmp_path):
    seen = []

    class Watch(Classifier):
        def gradients_ready(self, skipped):
            if self._predicting:
                expected = self.controller.predicted_gradients()
                seen.append(all(torch.allclose(p.grad, e, rtol=1e-5, atol=1e-7)
                                for p, e in zip(self.optimized_params, expected, strict=True)))
            super().gradients_ready(skipped)

    config = dict(device="cpu", seed=0, mixed_precision="fp16", warmup_steps=2, full_steps=2, predict_steps=6,
                  max_grad_norm=None)
    Watch(max_steps=12, **config).train()
    assert len(seen) >= 5 and all(seen)
    # Saved during PREDICT, resumed into PREDICT: the scaler's scale is set up before use.
    first = Classifier(max_steps=6, workspace=tmp_path, hooks=[CheckpointingHook(path="ckpt")], **config)
    first.train()
    again = Classifier(max_steps=9, workspace=tmp_path, hooks=[CheckpointingHook(path="ckpt")], **config)
    again.train()
    assert again.step == 9


def test_parameters_without_gradients_get_no_predicted_gradient():
    class WithUnused(Classifier):
        def build_model(self):
            model = super().build_model()
            model.register_parameter("unused", nn.Parameter(torch.randn(2, 2)))  # not in forward
            return model

        def build_optimizer(self):
            return torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.1)

    trainer = WithUnused(max_steps=12, device="cpu", seed=0, warmup_steps=2, full_steps=2, predict_steps=6)
    trainer.build()
    before = trainer.model.unused.detach().clone()
    trainer.train()
    assert trainer.get_stats()["predict_steps"] >= 5
    assert torch.equal(trainer.model.unused, before)  # no weight decay, no update


def test_ternary_accumulation_keeps_the_average_when_an_epoch_ends_mid_step():
    class Counting(Classifier):
        def build_data_loader(self):
            return tensor_loader(*make_data(n=32 * 8), batch_size=32, seed=1)  # 8 batches

    def last_step_gradient(ternary: bool):
        grads = []

        class Grab(Counting):
            def gradients_ready(self, skipped):
                grads.append(torch.cat([p.grad.reshape(-1) for p in self.optimized_params]))
                super().gradients_ready(skipped)

        trainer = Grab(max_epochs=1, device="cpu", seed=0, gradient_accumulation_steps=3, ternary_accumulation=ternary,
                       warmup_steps=3, max_grad_norm=None)
        trainer.train()
        assert trainer.step == 3  # 3 + 3 + 2 micro-steps
        return grads[-1]

    exact, quantised = last_step_gradient(False), last_step_gradient(True)
    ratio = (quantised @ exact / exact.norm() ** 2).item()
    assert 0.8 < ratio < 1.2  # the same scale (it was 0.66 when the rescale missed the accumulator)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_predict_steps_step_like_real_ones(precision):
    trainer = Classifier(max_steps=30, device="cpu", seed=0, mixed_precision=precision,
                         warmup_steps=2, full_steps=2, predict_steps=6)
    result = trainer.fit()
    assert math.isfinite(result["loss"]) and result["loss"] < 1.2
    assert trainer.get_stats()["predict_steps"] >= 10
    if precision == "fp16":  # predictions were scaled like real gradients, so unscaling gave them back
        assert trainer.grad_scaler.get_scale() > 1.0


def test_prediction_quality_is_measured_on_correct_steps():
    controller = PhaseController(PhaseConfig(warmup_steps=2, full_steps=2, predict_steps=4, correct_every=2))
    for step in range(12):
        controller.begin_step()
        if controller.should_compute_full():
            controller.record_full_gradients(trajectory(step))  # a linear trend: predicted exactly
        controller.end_step(1.0)
    stats = controller.get_stats()
    assert stats["correct_steps"] >= 2
    assert stats["mean_correct_cosine"] == pytest.approx(1.0, abs=1e-5)


def test_a_retried_non_finite_step_leaves_no_trace_in_the_history():
    class OneNaN(Classifier):
        def forward(self, batch):
            loss, records = super().forward(batch)
            if self.step == 1 and self.step_info["retries"] == 0:
                loss = loss * float("nan")
            return loss, records

    trainer = OneNaN(max_steps=20, device="cpu", seed=0, max_non_finite_grad_retries=1,
                     warmup_steps=2, full_steps=2, predict_steps=6)
    result = trainer.fit()
    assert math.isfinite(result["loss"]) and result["retries"] > 0
    history = trainer.controller.predictor.history
    assert all(torch.isfinite(t).all() for _, slot in history.entries for t in history.tensors(slot))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_phase_trainer_is_registered_and_the_digits_config_trains_with_predicted_steps(tmp_path):
    from mini_trainer import REGISTRY, build_from_cfg, load_config
    from mini_trainer.classification import ClassificationTrainer

    assert REGISTRY.get("PhaseTrainer") is PhaseTrainer
    overrides = [f"trainer.workspace={tmp_path}", "trainer.max_steps=60", "trainer.device=cpu"]
    cfg = load_config("configs/phase_digits.py", overrides)
    run = build_from_cfg(cfg["trainer"])
    assert isinstance(run, PhaseTrainer) and isinstance(run, ClassificationTrainer)
    assert (run.phase_config.warmup_steps, run.phase_config.full_steps, run.phase_config.predict_steps) == (10, 5, 20)
    calls = count_backward(run)
    run.train()
    stats = run.get_stats()
    # Warmup 10, full 5, predict 20 (a CORRECT at phase steps 5, 10, 15 and 20), full 5, predict 20.
    assert (stats["full_steps"], stats["predict_steps"], stats["correct_steps"]) == (20, 33, 7)
    assert calls[0] == 60 - 33  # no backward on PREDICT steps
    results = run.evaluate()
    assert set(results) == {"test/loss", "test/accuracy"}
    assert results["test/accuracy"] > 0.75  # 0.86 after these 60 steps
