"""Pages of the runs app (mounted at the site root): the dashboard and the run files."""

from django.urls import path

from runs import files, pages

urlpatterns = [
    path("", pages.home, name="home"),
    path("runs/", pages.run_list, name="run-list"),
    path("quick-start/", pages.quick_start, name="quick-start"),
    path("runs/new/<str:kind>/", pages.run_new, name="run-new"),
    path("runs/compare/", pages.compare, name="run-compare"),
    path("runs/<int:run_id>/", pages.run_detail, name="run-detail"),
    path("runs/<int:run_id>/log/", pages.run_log, name="run-log"),
    path("runs/<int:run_id>/probes/", pages.run_probes, name="run-probes"),
    path("runs/<int:run_id>/notes/", pages.run_notes, name="run-notes"),
    path("runs/<int:run_id>/<str:action>/", pages.run_action, name="run-action"),
    path("runs/<int:run_id>/files/<str:name>", files.run_file, name="run-file"),
    path("datasets/", pages.datasets, name="datasets"),
    path("tokenizers/", pages.tokenizers, name="tokenizers"),
    path("checkpoints/", pages.checkpoints, name="checkpoints"),
    path("checkpoints/<int:ckpt_id>/lineage/", pages.checkpoint_lineage, name="checkpoint-lineage"),
    path("checkpoints/<int:ckpt_id>/export.zip", pages.checkpoint_export, name="checkpoint-export"),
    path("reports/", pages.reports, name="reports"),
    path("reports/<int:run_id>/", pages.report_detail, name="report-detail"),
]
