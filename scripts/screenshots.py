"""Take the README's screenshots from a running site, with the real output of its models.

    make run                          # in one terminal; then, on the dashboard, the quick start
    .venv/bin/python scripts/screenshots.py --url http://127.0.0.1:8000/ --out docs/screenshots

The pages are whatever the site holds: the dashboard, the newest pipeline run's base stage, a
comparison of that pipeline's stages, the leaderboard, and a chat in which this script types
the newcomer questions into the chat page and waits for the model's own streamed replies — so
the pictures show what a user of the shipped demo model really gets. It needs the system's
headless Chromium (/usr/bin/chromium and /usr/bin/chromedriver).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

QUESTIONS = ("Hello! Who are you?", "What is 12 * 7?", "Why is the sky blue?")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--window-size=1280,860",
)  # fmt: skip


def browser(profile: Path) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


def log_in(driver: webdriver.Chrome, url: str, user: str, password: str) -> requests.Session:
    """Sign the browser in through the login form; a requests session with the same cookie."""
    driver.get(f"{url}login/")
    driver.find_element(By.NAME, "username").send_keys(user)
    driver.find_element(By.NAME, "password").send_keys(password)
    driver.find_element(
        By.CSS_SELECTOR, "form button[type=submit], form input[type=submit]"
    ).click()
    WebDriverWait(driver, 30).until(lambda d: d.get_cookie("sessionid"))
    session = requests.Session()
    session.cookies.set("sessionid", driver.get_cookie("sessionid")["value"])
    return session


def newest_pipeline(session: requests.Session, url: str) -> dict:
    runs = session.get(f"{url}api/runs/", params={"kind": "pipeline"}, timeout=30).json()
    done = [r for r in runs["results"] if r["status"] == "succeeded"]
    if not done:
        raise SystemExit("no finished pipeline run: start the quick start and wait for it")
    return done[0]


def stage_runs(session: requests.Session, url: str, pipeline: dict) -> list[dict]:
    detail = session.get(f"{url}api/runs/{pipeline['id']}/", timeout=30).json()
    return [session.get(f"{url}api/runs/{i}/", timeout=30).json() for i in detail["stage_runs"]]


def replies_done(driver: webdriver.Chrome) -> int:
    """Assistant replies on the page that have finished (their stats carry a finish reason)."""
    stats = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .stats")
    return sum(1 for s in stats if s.get_attribute("data-finish-reason"))


def chat(driver: webdriver.Chrome, url: str, out: Path) -> None:
    driver.get(f"{url}chat/")
    wait = WebDriverWait(driver, 300, poll_frequency=0.2)
    wait.until(lambda d: d.find_element(By.ID, "socket-status").text == "connected")
    picker = Select(driver.find_element(By.ID, "checkpoint"))
    sft = [o for o in picker.options if o.text.startswith("SFT")]
    if sft:
        picker.select_by_visible_text(sft[0].text)
    for turn, question in enumerate(QUESTIONS, start=1):
        driver.find_element(By.ID, "prompt").send_keys(question)
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d, n=turn: replies_done(d) >= n)
    driver.save_screenshot(str(out / "chat.png"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/")
    parser.add_argument("--user", default="admin")
    home = Path(os.environ.get("NANOCHAT_HOME", Path.home() / ".nanochat"))
    parser.add_argument("--password-file", type=Path, default=home / "admin_password")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    args = parser.parse_args(argv)
    url = args.url if args.url.endswith("/") else args.url + "/"
    args.out.mkdir(parents=True, exist_ok=True)

    profile = Path(f"/tmp/nanochat-screenshots-{os.getpid()}")
    driver = browser(profile)
    try:
        session = log_in(driver, url, args.user, args.password_file.read_text().strip())
        pipeline = newest_pipeline(session, url)
        stages = stage_runs(session, url, pipeline)
        base = next((r for r in stages if r["kind"] == "base"), pipeline)
        shots = {
            "home.png": url,
            "run-detail.png": f"{url}runs/{base['id']}/",
            "compare.png": f"{url}runs/compare/?ids="
            + ",".join(str(r["id"]) for r in stages if r["kind"] in ("base", "mid", "sft")),
            "leaderboard.png": f"{url}leaderboard/",
        }
        for name, page in shots.items():
            driver.get(page)
            WebDriverWait(driver, 30).until(
                lambda d: d.execute_script("return document.readyState") == "complete"
            )
            driver.execute_script("return new Promise(r => setTimeout(r, 1500))")  # charts draw
            driver.save_screenshot(str(args.out / name))
        chat(driver, url, args.out)
    finally:
        driver.quit()
    print(f"screenshots in {args.out}/")


if __name__ == "__main__":
    main()
