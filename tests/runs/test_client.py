"""`python -m runs.client` against a real server over HTTP (pytest-django's live_server).

Submitting commits a queued run, whose Celery message goes to Redis (the `redis_url` fixture);
no worker takes it, and the tests cancel what they queue.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from rest_framework.authtoken.models import Token

from runs import client as nanochat
from runs.models import Dataset, MetricPoint, Run, Status, Tokenizer
from runs.programs import PROGRAMS
from tests.runs.conftest import LOSS_POINTS, PASSWORD

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cli(live_server, redis_url):
    """cli(*args, token=..., stdin=...) -> CompletedProcess of `python -m runs.client`."""

    def run(*args: str, token: str | None = None, stdin: str = "") -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/bin:/bin", "NANOCHAT_URL": live_server.url}
        if token:
            env["NANOCHAT_TOKEN"] = token
        return subprocess.run(
            [sys.executable, "-m", "runs.client", *args], cwd=ROOT, env=env, input=stdin,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    return run


@pytest.fixture
def token(cli, alice):
    result = cli("token", "--username", "alice", stdin=PASSWORD + "\n")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_token_with_a_wrong_password_fails_with_the_server_message(cli, alice):
    result = cli("token", "--username", "alice", stdin="wrong\n")
    assert result.returncode == 2
    assert "Unable to log in with provided credentials." in result.stderr


def test_submit_list_show_cancel_watch(cli, token, ready_dataset, ready_tokenizer):
    result = cli(
        "submit", "base", "--preset", "tiny", "--dataset", str(ready_dataset.pk),
        "--tokenizer", str(ready_tokenizer.pk), "--set", "depth=3", "--set", "device=cpu",
        "--name", "cli-run", token=token,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    run = Run.objects.get()
    assert result.stdout.strip() == f"run {run.pk} queued: cli-run"
    assert run.overrides == {"depth": 3, "device": "cpu"} and run.owner.username == "alice"

    listing = cli("list", "--status", "queued", token=token)
    assert listing.returncode == 0
    assert f"{run.pk}  base       queued" in listing.stdout and "cli-run" in listing.stdout

    shown = cli("show", str(run.pk), token=token)
    assert shown.returncode == 0
    assert "status  queued" in shown.stdout and "preset tiny" in shown.stdout

    cancelled = cli("cancel", str(run.pk), token=token)
    assert cancelled.returncode == 0 and cancelled.stdout.strip() == f"run {run.pk} cancelled"
    assert Run.objects.get(pk=run.pk).status == Status.CANCELLED

    watched = cli("watch", str(run.pk), token=token)
    assert watched.returncode == 1  # finished, but not succeeded
    assert f"run {run.pk} cancelled" in watched.stdout


def test_refused_submit_prints_field_messages_and_exits_2(
    cli, token, ready_dataset, ready_tokenizer
):
    result = cli(
        "submit", "base", "--preset", "huge", "--dataset", str(ready_dataset.pk),
        "--tokenizer", str(ready_tokenizer.pk), "--set", "depth=deep", "--nproc", "0",
        token=token,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert "config.depth: must be an integer, got 'deep'" in lines
    assert any(line.startswith("preset: unknown preset 'huge'") for line in lines)
    assert any(line.startswith("nproc_per_node: ") for line in lines)
    assert not Run.objects.exists()


def test_watch_of_a_succeeded_run_exits_0_and_metrics_are_summarised(cli, token, finished_run):
    watched = cli("watch", str(finished_run.pk), token=token)
    assert watched.returncode == 0
    assert f"step {LOSS_POINTS - 1}/{LOSS_POINTS} (100.0%)" in watched.stdout
    metrics = cli("metrics", str(finished_run.pk), "--names", "train/loss", "--max-points",
                  "50", token=token)  # fmt: skip
    assert metrics.returncode == 0
    assert metrics.stdout.startswith(f"train/loss: 50 of {LOSS_POINTS} points, last step 999")


def test_without_a_token_the_server_refuses(cli, alice):
    result = cli("list")
    assert result.returncode == 2
    assert "Authentication credentials were not provided." in result.stderr


def test_dataset_upload_and_tokenizer_create(cli, token, tmp_path, ready_dataset):
    notes = tmp_path / "notes.txt"
    notes.write_text("first paragraph\n\nsecond paragraph\n")
    result = cli("dataset-create", "notes", "--source", "upload", "--file", str(notes),
                 "--option", "split_paragraphs=true", token=token)  # fmt: skip
    assert result.returncode == 0, result.stderr
    dataset = Dataset.objects.get(name="notes")
    run = dataset.runs.get()
    assert result.stdout.strip() == f"dataset {dataset.pk} notes building (run {run.pk})"
    assert run.config["split_paragraphs"] is True
    assert Path(run.config["files"][0]).read_text() == notes.read_text()

    virus = tmp_path / "virus.exe"
    virus.write_bytes(b"MZ")
    refused = cli("dataset-create", "bad", "--source", "upload", "--file", str(virus),
                  token=token)  # fmt: skip
    assert refused.returncode == 2
    assert refused.stderr.strip() == "files: virus.exe: expected .txt, .jsonl or .parquet"

    tokenizer = cli("tokenizer-create", "tok300", "--dataset", str(ready_dataset.pk),
                    "--set", "vocab_size=300", token=token)  # fmt: skip
    assert tokenizer.returncode == 0, tokenizer.stderr
    assert Tokenizer.objects.get(name="tok300").vocab_size == 300
    for pk in Run.objects.filter(status=Status.QUEUED).values_list("pk", flat=True):
        assert cli("cancel", str(pk), token=token).returncode == 0


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def deeper_run(alice, make_run):
    """A second succeeded run to compare with finished_run: two settings differ, 100 steps."""
    config = PROGRAMS["base"].validate("tiny", {"depth": 3, "matrix_lr": 0.03})
    run = make_run(alice, Status.SUCCEEDED, name="deeper", config=config, step=99,
                   total_steps=100, progress=1.0, exit_code=0)  # fmt: skip
    points = [MetricPoint(run=run, name="train/loss", step=i, value=4.0 - i / 100, time=i)
              for i in range(100)]  # fmt: skip
    points += [MetricPoint(run=run, name="val/bpb", step=i, value=v, time=i)
               for i, v in [(0, 2.75), (99, 1.875)]]  # fmt: skip
    MetricPoint.objects.bulk_create(points)
    return run


def test_plot_writes_a_png_and_names_the_file(cli, token, finished_run, tmp_path):
    out = tmp_path / "loss.png"
    result = cli("plot", str(finished_run.pk), "--metrics", "train/loss,val/bpb",
                 "--out", str(out), token=token)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote {out}\n"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_compare_prints_final_metrics_and_the_config_diff(
    cli, token, finished_run, deeper_run, tmp_path
):
    out = tmp_path / "compare.png"
    result = cli("compare", str(finished_run.pk), str(deeper_run.pk), "--metrics",
                 "train/loss,val/bpb", "--out", str(out), token=token)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert out.read_bytes().startswith(PNG_MAGIC)
    a, b = finished_run.pk, deeper_run.pk
    lines = [line.split() for line in result.stdout.splitlines()]
    assert lines[0] == ["wrote", str(out)]
    final = lines[lines.index(["final", "metrics"]) + 1 :][:3]
    # train/loss ends at 5 - 999/400 and 4 - 99/100; val/bpb at 3 - 900/1000 and 1.875
    assert final == [["run", "train/loss", "val/bpb"], [f"#{a}", "tiny", "run", "2.5025", "2.1"],
                     [f"#{b}", "deeper", "3.01", "1.875"]]  # fmt: skip
    diff = lines[lines.index(["config", "diff"]) + 1 :]
    assert diff == [["setting", f"#{a}", f"#{b}"], ["depth", "2", "3"],
                    ["matrix_lr", "0.02", "0.03"]]  # fmt: skip


def test_the_figure_has_one_axes_per_metric_and_one_line_per_run(
    live_server, alice, finished_run, deeper_run
):
    client = nanochat.Client(live_server.url, Token.objects.create(user=alice).key)
    metrics = ["train/loss", "val/bpb"]
    curves = nanochat.fetch_curves(client, [finished_run.pk, deeper_run.pk], metrics)
    figure = nanochat.metrics_figure(curves, metrics)
    assert [ax.get_title(loc="left") for ax in figure.axes] == metrics
    assert [len(ax.get_lines()) for ax in figure.axes] == [2, 2]
    loss = figure.axes[0].get_lines()
    labels = [f"#{finished_run.pk} tiny run", f"#{deeper_run.pk} deeper"]
    assert [line.get_label() for line in loss] == labels
    assert len(loss[0].get_xdata()) == LOSS_POINTS  # all of them: fewer than PLOT_POINTS
    assert list(loss[1].get_xdata()) == list(range(100))


def test_unknown_metric_or_run_and_a_directory_out_are_refused(
    cli, token, finished_run, deeper_run, tmp_path
):
    out = str(tmp_path / "x.png")
    metric = cli("compare", str(finished_run.pk), str(deeper_run.pk), "--metrics",
                 "train/loss,val/nope", "--out", out, token=token)  # fmt: skip
    assert metric.returncode == 2
    assert metric.stderr.startswith(f"run {finished_run.pk} has no metric val/nope (it has: ")
    missing = cli("plot", "999999", "--metrics", "train/loss", "--out", out, token=token)
    assert missing.returncode == 2 and missing.stderr.strip() == "run 999999: no such run"
    directory = cli("plot", str(finished_run.pk), "--metrics", "train/loss",
                    "--out", str(tmp_path), token=token)  # fmt: skip
    assert directory.returncode == 2 and "is a directory" in directory.stderr
    too_many = cli("plot", str(finished_run.pk), "--metrics", ",".join(f"m{i}" for i in range(9)),
                   token=token)  # fmt: skip
    assert too_many.returncode == 2 and "at most 8 metrics" in too_many.stderr
    assert not Path(out).exists()
