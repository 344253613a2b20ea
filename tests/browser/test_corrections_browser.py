"""Feedback on the chat page in a real browser: thumbs, Correct, and add to a dataset
(static/js/feedback.js against /api/chat/, with the session and its CSRF token)."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By

from chat import corrections
from chat.models import DatasetEntry, Feedback
from tests.browser.test_chat_browser import alice, log_in, model, talk, wait  # noqa: F401
from tests.chat.conftest import small_checkpoint_dir  # noqa: F401

pytestmark = [
    pytest.mark.services,
    pytest.mark.timeout(300),
    pytest.mark.django_db(transaction=True),
]


def test_thumbs_correct_and_add_to_dataset_from_the_chat_page(browser, site, alice, model):  # noqa: F811
    conversation = talk(alice, model, "Paris", [("Where is Paris?", {"content": "In Spain."})])
    reply = conversation.messages.get(role="assistant")
    dataset = corrections.create_dataset(alice, "fixes")
    log_in(browser, site, alice, next_path=f"/chat/{conversation.pk}/")
    article = wait(browser).until(
        lambda d: d.find_element(By.CSS_SELECTOR, f'#thread .msg[data-id="{reply.pk}"]')
    )

    article.find_element(By.CSS_SELECTOR, ".thumb-up").click()
    wait(browser).until(lambda d: Feedback.objects.filter(message=reply, rating=1).exists())
    assert (
        article.find_element(By.CSS_SELECTOR, ".thumb-up").get_attribute("aria-pressed") == "true"
    )

    article.find_element(By.CSS_SELECTOR, ".correct").click()
    editor = article.find_element(By.CSS_SELECTOR, "textarea.editor")
    assert editor.get_attribute("value") == "In Spain."
    editor.clear()
    editor.send_keys("In France.")
    article.find_element(By.CSS_SELECTOR, ".save-correction").click()
    wait(browser).until(
        lambda d: "In France." in article.find_element(By.CSS_SELECTOR, ".body").text
    )
    reply.refresh_from_db()
    assert reply.content == "In France." and reply.feedback.original_content == "In Spain."
    assert article.find_element(By.CSS_SELECTOR, ".corrected-mark").is_displayed()

    browser.find_element(By.CSS_SELECTOR, "#add-to-dataset button").click()
    wait(browser).until(lambda d: DatasetEntry.objects.filter(dataset=dataset).exists())
    entry = DatasetEntry.objects.get(dataset=dataset)
    assert entry.messages[-1] == {"role": "assistant", "content": "In France."}
