"""The dashboard in a real browser: start a run from the form, watch it live, cancel it, compare.

Everything is real: daphne serving the site, a Celery training worker running the program
under torchrun, Redis carrying the live updates to the page's websocket, and headless
Chromium drawing the uPlot charts. Screenshots of the main pages are saved for the README
(docs/screenshots/ when NANOCHAT_SCREENSHOTS=1).
"""

from __future__ import annotations

import pytest
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from runs.models import Checkpoint, Dataset, EvalResult, Run, Status, Tokenizer
from tests.browser.conftest import save_screenshot
from tests.runs.live_workers import LiveWorker, build_small_inputs, wait_for

pytestmark = [
    pytest.mark.services,
    pytest.mark.timeout(400),
    pytest.mark.django_db(transaction=True),
]

PASSWORD = "pw-for-dashboard"


@pytest.fixture(scope="module")
def training_worker(redis_url, tmp_path_factory, django_db_setup, django_db_blocker):
    logs = tmp_path_factory.mktemp("dashboard-workers")
    with django_db_blocker.unblock():
        worker = LiveWorker("training", logs, RUNS_HEARTBEAT_SECONDS="1")
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory):
    return build_small_inputs(tmp_path_factory.mktemp("dashboard-inputs"))


@pytest.fixture
def alice(django_user_model, settings):
    # The site runs the product settings: a password hasher they know.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.PBKDF2PasswordHasher"]
    return django_user_model.objects.create_user("alice", password=PASSWORD)


@pytest.fixture
def inputs(prebuilt, alice):
    data, tok = prebuilt
    dataset = Dataset.objects.create(
        name="builtin-small", owner=alice, source="path", path=str(data), status="ready",
        documents=1200, shards=3,
    )  # fmt: skip
    tokenizer = Tokenizer.objects.create(
        name="builtin-512", owner=alice, dataset=dataset, path=str(tok), status="ready",
        vocab_size=512, stats={"bytes_per_token/news": 3.1, "bytes_per_token/code": 2.6},
    )  # fmt: skip
    return dataset, tokenizer


class PageWait(WebDriverWait):
    """A wait across page loads: pages reload themselves when a run's status settles and forms
    post and redirect, so an element found a moment ago may belong to the old document. The
    driver reports that as StaleElementReference, or (reading an element's text while the new
    document replaces it) as a generic "Node ... does not belong to the document" error: both
    mean "look again", not a failure."""

    def until(self, method, message: str = ""):
        def look(driver):
            try:
                return method(driver)
            except WebDriverException as exc:
                if "does not belong to the document" in str(exc):
                    return False
                raise

        return super().until(look, message)


def wait(browser, timeout=60):
    return PageWait(browser, timeout, poll_frequency=0.1,
                    ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))  # fmt: skip


def log_in(browser, site, user):
    browser.get(f"{site.url}/login/?next=/")
    browser.find_element(By.NAME, "username").send_keys(user.username)
    browser.find_element(By.NAME, "password").send_keys(PASSWORD, Keys.ENTER)
    # The login page has an h1 too: wait for the dashboard's, reading it inside the wait (the
    # login page's heading goes stale when the redirect lands).
    wait(browser, 20).until(lambda d: "Dashboard" in d.find_element(By.TAG_NAME, "h1").text)


def start_run_from_form(browser, site, inputs, name: str, iterations: int) -> Run:
    dataset, tokenizer = inputs
    browser.get(f"{site.url}/runs/new/base/")
    browser.find_element(By.ID, "id_name").send_keys(name)
    Select(browser.find_element(By.ID, "id_preset")).select_by_value("tiny")
    Select(browser.find_element(By.ID, "id_dataset")).select_by_value(str(dataset.pk))
    Select(browser.find_element(By.ID, "id_tokenizer")).select_by_value(str(tokenizer.pk))
    field = browser.find_element(By.ID, "id_num_iterations")
    field.clear()
    field.send_keys(str(iterations))
    browser.find_element(By.ID, "id_sample_every").send_keys("-1")
    browser.find_element(By.ID, "start-run").click()
    wait(browser, 20).until(lambda d: d.find_elements(By.ID, "run-status"))
    return Run.objects.get(name=name)


def chart_points(browser, metric: str) -> int:
    charts = browser.find_elements(By.CSS_SELECTOR, f'.chart[data-metric="{metric}"]')
    return int(charts[0].get_attribute("data-points") or 0) if charts else 0


def run_info(run_id, site, worker):
    def info() -> str:
        run = Run.objects.get(pk=run_id)
        return (f"run {run.pk}: {run.status} step {run.step} {run.error}\n{run.log_tail}\n"
                f"--- worker ---\n{worker.log()}\n--- site ---\n{site.log()}")  # fmt: skip

    return info


def test_start_watch_cancel_and_compare_runs(browser, site, training_worker, alice, inputs,
                                             tmp_path):  # fmt: skip
    log_in(browser, site, alice)

    # A long run, started from the form, watched live.
    run = start_run_from_form(browser, site, inputs, "watched run", iterations=20000)
    info = run_info(run.pk, site, training_worker)
    browser.execute_script("window.__sameDocument = true;")
    try:
        wait(browser, 120).until(lambda d: chart_points(d, "train/loss") >= 3)
    except TimeoutException:
        raise AssertionError("the loss chart got no points\n" + info()) from None
    first = chart_points(browser, "train/loss")
    wait(browser, 60).until(lambda d: chart_points(d, "train/loss") > first + 5)
    assert browser.execute_script("return window.__sameDocument === true;"), "the page reloaded"
    assert browser.find_element(By.ID, "run-status").text == "running"
    assert int(browser.find_element(By.ID, "run-step").text) > 0
    save_screenshot(browser, tmp_path, "run-detail")

    # Cancel from the page: the status changes on the page itself.
    browser.find_element(By.ID, "cancel-run").click()
    wait(browser, 60).until(lambda d: d.find_element(By.ID, "run-status").text == "cancelled")
    assert Run.objects.get(pk=run.pk).status == Status.CANCELLED

    # A short run to completion, then both side by side.
    short = start_run_from_form(browser, site, inputs, "short run", iterations=30)
    wait_for(
        lambda: Run.objects.filter(pk=short.pk, status=Status.SUCCEEDED).exists(), 180,
        "the short run to succeed", info=run_info(short.pk, site, training_worker),
    )  # fmt: skip
    checkpoint = Checkpoint.objects.filter(run=short).order_by("-step").first()
    assert checkpoint is not None
    for task, metric, value in (("core", "centered", 0.0123), ("arc_easy", "accuracy", 0.27),
                                ("gsm8k", "accuracy", 0.02), ("chatcore", "score", 0.011)):  # fmt: skip
        EvalResult.objects.create(run=short, checkpoint=checkpoint, task=task, metric=metric,
                                  value=value)  # fmt: skip

    browser.get(f"{site.url}/runs/")
    for run_id in (run.pk, short.pk):
        browser.find_element(By.CSS_SELECTOR, f'input[name="ids"][value="{run_id}"]').click()
    browser.find_element(By.ID, "compare-selected").click()
    wait(browser, 30).until(
        lambda d: d.execute_script("return document.body.dataset.compareLoaded === '1';")
    )
    wait(browser, 10).until(lambda d: chart_points(d, "train/loss") > 30)
    legend = browser.find_element(
        By.CSS_SELECTOR, '.chart[data-metric="train/loss"] .u-legend'
    ).text
    assert "watched run" in legend and "short run" in legend
    final = browser.find_element(By.ID, "final-metrics").text
    assert "train/loss" in final
    diff = browser.find_element(By.ID, "config-diff").text
    assert "num_iterations" in diff and "20000" in diff and "30" in diff
    save_screenshot(browser, tmp_path, "compare")

    browser.get(f"{site.url}/leaderboard/")
    board = browser.find_element(By.ID, "leaderboard").text
    assert "0.0123" in board and "0.2700" in board
    save_screenshot(browser, tmp_path, "leaderboard")

    browser.get(f"{site.url}/")
    wait(browser, 10).until(lambda d: "ok" in d.find_element(By.ID, "health").text)
    home = browser.find_element(By.TAG_NAME, "main").text
    assert "short run" in home and "Recent checkpoints" in home
    save_screenshot(browser, tmp_path, "home")
