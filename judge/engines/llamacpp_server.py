"""A real llama.cpp server (xllamacpp) serving the embedded SmolLM2 GGUF, for tests, benchmarks and `openai:` engines.

`OpenAIEngine` is tested against a real OpenAI-compatible server, not a mock, and the
throughput benchmark compares our HF judging with llama.cpp on the same weights. Both need
to start llama.cpp's own C++ server on a free 127.0.0.1 port, wait until the model is
loaded, and stop it afterwards.

The server runs in a **child Python process** (this file, run as a script) rather than in
the test process: xllamacpp's `Server` has no stop method (it stops when the object is
destroyed), its threads would otherwise compete with torch inside pytest, and a crash in
native code cannot take the test run down. The child blocks on reading its stdin, so it
exits when we close that pipe *or* when the parent dies: no orphan servers.

Usage:

    with llamacpp_server(threads=2) as server:          # context manager
        engine = OpenAIEngine(server.base_url, "smollm2")

    from rlaif.judge.engines.openai import OpenAIEngine
    server = start_llamacpp_server(threads=2, cache_ram_mib=0)   # stop() it when done

The module-scoped pytest fixture `llamacpp_server_module` is in `tests/llamacpp.py`.

`xllamacpp` is in the `llamacpp` and `dev` extras and imported only in the server's child process.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

MODEL_ALIAS = "smollm2"
"""Name the server reports in /v1/models; llama.cpp serves one model and ignores `model`."""


class LlamaCppStartError(RuntimeError):
    """The server process died or never became ready; the message carries its log tail."""


@dataclass
class LlamaCppServer:
    """A running llama.cpp server child process."""

    port: int
    process: subprocess.Popen
    log_path: Path
    threads: int
    started_seconds: float = 0.0
    """Wall time from spawn to ready."""

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI-compatible base URL (what `OpenAIEngine` and `openai:` specs take)."""
        return f"{self.root_url}/v1"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no log>"

    def stop(self, timeout: float = 15.0) -> None:
        """Close the child's stdin (it exits cleanly), then escalate to SIGTERM / SIGKILL."""
        if self.process.poll() is None:
            try:
                if self.process.stdin is not None:
                    self.process.stdin.close()
                self.process.wait(timeout=timeout)
            except (subprocess.TimeoutExpired, OSError):
                self.process.terminate()
                try:
                    self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=5)
        try:
            self.log_path.unlink()
        except OSError:
            pass

    def __enter__(self) -> LlamaCppServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound then released); tests and benchmarks use it for their servers too."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def default_model_path() -> Path:
    from rlaif.judge.models import default_gguf_path

    return default_gguf_path()


def start_llamacpp_server(*, model_path: str | Path | None = None, threads: int = 2, ctx_size: int = 4096,
                          parallel: int = 1, cache_ram_mib: int | None = None, startup_timeout: float = 180.0,
                          attempts: int = 3) -> LlamaCppServer:
    """Spawn the server on a free port and return once `GET /health` answers 200.

    `threads` sets both generation and prompt-processing threads. `parallel` is the number of
    slots (concurrent sequences); each slot reuses the common prefix with its previous prompt
    (`cache_prompt`). `cache_ram_mib` sizes llama.cpp's extra host-RAM cache of whole past
    prompts (None: llama.cpp's default; 0: off), which would serve a repeated prompt almost for
    free. A port taken between picking and binding (a race with other processes) is retried.
    """
    model = Path(model_path) if model_path is not None else default_model_path()
    if not model.is_file():
        raise FileNotFoundError(f"GGUF model not found: {model}")
    last_error: LlamaCppStartError | None = None
    for _ in range(attempts):
        port = free_port()
        log = Path(tempfile.mkstemp(prefix=f"llamacpp-{port}-", suffix=".log")[1])
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--model", str(model), "--port", str(port),
                 "--threads", str(threads), "--ctx-size", str(ctx_size), "--parallel", str(parallel),
                 *(["--cache-ram-mib", str(cache_ram_mib)] if cache_ram_mib is not None else [])],
                stdin=subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        server = LlamaCppServer(port=port, process=process, log_path=log, threads=threads)
        started = time.perf_counter()
        try:
            _wait_ready(server, startup_timeout)
        except LlamaCppStartError as exc:
            last_error = exc
            server.stop()
            continue
        server.started_seconds = time.perf_counter() - started
        return server
    assert last_error is not None
    raise last_error


def _wait_ready(server: LlamaCppServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise LlamaCppStartError(f"llama.cpp server exited with code {server.process.returncode} "
                                         f"before becoming ready; log tail:\n{server.log_tail()}")
            try:
                if client.get(f"{server.root_url}/health").status_code == 200:  # 503 while loading
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    raise LlamaCppStartError(f"llama.cpp server not ready after {timeout:.0f}s; log tail:\n{server.log_tail()}")


@contextmanager
def llamacpp_server(**kwargs: object) -> Iterator[LlamaCppServer]:
    """Context manager around `start_llamacpp_server` (same keyword arguments)."""
    server = start_llamacpp_server(**kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


def _serve(argv: list[str] | None = None) -> None:
    """Child-process entry point: start xllamacpp's HTTP server and block until stdin closes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx-size", type=int, default=4096)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--cache-ram-mib", type=int, default=None)
    args = parser.parse_args(argv)

    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.model_alias = {MODEL_ALIAS}
    params.hostnames = ["127.0.0.1"]
    params.port = args.port
    params.n_ctx = args.ctx_size * args.parallel  # the context is split between slots
    params.n_parallel = args.parallel
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    if args.cache_ram_mib is not None:
        params.cache_ram_mib = args.cache_ram_mib
    server = xllamacpp.Server(params)  # noqa: F841 - the HTTP server lives as long as this object
    print(f"llama.cpp server listening on {server.listening_address}", flush=True)
    sys.stdin.read()  # returns at EOF: the parent closed the pipe or died


if __name__ == "__main__":
    _serve()
