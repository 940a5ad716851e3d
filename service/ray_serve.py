"""The judge service as a Ray Serve deployment (`rlaif serve --ray`): the same app on N replicas behind one URL.

Each replica is a Ray actor running the app of `rlaif.service.app.create_app` as it is (same routes,
auth, limits, errors, metrics, OpenRLHF `/get_reward`), with its own engine, micro-batcher,
metrics registry and judgment-cache connection. Ray Serve's HTTP proxy spreads requests over the
replicas (power-of-two-choices on queue length), replaces a replica whose process dies, and
rolls replicas one by one on a redeploy (a new replica is ready before an old one stops; the old
one gets no new requests and finishes its in-flight ones, whose batches the app's lifespan drains).
Clients and trainers need no change: one URL, same protocol.

Readiness: a replica loads its model in its constructor (in a thread), so Ray Serve routes no
request to it before the model is in memory; `check_health` then fails (and Ray Serve replaces
the replica) if its app is not ready, e.g. after the batcher stopped.

Where the limits of `rlaif serve` live here: request-level limits (body size and deadline, items,
characters, tokens, queue, auth before the body, timeouts) are the app's and apply per replica
unchanged. Connection-level ones are the proxy's: `keep_alive_timeout` and `request_timeout` map to
Ray Serve's HTTP options; the slow-header guard and `max_connections` of `rlaif.service.server` do
not apply (Ray Serve runs its own uvicorn), `max_connections` instead caps the requests one replica
holds at once (`max_ongoing_requests`; beyond it Ray Serve queues at the proxy). Unlike plain
`rlaif serve`, the proxy reads an unauthenticated request's body before a replica refuses it.

Metrics: `GET /metrics` answers from the replica that took the request (every response names it
in the `x-rlaif-replica` header); `replica_status()` collects every replica's metrics through a
Ray Serve broadcast. Ray Serve's own per-replica metrics (`ray_serve_*`, tagged with the replica)
are on each node's Ray metrics port, where Prometheus aggregates them.

Usage:

    rlaif serve --ray --replicas 2                  # local Ray cluster, 127.0.0.1:8000
    rlaif serve --ray --ray-address auto --autoscale 1,8 --replica-gpus 1 --engine "hf:...?device=cuda"

    from rlaif.service.ray_serve import ServeOptions, deploy
    handle = deploy(ServiceSettings(port=8000), ServeOptions(replicas=2))   # inside a Ray session
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Callable
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rlaif.service.settings import ServiceSettings

DEPLOYMENT = "JudgeService"
REPLICA_HEADER = "x-rlaif-replica"


class ServeOptions(BaseModel):
    """How `rlaif serve --ray` deploys the app: cluster, replica count or autoscaling range, resources."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = Field(None, description="Ray cluster to join (`auto`, `host:6379`, `ray://host:10001`); "
                                                  "None = RAY_ADDRESS, else a new local cluster.")
    replicas: int = Field(1, ge=1, description="Fixed number of replicas (ignored with autoscale).")
    autoscale: tuple[int, int] | None = Field(None, description="(min, max) replicas; Ray Serve adds replicas while "
                                                                "each holds more than target_ongoing_requests.")
    target_ongoing_requests: float | None = Field(None, gt=0, description=(
        "Autoscaling target per replica; default: the settings' max_batch_size (requests one engine batch absorbs)."))
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (give the engine a cuda device too).")
    app_name: str = Field("rlaif-judge", description="Ray Serve application name.")
    init_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra `ray.init` arguments.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Replica and proxy log level; `debug` adds per-request access logs.")

    @model_validator(mode="after")
    def _range(self) -> ServeOptions:
        if self.autoscale is not None:
            low, high = self.autoscale
            if not 0 <= low <= high or high < 1:
                raise ValueError(f"autoscale must be MIN,MAX with 0 <= MIN <= MAX and MAX >= 1, got {low},{high}")
        return self


def parse_autoscale(text: str) -> tuple[int, int]:
    """`--autoscale MIN,MAX` -> (MIN, MAX)."""
    low, sep, high = text.partition(",")
    try:
        if not sep:
            raise ValueError
        return int(low), int(high)
    except ValueError:
        raise ValueError(f"--autoscale takes MIN,MAX replicas, e.g. 1,4; got {text!r}") from None


class ReplicaHeader:
    """Name the replica that answered in every response (`x-rlaif-replica`), so spreading is visible to clients."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named_send)


@serve.deployment(name=DEPLOYMENT)
@serve.ingress()  # late-bound: the app is built in the replica, by __serve_build_asgi_app__, around its own engine
class JudgeReplica:
    """One replica: loads the engine (and reward model) before it accepts requests, then serves `create_app`."""

    async def __init__(self, settings: ServiceSettings) -> None:  # type: ignore[misc]  # Ray Serve awaits it
        from rlaif.service.serving import load_components

        self.settings = settings
        self.replica = serve.get_replica_context().replica_id.unique_id
        # In a thread: the replica's event loop keeps answering Ray Serve's control calls while a large model loads.
        self.engine, self.reward_model, _ = await asyncio.to_thread(load_components, settings, None)
        self.runtime = None

    def __serve_build_asgi_app__(self) -> ASGIApp:
        from rlaif.service.app import create_app

        app = create_app(self.settings, engine=self.engine, reward_model=self.reward_model)
        app.add_middleware(ReplicaHeader, replica=self.replica)  # outermost: also on 401s and middleware errors
        self.runtime = app.state.runtime
        return app

    async def check_health(self) -> None:
        """Ray Serve calls this periodically; raising makes it replace the replica."""
        if self.runtime is not None and self.runtime.status != "ready":
            raise RuntimeError(f"replica {self.replica}: judge service is {self.runtime.status}: {self.runtime.message}")

    def replica_status(self) -> dict[str, Any]:
        """This replica's id, process, readiness and Prometheus text (collected by `replica_status()`)."""
        runtime = self.runtime
        return {"replica": self.replica, "pid": os.getpid(), "status": runtime.status if runtime else "starting",
                "metrics": runtime.metrics.render().decode() if runtime else ""}


def judge_application(settings: ServiceSettings, options: ServeOptions):
    """The Ray Serve application: `JudgeReplica` with the replica count or autoscaling and resources of `options`."""
    scaling: dict[str, Any]
    if options.autoscale is not None:
        low, high = options.autoscale
        scaling = {"autoscaling_config": {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
                                          "target_ongoing_requests": options.target_ongoing_requests or settings.max_batch_size}}
    else:
        scaling = {"num_replicas": options.replicas}
    actor_options: dict[str, Any] = {"num_cpus": options.num_cpus}
    if options.num_gpus:
        actor_options["num_gpus"] = options.num_gpus
    deployment = cast(Any, JudgeReplica).options(  # a serve.Deployment at run time
        **scaling, ray_actor_options=actor_options,
        # A replica folds concurrent requests into engine batches: it must be allowed to hold many at once.
        max_ongoing_requests=settings.max_connections,
        # Stopping replicas (scale-down, redeploy, shutdown) finish their in-flight requests first.
        graceful_shutdown_timeout_s=settings.request_timeout + 5,
        health_check_period_s=5, health_check_timeout_s=30)
    return deployment.bind(settings)


def deploy(settings: ServiceSettings, options: ServeOptions):
    """Start Ray Serve's proxy on settings.host:port (if not running) and deploy the app; returns its handle.

    Must run inside a Ray session (`rlaif.judge.ray_cluster.ray_session`). Returns once every replica
    has loaded its model; raises if a replica cannot start (e.g. the model fails to load).
    """
    serve.start(http_options={"host": settings.host, "port": settings.port,
                              "keep_alive_timeout_s": settings.keep_alive_timeout,
                              "request_timeout_s": settings.request_timeout + 5})
    logging_config = {"log_level": options.log_level.upper(), "enable_access_log": options.log_level == "debug"}
    return serve.run(judge_application(settings, options), name=options.app_name, route_prefix="/",
                     logging_config=logging_config)


def replica_status(app_name: str = "rlaif-judge", timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Every running replica's id, pid, status and Prometheus metrics text (a Ray Serve broadcast)."""
    handle = serve.get_deployment_handle(DEPLOYMENT, app_name=app_name)
    return list(handle.broadcast("replica_status").results(timeout_s=timeout_s))


def serve_until_stopped(settings: ServiceSettings, options: ServeOptions,
                        announce: Callable[[str], None] | None = None) -> None:
    """`rlaif serve --ray`: deploy, call `announce(base_url)` when ready, block until SIGINT/SIGTERM, shut down.

    Shutdown deletes the application (replicas drain their in-flight requests first); when this process
    started the Ray cluster, Ray Serve and the cluster stop too, otherwise the cluster's Serve keeps running.
    """
    from rlaif.judge.ray_cluster import ray_session

    stop = threading.Event()
    with ray_session(options.address, options.init_kwargs) as started:
        # After ray.init, which installs its own SIGTERM handler (it aborts the driver without cleaning up).
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            deploy(settings, options)
            if announce is not None:
                announce(f"http://{_display_host(settings.host)}:{settings.port}")
            stop.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            serve.delete(options.app_name)
            if started:
                serve.shutdown()


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in {"0.0.0.0", ""} else f"[{host}]" if ":" in host else host


__all__ = ["DEPLOYMENT", "REPLICA_HEADER", "JudgeReplica", "ServeOptions", "deploy", "judge_application",
           "parse_autoscale", "replica_status", "serve_until_stopped"]
