"""URL routes. Apps add their own includes as they grow."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from nanochat_site import views

urlpatterns = [
    path("health/", views.health_view, name="health"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("api/", include("runs.api.urls")),
    path("", include("runs.urls")),
    path("chat/", include("chat.page_urls")),
    path("chat/", include("chat.urls")),
    path("v1/", include("chat.openai_urls")),
]
