"""Methods' options, declared once: a dataclass per method whose fields (with their defaults and
help) are the study YAML's variant keys, the ``ssprompt train`` flags and the ``learn_prompts``
keywords; ``PromptConfig``, the options of the six SSPrompt kinds. No torch here (``--help``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError

# what a variant does with its prompts (the study YAML's ``kind``, ``ssprompt train --kind``):
# zero_shot and prompt_engineering learn nothing; vanilla_2d learns the points' coordinates;
# average, weighted and learned_only are the fusion modes of learned embeddings (fusion.py)
KINDS = ("zero_shot", "prompt_engineering", "vanilla_2d", "average", "weighted", "learned_only")
FUSED_KINDS = ("average", "weighted", "learned_only")   # kind = the learners' fusion mode
LEARNERS = ("spatial", "semantic")


def opt(default, help: str, **kw):
    """A method option: its default and its one-line help (``ssprompt train --help``)."""
    return field(default=default, metadata={"help": help, **kw})


def check_n_prompts(n) -> None:
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n <= 0):
        raise UserError(f"n_prompts {n}: must be a positive integer", field="n_prompts")


N_PROMPTS_HELP = "spatial prompts: the default grid's points (default: the backend's own)"


@dataclass
class Options:
    """The base of a new method's options: every method prompts the SFM's default N-point grid
    (``n_prompts``). ``method`` is the method's registered name (filled by
    ``ssprompt.methods.make_options``; not a key, flag or keyword of its own)."""

    method: str = field(default="", metadata={"key": False})
    n_prompts: int | None = opt(None, N_PROMPTS_HELP)

    def __post_init__(self):
        check_n_prompts(self.n_prompts)


@dataclass
class PromptConfig:
    """The options of the six SSPrompt kinds (one dataclass, so that a cell records the same
    keys for every kind): ``kind`` is the method's name."""

    kind: str = field(default="weighted", metadata={"key": False})   # one of KINDS
    learners: tuple[str, ...] = opt(LEARNERS, "which prompts learn: spatial, semantic or both "
                                    "(a comma list)", flag_type=str)
    n_prompts: int | None = opt(None, N_PROMPTS_HELP)
    init: str | None = opt(None, "random | default: how z_learned starts (default: random for "
                           "learned_only, a copy of z_default otherwise)")
    # the learned fusion weight per prompt, or per prompt and dim
    weight_shape: str = opt("prompt", "prompt | dim: one fusion weight per prompt, or per "
                            "prompt and dim")
    weight_init: float = opt(0.5, "weighted: the learned fusion weight's start")
    # the anchor (the pull of z_learned towards z_default, TrainConfig.anchor) applies to the
    # fused modes; None: fused modes yes, learned_only no (its default is gone). True also
    # anchors learned_only: the study's control that keeps the pull but drops the fusion
    anchored: bool | None = opt(None, "pull z_learned towards z_default (TrainConfig.anchor); "
                                "default: the fused modes yes, learned_only no")

    @property
    def method(self) -> str:
        return self.kind

    def __post_init__(self):
        if self.init is None:
            # learned_only starts from noise (the default embedding is really gone); the fused
            # modes start from a copy of the default, which did better on the val split
            self.init = "random" if self.kind == "learned_only" else "default"
        if self.kind not in KINDS:
            hint = " ('default' is now 'zero_shot')" if self.kind == "default" else ""
            raise UserError(f"kind {self.kind}: unknown{hint}; choose one of {', '.join(KINDS)}",
                            field="kind")
        if isinstance(self.learners, str):
            self.learners = tuple(x for x in self.learners.split(",") if x)
        self.learners = tuple(self.learners)
        bad = [x for x in self.learners if x not in LEARNERS]
        if bad or not self.learners:
            raise UserError(f"learners {','.join(self.learners)}: choose from spatial,semantic",
                            field="learners")
        check_n_prompts(self.n_prompts)
