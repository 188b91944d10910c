"""Methods: the ways of adapting the frozen SFM (the SSPrompt kinds, prompt engineering, vanilla
2-D, and peers), registered in one place like the backends (``ssprompt.sfm``).

A method is a name, an options dataclass (``options.py``: its fields are the YAML keys, the
``ssprompt train`` flags and the ``learn_prompts`` keywords, each default stated once) and a
builder ``build(sfm, class_names, options, generator=None, is_thing=None)`` that returns a
``base.MethodState`` (the protocol the training loop, selection, saving and evaluation see).
The packaged ones are modules under ``ssprompt/methods/`` with one ``METHODS`` line below; one
that lives elsewhere calls ``register_method``. A study variant's ``kind:`` (or ``method:``) and
``ssprompt train --kind`` name a method. No torch is imported here (``--help`` stays fast).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Any

from ..errors import UserError
from .options import KINDS, Options, PromptConfig

_OPTIONS = ".options:PromptConfig"


@dataclass(frozen=True)
class Method:
    # "module:attr" (".module" under ssprompt.methods), imported on first use, or the object
    options: str | type       # the options dataclass
    build: str | Callable     # build(sfm, class_names, options, generator=None, is_thing=None)
    description: str          # one line, for --help
    # whether its prompts depend on the shots (False: nothing is learned or fitted, and one
    # evaluation serves every seed of a study)
    uses_shots: bool = True
    # identity at init: with these option values a freshly built state decodes exactly as the
    # method ``reference`` does (tests/methods checks it on every backend); None: no such setting
    identity: dict | None = None
    reference: str = "zero_shot"

    def options_class(self) -> type:
        return _resolve(self.options)

    def builder(self) -> Callable:
        return _resolve(self.build)


def _resolve(x):
    if not isinstance(x, str):
        return x
    module, attr = x.split(":")
    return getattr(importlib.import_module(module, __name__), attr)


METHODS: dict[str, Method] = {
    "zero_shot": Method(_OPTIONS, ".fixed:build", "the encoders' own prompts (nothing learned)",
                        uses_shots=False, identity={}),
    "prompt_engineering": Method(_OPTIONS, ".fixed:build",
                                 "a template ensemble of the class names (nothing learned)",
                                 uses_shots=False, identity={}, reference="prompt_engineering"),
    "vanilla_2d": Method(_OPTIONS, ".vanilla2d:build",
                         "learn the grid points' 2-D coordinates (frozen prompt encoder)"),
    # (no identity setting: its points are stored as logits, and sigmoid(logit(x)) is x only
    # to within an ulp for some grid points, so its start decodes as zero-shot within ~1e-7)
    "average": Method(_OPTIONS, ".ssprompt:build", "learned embeddings fused with the defaults "
                      "at a fixed weight 0.5", identity={"init": "default"}),
    "weighted": Method(_OPTIONS, ".ssprompt:build", "SSPrompt: learned embeddings fused with "
                       "the defaults by learned weights", identity={"init": "default"}),
    "learned_only": Method(_OPTIONS, ".ssprompt:build", "learned embeddings alone (the defaults "
                           "dropped; ablation 1)", identity={"init": "default"}),
    "tip_adapter": Method(".tip_adapter:TipAdapterOptions", ".tip_adapter:build",
                          "Tip-Adapter: a cache of the shots' matched mask embeddings adds to "
                          "the class logits (nothing trained)", identity={"tip_alpha": 0.0}),
    "tip_adapter_f": Method(".tip_adapter:TipAdapterFOptions", ".tip_adapter:build",
                            "Tip-Adapter-F: Tip-Adapter with its cache keys trained",
                            identity={"tip_alpha": 0.0}),
    "persam": Method(".persam:PerSAMOptions", ".persam:build", "PerSAM: per class, a prototype "
                     "of the shots' features places each image's point prompt (nothing trained)",
                     identity={"points_per_class": 0, "keep_grid": True}),
    # (identity: persam's setting, checked in tests/methods/test_persam.py on SAM; None here
    # because the identity check also runs on the embedded SFM, where PerSAM-F does not apply)
    "persam_f": Method(".persam:PerSAMFOptions", ".persam:build", "PerSAM-F: PerSAM with 2 "
                       "learned weights over SAM's multimask outputs (SAM, SAM 2)"),
    "coop": Method(".coop:CoOpOptions", ".coop:build", "CoOp: 16 learned context vectors "
                   "before every class name at the frozen text encoder's input",
                   identity={"n_ctx": 0, "suffix": ""}),
    "lora": Method(".lora:LoRAOptions", ".lora:build", "decoder LoRA (SAMed): rank-4 updates "
                   "of the mask decoder attentions' q and v, the prompts zero-shot",
                   identity={}),
}
DEFAULT_METHOD = "weighted"   # SSPrompt


def register_method(name: str, options: str | type, build: str | Callable, description: str,
                    uses_shots: bool = True, identity: dict | None = None,
                    reference: str = "zero_shot") -> None:
    """Make ``name`` a method (a study variant's ``method: NAME``, ``ssprompt train --kind
    NAME``, ``learn_prompts(kind=NAME)``). ``options``: a dataclass subclassing
    ``options.Options``; ``build(sfm, class_names, options, generator=None, is_thing=None)``
    returns a ``base.MethodState``; either may be "package.module:attr" (imported on first use).
    Registering a name again replaces it. Its options become ``ssprompt train`` flags and
    ``learn_prompts`` keywords where the method is registered before those are built (the
    packaged ones: a ``METHODS`` line)."""
    if not name or not isinstance(name, str) or any(c.isspace() for c in name):
        raise ValueError(f"register_method: bad method name {name!r}")
    METHODS[name] = Method(options, build, " ".join(str(description).split()), uses_shots,
                           identity, reference)


def get_method(name: str) -> Method:
    if name not in METHODS:
        hint = " ('default' is now 'zero_shot')" if name == "default" else ""
        raise UserError(f"kind {name}: unknown method{hint}; choose one of "
                        f"{', '.join(METHODS)}", field="kind")
    return METHODS[name]


def methods_help() -> str:
    """One line per registered method, for ``--kind``'s help."""
    return "; ".join(f"{name}: {m.description}" for name, m in METHODS.items())


def option_fields(name: str) -> dict:
    """The method's option fields by name (its YAML keys / flags / keywords)."""
    return {f.name: f for f in fields(get_method(name).options_class())
            if f.metadata.get("key", True)}


def make_options(name: str, values: dict | None = None, where: str = ""):
    """The options of method ``name`` from given values (a YAML variant's keys, ``train``
    flags, ``learn_prompts`` keywords); a value None or absent takes the dataclass default.
    A key the method does not have is refused in one line."""
    values = {k: v for k, v in (values or {}).items() if v is not None}
    own = option_fields(name)
    bad = sorted(set(values) - set(own))
    if bad:
        raise UserError(f"{where}{', '.join(bad)}: not an option of method {name} (its "
                        f"options: {', '.join(sorted(own)) or 'none'})", field=bad[0])
    cls = get_method(name).options_class()
    extra = {"kind": name} if issubclass(cls, PromptConfig) else {"method": name}
    return cls(**extra, **values)


def method_name(options) -> str:
    """The registered name of the method whose options these are."""
    return options.method


def _keyword_fields() -> dict:
    """Every registered method's option fields by name (the first declaration of a name gives
    its type and help)."""
    out: dict = {}
    for name in METHODS:
        for k, f in option_fields(name).items():
            out.setdefault(k, f)
    return out


def method_keywords() -> list[str]:
    """The ``learn_prompts`` keywords (and ``LearnConfig`` fields) the methods' options give."""
    return list(_keyword_fields())


def with_method_keywords(cls: type) -> type:
    """``cls`` (a dataclass) with one more field per method option (``method_keywords``),
    default None: "the chosen method's own default" (its options dataclass states it)."""
    extra = [(k, Any, field(default=None)) for k in method_keywords()
             if k not in {f.name for f in fields(cls)}]
    out = make_dataclass(cls.__name__, extra, bases=(cls,))
    out.__doc__, out.__qualname__, out.__module__ = cls.__doc__, cls.__qualname__, cls.__module__
    return out


def _default_text(f) -> str:
    d = f.default if f.default is not MISSING else None
    if d is None:
        return ""
    return f" (default {','.join(d) if isinstance(d, tuple) else d})"


def add_method_flags(parser) -> None:
    """``--kind`` and one flag per method option (``--weight-init`` for ``weight_init``) on an
    argparse parser; every flag defaults to None: the method's own default."""
    import argparse

    parser.add_argument("--kind", "--method", dest="kind", default=DEFAULT_METHOD,
                        help=f"the method (default {DEFAULT_METHOD}): {methods_help()}")
    owners: dict[str, list[str]] = {}
    for name in METHODS:
        for k in option_fields(name):
            owners.setdefault(k, []).append(name)
    for k, f in _keyword_fields().items():
        flag = "--" + k.replace("_", "-")
        who = "" if len(owners[k]) == len(METHODS) else \
            f" [{', '.join(owners[k]) if len(owners[k]) < 4 else 'SSPrompt kinds'}]"
        help_ = f.metadata.get("help", "") + _default_text(f) + who
        t = f.metadata.get("flag_type", f.type)
        t = t if isinstance(t, type) else {"int | None": int, "float | None": float,
                                           "str | None": str, "int": int, "float": float,
                                           "str": str, "bool": bool,
                                           "bool | None": bool}.get(str(t), str)
        if t is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help_)
        else:
            parser.add_argument(flag, type=t, default=None, help=help_)


__all__ = ["DEFAULT_METHOD", "KINDS", "METHODS", "Method", "Options", "PromptConfig",
           "add_method_flags", "get_method", "make_options", "method_keywords", "method_name",
           "methods_help", "option_fields", "register_method", "with_method_keywords"]
