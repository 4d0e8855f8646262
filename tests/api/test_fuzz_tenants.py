"""schemathesis over the whole API with two tenants' keys, a wrong key and none: whatever comes in, no
5xx, every error in OpenAI's shape, and a key never reads what another key's requests stored."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from orchestrator.api.app import create_app
from tests.api.conftest import image_message, make_assistant, make_settings

KEY_A, KEY_B = "sk-fuzz-a", "sk-fuzz-b"
HEADERS = {"key A": {"Authorization": f"Bearer {KEY_A}"}, "key B": {"Authorization": f"Bearer {KEY_B}"},
           "wrong key": {"Authorization": "Bearer sk-nobody"}, "no key": {}}


@pytest.fixture(scope="module")
def fuzzed_app(tmp_path_factory: pytest.TempPathFactory):
    s = make_settings(Path(tmp_path_factory.mktemp("fuzz-tenants")), api_keys=[KEY_A, KEY_B], max_body_bytes=200_000)
    assistant = make_assistant(s)
    app = create_app(s, assistant=assistant)
    yield app, assistant
    assistant.dispatcher.close()


@pytest.mark.parametrize("who", list(HEADERS))
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors_whoever_asks(fuzzed_app, who: str, mode: GenerationMode) -> None:
    from starlette.testclient import TestClient

    app, assistant = fuzzed_app
    # key A owns a conversation and its artifacts; whatever the others send, they never get them
    with TestClient(app) as tc:
        r = tc.post("/v1/chat/completions", headers=HEADERS["key A"],
                    json={"model": "switchboard", "messages": [image_message("crop the top left")]})
        assert r.status_code == 200, r.text
        owned = [a["id"] for a in r.json()["choices"][0]["message"]["artifacts"]]
    headers = HEADERS[who]
    api_schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=HEADERS["key A"])
    operations = [result.ok() for result in api_schema.get_all_operations()]
    statuses: set[int] = set()
    for op in operations:
        is_artifact = op.path == "/v1/artifacts/{artifact_id}"

        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy(generation_mode=mode))
        def check(case) -> None:
            if "artifact_id" in (case.path_parameters or {}) and owned:
                case.path_parameters = {**case.path_parameters, "artifact_id": owned[0]}
            response = case.call(headers=headers)
            case.validate_response(response, checks=[not_a_server_error])
            statuses.add(response.status_code)
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"]
            if who != "key A" and is_artifact:  # noqa: B023 (check runs inside this iteration)
                assert response.status_code in (401, 404), response.status_code

        try:
            check()
        except Unsatisfiable:  # nothing to negate in an operation without parameters
            assert mode is GenerationMode.NEGATIVE, op.label
    if who in ("wrong key", "no key"):
        assert statuses <= {401, 200}  # 200: the open paths (the page, /healthz) are not in the schema
    assert statuses
