"""Model families in a real browser: the new-run form's family picker shows each family's own
settings and starts runs of the picked family; a hybrid run's page draws the expert load per
layer as one chart; compare puts runs of two families on a training-tokens axis.

The site is daphne on the test database (tests/browser/conftest.py's DaphneSite) without the
chat engine or a training worker: the runs are only queued, and their metrics are rows this
test writes, so the whole module takes seconds.
"""

from __future__ import annotations

import pytest
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from runs.models import Dataset, MetricPoint, Run, RunEvent, Status, Tokenizer
from runs.programs import PROGRAMS

pytestmark = [
    pytest.mark.services,
    pytest.mark.timeout(180),
    pytest.mark.django_db(transaction=True),
]

PASSWORD = "pw-for-families"
EXPERT_LOAD = "Expert load (max/mean per layer)"


@pytest.fixture(scope="module")
def site(bare_site):
    """The running site (no chat engine: these pages do not chat)."""
    return bare_site


@pytest.fixture
def alice(django_user_model, settings):
    # The site runs the product settings: a password hasher they know.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.PBKDF2PasswordHasher"]
    return django_user_model.objects.create_user("alice", password=PASSWORD)


@pytest.fixture
def inputs(alice, tmp_path):
    dataset = Dataset.objects.create(name="corpus", owner=alice, source="path",
                                     path=str(tmp_path / "data"), status="ready")  # fmt: skip
    tokenizer = Tokenizer.objects.create(name="tok512", owner=alice, dataset=dataset,
                                         path=str(tmp_path / "tok"), status="ready",
                                         vocab_size=512)  # fmt: skip
    return dataset, tokenizer


def wait(browser, timeout=20):
    return WebDriverWait(browser, timeout, poll_frequency=0.1,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))  # fmt: skip


def log_in(browser, site, user):
    browser.get(f"{site.url}/login/?next=/")
    browser.find_element(By.NAME, "username").send_keys(user.username)
    browser.find_element(By.NAME, "password").send_keys(PASSWORD, Keys.ENTER)
    # The login page has an h1 too: wait for the dashboard's (see test_dashboard_browser.log_in).
    wait(browser).until(lambda d: "Dashboard" in d.find_element(By.TAG_NAME, "h1").text)


def shown(browser, name: str) -> bool:
    return browser.find_element(By.ID, f"id_{name}").is_displayed()


def pick_family(browser, label: str) -> None:
    browser.find_element(
        By.XPATH, f'//fieldset[@id="family-picker"]//label[contains(., "{label}")]'
    ).click()


def submit_run(browser, site, inputs, name: str, family_label: str) -> Run:
    dataset, tokenizer = inputs
    browser.get(f"{site.url}/runs/new/base/")
    pick_family(browser, family_label)
    browser.find_element(By.ID, "id_name").send_keys(name)
    Select(browser.find_element(By.ID, "id_preset")).select_by_value("tiny")
    Select(browser.find_element(By.ID, "id_dataset")).select_by_value(str(dataset.pk))
    Select(browser.find_element(By.ID, "id_tokenizer")).select_by_value(str(tokenizer.pk))
    browser.find_element(By.ID, "start-run").click()
    wait(browser).until(lambda d: d.find_elements(By.ID, "run-model"))
    assert browser.find_element(By.ID, "run-model").text == family_label
    return Run.objects.get(name=name)


def test_the_family_picker_shows_each_familys_settings_and_starts_its_runs(browser, site, alice,
                                                                          inputs):  # fmt: skip
    log_in(browser, site, alice)
    browser.get(f"{site.url}/runs/new/base/")
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#family-picker label")]
    assert labels[1:] == ["nanochat GPT", "GPT-2", "Hybrid (Qwen3-Next)"]

    # Nothing picked, no preset: the default family (GPT) and its own settings.
    assert shown(browser, "window_pattern") and shown(browser, "depth")
    assert not shown(browser, "dropout") and not shown(browser, "num_experts")

    pick_family(browser, "Hybrid")
    for name in ("layer_pattern", "num_experts", "experts_per_token", "expert_dim",
                 "delta_chunk_size", "aux_loss_coef", "n_kv_head", "depth"):  # fmt: skip
        assert shown(browser, name), name
    assert not shown(browser, "window_pattern") and not shown(browser, "dropout")

    pick_family(browser, "GPT-2")
    assert shown(browser, "dropout") and shown(browser, "bias")
    assert not shown(browser, "num_experts") and not shown(browser, "window_pattern")
    assert not shown(browser, "n_kv_head")

    # Left to the preset, the preset's family decides.
    pick_family(browser, "the preset")
    Select(browser.find_element(By.ID, "id_preset")).select_by_value("hybrid-small")
    assert shown(browser, "num_experts") and not shown(browser, "window_pattern")

    hybrid = submit_run(browser, site, inputs, "hybrid from the form", "Hybrid (Qwen3-Next)")
    assert hybrid.config["model"] == "hybrid" and hybrid.overrides == {"model": "hybrid"}
    assert hybrid.status == Status.QUEUED
    gpt2 = submit_run(browser, site, inputs, "gpt2 from the form", "GPT-2")
    assert gpt2.config["model"] == "gpt2"

    # The runs list says which is which.
    browser.get(f"{site.url}/runs/")
    badges = {e.find_element(By.XPATH, "./ancestor::tr").get_attribute("data-run-id"): e.text
              for e in browser.find_elements(By.CSS_SELECTOR, '[data-field="model"]')}  # fmt: skip
    assert badges == {str(hybrid.pk): "Hybrid (Qwen3-Next)", str(gpt2.pk): "GPT-2"}


def test_expert_load_chart_and_compare_by_tokens(browser, site, alice, inputs):
    dataset, tokenizer = inputs
    runs = {}
    for model, batch in (("hybrid", 2048), ("gpt2", 4096)):
        run = Run.objects.create(
            name=f"{model} run", kind="base", owner=alice, status=Status.SUCCEEDED, step=20,
            dataset=dataset, tokenizer=tokenizer,
            config=PROGRAMS["base"].validate("tiny", {"model": model}),
        )  # fmt: skip
        RunEvent.objects.create(run=run, seq=0, type="start", time=1e9, data={
            "derived": {"model": model, "total_batch_size": batch, "flops_per_token": 1e6}})  # fmt: skip
        runs[model] = run
    names = ["train/loss"] + [f"moe/load_max/l{i}" for i in range(4)]
    MetricPoint.objects.bulk_create([
        MetricPoint(run=run, name=name, step=step, value=1.0 + step / 100, time=1e9 + step)
        for run in runs.values() for name in names[: 1 if run is runs["gpt2"] else 5]
        for step in range(0, 21, 5)
    ])  # fmt: skip

    log_in(browser, site, alice)
    browser.get(f"{site.url}/runs/{runs['hybrid'].pk}/")
    chart = f'.chart[data-metric="{EXPERT_LOAD}"]'
    wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, chart)
                        and d.find_element(By.CSS_SELECTOR, chart).get_attribute("data-points") == "20")  # fmt: skip
    legend = browser.find_elements(By.CSS_SELECTOR, f"{chart} .u-legend .u-series .u-label")
    assert [e.text for e in legend] == ["step", "layer 0", "layer 1", "layer 2", "layer 3"]
    assert not browser.find_elements(By.CSS_SELECTOR, '.chart[data-metric="moe/load_max/l0"]')

    browser.get(f"{site.url}/runs/compare/?ids={runs['hybrid'].pk},{runs['gpt2'].pk}")
    wait(browser).until(
        lambda d: d.execute_script("return document.body.dataset.compareLoaded === '1';")
    )
    Select(browser.find_element(By.ID, "x-axis")).select_by_value("tokens")
    wait(browser).until(
        lambda d: d.execute_script("return document.body.dataset.compareAxis === 'tokens';")
    )
    loss = '.chart[data-metric="train/loss"]'
    legend = browser.find_elements(By.CSS_SELECTOR, f"{loss} .u-legend .u-series .u-label")
    assert [e.text for e in legend] == [
        "tokens", f"#{runs['hybrid'].pk} hybrid run (Hybrid (Qwen3-Next))",
        f"#{runs['gpt2'].pk} gpt2 run (GPT-2)",
    ]  # fmt: skip
    # The x axis reaches the gpt2 run's 20 steps x 4,096 tokens; in FLOPs, x 1e6 per token.
    chart = browser.find_element(By.CSS_SELECTOR, loss)
    assert chart.get_attribute("data-x-max") == str(20 * 4096)
    assert browser.find_element(By.ID, "x-axis-note").get_attribute("hidden")
    Select(browser.find_element(By.ID, "x-axis")).select_by_value("flops")
    wait(browser).until(lambda d: d.find_element(By.CSS_SELECTOR, loss).get_attribute("data-x-max")
                        == str(20 * 4096 * 10**6))  # fmt: skip
