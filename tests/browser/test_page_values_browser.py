"""What a new user sees on every page, in a real browser at 1280 px: real values (tokenizer
compression numbers, run kinds in words), nothing wider than the window, durations that tick
on a live page, and a live pipeline's ETA and the checkpoints and evals of its stages.

The pipeline is live without training anything: its event files are written as
training.pipeline and its stage programs write them (tests/runs/test_pipeline_stages.py's
FakePipeline) and followed by the worker's own Follower in this process, whose updates reach
the pages through the real Redis channel layer and daphne (tests/browser/conftest.py's
bare_site). A real pipeline would cost minutes of CI for the same pages.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone
from selenium.webdriver.common.by import By

from runs.follow import Follower
from runs.models import Kind, Run, Status, Tokenizer
from tests.browser.test_dashboard_browser import PASSWORD, log_in, wait
from tests.runs.test_pipeline_stages import FakePipeline

pytestmark = [
    pytest.mark.services,
    pytest.mark.timeout(180),
    pytest.mark.django_db(transaction=True),
]

STAGES = (("dataset", "dataset"), ("base", "base"), ("base_eval", "base_eval"), ("sft", "sft"),
          ("chat_eval_sft", "chat_eval"))  # fmt: skip


@pytest.fixture
def alice(django_user_model, settings):
    # The site runs the product settings: a password hasher they know.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.PBKDF2PasswordHasher"]
    return django_user_model.objects.create_user("alice", password=PASSWORD)


def earlier_pipeline(owner) -> None:
    """A finished pipeline of the same preset: how long each stage usually takes."""
    earlier = Run.objects.create(kind=Kind.PIPELINE, owner=owner, status=Status.SUCCEEDED,
                                 preset="tiny", name="yesterday's pipeline")  # fmt: skip
    t0 = timezone.now() - timedelta(days=1)
    for name, kind in STAGES:
        Run.objects.create(kind=kind, owner=owner, pipeline=earlier, status=Status.SUCCEEDED,
                           config={"pipeline_stage": name}, started_at=t0,
                           finished_at=t0 + timedelta(minutes=3))  # fmt: skip


def live_pipeline(owner, root: Path) -> tuple[Run, FakePipeline, Follower]:
    """A running pipeline whose base stage saved a checkpoint, its evaluation scored it and
    whose SFT stage is under way."""
    run = Run.objects.create(
        kind=Kind.PIPELINE, owner=owner, status=Status.RUNNING, preset="tiny",
        name="a pipeline with a rather long name to see how the tables cope with it",
        started_at=timezone.now(), heartbeat_at=timezone.now(), run_dir=str(root),
    )  # fmt: skip
    root.mkdir(parents=True)
    fake = FakePipeline(run)
    fake.events.start({}, total_steps=len(STAGES), world_size=1, device="", program="pipeline",
                      stages=[{"name": n, "kind": k} for n, k in STAGES])  # fmt: skip
    follower = Follower(run)
    base_dir = str(fake.out / "base_checkpoints" / "d2")
    _, w = fake.start("dataset", "dataset")
    w.end("succeeded")
    fake.end()
    _, w = fake.start("base", "base", outputs={"checkpoint_dir": base_dir})
    w.metrics(10, {"train/loss": 3.5})
    w.eval(10, {"val/bpb": 1.875})
    w.checkpoint(10, base_dir, {"model_config": {"n_layer": 2}})
    w.end("succeeded")
    fake.end()
    _, w = fake.start("base_eval", "base_eval", inputs={"checkpoint_dir": base_dir})
    w.eval_result("core", "centered", 0.0625)
    w.end("succeeded")
    fake.end()
    _, sft = fake.start("sft", "sft", inputs={"checkpoint_dir": base_dir})
    sft.metrics(1, {"train/loss": 2.0, "train/eta_sec": 600.0, "train/progress": 0.1})
    follower.poll()
    return run, sft, follower


def overflow(browser) -> int:
    """How many pixels the document is wider than the window (0: nothing sticks out)."""
    return browser.execute_script(
        "return document.documentElement.scrollWidth - window.innerWidth;"
    )


def sticking_out(browser) -> list[str]:
    """Tables wider than their card (outside a scroll box of their own), and run names wrapped
    over more than three lines."""
    return browser.execute_script("""
        const found = [];
        document.querySelectorAll(".card table").forEach((table) => {
          const card = table.closest(".card");
          const shown = table.closest(".table-scroll") || table;
          const over = shown.getBoundingClientRect().right - card.getBoundingClientRect().right;
          if (over > 0.5) found.push("table in #" + (card.id || "?") + " by " + over + " px");
        });
        document.querySelectorAll("td.run-name").forEach((cell) => {
          const size = parseFloat(getComputedStyle(cell).fontSize);
          if (cell.getBoundingClientRect().height > 3 * 1.6 * size) found.push("name " + cell.innerText);
        });
        return found;
    """)


def test_every_page_shows_values_fits_1280px_and_live_pages_tick(browser, bare_site, alice,
                                                                 tmp_path):  # fmt: skip
    site = bare_site
    Tokenizer.objects.create(name="tok-news", owner=alice, path=str(tmp_path / "tok"),
                             vocab_size=512, status="ready",
                             stats={"tok/bytes_per_token/news": 2.7278,
                                    "tok/bytes_per_token/code": 2.1, "tok/vs_gpt2/news": -4.0})  # fmt: skip
    earlier_pipeline(alice)
    pipeline, sft, follower = live_pipeline(alice, tmp_path / "pipeline")
    base = pipeline.stage_runs.get(kind=Kind.BASE)
    browser.set_window_size(1280, 800)
    log_in(browser, site, alice)

    pages = ["/", "/runs/", "/runs/new/base/", "/runs/new/pipeline/", "/datasets/",
             "/tokenizers/", "/checkpoints/", "/leaderboard/", "/reports/",
             f"/runs/compare/?ids={pipeline.pk},{base.pk}", f"/runs/{base.pk}/",
             f"/runs/{pipeline.pk}/"]  # fmt: skip
    for page in pages:
        browser.get(site.url + page)
        wait(browser, 20).until(lambda d: d.find_elements(By.TAG_NAME, "h1"))
        assert overflow(browser) <= 0, f"{page} is {overflow(browser)} px wider than 1280"
        assert not sticking_out(browser), f"{page}: {sticking_out(browser)}"
        # (the dashboard may reload itself as runs change: read once the page is there)
        text = wait(browser, 20).until(lambda d: d.find_element(By.TAG_NAME, "main").text)
        for raw in ("base_eval run", "chat_eval run", "New base run", "New pipeline run"):
            assert raw not in text, f"{page} says {raw!r}"

    browser.get(site.url + "/tokenizers/")
    table = browser.find_element(By.ID, "compression").text
    assert "bytes/token · news" in table and "2.73" in table and "2.10" in table

    browser.get(site.url + "/runs/")
    actions = browser.find_element(By.CSS_SELECTOR, ".page-head .actions").text
    assert "New base model evaluation" in actions and "New chat model evaluation" in actions

    # The runs list: a running run's time ticks without a reload.
    row = f'tr[data-run-id="{pipeline.pk}"] [data-field="duration"]'
    first = browser.find_element(By.CSS_SELECTOR, row).text
    wait(browser, 10).until(lambda d: d.find_element(By.CSS_SELECTOR, row).text != first)

    # The pipeline's page: ETA, its stages' checkpoint, evals and best bpb, a ticking duration.
    browser.get(f"{site.url}/runs/{pipeline.pk}/")
    browser.execute_script("window.__sameDocument = true;")
    assert browser.find_element(By.ID, "run-eta").text.startswith("· ETA ")
    assert browser.find_element(By.ID, "best-val-bpb").text == "1.8750"
    assert "base" in browser.find_element(By.ID, "best-val-bpb-stage").text
    checkpoints = browser.find_element(By.ID, "checkpoints-panel").text
    assert "No checkpoints yet." not in checkpoints and "base" in checkpoints
    evals = browser.find_element(By.ID, "evals-panel").text
    assert "base_eval" in evals and "core" in evals and "0.0625" in evals
    duration = browser.find_element(By.CSS_SELECTOR, "#run-duration span").text
    wait(browser, 10).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#run-duration span").text != duration
    )
    # The SFT stage speeds up: the new ETA arrives over the websocket.
    eta = browser.find_element(By.ID, "run-eta").text
    sft.metrics(2, {"train/loss": 1.9, "train/eta_sec": 30.0, "train/progress": 0.9})
    follower.poll()
    wait(browser, 20).until(lambda d: d.find_element(By.ID, "run-eta").text not in ("", eta))
    assert browser.execute_script("return window.__sameDocument === true;"), "the page reloaded"
