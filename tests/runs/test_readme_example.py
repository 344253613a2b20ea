"""The README's curl example, run verbatim: copied out of README.md (the block after the
`<!-- readme-example: api-curl -->` comment) and executed by bash against a live server and a
real training worker, so the documented calls, ids and waits cannot drift from the API.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from django.conf import settings

from nanochat_site.bootstrap import save_password
from tests.runs.live_workers import LiveWorker

pytestmark = [
    pytest.mark.services,
    pytest.mark.timeout(240),
    pytest.mark.django_db(transaction=True),
]

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example(name: str) -> str:
    """The fenced code block that follows `<!-- readme-example: NAME -->` in README.md."""
    marker = re.escape(f"<!-- readme-example: {name} -->")
    found = re.search(marker + r"\s*```\w*\n(.*?)\n```", README.read_text(), re.DOTALL)
    assert found, f"README.md has no example marked {name!r}"
    return found.group(1)


@pytest.fixture
def training_worker(redis_url, tmp_path):
    worker = LiveWorker("training", tmp_path)
    yield worker
    worker.stop()


def test_the_readme_curl_example_runs_as_written(live_server, training_worker, django_user_model):
    django_user_model.objects.create_superuser("admin", "", "readme-pw")
    home = Path(settings.NANOCHAT_HOME)
    save_password("readme-pw", home / "admin_password")  # where `up` leaves the first one
    env = {**os.environ, "NANOCHAT_URL": live_server.url, "NANOCHAT_HOME": str(home)}
    started = time.monotonic()
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", readme_example("api-curl")],
        env=env, capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    took = time.monotonic() - started
    assert result.returncode == 0, (
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\nworker:\n{training_worker.log()}"
    )
    series = json.loads(result.stdout)["series"]  # the last call's answer: the run's metrics
    assert series["train/loss"]["step"] and series["val/bpb"]["step"], series
    print(f"README example: {took:.1f} s")
