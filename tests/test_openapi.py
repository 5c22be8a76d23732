"""The OpenAPI document tells the truth: schemathesis, all its checks, against the app in-process.

Every operation is fuzzed (examples, coverage and fuzzing phases; schema-valid and schema-invalid requests,
bounded and derandomized) and every response must be documented for its route (status, content type, body,
headers), never a 5xx; invalid data must be refused with a 4xx and valid data accepted. Run once without auth
and once with a token, so both shapes of the document are checked.

One check is replaced by a stricter-where-it-can-be version: schemathesis' `positive_data_acceptance` accepts any
listed status on schema-valid data; `valid_data_accepted` demands 2xx except (a) a binary body (audio, or the
spectrogram blob), whose bytes must also decode, which no JSON schema can say (415/422), and (b) a body over the
byte limit (413), which the schema cannot say either. A schema-valid JSON spectrogram must always be analysed.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from schemathesis.config import SchemathesisConfig  # noqa: E402
from schemathesis.engine import Status, events  # noqa: E402
from schemathesis.python import asgi  # noqa: E402
from schemathesis.specs.openapi.checks import RejectedPositiveData  # noqa: E402
from serving import TOKEN  # noqa: E402

from runtime.serve.app import Settings, create_app  # noqa: E402

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 60
MAX_BYTES = 400_000
SETTINGS = {"max_bytes": MAX_BYTES, "refuse_over_seconds": 20.0}
# Right answers to schema-invalid data, beyond schemathesis' defaults: 408 and 413 are refusals too.
NEGATIVE_REJECTED = ["400", "401", "403", "404", "405", "406", "408", "413", "415", "422"]
BINARY_TYPES = ("application/octet-stream", "multipart/form-data", "audio/")


@schemathesis.check
def valid_data_accepted(ctx, response, case):
    """Schema-valid data gets 2xx, except undecodable binary bodies (415, 422) and bodies over the byte limit."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return None
    status, media = response.status_code, case.media_type or ""
    if 200 <= status < 300 or status >= 500:  # 5xx is not_a_server_error's to report
        return None
    if status == 413 and len(response.request.body or b"") > MAX_BYTES:
        return None
    if media.startswith(BINARY_TYPES) and status in (415, 422):
        return None
    raise RejectedPositiveData(operation=case.operation.label, message=f"schema-valid data refused with {status}",
                               status_code=status, allowed_statuses=["2xx"])


def fuzz(analyzer, token: str | None) -> tuple[dict, list[str]]:
    """Run schemathesis over a fresh app; (figures, problems)."""
    app = create_app(analyzer, settings=Settings(**SETTINGS, api_token=token))
    doc = {"generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
           "checks": {"positive_data_acceptance": {"enabled": False},
                      "negative_data_rejection": {"expected-statuses": NEGATIVE_REJECTED}}}
    if token:
        doc["headers"] = {"Authorization": f"Bearer {token}"}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=SchemathesisConfig.from_dict(doc))
    with asgi.get_client(app) as client:  # starts the lifespan (schemathesis keeps it), then waits for ready
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "app not ready"
            time.sleep(0.05)
    operations, cases, problems = set(), 0, []
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            operations.add(event.recorder.label)
            cases += len(event.recorder.cases)
            for nodes in event.recorder.checks.values():
                problems += [f"{event.recorder.label} {node.name}: {node.failure_info.failure.title} "
                             f"{node.failure_info.code_sample[:300]}" for node in nodes
                             if node.status == Status.FAILURE and node.failure_info]
        elif isinstance(event, events.NonFatalError | events.FatalError):
            problems.append(f"{type(event).__name__}: {event}")
    return {"operations": sorted(operations), "cases": cases}, sorted(set(problems))


def test_openapi_declares_auth_only_with_a_token(analyzer):
    from fastapi.testclient import TestClient

    for token, secured in ((None, False), (TOKEN, True)):
        doc = TestClient(create_app(analyzer, settings=Settings(api_token=token))).get("/openapi.json").json()
        for path in ("/v1/analyze", "/v1/analyze/mel", "/v1/model"):
            op = next(iter(doc["paths"][path].values()))
            assert ("security" in op) is secured, (token, path)
            assert ("401" in op["responses"]) is secured, (token, path)
        assert ("securitySchemes" in doc.get("components", {})) is secured


def test_openapi_lists_each_refusal_and_the_spectrogram_bounds(analyzer):
    from fastapi.testclient import TestClient

    doc = TestClient(create_app(analyzer, settings=Settings(**SETTINGS))).get("/openapi.json").json()
    for path in ("/v1/analyze", "/v1/analyze/mel"):
        responses = doc["paths"][path]["post"]["responses"]
        assert sorted(responses) == ["200", "400", "408", "413", "415", "422", "500", "503"]
        assert "Retry-After" in responses["503"]["headers"]
        assert all(f"`{kind}`" in responses["500"]["description"] for kind in ("model_failed", "internal_error"))
    cap = next(p for p in doc["paths"]["/v1/analyze"]["post"]["parameters"] if p["name"] == "cap_seconds")
    number = next(s for s in cap["schema"]["anyOf"] if s.get("type") == "number")
    assert number["exclusiveMinimum"] == 0 and number["maximum"] == SETTINGS["refuse_over_seconds"], cap
    mel = doc["paths"]["/v1/analyze/mel"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    frames = mel["properties"]["mel_spectrogram"]
    assert frames["minItems"] == 1 and frames["maxItems"] == 862  # 20 s of frames
    assert frames["items"]["minItems"] == frames["items"]["maxItems"] == 128


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no_auth", "token"])
def test_schemathesis_finds_nothing(analyzer, token, capsys):
    figures, problems = fuzz(analyzer, token)
    with capsys.disabled():
        print(f"\n[schemathesis, {'token' if token else 'no auth'}] {figures}, {len(problems)} problems")
    assert len(figures["operations"]) == 6 and figures["cases"] > 100, figures  # /metrics included
    assert problems == [], "\n".join(problems[:10])
