"""Vanilla 2-D prompts: learn the grid points' (x, y) and pass them through the frozen prompt
encoder (``prompts.spatial.Vanilla2DPrompt``); the class prompts stay the defaults."""

from __future__ import annotations

import torch

from ..prompts.promptset import PromptSet


def build(sfm, class_names, options, generator=None, is_thing=None) -> PromptSet:
    assert options.kind == "vanilla_2d", options.kind
    state = PromptSet(sfm, class_names, options, generator=generator, is_thing=is_thing)
    with torch.enable_grad():
        state.spatial()   # a backend whose points cannot move (SAM 3's queries) refuses here
    return state
