"""Downloading the public task datasets once into a cache directory, and reading them back.

The "hub" source of each task reads the real dataset from the Hugging Face Hub: the parquet
files of one split, found by listing the dataset's folder through the Hub API (so any shard
count works) and fetched from `.../resolve/main/<path>`. Every file goes to a temp file beside
its destination and is renamed into place only when complete (and, for parquet, when its footer
reads), so an interrupted download is never mistaken for data. Once a split is complete, a
small manifest records its files and later loads need no network at all.

Offline with nothing cached, loading fails after the retries with one line naming the URL.
Tests point `HF_ENDPOINT` at a `file://` directory laid out like the Hub.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from engine.fileio import atomic_path, atomic_write
from engine.paths import data_home

HF_ENDPOINT = "https://huggingface.co"
ATTEMPTS = 5
BACKOFF_S = 2.0
TIMEOUT_S = 60.0
MANIFEST = "files.json"


def default_cache_dir() -> Path:
    """`<NANOCHAT_HOME>/task_data`: where downloaded task datasets are kept."""
    return data_home() / "task_data"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    return default_cache_dir() if cache_dir is None else Path(cache_dir)


def _is_retryable(exc: BaseException) -> bool:
    # Asking again will not make a 404 or a missing local file appear; a timeout, a reset
    # connection, throttling or a server error may go away.
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code in (408, 429)
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, FileNotFoundError):
        return False
    return not isinstance(exc, FileNotFoundError)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP Error {exc.code}: {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        # No answer from the server at all: most often no network.
        return f"{exc.reason} (offline? the 'builtin' task source needs no network)"
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _fetch(url: str, attempts: int, action: Callable[[], Any]) -> Any:
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:
            if attempt == attempts or not _is_retryable(exc):
                raise OSError(
                    f"could not download {url} after {attempt} attempt(s): {_describe(exc)}"
                ) from exc
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
    raise AssertionError("unreachable: the last attempt returns or raises")


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    *,
    check: Callable[[Path], None] | None = None,
    attempts: int | None = None,
) -> Path:
    """Fetch `url` into `dest` (kept as is when it exists) via a temp file and a rename.

    `check(tmp_path)` may raise to reject a body that arrived incomplete or wrong. Retries with
    exponential backoff; raises OSError with one line naming the URL when every attempt fails.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)

    def attempt() -> Path:
        with atomic_path(dest) as tmp:
            with open(tmp, "wb") as f, urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
            if check is not None:
                check(tmp)
        return dest

    return _fetch(url, attempts or ATTEMPTS, attempt)


def _check_parquet(path: Path) -> None:
    pq.ParquetFile(path).close()


def hf_file_url(repo: str, path: str) -> str:
    """Download URL of one file of a Hub dataset repository (main branch)."""
    return f"{HF_ENDPOINT}/datasets/{repo}/resolve/main/{urllib.parse.quote(path)}"


def hf_tree_url(repo: str, folder: str) -> str:
    """Hub API URL listing the files of one folder of a dataset repository."""
    return f"{HF_ENDPOINT}/api/datasets/{repo}/tree/main/{urllib.parse.quote(folder)}"


def list_split_files(repo: str, folder: str, prefix: str) -> list[str]:
    """Repository paths of `<folder>/<prefix>*.parquet` (one split's shards), sorted."""
    url = hf_tree_url(repo, folder)

    def attempt() -> Any:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
            return json.loads(resp.read())

    listing = _fetch(url, ATTEMPTS, attempt)
    if not isinstance(listing, list):
        raise ValueError(f"{url}: expected a JSON list of files, got {type(listing).__name__}")
    paths = sorted(
        entry["path"]
        for entry in listing
        if isinstance(entry, dict)
        and entry.get("type") == "file"
        and isinstance(entry.get("path"), str)
        and entry["path"].rsplit("/", 1)[-1].startswith(prefix)
        and entry["path"].endswith(".parquet")
    )
    if not paths:
        raise ValueError(f"{url}: no {prefix}*.parquet files in {repo}/{folder}")
    return paths


def fetch_split(
    repo: str, folder: str, prefix: str, cache_dir: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Local paths of one split's parquet files, downloading whatever is missing.

    Files go to `<cache_dir>/<repo>/<path>`; a manifest beside them lists a completed split,
    so later calls do not touch the network.
    """
    root = resolve_cache_dir(cache_dir) / repo
    manifest = root / folder / f"{prefix.rstrip('-_')}.{MANIFEST}"
    if manifest.is_file():
        paths = [root / p for p in json.loads(manifest.read_text())]
        if paths and all(p.is_file() for p in paths):
            return paths
    names = list_split_files(repo, folder, prefix)
    paths = [
        download_file(hf_file_url(repo, name), root / name, check=_check_parquet) for name in names
    ]
    manifest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(manifest, lambda f: f.write(json.dumps(names).encode()))
    return paths


def read_parquet_rows(paths: list[Path], columns: list[str] | None = None) -> list[dict[str, Any]]:
    """All rows of the given parquet files, in order, as dicts (only `columns` if given)."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        try:
            table = pq.read_table(path, columns=columns)
        except Exception as exc:
            raise ValueError(f"{path}: cannot read as parquet: {exc}") from exc
        rows.extend(table.to_pylist())
    return rows


def load_split(
    repo: str,
    folder: str,
    prefix: str,
    cache_dir: str | os.PathLike[str] | None = None,
    columns: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Rows of one Hub split (`fetch_split` then `read_parquet_rows`)."""
    return read_parquet_rows(fetch_split(repo, folder, prefix, cache_dir), columns)
