"""Schemathesis against the live API and the live reference services (issue 11): every
operation of each OpenAPI document, valid and invalid inputs, a fixed seed and a bounded
number of examples; no 5xx, answers match their documented status codes and schemas (and,
for the API, content types and required headers).

Both run as deployed: the API with its lifespan and a bearer token, on uvicorn with
`serve`'s options; the services behind the same BodyGuard `order-saga services` uses.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlmodel import SQLModel

from api.app import create_app
from api.guard import BodyGuard
from downstream.app import create_services_app
from fsm.settings import Settings
from fsm.store import make_engine
from order_saga.server import uvicorn_options
from tests.support.services import LiveServer
from tests.support.settings import cli_settings

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SEED = 20261128
EXAMPLES = 15  # per operation and mode: about 50 s for both documents on two busy cores
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
# The API's document also says each answer's content type (problem+json for errors) and
# required headers (Location on 202). The services' does not know their BodyGuard's
# problem+json answers (downstream never imports api).
API_CHECKS = [*CHECKS, content_type_conformance, response_headers_conformance]
COUNTS: Counter[str] = Counter()

pytestmark = pytest.mark.xdist_group("schemathesis")  # one worker starts the servers once


@pytest.fixture(scope="module")
def services_live() -> Iterator[str]:
    settings = Settings()
    app = create_services_app()
    guarded = BodyGuard(app, max_bytes=settings.max_body_bytes)
    with LiveServer(guarded, lifespan="auto", **uvicorn_options(settings)) as served:
        yield served.url
    app.state.store.close()


@pytest.fixture(scope="module")
def api_live(tmp_path_factory: pytest.TempPathFactory, services_live: str) -> Iterator[str]:
    url = f"sqlite:///{tmp_path_factory.mktemp('fuzz')}/saga.db"
    engine = make_engine(url)
    SQLModel.metadata.create_all(engine)
    engine.dispose()
    settings = cli_settings(
        url,
        services_live,
        api_token=TOKEN,
        respond_within=2.0,
        http_timeout=2.0,
        max_attempts=2,
        backoff_base=0.01,
        backoff_max=0.05,
    )
    app = create_app(settings, sweep=False)
    with LiveServer(app, lifespan="auto", **uvicorn_options(settings)) as served:
        yield served.url


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    terminal = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if terminal is not None and capture is not None and COUNTS:
        with capture.global_and_fixture_disabled():  # shown without -s too
            terminal.write_line(
                f"schemathesis: {COUNTS['operations']} operations, {COUNTS['cases']} cases, "
                f"{COUNTS['requests']} requests, "
                f"{COUNTS['failures']} failures"
            )


def load(url: str, **kwargs: Any) -> Any:
    schema = schemathesis.openapi.from_url(url, **kwargs)
    schema.config.generation.update(max_examples=EXAMPLES, deterministic=True)
    return schema


def fuzz(
    schema: Any,
    *,
    headers: dict[str, str] | None = None,
    after: Any = None,
    checks: list[Any] = CHECKS,
) -> list[str]:
    """Every operation x {positive, negative} inputs; returns the failures, one line each.

    Hypothesis drives it directly (`operation.as_strategy`), rather than through
    schemathesis' pytest plugin, which does not run on pytest 9.2."""
    failures: list[str] = []
    session = requests.Session()  # one keep-alive connection, not one per case
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @seed(SEED)
            @FUZZ
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                COUNTS["cases"] += 1
                COUNTS["requests"] += 1
                try:
                    case.call_and_validate(checks=checks, headers=headers, session=session)
                finally:
                    if after is not None:
                        after()

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (no parameters, or free text)
                continue
            except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup is a
                # BaseExceptionGroup: reported below, one line per operation and mode
                COUNTS["failures"] += 1
                first = [line for line in str(exc).strip().splitlines() if line.strip()][:6]
                failures.append(f"{operation.label} [{mode.value}]: {' | '.join(first)}")
    COUNTS["operations"] += len(operations)
    session.close()
    return failures


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


def test_api_conforms(api_live: str) -> None:
    schema = load(f"{api_live}/openapi.json", headers=AUTH)
    assert len(list(schema.get_all_operations())) >= 9
    failures = fuzz(schema, headers=AUTH, checks=API_CHECKS)
    assert not failures, "\n".join(failures)


def test_services_conform(services_live: str) -> None:
    schema = load(f"{services_live}/openapi.json")
    assert len(list(schema.get_all_operations())) >= 15

    with httpx.Client(base_url=services_live) as admin:

        def no_faults_left() -> None:
            # An injected fault would make the next cases answer 500 or hang: each case
            # starts with none pending (the answer to adding one is what is checked).
            admin.delete("/_faults").raise_for_status()

        failures = fuzz(schema, after=no_faults_left)
    assert not failures, "\n".join(failures)
