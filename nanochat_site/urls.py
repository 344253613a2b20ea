"""URL routes. Apps add their own includes as they grow.

The API schema and its docs page need a signed-in user like every other page: the schema lists
every endpoint and setting, which is no business of someone without an account. An anonymous
API client gets 403 from the schema; an anonymous browser is sent to the login page.

A URL under /api/ that matches no route is answered 404 in JSON like the API's own 404s, so a
client (and the schema, which documents JSON error bodies) never has to parse an HTML page.
"""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.http import JsonResponse
from django.urls import include, path
from django.views import defaults
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema, extend_schema_view
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.permissions import IsAuthenticated

from arena import views as arena_views
from nanochat_site import metrics, views
from runs.api.responses import with_errors


@extend_schema_view(get=extend_schema(responses={200: OpenApiTypes.OBJECT, **with_errors(404)}))
class SchemaView(SpectacularAPIView):
    """The OpenAPI schema, for signed-in users (404: a `format` it cannot render)."""

    permission_classes = [IsAuthenticated]


def not_found(request, exception):
    """Django's 404 page, or DRF's JSON body for a path under /api/."""
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Not found."}, status=404)
    return defaults.page_not_found(request, exception)


handler404 = not_found

urlpatterns = [
    path("health/", views.health_view, name="health"),
    # No trailing slash: Prometheus' default metrics_path, and no APPEND_SLASH redirect.
    path("metrics", metrics.metrics_view, name="metrics"),
    path("favicon.ico", views.favicon, name="favicon"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/schema/", SchemaView.as_view(), name="api-schema"),
    path(
        "api/docs/",
        login_required(SpectacularSwaggerView.as_view(url_name="api-schema")),
        name="api-docs",
    ),
    path("api/arena/", include("arena.api_urls")),
    path("api/chat/", include("chat.corrections_urls")),
    path("api/alerts/", include("alerts.api_urls")),
    path("api/", include("runs.api.urls")),
    path("leaderboard/", arena_views.leaderboard, name="leaderboard"),
    path("", include("runs.urls")),
    path("arena/", include("arena.urls")),
    path("alerts/", include("alerts.urls")),
    path("chat/", include("chat.page_urls")),
    path("chat/", include("chat.urls")),
    path("v1/", include("chat.openai_urls")),
]
