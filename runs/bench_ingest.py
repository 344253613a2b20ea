"""How fast a run's event file becomes rows: `python -m runs.bench_ingest [--points 100000]`.

A page that reconnects, or a worker that restarts its follower, meets a backlog of the whole
event file; the acceptance target is 100k metric points stored in under 5 s. This writes a real
events.jsonl with EventWriter (as the training programs do), then times exactly what the
follower does (read_events, parse_events, apply) twice: the whole file in one batch, and the
file growing 1000 lines at a time, one follower poll per chunk.

The database is a throw-away one: a fresh SQLite file under a temporary data home (the real
settings: WAL, IMMEDIATE transactions), or with DATABASE_URL set, a scratch database created
next to it and dropped afterwards (the database named in the URL is not touched).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

METRIC_NAMES = ("train/loss", "train/lr", "train/tok_per_sec", "train/progress", "train/eta_sec")


def setup_django(home: Path) -> None:
    """Real settings with a temporary data home, so the SQLite file lives (and dies) there."""
    os.environ["NANOCHAT_HOME"] = str(home)
    os.environ["DJANGO_SETTINGS_MODULE"] = "nanochat_site.settings"
    import django
    from django.conf import settings

    # Connections are made lazily: naming the scratch database here is still in time.
    database = settings.DATABASES["default"]
    if database["ENGINE"] == "django.db.backends.sqlite3":
        scratch = str(home / "bench.sqlite3")  # a file, as in production (not :memory:)
    else:
        scratch = f"nanochat_bench_ingest_{os.getpid()}"
    database["TEST"] = {**database.get("TEST", {}), "NAME": scratch}
    django.setup()


def metric_names(per_event: int) -> list[str]:
    extra = [f"train/extra_{i}" for i in range(max(0, per_event - len(METRIC_NAMES)))]
    return [*METRIC_NAMES, *extra][:per_event]


def write_events(run_dir: Path, events: int, per_event: int, lines_per_write: int | None = None):
    """Write a start event and `events` metrics events; yields after every `lines_per_write`."""
    from training.events import EventWriter

    names = metric_names(per_event)
    with EventWriter(run_dir) as writer:
        writer.start({"depth": 4}, total_steps=events, world_size=1, device="cpu")
        for step in range(1, events + 1):
            values = {name: 1.0 / (step + i) for i, name in enumerate(names)}
            writer.metrics(step, values)
            if lines_per_write and step % lines_per_write == 0:
                yield step  # each line is already flushed (EventWriter is line-buffered)
    yield events


def ingest_once(run, path: Path, timings: dict[str, float]) -> int | None:
    """One follower poll (runs/execution.py Follower.poll, minus the broadcast).

    None when there was nothing new (the follower stores nothing then either).
    """
    from runs import ingest
    from training.events import read_events

    t0 = time.perf_counter()
    result = read_events(path, run.events_offset)
    t1 = time.perf_counter()
    if not result.events and result.offset == run.events_offset:
        timings["read"] += t1 - t0
        return None
    parsed = ingest.parse_events(result.events)
    t2 = time.perf_counter()
    ingest.apply(run, parsed, result.offset)
    t3 = time.perf_counter()
    timings["read"] += t1 - t0
    timings["parse"] += t2 - t1
    timings["apply"] += t3 - t2
    return len(parsed.metrics)


def new_run(home: Path, label: str):
    from runs.models import Kind, Run, Status

    run_dir = home / "runs" / label
    run_dir.mkdir(parents=True)
    return Run.objects.create(
        name=f"bench {label}", kind=Kind.BASE, status=Status.RUNNING, run_dir=str(run_dir)
    )


def report(label: str, points: int, timings: dict[str, float], polls: int) -> None:
    total = sum(timings.values())
    parts = "  ".join(f"{k} {v:6.2f}s" for k, v in timings.items())
    print(
        f"{label:<22} {points:>8,} points  {polls:>4} polls  {parts}  total {total:6.2f}s"
        f"  {points / total:>10,.0f} points/s"
    )


def bench_whole_file(home: Path, events: int, per_event: int, profile: bool) -> None:
    from training.events import EVENTS_FILE

    run = new_run(home, "whole")
    for _ in write_events(run.directory, events, per_event):
        pass
    timings = {"read": 0.0, "parse": 0.0, "apply": 0.0}
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    points = ingest_once(run, run.directory / EVENTS_FILE, timings)
    if profiler:
        profiler.disable()
    report("whole file, 1 batch", points, timings, 1)
    check(run, points, events)
    if profiler:
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(25)


def bench_chunks(home: Path, events: int, per_event: int, lines: int) -> None:
    from training.events import EVENTS_FILE

    run = new_run(home, "chunks")
    timings = {"read": 0.0, "parse": 0.0, "apply": 0.0}
    points = polls = 0
    for _ in write_events(run.directory, events, per_event, lines_per_write=lines):
        added = ingest_once(run, run.directory / EVENTS_FILE, timings)
        if added is not None:
            points += added
            polls += 1
    report(f"{lines}-line chunks", points, timings, polls)
    check(run, points, events)


def check(run, points: int, events: int) -> None:
    """The numbers are only worth quoting if everything landed."""
    from runs.models import MetricPoint, Run

    run = Run.objects.get(pk=run.pk)
    stored = MetricPoint.objects.filter(run=run).count()
    if stored != points or run.events_count != events + 1 or run.step != events:
        raise SystemExit(f"ingestion lost rows: {stored} points, {run.events_count} events")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=100_000, help="metric points to ingest")
    parser.add_argument("--per-event", type=int, default=5, help="values per metrics event")
    parser.add_argument("--chunk-lines", type=int, default=1000, help="lines per follower poll")
    parser.add_argument("--profile", action="store_true", help="cProfile the whole-file batch")
    args = parser.parse_args(argv)
    if args.points < 1 or args.per_event < 1 or args.chunk_lines < 1:
        parser.error("--points, --per-event and --chunk-lines must be positive")
    events = max(1, args.points // args.per_event)

    home = Path(tempfile.mkdtemp(prefix="nanochat-bench-ingest-"))
    try:
        setup_django(home)
        from django.db import connection

        vendor = connection.vendor
        old_name = connection.creation.create_test_db(
            verbosity=0, autoclobber=True, serialize=False
        )
        try:
            print(
                f"database: {vendor}   events: {events:,} metrics events x {args.per_event}"
                f" values = {events * args.per_event:,} points"
            )
            bench_whole_file(home, events, args.per_event, args.profile)
            bench_chunks(home, events, args.per_event, args.chunk_lines)
        finally:
            connection.creation.destroy_test_db(old_name, verbosity=0)
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
