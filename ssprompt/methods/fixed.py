"""Zero-shot and prompt engineering: nothing learned, the SFM prompted with its encoders' own
embeddings of the default grid and the bare class names, or of a template ensemble of the names
(``prompts.semantic.engineered_semantic``)."""

from __future__ import annotations

from ..prompts.promptset import PromptSet


def build(sfm, class_names, options, generator=None, is_thing=None) -> PromptSet:
    """A frozen ``PromptSet`` (``options.kind``: zero_shot or prompt_engineering)."""
    assert options.kind in ("zero_shot", "prompt_engineering"), options.kind
    return PromptSet(sfm, class_names, options, generator=generator, is_thing=is_thing)
