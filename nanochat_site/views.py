"""Site-wide endpoints: health and the favicon (the dashboard itself lives in runs/pages.py)."""

from django.contrib.auth.decorators import login_required
from django.http import JsonResponse
from django.shortcuts import redirect
from django.templatetags.static import static

from nanochat_site import health


@login_required
def health_view(request):
    """JSON health report; 503 when any part is down so monitors can alert on the status."""
    result = health.report()
    return JsonResponse(result, status=200 if result["ok"] else 503)


def favicon(request):
    """/favicon.ico, which browsers ask for on pages without an icon link (admin, API, JSON):
    sent to the site's SVG icon instead of a 404 in every log."""
    return redirect(static("favicon.svg"))
