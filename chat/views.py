"""HTTP views of the chat app. So far: the engine workers' live stats, as JSON."""

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework.decorators import api_view
from rest_framework.request import Request
from rest_framework.response import Response

from chat.stats import read_stats, summary


@extend_schema(responses=OpenApiTypes.OBJECT, tags=["chat"])
@api_view(["GET"])
def engine_stats(request: Request) -> Response:
    """Totals over the live engine workers, and each worker's own record (signed-in users)."""
    workers = read_stats()
    return Response({**summary(workers), "worker_stats": workers})
