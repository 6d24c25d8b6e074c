"""Two real processes (gloo on CPU): accumulation under DDP all-reduces once per optimizer
step (none on non-final micro-steps) and gives the single-process weights, also when the
last micro-step produces no loss. (torchrun coverage comes with the distributed work.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from helpers import flat_params, make_model, mse_forward, regression_batches  # noqa: E402
from mini_trainer import BaseTrainer  # noqa: E402

STEPS = 3
MARKER = 1e6  # a micro-batch whose forward returns no loss


def _rank_batches(rank: int, lossless_last: bool):
    real = regression_batches(2 * STEPS, 8, seed=10 + rank)
    if not lossless_last:
        return real
    marker = (torch.full((8, 4), MARKER), torch.zeros(8, 1))
    return [b for pair in zip(real[:STEPS], [marker] * STEPS, strict=True) for b in pair]


def _forward(model, batch):
    if batch[0][0, 0] >= MARKER:
        return None, {}
    return mse_forward(model, batch)


class AllReduceCount:
    def __init__(self, world: int):
        self.world, self.calls = world, 0


def counting_allreduce(state: AllReduceCount, bucket):
    """A DDP comm hook: the default mean all-reduce, counted."""
    state.calls += 1
    tensor = bucket.buffer().div_(state.world)
    return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])


def _worker(rank: int, world: int, out_dir: str, lossless_last: bool) -> None:
    torch.set_num_threads(1)
    # A file rendezvous: no TCP port that another process could take between pick and bind.
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        counter = AllReduceCount(world)
        model.register_comm_hook(counter, counting_allreduce)
        trainer = BaseTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                              data_loader=_rank_batches(rank, lossless_last), forward_fn=_forward,
                              gradient_accumulation_steps=2, max_steps=STEPS, device="cpu")
        trainer.train()
        torch.save(
            {"params": flat_params(trainer.unwrapped_model), "allreduces": counter.calls}, f"{out_dir}/rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("lossless_last", [False, True], ids=["every-micro-step", "lossless-last-micro-step"])
def test_ddp_accumulation_matches_one_process(tmp_path, lossless_last):
    mp.start_processes(_worker, args=(2, str(tmp_path), lossless_last), nprocs=2, join=True,
                       start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.testing.assert_close(results[0]["params"], results[1]["params"], rtol=0, atol=0)
    # One bucket all-reduce per optimizer step, none on the first micro-step; when the
    # synchronising micro-step has no loss the trainer all-reduces by hand instead.
    assert results[0]["allreduces"] == (0 if lossless_last else STEPS)

    # One process, one step per optimizer step over all the real micro-batches of both
    # ranks: DDP's mean over ranks of the mean over micro-steps.
    per_rank = [[b for b in _rank_batches(r, lossless_last) if b[0][0, 0] < MARKER] for r in range(2)]
    per_step = len(per_rank[0]) // STEPS
    joined = []
    for step in range(STEPS):
        parts = [b for r in range(2) for b in per_rank[r][step * per_step : (step + 1) * per_step]]
        joined.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    model = make_model()
    single = BaseTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=joined,
                         forward_fn=mse_forward, max_steps=STEPS, device="cpu")
    single.train()
    torch.testing.assert_close(results[0]["params"], flat_params(model), rtol=1e-5, atol=1e-6)
