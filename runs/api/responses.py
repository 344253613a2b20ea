"""The error answers of the API, described once for the OpenAPI schema.

A client generated from the schema (or schemathesis, which checks the schema against the
server) must know every status code an operation really answers, with the body it carries.
The bodies are DRF's: 400 names every bad field, the others carry one `detail` message. Views
list their codes with `with_errors(...)`; 401 and 403 come with every operation that needs a
signed-in user.
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, inline_serializer
from rest_framework import serializers

FIELD_ERRORS = OpenApiResponse(
    response={
        "type": "object",
        "description": 'messages by field, e.g. {"config.depth": ["must be an integer"]}',
        "additionalProperties": {},
    },
    description="bad input: every bad field at once (settings as config.<name>)",
)
_DETAIL = inline_serializer("ErrorDetail", {"detail": serializers.CharField()})
ERRORS = {
    400: FIELD_ERRORS,
    401: OpenApiResponse(_DETAIL, description="not signed in, or a bad token"),
    403: OpenApiResponse(_DETAIL, description="signed in but not allowed"),
    404: OpenApiResponse(_DETAIL, description="no such object (or page)"),
    409: OpenApiResponse(_DETAIL, description="not possible in the object's current state"),
    503: OpenApiResponse(_DETAIL, description="busy or short of resources: try again later"),
}
SIGNED_IN = (401, 403)


def with_errors(*codes: int, signed_in: bool = True) -> dict[int, OpenApiResponse]:
    """The error responses for `codes`, plus 401/403 unless the operation is open to anyone."""
    listed = (*SIGNED_IN, *codes) if signed_in else codes
    return {code: ERRORS[code] for code in sorted(set(listed))}


UNREADABLE_BODY = {
    "description": "the body's content type is not one the operation reads (or it is malformed)",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"detail": {"type": "string"}},
                "required": ["detail"],
            }
        }
    },
}


def document_unreadable_bodies(result, generator, request, public):
    """A spectacular hook: every operation that reads a body may answer 415.

    DRF answers 415 before the view runs when a body's content type matches none of the view's
    parsers (a multipart body without a boundary, say); a client built from the schema must know.
    """
    for item in result.get("paths", {}).values():
        for operation in item.values():
            if isinstance(operation, dict) and "requestBody" in operation:
                operation.setdefault("responses", {}).setdefault("415", UNREADABLE_BODY)
    return result
