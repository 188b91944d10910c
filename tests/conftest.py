import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))



@pytest.fixture(scope="session")
def tiny_sfm():
    """A small randomly initialised, frozen embedded SFM (fast; no committed weights needed)."""
    from cli_helpers import tiny_embedded

    model = tiny_embedded(0)
    model._hash = "tiny-test-sfm"
    return model
