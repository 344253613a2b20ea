"""Following a run's files: its event file into rows and broadcasts, and its log's tail.

A run's worker follows the event file while the program runs (runs/execution.py); resume
stores what a dead launch left in it (`catch_up`); a pipeline's worker follows each stage's
event file as a run of its own (`StageFollowers`). This module sits below all of them — it
imports the models, ingest and the stage rows, never the services or the Celery tasks — so
the floors of runs/ stay one-way: follow -> execution -> tasks -> services -> pages/API.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from pathlib import Path

from django.db import IntegrityError, transaction
from django.utils import timezone

from runs import broadcast, ingest, probes, selectors, signals
from runs.models import ACTIVE_STATUSES, Kind, Run, Status
from runs.pipeline_stages import (
    STAGE_END,
    record_stage_config,
    refresh_pipeline,
    stage_events,
    start_child,
)
from training.events import EVENTS_FILE, read_events

log = logging.getLogger(__name__)
LOG_FILE = "log.txt"
LOG_TAIL_LINES = 60


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log file (read from the end, so a huge log costs nothing)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    return "\n".join(deque(text.splitlines(), maxlen=lines))


class Follower:
    """Reads new event lines of one run and stores/broadcasts them."""

    def __init__(self, run: Run):
        self.run = run
        self.path = Path(run.run_dir) / EVENTS_FILE
        self.end: dict | None = None
        # A pipeline's stages are runs of their own, followed along with it.
        self.stages = StageFollowers(run) if run.kind == Kind.PIPELINE else None

    def poll(self) -> bool:
        changed = self._poll_own()
        if self.stages is not None:
            self.stages.poll()
        return changed

    def _poll_own(self) -> bool:
        result = read_events(self.path, self.run.events_offset)
        if not result.events and result.offset == self.run.events_offset:
            return False
        for line in result.bad_lines:
            log.warning("run %s: ignored a malformed event line: %.200s", self.run.pk, line)
        parsed = ingest.parse_events(result.events)
        saved = ingest.apply(self.run, parsed, result.offset)
        probes.request_answers(self.run, saved)
        signals.send_metrics_stored(self.run, parsed.metrics)
        if self.run.pipeline_id:
            record_stage_config(self.run, parsed)
        if parsed.end is not None:
            self.end = parsed.end
        if self.stages is not None:
            self.stages.apply(stage_events(parsed))
        payload = ingest.metrics_payload(parsed)
        others = [
            {"type": t, "time": tm, "step": s, **d}
            for t, tm, s, d in parsed.events
            if t not in ("metrics", "start")
        ]
        broadcast.send(self.run, metrics=payload, events=others[:50], refetch=payload is None)
        return True


def catch_up(run: Run) -> None:
    """Store what is left in a dead launch's event file, then skip any half-written line."""
    follower = Follower(run)
    follower.poll()
    try:
        size = follower.path.stat().st_size
    except FileNotFoundError:
        return
    if size > run.events_offset:
        Run.objects.filter(pk=run.pk).update(events_offset=size)
        run.events_offset = size


class StageFollowers:
    """Keeps a pipeline's children in step with its `stage` events and their event files."""

    def __init__(self, pipeline: Run):
        self.pipeline = pipeline
        self.followers: dict[int, object] = {}
        self._typical: dict[str, float] | None = None  # earlier pipelines' stage times
        for child in pipeline.stage_runs.filter(status__in=ACTIVE_STATUSES):
            self._follow(child)

    def _follow(self, child: Run):
        follower = Follower(child)
        self.followers[child.pk] = follower
        return follower

    def _child(self, stage: dict) -> Run | None:
        return self.pipeline.stage_runs.filter(run_dir=str(stage.get("run_dir", ""))).first()

    def apply(self, stages: list[dict]) -> None:
        """Start and end children as the pipeline reports (their events are read by `poll`)."""
        for stage in stages:
            status = stage.get("status")
            if status == "started":
                with transaction.atomic():
                    try:
                        child = self._child(stage) or start_child(self.pipeline, stage)
                    except IntegrityError:
                        child = None
                if child is not None:
                    self._follow(child)
                    broadcast.send(child)
                    self.refresh()
            elif status in STAGE_END:
                child = self._child(stage)
                if child is not None:
                    self.end(child, STAGE_END[status], str(stage.get("error") or ""))

    def poll(self) -> None:
        changed = [follower.poll() for follower in list(self.followers.values())]
        if any(changed):
            self.refresh()

    def refresh(self) -> None:
        """The pipeline row follows its stages (best val bpb, ETA), and its pages with it."""
        if self._typical is None:
            self._typical = selectors.typical_stage_seconds(self.pipeline)
        if refresh_pipeline(self.pipeline, self._typical):
            broadcast.send(self.pipeline)

    def end(self, child: Run, status: str, error: str = "") -> None:
        follower = self.followers.pop(child.pk, None) or Follower(child)
        follower.poll()  # whatever it wrote last

        tail = log_tail(Path(child.run_dir) / LOG_FILE)
        ended = Run.objects.filter(pk=child.pk, status__in=ACTIVE_STATUSES).update(
            status=status, error=error[:5000], finished_at=timezone.now(), log_tail=tail,
            progress=1.0 if status == Status.SUCCEEDED else child.progress,
            eta_seconds=0.0 if status == Status.SUCCEEDED else None,
        )  # fmt: skip
        child.refresh_from_db()
        child.mark_artifacts()
        broadcast.send(child)
        if ended:
            signals.send_run_finished(child)
        self.refresh()

    def end_all(self, status: str, error: str) -> None:
        """The pipeline ended: children still running end with it."""
        for child in self.pipeline.stage_runs.filter(status__in=ACTIVE_STATUSES):
            self.end(child, status, error)
