"""Reading settings from the environment."""

import pytest

from nanochat_site import env


@pytest.mark.parametrize("raw,expected", [("1", True), ("TRUE", True), ("on", True),
                                          ("0", False), ("no", False), ("", False)])  # fmt: skip
def test_flag_reads_booleans(monkeypatch, raw, expected):
    monkeypatch.setenv("SOME_FLAG", raw)
    assert env.flag("SOME_FLAG", default=not expected) is expected


def test_flag_default_and_typo(monkeypatch):
    monkeypatch.delenv("SOME_FLAG", raising=False)
    assert env.flag("SOME_FLAG", default=True) is True
    monkeypatch.setenv("SOME_FLAG", "flase")
    with pytest.raises(ValueError, match="SOME_FLAG='flase' is not a boolean"):
        env.flag("SOME_FLAG", default=False)


def test_csv_drops_blanks(monkeypatch):
    monkeypatch.setenv("HOSTS", " a.example , ,b.example,")
    assert env.csv("HOSTS", default="x") == ["a.example", "b.example"]
    monkeypatch.delenv("HOSTS")
    assert env.csv("HOSTS", default="x,y") == ["x", "y"]


def test_data_home_from_env_or_default(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path / "h"))
    assert env.data_home() == tmp_path / "h"
    monkeypatch.delenv("NANOCHAT_HOME")
    monkeypatch.delenv("NANOCHAT_BASE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert env.data_home() == tmp_path / ".cache" / "nanochat"


def test_secret_key_is_generated_once_and_kept_private(monkeypatch, tmp_path):
    monkeypatch.delenv("SECRET_KEY", raising=False)
    first = env.secret_key(tmp_path)
    assert len(first) >= 50
    assert env.secret_key(tmp_path) == first
    assert (tmp_path / "secret_key").stat().st_mode & 0o077 == 0
    assert list(tmp_path.iterdir()) == [tmp_path / "secret_key"]  # no temp file left
    monkeypatch.setenv("SECRET_KEY", "from-env")
    assert env.secret_key(tmp_path) == "from-env"
