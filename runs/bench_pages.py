"""How fast the run page answers for a long run: `python -m runs.bench_pages [--steps 50000]`.

The target: the run detail page of a run with 50k metric points responds in under 300 ms.
This builds a run of `--steps` steps with `--metrics` values per step (default 50,000 x 5 =
250,000 points, a 50k-step run as base_train reports it) plus val bpb every 250 steps, a few
checkpoints, samples and report sections, then times, through Django's test client with a
signed-in user (middleware, session, templates: the whole request):

1. GET /runs/<id>/              the page itself (HTML, no series embedded);
2. GET /api/runs/<id>/metrics/  the series the page's charts fetch next (the default five
                                metrics, downsampled to 1000 points each).

Same throw-away database as runs.bench_ingest (SQLite file, or a scratch PostgreSQL database
next to DATABASE_URL's). Prints median and worst of `--repeats` requests after one warm-up.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from runs.bench_ingest import METRIC_NAMES, setup_django

TARGET_MS = 300.0


def build_run(home: Path, steps: int, metrics: int):
    from django.contrib.auth import get_user_model

    from runs.models import Checkpoint, Kind, MetricPoint, Report, Run, Sample, Status

    user = get_user_model().objects.create_user("bench", password="bench")
    run_dir = home / "runs" / "long"
    run_dir.mkdir(parents=True)
    (run_dir / "log.txt").write_text("".join(f"step {i:05d} | loss 3.0\n" for i in range(5000)))
    run = Run.objects.create(
        name="long run", kind=Kind.BASE, status=Status.SUCCEEDED, owner=user,
        run_dir=str(run_dir), step=steps, total_steps=steps, progress=1.0,
        config={"depth": 20, "num_iterations": steps},
    )  # fmt: skip
    names = [*METRIC_NAMES[:metrics], *(f"train/extra_{i}" for i in range(metrics - 5))]
    t0 = 1_700_000_000.0
    batch = []
    for step in range(1, steps + 1):
        for i, name in enumerate(names):
            batch.append(MetricPoint(run=run, name=name, step=step, value=1 / (step + i),
                                     time=t0 + step))  # fmt: skip
        if step % 250 == 0:
            batch.append(MetricPoint(run=run, name="val/bpb", step=step, value=1.0, time=t0 + step))
        if len(batch) >= 20_000:
            MetricPoint.objects.bulk_create(batch)
            batch.clear()
    MetricPoint.objects.bulk_create(batch)
    for step in range(steps // 10, steps + 1, steps // 10):
        Checkpoint.objects.create(run=run, stage="base", step=step, path=str(run_dir / "ckpt"))
        for p in range(7):
            Sample.objects.create(run=run, step=step, prompt=f"prompt {p}", completion="text")
    for section in ("Base model training", "Base model evaluation"):
        Report.objects.create(run=run, section=section, markdown=f"## {section}\n- x: 1\n")
    return user, run, MetricPoint.objects.filter(run=run).count()


def timed(client, url: str, repeats: int) -> list[float]:
    response = client.get(url)  # warm-up: templates compiled, caches filled
    if response.status_code != 200:
        raise SystemExit(f"{url}: HTTP {response.status_code}")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        response = client.get(url)
        times.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 200
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--metrics", type=int, default=5, help="values per step")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if args.steps < 10 or args.metrics < 1 or args.repeats < 1:
        parser.error("--steps must be >= 10, --metrics and --repeats positive")

    home = Path(tempfile.mkdtemp(prefix="nanochat-bench-pages-"))
    try:
        setup_django(home)
        from django.conf import settings
        from django.db import connection
        from django.test import Client
        from django.urls import reverse

        settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "testserver"]
        old_name = connection.creation.create_test_db(
            verbosity=0, autoclobber=True, serialize=False
        )
        try:
            started = time.perf_counter()
            user, run, points = build_run(home, args.steps, args.metrics)
            print(f"database: {connection.vendor}   run: {args.steps:,} steps, "
                  f"{points:,} metric points (built in {time.perf_counter() - started:.0f} s)")  # fmt: skip
            client = Client()
            client.force_login(user)
            names = ",".join(("train/loss", "val/bpb", "train/lr", "train/tok_per_sec",
                              "train/progress"))  # fmt: skip
            urls = {
                "run page": reverse("run-detail", args=[run.pk]),
                "chart series": reverse("runs-api:run-metrics", args=[run.pk])
                + f"?names={names}&max_points=1000",
            }
            for label, url in urls.items():
                times = timed(client, url, args.repeats)
                verdict = "ok" if statistics.median(times) < TARGET_MS else "SLOW"
                print(f"{label:<14} median {statistics.median(times):7.1f} ms   "
                      f"worst {max(times):7.1f} ms   ({args.repeats} requests)  {verdict}")  # fmt: skip
        finally:
            connection.creation.destroy_test_db(old_name, verbosity=0)
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
