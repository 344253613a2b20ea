"""Non-API routes of the runs app, mounted at /runs/ (pages arrive with the dashboard)."""

from django.urls import path

from runs import files

urlpatterns = [
    path("<int:run_id>/files/<str:name>", files.run_file, name="run-file"),
]
