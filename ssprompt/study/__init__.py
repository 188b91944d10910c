"""The study layer: (variant x task x seed) cells from a YAML config, run, aggregated and reported.

``config`` (schema, ``--set``), ``runner`` (workers, torchrun, resume), ``aggregate`` (cells ->
results files and intervals), ``report`` (summary.md), ``plots`` (PNG figures).
"""

from .config import CONFIG_DIR, StudyConfig, Variant, cell_id, load_config, parse_sets
from .runner import run_study

__all__ = ["CONFIG_DIR", "StudyConfig", "Variant", "cell_id", "load_config", "parse_sets",
           "run_study"]
