"""Serving a distilled reward model (`rlaif serve --reward-model DIR`).

The real `rlaif.policy_training.reward_model.RewardModel` is built from the embedded model (an
untrained scalar head is enough: the test checks plumbing and numbers, not quality), saved,
then loaded by the service itself through `ServiceSettings.reward_model`, the same lazy path
the CLI uses. Served rewards must equal in-process `RewardModel.score` to 1e-4.

`RewardModel` is imported at the top, not behind a skip: if that import breaks, this file
fails to collect, which is the failure a broken serving path should show.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time

import httpx
import pytest

from rlaif.policy_training.reward_model import RewardModel
from rlaif.service.app import create_app
from rlaif.service.settings import ServiceSettings
from tests.fake_engines import DeterministicEngine, ServerThread


def test_service_modules_do_not_import_the_reward_model_unless_configured():
    code = ("import sys, rlaif.service.app, rlaif.service.serving, rlaif.service.cli; "
            "print([m for m in sys.modules if m.startswith('rlaif.policy_training')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.fixture(scope="module")
def saved_reward_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rm")
    RewardModel.from_base("default", max_length=256).save(directory)
    return directory


def test_served_reward_model_matches_in_process_scores(saved_reward_model):
    directory = saved_reward_model
    prompts = ["What is 2+2?", "Name a color."]
    responses = ["4", "Blue is a color."]
    expected = RewardModel.load(directory).score(prompts, responses)

    # The judge engine is the deterministic one: only the reward-model path is under test here.
    app = create_app(ServiceSettings(cache=False, reward_model=directory), engine=DeterministicEngine())
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=300) as client:
        deadline = time.monotonic() + 300
        while (status := client.get("/readyz").json())["status"] != "ready":  # the RM loads in the background
            assert status["status"] != "failed", status["message"]
            assert time.monotonic() < deadline, "reward model did not load in time"
            time.sleep(0.1)
        assert client.get("/readyz").json()["reward_model"] == str(directory)

        rewards = client.post("/v1/rewards", json={"mode": "reward_model", "items": [
            {"prompt": p, "response": r} for p, r in zip(prompts, responses)]})
        assert rewards.status_code == 200, rewards.text
        assert rewards.json()["rewards"] == pytest.approx(expected, abs=1e-4)

        remote = client.post("/get_reward", json={"query": [p + r for p, r in zip(prompts, responses)],
                                                   "prompts": prompts, "labels": [None, None]})
        assert remote.status_code == 200, remote.text
        body = remote.json()
        assert body["rewards"] == pytest.approx(expected, abs=1e-4)
        assert body["scores"] == pytest.approx([1 / (1 + math.exp(-r)) for r in expected], abs=1e-4)
        assert body["extra_logs"]["reward_model_score"] == pytest.approx(expected, abs=1e-4)
