"""SSPrompt and its fusion ablations (``average``, ``weighted``, ``learned_only``): a learned
embedding fused with each default spatial and/or semantic embedding (``prompts.fusion``)."""

from __future__ import annotations

from ..prompts.promptset import FUSED_KINDS, PromptSet


def build(sfm, class_names, options, generator=None, is_thing=None) -> PromptSet:
    assert options.kind in FUSED_KINDS, options.kind
    return PromptSet(sfm, class_names, options, generator=generator, is_thing=is_thing)
