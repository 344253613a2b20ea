"""Routes of the runs API (filled in by runs/api/views.py)."""

urlpatterns: list = []
