"""Non-API routes of the runs app (file downloads; pages arrive with the dashboard)."""

urlpatterns: list = []
