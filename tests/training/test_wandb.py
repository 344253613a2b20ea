"""Optional Weights & Biases logging (training/wandb_sink.py), with real tiny training runs.

Each run is its own process, as under the web app: W&B starts a service process and wraps
stdout while a run is open, which must not leak into the test process, and "wandb is never
imported" can only be checked in a fresh interpreter. W&B runs offline with every network
address pointed at a closed local port, so no test can reach the internet; what it logged is
read back from the offline run's `.wandb` file (a LevelDB-style log of protobuf records, which
the installed wandb can only upload, not read, hence the small reader here).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.conftest import read_events
from training import base_train, pipeline
from training.flags import ConfigError
from training.wandb_sink import WandbSink, sink_for

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[2]
PROJECT = "nanochat-tests"
STEPS = 4
TINY = ["--config", "tiny", "--num-iterations", str(STEPS), "--eval-every", "2"]
# Runs base_train.main in a fresh interpreter and says whether wandb was imported.
TRAIN = """
import json, sys
from training import base_train
code = base_train.main(sys.argv[1:])
module = sys.modules.get("wandb")
print("RESULT " + json.dumps({"code": code, "wandb_imported": module is not None}), flush=True)
"""


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This environment without any WANDB_* of the developer's, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env["NANOCHAT_HOME"] = str(tmp_path / "home")
    return {**env, **extra}


def offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """W&B offline and quiet, its own files in tmp_path, and no way out to a network."""
    wandb_home = tmp_path / "wandb-home"
    return clean_env(
        tmp_path,
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_BASE_URL="http://127.0.0.1:9",  # the discard port: nothing listens
        WANDB_CONFIG_DIR=str(wandb_home / "config"),
        WANDB_CACHE_DIR=str(wandb_home / "cache"),
        WANDB_DATA_DIR=str(wandb_home / "data"),
        WANDB_ARTIFACT_DIR=str(wandb_home / "artifacts"),
        WANDB_DISABLE_GIT="true",
        WANDB_DISABLE_CODE="true",
        WANDB__DISABLE_STATS="true",
        WANDB__DISABLE_MACHINE_INFO="true",
        **extra,
    )


def train(corpus, out: Path, env: dict[str, str], *extra: str) -> dict:
    """A tiny base_train run in its own process; its result, events and output."""
    data_dir, tokenizer_dir = corpus
    args = [*TINY, "--data-dir", str(data_dir), "--tokenizer-dir", str(tokenizer_dir),
            "--checkpoint-dir", str(out / "ckpt"), "--run-dir", str(out / "run"), *extra]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", TRAIN, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    output = proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, output[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    return {**result, "events": read_events(out / "run"), "output": output, "run_dir": out / "run"}


def logged(events: list[dict]) -> dict[int, dict[str, float]]:
    """{step: values} of the metrics and eval events, merged per step, as W&B gets them."""
    steps: dict[int, dict[str, float]] = {}
    for event in events:
        if event["type"] in ("metrics", "eval"):
            values = {k: v for k, v in event["values"].items() if v is not None}
            steps.setdefault(event["step"], {}).update(values)
    return steps


def metric_keys(events: list[dict]) -> list[tuple[str, int, list[str]]]:
    return [(e["type"], e["step"], sorted(e["values"]))
            for e in events if e["type"] in ("metrics", "eval")]  # fmt: skip


def losses(events: list[dict]) -> list[float]:
    return [e["values"]["train/loss"] for e in events if e["type"] == "metrics"]


def start_of(events: list[dict]) -> dict:
    return next(e for e in events if e["type"] == "start")


# --- reading an offline W&B run ------------------------------------------------------------------

BLOCK, HEADER = 32768, 7  # the .wandb file: LevelDB log blocks, 7-byte record headers
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(run_dir: Path) -> list:
    """The protobuf records of the one `.wandb` file in an offline run directory."""
    from wandb.proto import wandb_internal_pb2

    [path] = Path(run_dir).glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", HEADER  # after the file header (ident, magic, version)
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:
            break
        chunk, pos = data[pos + HEADER : pos + HEADER + length], pos + HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _items(items) -> dict:
    """A record's {key: value}; W&B writes a key with '/' as its parts (nested_key)."""
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


def read_offline_run(run_dir: Path) -> dict:
    """What an offline W&B run holds: run info, config, history by step, summary, exit code."""
    out = {"history": {}, "summary": {}, "exit_code": None}
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out["run"] = {"id": run.run_id, "project": run.project, "name": run.display_name,
                          "group": run.run_group, "job_type": run.job_type}  # fmt: skip
            out["config"] = _items(run.config.update)
        elif kind == "history":
            out["history"][record.history.step.num] = _items(record.history.item)
        elif kind == "summary":
            out["summary"].update(_items(record.summary.update))
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def user_values(row: dict) -> dict:
    """A history row without W&B's own keys (_step, _runtime, _timestamp)."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


# --- the runs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_run(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    return train(tiny_corpus, out, clean_env(out))


@pytest.fixture(scope="module")
def offline_run(tiny_corpus, tmp_path_factory):
    pytest.importorskip("wandb")
    out = tmp_path_factory.mktemp("offline")
    return train(tiny_corpus, out, offline_env(out), "--wandb-project", PROJECT,
                 "--wandb-group", "tests")  # fmt: skip


def test_without_a_project_nothing_touches_wandb(plain_run):
    assert plain_run["code"] == 0
    assert plain_run["wandb_imported"] is False
    assert "wandb" not in start_of(plain_run["events"])
    assert not (plain_run["run_dir"] / "wandb").exists()
    assert "W&B" not in plain_run["output"]


def test_offline_run_logs_the_config_and_the_metrics_we_ingest(offline_run, plain_run):
    assert offline_run["code"] == 0 and offline_run["wandb_imported"] is True
    events = offline_run["events"]
    start = start_of(events)
    info = start["wandb"]
    assert info["project"] == PROJECT and info["group"] == "tests"
    assert info["mode"] == "offline" and "url" not in info and "error" not in info
    # The W&B files sit in the run's own directory, beside its events.
    wandb_dir = Path(info["dir"])
    assert wandb_dir.is_dir() and wandb_dir.parent == offline_run["run_dir"] / "wandb"
    assert wandb_dir.name.startswith("offline-run-") and wandb_dir.name.endswith(info["run_id"])

    run = read_offline_run(wandb_dir)
    assert run["run"] == {"id": info["run_id"], "project": PROJECT, "name": "run",
                          "group": "tests", "job_type": "base_train"}  # fmt: skip
    config = {k: v for k, v in run["config"].items() if k != "_wandb"}
    meta = config.pop("nanochat")
    assert config == start["config"]
    assert meta["program"] == "base_train" and meta["total_steps"] == STEPS
    assert meta["derived"] == start["derived"]
    # Every metric and eval value at its step, exactly as the event file has it.
    expected = logged(events)
    history = {step: user_values(row) for step, row in run["history"].items()}
    assert sorted(history) == sorted(expected) == list(range(STEPS + 1))
    for step, values in expected.items():
        assert history[step] == pytest.approx(values, rel=1e-12), step
    assert run["summary"]["checkpoint/step"] == STEPS
    assert run["exit_code"] == 0
    # Logging to W&B changed nothing in the events themselves.
    assert metric_keys(events) == metric_keys(plain_run["events"])


def test_without_wandb_installed_the_run_is_unchanged_and_says_why(
    tiny_corpus, tmp_path, plain_run
):
    # A sitecustomize that makes `import wandb` fail, as where it is not installed; the project
    # comes from the environment, as on a worker with WANDB_PROJECT set.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None\n")
    env = offline_env(tmp_path, WANDB_PROJECT=PROJECT, PYTHONPATH=str(shim))
    result = train(tiny_corpus, tmp_path / "out", env)
    assert result["code"] == 0 and result["wandb_imported"] is False
    info = start_of(result["events"])["wandb"]
    assert info["project"] == PROJECT and set(info) == {"project", "error"}
    assert "not installed" in info["error"] and "requirements-wandb.txt" in info["error"]
    assert result["output"].count("warning: no W&B logging") == 1
    assert not (result["run_dir"] / "wandb").exists()
    assert result["events"][-1]["status"] == "succeeded"
    assert metric_keys(result["events"]) == metric_keys(plain_run["events"])
    assert losses(result["events"]) == pytest.approx(losses(plain_run["events"]), abs=1e-4)


SINK_SCRIPT = """
import sys
from training.events import EventWriter
from training.wandb_sink import WandbSink
sink = WandbSink("nanochat-tests", name="evals", job_type="chat_eval", directory=sys.argv[1])
with EventWriter(sys.argv[1], sinks=[sink]) as events:
    events.start({"tasks": "ARC-Easy"}, total_steps=1, world_size=1, device="cpu")
    events.eval_result("ARC-Easy", "accuracy", 0.25, {"n": 4})
    events.eval_result("MMLU", "accuracy", None, {"skipped": "no data"})
    events.eval(7, {"chatcore": 0.125, "diverged": float("nan")})
    events.end("failed", "ValueError: boom")
"""


def test_eval_results_become_summary_values_and_a_failed_run_fails_in_wandb(tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", SINK_SCRIPT, str(run_dir)], cwd=ROOT,
                          env=offline_env(tmp_path), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = start_of(read_events(run_dir))["wandb"]
    run = read_offline_run(Path(info["dir"]))
    assert run["summary"]["ARC-Easy/accuracy"] == 0.25
    assert "MMLU/accuracy" not in run["summary"]  # a skipped task has no score to show
    assert user_values(run["history"][7]) == {"chatcore": 0.125}  # NaN is left out, not faked
    assert run["exit_code"] == 1


def test_a_bad_project_name_is_refused_by_the_flag_and_by_the_sink(monkeypatch, capsys):
    for bad in ("a/b", "../up", "x" * 65, "sp ace", "-dash"):
        with pytest.raises(ConfigError) as caught:
            base_train.FLAGS.validate({"wandb_project": bad})
        assert "wandb_project" in caught.value.errors
    with pytest.raises(ConfigError):
        pipeline.FLAGS.validate({"wandb_group": "a#b"})
    # $WANDB_PROJECT is checked the same way; the run goes on and the start event says why.
    monkeypatch.setenv("WANDB_PROJECT", "team/project")
    sink = sink_for({"wandb_project": "", "run_dir": ""}, "base_train")
    assert isinstance(sink, WandbSink) and "one folder name" in sink.error
    fields = sink.observe({"type": "start", "config": {}})
    assert fields == {"wandb": {"project": "team/project", "error": sink.error}}
    assert sink.observe({"type": "metrics", "step": 1, "values": {"train/loss": 1.0}}) is None
    sink.close()
    assert capsys.readouterr().err.count("warning: no W&B logging") == 1


def test_no_project_no_sink(monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    assert sink_for({"wandb_project": "", "run_dir": "/tmp/x"}, "base_train") is None
    monkeypatch.setenv("WANDB_PROJECT", PROJECT)
    sink = sink_for({"wandb_project": "", "run_dir": "/tmp/x/run-7"}, "base_train")
    assert (sink.project, sink.name, sink.job_type) == (PROJECT, "run-7", "base_train")
    flagged = sink_for({"wandb_project": "mine", "wandb_group": "g", "run_dir": ""}, "chat_rl")
    assert (flagged.project, flagged.group, flagged.name) == ("mine", "g", None)


def test_pipeline_stages_log_to_the_project_in_one_group(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    config = pipeline.FLAGS.validate({"run_dir": str(tmp_path / "run-12")})
    assert pipeline.wandb_args(config) == ([], {})
    config = pipeline.FLAGS.validate({"run_dir": str(tmp_path / "run-12"), "wandb_project": "p"})
    assert pipeline.wandb_args(config) == (
        ["--wandb-group", "run-12", "--wandb-project", "p"],
        {"project": "p", "group": "run-12"},
    )
    # The project from the environment reaches the stages through their environment; the
    # group still comes from the pipeline. A run dir that cannot name a group: a timestamp.
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    config = pipeline.FLAGS.validate({"run_dir": str(tmp_path / "my run")})
    args, info = pipeline.wandb_args(config)
    assert args[0] == "--wandb-group" and args[1].startswith("pipeline-") and len(args) == 2
    assert info == {"project": "from-env", "group": args[1]}
    config = pipeline.FLAGS.validate({"wandb_group": "sweep-1"})
    assert pipeline.wandb_args(config)[0] == ["--wandb-group", "sweep-1"]


def test_every_training_and_eval_stage_gets_the_wandb_options(tmp_path):
    config = pipeline.FLAGS.validate({"base_preset": "tiny", "mid": True, "rl": True,
                                      "out_dir": str(tmp_path / "out"), "wandb_project": "p",
                                      "run_dir": str(tmp_path / "run-3")})  # fmt: skip
    wandb, _ = pipeline.wandb_args(config)
    given = {}
    for stage in pipeline.plan(config):
        for argv in stage.commands:
            full = pipeline.stage_argv(stage, argv, tmp_path / stage.name, wandb)
            module = full[len(full) - full[::-1].index("-m")]
            given[module] = full[-4:] == wandb
            # What a stage program is given, its own flags accept (the whole command line).
            if given[module]:
                program = __import__(module, fromlist=["FLAGS"]).FLAGS
                assert program.parse(full[full.index(module) + 1 :])["wandb_group"] == "run-3"
    assert given == {
        "training.dataset": False, "training.tok_train": False, "training.tok_eval": False,
        "training.base_train": True, "training.base_eval": True, "training.chat_eval": True,
        "training.mid_train": True, "training.chat_sft": True, "training.chat_rl": True,
    }  # fmt: skip
