"""Reference-guided, checklist and group judging over real HTTP (uvicorn on 127.0.0.1).

The live server runs the embedded SmolLM2; every result is compared with in-process judging of
the same items on the same engine (HTTP and the micro-batcher must not change a number). Limits
and request mistakes (4xx) run against the deterministic engine, which answers instantly.
"""

from __future__ import annotations

import pytest

from rlaif.judge.api.client import JudgeClient, JudgeServiceError
from rlaif.judge.checklist import ChecklistJudge
from rlaif.judge.group import GroupJudge
from rlaif.judge.judges import ScoreJudge
from rlaif.judge.types import ChecklistItem, Criterion, GroupItem, ScoreItem
from rlaif.service.app import create_app
from rlaif.service.settings import ServiceSettings
from tests.fake_engines import ServerThread, error_of, serve

TOL = 1e-4
QUESTION = "What is 6 * 7?"
CRITERIA = [{"text": "States that the answer is 42", "weight": 2.0}, {"text": "Is at most one sentence"}]


@pytest.fixture(scope="module")
def live(default_engine):
    app = create_app(ServiceSettings(cache=False, max_wait_ms=5), engine=default_engine)
    with ServerThread(app) as server, JudgeClient(server.url, timeout=600) as client:
        yield client


def test_reference_guided_score_over_http_matches_in_process(live, default_engine):
    judged = live.score([{"prompt": QUESTION, "response": "42", "reference": "42"}], rubric="correctness")[0]
    local = ScoreJudge(default_engine, "correctness").judge([ScoreItem(prompt=QUESTION, response="42", reference="42")])[0]
    assert judged.rubric_id == "correctness" and abs(judged.score - local.score) < TOL
    rewards = live.rewards([QUESTION], ["42"], reference_answers=["42"], rubric="correctness")
    assert abs(rewards.rewards[0] - local.score) < TOL


def test_checklist_endpoint_and_reward_mode(live, default_engine):
    item = {"prompt": QUESTION, "response": "6 * 7 = 42.", "criteria": CRITERIA, "reference": "42"}
    judged = live.checklist([item])[0]
    local = ChecklistJudge(default_engine).judge([ChecklistItem(
        prompt=QUESTION, response="6 * 7 = 42.", reference="42",
        criteria=tuple(Criterion(**c) for c in CRITERIA))])[0]
    assert judged.checklist_mode == "explicit" and len(judged.criteria) == 2
    assert abs(judged.score - local.score) < TOL
    assert [c.weight for c in judged.criteria] == [2.0, 1.0]
    implicit = live.checklist([item], checklist_mode="implicit")[0]
    assert implicit.criteria is None and 0.0 <= implicit.score <= 1.0
    rewards = live.rewards([QUESTION], ["6 * 7 = 42."], mode="checklist", criteria=[CRITERIA], reference_answers=["42"])
    assert rewards.mode == "checklist" and abs(rewards.rewards[0] - local.score) < TOL
    assert rewards.details[0].checklist is not None and len(rewards.details[0].checklist.criteria) == 2
    signed = live.rewards([QUESTION], ["6 * 7 = 42."], mode="checklist", criteria=[CRITERIA], reference_answers=["42"],
                          scale="signed")
    assert abs(signed.rewards[0] - (2 * local.score - 1)) < TOL


def test_group_rewards_listwise_and_round_robin(live, default_engine):
    group = {"prompt": QUESTION, "responses": ["42", "41", "It is 42."]}
    listwise = live.group_rewards([group], orders=2)
    local = GroupJudge(default_engine, orders=2).judge([GroupItem(prompt=QUESTION, responses=tuple(group["responses"]))])[0]
    assert listwise.method == "listwise" and listwise.rubric_id == "group-listwise"
    assert len(listwise.rewards) == 1 and len(listwise.rewards[0]) == 3
    assert max(abs(a - b) for a, b in zip(listwise.rewards[0], local.scores)) < TOL
    assert len(listwise.judgments[0].order_spread) == 3
    again = live.group_rewards([group], orders=2)
    assert again.rewards == listwise.rewards, "deterministic"
    robin = live.group_rewards([group, {"prompt": "Name a color.", "responses": ["Blue.", "Seven."]}],
                               method="round_robin")
    assert robin.rubric_id == "helpfulness" and [len(r) for r in robin.rewards] == [3, 2]
    assert robin.judgments[0].win_matrix is not None and robin.judgments[1].orders == 2


@pytest.mark.parametrize(("path", "body", "status", "fragment"), [
    ("/v1/rewards/group", {"groups": [{"prompt": "p", "responses": ["a"]}]}, 422, "at least 2"),
    ("/v1/rewards/group", {"groups": [{"prompt": "p", "responses": ["a", "b"]}], "orders": 0}, 422, "orders"),
    ("/v1/rewards/group", {"groups": [{"prompt": "p", "responses": ["a", "b"]}], "rubric": "score-1-10"}, 422,
     "needs a group rubric"),
    ("/v1/rewards/group", {"groups": [{"prompt": "p", "responses": ["a", "b"]}], "method": "round_robin",
                           "rubric": "group-listwise"}, 422, "needs a pairwise rubric"),
    ("/v1/rewards/group", {"groups": [{"prompt": "p", "responses": ["a", "b", "c"]}] * 2}, 413, "6 responses"),
    ("/v1/rewards/group", {"groups": [{"prompt": "p", "responses": ["a", "x" * 101]}]}, 413, "groups.0.responses.1"),
    ("/v1/judge/checklist", {"items": [{"prompt": "p", "response": "r", "criteria": []}]}, 422, "criteria"),
    ("/v1/judge/checklist", {"items": [{"prompt": "p", "response": "r", "criteria": [{"text": "a", "weight": -1}]}]},
     422, "greater than 0"),
    ("/v1/judge/checklist", {"items": [{"prompt": "p", "response": "r", "criteria": [{"text": "c" * 101}]}]}, 413,
     "items.0.criteria.0.text"),
    ("/v1/judge/checklist", {"items": [{"prompt": "p", "response": "r", "criteria": [{"text": "a"}]}],
                             "rubric": "helpfulness"}, 422, "checklist rubric"),
    ("/v1/judge/score", {"items": [{"prompt": "p", "response": "r", "reference": "x"}]}, 422,
     "does not use a reference"),
    ("/v1/judge/score", {"items": [{"prompt": "p", "response": "r"}], "rubric": "correctness"}, 422,
     "has none"),
    ("/v1/judge/score", {"items": [{"prompt": "p", "response": "r", "reference": "r" * 101}],
                         "rubric": "correctness"}, 413, "items.0.reference"),
    ("/v1/rewards", {"items": [{"prompt": "p", "response": "r"}], "mode": "checklist"}, 422, "criteria"),
    ("/v1/rewards", {"items": [{"prompt": "p", "response": "r", "criteria": [{"text": "a"}]}]}, 422,
     "mode='checklist' only"),
])
def test_request_mistakes_are_4xx_with_a_clear_message(path, body, status, fragment):
    with serve(max_items=4, max_chars=100) as (_, client):
        response = client.post(path, json=body)
        assert response.status_code == status, response.text
        assert fragment in error_of(response).message


def test_group_token_budget_counts_the_whole_group():
    # A listwise prompt holds every response: a group of short texts can be over budget where each text is not.
    with serve(max_item_tokens=400) as (_, client):
        small = client.post("/v1/rewards/group", json={"groups": [{"prompt": "p", "responses": ["word " * 60] * 2}]})
        assert small.status_code == 200, small.text
        big = client.post("/v1/rewards/group", json={"groups": [{"prompt": "p", "responses": ["word " * 60] * 6}]})
        assert big.status_code == 413 and "groups.0 needs" in error_of(big).message


def test_client_raises_on_4xx_and_splits_groups_by_responses():
    with serve(max_items=4) as (server, _), JudgeClient(server.url, max_items=4) as client:
        groups = [{"prompt": f"p{i}", "responses": ["a", "b", "c"]} for i in range(3)]
        merged = client.group_rewards(groups)  # 9 responses: three requests of one group each
        assert [len(r) for r in merged.rewards] == [3, 3, 3]
        with pytest.raises(JudgeServiceError) as info:
            client.group_rewards([{"prompt": "p", "responses": ["a", "b"]}], rubric="score-1-10")
        assert info.value.status == 422
