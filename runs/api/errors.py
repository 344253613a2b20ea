"""The services' exceptions as HTTP answers, so views never catch them one by one.

The services raise plain Python exceptions (they are called from pages, the admin and tasks
too); this module maps them onto DRF's: ConfigError -> 400 with one list of messages per
field (keys exactly as the service named them, e.g. "config.depth"), PermissionDenied -> 403,
Conflict -> 409. A database ProtectedError is a conflict the checks did not foresee (a race,
a new foreign key); it is answered 409 rather than 500. A request body too large to read is a
400 (api_exception_handler, for every API view).
"""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.db.models import ProtectedError
from rest_framework import exceptions, status
from rest_framework.views import exception_handler

from runs import services
from training.flags import ConfigError


class ConflictError(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "The object is not in a state that allows this."
    default_code = "conflict"


def translate(exc: Exception) -> Exception:
    """The DRF exception to answer for `exc` (or `exc` itself when DRF already knows it)."""
    if isinstance(exc, ConfigError):
        return exceptions.ValidationError({field: [msg] for field, msg in exc.errors.items()})
    if isinstance(exc, services.PermissionDenied):
        return exceptions.PermissionDenied(str(exc))
    if isinstance(exc, services.Conflict):
        return ConflictError(str(exc))
    if isinstance(exc, ProtectedError):
        return ConflictError("other objects still refer to this one; delete them first")
    return exc


def api_exception_handler(exc: Exception, context: dict):
    """DRF's exception handler (REST_FRAMEWORK["EXCEPTION_HANDLER"]), also answering Django's
    own refusals of a request too large to read (a body over DATA_UPLOAD_MAX_MEMORY_SIZE, which
    is API_MAX_BODY_BYTES; too many form fields or files) as a 400 in the API's shape: DRF
    reads `request.body` itself, so they would otherwise escape as a 500."""
    if isinstance(exc, RequestDataTooBig):
        exc = exceptions.ParseError(f"the body is larger than {settings.API_MAX_BODY_BYTES} bytes")
    elif isinstance(exc, TooManyFieldsSent | TooManyFilesSent):
        exc = exceptions.ParseError(str(exc))
    return exception_handler(exc, context)


class ServiceErrorsMixin:
    """For API views: answer the services' exceptions like DRF's own."""

    def handle_exception(self, exc):
        return super().handle_exception(translate(exc))
