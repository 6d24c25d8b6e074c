"""The CUDA path: torchrun on GPUs joins with NCCL, each rank on its own device, and gives
one process's weights. Skips without a GPU (CI has none)."""

from __future__ import annotations

import pytest
import torch
from test_torchrun import max_difference, ranks, single, torchrun, weights

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0

pytestmark = [pytest.mark.slow, pytest.mark.skipif(GPUS == 0, reason="needs a CUDA device")]


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_nccl_run_equals_one_process(tmp_path, parallelism):
    nproc = min(GPUS, 2)
    options = ["--steps", "10", "--clip", "0.5", "--device", "cuda", "--parallelism", parallelism]
    single(tmp_path / "one", *options, "--batch", str(4 * nproc * 2))
    torchrun(tmp_path / "many", *options, "--batch", "4", "--accum", "2", "--count-comm", nproc=nproc)
    assert max_difference(weights(tmp_path / "many"), weights(tmp_path / "one")) < 1e-4
    for rank, info in enumerate(ranks(tmp_path / "many", nproc)):
        assert info["backend"] == "nccl" and info["device"] == f"cuda:{rank}"
        assert info["comm_per_micro_step"][0::2] == [0] * 10
