"""The OpenAPI document: valid OpenAPI 3.1, faithful to the validator, and true of the real server."""

import json
import typing as tp

import jsonschema
import pytest
import requests
from openapi_spec_validator import validate

from app.validation import GenerateParams
from tests.audio_samples import wav64
from tests.helpers import events, generate


@pytest.fixture(scope="module")
def document(server) -> tp.Dict[str, tp.Any]:
    response = requests.get(f"{server.url}/api/v1/openapi.json", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    return response.json()


def schema_validator(document: tp.Dict[str, tp.Any], name: str) -> jsonschema.Draft202012Validator:
    """A validator for one component; its `$ref`s resolve inside the same document."""
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", **document})


def test_is_valid_openapi_3_1(document):
    validate(document)
    assert document["openapi"].startswith("3.1")


def test_request_schema_matches_the_validator(document):
    schema = document["components"]["schemas"]["GenerateParams"]
    assert schema["additionalProperties"] is False and schema["required"] == ["description"]
    assert list(schema["properties"]) == list(GenerateParams.model_fields)
    for name, field in GenerateParams.model_fields.items():
        prop = schema["properties"][name]
        prop = next((s for s in prop.get("anyOf", []) if s["type"] != "null"), prop) | {
            k: v for k, v in prop.items() if k != "anyOf"}
        bounds = {k: getattr(rule, k) for rule in field.metadata for k in ("ge", "le", "max_length", "min_length")
                  if getattr(rule, k, None) is not None}
        assert prop.get("minimum") == bounds.get("ge") and prop.get("maximum") == bounds.get("le"), name
        assert prop.get("maxLength") == bounds.get("max_length"), name
        assert prop.get("default") == (None if field.is_required() else field.default), name


def bodies(schema: tp.Dict[str, tp.Any]) -> tp.Iterator[tp.Tuple[str, tp.Dict[str, tp.Any], bool]]:
    """(what, body, valid?) at and just past every limit the schema states, plus wrong types."""
    base = {"description": "limits"}
    wrong = {"integer": [1.5, "1", True, None], "number": ["1", True, None], "boolean": [1, "true", None],
             "string": [1, None]}
    for name, prop in schema["properties"].items():
        prop = next((s for s in prop.get("anyOf", []) if s["type"] != "null"), prop) | {
            k: v for k, v in prop.items() if k != "anyOf"}
        nullable = "anyOf" in schema["properties"][name]
        step = 1 if prop["type"] == "integer" else 1e-6
        if "minimum" in prop:
            yield f"{name} at minimum", base | {name: prop["minimum"]}, True
            yield f"{name} below minimum", base | {name: prop["minimum"] - step}, False
        if "maximum" in prop:
            yield f"{name} at maximum", base | {name: prop["maximum"]}, True
            yield f"{name} above maximum", base | {name: prop["maximum"] + step}, False
        if "maxLength" in prop:
            yield f"{name} at maxLength", base | {name: "x" * prop["maxLength"]}, True
            yield f"{name} past maxLength", base | {name: "x" * (prop["maxLength"] + 1)}, False
        if "default" in prop:
            yield f"{name} at default", base | {name: prop["default"]}, True
        for value in wrong[prop["type"]]:
            if not (value is None and nullable):
                yield f"{name} = {value!r}", base | {name: value}, False
    yield "unknown field", base | {"tempo": 120}, False
    yield "missing required", {"duration": 5}, False


def test_limits_in_the_document_are_the_servers(document, idle_server):
    """Bodies built from the document's limits: valid ones get past validation (503, as the slot is
    held), invalid ones get 400. Holding the slot keeps this from running any generation."""
    cases = list(bodies(document["components"]["schemas"]["GenerateParams"]))
    assert len(cases) > 40
    request_schema = schema_validator(document, "GenerateParams")
    error_schema = schema_validator(document, "ErrorResponse")
    with generate(idle_server.url, {"description": "hold the slot", "duration": 60, "mbd": True}) as holder:
        assert holder.status_code == 200
        for what, body, valid in cases:
            assert request_schema.is_valid(body) == valid, what  # the document says so...
            response = generate(idle_server.url, body, timeout=10)  # ...and so does the server
            assert response.status_code == (503 if valid else 400), (what, response.text)
            error_schema.validate(response.json())
            if valid:
                assert int(response.headers["Retry-After"]) > 0
    idle_server.wait(timeout=10)


def test_stream_events_health_and_errors_match_the_document(document, idle_server):
    stream_event = schema_validator(document, "StreamEvent")
    with generate(idle_server.url, {"description": "short", "duration": 1}) as response:
        received = list(events(response))
    for event in received:
        stream_event.validate(event)
    assert received[0]["event"] == "start" and received[-1]["event"] == "completed"
    for path in ("/health", "/api/v1/health"):
        health = requests.get(idle_server.url + path, timeout=10)
        assert path in document["paths"] and health.status_code == 200
        schema_validator(document, "Health").validate(health.json())
    error_schema = schema_validator(document, "ErrorResponse")
    for answer in (requests.get(idle_server.url + "/nowhere", timeout=10),
                   requests.get(idle_server.url + "/api/v1/generate_music", timeout=10),
                   generate(idle_server.url, b"x" * (16 * 2**20 + 1), timeout=30),
                   generate(idle_server.url, b"{not json", timeout=10)):
        assert answer.status_code in (404, 405, 413, 400)
        error_schema.validate(answer.json())
    documented = document["paths"]["/api/v1/generate_music"]["post"]["responses"]
    assert {"200", "400", "413", "500", "503"} <= set(documented)
    assert "Retry-After" in documented["503"]["headers"]


def test_a_schema_change_would_show(document):
    """The document is built from GenerateParams, not a copy: its schema is the model's own."""
    own = GenerateParams.model_json_schema(ref_template="#/components/schemas/{model}")
    served = json.loads(json.dumps(document["components"]["schemas"]["GenerateParams"]))
    served["properties"]["description"]["description"] = own["properties"]["description"]["description"]
    assert served == own


def test_version_1_1_events_and_health_are_documented_field_by_field(document, idle_server):
    stream_event = schema_validator(document, "StreamEvent")
    schemas = document["components"]["schemas"]
    body = {"description": "short", "duration": 2, "format": "ogg", "normalization": "peak",
            "audio_prompt": wav64(1.0)}
    with generate(idle_server.url, body) as response:
        received = list(events(response))
    for event in received:
        stream_event.validate(event)
    start, done = received[0], received[-1]
    assert done["event"] == "completed" and done["format"] == "ogg" and start["audio_prompt"] == {"seconds": 1.0}
    assert set(start) <= set(schemas["StartEvent"]["properties"])  # nothing the server sends goes undocumented
    assert set(done) <= set(schemas["CompletedEvent"]["properties"])
    health = requests.get(idle_server.url + "/health", timeout=10).json()
    assert set(health) <= set(schemas["Health"]["properties"])
    assert set(health["features"]) == set(schemas["Health"]["properties"]["features"]["properties"])


def test_audio_events_are_documented_field_by_field(document, idle_server):
    stream_event = schema_validator(document, "StreamEvent")
    with generate(idle_server.url, {"description": "streamed", "duration": 2, "stream_audio": True}) as response:
        received = list(events(response))
    audio = [event for event in received if event["event"] == "audio"]
    assert audio and received[-1]["event"] == "completed" and received[0]["stream_audio"] is True
    for event in received:
        stream_event.validate(event)
    schemas = document["components"]["schemas"]
    assert set(audio[0]) == set(schemas["AudioEvent"]["properties"])
    assert set(received[0]) <= set(schemas["StartEvent"]["properties"])
