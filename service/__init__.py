"""The judge service: FastAPI app, micro-batcher, settings, metrics and a light HTTP client.

Layout (vLLM's protocol / serving / router split):
- `protocol`  request/response models shared by server and client (pydantic + rlaif.judge.types only);
- `errors`    typed service errors, each with its HTTP status (stdlib only);
- `settings`  `ServiceSettings` (pydantic-settings, `RLAIF_*` env vars);
- `batcher`   `MicroBatcher`: coalesces concurrent requests into engine batches;
- `serving`   `JudgeService`: validation, token budgets, judging, rewards; no FastAPI import;
- `openrlhf`  splitting OpenRLHF `/get_reward` queries into (prompt, response), chat templates removed;
- `metrics`   Prometheus metrics on a per-app registry;
- `app`       `create_app(settings, engine=None)`: routes, auth, error handlers, lifespan;
- `server`    the uvicorn config `rlaif serve` uses: header timeout, connection cap, keep-alive;
- `client`    `JudgeClient` / `AsyncJudgeClient` (httpx; never imports torch);
- `cli`       `rlaif serve`.

This file imports nothing, so `import rlaif.service.client` stays light.
"""
