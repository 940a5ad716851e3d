"""The judge service: FastAPI app, micro-batcher, settings, metrics and a light HTTP client.

Layout (vLLM's protocol / serving / router split):
- `protocol`  request/response models shared by server and client (pydantic + judge.types only);
- `errors`    typed service errors, each with its HTTP status (stdlib only);
- `settings`  `ServiceSettings` (pydantic-settings, `RLAIF_*` env vars);
- `batcher`   `MicroBatcher`: coalesces concurrent requests into engine batches;
- `serving`   `JudgeService`: validation, judging, rewards; no FastAPI import;
- `metrics`   Prometheus metrics on a per-app registry;
- `app`       `create_app(settings, engine=None)`: routes, auth, error handlers, lifespan;
- `client`    `JudgeClient` / `AsyncJudgeClient` (httpx; never imports torch);
- `cli`       `rlaif serve`.

This file imports nothing, so `import service.client` stays light.
"""
