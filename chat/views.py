"""HTTP views of the chat app. So far: the engine workers' live stats, as JSON."""

import redis
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.decorators import api_view
from rest_framework.request import Request
from rest_framework.response import Response

from chat.stats import read_stats, summary
from runs.api.responses import with_errors


@extend_schema(
    responses={
        200: OpenApiTypes.OBJECT,
        **with_errors(),
        503: OpenApiResponse(OpenApiTypes.OBJECT, description="Redis cannot be reached"),
    },
    tags=["chat"],
)
@api_view(["GET"])
def engine_stats(request: Request) -> Response:
    """Totals over the live engine workers, and each worker's own record (signed-in users).

    The stats live in Redis; while it is away (restarting, unreachable) the answer is a 503
    that says so, not a server error."""
    try:
        workers = read_stats()
    except redis.RedisError as exc:
        return Response({"detail": f"engine stats unavailable: Redis: {exc}"}, status=503)
    return Response({**summary(workers), "worker_stats": workers})
