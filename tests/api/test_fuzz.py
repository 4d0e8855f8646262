"""Fuzz every operation of the OpenAPI schema with schemathesis: whatever comes in — data that fits the
schema and data that does not — no 5xx, and every error is in OpenAI's shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from orchestrator.api.app import create_app
from tests.api.conftest import API_KEY, make_assistant, make_settings

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory):
    s = make_settings(Path(tmp_path_factory.mktemp("fuzz")), max_body_bytes=200_000)
    assistant = make_assistant(s)
    app = create_app(s, assistant=assistant)
    # schemathesis' own pytest plugin (from_fixture) does not run on pytest 9, so hypothesis drives
    # each operation's case strategy directly.
    yield schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)
    assistant.dispatcher.close()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(api_schema, mode: GenerationMode) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "GET /v1/artifacts/{artifact_id}"}
    fuzzed = set()
    for op in operations:
        strategy = op.as_strategy(generation_mode=mode)

        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=strategy)
        def check(case) -> None:
            response = case.call(headers=AUTH)
            case.validate_response(response, checks=[not_a_server_error])
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"]

        try:
            check()
        except Unsatisfiable:  # nothing to negate in an operation without parameters
            assert mode is GenerationMode.NEGATIVE, op.label
            continue
        fuzzed.add(op.label)
    assert "POST /v1/chat/completions" in fuzzed


def test_fuzzing_reaches_the_assistant(api_schema) -> None:
    """The generated requests are not all refused at the door: valid ones run whole turns."""
    op = api_schema["/v1/chat/completions"]["POST"]
    statuses: set[int] = set()

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=op.as_strategy(generation_mode=GenerationMode.POSITIVE),
           text=st.text(min_size=1, max_size=40).filter(str.strip))
    def check(case, text: str) -> None:
        case.body = {**case.body, "model": "switchboard", "messages": [{"role": "user", "content": text}]}
        case.body.pop("conversation_id", None)
        case.body.pop("n", None)
        case.body.pop("tools", None)
        case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "x-conversation-id"}
        response = case.call(headers=AUTH)
        assert response.status_code < 500, response.text
        statuses.add(response.status_code)

    check()
    assert 200 in statuses
