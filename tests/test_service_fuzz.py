"""Property-based API fuzzing with schemathesis: whatever the input, never a 5xx, always the error shape.

Schemathesis reads the live `/openapi.json` and generates requests for every operation:
schema-valid ones (positive) and schema-violating ones (negative: wrong types, missing
fields, out-of-enum values). Against a real uvicorn server with the deterministic engine
(for speed), every response must be < 500, every error must be the one `ErrorResponse`
shape, and responses must match the documented status codes and schemas. Bounded by
`max_examples` so it runs in well under two minutes in CI.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a dev dependency (pip install schemathesis)")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (content_type_conformance, not_a_server_error,  # noqa: E402
                                 response_schema_conformance, status_code_conformance)

from rlaif.service.app import create_app  # noqa: E402
from rlaif.service.protocol import ErrorResponse  # noqa: E402
from rlaif.service.settings import ServiceSettings  # noqa: E402
from tests.fake_engines import DeterministicEngine, LengthRewardScorer, ServerThread  # noqa: E402

MAX_EXAMPLES = 400


@pytest.fixture(scope="module")
def running():
    app = create_app(ServiceSettings(cache=False, max_items=16, max_chars=2000, max_queue=256, max_wait_ms=1),
                     engine=DeterministicEngine(), reward_model=LengthRewardScorer())
    with ServerThread(app) as server:
        yield server


def test_fuzz_every_operation_never_5xx(running):
    schema = schemathesis.openapi.from_url(running.url + "/openapi.json")
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    seen: dict[int, int] = {}

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def check(case):
        response = case.call(base_url=running.url, timeout=30)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"
        if response.status_code >= 400 and case.path != "/readyz":
            error = ErrorResponse.model_validate_json(response.content)
            assert error.status == response.status_code and error.message
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                 content_type_conformance, response_schema_conformance])

    check()
    assert sum(seen.values()) >= 100, seen
    assert any(200 <= status < 300 for status in seen) and any(400 <= status < 500 for status in seen), seen
