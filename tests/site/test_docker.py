"""docker/: the compose file parses and every service runs a command that exists.

Docker cannot run on this machine, so this checks what can go wrong without it: YAML errors,
missing services or GPU reservations, commands naming modules, apps or management commands
that do not exist, and COPY sources that are not in the repository.
"""

import importlib
import shutil
from pathlib import Path

import pytest
import yaml
from django.core.management import get_commands

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
APP_SERVICES = [name for name, s in SERVICES.items() if "build" in s]


def test_required_services_exist():
    assert {"postgres", "redis", "web", "worker", "engine"} <= set(SERVICES)


@pytest.mark.parametrize("name", ["worker", "engine"])
def test_gpu_services_reserve_gpus(name):
    devices = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_are_wired_by_the_same_variables(name):
    env = SERVICES[name]["environment"]
    assert (
        env["DATABASE_URL"].startswith("postgres://") and "@postgres:5432/" in env["DATABASE_URL"]
    )
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    assert env["NANOCHAT_HOME"] == "/data"
    assert "SECRET_KEY" in env


def check_entry_point(argv: list[str]) -> None:
    program = argv[0]
    if program == "python" and argv[1] == "-m":  # the web server (daphne's command line)
        assert argv[2] == "nanochat_site.webserver" and importlib.util.find_spec(argv[2])
        module, attr = argv[-1].split(":")
        assert hasattr(importlib.import_module(module), attr), argv[-1]
    elif program == "python":
        assert argv[1] == "manage.py" and (REPO / "manage.py").exists()
        assert argv[2] in get_commands(), f"no management command {argv[2]!r}"
    elif program == "daphne":
        assert shutil.which("daphne") or importlib.util.find_spec("daphne")
        module, attr = argv[-1].split(":")
        assert hasattr(importlib.import_module(module), attr), argv[-1]
    elif program == "celery":
        app_module = argv[argv.index("-A") + 1]
        assert hasattr(importlib.import_module(app_module), "celery_app")
        role = argv[argv.index("-A") + 2]
        assert role in ("worker", "beat"), role
        if role == "worker":
            queues = argv[argv.index("-Q") + 1].split(",")
            assert set(queues) <= {"training", "default"}, queues
        else:  # the beat schedule must name tasks that exist
            from django.conf import settings

            from nanochat_site.celery import app

            app.loader.import_default_modules()
            for entry in settings.CELERY_BEAT_SCHEDULE.values():
                assert entry["task"] in app.tasks, entry["task"]
    else:
        pytest.fail(f"unexpected entry point {program!r}")


@pytest.mark.parametrize("name", APP_SERVICES)
def test_service_commands_name_existing_entry_points(name):
    check_entry_point(SERVICES[name]["command"])


def test_dockerfile_default_command_and_copy_sources_exist():
    lines = (REPO / "docker" / "Dockerfile").read_text().splitlines()
    cmd = next(line for line in lines if line.startswith("CMD "))
    check_entry_point(yaml.safe_load(cmd.removeprefix("CMD ")))
    for line in lines:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"COPY source {source} is missing"
    assert "ARG DEVICE=cuda" in lines
    assert any(line.startswith("FROM base-${DEVICE}") for line in lines)
