import os
import sys
import types

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

# Transitional: tests/test_selection.py still does `from test_sam import save_tiny`; the SAM
# tests moved to tests/sfm/test_sam.py and the helper to cli_helpers.save_tiny_sam. Remove this
# once test_selection.py imports `save_tiny_sam` from cli_helpers.
if "test_sam" not in sys.modules:
    _shim = types.ModuleType("test_sam", "alias: cli_helpers' tiny SAM (see tests/conftest.py)")

    def _save_tiny(path, seed: int = 0):
        from cli_helpers import save_tiny_sam

        return save_tiny_sam(path, seed)

    _shim.save_tiny = _save_tiny
    sys.modules["test_sam"] = _shim


@pytest.fixture(scope="session")
def tiny_sfm():
    """A small randomly initialised, frozen embedded SFM (fast; no committed weights needed)."""
    from cli_helpers import tiny_embedded

    model = tiny_embedded(0)
    model._hash = "tiny-test-sfm"
    return model
