"""A headless Chromium driven by Selenium, and the real site for it to use.

The site is the product's own pieces in their own processes: daphne serving
nanochat_site.asgi on a free port, pointed at the test database, the test Redis and the
test data home (like the Celery workers of tests/runs/live_workers.py), and the real engine
worker of tests/chat/conftest.py serving the tiny checkpoint on its own engine channel.

Chromium is the system's (/usr/bin/chromium with its /usr/bin/chromedriver): Selenium's own
driver download cannot work offline. Without /usr/bin/chromium the browser tests skip and
say so; any other failure to start it is an error.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.chat.conftest import engine_worker, tiny_checkpoint_dir  # noqa: F401 - fixtures
from tests.runs.live_workers import worker_env
from tests.site.site_process import free_port

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,860",
)


class DaphneSite:
    """`daphne nanochat_site.asgi:application` on 127.0.0.1:port, as its own process group."""

    def __init__(self, port: int, env: dict[str, str], log_path: Path) -> None:
        self.port = port
        self.env = env
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()

    def start(self, timeout: float = 60) -> None:
        argv = [
            sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port),
            "nanochat_site.asgi:application",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"daphne did not start on {self.url}\n{self.log()}")
            time.sleep(0.1)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/login/", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


@pytest.fixture(scope="module")
def site(django_db_setup, django_db_blocker, redis_url, engine_worker, tmp_path_factory):  # noqa: F811
    """The running site; tests add their rows with transactional_db so daphne sees them."""
    with django_db_blocker.unblock():
        env = worker_env(CHAT_ENGINE_CHANNEL=engine_worker.channel)
    log_path = tmp_path_factory.mktemp("daphne") / "daphne.log"
    server = DaphneSite(free_port(), env, log_path)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def bare_site(django_db_setup, django_db_blocker, redis_url, tmp_path_factory):
    """The running site without a chat engine, for pages that do not chat (starts in seconds)."""
    with django_db_blocker.unblock():
        env = worker_env()
    server = DaphneSite(free_port(), env, tmp_path_factory.mktemp("daphne") / "daphne.log")
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def browser(tmp_path):
    """A fresh headless Chromium (its own profile directory) for one test."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(30)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def save_screenshot(browser, tmp_path: Path, name: str) -> Path:
    """docs/screenshots/<name>.png when NANOCHAT_SCREENSHOTS=1 (to refresh the README's
    pictures), else a scratch file, so a plain test run leaves the repository untouched."""
    if os.environ.get("NANOCHAT_SCREENSHOTS") == "1":
        path = REPO / "docs" / "screenshots" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        path = tmp_path / f"{name}.png"
    assert browser.save_screenshot(str(path)), "the screenshot was not written"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path
