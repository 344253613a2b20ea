"""Site-wide endpoints: health (the dashboard itself lives in runs/pages.py)."""

from django.contrib.auth.decorators import login_required
from django.http import JsonResponse

from nanochat_site import health


@login_required
def health_view(request):
    """JSON health report; 503 when any part is down so monitors can alert on the status."""
    result = health.report()
    return JsonResponse(result, status=200 if result["ok"] else 503)
