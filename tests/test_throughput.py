"""Throughput in the step metrics: samples/s, tokens/s and MFU (mini_trainer.metrics and
mini_trainer.throughput), and what ProgressHook prints of them and of evaluation results."""

from __future__ import annotations

import io
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from helpers import make_model, make_trainer, regression_batches
from mini_trainer import BaseHook, LoggingHook, MfuHook, ProgressHook
from mini_trainer import distributed as mt_distributed
from mini_trainer.metrics import StepMetrics, average_records, check_forward_output
from mini_trainer.throughput import GPU_PEAK_FLOPS, lookup_peak_flops, peak_flops

BATCH = 8


class Logged(BaseHook):
    """Keeps what `trainer.log()` receives."""

    def __init__(self):
        self.records = []

    def on_log(self, trainer, records, dry_run=False):
        self.records.append(dict(records))


def tokens_forward(per_call):
    """A forward that returns a `tokens` record: `per_call[i]` for its i-th call, as a tensor."""
    calls = iter(per_call)

    def forward(model, batch):
        x, y = batch
        loss = torch.nn.functional.mse_loss(model(x), y)
        return loss, {"tokens": torch.tensor(next(calls)), "mae": (model(x) - y).abs().mean().detach()}

    return forward


def train_logged(batches, hooks=(), interval=100, **kwargs):
    logged = Logged()
    trainer = make_trainer(batches, hooks=[LoggingHook(interval=interval), logged, *hooks], **kwargs)
    trainer.train()
    return trainer, logged.records


# ------------------------------------------------------------------ samples and tokens


def test_samples_per_s_is_the_samples_over_the_wall_time():
    _, records = train_logged(regression_batches(6, BATCH), interval=3, max_steps=6)
    assert len(records) == 2
    for record in records:
        assert record["samples"] == BATCH
        assert record["samples_per_s"] == pytest.approx(BATCH / record["wall_time"], rel=1e-9)
        assert "tokens_per_s" not in record and "mfu" not in record  # no tokens record, no MfuHook


def test_gradient_accumulation_counts_every_micro_batch():
    # 7 batches, 3 per step, one epoch: steps of 3, 3 and (the data ends) 1 micro-batch.
    _, records = train_logged(regression_batches(7, BATCH), max_epochs=1, gradient_accumulation_steps=3)
    (record,) = records
    assert record["samples"] == pytest.approx((3 + 3 + 1) * BATCH / 3)
    assert record["samples_per_s"] == pytest.approx(record["samples"] / record["wall_time"], rel=1e-9)


def test_samples_per_s_counts_all_ranks(monkeypatch):
    monkeypatch.setattr(mt_distributed, "get_world_size", lambda: 4)
    metrics = StepMetrics()
    for samples in (8, 12):
        metrics.add({"loss": 1.0, "samples": samples, "records": {"tokens": torch.tensor(100)}})
    values = metrics.compute()
    assert values["samples"] == 10
    assert values["samples_per_s"] == pytest.approx(10 * 4 / values["wall_time"], rel=1e-9)
    assert values["tokens_per_s"] == pytest.approx(100 * 4 / values["wall_time"], rel=1e-9)


def test_a_step_without_countable_samples_gives_no_rate():
    metrics = StepMetrics()
    metrics.add({"loss": 1.0, "samples": 0})
    values = metrics.compute()
    assert values["samples"] == 0 and "samples_per_s" not in values


def test_tokens_are_summed_over_micro_steps():
    seen = []

    class Keep(BaseHook):
        def on_after_step(self, trainer):
            seen.append(trainer.step_info["records"]["tokens"])

    per_call = [10, 20, 30, 40, 50, 60]
    _, records = train_logged(regression_batches(6, BATCH), hooks=[Keep()], max_steps=3,
                              gradient_accumulation_steps=2, forward_fn=tokens_forward(per_call))
    assert [float(t) for t in seen] == [30, 70, 110]
    assert all(isinstance(t, torch.Tensor) for t in seen)  # kept on the device
    (record,) = records
    assert record["tokens"] == pytest.approx(70)  # the mean over steps of the per-step sums
    assert record["tokens_per_s"] == pytest.approx(70 / record["wall_time"], rel=1e-9)
    assert record["mae"] > 0  # other records are still averaged


def test_average_records_sums_only_tokens():
    step = average_records([{"tokens": torch.tensor(3), "acc": 0.5, "m": {"tokens": 1.0}},
                            {"tokens": 5, "acc": torch.tensor(1.0), "m": {"tokens": 3.0}}])
    assert float(step["tokens"]) == 8
    assert float(step["acc"]) == pytest.approx(0.75)
    assert float(step["m"]["tokens"]) == pytest.approx(2.0)  # only the top-level `tokens` is a count


def test_tokens_is_a_record_name_but_the_rates_are_reserved():
    check_forward_output((None, {"tokens": 5}), "T")
    for name in ("samples", "flops", "peak_flops", "samples_per_s", "tokens_per_s", "mfu"):
        with pytest.raises(ValueError, match=name):
            check_forward_output((None, {name: 1.0}), "T")


def test_step_metrics_ignore_evaluation_results():
    metrics = StepMetrics()
    metrics.add({"loss": 1.0, "samples": 4, "eval": {"val/loss": 0.5}})
    values = metrics.compute()
    assert "eval" not in values and "val/loss" not in values


def test_metrics_jsonl_has_the_rates(tmp_path):
    hooks = [MfuHook(flops_per_sample=1e6, peak_flops=1e12)]
    train_logged(regression_batches(4, BATCH), hooks=hooks, interval=2, max_steps=4, workspace=tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert {"samples", "samples_per_s", "flops", "peak_flops", "mfu"} <= set(line)


# ------------------------------------------------------------------ MFU


def test_mfu_from_flops_per_sample():
    hook = MfuHook(flops_per_sample=3e6, peak_flops=2e12)
    _, records = train_logged(regression_batches(6, BATCH), hooks=[hook], interval=3, max_steps=6)
    for record in records:
        assert record["flops"] == pytest.approx(3e6 * BATCH)
        assert record["peak_flops"] == 2e12
        assert record["mfu"] == pytest.approx(3e6 * BATCH / record["wall_time"] / 2e12, rel=1e-9)


def test_mfu_from_flops_per_token_stays_on_the_device():
    seen = []

    class Keep(BaseHook):
        priority = 50  # after MfuHook

        def on_after_step(self, trainer):
            seen.append(trainer.step_info["flops"])

    hook = MfuHook(flops_per_token=1e3, peak_flops=1e9)
    _, records = train_logged(regression_batches(4, BATCH), hooks=[hook, Keep()], max_steps=2,
                              gradient_accumulation_steps=2, forward_fn=tokens_forward([1, 2, 3, 4]))
    assert all(isinstance(f, torch.Tensor) and f.dtype == torch.float64 for f in seen)
    assert [float(f) for f in seen] == [3e3, 7e3]
    (record,) = records
    assert record["mfu"] == pytest.approx(5e3 / record["wall_time"] / 1e9, rel=1e-9)


def test_mfu_with_flops_per_token_needs_a_tokens_record():
    trainer = make_trainer(regression_batches(2, BATCH), hooks=[MfuHook(flops_per_token=1.0, peak_flops=1e9)],
                           max_steps=1)
    with pytest.raises(RuntimeError, match="'tokens'"):
        trainer.train()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"flops_per_sample": 1.0, "flops_per_token": 1.0}, ValueError, "flops_per_sample and flops_per_token"),
        ({}, ValueError, "flops_per_sample and flops_per_token"),
        ({"flops_per_sample": -1.0}, ValueError, "flops_per_sample"),
        ({"flops_per_token": 0}, ValueError, "flops_per_token"),
        ({"flops_per_token": float("inf")}, ValueError, "flops_per_token"),
        ({"flops_per_sample": 1.0, "peak_flops": -5.0}, ValueError, "peak_flops"),
        ({"flops_per_sample": True}, TypeError, "flops_per_sample"),
        ({"flops_per_sample": "1e9"}, TypeError, "flops_per_sample"),
    ],
)
def test_mfu_hook_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        MfuHook(**kwargs)


def test_mfu_hook_on_cpu_needs_peak_flops():
    trainer = make_trainer(regression_batches(2, BATCH), hooks=[MfuHook(flops_per_sample=1.0)], max_steps=1)
    with pytest.raises(ValueError, match=r"'cpu'.*pass peak_flops="):
        trainer.train()


def fake_cuda_trainer(monkeypatch, name, dtype=None):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return SimpleNamespace(device=torch.device("cuda", 0), autocast_dtype=dtype, model=make_model())


def test_mfu_hook_takes_the_peak_from_the_table(monkeypatch):
    hook = MfuHook(flops_per_sample=1.0)
    hook.on_before_train(fake_cuda_trainer(monkeypatch, "NVIDIA A100-SXM4-80GB", torch.bfloat16))
    assert hook._peak == 312e12
    hook.on_before_train(fake_cuda_trainer(monkeypatch, "NVIDIA H100 PCIe", torch.float16))
    assert hook._peak == 756.5e12
    model_in_bf16 = fake_cuda_trainer(monkeypatch, "NVIDIA L4")
    model_in_bf16.model.to(torch.bfloat16)
    hook.on_before_train(model_in_bf16)  # no autocast: the parameters' dtype
    assert hook._peak == 121e12


def test_mfu_hook_on_an_unknown_gpu_needs_peak_flops(monkeypatch):
    hook = MfuHook(flops_per_sample=1.0)
    with pytest.raises(ValueError, match=r"'NVIDIA A10G' in bf16.*pass peak_flops="):
        hook.on_before_train(fake_cuda_trainer(monkeypatch, "NVIDIA A10G", torch.bfloat16))
    given = MfuHook(flops_per_sample=1.0, peak_flops=70e12)
    given.on_before_train(fake_cuda_trainer(monkeypatch, "NVIDIA A10G", torch.bfloat16))
    assert given._peak == 70e12


@pytest.mark.parametrize(
    "name, dtype, tf32, expected",
    [
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, False, 312e12),
        ("NVIDIA A100 80GB PCIe", "fp16", False, 312e12),
        ("NVIDIA A100-SXM4-40GB", torch.float32, False, 19.5e12),
        ("NVIDIA A100-SXM4-40GB", torch.float32, True, 156e12),
        ("NVIDIA A100-SXM4-40GB", "tf32", False, 156e12),
        ("NVIDIA A100-SXM4-40GB", None, False, 19.5e12),
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, False, 989.5e12),
        ("NVIDIA H100 PCIe", torch.bfloat16, False, 756.5e12),
        ("NVIDIA H100 NVL", torch.bfloat16, False, 835.5e12),
        ("NVIDIA H200", torch.bfloat16, False, 989.5e12),
        ("NVIDIA H200 NVL", torch.float32, True, 417.5e12),
        ("NVIDIA GH200 480GB", torch.bfloat16, False, None),  # not an H200
        ("NVIDIA L4", torch.bfloat16, False, 121e12),
        ("NVIDIA L40S", torch.bfloat16, False, 362.05e12),
        ("NVIDIA L40", torch.bfloat16, False, None),  # not an L4
        ("NVIDIA A10", torch.float16, False, 125e12),
        ("NVIDIA A10G", torch.float16, False, None),
        ("Tesla V100-SXM2-16GB", torch.float16, False, 125e12),
        ("Tesla V100-PCIE-32GB", torch.float16, False, 112e12),
        ("Tesla V100S-PCIE-32GB", torch.float16, False, 130e12),
        ("Tesla V100-SXM2-16GB", torch.bfloat16, False, None),  # no bf16 tensor cores
        ("Tesla V100-SXM2-16GB", torch.float32, True, 15.7e12),  # no TF32: the FP32 rate
        ("Tesla T4", torch.float16, False, 65e12),
        ("NVIDIA GeForce RTX 3090", torch.bfloat16, False, 71e12),
        ("NVIDIA GeForce RTX 4090", torch.float16, False, 165.2e12),
        ("NVIDIA GeForce RTX 4090 Laptop GPU", torch.float16, False, None),
        ("NVIDIA GeForce RTX 3090 Ti", torch.float16, False, None),
        ("Some Future GPU", torch.bfloat16, False, None),
    ],
)
def test_peak_flops_table(name, dtype, tf32, expected):
    assert lookup_peak_flops(name, dtype, tf32=tf32) == expected


def test_peak_flops_of_a_device(monkeypatch):
    assert peak_flops("cpu", torch.bfloat16) is None
    assert peak_flops(torch.device("meta")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda", 0), torch.bfloat16) == 989.5e12
    assert peak_flops(0, "fp16") == 989.5e12
    with pytest.raises(ValueError, match="dtype"):
        peak_flops("cuda", torch.float64)


def test_the_peak_table_is_dense_and_plausible():
    for pattern, figures in GPU_PEAK_FLOPS:
        re.compile(pattern)
        assert set(figures) <= {"bf16", "fp16", "tf32", "fp32"} and "fp32" in figures, pattern
        assert all(1e12 < flops < 2e15 for flops in figures.values()), pattern
        assert figures["fp32"] <= figures.get("tf32", figures["fp32"]) <= figures.get("fp16", math.inf), pattern



# ------------------------------------------------------------------ ProgressHook


def test_progress_line_shows_the_rates():
    text = ProgressHook().format({"loss": 0.5, "samples_per_s": 1234.5, "tokens_per_s": 2.5e6, "mfu": 0.4123}, None)
    assert "samples/s 1.23k tokens/s 2.5M mfu 41.2%" in text
    assert "|" not in text  # the rates are not records
    assert "samples/s 999 " in ProgressHook().format({"samples_per_s": 999.4, "mfu": 0.0}, None)
    assert "samples/s 1k " in ProgressHook().format({"samples_per_s": 999.6, "mfu": 0.0}, None)


def test_progress_prints_throughput_during_training():
    out = io.StringIO()
    hooks = [ProgressHook(interval=2, file=out), MfuHook(flops_per_token=10.0, peak_flops=1e9)]
    make_trainer(regression_batches(4, BATCH), hooks=hooks, max_steps=4, forward_fn=tokens_forward([5] * 4)).train()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert re.search(r"samples/s \S+ tokens/s \S+ mfu \d+\.\d%", line), line
        assert "| tokens 5.0000" in line  # `tokens` is still the user's record


class FakeEval(BaseHook):
    """Sets `step_info["eval"]` the way EvalHook does: a new dict at the steps it evaluates
    (before ProgressHook), and optionally a new one at the end of training."""

    priority = 5

    def __init__(self, every=3, at_end=True):
        self.every, self.at_end = every, at_end

    def on_after_step(self, trainer):
        if trainer.step % self.every == 0:
            trainer.step_info["eval"] = {"val/loss": 0.1234 / trainer.step, "val/accuracy": 0.96}

    def on_after_train(self, trainer):
        if self.at_end:
            trainer.step_info["eval"] = {"val/loss": 0.01, "test/accuracy": 0.5}


def eval_lines(text):
    return [line for line in text.splitlines() if ": eval " in line]


def test_progress_prints_each_evaluation_once():
    out = io.StringIO()
    make_trainer(regression_batches(8, BATCH), hooks=[ProgressHook(interval=4, file=out), FakeEval()],
                 max_steps=6).train()
    assert eval_lines(out.getvalue()) == [
        "Step 3/6: eval val/loss 0.0411 val/accuracy 0.9600",
        "Step 6/6: eval val/loss 0.0206 val/accuracy 0.9600",
        "Step 6/6: eval val/loss 0.0100 test/accuracy 0.5000",
    ]
    kinds = [line.split(": ")[1].split()[0] for line in out.getvalue().splitlines()]
    assert kinds == ["eval", "step", "eval", "step", "eval"]  # progress at 4 and at the end


def test_progress_does_not_repeat_the_last_steps_evaluation_at_the_end():
    out = io.StringIO()
    make_trainer(regression_batches(8, BATCH), hooks=[ProgressHook(interval=4, file=out), FakeEval(at_end=False)],
                 max_steps=6).train()
    assert [line.split(":")[0] for line in eval_lines(out.getvalue())] == ["Step 3/6", "Step 6/6"]


def test_progress_prints_evaluations_above_the_tqdm_bar():
    pytest.importorskip("tqdm")
    out = io.StringIO()
    make_trainer(regression_batches(8, BATCH), hooks=[ProgressHook(interval=2, file=out, bar=True), FakeEval()],
                 max_steps=6).train()
    text = out.getvalue()
    assert len(re.findall(r"Step \d/6: eval ", text)) == 3
    assert "Step 3/6: eval val/loss 0.0411 val/accuracy 0.9600\n" in text


def test_progress_prints_evaluations_on_the_main_process_only(monkeypatch):
    from mini_trainer.hooks import progress

    monkeypatch.setattr(progress, "is_main_process", lambda: False)
    out = io.StringIO()
    make_trainer(regression_batches(8, BATCH), hooks=[ProgressHook(interval=2, file=out), FakeEval()],
                 max_steps=6).train()
    assert out.getvalue() == ""
