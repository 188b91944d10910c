"""Fixtures the peer tests share (a test module's own fixture of the same name wins): the
packaged embedded SFM, a few shots of task ``novel`` and a few test images with their
features."""

from __future__ import annotations

import pytest

from ssprompt.sfm.base import encode_images


@pytest.fixture(scope="module")
def sfm():
    from ssprompt import load_sfm

    return load_sfm(device="cpu")


@pytest.fixture(scope="module")
def shots():
    from ssprompt.data.scenes import SceneSplit

    return SceneSplit("novel", "train", shots=4, seed=0)


@pytest.fixture(scope="module")
def test_images():
    from ssprompt.data.scenes import SceneSplit

    test = SceneSplit("novel", "test", n=3)
    return [test[i].image for i in range(3)]


@pytest.fixture(scope="module")
def feats(sfm, test_images):
    return encode_images(sfm, test_images)
