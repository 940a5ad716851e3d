"""`rlaif serve`: run the judge service (uvicorn) on 127.0.0.1:8000 by default.

Flags override `RLAIF_*` environment variables, which override the defaults in
`rlaif.service.settings.ServiceSettings`. The HTTP server starts at once (so `/healthz` answers and
load balancers see a live process) while the model loads in the background; when it is ready
a working `curl` example is printed. A model that fails to load stops the command with exit
status 2. Ctrl-C / SIGTERM shuts down gracefully: in-flight batches finish first.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from rlaif.judge.cli import EMBEDDED_JUDGE_NOTE, UserError, is_embedded_engine, user_errors


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        host: Annotated[Optional[str], typer.Option("--host", help="Interface to bind (default 127.0.0.1). Use 0.0.0.0 only with --api-keys (or RLAIF_API_KEYS).")] = None,
        port: Annotated[Optional[int], typer.Option("--port", help="TCP port (default 8000).")] = None,
        engine: Annotated[Optional[str], typer.Option("--engine", help="Engine spec (default default): default | hf:<id-or-path> | openai:<url>#<model> | vllm:<model>.")] = None,
        rubric: Annotated[Optional[list[str]], typer.Option("--rubric", help="Default rubric (id or YAML file) for its kind; give twice to set both the pairwise and the score default.")] = None,
        max_batch_size: Annotated[Optional[int], typer.Option("--max-batch-size", help="Most items per engine batch (default 32).")] = None,
        max_wait_ms: Annotated[Optional[float], typer.Option("--max-wait-ms", help="How long a batch waits for more requests (default 10).")] = None,
        max_queue: Annotated[Optional[int], typer.Option("--max-queue", help="Most items waiting for the engine before 429 (default 1024).")] = None,
        request_timeout: Annotated[Optional[float], typer.Option("--request-timeout", help="Seconds per request before 504 (default 300).")] = None,
        max_items: Annotated[Optional[int], typer.Option("--max-items", help="Most items per request (default 256).")] = None,
        max_chars: Annotated[Optional[int], typer.Option("--max-chars", help="Longest text field in characters (default 32000).")] = None,
        api_keys: Annotated[Optional[str], typer.Option("--api-keys", help="Comma-separated bearer keys (prefer RLAIF_API_KEYS: flags show up in `ps`).")] = None,
        cache_path: Annotated[Optional[Path], typer.Option("--cache-path", help="Judgment cache file (default $RLAIF_CACHE_DIR/judgments.sqlite).")] = None,
        no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write the judgment cache.")] = False,
        calibration: Annotated[Optional[list[Path]], typer.Option("--calibration", help="Calibration file (rlaif calibrate) for its pairwise rubric; give once per rubric (or RLAIF_CALIBRATIONS).")] = None,
        reward_model: Annotated[Optional[Path], typer.Option("--reward-model", help="Serve a distilled reward model directory in /v1/rewards (mode=reward_model) and /get_reward.")] = None,
        log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level: critical | error | warning | info | debug (debug adds access logs).")] = "info",
        ray: Annotated[bool, typer.Option("--ray", help="Serve the same app as a Ray Serve deployment (one URL, several replicas). See docs/scaling.md.")] = False,
        ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster to join with --ray: auto, host:6379 or ray://host:10001 (default: RAY_ADDRESS, else a new local cluster).")] = None,
        replicas: Annotated[Optional[int], typer.Option("--replicas", help="With --ray: number of replicas, each with its own engine (default 1).")] = None,
        autoscale: Annotated[Optional[str], typer.Option("--autoscale", help="With --ray: MIN,MAX replicas, scaled by Ray Serve with the load (instead of --replicas).")] = None,
        replica_cpus: Annotated[Optional[float], typer.Option("--replica-cpus", help="With --ray: CPUs reserved per replica (default 1).")] = None,
        replica_gpus: Annotated[Optional[float], typer.Option("--replica-gpus", help="With --ray: GPUs per replica (default 0; give the engine a cuda device).")] = None,
    ) -> None:
        """Serve the judge over HTTP: pairwise, score, trainer rewards, OpenRLHF /get_reward, metrics."""
        with user_errors():
            import uvicorn

            from rlaif.judge.engines import validate_engine_spec
            from rlaif.service.app import create_app
            from rlaif.service.server import uvicorn_config
            from rlaif.service.settings import ServiceSettings

            overrides: dict[str, object] = {key: value for key, value in {
                "host": host, "port": port, "engine": engine, "max_batch_size": max_batch_size,
                "max_wait_ms": max_wait_ms, "max_queue": max_queue, "request_timeout": request_timeout,
                "max_items": max_items, "max_chars": max_chars, "api_keys": api_keys, "cache_path": cache_path,
                "reward_model": reward_model}.items() if value is not None}
            if no_cache:
                overrides["cache"] = False
            if calibration:
                overrides["calibrations"] = ",".join(str(path) for path in calibration)
            overrides.update(_rubric_defaults(rubric or []))
            settings = ServiceSettings(**overrides)  # type: ignore[arg-type]
            validate_engine_spec(settings.engine)  # a typo or a missing model fails now, not after the server started
            if reward_model is not None and not reward_model.is_dir():
                raise UserError(f"--reward-model {reward_model}: not a directory")
            if not settings.is_loopback and not settings.key_list():
                typer.echo(f"warning: binding {settings.host} without API keys: anyone who can reach this port can use "
                           "the judge; set RLAIF_API_KEYS", err=True)
            ray_flags = {"--ray-address": ray_address, "--replicas": replicas, "--autoscale": autoscale,
                         "--replica-cpus": replica_cpus, "--replica-gpus": replica_gpus}
            if ray:
                _serve_on_ray(settings, log_level, **{k.lstrip("-").replace("-", "_"): v for k, v in ray_flags.items()})
                return
            if any(value is not None for value in ray_flags.values()):
                raise UserError(f"{', '.join(k for k, v in ray_flags.items() if v is not None)} only apply with --ray")
            app = create_app(settings)
            server = uvicorn.Server(uvicorn_config(app, settings, log_level=log_level, access_log=log_level == "debug"))
            outcome: dict[str, str] = {}
            threading.Thread(target=_announce_when_ready, args=(app.state.runtime, server, settings, outcome),
                             name="rlaif-serve-ready", daemon=True).start()
            typer.echo(f"loading engine {settings.engine!r}; http://{_display_host(settings.host)}:{settings.port}/readyz "
                       "turns 200 when the model is ready", err=True)
            server.run()
            if "error" in outcome:
                raise UserError(outcome["error"])


def _serve_on_ray(settings, log_level: str, *, ray_address: str | None, replicas: int | None, autoscale: str | None,
                  replica_cpus: float | None, replica_gpus: float | None) -> None:
    """`rlaif serve --ray`: the app as a Ray Serve deployment (`rlaif.service.ray_serve`) until Ctrl-C / SIGTERM."""
    if replicas is not None and autoscale is not None:
        raise UserError("give --replicas N or --autoscale MIN,MAX, not both")
    if settings.port == 0:
        raise UserError("--ray needs a fixed --port: Ray Serve's proxy binds the port itself")
    try:
        from rlaif.service.ray_serve import ServeOptions, parse_autoscale, serve_until_stopped
    except ImportError as exc:
        raise UserError(f"--ray needs Ray: pip install 'rlaif[ray]' ({exc})") from None
    options = ServeOptions(address=ray_address, replicas=replicas or 1,
                           autoscale=parse_autoscale(autoscale) if autoscale is not None else None,
                           num_cpus=1.0 if replica_cpus is None else replica_cpus,
                           num_gpus=replica_gpus or 0.0, log_level=log_level)
    scale = f"{options.autoscale[0]}-{options.autoscale[1]} replicas (autoscaling)" if options.autoscale else \
        f"{options.replicas} replica(s)"
    typer.echo(f"deploying {scale} of engine {settings.engine!r} on Ray Serve; each replica loads its model first", err=True)

    def announce(base: str) -> None:
        print(f"\nrlaif judge service ready on Ray Serve at {base} ({scale}). Try:\n\n  {curl_example(base, settings)}\n",
              file=sys.stdout, flush=True)

    try:
        serve_until_stopped(settings, options, announce=announce)
    except RuntimeError as exc:  # a replica that cannot start (model fails to load): Ray Serve's reason, no traceback
        raise UserError(f"Ray Serve deployment failed: {exc}") from None


def _rubric_defaults(refs: list[str]) -> dict[str, str]:
    """Map each `--rubric` to the default of its kind (pairwise or score)."""
    from rlaif.judge.rubric import load_rubric

    chosen: dict[str, str] = {}
    for ref in refs:
        rubric = load_rubric(ref)
        field = f"{rubric.kind}_rubric"
        if field in chosen:
            raise UserError(f"--rubric given twice for {rubric.kind} rubrics ({chosen[field]!r}, {ref!r}); "
                            "give at most one pairwise and one score rubric")
        chosen[field] = ref
    return chosen


def _display_host(host: str) -> str:
    if host in {"0.0.0.0", ""}:
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _announce_when_ready(runtime, server, settings, outcome: dict[str, str]) -> None:
    """Print a curl example once the model is ready, or stop the server if it failed to load."""
    runtime.ready_event.wait()
    if runtime.status != "ready":
        outcome["error"] = runtime.message or "model loading failed"
        server.should_exit = True
        return
    port = settings.port
    for listener in getattr(server, "servers", []) or []:  # --port 0: report the port actually bound
        for sock in getattr(listener, "sockets", []) or []:
            port = sock.getsockname()[1]
    base = f"http://{_display_host(settings.host)}:{port}"
    hint = ""
    if settings.key_list() and not os.environ.get("RLAIF_API_KEYS"):
        hint = "  (the keys came from --api-keys: first `export RLAIF_API_KEYS=<one of them>`)\n"
    docs = f"docs: {base}/docs" if settings.public_docs or not settings.key_list() else \
        f"docs: {base}/docs needs the key too, or RLAIF_PUBLIC_DOCS=true"
    note = f"\n{EMBEDDED_JUDGE_NOTE}\n" if is_embedded_engine(settings.engine) else ""
    print(f"\nrlaif judge service ready at {base} ({docs}). Try:\n\n  {curl_example(base, settings)}\n{hint}{note}",
          file=sys.stdout, flush=True)


def curl_example(base: str, settings) -> str:
    """A shell command that judges one pair on the service at `base`.

    With keys, the token is read from `RLAIF_API_KEYS` (the variable the service itself reads;
    `${RLAIF_API_KEYS%%,*}` is its first key when it lists several), so the printed command
    works as is in the shell that started the service and never shows a key."""
    body = json.dumps({"items": [{"prompt": "What is the capital of France?", "response_a": "Paris.",
                                  "response_b": "I think it is Lyon."}]})
    auth = ' -H "Authorization: Bearer ${RLAIF_API_KEYS%%,*}"' if settings.key_list() else ""
    return f"curl -s {base}/v1/judge/pairwise -H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}"
