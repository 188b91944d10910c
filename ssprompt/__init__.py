"""ssprompt: learn prompts for a frozen segmentation foundation model (SFM).

The Python API (see README, "Python API")::

    from ssprompt import Predictor, evaluate, learn_prompts, load_prompts, load_sfm, open_dataset

Importing ``ssprompt`` loads nothing heavy and changes no global state (environment, RNG,
threads, matplotlib backend, progress bars): the names below are imported on first use.
"""

from __future__ import annotations

__all__ = ["Instances", "LearnConfig", "LearnedPrompts", "Prediction", "Predictor",
           "TrainedPrompts", "check_prompts", "evaluate", "learn_prompts", "load_prompts",
           "load_sfm", "open_dataset", "register_backend"]

_WHERE = {"Predictor": "predictor", "load_sfm": "sfm", "register_backend": "sfm",
          "load_prompts": "prompts.promptset", "check_prompts": "prompts.promptset",
          "LearnedPrompts": "prompts.promptset", "Prediction": "evaluation.postprocess",
          "Instances": "evaluation.postprocess", "open_dataset": "api", "learn_prompts": "api",
          "evaluate": "api", "LearnConfig": "api", "TrainedPrompts": "api"}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'ssprompt' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
