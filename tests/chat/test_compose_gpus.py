"""docker/compose.yaml gives training and chat disjoint GPUs, one GPU per engine worker.

Read with PyYAML (anchors and `<<` merges resolved as compose resolves them) and compose's
`${VAR:-default}` interpolation at its defaults, since `docker compose config` is not available
everywhere the tests run.
"""

import re
from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "docker" / "compose.yaml"


def interpolate(text, env):
    """Compose's ${VAR:-default} and ${VAR:?error} with `env` (the rest of text unchanged)."""

    def value(match):
        name, op, default = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        return default if op == ":-" else "set"

    return re.sub(r"\$\{(\w+)(:[-?])?([^}]*)\}", value, text)


def services(env=None):
    config = yaml.safe_load(interpolate(COMPOSE.read_text(), env or {}))
    return config["services"]


def gpus_of(service):
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    ids = set()
    for device in devices.get("devices", []):
        assert "count" not in device, "a GPU service must name its GPUs (device_ids), not count"
        ids.update(device["device_ids"])
    return ids


def test_training_and_chat_gpus_are_disjoint_and_cover_an_8_gpu_node():
    found = services()
    training = gpus_of(found["worker"])
    engines = {
        name: gpus_of(s) for name, s in found.items() if "engine_worker" in s.get("command", [])
    }
    chat = set().union(*engines.values())
    assert training == {"0", "1", "2", "3", "4", "5", "6"}
    assert chat == {"7"}
    assert not training & chat
    # Nothing else reserves a GPU.
    others = {n for n, s in found.items() if gpus_of(s)} - {"worker", *engines}
    assert others == set()


def test_each_engine_worker_holds_one_gpu_and_decodes_on_it():
    for name, service in services().items():
        if "engine_worker" not in service.get("command", []):
            continue
        assert len(gpus_of(service)) == 1, name
        command = service["command"]
        assert command[command.index("--device") + 1] == "cuda:0", name


def test_chat_gpu_is_chosen_with_chat_gpu():
    assert gpus_of(services({"CHAT_GPU": "3"})["engine"]) == {"3"}
