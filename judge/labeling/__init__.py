"""AI-labeled datasets: preference pairs (`rlaif label`) and best-of-n SFT data (`rlaif best-of-n`).

Kept import-light (the CLI imports this package to register its commands); the public
names below are loaded on first access.

    from rlaif.judge.labeling import LabelConfig, run_label, BestOfNConfig, run_best_of_n
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LabelConfig": "rlaif.judge.labeling.config",
    "BestOfNConfig": "rlaif.judge.labeling.config",
    "run_label": "rlaif.judge.labeling.label",
    "run_best_of_n": "rlaif.judge.labeling.best_of_n",
    "ProgressStore": "rlaif.judge.labeling.store",
    "ResumeConflict": "rlaif.judge.labeling.store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rlaif.judge.labeling' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
