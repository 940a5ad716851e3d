"""Shared fixtures. The real embedded model is loaded once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_engine():
    """The real embedded SmolLM2-135M-Instruct as an HFEngine (dequantized plain checkpoint)."""
    from rlaif.judge.engines import build_engine

    return build_engine("default")


@pytest.fixture(scope="session")
def plain_checkpoint_dir():
    """Directory of the plain (trainable) checkpoint of the embedded model."""
    from rlaif.judge.models import plain_checkpoint

    return plain_checkpoint()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`):
    on a shared 2-core box, two threads spin against other processes (10x slower). Restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def judgment_cache(tmp_path):
    from rlaif.judge.cache import JudgmentCache

    cache = JudgmentCache(tmp_path / "judgments.sqlite")
    yield cache
    cache.close()


from rlaif.judge.engines.llamacpp_server import free_port  # noqa: E402,F401 - one helper, shared with the benchmarks
