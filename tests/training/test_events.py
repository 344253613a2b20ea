"""The event file written by training programs and read by the web app."""

import json
import math

import torch

from training.events import EVENTS_FILE, EventWriter, read_events


def test_writer_appends_one_parseable_line_per_event(tmp_path):
    with EventWriter(tmp_path) as events:
        events.start({"depth": 2}, total_steps=20, world_size=1, device="cpu")
        events.metrics(1, {"train/loss": torch.tensor(2.5), "train/lr": 0.02})
        events.eval(1, {"val/bpb": 1.25})
        events.sample(1, "The capital of France is", " Paris")
        events.checkpoint(1, tmp_path / "ckpt", {"val_bpb": 1.25})
        events.eval_result("ARC-Easy", "accuracy", 0.5, {"n": 10})
        events.report("Base model training", "## Base\n- steps: 1")
        events.end("succeeded")
    lines = (tmp_path / EVENTS_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["type"] for r in records] == [
        "start", "metrics", "eval", "sample", "checkpoint", "eval_result", "report", "end",
    ]  # fmt: skip
    assert records[1]["values"] == {"train/loss": 2.5, "train/lr": 0.02}
    assert records[4]["path"] == str(tmp_path / "ckpt")
    assert all(isinstance(r["time"], float) for r in records)


def test_non_finite_numbers_are_written_as_null(tmp_path):
    with EventWriter(tmp_path) as events:
        events.metrics(3, {"train/loss": math.nan, "x": math.inf})
    (record,) = read_events(tmp_path / EVENTS_FILE).events
    assert record["values"] == {"train/loss": None, "x": None}


def test_only_rank_zero_or_a_run_dir_writes(tmp_path):
    EventWriter(tmp_path, rank=1).metrics(1, {"a": 1.0})
    EventWriter(None).metrics(1, {"a": 1.0})
    assert not (tmp_path / EVENTS_FILE).exists()


def test_reader_leaves_a_partial_line_for_later_and_reports_bad_lines(tmp_path):
    path = tmp_path / EVENTS_FILE
    path.write_text('{"type": "metrics", "step": 1}\nnot json\n[1, 2]\n{"type": "met')
    first = read_events(path)
    assert [e["step"] for e in first.events] == [1]
    assert first.bad_lines == ["not json", "[1, 2]"]
    with open(path, "a") as f:
        f.write('rics", "step": 2}\n')
    second = read_events(path, first.offset)
    assert [e["step"] for e in second.events] == [2]
    assert read_events(path, second.offset).events == []


def test_reader_of_a_missing_file_returns_nothing(tmp_path):
    result = read_events(tmp_path / "missing.jsonl", 5)
    assert result.events == [] and result.offset == 5


class RecordingSink:
    """A sink that keeps what it sees and stamps the start event, as the W&B sink does."""

    def __init__(self):
        self.seen, self.closed = [], False

    def observe(self, record):
        assert not self.closed
        self.seen.append(dict(record))
        return {"copy": {"where": "here"}} if record["type"] == "start" else None

    def close(self):
        self.closed = True


def test_sinks_see_every_event_as_written_and_may_stamp_the_start(tmp_path):
    sink = RecordingSink()
    with EventWriter(tmp_path, sinks=[sink]) as events:
        events.start({"depth": 2}, total_steps=2, world_size=1, device="cpu")
        events.metrics(1, {"train/loss": math.nan})
        events.end("succeeded")
    written = read_events(tmp_path / EVENTS_FILE).events
    assert written[0]["copy"] == {"where": "here"} and "copy" not in sink.seen[0]
    assert [r["type"] for r in sink.seen] == ["start", "metrics", "end"]
    assert sink.seen[1]["values"] == {"train/loss": None}  # JSON-ready, as in the file
    assert sink.seen[1:] == written[1:] and sink.closed
    # Without a run directory (a shell run) the sink still gets the events.
    shell = RecordingSink()
    with EventWriter(None, sinks=[shell]) as events:
        events.metrics(5, {"a": 1.0})
    assert [r["step"] for r in shell.seen] == [5] and shell.closed


class CancelledSink(RecordingSink):
    def observe(self, record):
        if record["type"] == "start":
            raise KeyboardInterrupt  # the cancel button, pressed while the sink worked
        return super().observe(record)


def test_a_cancel_inside_a_sink_still_writes_the_line(tmp_path):
    with EventWriter(tmp_path, sinks=[CancelledSink()]) as events:
        try:
            events.start({"depth": 2}, total_steps=2, world_size=1, device="cpu")
        except KeyboardInterrupt:
            events.end("cancelled", "interrupted")
    written = read_events(tmp_path / EVENTS_FILE).events
    assert [(r["type"], r.get("status")) for r in written] == [
        ("start", None),
        ("end", "cancelled"),
    ]
