"""A newcomer's first hour, scripted: clean clone → `make run` → log in → quick start → chat → stop.

Everything a new user touches runs for real: a fresh `git clone` of this repository, `make run`
on the embedded defaults (SQLite and the app's own Redis, no DATABASE_URL or REDIS_URL), the
admin login printed on the console, the dashboard's quick start (with the `tiny` pipeline preset,
so it finishes in minutes), six chat turns over the chat websocket with the model it built —
more than its 256-token context holds, so the oldest turns leave the model's view — and Ctrl-C.
Only installing the Python packages is skipped: the clone uses this checkout's virtualenv.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import requests
from websockets.sync.client import connect

from tests.site.site_process import SiteProcess, free_port

pytestmark = [pytest.mark.services, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
QUESTIONS = [
    "Hello! Who are you?",
    "What is 12 * 7?",
    "How many letters are in the word banana?",
    "Spell the word cat backwards.",
    "Tell me something about Python.",
    "Thank you, goodbye!",
]


def clean_clone(where: Path) -> Path:
    """A clone of what is committed here, using this checkout's installed virtualenv."""
    clone = where / "nanochat"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    (clone / ".venv").symlink_to(REPO / ".venv")
    for stamp in (".installed", ".installed-test"):  # the packages are in: make need not reinstall
        (REPO / ".venv" / stamp).touch()
    return clone


def newcomer_env(home: Path) -> dict[str, str]:
    """The environment of a user who configured nothing (the quick start made short)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE")}  # fmt: skip
    env.update(NANOCHAT_HOME=str(home), PYTHONUNBUFFERED="1", RUNS_QUICKSTART_PRESET="tiny")
    return env


def console_login(site: SiteProcess) -> tuple[str, str]:
    """The user name and password as `up`'s ready block (read whole by wait_up) tells a
    first-time user."""
    user = re.search(r"^  log in as +(\S+)$", site.output, re.M)
    password = re.search(r"^  password +(\S+)  \(saved to (\S+), readable only by you\)$",
                         site.output, re.M)  # fmt: skip
    assert user and password, site.output
    assert Path(password.group(2)).read_text().strip() == password.group(1)
    return user.group(1), password.group(1)


def log_in(url: str, user: str, password: str) -> requests.Session:
    session = requests.Session()
    page = f"{url}login/"
    session.get(page, timeout=30).raise_for_status()
    answer = session.post(
        page,
        data={"username": user, "password": password,
              "csrfmiddlewaretoken": session.cookies["csrftoken"]},
        headers={"Referer": page},
        timeout=30,
    )  # fmt: skip
    answer.raise_for_status()
    assert "sessionid" in session.cookies, answer.text[:500]
    return session


def wait_finished(session: requests.Session, url: str, run_id: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = session.get(f"{url}api/runs/{run_id}/", timeout=30).json()
        if run["status"] in ("succeeded", "failed", "cancelled"):
            return run
        assert time.monotonic() < deadline, f"run {run_id} still {run['status']}: {run}"
        time.sleep(2)


def chat(session: requests.Session, url: str, checkpoint: int) -> list[dict]:
    """Six turns in one conversation; the `done` frame of each reply."""
    ws_url = url.replace("http://", "ws://") + "ws/chat/"
    cookie = f"sessionid={session.cookies['sessionid']}"
    conversation, replies = None, []
    with connect(ws_url, additional_headers={"Cookie": cookie}, origin=url.rstrip("/")) as ws:
        for question in QUESTIONS:
            ws.send(json.dumps({"type": "send", "conversation": conversation,
                                "checkpoint": checkpoint, "content": question,
                                "max_tokens": 48, "temperature": 0.8, "seed": 1}))  # fmt: skip
            while True:
                frame = json.loads(ws.recv(timeout=180))
                assert frame["type"] != "error", frame
                if frame["type"] == "started":
                    conversation, asked = frame["conversation"], frame["message"]
                if frame["type"] == "done":
                    replies.append({**frame, "asked": asked})
                    break
    return replies


def test_a_newcomer_goes_from_a_clean_clone_to_a_chat_with_the_model_they_built(tmp_path):
    clone = clean_clone(tmp_path)
    port = free_port()
    site = SiteProcess(
        ["make", "--no-print-directory", "run", f"ARGS=--port {port} --grace 5"],
        newcomer_env(tmp_path / "home"),
        cwd=clone,
    )
    try:
        url = site.wait_up(240)
        session = log_in(url, *console_login(site))
        home = session.get(url, timeout=30)
        assert "Build the demo model" in home.text

        started = session.post(
            f"{url}quick-start/",
            data={"csrfmiddlewaretoken": session.cookies["csrftoken"]},
            headers={"Referer": url},
            timeout=30,
        )
        run_id = int(re.search(r"/runs/(\d+)/", started.url).group(1))
        run = wait_finished(session, url, run_id, timeout=600)
        assert run["status"] == "succeeded", run

        sft = session.get(f"{url}api/checkpoints/", params={"stage": "sft"}, timeout=30).json()
        assert sft["results"], sft
        checkpoint = max(sft["results"], key=lambda c: c["step"])["id"]
        assert f'value="{checkpoint}"' in session.get(f"{url}chat/", timeout=30).text

        replies = chat(session, url, checkpoint)
        assert len(replies) == 6
        assert all(r["content"] and r["completion_tokens"] > 0 for r in replies), replies
        # The conversation outgrew the 256-token context: later replies saw only its end.
        assert replies[-1]["prompt_tokens"] <= 256 - 48
        assert replies[0]["context_start"] is None
        assert replies[-1]["context_start"] > replies[0]["asked"], replies[-1]

        site.press_ctrl_c()
        assert site.wait_exit(60) == 0 or site.survivors() == []
        assert site.survivors() == [], site.output
    finally:
        site.kill_everything()
