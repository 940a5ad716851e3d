"""Joining or starting a Ray cluster for the optional Ray backends (`rlaif label --ray`, `rlaif serve --ray`).

Ray is an optional extra (`pip install 'rlaif[ray]'`): nothing on the default path imports this
module, and it imports Ray only inside its functions. Both backends (labeling in
`rlaif.judge.labeling.ray_backend`, serving in `rlaif.service.ray_serve`) connect the same way:

- a process that already called `ray.init` (a notebook, the tests) is used as it is and left running;
- otherwise `ray.init(address)`: None follows Ray's own rule (the `RAY_ADDRESS` variable, else a
  new local cluster with this machine's CPUs and GPUs), `auto` joins the cluster started on this
  machine with `ray start`, `host:6379` joins a head node, `ray://host:10001` goes through the
  Ray client. A cluster this process started is shut down when the block ends; one it joined
  is only disconnected from.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

RAY_EXTRA_HINT = "install the Ray extra: pip install 'rlaif[ray]'"


def require_ray() -> None:
    """Import Ray, or fail with the install command instead of a bare ModuleNotFoundError."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
        import ray.serve  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"the Ray backend needs ray[data,serve] ({exc}); {RAY_EXTRA_HINT}") from exc


@contextlib.contextmanager
def ray_session(address: str | None = None, init_kwargs: Mapping[str, Any] | None = None) -> Iterator[bool]:
    """Use the caller's Ray session or join/start one; yields whether this block started it."""
    require_ray()
    import ray

    if ray.is_initialized():
        yield False
        return
    # No dashboard: it is a web UI on another port and nothing here needs it. Ray's INFO lines stay off stderr.
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, **(init_kwargs or {})}
    ray.init(address=address, **kwargs)
    try:
        yield True
    finally:
        ray.shutdown()


__all__ = ["RAY_EXTRA_HINT", "ray_session", "require_ray"]
