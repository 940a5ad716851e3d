"""Checkpoints of a PPO run: `checkpoint-{step}/` written atomically, found, checked, pruned and restored.

A checkpoint holds the policy (`save_pretrained`, adapters only with LoRA) and tokenizer,
the critic (`value/` or `value_head.safetensors`), the optimizer states (unless
`logging.save_optimizer` is off), the trainer state (step, KL coefficient, prompt order,
reward-source state, config) and one RNG-state file per process. It is written to a temp folder
that is renamed at the end and marked complete, so a crash never leaves half a checkpoint that
`latest_checkpoint` would pick up.

Disk is the constraint a new user hits first: a full fine-tune of the 135M policy with its
separate critic is ~3.1 GB per checkpoint, 2.1 GB of it AdamW moments. So after each save only
the newest `logging.keep_checkpoints` complete checkpoints stay (default 1: what resume needs),
older ones are deleted only once the new one is complete, and `<output_dir>/latest` is a
relative symlink to the newest, a name that exists whatever the step count
(`rlaif winrate --policy runs/ppo/latest`).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rlaif.policy_training.config import ConfigError, PPOConfig, flatten_saved
from rlaif.policy_training.distributed import DistContext
from rlaif.policy_training.models import VALUE_HEAD_FILE, PolicyModels
from rlaif.policy_training.prompt_data import PromptSampler

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = ".complete"
LATEST_LINK = "latest"
"""`<output_dir>/latest`: a relative symlink to the newest complete checkpoint."""
OPTIMIZER_FILE = "optimizer.pt"
RESUME_KEYS = ("policy", "estimator", "lora_r", "group_size", "value_model")
"""Config fields (flat keys) that fix the model layout: a checkpoint resumes only with the same values."""


RESTARTED_OPTIMIZER = (
    "%s has no optimizer state (saved with save_optimizer off / --no-save-optimizer): resuming with a FRESH AdamW "
    "state (moments start from zero, so the first updates are larger than in an uninterrupted run); weights, KL "
    "coefficient, prompt order and RNG are restored")


@dataclass
class TrainerState:
    """What besides weights a resumed run needs to continue as if it had not stopped."""

    step: int
    kl_controller: Any  # FixedKLController | AdaptiveKLController
    sampler: PromptSampler
    update_gen: torch.Generator
    reward_source: Any


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete `checkpoint-{step}` directories of a run, oldest step first."""
    found = []
    for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX):]
        if suffix.isdigit() and not path.is_symlink() and (path / COMPLETE_MARKER).is_file():
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete `checkpoint-{step}` directory with the highest step, if any."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def prune_checkpoints(output_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (0 = keep all); returns what was deleted.

    Runs after a new checkpoint is complete, so the one resume needs is never the one removed."""
    if keep <= 0:
        return []
    stale = complete_checkpoints(output_dir)[:-keep]
    for path in stale:
        (path / COMPLETE_MARKER).unlink()  # first, so a crash mid-delete leaves nothing that looks resumable
        shutil.rmtree(path)
        logger.info("deleted %s (keep_checkpoints=%d)", path, keep)
    return stale


def point_latest(output_dir: Path, checkpoint: Path) -> None:
    """Make `<output_dir>/latest` a relative symlink to `checkpoint`, replaced atomically.

    Relative, so a run directory that is moved or copied (`cp -a`, rsync) keeps a working link. On a
    file system without symlinks the link is skipped: a run directory itself also resolves to its
    newest checkpoint everywhere a policy is read (`winrate.resolve_policy_spec`)."""
    link, tmp = output_dir / LATEST_LINK, output_dir / f".tmp-{LATEST_LINK}"
    if link.exists() and not link.is_symlink():
        logger.warning("%s exists and is not a link; not pointing it at %s", link, checkpoint.name)
        return
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(checkpoint.name, target_is_directory=True)
        tmp.replace(link)
    except OSError as exc:  # e.g. no symlink support
        logger.warning("could not link %s -> %s (%s); use the run directory itself instead", link, checkpoint.name, exc)


def rng_file(rank: int) -> str:
    """Each process's RNG state; rank 0 keeps the single-process name, so checkpoints stay compatible."""
    return "rng_state.pt" if rank == 0 else f"rng_state_rank{rank}.pt"


def check_resumable(checkpoint: Path, config: PPOConfig) -> None:
    """Refuse a checkpoint whose model layout differs from the config, before loading any weights."""
    saved = flatten_saved(json.loads((checkpoint / "trainer_state.json").read_text())["config"])
    saved.setdefault("value_model", "separate")  # checkpoints from before the option existed
    now = config.flat()
    for key in RESUME_KEYS:
        if saved.get(key) != now[key]:
            raise ConfigError(f"cannot resume from {checkpoint}: it was trained with {key}={saved.get(key)!r}, "
                              f"the config now says {now[key]!r}; restore that value or use a fresh output_dir")


def save_checkpoint(output_dir: Path, config: PPOConfig, models: PolicyModels, state: TrainerState,
                    dist: DistContext, after_write: Callable[[], Any]) -> Path:
    """Write `checkpoint-{step}/`; a temp folder renamed at the end, so a crash never leaves half a checkpoint.

    Distributed: rank 0 writes the (identical) weights and optimizer state, every process
    its own RNG state; the others wait until the checkpoint is complete. `after_write` runs on
    rank 0 once the checkpoint is in place (the trainer redraws its plots)."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{state.step}"
    tmp = output_dir / f".tmp-{CHECKPOINT_PREFIX}{state.step}"
    if dist.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "sampler": state.sampler.generator.get_state(), "update": state.update_gen.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / rng_file(dist.rank))
    dist.barrier()
    if dist.is_main:
        _write(tmp, final, config, models, state)
        point_latest(output_dir, final)
        prune_checkpoints(output_dir, config.logging.keep_checkpoints)
        after_write()
        logger.info("saved %s", final)
    dist.barrier()
    return final


def _write(tmp: Path, final: Path, config: PPOConfig, models: PolicyModels, state: TrainerState) -> None:
    models.policy.save_pretrained(tmp / "policy")
    models.tokenizer.save_pretrained(tmp / "policy")
    if models.value_model is not None:
        models.value_model.save_pretrained(tmp / "value")
    if models.value_head is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in models.value_head.state_dict().items()}, str(tmp / VALUE_HEAD_FILE))
    if config.logging.save_optimizer:
        optim = {"policy": models.policy_optimizer.state_dict()}
        if models.value_optimizer is not None:
            optim["value"] = models.value_optimizer.state_dict()
        torch.save(optim, tmp / OPTIMIZER_FILE)
    source = state.reward_source
    trainer_state = {
        "step": state.step,
        "kl_controller": state.kl_controller.state_dict(),
        "prompt_order": state.sampler.order,
        "prompt_pointer": state.sampler.pointer,
        "reward_source_state": source.state_dict() if callable(getattr(source, "state_dict", None)) else None,
        "optimizer_saved": config.logging.save_optimizer,
        "config": config.model_dump(mode="json"),
    }
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    (tmp / COMPLETE_MARKER).write_text("ok\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def load_state(checkpoint: Path, config: PPOConfig, models: PolicyModels, state: TrainerState, dist: DistContext,
               device: torch.device) -> None:
    """Restore everything but the weights (loaded by `build_models`) from `checkpoint` into `state`."""
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    state.step = int(saved["step"])
    state.kl_controller.load_state_dict(saved["kl_controller"])
    state.sampler.order = list(saved["prompt_order"])
    state.sampler.pointer = int(saved["prompt_pointer"])
    source = state.reward_source
    if saved.get("reward_source_state") is not None and callable(getattr(source, "load_state_dict", None)):
        source.load_state_dict(saved["reward_source_state"])
    if (checkpoint / OPTIMIZER_FILE).is_file():
        optim = torch.load(checkpoint / OPTIMIZER_FILE, map_location=device, weights_only=False)
        models.policy_optimizer.load_state_dict(optim["policy"])
        if models.value_optimizer is not None:
            models.value_optimizer.load_state_dict(optim["value"])
    elif dist.is_main:
        logger.warning(RESTARTED_OPTIMIZER, checkpoint)
    own = checkpoint / rng_file(dist.rank)
    rng = torch.load(own if own.is_file() else checkpoint / rng_file(0), weights_only=False)
    # The prompt order and minibatch shuffles are the same on every rank.
    state.sampler.generator.set_state(rng["sampler"])
    state.update_gen.set_state(rng["update"])
    if own.is_file():
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    else:  # resumed with more processes than the run had: a fresh sampling stream for this rank
        logger.info("%s has no RNG state for rank %d; seeding it afresh", checkpoint, dist.rank)
        torch.manual_seed(config.ppo.seed + dist.rank + 7919 * state.step)
