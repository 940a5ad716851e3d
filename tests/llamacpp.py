"""The llama.cpp server helper as a pytest fixture; the helper itself is `rlaif.judge.engines.llamacpp_server`.

    from tests.llamacpp import llamacpp_server_module    # a module-scoped fixture
    def test_x(llamacpp_server_module): ...

`xllamacpp` is in the `dev` extra; tests that use the fixture skip cleanly without it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rlaif.judge.engines.llamacpp_server import (  # noqa: F401 - re-exported for the tests
    MODEL_ALIAS,
    LlamaCppServer,
    LlamaCppStartError,
    llamacpp_server,
    start_llamacpp_server,
)


@pytest.fixture(scope="module")
def llamacpp_server_module() -> Iterator[LlamaCppServer]:
    """Module-scoped real llama.cpp server on the embedded GGUF (2 threads, 1 slot).

    Skips the requesting tests when xllamacpp is not installed (it is in the `dev` extra).
    """
    pytest.importorskip("xllamacpp", reason="xllamacpp (llama.cpp server) is in the dev extra: pip install -e '.[dev]'")
    with llamacpp_server(threads=2) as server:
        yield server
