"""SurpriseRepairTrainer: the trigger's arithmetic, batch-structure mirroring, the weighted
loss, the Surprisal Sandwich processors (also inside transformers' generate) and resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mini_trainer import CheckpointingHook
from mini_trainer.data import tensor_loader
from mini_trainer.strategies import (
    GeneratorProvider,
    HardestK,
    LossStdConfig,
    LossStdTrigger,
    ReplayBuffer,
    SurpriseRepairTrainer,
)
from mini_trainer.strategies.surprise_repair import check_same_structure, concat_samples, select_samples
from mini_trainer.strategies.surprise_repair.generation import AntiTopK, CoherenceBoost, surprisal_sandwich_generate

UNIFORM = torch.ones(10)  # cv 0
SPREAD = torch.tensor([0.1, 5.0] * 5)  # cv ~0.96


def never(batch, losses, k):
    raise AssertionError("not called by these tests")


def test_trigger_fires_on_the_previous_batch_uniformity_within_budget_and_cap():
    trigger = LossStdTrigger(
        never,
        LossStdConfig(
            std_threshold=0.15, inject_ratio=0.5, budget_frac=0.15, pulse_every=1000, max_injected_per_step=4
        ),
    )
    # Credit grows by 0.15 x 10 = 1.5 a call; k = min(int(10 x 0.5) = 5, cap 4, int(credit)).
    assert trigger.decide(UNIFORM) == 0  # no previous cv yet (credit 1.5)
    assert trigger.decide(SPREAD) == 3  # the previous batch was uniform; the budget allows 3 of 5
    assert trigger.decide(UNIFORM) == 0  # the previous batch (SPREAD) was not uniform (credit 1.5)
    assert trigger.decide(UNIFORM) == 3  # credit 3.0
    assert trigger.decide(UNIFORM) == 1  # credit 1.5: the fraction waits for the next call
    assert trigger.injected <= 0.15 * trigger.seen and trigger.fired == 3
    capped = LossStdTrigger(
        never, LossStdConfig(std_threshold=0.15, inject_ratio=0.5, budget_frac=1.0, max_injected_per_step=2)
    )
    assert [capped.decide(UNIFORM) for _ in range(3)] == [0, 2, 2]


def test_fractional_credit_is_carried():
    trigger = LossStdTrigger(
        never, LossStdConfig(std_threshold=1.0, inject_ratio=1.0, budget_frac=0.05, max_injected_per_step=100)
    )
    got = [trigger.decide(UNIFORM) for _ in range(12)]  # 0.5 credit per call
    assert got == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    assert trigger.injected == 6 and trigger.credit == pytest.approx(0.0)


def test_pulses_fire_even_when_losses_vary():
    trigger = LossStdTrigger(never, LossStdConfig(inject_ratio=0.2, budget_frac=1.0, pulse_every=3))
    assert [trigger.decide(SPREAD) for _ in range(7)] == [0, 0, 2, 0, 0, 2, 0]


def test_cv_is_std_over_abs_mean():
    trigger = LossStdTrigger(never)
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert float(trigger.cv(losses)) == pytest.approx(losses.std(unbiased=False).item() / 2.5)


@pytest.mark.parametrize("kwargs, match", [
    ({"inject_ratio": 1.5}, "inject_ratio"), ({"budget_frac": -0.1}, "budget_frac"),
    ({"weight_alpha": 0}, "weight_alpha"), ({"pulse_every": 0}, "pulse_every"),
])
def test_bad_config_is_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LossStdConfig(**kwargs)


def test_structures_are_mirrored_and_mismatches_named():
    batch = {"x": torch.randn(6, 3), "pair": (torch.arange(6), [torch.zeros(6, 2, dtype=torch.long)])}
    picked = select_samples(batch, torch.tensor([4, 1]))
    check_same_structure(batch, picked)
    assert torch.equal(picked["pair"][0], torch.tensor([4, 1]))
    joined = concat_samples(batch, picked)
    assert joined["x"].shape == (8, 3) and isinstance(joined["pair"], tuple) and isinstance(joined["pair"][1], list)
    with pytest.raises(ValueError, match=r"batch\['pair'\]\[1\]\[0\].*per-sample shape \(3,\)"):
        check_same_structure(
            batch, {"x": torch.randn(1, 3), "pair": (torch.arange(1), [torch.zeros(1, 3, dtype=torch.long)])}
        )
    with pytest.raises(ValueError, match="keys"):
        check_same_structure(batch, {"x": torch.randn(1, 3)})
    with pytest.raises(TypeError, match=r"batch\['x'\] should be a tensor"):
        check_same_structure(batch, {"x": [1.0], "pair": (torch.arange(1), [torch.zeros(1, 2, dtype=torch.long)])})


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.rows_seen = []

    def forward(self, x):
        self.rows_seen.append(x.shape[0])
        return self.linear(x)


def test_loss_weights_originals_and_injected_and_forwards_only_the_injected():
    torch.manual_seed(0)
    x, y, w = torch.randn(8, 3), torch.randint(0, 2, (8,)), torch.rand(8) + 0.5
    model = Recorder()
    copies = lambda batch, losses, k: HardestK()(batch, losses, k)  # noqa: E731 - new samples: they need a forward
    trigger = LossStdTrigger(
        copies, LossStdConfig(std_threshold=100.0, inject_ratio=0.25, budget_frac=1.0, weight_alpha=1.5)
    )
    trigger.decide(torch.ones(8))  # a previous micro-step: the next decision fires
    trainer = SurpriseRepairTrainer(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.CrossEntropyLoss(),
        trigger=trigger,
        data_loader=[(x, y, w)],
        device="cpu",
    )
    trainer.build()
    loss, records = trainer.forward((x, y, w))
    per_sample = nn.functional.cross_entropy(model.linear(x), y, reduction="none")
    hard = torch.topk(per_sample, 2).indices
    # The injected copies keep their own sample weight, times weight_alpha.
    expected = ((w * per_sample).sum() + 1.5 * (w[hard] * per_sample[hard]).sum()) / (w.sum() + 1.5 * w[hard].sum())
    torch.testing.assert_close(loss, expected)
    assert model.rows_seen == [8, 2]  # the batch once, then only the 2 injected samples
    assert records["repair"]["injected"] == 2.0
    # The reference way (everything re-forwarded) gives the same loss at a higher cost.
    trainer.reforward_all = True
    trigger.decide(torch.ones(8))
    loss_all, _ = trainer.forward((x, y, w))
    torch.testing.assert_close(loss_all, expected)
    assert model.rows_seen[-1] == 10
    # HardestK itself injects samples of this batch: their losses exist, no forward at all.
    trainer.reforward_all = False
    trainer.trigger = LossStdTrigger(HardestK(), trigger.config)
    trainer.trigger.decide(torch.ones(8))
    model.rows_seen.clear()
    loss_hard, _ = trainer.forward((x, y, w))
    torch.testing.assert_close(loss_hard, expected)
    assert model.rows_seen == [8]


def test_quick_start_fit_returns_the_metrics():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x.sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    trigger = LossStdTrigger(HardestK(), LossStdConfig(std_threshold=10.0, budget_frac=0.1, inject_ratio=0.25))
    metrics = SurpriseRepairTrainer(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.CrossEntropyLoss(),
        trigger=trigger,
        gradient_accumulation_steps=2,
        device="cpu",
    ).fit(tensor_loader(x, y, batch_size=32), steps=40)
    assert metrics["step"] == 40 and math.isfinite(metrics["loss"])
    assert 0 < metrics["repair"]["fired"] <= 1 and metrics["repair"]["injected"] > 0
    assert trigger.injected <= 0.1 * trigger.seen


def test_replay_buffer_keeps_the_hardest_and_a_generator_provider_is_checked():
    buffer = ReplayBuffer(capacity=3, keep_per_batch=2)
    for losses in (torch.tensor([1.0, 9.0, 2.0]), torch.tensor([5.0, 0.5, 7.0])):
        buffer.observe((losses.unsqueeze(1) * 10, losses.long()), losses)
    assert sorted(buffer.losses.tolist()) == [5.0, 7.0, 9.0]
    picked = buffer((torch.zeros(3, 1), torch.zeros(3, dtype=torch.long)), torch.zeros(3), 2)
    assert picked[1].tolist() == [9, 7]
    wrong = GeneratorProvider(lambda k, batch: (torch.zeros(k, 2), torch.zeros(k, dtype=torch.long)))
    model = nn.Linear(1, 2)
    trigger = LossStdTrigger(wrong, LossStdConfig(std_threshold=100.0, budget_frac=1.0, inject_ratio=0.5))
    trigger.decide(torch.ones(4))
    trainer = SurpriseRepairTrainer(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.CrossEntropyLoss(),
        trigger=trigger,
        data_loader=[0],
        device="cpu",
    )
    trainer.build()
    with pytest.raises(ValueError, match=r"batch\[0\] has dtype torch.float32 and per-sample shape \(2,\)"):
        trainer.forward((torch.randn(4, 1), torch.zeros(4, dtype=torch.long)))


def test_resume_restores_the_trigger_and_buffer_exactly(tmp_path):
    def run(workspace, steps):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(128, 8, generator=g)
        y = (x[:, 0] > 0).long()
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
        trigger = LossStdTrigger(
            ReplayBuffer(capacity=16),
            LossStdConfig(std_threshold=0.8, budget_frac=0.2, inject_ratio=0.25, pulse_every=5),
        )
        trainer = SurpriseRepairTrainer(
            model=model,
            optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
            criterion=nn.CrossEntropyLoss(),
            trigger=trigger,
            data_loader=tensor_loader(x, y, batch_size=16, seed=2),
            max_steps=steps,
            device="cpu",
            seed=0,
            workspace=workspace,
            hooks=[CheckpointingHook(interval=5, path="ckpt")],
        )
        trainer.train()
        return trainer

    straight = run(tmp_path / "a", 20)
    run(tmp_path / "b", 12)
    resumed = run(tmp_path / "b", 20)
    assert (resumed.trigger.fired, resumed.trigger.injected, resumed.trigger.credit) == (
        straight.trigger.fired,
        straight.trigger.injected,
        straight.trigger.credit,
    )
    assert straight.trigger.fired > 0
    assert torch.equal(resumed.trigger.provider.losses, straight.trigger.provider.losses)
    for a, b in zip(resumed.model.parameters(), straight.model.parameters(), strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- generation


def test_anti_topk_touches_only_the_window_and_only_the_top_k():
    processor = AntiTopK(alpha=10.0, k=2, window=(0.5, 0.75), prompt_length=4, max_new_tokens=8)
    scores = torch.tensor([[1.0, 5.0, 3.0, 4.0, 0.0]])
    for new, changed in ((3, False), (4, True), (5, True), (6, False)):
        out = processor(torch.zeros(1, 4 + new, dtype=torch.long), scores.clone())
        if changed:
            assert out.tolist() == [[1.0, -5.0, 3.0, -6.0, 0.0]]
        else:
            assert torch.equal(out, scores)


def test_coherence_boost_touches_only_the_tail():
    small = lambda ids: torch.ones(ids.shape[0], ids.shape[1], 5)  # noqa: E731
    boost = CoherenceBoost(small, mu=0.5, start=0.5, prompt_length=2, max_new_tokens=4)
    scores = torch.zeros(1, 5)
    assert torch.equal(boost(torch.zeros(1, 3, dtype=torch.long), scores), scores)  # f = 0.25
    assert torch.equal(boost(torch.zeros(1, 4, dtype=torch.long), scores), torch.full((1, 5), 0.5))  # f = 0.5
    assert boost.calls == 1


def test_sandwich_generation_samples_and_only_changes_its_window():
    torch.manual_seed(0)
    table = torch.randn(11, 11)
    model = lambda ids: table[ids]  # noqa: E731 - a bigram "language model": ids -> logits
    prompt = torch.tensor([[1, 2, 3]])
    plain = surprisal_sandwich_generate(
        model, prompt, max_new_tokens=20, sandwich=False, generator=torch.Generator().manual_seed(5)
    )
    assert plain.shape == (1, 23) and torch.equal(plain[:, :3], prompt)
    sandwich = surprisal_sandwich_generate(
        model, prompt, max_new_tokens=20, small_lm=model, generator=torch.Generator().manual_seed(5)
    )
    # Same seed, same model: identical until the window opens at 45% of 20 new tokens, and
    # (with alpha 10 on the top 5 of 11 tokens) different after it.
    assert torch.equal(sandwich[:, : 3 + 9], plain[:, : 3 + 9])
    assert not torch.equal(sandwich[:, 3 + 9 :], plain[:, 3 + 9 :])


def test_processors_plug_into_transformers_generate():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    small = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=50, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    ).eval()
    prompt = torch.tensor([[1, 2, 3, 4]])
    anti = AntiTopK(alpha=1e4, k=1, window=(0.0, 1.0), prompt_length=4, max_new_tokens=10)
    boost = CoherenceBoost(small, mu=0.4, start=0.7, prompt_length=4, max_new_tokens=10)
    greedy = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    pushed = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0,
                            logits_processor=transformers.LogitsProcessorList([anti, boost]))
    assert pushed.shape == greedy.shape == (1, 14)
    # AntiTopK with a huge alpha on top-1 forbids the greedy choice at every step.
    first_plain, first_pushed = greedy[0, 4].item(), pushed[0, 4].item()
    assert first_plain != first_pushed
    assert boost.calls == 3  # the last 30% of 10 new tokens
    # The small model's KV cache gives the logits a full recompute gives, also when the
    # same processor serves a second generate call with another prompt (the cache is rebuilt).
    for prompt_ids in (torch.tensor([[1, 2, 3, 4]]), torch.tensor([[7, 8, 9, 10, 11]])):
        cached = CoherenceBoost(small, mu=1.0, start=0.0, prompt_length=prompt_ids.shape[1], max_new_tokens=10)
        recompute = CoherenceBoost(lambda ids: small(input_ids=ids, use_cache=False).logits, mu=1.0, start=0.0,
                                   prompt_length=prompt_ids.shape[1], max_new_tokens=10)
        for step in range(prompt_ids.shape[1], prompt_ids.shape[1] + 6):
            ids = torch.cat([prompt_ids, torch.arange(step - prompt_ids.shape[1]).unsqueeze(0) % 50], dim=1)
            torch.testing.assert_close(
                cached(ids, torch.zeros(1, 50)), recompute(ids, torch.zeros(1, 50)), rtol=1e-4, atol=1e-5
            )


def test_new_sample_providers_are_refused_on_several_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = nn.Linear(2, 2)
    trainer = SurpriseRepairTrainer(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.CrossEntropyLoss(),
        trigger=LossStdTrigger(ReplayBuffer()),
        data_loader=[0],
        device="cpu",
        parallelism=None,
    )
    with pytest.raises(NotImplementedError, match="HardestK"):
        trainer.build()


def test_sample_weights_of_the_wrong_shape_are_refused():
    model = nn.Linear(3, 2)
    trainer = SurpriseRepairTrainer(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.CrossEntropyLoss(),
        data_loader=[0],
        device="cpu",
    )
    trainer.build()
    with pytest.raises(ValueError, match=r"sample weights .* shape \(4,\).*got \(4, 1\)"):
        trainer.forward((torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.ones(4, 1)))


def test_dicts_are_joined_by_key_whatever_their_order():
    first = {"x": torch.zeros(2, 1), "y": torch.ones(2, 1)}
    second = {"y": torch.full((1, 1), 5.0), "x": torch.full((1, 1), 7.0)}
    joined = concat_samples(first, second)
    assert joined["x"].flatten().tolist() == [0.0, 0.0, 7.0] and joined["y"].flatten().tolist() == [1.0, 1.0, 5.0]


def test_replay_buffer_learns_the_new_loss_of_what_it_injected():
    buffer = ReplayBuffer(capacity=4, keep_per_batch=2)
    buffer.observe((torch.arange(4.0).unsqueeze(1),), torch.tensor([1.0, 9.0, 8.0, 0.5]))
    assert buffer((torch.zeros(1, 1),), torch.zeros(1), 1)[0].item() == 1.0  # the sample with loss 9
    buffer.update(torch.tensor([0.1]))  # learnt: it sinks below the other stored one
    assert buffer((torch.zeros(1, 1),), torch.zeros(1), 1)[0].item() == 2.0
