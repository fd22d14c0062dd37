import os

import pytest
import torch

# The models under test are small: a second OpenMP thread mostly adds synchronisation, and
# stalls badly when another process holds the other core. Subprocesses get train.threads=1.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
