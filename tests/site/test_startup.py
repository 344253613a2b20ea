"""`manage.py up` / `make run` started for real: web, workers and Redis as separate processes.

These prove the product works end to end over real sockets: the pages, the admin login, a
websocket round trip through the channel layer, a Celery task through the broker, a short
console (the children's output in log files), and that stopping (Ctrl-C, a crashed child, a
killed supervisor) leaves no process behind.
"""

import os
import signal
import stat
import time
from pathlib import Path

import psutil
import pytest
import requests
from celery import Celery
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from nanochat_site.redis_urls import celery_url
from tests.site.site_process import SiteProcess, free_port, scratch_database, site_env

pytestmark = [pytest.mark.services, pytest.mark.timeout(300)]

ADMIN_PASSWORD = "correct-horse-battery"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with scratch_database() as database_url:
        env = site_env(home, database_url, NANOCHAT_ADMIN_PASSWORD=ADMIN_PASSWORD)
        proc = SiteProcess.manage_up(env, free_port())
        try:
            proc.wait_up()
            proc.home = home
            yield proc
            proc.press_ctrl_c()
            proc.wait_exit(60)
        finally:
            proc.kill_everything()


def site_redis_url(site) -> str:
    return site.env.get("REDIS_URL") or f"unix://{site.home}/redis/redis.sock"


def logged_in(site, password: str = ADMIN_PASSWORD) -> requests.Session:
    session = requests.Session()
    login = f"{site.url}admin/login/"
    session.get(login, timeout=10).raise_for_status()
    response = session.post(
        login,
        data={
            "username": "admin",
            "password": password,
            "csrfmiddlewaretoken": session.cookies["csrftoken"],
            "next": "/admin/",
        },
        headers={"Referer": login},
        timeout=10,
    )
    response.raise_for_status()
    assert "sessionid" in session.cookies, response.text[:500]
    return session


def test_home_page_requires_login_then_serves(site):
    anonymous = requests.get(site.url, allow_redirects=False, timeout=10)
    assert anonymous.status_code == 302
    assert anonymous.headers["Location"].startswith("/login/")

    session = logged_in(site)
    home = session.get(site.url, timeout=10)
    assert home.status_code == 200
    assert "Dashboard" in home.text
    admin = session.get(f"{site.url}admin/", timeout=10)
    assert admin.status_code == 200
    assert "Site administration" in admin.text
    css = session.get(f"{site.url}static/css/site.css", timeout=10)
    assert css.status_code == 200 and "--accent" in css.text


def test_console_is_one_ready_block_and_the_children_log_to_files(site):
    # Wait for Celery's "ready." in the worker's log file: by then its banner was written.
    deadline = time.monotonic() + 60
    while "ready." not in site.log("worker-training") and time.monotonic() < deadline:
        time.sleep(0.5)
    worker_log = site.log("worker-training")
    assert "[config]" in worker_log and "ready." in worker_log, worker_log
    assert "started web (pid" in site.log()

    console = site.output
    logs = Path(site.env["NANOCHAT_HOME"]) / "logs"
    start = console.index("nanochat is up: ")
    block = console[start:].splitlines()[:5]
    assert "log in as   admin" in block[1]
    assert f"{ADMIN_PASSWORD}  (saved to {logs.parent / 'admin_password'}" in block[2]
    assert f"logs        {logs}/" in block[3] and "Ctrl-C stops everything" in block[4]
    for banner in ("[config]", "[queues]", "celery@", "ready.", "superuser privileges"):
        assert banner not in console, console
    assert len(console.splitlines()) <= 8, console


def test_password_file_is_private_and_logs_in(site):
    path = Path(site.env["NANOCHAT_HOME"]) / "admin_password"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == ADMIN_PASSWORD
    assert logged_in(site, path.read_text().strip())


def test_favicon_is_served_and_linked(site):
    icon = requests.get(f"{site.url}favicon.ico", timeout=10)
    assert icon.status_code == 200 and icon.headers["Content-Type"] == "image/svg+xml"
    page = requests.get(f"{site.url}login/", timeout=10)
    assert '<link rel="icon" href="/static/favicon.svg"' in page.text


def test_admin_login_page_is_served(site):
    page = requests.get(f"{site.url}admin/login/", timeout=10)
    assert page.status_code == 200
    assert 'name="password"' in page.text


def test_websocket_round_trips_through_the_channel_layer(site):
    session = logged_in(site)
    ws_url = site.url.replace("http://", "ws://") + "ws/health/"
    cookie = f"sessionid={session.cookies['sessionid']}"
    origin = site.url.rstrip("/")
    with connect(ws_url, additional_headers={"Cookie": cookie}, origin=origin) as ws:
        for ping_id in (1, 2, 3):
            ws.send(f'{{"type": "ping", "id": {ping_id}}}')
            reply = ws.recv(timeout=10)
            assert f'"id": {ping_id}' in reply and '"type": "pong"' in reply


def test_websocket_refuses_anonymous_users(site):
    ws_url = site.url.replace("http://", "ws://") + "ws/health/"
    with pytest.raises(InvalidStatus), connect(ws_url, origin=site.url.rstrip("/")) as ws:
        ws.recv(timeout=5)


@pytest.mark.parametrize("queue", ["default", "training"])
def test_celery_task_runs_in_a_worker_of_the_site(site, queue):
    url = celery_url(site_redis_url(site))
    app = Celery("probe", broker=url, backend=url)
    try:
        result = app.send_task("nanochat_site.ping", args=[f"hello {queue}"], queue=queue)
        answer = result.get(timeout=60)
    finally:
        app.close()
    assert answer["payload"] == f"hello {queue}"
    workers = {p.pid for p in site.remember_descendants()}
    assert answer["pid"] in workers, "the task ran outside the site's worker processes"
    assert answer["pid"] != os.getpid()


def test_health_reports_database_layer_workers_and_engine(site):
    session = logged_in(site)
    deadline = time.monotonic() + 60
    while True:
        report = session.get(f"{site.url}health/", timeout=30).json()
        names = {w["name"].split("@")[0] for w in report["checks"]["celery"].get("workers", [])}
        engines = report["checks"]["engine"].get("workers", [])
        if ({"training", "default"} <= names and engines) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert report["ok"] is True, report
    assert report["checks"]["database"]["ok"]
    assert report["checks"]["channel_layer"]["ok"]
    assert {"training", "default"} <= names, report
    engine_pid = site.child_pid("engine")
    assert len(engines) == 1 and f":{engine_pid} " in engines[0]["name"], report
    assert report["checks"]["engine"]["capacity"] > 0


@pytest.fixture
def fresh_site_env(tmp_path):
    with scratch_database() as database_url:
        yield site_env(tmp_path / "home", database_url)


def test_ctrl_c_on_make_run_leaves_no_process(fresh_site_env):
    port = free_port()
    proc = SiteProcess(["make", "--no-print-directory", "run", f"ARGS=--port {port} --grace 5"],
                       fresh_site_env)  # fmt: skip
    try:
        proc.wait_up()
        assert len(proc.remember_descendants()) >= 4  # python up, redis?, web, two workers
        # The generated password: printed in the ready block, saved privately, and it logs in.
        path = Path(fresh_site_env["NANOCHAT_HOME"]) / "admin_password"
        password = path.read_text().strip()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(password) >= 12
        assert f"password    {password}  (saved to {path}" in proc.output
        assert logged_in(proc, password)
        proc.press_ctrl_c()
        proc.wait_exit(60)
        assert proc.survivors() == [], proc.output
        assert "all processes stopped" in proc.output
    finally:
        proc.kill_everything()


def test_an_essential_child_given_up_on_is_named_and_everything_stops(fresh_site_env):
    # With --max-restarts 0 the first death is already a crash loop; the web server is
    # essential, so `up` stops everything (restarts: tests/site/test_hardening_supervisor.py).
    proc = SiteProcess.manage_up(fresh_site_env, free_port(), "--max-restarts", "0")
    try:
        proc.wait_up()
        victim = proc.child_pid("web")
        os.kill(victim, signal.SIGKILL)
        code = proc.wait_exit(60)
        assert code != 0
        assert f"web (pid {victim}) was killed by SIGKILL: 1 death within" in proc.output
        assert "(stopping everything)" in proc.output
        assert proc.survivors() == [], proc.output
    finally:
        proc.kill_everything()


def test_killing_the_supervisor_takes_its_children_down(fresh_site_env):
    proc = SiteProcess.manage_up(fresh_site_env, free_port())
    try:
        proc.wait_up()
        children = proc.remember_descendants()
        os.kill(proc.proc.pid, signal.SIGKILL)
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert alive == [], proc.output
    finally:
        proc.kill_everything()


def test_busy_port_is_refused_with_a_clear_error(fresh_site_env):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = SiteProcess.manage_up(fresh_site_env, port)
        try:
            assert proc.wait_exit(60) != 0
            assert f"port {port} on 127.0.0.1 is already in use" in proc.output
        finally:
            proc.kill_everything()
