"""Property-based: schemathesis sends requests generated from the app's own OpenAPI schema, valid
and invalid, to every route; no answer is a 5xx, and every answer is one the schema documents
(status, content type and body)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from serve_fakes import NoJobs

from harli_jax import LLM
from harli_jax.engine.loop import Engine
from harli_jax.serve import create_app

MODEL = "demo"  # the name the schema's examples use, so they reach the engine
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def api_schema(checkpoint, tmp_path_factory):
    # A short context keeps every generated request to a few dozen decode steps.
    llm = LLM(checkpoint("llama"), dtype="float32", max_model_len=48, page_size=48, max_num_seqs=2)
    engine = Engine(llm.engine, max_queued=32).start()
    app = create_app(engine, MODEL, jobs=NoJobs(), files_dir=tmp_path_factory.mktemp("files"))
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    engine.stop()


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_no_request_gets_a_server_error_or_an_undocumented_answer(case):
    case.call_and_validate(checks=CHECKS)
