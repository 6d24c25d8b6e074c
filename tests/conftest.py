import os

import pytest
import torch

# Tests are about behaviour, not speed: one thread keeps them deterministic and leaves the
# second core to torchrun-launched subprocesses.
torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
