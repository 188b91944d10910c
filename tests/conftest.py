import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_sfm():
    """A small randomly initialised, frozen embedded SFM (fast; no committed weights needed)."""
    from ssprompt.sfm.base import freeze
    from ssprompt.sfm.embedded import EmbeddedSFM

    torch.manual_seed(0)
    model = EmbeddedSFM(embed_dim=32, mask_dim=16, layers=1)
    model._hash = "tiny-test-sfm"
    return freeze(model)
