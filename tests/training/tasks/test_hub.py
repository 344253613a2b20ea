"""The Hub downloader: retries, atomic files, split listing and the offline manifest."""

import io
import shutil
import socket
import urllib.error

import pytest

from training.tasks import hub


def test_default_cache_dir_is_under_the_data_home(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path))
    assert hub.default_cache_dir() == tmp_path.resolve() / "task_data"
    assert hub.resolve_cache_dir(None) == tmp_path.resolve() / "task_data"
    assert hub.resolve_cache_dir(tmp_path / "x") == tmp_path / "x"


def test_download_file_fetches_once_and_keeps_an_existing_file(tmp_path):
    source = tmp_path / "source.txt"
    source.write_text("first")
    dest = tmp_path / "cache" / "sub" / "file.txt"
    assert hub.download_file(source.as_uri(), dest) == dest
    assert dest.read_text() == "first"
    source.write_text("second")
    hub.download_file(source.as_uri(), dest)
    assert dest.read_text() == "first"


class FlakyOpener:
    """urlopen stand-in failing with `errors` (in order) before serving `body`."""

    def __init__(self, errors, body=b"payload"):
        self.errors, self.body, self.calls = list(errors), body, 0

    def __call__(self, url, timeout):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return io.BytesIO(self.body)


def test_transient_errors_are_retried(tmp_path, monkeypatch):
    opener = FlakyOpener([urllib.error.URLError(ConnectionResetError("reset")),
                          urllib.error.HTTPError("u", 503, "busy", {}, None)])  # fmt: skip
    monkeypatch.setattr(hub.urllib.request, "urlopen", opener)
    monkeypatch.setattr(hub, "BACKOFF_S", 0.0)
    dest = hub.download_file("https://example.invalid/f", tmp_path / "f")
    assert dest.read_bytes() == b"payload" and opener.calls == 3


def test_a_404_fails_at_once_with_one_line_naming_the_url(tmp_path, monkeypatch):
    opener = FlakyOpener([urllib.error.HTTPError("u", 404, "Not Found", {}, None)])
    monkeypatch.setattr(hub.urllib.request, "urlopen", opener)
    with pytest.raises(OSError, match=r"could not download https://example.invalid/f after 1 "
                                      r"attempt\(s\): HTTP Error 404") as info:  # fmt: skip
        hub.download_file("https://example.invalid/f", tmp_path / "f")
    assert "\n" not in str(info.value) and opener.calls == 1
    assert list(tmp_path.iterdir()) == []  # no temp file left behind


def test_offline_gives_up_after_the_retries(tmp_path, monkeypatch):
    offline = urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))
    opener = FlakyOpener([offline] * 10)
    monkeypatch.setattr(hub.urllib.request, "urlopen", opener)
    monkeypatch.setattr(hub, "BACKOFF_S", 0.0)
    with pytest.raises(OSError, match=r"after 5 attempt\(s\): .*name resolution.*offline\?"):
        hub.download_file("https://example.invalid/f", tmp_path / "f")
    assert opener.calls == hub.ATTEMPTS == 5


def test_a_rejected_body_is_never_renamed_into_place(tmp_path, fake_hub):
    source = tmp_path / "broken.parquet"
    source.write_bytes(b"not parquet at all")
    dest = tmp_path / "cache" / "broken.parquet"
    with pytest.raises(OSError, match="could not download"):
        hub.download_file(source.as_uri(), dest, check=hub._check_parquet, attempts=2)
    assert list(dest.parent.iterdir()) == []


def test_split_listing_filters_by_prefix_and_extension(fake_hub):
    rows = [{"x": 1}]
    fake_hub.add_parquet("o/r", "cfg/train-00001-of-00002.parquet", rows)
    fake_hub.add_parquet("o/r", "cfg/train-00000-of-00002.parquet", rows)
    fake_hub.add_parquet("o/r", "cfg/test-00000-of-00001.parquet", rows)
    assert hub.list_split_files("o/r", "cfg", "train-") == [
        "cfg/train-00000-of-00002.parquet", "cfg/train-00001-of-00002.parquet"]  # fmt: skip
    with pytest.raises(ValueError, match=r"no validation-\*\.parquet files in o/r/cfg"):
        hub.list_split_files("o/r", "cfg", "validation-")


def test_a_completed_split_loads_without_the_network(fake_hub, tmp_path):
    fake_hub.add_parquet("o/r", "cfg/test-00000-of-00001.parquet", [{"x": 1}, {"x": 2}])
    cache = tmp_path / "cache"
    assert hub.load_split("o/r", "cfg", "test-", cache) == [{"x": 1}, {"x": 2}]
    shutil.rmtree(fake_hub.root)  # "offline" from now on
    assert hub.load_split("o/r", "cfg", "test-", cache, columns=["x"]) == [{"x": 1}, {"x": 2}]
    with pytest.raises(OSError, match="could not download"):
        hub.load_split("o/r", "cfg", "train-", cache)


def test_an_unreadable_cached_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("junk")
    with pytest.raises(ValueError, match=rf"^{bad}: cannot read as parquet"):
        hub.read_parquet_rows([bad])
