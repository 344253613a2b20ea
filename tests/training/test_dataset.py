"""Parquet shards: the built-in corpus, reading and striding, stats, import, download, CLI."""

import functools
import http.server
import importlib.util
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training import dataset
from training.events import read_events

ROOT = Path(__file__).resolve().parents[2]
SMALL = 120_000  # characters: a couple of seconds to build


@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin")
    dataset.build_builtin_corpus(out, max_chars=SMALL, num_shards=3)
    return out


def _texts(path):
    return pq.read_table(path).column("text").to_pylist()


def test_builtin_corpus_is_zstd_parquet_in_small_row_groups(builtin_dir):
    shards = dataset.list_shards(builtin_dir)
    assert [p.name for p in shards] == ["shard_00000.parquet", "shard_00001.parquet",
                                        "shard_00002.parquet"]  # fmt: skip
    total = 0
    for path in shards:
        meta = pq.read_metadata(path)
        assert meta.schema.to_arrow_schema().names == ["text"]
        for rg in range(meta.num_row_groups):
            assert meta.row_group(rg).num_rows <= dataset.ROW_GROUP_SIZE
            assert meta.row_group(rg).column(0).compression == "ZSTD"
        texts = _texts(path)
        assert texts and all(isinstance(t, str) and t.strip() for t in texts)
        assert max(len(t) for t in texts) <= dataset.DOC_MAX_CHARS
        total += sum(len(t) for t in texts)
    # Filled up to the budget, short of it by less than one document.
    assert SMALL - dataset.DOC_MAX_CHARS < total <= SMALL
    assert not list(builtin_dir.glob(".*")), "temp files left behind"


def test_builtin_corpus_is_deterministic(builtin_dir, tmp_path):
    again = dataset.build_builtin_corpus(tmp_path / "again", max_chars=SMALL, num_shards=3)
    for path in again:
        assert path.read_bytes() == (builtin_dir / path.name).read_bytes()


def test_rendered_docs_never_copy_the_environment(monkeypatch):
    if importlib.util.find_spec("cgi") is None:
        pytest.skip("cgi (whose functions default to env=os.environ) left the stdlib in 3.13")
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2")
    ((name, texts),) = dataset.iter_stdlib_docs(["cgi"])
    text = "\n".join(texts)
    assert name == "cgi" and "parse_header(line)" in text
    assert "environ=os.environ" in text
    assert "hunter2" not in text and "NANOCHAT_TEST_SECRET" not in text


def test_modules_that_fail_to_import_are_skipped():
    results = list(dataset.iter_stdlib_docs(["no_such_module_here", "json"]))
    assert results[0] == ("no_such_module_here", [])
    assert results[1][0] == "json"
    assert any("JSONDecoder" in text for text in results[1][1])
    assert all(not text.startswith("Python Library Documentation") for text in results[1][1])


def test_train_is_all_but_the_last_shard_and_val_is_the_last(builtin_dir):
    shards = dataset.list_shards(builtin_dir)
    assert list(dataset.iter_texts(builtin_dir, "train")) == _texts(shards[0]) + _texts(shards[1])
    assert list(dataset.iter_texts(builtin_dir, "val")) == _texts(shards[2])


def test_a_single_shard_has_no_train_split(tmp_path):
    dataset.write_shard(tmp_path / "shard_00000.parquet", ["only"])
    with pytest.raises(ValueError, match="train split needs at least 2"):
        list(dataset.iter_texts(tmp_path, "train"))
    assert list(dataset.iter_texts(tmp_path, "val")) == ["only"]
    with pytest.raises(ValueError, match="split must be"):
        list(dataset.iter_texts(tmp_path, "test"))


def test_row_group_striding_partitions_each_shard(tmp_path):
    docs = [f"document {i}" for i in range(2 * 2500)]
    dataset.write_corpus(tmp_path, docs, num_shards=2)
    meta = pq.read_metadata(tmp_path / "shard_00000.parquet")
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [1024, 1024, 452]
    rank0 = list(dataset.iter_row_groups(tmp_path, "train", start=0, stride=2))
    rank1 = list(dataset.iter_row_groups(tmp_path, "train", start=1, stride=2))
    assert [(g.shard, g.row_group) for g in rank0] == [(0, 0), (0, 2)]
    assert [(g.shard, g.row_group) for g in rank1] == [(0, 1)]
    assert sorted(t for g in rank0 + rank1 for t in g.texts) == sorted(docs[:2500])
    (val,) = dataset.iter_row_groups(tmp_path, "val", start=1, stride=3)
    assert (val.shard, val.row_group, val.texts) == (1, 1, docs[2500 + 1024 : 2500 + 2048])
    with pytest.raises(ValueError, match="stride"):
        next(dataset.iter_row_groups(tmp_path, "train", start=2, stride=2))


def test_stats_count_what_is_on_disk(builtin_dir):
    stats = dataset.dataset_stats(builtin_dir)
    shards = dataset.list_shards(builtin_dir)
    texts = [t for p in shards for t in _texts(p)]
    assert stats.shards == len(shards)
    assert stats.documents == len(texts)
    assert stats.characters == sum(len(t) for t in texts)
    assert stats.bytes_on_disk == sum(p.stat().st_size for p in shards)
    assert stats.val_documents == len(_texts(shards[-1]))
    assert stats.val_characters == sum(len(t) for t in _texts(shards[-1]))


def test_characters_are_counted_as_characters_not_bytes(tmp_path):
    dataset.write_corpus(tmp_path, ["한국어", "é"], num_shards=2)
    assert dataset.dataset_stats(tmp_path).characters == 4


def test_write_corpus_refuses_a_used_directory_unless_overwriting(tmp_path):
    dataset.write_corpus(tmp_path, [str(i) for i in range(10)], num_shards=5)
    with pytest.raises(ValueError, match="already holds 5 parquet"):
        dataset.write_corpus(tmp_path, ["a", "b"], num_shards=2)
    dataset.write_corpus(tmp_path, ["a", "b", "c"], num_shards=2, overwrite=True)
    assert [_texts(p) for p in dataset.list_shards(tmp_path)] == [["a"], ["b", "c"]]
    with pytest.raises(ValueError, match="at least 2 documents"):
        dataset.write_corpus(tmp_path / "new", ["lonely"])


def test_a_failed_shard_write_leaves_nothing(tmp_path):
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        dataset.write_shard(tmp_path / "shard_00000.parquet", ["fine", 3])
    assert list(tmp_path.iterdir()) == []


def test_paragraph_grouping_caps_size_and_drops_repeats():
    seen: set[str] = set()
    para = "word " * 30
    text = "\n\n".join([para.strip()] * 3 + ["x" * 250, "tail"])
    docs = dataset.group_paragraphs(text, seen, max_chars=200)
    assert all(len(d) <= 200 for d in docs)
    assert "\n".join(docs).count("word word") == para.count("word word")  # repeats dropped
    assert "".join(docs).count("x") == 250  # an over-long line is cut, not lost
    assert dataset.group_paragraphs(para, seen, max_chars=200) == []


# ---- import -------------------------------------------------------------------------------


def test_import_reads_txt_jsonl_and_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("first file\n\nsecond paragraph\n", encoding="utf-8")
    # U+2028 may stand unescaped inside a JSON string; it must not split the line.
    (tmp_path / "b.jsonl").write_text(
        '{"text": "from jsonl"}\n\n{"text": "again\u2028still", "id": 2}\n', encoding="utf-8"
    )
    pq.write_table(pa.table({"text": ["from parquet", None, "  "], "n": [1, 2, 3]}),
                   tmp_path / "c.parquet")  # fmt: skip
    files = [tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.parquet"]
    assert list(dataset.read_documents(files)) == [
        "first file\n\nsecond paragraph\n", "from jsonl", "again\u2028still", "from parquet",
    ]  # fmt: skip
    assert list(dataset.read_documents(files[:1], split_paragraphs=True)) == [
        "first file", "second paragraph\n",
    ]  # fmt: skip
    # A directory stands for the supported files inside it, in name order.
    assert list(dataset.read_documents([tmp_path])) == list(dataset.read_documents(files))

    out = tmp_path / "shards"
    dataset.import_files(out, files, num_shards=2)
    imported = list(dataset.iter_texts(out, "train")) + list(dataset.iter_texts(out, "val"))
    assert sorted(imported) == sorted(dataset.read_documents(files))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl:2: invalid JSON"),
        ("bad.jsonl", '{"text": "ok"}\n\n{"body": "x"}\n', r"bad\.jsonl:3: .*'text' field"),
        ("bad.jsonl", '{"text": 7}\n', r"bad\.jsonl:1: 'text' must be a string, got int"),
        ("bad.jsonl", "[1, 2]\n", r"bad\.jsonl:1: expected a JSON object"),
        ("bad.csv", "text\nhello\n", r"bad\.csv: unsupported file type '\.csv'"),
    ],
)
def test_import_errors_name_the_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        list(dataset.read_documents([tmp_path / name]))


def test_import_errors_for_parquet_and_encoding(tmp_path):
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), tmp_path / "nocol.parquet")
    with pytest.raises(ValueError, match=r"nocol\.parquet: no 'text' column \(columns: body, id"):
        list(dataset.read_documents([tmp_path / "nocol.parquet"]))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(ValueError, match=r"ints\.parquet: the 'text' column holds int64"):
        list(dataset.read_documents([tmp_path / "ints.parquet"]))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not valid UTF-8 \(byte 3\)"):
        list(dataset.read_documents([tmp_path / "latin1.txt"]))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        list(dataset.read_documents([tmp_path / "missing.txt"]))


# ---- download from a local HTTP server ----------------------------------------------------


class _ShardHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory; paths listed in `server.failures` answer 500 that many times."""

    def do_GET(self):
        self.server.hits[self.path] += 1
        left = self.server.failures.get(self.path, 0)
        if left:
            self.server.failures[self.path] = left - 1
            self.send_error(500, "flaky")
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def shard_server(tmp_path, monkeypatch):
    remote = tmp_path / "remote"
    for i in range(4):
        dataset.write_shard(remote / f"shard_{i:05d}.parquet", [f"doc {i}.{j}" for j in range(5)])
    (remote / "shard_00005.parquet").write_bytes(b"this is not parquet")
    handler = functools.partial(_ShardHandler, directory=str(remote))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.hits = Counter()
    server.failures = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # A loopback server is refused unless the admin allow-list names it (training.fetch_policy).
    monkeypatch.setenv("NANOCHAT_FETCH_ALLOWED_HOSTS", f"127.0.0.1:{server.server_port}")
    yield server, remote, f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()


def test_download_retries_server_errors_then_skips_what_is_there(shard_server, tmp_path):
    server, remote, url = shard_server
    server.failures["/shard_00002.parquet"] = 2
    out = tmp_path / "data"
    results = dataset.download_shards(out, range(4), url, workers=2, attempts=3, backoff_s=0.01)
    assert [(r.name, r.status) for r in results] == [
        (f"shard_{i:05d}.parquet", "downloaded") for i in range(4)
    ]
    assert {r.name: r.attempts for r in results}["shard_00002.parquet"] == 3
    for i in range(4):
        name = f"shard_{i:05d}.parquet"
        assert (out / name).read_bytes() == (remote / name).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == [f"shard_{i:05d}.parquet" for i in range(4)]

    before = sum(server.hits.values())
    again = dataset.download_shards(out, range(4), url, attempts=3, backoff_s=0.01)
    assert {r.status for r in again} == {"skipped"}
    assert sum(server.hits.values()) == before


def test_download_reports_permanent_failures_and_keeps_the_rest(shard_server, tmp_path):
    server, _, url = shard_server
    server.failures["/shard_00001.parquet"] = 100
    out = tmp_path / "data"
    with pytest.raises(dataset.DownloadError) as info:
        dataset.download_shards(out, [0, 1, 5, 9], url, workers=3, attempts=3, backoff_s=0.01)
    failures = info.value.failures
    assert sorted(failures) == ["shard_00001.parquet", "shard_00005.parquet",
                                "shard_00009.parquet"]  # fmt: skip
    assert "500" in failures["shard_00001.parquet"]
    assert "404" in failures["shard_00009.parquet"]
    assert "parquet" in failures["shard_00005.parquet"].lower()  # a body that is not parquet
    assert "shard_00009.parquet" in str(info.value)
    assert server.hits["/shard_00001.parquet"] == 3  # every attempt used
    assert server.hits["/shard_00009.parquet"] == 1  # a 404 is not retried
    assert sorted(p.name for p in out.iterdir()) == ["shard_00000.parquet"]


# ---- command line -------------------------------------------------------------------------


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "training.dataset", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_cli_builtin_writes_shards_and_events(tmp_path):
    run_dir = tmp_path / "run"
    result = _run("builtin", "--out", tmp_path / "data", "--max-chars", "40000", "--shards", "2",
                  "--run-dir", run_dir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    events = read_events(run_dir / "events.jsonl").events
    assert [e["type"] for e in events] == ["start", "dataset", "report", "end"]
    assert events[0]["config"]["max_chars"] == 40000
    stats = dataset.dataset_stats(tmp_path / "data")
    assert events[1]["path"] == str(tmp_path / "data")
    assert events[1]["documents"] == stats.documents and events[1]["shards"] == 2
    report = events[2]
    assert report["section"] == "Dataset"
    assert f"- documents: {stats.documents:,}" in report["markdown"]
    assert f"- characters: {stats.characters:,}" in report["markdown"]
    assert "- shards: 2" in report["markdown"]
    assert events[3]["status"] == "succeeded"

    stats_run = _run("stats", tmp_path / "data")
    assert stats_run.returncode == 0, stats_run.stderr
    assert f"{stats.documents:,} documents" in stats_run.stdout


def test_cli_import_error_names_the_line_and_fails_the_run(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    result = _run("import", "--out", tmp_path / "data", bad, "--run-dir", tmp_path / "run")
    assert result.returncode == 1
    assert f"{bad}:2: invalid JSON" in result.stderr
    events = read_events(tmp_path / "run" / "events.jsonl").events
    assert events[-1]["type"] == "end" and events[-1]["status"] == "failed"
    assert "bad.jsonl:2" in events[-1]["error"]


def test_cli_download_against_local_server(shard_server, tmp_path):
    _, _, url = shard_server
    run_dir = tmp_path / "run"
    result = _run("download", "--out", tmp_path / "data", "--num-shards", "3", "--base-url", url,
                  "--workers", "2", "--run-dir", run_dir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    events = read_events(run_dir / "events.jsonl").events
    assert events[0]["total_steps"] == 3
    progress = [e["values"]["dataset/shards_done"] for e in events if e["type"] == "metrics"]
    assert progress == [1, 2, 3]
    assert "- shards: 3" in next(e for e in events if e["type"] == "report")["markdown"]
    assert events[-1]["status"] == "succeeded"
