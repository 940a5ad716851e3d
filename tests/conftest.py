"""Shared fixtures. The real embedded model is loaded once per test session."""

from __future__ import annotations

import os
import socket

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


@pytest.fixture()
def judgment_cache(tmp_path):
    from rlaif.judge.cache import JudgmentCache

    cache = JudgmentCache(tmp_path / "judgments.sqlite")
    yield cache
    cache.close()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
