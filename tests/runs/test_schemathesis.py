"""schemathesis over every operation of the OpenAPI schema, as a signed-in user who is not staff.

The probe behind issue 13 found 500s by fuzzing the API from its schema; this module keeps doing
it on every CI run: no generated request may make the server fail, every status code answered
must be one the schema documents, and every body must match its documented schema. Requests go
in-process through Django's WSGI handler with a token header (the way API clients sign in), so
they pass every middleware, parser and permission check of the real site.

The database holds a finished run with metrics, events, samples, reports, checkpoints and an
eval result, plus its dataset and tokenizer, and three cases in four aim at those real ids so
that detail views parse their query parameters and answer 200, not only 404. Each request runs
in a savepoint rolled back afterwards, so a DELETE or a POST in one example never changes what
the next one sees; the Celery message that a submit sends on commit is never sent, so no worker
is needed (Redis runs: the chat stats endpoint reads it).

The OpenAI-compatible /v1 endpoints are in the schema too (chat/openai_schema.py) and fuzzed
the same way, with the same token (they take `Token <key>` as well as `Bearer <key>`). No
engine worker runs here: a request valid enough to reach the engine (a model id that exists)
is sent to a channel nobody reads and answers the documented 503 after 0.1 s
(`no_engine`), so the run stays fast; tests/chat/test_openai_*.py cover real generation.

Bounded for CI on 2 cores: MAX_EXAMPLES per operation, derandomized so a failure reproduces;
SCHEMATHESIS_MAX_EXAMPLES=500 in the environment fuzzes deeper by hand.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections, transaction
from django.test import override_settings
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from rest_framework.authtoken.models import Token
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from alerts.models import AlertRule, Delivery, Notification
from arena.models import Battle
from runs.models import EvalResult

pytestmark = pytest.mark.django_db

MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "50"))
TOKEN = "schemathesis-alice-token-0123456789abcd"  # a Token key is 40 characters at most
# Left out: positive_data_acceptance, because a request can match the schema and still be
# refused with a field error (an unknown preset, a dataset id that does not exist, a wrong
# password); negative_data_rejection, because DRF reads an optional query parameter sent empty
# (`?run=`) as not sent, which an `integer` parameter in the schema cannot say.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

# The schema the site serves at /api/schema/ (same generator, same public view of it).
schema = schemathesis.openapi.from_dict(SchemaGenerator().get_schema(request=None, public=True))
schema.app = get_wsgi_application()


@schema.auth()
class AliceToken:
    """Every case is sent with alice's token header, as `python -m runs.client` does."""

    def get(self, case, ctx) -> str:
        return TOKEN

    def set(self, case, data: str, ctx) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Token {data}"}


@pytest.fixture
def real_ids(alice, finished_run, ready_dataset, ready_tokenizer, redis_url) -> dict[str, int]:
    """alice's objects, by the collection path whose `{id}` reaches them."""
    Token.objects.create(user=alice, key=TOKEN)
    checkpoint = finished_run.checkpoints.order_by("step").last()
    EvalResult.objects.create(
        run=finished_run, checkpoint=checkpoint, task="core", metric="core", value=0.21
    )
    battle = Battle.objects.create(
        owner=alice, status=Battle.Status.READY, prompt="hi", label_a="a", label_b="b",
        checkpoint_a=checkpoint, checkpoint_b=finished_run.checkpoints.order_by("step").first(),
    )  # fmt: skip
    rule = AlertRule.objects.create(user=alice, metric="val/bpb", comparison="below", value=1.5)
    sent = Notification.objects.create(user=alice, event="test", text="hi", payload={"text": "hi"})
    delivery = Delivery.objects.create(notification=sent, channel="webhook", target="http://x/")
    return {
        "/api/alerts/rules/": rule.pk,
        "/api/alerts/deliveries/": delivery.pk,
        "/api/arena/battles/": battle.pk,
        "/api/runs/": finished_run.pk,
        "/api/datasets/": ready_dataset.pk,
        "/api/tokenizers/": ready_tokenizer.pk,
        "/api/checkpoints/": checkpoint.pk,
        "/api/reports/": finished_run.reports.first().pk,
    }


@pytest.fixture
def in_test_transaction():
    """Keep the test's transaction open across requests, as Django's own test client does.

    The WSGI handler closes the database connection at the start and end of each request
    when it is not in autocommit mode, which inside a test's transaction it never is.
    """
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture(autouse=True)
def no_engine():
    """No engine worker: what reaches the engine is a quick 503 (see the module docstring).

    Autouse, so that the test function's source, from which hypothesis derives its
    derandomized seed, and with it the examples generated for every operation, stay as they
    were before /v1 joined the schema."""
    with override_settings(
        CHAT_ENGINE_CHANNEL="engine-schemathesis-nobody", CHAT_ENGINE_ACCEPT_TIMEOUT=0.1
    ):
        yield


@schema.parametrize()
@schema.given(aim_at_real_object=st.integers(0, 3).map(bool))
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)
def test_api_answers_as_its_schema_says(case, aim_at_real_object, real_ids, in_test_transaction):
    if aim_at_real_object and "id" in (case.path_parameters or {}):
        case.path_parameters["id"] = real_ids[case.operation.path.split("{")[0]]
    with transaction.atomic():
        case.call_and_validate(checks=CHECKS)
        transaction.set_rollback(True)
