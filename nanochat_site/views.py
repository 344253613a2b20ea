"""Site-wide pages: the home page and the health endpoint."""

from django.contrib.auth.decorators import login_required
from django.http import JsonResponse
from django.shortcuts import render

from nanochat_site import health


@login_required
def home(request):
    return render(request, "home.html")


@login_required
def health_view(request):
    """JSON health report; 503 when any part is down so monitors can alert on the status."""
    result = health.report()
    return JsonResponse(result, status=200 if result["ok"] else 503)
