import json
import subprocess

import pytest

from tests.training.conftest import read_events
from training import report
from training.report import (
    build_report,
    collect_summary,
    hourly_cost,
    summary_table,
    write_header,
    write_section,
)


def test_write_section_is_a_no_op_without_a_report_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert write_section(None, "base_eval", "## X\n") is None
    assert write_section("", "base_eval", "## X\n", summary={"CORE": 0.1}, column="BASE") is None
    assert list(tmp_path.iterdir()) == []


def test_write_section_writes_markdown_and_summary(tmp_path):
    path = write_section(tmp_path / "r", "base_eval", "## Base eval\n- CORE: 0.2\n",
                         summary={"CORE": 0.2, "bad": float("nan")}, column="BASE")  # fmt: skip
    assert path == tmp_path / "r" / "base_eval.md"
    lines = path.read_text().splitlines()
    assert lines[0] == "## Base eval"
    assert lines[1].startswith("timestamp: ")
    assert lines[2] == "- CORE: 0.2"
    record = json.loads((tmp_path / "r" / "base_eval.json").read_text())
    assert record["column"] == "BASE"
    assert record["summary"] == {"CORE": 0.2, "bad": None}
    assert isinstance(record["time"], float)
    # no temp files left behind
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["base_eval.json", "base_eval.md"]


def test_write_section_keeps_an_existing_timestamp_and_adds_a_missing_title(tmp_path):
    md = "## Dataset\ntimestamp: 2020-01-01 00:00:00\n\n- shards: 3\n"
    text = write_section(tmp_path, "dataset", md).read_text()
    assert text == md
    assert not (tmp_path / "dataset.json").exists()
    text = write_section(tmp_path, "custom", "just text").read_text()
    assert text.splitlines()[0] == "## custom"
    assert "just text" in text


@pytest.mark.parametrize("key", ["../evil", "a/b", "", "header", "report", ".hidden"])
def test_write_section_refuses_unsafe_keys(tmp_path, key):
    with pytest.raises(ValueError, match="section key"):
        write_section(tmp_path, key, "## X")


def test_write_section_needs_a_known_column_with_a_summary(tmp_path):
    with pytest.raises(ValueError, match="column"):
        write_section(tmp_path, "chat_sft", "## X", summary={"MMLU": 0.3}, column="CHAT")
    with pytest.raises(ValueError, match="column"):
        write_section(tmp_path, "chat_sft", "## X", summary={"MMLU": 0.3})


def test_summary_table_keeps_column_and_metric_order_and_marks_missing():
    table = {
        "RL": {"GSM8K": 0.123456},
        "BASE": {"CORE": 0.2},
        "SFT": {"GSM8K": 0.1, "ARC-Easy": 0.45, "Custom": 1.0},
    }
    lines = summary_table(table).splitlines()
    assert lines[0] == "| Metric | BASE | SFT | RL |"
    assert lines[1] == "|---|---|---|---|"
    assert lines[2:] == [
        "| CORE | 0.2000 | - | - |",
        "| ARC-Easy | - | 0.4500 | - |",
        "| GSM8K | - | 0.1000 | 0.1235 |",
        "| Custom | - | 1.0000 | - |",
    ]
    with_mid = summary_table({"MID": {"MMLU": 0.3}, "BASE": {"CORE": 0.1}}).splitlines()
    assert with_mid[0] == "| Metric | BASE | MID |"
    assert summary_table({}) == ""
    assert summary_table({"SFT": {"MMLU": None}}) == ""


def test_build_report_orders_sections_and_summarises(tmp_path):
    write_header(tmp_path)
    write_section(tmp_path, "zeta", "## Zeta")
    write_section(tmp_path, "chat_eval_sft", "## Chat SFT", summary={"MMLU": 0.31, "ChatCORE": 0.05},
                  column="SFT")  # fmt: skip
    write_section(tmp_path, "base_eval", "## Base eval", summary={"CORE": 0.12}, column="BASE")
    write_section(tmp_path, "alpha", "## Alpha")
    write_section(tmp_path, "dataset", "## Dataset")
    write_section(tmp_path, "base_train", "## Base train")
    text = build_report(tmp_path)
    assert text.startswith("# nanochat training report")
    titles = [line for line in text.splitlines() if line.startswith("## ")]
    assert titles == ["## Environment", "## Dataset", "## Base train", "## Base eval",
                      "## Chat SFT", "## Alpha", "## Zeta", "## Summary"]  # fmt: skip
    assert "| Metric | BASE | SFT |" in text
    assert "| CORE | 0.1200 | - |" in text
    assert "| MMLU | - | 0.3100 |" in text
    assert "| ChatCORE | - | 0.0500 |" in text
    assert "Total wall clock time:" in text
    assert collect_summary(tmp_path) == {"BASE": {"CORE": 0.12},
                                         "SFT": {"MMLU": 0.31, "ChatCORE": 0.05}}  # fmt: skip


def test_wall_clock_runs_from_the_header_to_the_last_section(tmp_path):
    write_header(tmp_path)
    header = json.loads((tmp_path / "header.json").read_text())
    start = header["start_time"]
    write_section(tmp_path, "base_train", "## Base train", summary={}, column="BASE")
    write_section(tmp_path, "chat_sft", "## SFT", summary={}, column="SFT")
    for key, offset in (("base_train", 60), ("chat_sft", 3725)):
        path = tmp_path / f"{key}.json"
        record = json.loads(path.read_text())
        record["time"] = start + offset
        path.write_text(json.dumps(record))
    assert "Total wall clock time: 1h02m05s" in build_report(tmp_path)


def test_build_report_without_header_or_sections(tmp_path):
    text = build_report(tmp_path)
    assert "no header" in text
    assert "No summary metrics were recorded." in text
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_report(tmp_path / "missing")


def test_bad_summary_file_is_named(tmp_path):
    write_section(tmp_path, "base_eval", "## B", summary={"CORE": 0.1}, column="BASE")
    (tmp_path / "base_eval.json").write_text("{nope")
    with pytest.raises(ValueError, match="base_eval.json"):
        build_report(tmp_path)


def test_header_records_the_environment(tmp_path):
    path = write_header(tmp_path)
    text = path.read_text()
    for field in ("started:", "git commit:", "platform:", "CPUs:", "memory:", "GPUs:",
                  "Python:", "PyTorch:", "hourly cost"):  # fmt: skip
        assert field in text
    env = json.loads((tmp_path / "header.json").read_text())
    assert env["cpus"] >= 1 and env["python"] and env["torch"]
    assert isinstance(env["start_time"], float)


def test_header_tolerates_missing_git(tmp_path, monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert "- git commit: n/a" in write_header(tmp_path).read_text()


def test_hourly_cost():
    assert hourly_cost([]) is None
    h100 = {"name": "NVIDIA H100 80GB HBM3", "memory_bytes": 80 * 2**30}
    assert hourly_cost([h100] * 8) == pytest.approx(24.0)
    assert hourly_cost([{"name": "Mystery GPU", "memory_bytes": 1}]) is None
    md = report.header_markdown({"start": "now", "gpus": [h100] * 2, "hourly_cost_usd": 6.0})
    assert "2 x NVIDIA H100 80GB HBM3 (80 GiB)" in md
    assert "$6.00/h" in md


def test_reset_and_generate_commands(tmp_path, capsys):
    report_dir, run_dir = tmp_path / "report", tmp_path / "run"
    write_section(report_dir, "old_stage", "## Old")
    assert report.main(["reset", "--report-dir", str(report_dir)]) == 0
    assert sorted(p.name for p in report_dir.iterdir()) == ["header.json", "header.md"]
    write_section(report_dir, "base_eval", "## Base eval", summary={"CORE": 0.25}, column="BASE")
    capsys.readouterr()
    code = report.main(["generate", "--report-dir", str(report_dir), "--run-dir", str(run_dir)])
    assert code == 0
    out_path = report_dir / "report.md"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out_path)
    text = out_path.read_text()
    assert "## Base eval" in text and "| CORE | 0.2500 |" in text and "## Old" not in text
    events = read_events(run_dir)
    assert [e["type"] for e in events] == ["start", "report", "end"]
    assert events[1]["section"] == "Report" and events[1]["markdown"] == text
    assert events[2]["status"] == "succeeded"


def test_generate_on_a_missing_directory_fails_with_one_line(tmp_path, capsys):
    code = report.main(["generate", "--report-dir", str(tmp_path / "nope"), "--run-dir",
                        str(tmp_path / "run")])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: report directory {tmp_path / 'nope'} does not exist"]
    assert read_events(tmp_path / "run")[-1]["status"] == "failed"


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        report.main(["publish"])
    assert exc.value.code == 2
    assert "usage: python -m training.report" in capsys.readouterr().err


def test_stage_programs_write_their_sections(tiny_corpus, tmp_path, monkeypatch):
    from training import base_train, dataset, tok_eval

    data_dir, tokenizer_dir = tiny_corpus
    report_dir = tmp_path / "report"
    assert report.main(["reset", "--report-dir", str(report_dir)]) == 0
    assert dataset.main(["stats", str(data_dir), "--report-dir", str(report_dir)]) == 0
    # Offline: no GPT-2/GPT-4 columns, and no network attempt from the test.
    monkeypatch.setattr(tok_eval, "load_baselines", lambda: ({}, ["baselines skipped"]))
    assert tok_eval.main(["--tokenizer", str(tokenizer_dir), "--data-dir", str(data_dir),
                          "--report-dir", str(report_dir)]) == 0  # fmt: skip
    assert base_train.main(["--config", "tiny", "--data-dir", str(data_dir),
                            "--tokenizer-dir", str(tokenizer_dir), "--checkpoint-dir",
                            str(tmp_path / "ckpt"), "--num-iterations", "2", "--eval-every", "-1",
                            "--sample-every", "-1", "--report-dir", str(report_dir)]) == 0  # fmt: skip
    assert report.main(["generate", "--report-dir", str(report_dir)]) == 0
    text = (report_dir / "report.md").read_text()
    titles = [line for line in text.splitlines() if line.startswith("## ")]
    assert titles == ["## Environment", "## Dataset", "## Tokenizer evaluation",
                      "## Base model training", "## Summary"]  # fmt: skip
    assert text.count("timestamp:") == 3
