"""The chat page in a real browser, against the real site, engine worker and Redis.

What only a browser can show: the reply appears piece by piece while it is generated, Stop
ends it early, markup in a model's reply is rendered without running any script (stored
replies and the streaming path alike), tool calls and code are shown as blocks, the composer
commands work, field errors land next to their field, the page reconnects by itself, and a
chat with a demo-sized model goes on past its context with the model's card and the marker
of where its view begins.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest
from selenium.common.exceptions import ElementNotInteractableException, TimeoutException
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from chat.models import Conversation, Message
from engine.checkpoint import load_checkpoint
from engine.models import registry
from runs.models import Checkpoint
from tests.browser.conftest import save_screenshot
from tests.chat.conftest import SMALL_CONTEXT, STEP, small_checkpoint_dir  # noqa: F401

pytestmark = [
    pytest.mark.services,
    pytest.mark.timeout(300),
    pytest.mark.django_db(transaction=True),
]

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "pw-for-browser"
HOSTILE = (
    '<img src="x" onerror="window.__pwned = 1">\n\n'
    "<script>window.__pwned = 2</script>\n\n"
    "[a link](javascript:window.__pwned=3) and **bold text**"
)
# Installed before the page's own scripts run: records every <script> element that enters the
# thread, and every on* handler or javascript: URL on an element there, as it appears.
WATCH_THREAD = """
window.__unsafe = [];
const inspect = (node) => {
  if (node.nodeType !== 1 || !node.closest("#thread")) return;
  for (const el of [node, ...node.querySelectorAll("*")]) {
    if (el.tagName === "SCRIPT") window.__unsafe.push("script");
    for (const attr of el.attributes) {
      if (/^on/i.test(attr.name)) window.__unsafe.push(attr.name);
      if (/^\\s*javascript:/i.test(attr.value)) window.__unsafe.push(attr.name + "=" + attr.value);
    }
  }
};
new MutationObserver((records) => records.forEach((record) => {
  record.addedNodes.forEach(inspect);
  if (record.type === "attributes") inspect(record.target);
})).observe(document, { childList: true, subtree: true, attributes: true });
"""
# Keeps every WebSocket the page opens, so a test can hand the page a frame of its own.
CAPTURE_SOCKETS = """
window.__sockets = [];
const NativeWebSocket = window.WebSocket;
window.WebSocket = class extends NativeWebSocket {
  constructor(...args) { super(...args); window.__sockets.push(this); }
};
"""


# ---- helpers -------------------------------------------------------------------------------


@pytest.fixture
def alice(django_user_model, settings):
    # The site runs the product settings: store the password with a hasher they know (the
    # test settings' fast MD5 one is not among them).
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.PBKDF2PasswordHasher"]
    return django_user_model.objects.create_user("alice", password=PASSWORD)


@pytest.fixture
def model(tiny_checkpoint_dir):
    return Checkpoint.objects.create(stage="sft", step=STEP, path=str(tiny_checkpoint_dir))


def log_in(browser, site, user, next_path="/chat/"):
    browser.get(f"{site.url}/login/?next={next_path}")
    browser.find_element(By.NAME, "username").send_keys(user.username)
    browser.find_element(By.NAME, "password").send_keys(PASSWORD, Keys.ENTER)
    try:
        wait(browser, 20).until(lambda d: d.find_elements(By.ID, "thread"))
        wait_connected(browser)
    except TimeoutException:
        page = browser.page_source[-3000:]
        raise AssertionError(
            f"no chat page at {browser.current_url}:\n{page}\n{site.log()}"
        ) from None


def wait(browser, timeout=30):
    return WebDriverWait(browser, timeout, poll_frequency=0.05)


def wait_connected(browser):
    wait(browser).until(lambda d: status(d) == "connected")


def status(browser) -> str:
    return browser.find_element(By.ID, "socket-status").text


def js(browser, script, *args):
    return browser.execute_script(script, *args)


def set_number(browser, field_id, value):
    field = browser.find_element(By.ID, field_id)
    field.clear()
    field.send_keys(str(value))


def type_and_send(browser, text):
    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys(text, Keys.ENTER)


def last_reply_done(browser) -> dict | None:
    """The last reply's stats once its done frame arrived, else None."""
    stats = browser.find_elements(By.CSS_SELECTOR, "#thread .msg.assistant:last-child .stats")
    if not stats or not stats[0].get_attribute("data-finish-reason"):
        return None
    return {
        "finish_reason": stats[0].get_attribute("data-finish-reason"),
        "completion_tokens": int(stats[0].get_attribute("data-completion-tokens")),
        "text": stats[0].text,
    }


def streaming_text(browser) -> str:
    return js(
        browser,
        "const b = document.querySelector('#thread .msg.streaming .body');"
        "return b ? b.textContent : null;",
    )


def unsafe_seen(browser) -> list:
    return js(browser, "return window.__unsafe")


def pwned(browser) -> str:
    return js(browser, "return typeof window.__pwned")


def images_settled(browser) -> bool:
    """Every image in the thread has loaded or failed (so an onerror would have run)."""
    return js(
        browser,
        "const imgs = [...document.querySelectorAll('#thread img')];"
        "return imgs.length > 0 && imgs.every((img) => img.complete);",
    )


def talk(owner, checkpoint, title, exchanges):
    """A stored conversation: (user text, assistant fields) pairs."""
    conversation = Conversation.objects.create(owner=owner, title=title, checkpoint=checkpoint)
    for question, reply in exchanges:
        conversation.messages.create(role="user", content=question)
        conversation.messages.create(role="assistant", **reply)
    return conversation


def before_each_page(browser, *scripts):
    """Run these scripts in every page the browser opens from now on, before its own."""
    for script in scripts:
        browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": script})


# ---- tests ---------------------------------------------------------------------------------


def test_a_reply_streams_in_and_stop_ends_one_early(browser, site, alice, model):
    before_each_page(browser, CAPTURE_SOCKETS, WATCH_THREAD)
    log_in(browser, site, alice)
    assert browser.find_element(By.ID, "checkpoint").get_attribute("value") == str(model.pk)
    # Record the streaming reply's text length at every change of the page.
    js(
        browser,
        """window.__lengths = [];
        new MutationObserver(() => {
          const body = document.querySelector('#thread .msg.streaming .body');
          if (body) window.__lengths.push(body.textContent.length);
        }).observe(document.getElementById('thread'),
                   {childList: true, subtree: true, characterData: true});""",
    )

    # Shift+Enter is a new line; Enter sends.
    set_number(browser, "max_tokens", 300)
    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys("Hello!")
    ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
    prompt.send_keys("How are you?", Keys.ENTER)

    done = wait(browser, 90).until(last_reply_done)
    assert done["finish_reason"] == "length" and done["completion_tokens"] == 300
    assert re.search(r"300 tokens · [\d.]+ tok/s · first token [\d.]+ s", done["text"])
    lengths = js(browser, "return window.__lengths")
    growing = sorted({n for n in lengths if n > 0})
    assert len(growing) >= 2, f"the reply did not grow while streaming: {lengths}"
    final = browser.find_element(By.CSS_SELECTOR, "#thread .msg.assistant .body").text
    assert len(final) >= growing[0]

    conversation = Conversation.objects.get(owner=alice)
    user, reply = conversation.messages.all()
    assert user.content == "Hello!\nHow are you?"
    assert (reply.finish_reason, reply.completion_tokens) == ("length", 300)
    assert browser.current_url == f"{site.url}/chat/{conversation.pk}/"
    wait(browser).until(
        lambda d: d.find_elements(
            By.CSS_SELECTOR, f'#conversation-list a[data-id="{conversation.pk}"]'
        )
    )

    # A long reply: inject markup into the stream while it runs, then stop it.
    set_number(browser, "max_tokens", 4096)
    type_and_send(browser, "Tell me a long story.")
    wait(browser, 60).until(lambda d: (streaming_text(d) or "") != "")
    frame = {"type": "token", "part": "text", "text": "\n\n" + HOSTILE + "\n\n"}
    js(
        browser,
        """const socket = window.__sockets.find((s) => s.url.includes('/ws/chat/'));
        socket.dispatchEvent(new MessageEvent('message', {data: arguments[0]}));""",
        json.dumps(frame),
    )
    wait(browser).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, '#thread .msg.streaming .body img[src="x"]')
    )
    wait(browser).until(images_settled)
    assert pwned(browser) == "undefined"
    assert unsafe_seen(browser) == []
    # That reply may have run to its end during those checks on a loaded machine; end it and
    # stop the next one as soon as it streams, so Stop always lands mid-reply.
    if last_reply_done(browser) is None:
        # (It may end between the check and the click.)
        with contextlib.suppress(ElementNotInteractableException):
            browser.find_element(By.ID, "stop").click()
    wait(browser, 60).until(last_reply_done)
    wait(browser).until(lambda d: d.find_element(By.ID, "send").is_displayed())
    type_and_send(browser, "Tell me another long story.")
    wait(browser, 60).until(lambda d: (streaming_text(d) or "") != "")
    browser.find_element(By.ID, "stop").click()
    done = wait(browser, 60).until(last_reply_done)
    assert done["finish_reason"] == "stopped"
    assert 1 <= done["completion_tokens"] < 4096
    stopped = conversation.messages.order_by("-id").first()
    assert (stopped.finish_reason, stopped.completion_tokens) == (
        "stopped",
        done["completion_tokens"],
    )
    assert browser.find_element(By.ID, "send").is_displayed()
    assert not browser.find_element(By.ID, "stop").is_displayed()
    assert pwned(browser) == "undefined"


def test_markup_in_a_stored_reply_does_not_run(browser, site, alice, model):
    conversation = talk(
        alice,
        model,
        "Hostile",
        [
            ("Say something nasty.", {"content": HOSTILE, "finish_reason": "stop"}),
            (
                "Run it.",
                {
                    "content": "Done.",
                    "parts": [
                        {"type": "python", "text": "print('<b>hi</b>')"},
                        {"type": "python_output", "text": "<script>window.__pwned = 4</script>"},
                        {"type": "text", "text": '<svg onload="window.__pwned = 5"></svg>Done.'},
                    ],
                    "finish_reason": "stop",
                },
            ),
        ],
    )
    before_each_page(browser, WATCH_THREAD)
    log_in(browser, site, alice, next_path=f"/chat/{conversation.pk}/")

    bold = wait(browser).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#thread .msg.assistant .body strong")
    )
    assert bold[0].text == "bold text"  # the markdown was rendered, not shown as text
    wait(browser).until(images_settled)
    assert pwned(browser) == "undefined"
    assert unsafe_seen(browser) == []
    link = browser.find_element(By.CSS_SELECTOR, "#thread .msg.assistant .body a")
    assert not (link.get_attribute("href") or "").lower().startswith("javascript")
    output = browser.find_element(By.CSS_SELECTOR, "#thread .tool-output pre").text
    assert output == "<script>window.__pwned = 4</script>"  # tool output is plain text


def test_tool_calls_code_and_stats_render_as_blocks(browser, site, alice, model, tmp_path):
    code_answer = (
        "Here is a loop:\n\n```python\nfor i in range(3):\n    print(i)\n```\n\n"
        "It prints `0`, `1` and `2`."
    )
    conversation = talk(
        alice,
        model,
        "What is 12*34?",
        [
            (
                "What is 12*34?",
                {
                    "content": "Let me compute it. 12*34 = 408.",
                    "parts": [
                        {"type": "text", "text": "Let me compute it."},
                        {"type": "python", "text": "12*34"},
                        {"type": "python_output", "text": "408"},
                        {"type": "text", "text": "12*34 = **408**."},
                    ],
                    "completion_tokens": 21,
                    "tokens_per_second": 143.2,
                    "time_to_first_token": 0.05,
                    "finish_reason": "stop",
                },
            ),
            (
                "Show me a Python loop.",
                {
                    "content": code_answer,
                    "completion_tokens": 42,
                    "tokens_per_second": 120.0,
                    "time_to_first_token": 0.04,
                    "finish_reason": "stop",
                },
            ),
        ],
    )
    talk(alice, model, "Tell me a joke", [])
    browser.set_window_size(1280, 1000)  # room for the whole conversation in the screenshot
    log_in(browser, site, alice, next_path=f"/chat/{conversation.pk}/")

    replies = wait(browser).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#thread .msg.assistant")
    )
    assert len(replies) == 2
    call = replies[0].find_element(By.CSS_SELECTOR, ".tool-call")
    assert call.find_element(By.TAG_NAME, "figcaption").text.lower() == "python"
    assert call.find_element(By.TAG_NAME, "code").text == "12*34"
    assert replies[0].find_element(By.CSS_SELECTOR, ".tool-output pre").text == "408"
    assert replies[0].find_element(By.CSS_SELECTOR, ".stats").text == (
        "21 tokens · 143.2 tok/s · first token 0.05 s"
    )
    code = replies[1].find_element(By.CSS_SELECTOR, "pre code.language-python")
    assert code.find_elements(By.CSS_SELECTOR, ".hljs-keyword")  # highlighted
    assert "for i in range(3):" in code.text
    # Regenerate only on the last reply; Edit on each user message.
    regenerate = [r.find_element(By.CSS_SELECTOR, ".regenerate") for r in replies]
    assert [r.is_displayed() for r in regenerate] == [False, True]
    edits = browser.find_elements(By.CSS_SELECTOR, "#thread .msg.user .edit")
    assert len(edits) == 2 and all(e.is_displayed() for e in edits)
    active = browser.find_element(By.CSS_SELECTOR, "#conversation-list a.active")
    assert active.get_attribute("data-id") == str(conversation.pk)

    path = save_screenshot(browser, tmp_path, "chat")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_edit_and_regenerate_replace_the_replies(browser, site, alice, model):
    conversation = talk(
        alice,
        model,
        "Edits",
        [
            ("First question", {"content": "First answer", "finish_reason": "stop"}),
            ("Second question", {"content": "Second answer", "finish_reason": "stop"}),
        ],
    )
    log_in(browser, site, alice, next_path=f"/chat/{conversation.pk}/")
    set_number(browser, "max_tokens", 5)

    browser.find_elements(By.CSS_SELECTOR, "#thread .msg.assistant .regenerate")[-1].click()
    done = wait(browser, 60).until(last_reply_done)
    assert done["completion_tokens"] == 5
    texts = [m.content for m in conversation.messages.all()]
    assert texts[:3] == ["First question", "First answer", "Second question"]
    assert len(texts) == 4 and texts[3] != "Second answer"

    first_user = browser.find_element(By.CSS_SELECTOR, "#thread .msg.user")
    first_user.find_element(By.CSS_SELECTOR, ".edit").click()
    editor = first_user.find_element(By.CSS_SELECTOR, "textarea.editor")
    editor.clear()
    editor.send_keys("A better question", Keys.ENTER)
    wait(browser, 60).until(lambda d: last_reply_done(d) and len(d.find_elements(
        By.CSS_SELECTOR, "#thread .msg")) == 2)  # fmt: skip
    wait(browser).until(lambda d: conversation.messages.count() == 2)
    user, reply = conversation.messages.all()
    assert user.content == "A better question" and reply.completion_tokens == 5
    bubbles = browser.find_elements(By.CSS_SELECTOR, "#thread .msg .body")
    assert bubbles[0].text == "A better question"


def test_commands_and_field_errors(browser, site, alice, model):
    log_in(browser, site, alice)

    type_and_send(browser, "/temperature 0.5")
    assert browser.find_element(By.ID, "temperature").get_attribute("value") == "0.5"
    type_and_send(browser, "/topk 7")
    assert browser.find_element(By.ID, "top_k").get_attribute("value") == "7"
    type_and_send(browser, "/topk 999")
    top_k_error = browser.find_element(By.CSS_SELECTOR, '[data-error-for="top_k"]')
    assert "between 0 and 200" in top_k_error.text
    assert browser.find_element(By.ID, "top_k").get_attribute("value") == "7"
    browser.find_element(By.ID, "prompt").clear()
    type_and_send(browser, "/help")
    note = browser.find_elements(By.CSS_SELECTOR, "#thread .note")[-1].text
    for command in ("/temperature", "/topk", "/clear", "/help"):
        assert command in note
    assert Conversation.objects.count() == 0  # commands never reach the server

    # The server's field error shows next to the field; the text stays in the composer and
    # the socket keeps working.
    js(browser, "document.getElementById('max_tokens').value = '5000'")
    type_and_send(browser, "Too many tokens, please.")
    error = wait(browser).until(
        lambda d: d.find_element(By.CSS_SELECTOR, '[data-error-for="max_tokens"]').text
    )
    assert "4096" in error
    assert (
        browser.find_element(By.ID, "prompt").get_attribute("value") == "Too many tokens, please."
    )
    assert not browser.find_elements(By.CSS_SELECTOR, "#thread .msg")
    set_number(browser, "max_tokens", 4)
    browser.find_element(By.ID, "prompt").send_keys(Keys.ENTER)
    done = wait(browser, 60).until(last_reply_done)
    assert done["completion_tokens"] == 4
    assert browser.find_element(By.CSS_SELECTOR, '[data-error-for="max_tokens"]').text == ""
    reply = Message.objects.get(role="assistant")
    assert reply.sampling["temperature"] == 0.5 and reply.sampling["top_k"] == 7

    type_and_send(browser, "/clear")
    assert browser.current_url == f"{site.url}/chat/"
    assert not browser.find_elements(By.CSS_SELECTOR, "#thread .msg")
    type_and_send(browser, "A new topic")
    wait(browser, 60).until(last_reply_done)
    assert Conversation.objects.count() == 2


def test_the_page_reconnects_after_the_server_restarts(browser, site, alice, model):
    log_in(browser, site, alice)
    site.stop()
    wait(browser).until(lambda d: status(d) != "connected")
    site.start()
    wait(browser, 60).until(lambda d: status(d) == "connected")
    set_number(browser, "max_tokens", 3)
    type_and_send(browser, "Are you back?")
    done = wait(browser, 60).until(last_reply_done)
    assert done["completion_tokens"] == 3


def test_a_demo_sized_chat_goes_on_past_its_context_and_marks_where_the_model_looks(
    browser,
    site,
    alice,
    small_checkpoint_dir,  # noqa: F811 - the fixture imported above
    tiny_checkpoint_dir,
):
    demo = Checkpoint.objects.create(stage="sft", step=STEP, path=str(small_checkpoint_dir))
    Checkpoint.objects.create(stage="base", step=STEP, path=str(tiny_checkpoint_dir))
    log_in(browser, site, alice)
    picker = Select(browser.find_element(By.ID, "checkpoint"))
    assert picker.first_selected_option.text == "SFT · nanochat GPT d2 · step 5"
    assert [o.text for o in picker.options][1] == "BASE · nanochat GPT d2 · step 5"

    # The card of the selected model, against the checkpoint's own config.
    card = browser.find_element(By.CSS_SELECTOR, ".model-card:not([hidden])")
    assert card.get_attribute("data-checkpoint") == str(demo.pk)
    values = {
        row.get_attribute("data-key"): row.get_attribute("data-value")
        for row in card.find_elements(By.CSS_SELECTOR, "dl > div")
    }
    config = registry.config_from_dict(
        load_checkpoint(small_checkpoint_dir, STEP)[2]["model_config"]
    )
    assert int(values["parameters"]) == registry.family_of(config).count_params(config)["total"]
    assert int(values["context"]) == config.sequence_len == SMALL_CONTEXT
    assert "fluent-looking nonsense" in card.text
    # Max tokens follows the model's context.
    max_tokens = browser.find_element(By.ID, "max_tokens")
    assert max_tokens.get_attribute("value") == str(SMALL_CONTEXT // 2)
    assert max_tokens.get_attribute("max") == str(SMALL_CONTEXT - 1)
    # A base model starts a conversation in completion mode, without a system prompt.
    picker.select_by_index(1)
    assert Select(browser.find_element(By.ID, "mode")).first_selected_option.text == "Completion"
    assert not browser.find_element(By.ID, "system-prompt").is_displayed()
    assert max_tokens.get_attribute("value") == "512"
    picker.select_by_index(0)
    assert Select(browser.find_element(By.ID, "mode")).first_selected_option.text == "Chat"
    assert max_tokens.get_attribute("value") == str(SMALL_CONTEXT // 2)

    browser.find_element(By.CSS_SELECTOR, "#system-prompt summary").click()
    browser.find_element(By.ID, "system").send_keys("Answer briefly.")
    for i in range(4):
        type_and_send(browser, f"Tell me about foxes, part {i}.")
        wait(browser, 60).until(
            lambda d, n=i: (
                len(d.find_elements(By.CSS_SELECTOR, "#thread .msg.assistant")) == n + 1
                and last_reply_done(d)
            )
        )
    conversation = Conversation.objects.get(owner=alice)
    assert conversation.system_prompt == "Answer briefly."
    replies = list(conversation.messages.filter(role="assistant"))
    assert len(replies) == 4 and replies[-1].context_start_id is not None
    assert all(r.prompt_tokens + r.completion_tokens <= SMALL_CONTEXT for r in replies)

    def marker_before() -> str:
        """The id of the message right after the marker line (there is exactly one)."""
        markers = browser.find_elements(By.CSS_SELECTOR, "#thread .context-start")
        assert len(markers) == 1 and markers[0].text == "the model sees from here"
        return js(browser, "return arguments[0].nextElementSibling.dataset.id", markers[0])

    assert marker_before() == str(replies[-1].context_start_id)
    browser.refresh()  # stored on the reply: still there after a reload
    wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#thread .context-start"))
    assert marker_before() == str(replies[-1].context_start_id)
    assert browser.find_element(By.ID, "system").get_attribute("value") == "Answer briefly."
    assert not browser.find_element(By.ID, "mode").is_enabled()  # a conversation keeps its mode
