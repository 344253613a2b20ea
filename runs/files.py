"""Serving a run's own text files (its log and its event file) to signed-in users.

Only names on an allow-list are served, from the run's directory, so a request can never reach
another path: the URL names a file, never a path. Every signed-in user sees every run (see
services.can_manage), so reading needs no ownership check.
"""

from __future__ import annotations

from pathlib import Path

from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404
from django.shortcuts import get_object_or_404
from django.views.decorators.http import require_GET

from runs.follow import LOG_FILE
from runs.models import Run
from training.events import EVENTS_FILE

SERVED_FILES = (LOG_FILE, EVENTS_FILE)


@require_GET
@login_required
def run_file(request, run_id: int, name: str) -> FileResponse:
    """One allow-listed file of a run, as text shown in the browser."""
    if name not in SERVED_FILES:
        raise Http404(f"{name!r} is not a run file that can be viewed")
    run = get_object_or_404(Run, pk=run_id)
    if not run.run_dir:
        raise Http404("this run has no directory yet")
    path = Path(run.run_dir) / name
    try:
        handle = open(path, "rb")  # noqa: SIM115 - FileResponse closes it
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        raise Http404(f"run {run.pk} has no {name} yet") from exc
    return FileResponse(
        handle, content_type="text/plain; charset=utf-8", filename=f"run-{run.pk}-{name}"
    )
