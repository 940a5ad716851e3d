"""Data parallelism for `PPOTrainer` under `accelerate launch` / `torchrun`, with no code changes.

The launchers start N copies of the same command and describe the group in environment
variables (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`). `DistContext`
reads them, joins the process group (NCCL on CUDA, Gloo on CPU) and offers the few
collectives the trainer needs:

- every process samples its own `batch_size` prompts (disjoint slices of one shared,
  seeded prompt order) and generates with its own RNG stream, so N processes see N times
  the prompts per step;
- gradients are averaged across processes right before each optimizer step
  (`average_gradients`: bucketed all-reduce), which is the arithmetic of torch's
  `DistributedDataParallel` with `no_sync` during gradient accumulation. The trainer does
  not wrap its models in DDP because rollouts call `generate()` and several separate
  forward passes, and DDP's reducer expects every backward to follow a forward through the
  wrapper; one explicit all-reduce per optimizer step is simpler and communicates as often;
- step metrics are averaged (counts summed) so the KL controller and the logs see the
  whole batch; only rank 0 writes metrics, samples, plots and checkpoints.

A single process (no `WORLD_SIZE`, or 1) gets a context whose collectives are no-ops.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

_BUCKET_ELEMENTS = 1 << 24
"""Gradients are all-reduced in flat buckets of about this many elements (64 MiB in fp32)."""

SUMMED_METRICS = frozenset({"reward_missing", "samples_used", "tokens_per_s"})
"""Step metrics that add up across processes; every other numeric metric is averaged."""


def launcher_world_size() -> int:
    """How many processes the launcher (torchrun / accelerate launch) started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class DistContext:
    """Where this process sits in a data-parallel group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    """True when this context created the process group (and so destroys it in `close`)."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str) -> DistContext:
        """Join the group described by the launcher's environment; `device` picks the backend."""
        world_size = launcher_world_size()
        if world_size <= 1:
            return cls()
        import torch.distributed as dist

        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing and not dist.is_initialized():
            from rlaif.policy_training.config import ConfigError

            raise ConfigError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: start data-parallel runs "
                              f"with torchrun or accelerate launch (they set all of these), or unset WORLD_SIZE "
                              f"for a single process")
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        owns = False
        if not dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            dist.init_process_group(backend=backend)
            owns = True
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, owns_group=owns)

    def close(self) -> None:
        if self.enabled and self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def broadcast_parameters(self, parameters: Iterable[torch.Tensor]) -> None:
        """Make every process start from rank 0's weights (as DDP does at construction)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for p in parameters:
                dist.broadcast(p.data, src=0)

    def sum_across(self, value: torch.Tensor) -> torch.Tensor:
        """`value` summed over processes (a new tensor; `value` itself when not distributed).
        Every process must call it, in the same order, like any collective."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        total = value.clone()
        dist.all_reduce(total)
        return total

    def average_gradients(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over processes. A missing gradient counts as zeros,
        so every process takes part in the same collectives even if it had nothing to train on."""
        if not self.enabled:
            return
        import torch.distributed as dist

        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.Tensor] = []
        size = 0
        for p in parameters:
            grad = p.grad
            assert grad is not None  # filled with zeros above
            bucket.append(grad)
            size += grad.numel()
            if size >= _BUCKET_ELEMENTS:
                self._reduce_bucket(bucket, dist)
                bucket, size = [], 0
        if bucket:
            self._reduce_bucket(bucket, dist)

    def _reduce_bucket(self, grads: list[torch.Tensor], dist: Any) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def merge_records(self, record: dict[str, Any]) -> dict[str, Any]:
        """One step record for the whole group: numeric metrics averaged over the processes that
        have them (non-finite values ignored), counts in `SUMMED_METRICS` summed."""
        if not self.enabled:
            return record
        import torch.distributed as dist

        gathered: list[dict[str, Any] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, record)
        merged: dict[str, Any] = {}
        for key in dict.fromkeys(k for r in gathered if r is not None for k in r):
            values = [r[key] for r in gathered if r is not None and key in r]
            numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if key == "step" or len(numbers) != len(values):
                merged[key] = values[0]
                continue
            finite = [v for v in numbers if math.isfinite(v)]
            if key in SUMMED_METRICS:
                total = sum(finite)
                merged[key] = int(total) if all(isinstance(v, int) for v in values) else total
            else:
                merged[key] = sum(finite) / len(finite) if finite else float("nan")
        merged["world_size"] = self.world_size
        return merged


def exit_after_group_teardown(code: int = 0) -> NoReturn:
    """End a process that has destroyed its process group, skipping interpreter finalization.

    Why: with Gloo (torch 2.13, CPU), a process that finished its work and called
    `destroy_process_group()` cleanly still aborts now and then *after* its last Python line
    ("terminate called without an active exception", SIGABRT, no Python frame): a C++ thread
    is torn down during static destruction. The launcher then reports a failed run and
    SIGTERMs the peers although every artifact was written. Measured on the 2-core CI machine:
    4 of about 60 two-process exits under load. Everything the run produced is on disk before this is
    called, so flushing the standard streams and `os._exit` loses nothing.
    """
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more to lose
            pass
    os._exit(code)
