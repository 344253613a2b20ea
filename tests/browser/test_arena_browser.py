"""The arena in a real browser against the real site, engine worker and Redis: one battle
end to end -- both replies stream in side by side, the names are hidden until the vote, the
vote reveals them, and the leaderboard's Arena column counts it.

The two checkpoints are the chat tests' tiny model and its small-context twin (two
directories: the arena never pits a checkpoint against itself)."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from arena.models import Battle
from runs.models import Checkpoint
from tests.browser.conftest import save_screenshot
from tests.chat.conftest import STEP, small_checkpoint_dir  # noqa: F401 - fixture

pytestmark = [
    pytest.mark.services,
    pytest.mark.timeout(300),
    pytest.mark.django_db(transaction=True),
]

PASSWORD = "pw-for-browser"
# Counts, per side, the changes of its reply's text: more than one means it streamed.
WATCH_REPLIES = """
window.__updates = {a: 0, b: 0};
for (const side of ["a", "b"]) {
  new MutationObserver(() => { window.__updates[side] += 1; }).observe(
    document.getElementById("reply-" + side), {childList: true, subtree: true, characterData: true});
}
"""


@pytest.fixture
def alice(django_user_model, settings):
    # The site runs the product settings: a password hasher they know.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.PBKDF2PasswordHasher"]
    return django_user_model.objects.create_user("alice", password=PASSWORD)


def wait(browser, timeout=60):
    return WebDriverWait(browser, timeout, poll_frequency=0.05)


def text(browser, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def test_a_blind_battle_streams_both_replies_and_the_vote_reveals_and_rates(
    browser,
    site,
    alice,
    tiny_checkpoint_dir,
    small_checkpoint_dir,  # noqa: F811
    tmp_path,
):
    pair = [
        Checkpoint.objects.create(stage="sft", step=STEP, path=str(tiny_checkpoint_dir)),
        Checkpoint.objects.create(stage="base", step=STEP, path=str(small_checkpoint_dir)),
    ]
    browser.get(f"{site.url}/login/?next=/arena/")
    browser.find_element(By.NAME, "username").send_keys("alice")
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "form [type=submit]").click()
    wait(browser).until(lambda d: text(d, "socket-status") == "connected")
    browser.execute_script(WATCH_REPLIES)

    Select(browser.find_element(By.ID, "checkpoint-1")).select_by_value(str(pair[0].pk))
    Select(browser.find_element(By.ID, "checkpoint-2")).select_by_value(str(pair[1].pk))
    browser.find_element(By.ID, "max_tokens").clear()
    browser.find_element(By.ID, "max_tokens").send_keys("24")
    browser.find_element(By.ID, "prompt").send_keys("Tell me about the fox.")
    browser.find_element(By.ID, "start").click()

    finished = (
        "return ['a','b'].every((s) => document.getElementById('stats-' + s).dataset.finishReason)"
    )
    try:
        wait(browser, 120).until(lambda d: d.execute_script(finished))
    except Exception:
        raise AssertionError(f"{text(browser, 'arena-error')}\n{site.log()}") from None
    updates = browser.execute_script("return window.__updates")
    assert updates["a"] > 1 and updates["b"] > 1, updates  # both streamed piece by piece
    assert text(browser, "reply-a") and text(browser, "reply-b")
    # Blind until the vote: no name on either side, nothing in the battle's API answer.
    assert text(browser, "name-a") == "" and text(browser, "name-b") == ""
    battle = Battle.objects.get()
    assert battle.status == Battle.Status.READY and battle.reply_a and battle.reply_b

    browser.find_element(By.CSS_SELECTOR, "#arena-vote [data-outcome=a]").click()
    wait(browser).until(
        lambda d: d.find_element(By.ID, "arena-result").get_attribute("data-revealed")
    )
    names = {text(browser, "name-a"), text(browser, "name-b")}
    assert {name.rsplit("#", 1)[1] for name in names} == {str(c.pk) for c in pair}
    assert battle.vote.outcome == "a"
    save_screenshot(browser, tmp_path, "arena")

    browser.get(f"{site.url}/leaderboard/?sort=Arena")
    cells = browser.find_elements(By.CSS_SELECTOR, "#leaderboard td.arena-rating")
    assert len(cells) == 2 and all("1 vote" in cell.text for cell in cells), [c.text for c in cells]
    winner = battle.checkpoint_a_id
    first = browser.find_element(By.CSS_SELECTOR, "#leaderboard tbody tr").text
    assert f"step {STEP}" in first and int(cells[0].text.split()[0]) > 1000
    assert Checkpoint.objects.get(pk=winner).stage in first.lower()
