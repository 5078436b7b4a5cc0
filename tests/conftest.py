import os

import pytest
import torch

# One thread per test process: the DDP tests start two processes on two cores, and
# small ops on a busy machine lose far more to thread hand-offs than they gain.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
