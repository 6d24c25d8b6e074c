"""CheckpointingHook, EmaHook and CudaMaxMemoryHook inside one process: when checkpoints
are written and kept, what a resume restores, which checkpoint wins, signals, and the
EMA's arithmetic whatever the hook order. (Killed processes: test_resume_reliability.py.)"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal

import pytest
import torch
from torch import nn

from mini_trainer import (
    BaseTrainer,
    CheckpointingHook,
    CudaMaxMemoryHook,
    EmaHook,
    LoggingHook,
    ProgressHook,
    checkpoint,
)
from mini_trainer.checkpoint import CheckpointError
from mini_trainer.data import tensor_loader
from mini_trainer.hooks import BaseHook


class Recorder(BaseHook):
    """Copies of the parameters after every step (runs before EMA and checkpointing)."""

    priority = -50

    def __init__(self):
        self.params = []

    def on_after_step(self, trainer):
        self.params.append([p.detach().clone() for p in trainer.unwrapped_model.parameters()])


class Net(BaseTrainer):
    """Dropout, BatchNorm, a shuffled stateful loader and a schedule: resume has work to do."""

    def build_model(self):
        return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))

    def build_optimizer(self):
        return torch.optim.AdamW(self.model.parameters(), lr=1e-2)

    def build_data_loader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(52, 4, generator=g)
        return tensor_loader(x, x.sum(1, keepdim=True), batch_size=8, seed=3)  # 7 batches, last one short

    def build_lr_scheduler(self):
        return torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=3, gamma=0.5)

    def forward(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y), {}


def net(tmp_path, hooks, max_steps=10, **kwargs):
    kwargs.setdefault("gradient_accumulation_steps", 2)
    return Net(max_steps=max_steps, seed=1, device="cpu", workspace=tmp_path, hooks=hooks, **kwargs)


def same_params(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def steps_on_disk(directory):
    return [step for step, _ in checkpoint.list_checkpoints(directory)]


def test_saves_every_interval_and_at_the_end_and_prunes(tmp_path):
    hook = CheckpointingHook(interval=2, keep_previous=2, keep_interval=4)
    net(tmp_path, [hook], max_steps=9).train()
    assert steps_on_disk(tmp_path / "checkpoints") == [4, 8, 9]  # newest two + multiples of 4
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000000009"
    assert hook.last_saved == tmp_path / "checkpoints" / "step_000000009"


def test_resumed_run_equals_uninterrupted_one(tmp_path):
    straight = net(tmp_path / "a", [CheckpointingHook(interval=3), EmaHook(decay=0.8)], max_steps=10)
    straight.train()

    first = net(tmp_path / "b", [CheckpointingHook(interval=3), EmaHook(decay=0.8)], max_steps=7)
    first.train()  # checkpoints at 3, 6 and 7 (end)
    resumed_hooks = [EmaHook(decay=0.8), CheckpointingHook(interval=3)]  # other order on purpose
    resumed = net(tmp_path / "b", resumed_hooks, max_steps=10)
    resumed.train()
    assert resumed_hooks[1].resumed_from == tmp_path / "b" / "checkpoints" / "step_000000007"
    assert (resumed.step, resumed.epoch) == (straight.step, straight.epoch)
    assert same_params(resumed.model, straight.model)
    straight_ema = next(h for h in straight.hooks if isinstance(h, EmaHook))
    assert same_params(resumed_hooks[0].ema_model, straight_ema.ema_model)
    for name in ("model", "ema", "optimizer"):
        a = (tmp_path / "a" / "checkpoints" / "step_000000010" / f"{name}.safetensors").read_bytes()
        b = (tmp_path / "b" / "checkpoints" / "step_000000010" / f"{name}.safetensors").read_bytes()
        assert a == b, name


def test_asynchronous_saves_write_the_same_files(tmp_path):
    for mode in ("sync", "async"):
        hooks = [CheckpointingHook(interval=2, keep_previous=10, async_save=mode == "async"), EmaHook(decay=0.9)]
        net(tmp_path / mode, hooks, max_steps=7).train()
    sync_dirs = checkpoint.list_checkpoints(tmp_path / "sync" / "checkpoints")
    async_dirs = checkpoint.list_checkpoints(tmp_path / "async" / "checkpoints")
    assert [s for s, _ in sync_dirs] == [s for s, _ in async_dirs] == [2, 4, 6, 7]
    for (_, a), (_, b) in zip(sync_dirs, async_dirs, strict=True):
        for name in ("model", "ema", "optimizer"):
            assert (a / f"{name}.safetensors").read_bytes() == (b / f"{name}.safetensors").read_bytes(), (a.name, name)


def test_a_failed_background_write_is_raised(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_checkpoint", disk_full)
    with pytest.raises(OSError, match="No space left"):
        net(tmp_path, [CheckpointingHook(interval=2, async_save=True)], max_steps=5).train()


def test_load_from_another_run_then_own_checkpoints_win(tmp_path, caplog):
    net(tmp_path / "pretrain", [CheckpointingHook(interval=None)], max_steps=4).train()
    source = tmp_path / "pretrain" / "checkpoints" / "step_000000004"

    hook = CheckpointingHook(interval=None, load=source)
    run = net(tmp_path / "finetune", [hook], max_steps=6)
    run.train()
    assert hook.resumed_from == source and run.step == 6
    # Restarted with the same command (e.g. after preemption): its own step 6 wins.
    again = CheckpointingHook(interval=None, load=source)
    net(tmp_path / "finetune", [again], max_steps=8).train()
    assert again.resumed_from == tmp_path / "finetune" / "checkpoints" / "step_000000006"


def test_load_none_refuses_to_mix_runs_and_bad_load_path_is_an_error(tmp_path):
    net(tmp_path, [CheckpointingHook(interval=None)], max_steps=2).train()
    with pytest.raises(FileExistsError, match="load='latest'"):
        net(tmp_path, [CheckpointingHook(load=None)], max_steps=3).train()
    with pytest.raises(CheckpointError, match="does not exist"):
        net(tmp_path / "other", [CheckpointingHook(load=tmp_path / "missing")], max_steps=3).train()


def test_fresh_start_and_finished_run_do_nothing_surprising(tmp_path):
    hook = CheckpointingHook(interval=5)
    run = net(tmp_path, [hook], max_steps=5)
    run.train()
    assert hook.resumed_from is None and steps_on_disk(tmp_path / "checkpoints") == [5]
    again = CheckpointingHook(interval=5)
    done = net(tmp_path, [again], max_steps=5)
    done.train()  # already finished: resumes at 5, trains nothing, writes nothing new
    assert done.step == 5 and steps_on_disk(tmp_path / "checkpoints") == [5]


def test_evil_pickle_given_as_load_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "resume_me.pt"
    evil.write_bytes(pickle.dumps({"step": 3, "model": RunsCode(), "optimizer": {}}))
    with pytest.raises(CheckpointError, match="weights_only"):
        net(tmp_path / "run", [CheckpointingHook(load=evil)]).train()
    assert not marker.exists()


class SendSignal(BaseHook):
    def __init__(self, at_step, signum):
        self.at_step, self.signum = at_step, signum

    def on_before_step(self, trainer):
        if trainer.step + 1 == self.at_step:
            os.kill(os.getpid(), self.signum)  # arrives mid-step; the step must still finish


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_the_step_saves_and_exits_with_128_plus_signal(tmp_path, signum, code):
    # A shell starts background jobs (`make test &`) with SIGINT ignored, and the hook rightly
    # leaves an ignored signal alone: give this test the handler an interactive run has.
    previous = signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    try:
        _signal_saves_and_exits(tmp_path, signum, code)
    finally:
        signal.signal(signum, previous)


def _signal_saves_and_exits(tmp_path, signum, code):
    before = signal.getsignal(signum)
    run = net(tmp_path, [CheckpointingHook(interval=100), SendSignal(4, signum)], max_steps=10)
    with pytest.raises(SystemExit) as exit_info:
        run.train()
    assert exit_info.value.code == code
    assert run.step == 4 and steps_on_disk(tmp_path / "checkpoints") == [4]
    assert signal.getsignal(signum) is before  # handlers are put back
    resumed = net(tmp_path, [CheckpointingHook(interval=100)], max_steps=10)
    resumed.train()
    straight = net(tmp_path / "straight", [], max_steps=10)
    straight.train()
    assert same_params(resumed.model, straight.model)


def test_signals_ignored_by_the_parent_stay_ignored(tmp_path):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for `python train.py &` in a script
    try:
        run = net(tmp_path, [CheckpointingHook(interval=100), SendSignal(2, signal.SIGINT)], max_steps=4)
        run.train()  # no exit: SIGINT stays ignored
        assert run.step == 4 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_fit_steps_count_from_the_restored_step(tmp_path):
    net(tmp_path, [CheckpointingHook(interval=None)], max_steps=4).train()
    resumed = net(tmp_path, [CheckpointingHook(interval=None)], max_steps=None)
    result = resumed.fit(steps=3)
    assert (resumed.step, result["step"]) == (7, 7)
    straight = net(tmp_path / "straight", [], max_steps=7)
    straight.train()
    assert same_params(resumed.model, straight.model)


def test_resuming_a_plain_shuffled_dataloader_mid_epoch_warns(tmp_path, caplog):
    from torch.utils.data import DataLoader, TensorDataset

    class PlainNet(Net):
        def build_data_loader(self):  # a DataLoader(shuffle=True): no state, order not reproducible
            dataset = TensorDataset(torch.randn(40, 4), torch.randn(40, 1))
            return DataLoader(dataset, batch_size=8, shuffle=True)

    PlainNet(max_steps=2, device="cpu", workspace=tmp_path, hooks=[CheckpointingHook(interval=None)]).train()
    PlainNet(max_steps=3, device="cpu", workspace=tmp_path, hooks=[CheckpointingHook(interval=None)]).train()
    assert "comes in a different order" in caplog.text


def test_fixed_exit_code(tmp_path):
    run = net(tmp_path, [CheckpointingHook(exit_code=0), SendSignal(2, signal.SIGTERM)])
    with pytest.raises(SystemExit) as exit_info:
        run.train()
    assert exit_info.value.code == 0


# ----------------------------------------------------------------------------- EMA


@pytest.mark.parametrize("update_interval", [1, 2])
def test_ema_is_the_exponential_average_of_the_weights(tmp_path, update_interval):
    recorder, ema = Recorder(), EmaHook(decay=0.7, update_interval=update_interval)
    run = net(tmp_path, [ema, recorder], max_steps=6)
    run.build()
    initial = [p.detach().clone() for p in run.model.parameters()]
    run.train()
    expected = initial
    for step, params in enumerate(recorder.params, start=1):
        if step % update_interval == 0:
            expected = [0.7 * e + 0.3 * p for e, p in zip(expected, params, strict=True)]
    for got, want in zip(ema.ema_model.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert ema.updates == 6 // update_interval
    bn_ema, bn = ema.ema_model[1], run.model[1]
    assert bn_ema.num_batches_tracked == bn.num_batches_tracked  # integer buffers are copied
    assert not any(p.requires_grad for p in ema.ema_model.parameters()) and not ema.ema_model.training


def test_ema_checkpoint_holds_this_steps_average_in_any_hook_order(tmp_path):
    saved = {}
    for order in ("ema_first", "checkpoint_first"):
        ema, ckpt = EmaHook(decay=0.5), CheckpointingHook(interval=2)
        hooks = [ema, ckpt] if order == "ema_first" else [ckpt, ema]
        net(tmp_path / order, hooks, max_steps=4).train()
        from safetensors.torch import load_file

        saved[order] = load_file(tmp_path / order / "checkpoints" / "step_000000004" / "ema.safetensors")
        for name, value in ema.ema_model.state_dict().items():
            assert torch.equal(saved[order][name], value), (order, name)
    assert all(torch.equal(saved["ema_first"][k], saved["checkpoint_first"][k]) for k in saved["ema_first"])


def test_ema_of_a_bf16_model_is_averaged_in_float32():
    model = nn.Linear(64, 64).to(torch.bfloat16)
    ema = EmaHook(decay=0.999)

    class Holder:
        unwrapped_model = model

    ema.on_before_train(Holder())
    start = ema.ema_model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)  # the weights jump by 1 and stay there
    for _ in range(100):
        ema.update(model)
    moved = (ema.ema_model.weight - start).mean().item()
    assert ema.ema_model.weight.dtype == torch.float32
    assert moved == pytest.approx(1 - 0.999**100, rel=0.05)  # ~0.095; a bf16 average stays near 0


def test_ema_on_cpu_for_evaluation(tmp_path):
    ema = EmaHook(decay=0.9, device="cpu")
    net(tmp_path, [ema], max_steps=2).train()
    assert next(ema.ema_model.parameters()).device.type == "cpu"
    out = ema.ema_model(torch.randn(3, 4))
    assert out.shape == (3, 1)


def test_ema_missing_from_checkpoint_restarts_from_loaded_weights(tmp_path, caplog):
    net(tmp_path, [CheckpointingHook(interval=None)], max_steps=3).train()
    ema = EmaHook()
    resumed = net(tmp_path, [CheckpointingHook(interval=None), ema], max_steps=3)
    resumed.train()
    assert "no 'ema' state" in caplog.text
    assert same_params(ema.ema_model, resumed.model)


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("memory_first", [True, False])
def test_memory_hook_reports_peak_rss_on_cpu(tmp_path, memory_first):
    out = io.StringIO()
    reporters = [ProgressHook(interval=2, file=out), LoggingHook(interval=2)]
    hooks = [CudaMaxMemoryHook(), *reporters] if memory_first else [*reporters, CudaMaxMemoryHook()]
    run = net(tmp_path, hooks, max_steps=4)
    run.train()
    assert "max_memory" not in run.step_info
    assert 0.01 < run.step_info["max_rss"] < 64  # GiB: a Python process with torch loaded
    assert "max_rss" in out.getvalue() and "GiB" in out.getvalue()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(line["max_rss"] > 0 for line in logged)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(interval=0), ValueError, "CheckpointingHook.interval"),
        (dict(keep_previous=0), ValueError, "CheckpointingHook.keep_previous"),
        (dict(keep_interval=-5), ValueError, "CheckpointingHook.keep_interval"),
        (dict(load=3), TypeError, "CheckpointingHook.load"),
        (dict(exit_signals=signal.SIGTERM), TypeError, "exit_signals"),
        (dict(exit_signals=[signal.SIGKILL]), ValueError, "not a signal that can be caught"),
        (dict(exit_code=300), ValueError, "0..255"),
        (dict(exit_code="128+sig"), TypeError, "exit_code"),
        (dict(exit_wait=-1), ValueError, "exit_wait"),
        (dict(async_save="no"), TypeError, "CheckpointingHook.async_save must be True or False"),
        (dict(fsync=1), TypeError, "CheckpointingHook.fsync"),
    ],
)
def test_checkpointing_hook_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        CheckpointingHook(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(decay=1.5), ValueError, r"EmaHook.decay must be in \[0, 1\]; got 1.5"),
        (dict(update_interval=0), ValueError, "EmaHook.update_interval"),
        (dict(name="ema weights"), ValueError, "EmaHook.name"),
        (dict(name="model"), ValueError, "other than model"),
        (dict(device="gpu"), ValueError, "EmaHook.device must be None or a device"),
    ],
)
def test_ema_hook_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        EmaHook(**kwargs)


def test_two_ema_hooks_need_two_names(tmp_path):
    with pytest.raises(ValueError, match="ema.safetensors"):
        net(tmp_path, [CheckpointingHook(interval=1), EmaHook(decay=0.9), EmaHook(decay=0.99)], max_steps=1).train()
    hooks = [CheckpointingHook(interval=1), EmaHook(decay=0.9), EmaHook(decay=0.99, name="ema_slow")]
    net(tmp_path / "ok", hooks, max_steps=1).train()
    assert (tmp_path / "ok" / "checkpoints" / "step_000000001" / "ema_slow.safetensors").exists()
