"""Issue 13, reproduction 7: one dead child must not take the product down.

`manage.py up` runs for real and its children are SIGKILLed: the engine worker (restarted, the
site keeps answering), the training worker (restarted, and its run is marked failed within the
reconciler window, never run twice) and the embedded Redis (restarted from its snapshot, and the
other children ride it out: same pids, working again afterwards). The crash-loop limit itself is
covered on small shell children in test_supervisor.py.
"""

from __future__ import annotations

import os
import re
import signal
import time

import psutil
import pytest
import requests
from django.conf import settings
from rest_framework.test import APIClient
from websockets.sync.client import connect

from runs.models import Dataset, Run, Status, Tokenizer
from tests.runs import live_workers
from tests.runs.live_workers import build_small_inputs, run_processes
from tests.site.site_process import SiteProcess, free_port, scratch_database, site_env
from tests.site.test_startup import ADMIN_PASSWORD, logged_in

pytestmark = [pytest.mark.services, pytest.mark.timeout(400)]

RUNS_ENV = {"RUNS_STALE_SECONDS": "8", "RUNS_RECONCILE_SECONDS": "2", "RUNS_HEARTBEAT_SECONDS": "1"}
QUIET = {"OMP_NUM_THREADS": "1", "CHAT_ENGINE_DEVICE": "cpu"}


def until(predicate, timeout: float, what: str, site: SiteProcess, interval: float = 0.25):
    """Poll `predicate` until it returns something true (its value), or fail with the output."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if site.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}; `up` said:\n{site.output[-8000:]}")
        time.sleep(interval)


def current_pid(site: SiteProcess, name: str) -> int:
    """The pid of `name` now: from the last "started NAME (pid N)" / "restarted NAME (pid N)"."""
    pids = re.findall(rf"(?:started|restarted) {re.escape(name)} \(pid (\d+)\)", site.output)
    assert pids, f"no child named {name!r}:\n{site.output}"
    return int(pids[-1])


def restarted_and_ready(site: SiteProcess, name: str) -> bool:
    """Celery said "ready." in `name`'s output since its last restart."""
    after = site.output.rsplit(f"restarted {name} (pid", 1)
    return len(after) == 2 and any(
        line.startswith(name) and "ready." in line for line in after[1].splitlines()
    )


def health(site: SiteProcess) -> dict | None:
    """The health report, as the signed-in admin (the page needs a user)."""
    try:
        return site.session.get(f"{site.url}health/", timeout=10).json()
    except (requests.RequestException, ValueError):
        return None


def engine_serving(site: SiteProcess, pid: int) -> bool:
    report = health(site)
    engines = (report or {}).get("checks", {}).get("engine", {}).get("workers", [])
    return any(f":{pid} " in worker["name"] for worker in engines)


def celery_serving(site: SiteProcess) -> bool:
    report = health(site) or {}
    workers = report.get("checks", {}).get("celery", {}).get("workers", [])
    return {"training", "default"} <= {w["name"].split("@")[0] for w in workers}


@pytest.fixture(scope="module")
def embedded_site(tmp_path_factory):
    """`up` with its own embedded Redis (REDIS_URL unset even where CI sets it)."""
    home = tmp_path_factory.mktemp("home")
    with scratch_database() as database_url:
        env = site_env(home, database_url, NANOCHAT_ADMIN_PASSWORD=ADMIN_PASSWORD, **QUIET)
        env.pop("REDIS_URL", None)
        # --verbose: the children's lines ("started", Celery's "ready.") on the console.
        proc = SiteProcess.manage_up(env, free_port(), "--verbose")
        try:
            proc.wait_up()
            proc.session = logged_in(proc)
            until(lambda: engine_serving(proc, current_pid(proc, "engine")), 120,
                  "the engine worker", proc)  # fmt: skip
            yield proc
            proc.press_ctrl_c()
            assert proc.wait_exit(60) == 0, proc.output
        finally:
            proc.kill_everything()


def test_a_killed_engine_worker_is_restarted_and_the_site_keeps_answering(embedded_site):
    site = embedded_site
    victim = current_pid(site, "engine")
    os.kill(victim, signal.SIGKILL)
    line = f"engine (pid {victim}) was killed by SIGKILL; restarting in 1 s (restart 1)"
    until(lambda: line in site.output, 30, "the death to be reported", site)
    assert site.session.get(f"{site.url}health/", timeout=10).status_code in (200, 503)
    until(lambda: current_pid(site, "engine") != victim, 30, "the restart", site)
    until(lambda: engine_serving(site, current_pid(site, "engine")), 120,
          "the restarted engine worker to serve", site)  # fmt: skip
    assert health(site)["ok"] is True
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == "zombie"


def test_a_killed_embedded_redis_is_restarted_and_the_others_ride_it_out(embedded_site):
    site = embedded_site
    until(lambda: celery_serving(site), 120, "both Celery workers", site)
    others = {name: current_pid(site, name) for name in ("web", "engine", "worker-training",
                                                         "worker-default", "beat")}  # fmt: skip
    victim = current_pid(site, "redis")
    os.kill(victim, signal.SIGKILL)
    until(lambda: f"redis (pid {victim}) was killed by SIGKILL; restarting" in site.output, 30,
          "the death to be reported", site)  # fmt: skip
    until(lambda: current_pid(site, "redis") != victim, 30, "the restart", site)
    until(lambda: (health(site) or {}).get("checks", {}).get("channel_layer", {}).get("ok"), 60,
          "the channel layer to work again", site)  # fmt: skip
    until(lambda: engine_serving(site, others["engine"]), 60, "the engine worker again", site)
    until(lambda: celery_serving(site), 120, "the Celery workers again", site)
    # The same processes: they reconnected rather than died and were restarted.
    assert {name: current_pid(site, name) for name in others} == others, site.output
    session = site.session
    ws_url = site.url.replace("http://", "ws://") + "ws/health/"
    cookie = f"sessionid={session.cookies['sessionid']}"
    with connect(ws_url, additional_headers={"Cookie": cookie}, origin=site.url.rstrip("/")) as ws:
        ws.send('{"type": "ping", "id": 7}')
        assert '"type": "pong"' in ws.recv(timeout=30)


@pytest.fixture
def inputs(tmp_path, django_user_model):
    owner = django_user_model.objects.create_user("alice", password="pw")
    data, tok = build_small_inputs(tmp_path)
    dataset = Dataset.objects.create(
        name="prebuilt", owner=owner, source="path", path=str(data), status="ready"
    )
    tokenizer = Tokenizer.objects.create(
        name="prebuilt-512", owner=owner, dataset=dataset, path=str(tok), status="ready",
        vocab_size=512,
    )  # fmt: skip
    return owner, dataset, tokenizer


@pytest.mark.django_db(transaction=True)
def test_a_killed_training_worker_is_restarted_and_its_run_marked_failed(inputs, redis_url):
    owner, dataset, tokenizer = inputs
    # `up` on this test's database and Redis, so the run submitted here goes to its workers.
    env = site_env(settings.NANOCHAT_HOME, None, DATABASE_URL=live_workers.test_database_url(),
                   REDIS_URL=redis_url, **RUNS_ENV, **QUIET)  # fmt: skip
    site = SiteProcess.manage_up(env, free_port(), "--verbose")
    try:
        site.wait_up()
        api = APIClient()
        api.force_authenticate(owner)
        response = api.post(
            "/api/runs/",
            {"kind": "base", "preset": "tiny", "dataset": dataset.pk, "tokenizer": tokenizer.pk,
             "config": {"num_iterations": 5000, "eval_every": -1, "sample_every": -1}},
            format="json",
        )  # fmt: skip
        assert response.status_code == 201, response.content
        run_id = response.json()["id"]
        run = until(lambda: Run.objects.filter(pk=run_id, status=Status.RUNNING, step__gte=1,
                                               pid__isnull=False).first(),
                    180, "the run to train", site)  # fmt: skip
        training = run_processes(run.pid)

        victim = current_pid(site, "worker-training")
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        run = until(lambda: Run.objects.filter(pk=run_id).exclude(status=Status.RUNNING).first(),
                    60, "the run to be marked", site)  # fmt: skip
        took = time.monotonic() - killed_at
        assert run.status == Status.FAILED and "worker lost" in run.error, run.error
        window = float(RUNS_ENV["RUNS_STALE_SECONDS"]) + float(RUNS_ENV["RUNS_RECONCILE_SECONDS"])
        assert took < window + 5, f"marked after {took:.1f} s"  # + 5 s for a loaded machine
        gone, alive = psutil.wait_procs(training, timeout=15)
        assert alive == [], f"training outlived its worker: {alive}"

        assert f"worker-training (pid {victim}) was killed by SIGKILL; restarting" in site.output
        until(lambda: current_pid(site, "worker-training") != victim, 30, "the restart", site)
        # The restarted worker is up (it reconciles on start) and does not run the run again:
        # its acks_late message, if redelivered, no longer matches a queued run.
        until(lambda: restarted_and_ready(site, "worker-training"), 120, "the new worker", site)
        run.refresh_from_db()
        assert run.status == Status.FAILED and run.attempts == 1
        site.press_ctrl_c()
        assert site.wait_exit(60) == 0, site.output
    finally:
        site.kill_everything()
