"""The OpenAPI schema describes every endpoint without warnings, and its docs page is offline."""

import os

import pytest
from django.core.management import call_command

pytestmark = pytest.mark.django_db


def test_schema_generates_and_validates_without_warnings():
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", os.devnull)


def test_schema_lists_the_runs_endpoints(client):
    response = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    for path in ("/api/runs/", "/api/runs/{id}/metrics/", "/api/datasets/", "/api/programs/",
                 "/api/tokenizers/", "/api/checkpoints/", "/api/evals/", "/api/reports/",
                 "/api/auth/token/"):  # fmt: skip
        assert path in paths, path


def test_docs_page_loads_its_assets_from_this_server(client):
    html = client.get("/api/docs/").content.decode()
    assert "swagger-ui" in html
    assert "cdn.jsdelivr" not in html and "unpkg.com" not in html
