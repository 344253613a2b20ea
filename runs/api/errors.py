"""The services' exceptions as HTTP answers, so views never catch them one by one.

The services raise plain Python exceptions (they are called from pages, the admin and tasks
too); this module maps them onto DRF's: ConfigError -> 400 with one list of messages per
field (keys exactly as the service named them, e.g. "config.depth"), PermissionDenied -> 403,
Conflict -> 409. A database ProtectedError is a conflict the checks did not foresee (a race,
a new foreign key); it is answered 409 rather than 500.
"""

from __future__ import annotations

from django.db.models import ProtectedError
from rest_framework import exceptions, status

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


class ServiceErrorsMixin:
    """For API views: answer the services' exceptions like DRF's own."""

    def handle_exception(self, exc):
        return super().handle_exception(translate(exc))
