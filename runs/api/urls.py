"""Routes of the runs API, mounted under /api/ (names in the `runs-api` namespace)."""

from django.urls import path
from rest_framework.routers import DefaultRouter

from runs.api import views

app_name = "runs-api"

router = DefaultRouter()
router.register("runs", views.RunViewSet, basename="run")
router.register("datasets", views.DatasetViewSet, basename="dataset")
router.register("tokenizers", views.TokenizerViewSet, basename="tokenizer")
router.register("checkpoints", views.CheckpointViewSet, basename="checkpoint")
router.register("evals", views.EvalResultViewSet, basename="eval")
router.register("reports", views.ReportViewSet, basename="report")

urlpatterns = [
    path("auth/token/", views.TokenView.as_view(), name="token"),
    path("programs/", views.ProgramsView.as_view(), name="programs"),
    *router.urls,
]
