"""`rlaif loop`: iterative RLAIF as one resumable command (orchestration only).

Per round r = 1..R: the round r-1 policy samples the training prompts and the judge labels pairs
(`rlaif label`), the distilled reward model is trained or continued on them (`rlaif train-rm`),
PPO/RLOO/GRPO trains the policy against the RM, the judge or a mix (`rlaif ppo`), and `rlaif
winrate` compares the new policy with the round-0 policy on held-out prompts; reward-hacking
guards read those measurements. Every stage calls the existing command's Python code; this
package only owns the run folder, the wiring and the report.

- `config`   `LoopConfig` (pydantic, YAML): the loop's fields plus each stage's own config;
- `layout`   the run folder, atomic stage markers, the lock;
- `stages`   the four stage functions and the shared judge;
- `guards`   length / KL / RM-agreement checks;
- `report`   report.md + report.png;
- `runner`   `run_loop`: resume, guards, report;
- `cli`      `register(app)` adds `rlaif loop`.

    from rlaif.policy_training.loop import LoopConfig, run_loop
    run_loop(LoopConfig.from_yaml("examples/loop_demo/small.yaml"))
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"LoopConfig": "rlaif.policy_training.loop.config", "run_loop": "rlaif.policy_training.loop.runner",
            "check_guards": "rlaif.policy_training.loop.guards", "Measurements": "rlaif.policy_training.loop.guards"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rlaif.policy_training.loop' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
