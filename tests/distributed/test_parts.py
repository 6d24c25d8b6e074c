"""The distributed pieces one at a time, in this process: the sampler against torch's
DistributedSampler, the optimizer-state translation between layouts, argument errors,
joining from torchrun's environment, and FSDP2 wrapping on a 1-process gloo group."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from mini_trainer import BaseTrainer, EmaHook, distributed
from mini_trainer.data import EpochShuffleSampler, epoch_sampler, stateful_loader
from mini_trainer.trainer import optimizer_state_by_index, optimizer_state_by_name


@pytest.mark.parametrize("n", [10, 11, 7])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [True, False])
def test_sampler_yields_what_distributed_sampler_does(n, world, drop_last, shuffle):
    for rank in range(world):
        ours = EpochShuffleSampler(
            range(n), shuffle=shuffle, seed=3, num_replicas=world, rank=rank, drop_last=drop_last
        )
        theirs = DistributedSampler(
            range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=3, drop_last=drop_last
        )
        for epoch in (0, 2):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)
            assert len(ours) == len(theirs)


def test_ranks_together_read_one_big_batch_and_resume_at_a_sample_offset():
    whole = EpochShuffleSampler(range(24), seed=5)
    whole.set_epoch(1)
    order = list(whole)
    shards = [EpochShuffleSampler(range(24), seed=5, num_replicas=2, rank=r) for r in range(2)]
    for shard in shards:
        shard.set_epoch(1)
    per_rank = [list(s) for s in shards]
    # Batch b of both ranks (4 each) is batch b of one process with 8.
    for b in range(3):
        assert sorted(per_rank[0][4 * b : 4 * b + 4] + per_rank[1][4 * b : 4 * b + 4]) == sorted(
            order[8 * b : 8 * b + 8]
        )
    # 2 ranks resumed after 10 samples of epoch 1 read exactly the rest of it, in order.
    for shard in shards:
        shard.resume_at(1, 10)
    rest = [list(s) for s in shards]
    assert sorted(rest[0] + rest[1]) == sorted(order[10:])
    assert [len(s) for s in shards] == [7, 7]
    shards[0].set_epoch(2)  # the offset belongs to its epoch only
    assert len(shards[0]) == 12 and shards[0].skipped() == 0


def test_stateful_loader_shards_by_torchrun_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    loader = stateful_loader(torch.arange(10), 2)
    sampler = epoch_sampler(loader)
    assert isinstance(sampler, DistributedSampler)
    assert (sampler.num_replicas, sampler.rank, len(loader)) == (2, 1, 3)
    explicit = epoch_sampler(stateful_loader(torch.arange(10), 2, num_replicas=1))
    assert (explicit.num_replicas, explicit.rank) == (1, 0)


def test_optimizer_state_translates_between_index_and_name_layouts():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(
        [{"params": [model[1].weight]}, {"params": [model[0].weight, model[0].bias, model[1].bias], "lr": 0.5}]
    )
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    names = ["1.weight", "0.weight", "0.bias", "1.bias"]
    by_index = optimizer.state_dict()
    by_name = optimizer_state_by_name(by_index, names)
    assert by_name["param_groups"][1]["params"] == ["0.weight", "0.bias", "1.bias"]
    assert torch.equal(by_name["state"]["0.bias"]["exp_avg"], optimizer.state[model[0].bias]["exp_avg"])
    back = optimizer_state_by_index(by_name, names)
    assert back["param_groups"] == by_index["param_groups"]
    assert back["state"].keys() == by_index["state"].keys()
    assert optimizer_state_by_name(by_name, names) is by_name  # already by name
    with pytest.raises(KeyError, match="'2.weight'"):
        optimizer_state_by_index({"state": {}, "param_groups": [{"params": ["2.weight"]}]}, names)


def test_default_fsdp_units_are_the_outermost_container_items():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)])
            self.head = nn.Linear(8, 2)

    net = Net()
    assert distributed.default_fsdp_units(net) == list(net.blocks)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert distributed.default_fsdp_units(mlp) == [mlp[0], mlp[2]]
    assert distributed.default_fsdp_units(nn.Linear(2, 2)) == []


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"parallelism": "fsdp2"}, ValueError, "parallelism must be one of"),
        ({"parallelism": "DDP"}, ValueError, "'DDP'"),
        ({"fsdp_units": [nn.Linear]}, TypeError, "fsdp_units"),
        ({"fsdp_units": (nn.Linear, "block")}, TypeError, "fsdp_units"),
        ({"parallel_kwargs": ["find_unused_parameters"]}, TypeError, "parallel_kwargs"),
    ],
)
def test_bad_parallel_arguments_are_named(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        BaseTrainer(**kwargs)


def test_torchrun_environment_without_rendezvous_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="RANK, MASTER_ADDR"):
        distributed.init_from_env(torch.device("cpu"))


def test_a_restarted_group_joins_under_keys_of_its_own_and_times_out_clearly(monkeypatch):
    """Under torchrun the store outlives a restart of the workers (TORCHELASTIC_USE_AGENT_STORE):
    attempt 1 must not read the addresses attempt 0 left there. Rank 1 never comes, so
    joining ends within init_timeout, saying so."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for name, value in [
        ("WORLD_SIZE", "2"),
        ("RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", str(server.port)),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ("TORCHELASTIC_RESTART_COUNT", "1"),
    ]:
        monkeypatch.setenv(name, value)
    started = time.monotonic()
    with pytest.raises(
        RuntimeError, match=r"rank 0 could not join the process group of 2 processes within 2s \(torchrun attempt 1\)"
    ):
        distributed.init_from_env(torch.device("cpu"), init_timeout=2)
    assert time.monotonic() - started < 10
    assert not distributed.is_distributed()
    assert server.check(["mini_trainer/attempt_1/default_pg/0//cpu//0/0"])  # gloo's key for rank 0's address


def test_single_process_run_with_ddp_or_fsdp_wraps_nothing():
    model = nn.Linear(2, 1)
    trainer = BaseTrainer(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=[0],
        parallelism="fsdp",
        device="cpu",
    )
    trainer.build()
    assert trainer.parallel is None and trainer.model is model


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class ShardedRun(BaseTrainer):
    def build_model(self):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def build_optimizer(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.1)

    def build_data_loader(self):
        g = torch.Generator().manual_seed(0)
        return [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(4)]

    def forward(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y), {}


def test_fsdp_shards_units_and_root_and_trains_like_a_plain_model(one_process_group):
    from torch.distributed.fsdp import FSDPModule

    sharded = ShardedRun(parallelism="fsdp", device="cpu", max_steps=4, grad_clip=0.1)
    sharded.train()
    assert sharded.parallel == "fsdp"
    assert [isinstance(m, FSDPModule) for m in sharded.model] == [True, False, True]
    assert isinstance(sharded.model, FSDPModule)
    plain = ShardedRun(parallelism=None, device="cpu", max_steps=4, grad_clip=0.1)
    plain.train()
    full = sharded.state_dict()["model"]  # gathered, plain tensors
    for name, tensor in plain.model.state_dict().items():
        torch.testing.assert_close(full[name], tensor)
    assert type(sharded.step_info["grad_norm"]) is torch.Tensor  # not a DTensor


def test_fsdp_refuses_a_ready_optimizer_and_ema(one_process_group):
    model = nn.Sequential(nn.Linear(2, 2))
    ready = BaseTrainer(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=[0],
        parallelism="fsdp",
        device="cpu",
    )
    with pytest.raises(TypeError, match="build_optimizer"):
        ready.build()
    with_ema = ShardedRun(parallelism="fsdp", device="cpu", max_steps=1, hooks=[EmaHook()])
    with pytest.raises(NotImplementedError, match="EmaHook does not support FSDP2"):
        with_ema.train()


def test_an_already_wrapped_model_is_left_alone(one_process_group):
    ddp = nn.parallel.DistributedDataParallel(nn.Linear(2, 1))
    trainer = BaseTrainer(
        model=ddp, optimizer=torch.optim.SGD(ddp.parameters(), lr=0.1), data_loader=[0], parallelism="ddp", device="cpu"
    )
    trainer.build()
    assert trainer.model is ddp and trainer.parallel is None
    assert distributed.resolve_parallelism("auto", nn.Linear(2, 1)) is None  # a world of one: nothing to do


def _small_run(**kwargs):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=g), torch.randn(40, 1, generator=g)
    from mini_trainer.data import tensor_loader

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    seen = []

    def forward(model, batch):
        seen.append(batch[0].clone())
        return nn.functional.mse_loss(model(batch[0]), batch[1])

    trainer = BaseTrainer(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=tensor_loader(x, y, batch_size=kwargs.pop("batch_size"), seed=3),
        forward_fn=forward,
        device="cpu",
        **kwargs,
    )
    return trainer, seen, x


@pytest.mark.parametrize("saved_steps, expected_epoch", [(3, 0), (5, 1), (7, 1), (10, 2)])
def test_a_state_from_two_processes_continues_after_the_samples_they_consumed(saved_steps, expected_epoch):
    """A state saved by 2 ranks x 4 samples (faked here: world_size and data_position are all
    that differ) continues on 1 process x 8 at the next unseen sample of the epoch; saved at
    the end of an epoch (5 steps x 8 = 40 samples), it goes on with the next epoch."""
    saver, _, _ = _small_run(batch_size=8, max_steps=saved_steps)
    saver.train()
    state = saver.state_dict()
    assert state["data_position"] == {"epoch_start": 0, "samples": (saved_steps - 1) % 5 * 8 + 8}  # within its epoch
    state["world_size"] = 2  # what 2 ranks x 4 samples would have saved at the same point
    resumed, seen, x = _small_run(batch_size=8, max_steps=saved_steps + 1)
    resumed.load_state_dict(state)
    resumed.train()
    order = EpochShuffleSampler(x, seed=3)
    order.set_epoch(expected_epoch)
    first = list(order)[(saved_steps * 8) % 40 :][:8]
    assert resumed.epoch == expected_epoch
    assert torch.equal(seen[0], x[first])


def test_spela_refuses_to_start_under_torchrun_with_several_processes(monkeypatch):
    from mini_trainer.strategies import SpelaTrainer

    monkeypatch.setenv("WORLD_SIZE", "2")  # before the process group exists: what torchrun sets
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6))
    trainer = SpelaTrainer(
        net, num_classes=4, device="cpu", data_loader=[(torch.randn(2, 4), torch.tensor([0, 1]))], max_steps=1
    )
    with pytest.raises(NotImplementedError, match="several processes"):
        trainer.build()
