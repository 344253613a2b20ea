"""The OpenAPI schema describes every endpoint without warnings, its docs page is offline, and
both need a signed-in user like the rest of the API (docs/api.md, "Authentication")."""

import os

import pytest
from django.core.management import call_command

pytestmark = pytest.mark.django_db

OPENAPI_JSON = "application/vnd.oai.openapi+json"


def test_schema_generates_and_validates_without_warnings():
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", os.devnull)


def test_schema_lists_the_runs_endpoints(api, alice):
    response = api(alice).get("/api/schema/", HTTP_ACCEPT=OPENAPI_JSON)
    assert response.status_code == 200
    paths = response.json()["paths"]
    for path in ("/api/runs/", "/api/runs/{id}/metrics/", "/api/datasets/", "/api/programs/",
                 "/api/tokenizers/", "/api/checkpoints/", "/api/evals/", "/api/reports/",
                 "/api/auth/token/"):  # fmt: skip
        assert path in paths, path


def test_schema_lists_the_openai_endpoints(api, alice):
    schema = api(alice).get("/api/schema/", HTTP_ACCEPT=OPENAPI_JSON).json()
    paths = schema["paths"]
    assert set(paths["/v1/models"]) == {"get"} and set(paths["/v1/models/{model}"]) == {"get"}
    for path in ("/v1/chat/completions", "/v1/completions"):
        post = paths[path]["post"]
        assert {"400", "401", "404", "503"} <= set(post["responses"]), path
        assert {"bearerAuth": []} in post["security"], path
    chat = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert chat["top_logprobs"]["maximum"] == 20
    text = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert text["logprobs"]["maximum"] == 5


def test_schema_is_readable_with_a_token(api, alice):
    response = api(alice, token=True).get("/api/schema/", HTTP_ACCEPT=OPENAPI_JSON)
    assert response.status_code == 200
    assert "/api/runs/" in response.json()["paths"]


def test_docs_page_loads_its_assets_from_this_server(client, alice):
    client.force_login(alice)
    html = client.get("/api/docs/").content.decode()
    assert "swagger-ui" in html
    assert "cdn.jsdelivr" not in html and "unpkg.com" not in html


def test_anonymous_api_clients_are_refused_the_schema(api):
    response = api().get("/api/schema/", HTTP_ACCEPT=OPENAPI_JSON)
    assert response.status_code == 403
    assert "paths" not in response.content.decode()


def test_anonymous_browsers_are_sent_from_the_docs_page_to_the_login_page(client):
    response = client.get("/api/docs/")
    assert response.status_code == 302
    assert response["Location"] == "/login/?next=/api/docs/"


def test_schema_documents_the_error_answers_of_every_operation(api, alice):
    paths = api(alice).get("/api/schema/", HTTP_ACCEPT=OPENAPI_JSON).json()["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            where = f"{method.upper()} {path}"
            if path == "/api/auth/token/":
                assert {"200", "400"} <= codes and not operation.get("security"), where
                continue
            if path.startswith("/api/"):
                assert {"401", "403"} <= codes, where
            if "{id}" in path:
                assert "404" in codes, where
            if method == "post" and "{id}" not in path:
                assert "400" in codes, where
    for action in ("cancel", "resume", "retry"):
        assert "409" in paths[f"/api/runs/{{id}}/{action}/"]["post"]["responses"]
    for collection in ("runs", "datasets", "tokenizers"):
        assert "409" in paths[f"/api/{collection}/{{id}}/"]["delete"]["responses"]


def test_error_bodies_are_documented_as_the_server_sends_them(api, alice):
    schema = api(alice).get("/api/schema/", HTTP_ACCEPT=OPENAPI_JSON).json()
    retrieve = schema["paths"]["/api/runs/{id}/"]["get"]["responses"]
    ref = retrieve["404"]["content"]["application/json"]["schema"]["$ref"]
    detail = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert detail["required"] == ["detail"]
    answer = api(alice).get("/api/runs/987654/")
    assert answer.status_code == 404 and set(answer.json()) == {"detail"}


def test_api_paths_that_match_no_route_answer_404_in_json(api, alice):
    response = api(alice).get("/api/runs/1.9/")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"detail": "Not found."}


def test_site_pages_that_match_no_route_keep_the_html_404(client, alice):
    client.force_login(alice)
    response = client.get("/no-such-page/")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


def test_an_unreadable_body_is_a_documented_415(api, alice):
    schema = api(alice).get("/api/schema/", HTTP_ACCEPT=OPENAPI_JSON).json()
    assert "415" in schema["paths"]["/api/datasets/"]["post"]["responses"]
    answer = api(alice).post("/api/datasets/", data=b"name=x", content_type="application/x-unknown")
    assert answer.status_code == 415 and set(answer.json()) == {"detail"}
