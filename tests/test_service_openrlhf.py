"""OpenRLHF interop of `/get_reward`, measured against what OpenRLHF's client really sends.

OpenRLHF (`openrlhf/utils/remote_rm_utils.py` and its experience makers) posts
`{"query", "prompts", "labels"}`; `query[i]` is the policy's token sequence decoded with
`skip_special_tokens=False`: the chat-templated prompt (left-truncated to `prompt_max_len`
tokens, left-padded in batched rollouts), the response and its end-of-turn token, while
`prompts[i]` is the original, untruncated templated prompt. Versions <= 0.9.0 post the whole
rollout (1,024 samples by default) in one request and crash on any non-200 answer.

Pinned here: splitting rules (table-driven, with SmolLM2's real chat template), a 1,024-sample
rollout accepted by default, left-truncated prompts scored and flagged instead of a 422 (with
an opt-in strict mode), and the same reward from `/get_reward` as from `/v1/rewards` for the
same (prompt, response).
"""

from __future__ import annotations

import pytest

from rlaif.service.openrlhf import MIN_OVERLAP, plain_prompt, split_sample, strip_end_markers
from tests.fake_engines import DeterministicEngine, error_of, serve

QUESTIONS = ["What is 3+3?", "Name an ocean.", "Write a haiku about rain, please, with exactly three lines."]
ANSWERS = ["6", "The Pacific Ocean.", "Rain on the window\nsoft grey drums of afternoon\nthe gutter hums low"]


@pytest.fixture(scope="module")
def tokenizer(plain_checkpoint_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(plain_checkpoint_dir)


def templated(tokenizer, question: str, answer: str | None = None) -> str:
    """What OpenRLHF's dataset builds (the prompt), or prompt + response + end-of-turn (the query)."""
    messages = [{"role": "user", "content": question}]
    if answer is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return templated(tokenizer, question) + answer + tokenizer.eos_token


# ------------------------------------------------------------------------------ splitting rules
PROMPT = "<|im_start|>user\nWhat is the capital of France? Answer briefly.<|im_end|>\n<|im_start|>assistant\n"
USER = "What is the capital of France? Answer briefly."
SPLIT_CASES = [
    # (query, prompt, judged prompt, judged response, boundary) -- one comment each
    (PROMPT + "Paris.<|im_end|>", PROMPT, USER, "Paris.", "prefix"),                        # the plain case
    ("<|im_end|>" * 3 + PROMPT + "Paris.<|im_end|><|im_end|>", PROMPT, USER, "Paris.", "prefix"),  # left/right padding
    (PROMPT[25:] + "Paris.<|im_end|>", PROMPT, USER, "Paris.", "recovered"),                # left-truncated prompt
    ("\ufffd" + PROMPT[26:] + "Paris.", PROMPT, USER, "Paris.", "recovered"),              # cut inside a character
    ("<|im_start|>user\nSomething else<|im_end|>\n<|im_start|>assistant\nParis.", "Which city?", "Which city?",
     "Paris.", "recovered"),                                                                # only the template matches
    ("hello", "bye", "bye", "hello", "none"),                                               # nothing matches: whole query
    ("Q: hi A: yo", "Q: hi A:", "Q: hi A:", " yo", "prefix"),                              # untemplated text is kept
    ("Q: hi A: yo</s>", "Q: hi A:", "Q: hi A:", " yo", "prefix"),                          # ...but loses its EOS
]


@pytest.mark.parametrize(("query", "prompt", "judged_prompt", "response", "boundary"), SPLIT_CASES)
def test_split_sample(query, prompt, judged_prompt, response, boundary):
    sample = split_sample(query, prompt)
    assert (sample.prompt, sample.response, sample.boundary) == (judged_prompt, response, boundary)


def test_a_short_suffix_match_is_not_a_boundary():
    prompt = "x" * 40 + "tail!"  # only "tail!" (5 < MIN_OVERLAP characters) occurs in the query
    sample = split_sample("unrelated text with tail! in it", prompt)
    assert MIN_OVERLAP > 5 and sample.boundary == "none"
    assert split_sample("unrelated", prompt, recover=False).boundary == "none"


def test_plain_prompt_reads_common_chat_templates(tokenizer):
    assert plain_prompt(templated(tokenizer, "Hi there")) == "Hi there"  # SmolLM2 adds its own system turn
    multi = tokenizer.apply_chat_template([{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b."},
                                           {"role": "user", "content": "c?"}], tokenize=False, add_generation_prompt=True)
    assert plain_prompt(multi) == "User: a?\n\nAssistant: b.\n\nUser: c?"
    llama3 = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert plain_prompt(llama3) == "Hi there"
    assert plain_prompt("<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n") == "Hi there"
    assert plain_prompt("<|user|>\nHi there<|end|>\n<|assistant|>\n") == "Hi there"
    assert plain_prompt("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST]") == "Hi there"
    assert plain_prompt("Hi there") is None  # not templated: judged as it is
    assert plain_prompt(templated(tokenizer, "Hi", "done")) is None  # ends with a reply, not a generation header
    assert strip_end_markers("6\n<|im_end|>\n<|endoftext|><|endoftext|>") == "6" and strip_end_markers("6  ") == "6  "


# ------------------------------------------------------------------------------ over HTTP
def test_a_whole_rollout_of_1024_samples_is_accepted_by_default():
    """OpenRLHF <= 0.9 posts its whole rollout; the defaults (max_items=256, max_queue=1024) used to 413."""
    engine = DeterministicEngine()
    queries = [f"Q{i}: what is {i} + 1? A: {i + 1}" for i in range(1024)]
    prompts = [f"Q{i}: what is {i} + 1? A:" for i in range(1024)]
    with serve(engine, max_wait_ms=1.0) as (_, client):
        response = client.post("/get_reward", json={"query": queries, "prompts": prompts, "labels": [None] * 1024},
                               timeout=300)
        assert response.status_code == 200, response.text[:500]
        rewards = response.json()["rewards"]
        assert len(rewards) == 1024
        direct = client.post("/v1/rewards", json={"items": [{"prompt": prompts[i], "response": f" {i + 1}"}
                                                            for i in (0, 511, 1023)]}).json()["rewards"]
    assert [rewards[i] for i in (0, 511, 1023)] == pytest.approx(direct, abs=1e-12)  # order preserved
    assert max(engine.batch_sizes) <= 32  # judged in engine batches, never as one 1,024-item call


def test_left_truncated_prompts_are_scored_and_flagged_not_rejected(tokenizer):
    prompts = [templated(tokenizer, q) for q in QUESTIONS]
    # OpenRLHF cut the long prompts from the left; the first sample is untouched
    queries = [prompts[0] + ANSWERS[0] + "<|im_end|>",
               prompts[1][70:] + ANSWERS[1] + "<|im_end|>",
               prompts[2][90:] + ANSWERS[2] + "<|im_end|>"]
    with serve() as (_, client):
        response = client.post("/get_reward", json={"query": queries, "prompts": prompts})
        assert response.status_code == 200, response.text
        body = response.json()
        direct = client.post("/v1/rewards", json={"items": [{"prompt": q, "response": a}
                                                            for q, a in zip(QUESTIONS, ANSWERS)]}).json()
    assert body["extra_logs"]["prefix_recovered"] == [0.0, 1.0, 1.0]
    assert body["extra_logs"]["prefix_mismatch"] == [0.0, 0.0, 0.0]
    assert body["rewards"] == pytest.approx(direct["rewards"], abs=1e-12)


def test_strict_mode_rejects_samples_whose_prompt_is_not_a_prefix(tokenizer):
    prompt = templated(tokenizer, QUESTIONS[1])
    with serve(prefix_mismatch="error") as (_, client):
        exact = client.post("/get_reward", json={"query": [prompt + "Pacific"], "prompts": [prompt]})
        assert exact.status_code == 200
        response = client.post("/get_reward", json={"query": [prompt + "Pacific", prompt[60:] + "Pacific"],
                                                    "prompts": [prompt, prompt]})
        assert response.status_code == 422
        error = error_of(response)
        assert "[1]" in error.message and "RLAIF_PREFIX_MISMATCH" in error.message


def test_get_reward_and_rewards_agree_on_the_same_prompt_and_response(tokenizer):
    """The policy's chat template and end-of-turn token are not judged (before: 0.2208 vs 0.2685)."""
    queries = [templated(tokenizer, q, a) for q, a in zip(QUESTIONS, ANSWERS)]
    prompts = [templated(tokenizer, q) for q in QUESTIONS]
    with serve() as (_, client):
        remote = client.post("/get_reward", json={"query": queries, "prompts": prompts, "labels": ANSWERS}).json()
        direct = client.post("/v1/rewards", json={"items": [{"prompt": q, "response": a}
                                                            for q, a in zip(QUESTIONS, ANSWERS)]}).json()
        kept = None
    with serve(strip_chat_template=False) as (_, client):  # the old behaviour, for contrast: it can fail
        kept = client.post("/get_reward", json={"query": queries, "prompts": prompts}).json()
    assert remote["rewards"] == pytest.approx(direct["rewards"], abs=1e-12)
    assert remote["extra_logs"]["template_stripped"] == [1.0, 1.0, 1.0]
    assert kept["rewards"] != pytest.approx(direct["rewards"], abs=1e-6)
