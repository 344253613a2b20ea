"""Pretraining text as parquet shards: read, write, download, build offline, import.

A dataset is a directory of parquet files with one `text` column, written in row groups of
1024 documents with zstd compression and read in name order; the last shard is the
validation split. Row groups are the unit of reading: distributed ranks stride over the
split's row groups taken in shard order (`start`, `start + stride`, ...), so every rank sees
different documents without any coordination.

Three ways to get shards, each writing atomically (a temp file in the target directory, then
`os.replace`, so an interrupted run never leaves a half shard that a later reader would
trust), and a fourth command to count them:

- `download`: the public FineWeb-edu shuffle nanochat trained on, shard by shard by index,
  with retries and exponential backoff, skipping shards already present. `--base-url` may name
  another source, but only a public http(s) host or one an admin allow-listed
  (training.fetch_policy: a user's URL must not reach the server's own network or files).
- `builtin`: an offline corpus from the Python standard library's own documentation, rendered
  with `pydoc` in a child process (importing ~300 modules must not disturb this process, and a
  module that crashes on import only costs that module), the language reference topics that
  `help()` shows, and docstrings read from the source of GUI/IDE packages that are unsafe to
  import: about 3.3M characters in ~10-15 s on 2 cores. It is deterministic for a given Python
  installation: modules and documents are shuffled with a fixed seed, and memory addresses,
  hash-ordered sets and environment variables are kept out of the text.
- `import`: a user's own .txt, .jsonl and .parquet files.
- `stats`: documents, characters, shards and bytes of an existing directory.

Run as `python -m training.dataset {builtin,download,import,stats} ...`.
"""

from __future__ import annotations

import ast
import concurrent.futures
import contextlib
import importlib
import json
import math
import os
import pkgutil
import pydoc
import random
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from pydoc_data.topics import topics as LANGUAGE_TOPICS
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.fileio import atomic_path
from engine.paths import data_home
from training.events import EventWriter
from training.fetch_policy import FetchRefused, HostUnresolved, check_url, open_url
from training.flags import MAX_SEED, MAX_SHARDS, MAX_TOKENS, ConfigError, Flag, FlagSet
from training.program import USER_ERRORS, cancel_on_sigterm, run_program
from training.report import write_section

TEXT_COLUMN = "text"
ROW_GROUP_SIZE = 1024
SHARD_NAME = "shard_{index:05d}.parquet"

# nanochat's pretraining data: FineWeb-edu 100B tokens, pre-shuffled into 1823 shards of
# roughly 250M characters each.
FINEWEB_BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
FINEWEB_NUM_SHARDS = 1823

# Built-in corpus documents: paragraphs grouped up to this size, so each document is a
# readable page rather than a whole module reference or a lone line.
DOC_MAX_CHARS = 4000
DEFAULT_SEED = 42
DEFAULT_SHARDS = 8
# Above this many characters per shard an import gets more shards than asked for (nanochat's
# shards are ~250M characters, ~100 MB on disk).
MAX_SHARD_CHARS = 250_000_000

# Standard-library modules never imported for the built-in corpus: they open a browser or a
# window, print on import, or are test suites rather than documentation.
NEVER_IMPORT = frozenset({"antigravity", "this", "test", "idlelib", "tkinter", "turtle",
                          "turtledemo"})  # fmt: skip
# Of those, these are read from source (docstrings via `ast`, nothing executed).
SOURCE_ONLY = ("idlelib", "tkinter", "turtle", "turtledemo")
# `pydoc_data` holds the language reference's topics (what `help("FOR")` prints): ~0.5M
# characters of prose, used as text rather than rendered as a module.
LANGUAGE_REFERENCE = "pydoc_data"
# Sub-packages skipped when walking packages: tests, and ~100 near-identical codec modules.
SKIPPED_SUBMODULES = frozenset({"test", "tests", "idle_test"})
SKIPPED_WALKS = frozenset({"encodings"})
# pydoc sections that add no prose: boilerplate, install paths, module constants (`os.environ`
# is one: it would copy this machine's environment into the corpus).
DROPPED_SECTIONS = frozenset({"MODULE REFERENCE", "DATA", "FILE", "AUTHOR", "CREDITS"})

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# A default argument `env=os.environ` renders as the whole environment.
_ENVIRON = re.compile(r"environ\(\{.*?\}\)", re.DOTALL)
_SECTION = re.compile(r"^[A-Z][A-Z ]*[A-Z]$")
# pydoc draws class bodies with a " |  " gutter and separates member groups with a rule;
# both are layout, not text.
_GUTTER = re.compile(r"^[ |]+")
_RULE = re.compile(r"^\s*-{20,}$")


# ---- reading ------------------------------------------------------------------------------


def list_shards(data_dir: str | os.PathLike) -> list[Path]:
    """The dataset's parquet files in name order (temp files of unfinished writes excluded)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"dataset directory not found: {data_dir}")
    return sorted(p for p in data_dir.glob("*.parquet") if not p.name.startswith("."))


def split_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """Shards of one split: "train" is every shard but the last, "val" is the last."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    shards = list_shards(data_dir)
    needed = 2 if split == "train" else 1
    if len(shards) < needed:
        raise ValueError(
            f"{data_dir} has {len(shards)} parquet shard(s); the {split} split needs at least "
            f"{needed} (the last shard is the validation split, the others are train)"
        )
    return shards[:-1] if split == "train" else shards[-1:]


@dataclass(frozen=True)
class RowGroup:
    """One row group's documents and where they came from (for resumable readers)."""

    shard: int  # index among all the directory's sorted shards (the loader's pq_idx)
    row_group: int  # index within that shard
    texts: list[str]


def iter_row_groups(
    data_dir: str | os.PathLike, split: str = "train", start: int = 0, stride: int = 1
) -> Iterator[RowGroup]:
    """Row groups `start, start + stride, ...` of a split's row groups in shard order (one pass).

    The same striding as the pretraining loader: rank r of w ranks passes start=r, stride=w.
    """
    if stride < 1 or not 0 <= start < stride:
        raise ValueError(f"need stride >= 1 and 0 <= start < stride, got {start=} {stride=}")
    shards = split_shards(data_dir, split)
    first = 0 if split == "train" else len(list_shards(data_dir)) - 1
    groups = [
        (first + offset, path, rg)
        for offset, path in enumerate(shards)
        for rg in range(pq.read_metadata(path).num_row_groups)
    ]
    for shard, path, rg in groups[start::stride]:
        with pq.ParquetFile(path) as parquet:
            table = parquet.read_row_group(rg, columns=[TEXT_COLUMN])
        yield RowGroup(shard, rg, table.column(TEXT_COLUMN).to_pylist())


def iter_texts(
    data_dir: str | os.PathLike, split: str = "train", start: int = 0, stride: int = 1
) -> Iterator[str]:
    """Documents of a split in order (one pass); see `iter_row_groups` for start/stride."""
    for group in iter_row_groups(data_dir, split, start, stride):
        yield from group.texts


@dataclass(frozen=True)
class DatasetStats:
    shards: int
    documents: int
    characters: int
    bytes_on_disk: int
    val_documents: int
    val_characters: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def dataset_stats(data_dir: str | os.PathLike) -> DatasetStats:
    """Count documents and characters (reads the text column; shards may be large)."""
    shards = list_shards(data_dir)
    documents = characters = size = 0
    val_documents = val_characters = 0
    for index, path in enumerate(shards):
        parquet = pq.ParquetFile(path)
        docs = parquet.metadata.num_rows
        chars = 0
        for rg in range(parquet.num_row_groups):
            column = parquet.read_row_group(rg, columns=[TEXT_COLUMN]).column(TEXT_COLUMN)
            chars += pc.sum(pc.utf8_length(column)).as_py() or 0
        documents += docs
        characters += chars
        size += path.stat().st_size
        if index == len(shards) - 1:
            val_documents, val_characters = docs, chars
    return DatasetStats(len(shards), documents, characters, size, val_documents, val_characters)


# ---- writing ------------------------------------------------------------------------------


def write_shard(path: str | os.PathLike, texts: Sequence[str]) -> Path:
    """Write one shard atomically: row groups of 1024 documents, zstd."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({TEXT_COLUMN: pa.array(texts, type=pa.string())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE, compression="zstd")
    return path


def write_corpus(
    out_dir: str | os.PathLike,
    documents: Sequence[str],
    num_shards: int = DEFAULT_SHARDS,
    overwrite: bool = False,
) -> list[Path]:
    """Split documents in order into `num_shards` shards of (nearly) equal document counts.

    The last shard becomes the validation split, so at least 2 documents are required; with
    fewer documents than shards, fewer shards are written. Refuses a directory that already
    holds parquet files unless `overwrite`, which deletes them first (leftover shards of an
    earlier, larger build would otherwise join the dataset).
    """
    if num_shards < 2:
        raise ValueError(f"num_shards must be at least 2 (train + val), got {num_shards}")
    if len(documents) < 2:
        raise ValueError(
            f"need at least 2 documents to write a train and a val shard, got {len(documents)}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = list_shards(out_dir)
    if existing and not overwrite:
        raise ValueError(
            f"{out_dir} already holds {len(existing)} parquet file(s); choose an empty "
            f"directory or pass overwrite"
        )
    for path in existing:
        path.unlink()
    num_shards = min(num_shards, len(documents))
    bounds = [i * len(documents) // num_shards for i in range(num_shards + 1)]
    return [
        write_shard(out_dir / SHARD_NAME.format(index=i), documents[bounds[i] : bounds[i + 1]])
        for i in range(num_shards)
    ]


# ---- download -----------------------------------------------------------------------------


class DownloadError(RuntimeError):
    """Some shards could not be downloaded; `failures` maps file name to the last error."""

    def __init__(self, failures: dict[str, str]):
        self.failures = dict(failures)
        lines = "\n".join(f"  {name}: {error}" for name, error in sorted(self.failures.items()))
        super().__init__(f"{len(self.failures)} shard(s) failed to download:\n{lines}")


@dataclass(frozen=True)
class ShardDownload:
    name: str
    status: str  # "downloaded" or "skipped" (already present)
    attempts: int
    bytes: int


def _is_retryable(exc: BaseException) -> bool:
    # A 404 or 403 will not change by asking again; server errors and throttling may. Nor will
    # a refused address (one that resolves differently next time is checked again anyway).
    if isinstance(exc, FetchRefused):
        return False
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code in (408, 429)
    return True


def download_shard(
    url: str, dest: str | os.PathLike, attempts: int = 5, backoff_s: float = 2.0,
    timeout_s: float = 60.0,
) -> ShardDownload:  # fmt: skip
    """Fetch one shard into a temp file next to `dest`, check it is parquet, then rename.

    Waits `backoff_s * 2**k` seconds before retry k+1. An existing `dest` is kept untouched.
    Raises the last error when every attempt failed (at once for 4xx other than 408/429, and
    for FetchRefused: only public http(s) hosts or allow-listed ones, see training.fetch_policy).
    """
    dest = Path(dest)
    if dest.exists():
        return ShardDownload(dest.name, "skipped", 0, dest.stat().st_size)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        try:
            with atomic_path(dest) as tmp:
                with open(tmp, "wb") as f, open_url(url, timeout_s) as resp:
                    while chunk := resp.read(1 << 20):
                        f.write(chunk)
                # Reading the footer catches a truncated body the server reported as complete.
                pq.ParquetFile(tmp).close()
            return ShardDownload(dest.name, "downloaded", attempt, dest.stat().st_size)
        except Exception as exc:
            if attempt == attempts or not _is_retryable(exc):
                raise
            time.sleep(backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable: the last attempt returns or raises")


def download_shards(
    out_dir: str | os.PathLike,
    indices: Iterable[int],
    base_url: str = FINEWEB_BASE_URL,
    workers: int = 4,
    attempts: int = 5,
    backoff_s: float = 2.0,
    timeout_s: float = 60.0,
    on_done: Callable[[ShardDownload], None] | None = None,
) -> list[ShardDownload]:
    """Download `shard_{index:05d}.parquet` for each index from `base_url`, `workers` at once.

    Every shard is attempted even when some fail; failures are then raised together as a
    DownloadError (the shards that did arrive stay on disk, so a rerun fetches only the rest).
    `on_done` is called (in the calling thread) after each successful shard.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    try:  # one clear error for a refused source rather than one per shard
        check_url(base_url)
    except HostUnresolved:
        pass  # perhaps a passing DNS failure: each shard's fetch retries and checks again
    except FetchRefused as exc:
        raise FetchRefused(f"base_url {base_url}: {exc}") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [SHARD_NAME.format(index=i) for i in indices]

    def fetch(name: str) -> ShardDownload:
        url = f"{base_url.rstrip('/')}/{name}"
        return download_shard(url, out_dir / name, attempts, backoff_s, timeout_s)

    results, failures = [], {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(fetch, name): name for name in names}
        for future in concurrent.futures.as_completed(futures):
            try:
                result = future.result()
            except Exception as exc:
                failures[futures[future]] = f"{type(exc).__name__}: {exc}"
                continue
            results.append(result)
            if on_done is not None:
                on_done(result)
    if failures:
        raise DownloadError(failures)
    return sorted(results, key=lambda r: r.name)


# ---- the built-in offline corpus ----------------------------------------------------------


def stdlib_corpus_sources() -> list[str]:
    """Top-level standard-library modules the built-in corpus reads, in a fixed order."""
    names = {n for n in sys.stdlib_module_names if not n.startswith("_")}
    return sorted((names - NEVER_IMPORT) | set(SOURCE_ONLY))


def _clean_pydoc(text: str) -> str:
    """Drop the title line, prose-free sections and class gutters; remove memory addresses."""
    kept: list[str] = []
    keep = True
    for line in text.splitlines()[1:]:  # line 0: "Python Library Documentation: ..."
        if _SECTION.match(line):
            keep = line not in DROPPED_SECTIONS
        if keep and not _RULE.match(line):
            line = _GUTTER.sub(lambda m: m.group(0).replace("|", " "), line)
            kept.append(_ADDRESS.sub("", line).rstrip())
    return _ENVIRON.sub("os.environ", "\n".join(kept).strip())


def _walk_modules(name: str) -> Iterator[str]:
    """`name` and its public submodules, depth first in name order (imports packages)."""
    yield name
    module = importlib.import_module(name)
    if not hasattr(module, "__path__") or name in SKIPPED_WALKS:
        return
    for info in pkgutil.iter_modules(module.__path__, name + "."):
        last = info.name.rsplit(".", 1)[1]
        if last.startswith("_") or last in SKIPPED_SUBMODULES:
            continue
        if info.ispkg:
            with contextlib.suppress(Exception):
                yield from _walk_modules(info.name)
        else:
            yield info.name


def _render_module_docs(name: str) -> list[str]:
    texts = []
    for module_name in _walk_modules(name):
        try:
            module = importlib.import_module(module_name)
            texts.append(_clean_pydoc(pydoc.render_doc(module, renderer=pydoc.plaintext)))
        except Exception:  # platform-only modules (winreg, msvcrt, ...) and odd ones
            continue
    return texts


def _source_docstrings(name: str) -> list[str]:
    """Docstrings of a module or package read with `ast`: its code is never run."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [root / f"{name}.py"] if (root / f"{name}.py").is_file() else []
    if (root / name).is_dir():
        files = sorted((root / name).rglob("*.py"))
    texts = []
    for path in files:
        parts = path.relative_to(root).with_suffix("").parts
        if any(p in SKIPPED_SUBMODULES for p in parts):
            continue
        module_name = ".".join(p for p in parts if p != "__init__")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        entries = [f"{module_name}\n\n{ast.get_docstring(tree) or ''}".strip()]
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            if isinstance(node, ast.ClassDef):
                header = f"class {node.name}"
            else:
                header = f"def {node.name}({ast.unparse(node.args)})"
            entries.append(f"{header}\n    " + doc.replace("\n", "\n    "))
        texts.append("\n\n".join(entries))
    return texts


def _docs_worker(names: Sequence[str]) -> None:
    """Child process: print one JSON line per module, announced before it is imported.

    Stray prints of the modules themselves go to stderr (fd 1 is pointed there), so the
    protocol stream stays clean; a crash is seen by the parent as the last `begin` with no
    result.
    """
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    warnings.simplefilter("ignore")
    for name in names:
        protocol.write(json.dumps({"begin": name}) + "\n")
        protocol.flush()
        if name in SOURCE_ONLY:
            texts = _source_docstrings(name)
        elif name == LANGUAGE_REFERENCE:
            texts = [LANGUAGE_TOPICS[key] for key in sorted(LANGUAGE_TOPICS)]
        else:
            try:
                texts = _render_module_docs(name)
            except BaseException:  # a SystemExit on import is a failed module too
                texts = []
        # A docstring may hold a lone surrogate, which parquet (UTF-8) cannot store.
        texts = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]
        protocol.write(json.dumps({"module": name, "texts": texts}) + "\n")
        protocol.flush()


def iter_stdlib_docs(names: Sequence[str]) -> Iterator[tuple[str, list[str]]]:
    """(module, texts) for each name in order, rendered in a child process.

    If the child dies on a module, that module yields no texts and a new child carries on
    with the next. Stopping the iteration early stops the child. The child gets an almost
    empty environment (rendered defaults such as `env=os.environ` must not copy this
    machine's variables, secrets included, into a corpus), PYTHONHASHSEED=0 so sets print in
    the same order every time, and no working directory on sys.path so no local file can
    shadow a stdlib module.
    """
    root = str(Path(__file__).resolve().parents[1])
    code = (
        "import sys; sys.path.append(sys.argv[1]); "
        "from training.dataset import _docs_worker; _docs_worker(sys.argv[2:])"
    )
    env = {"PATH": os.defpath, "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8"}
    pending = list(names)
    with tempfile.TemporaryDirectory() as scratch:
        while pending:
            proc = subprocess.Popen(
                [sys.executable, "-P", "-c", code, root, *pending],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                cwd=scratch, env=env, text=True, encoding="utf-8",
            )  # fmt: skip
            done = 0
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    record = json.loads(line)
                    if "module" in record:
                        done += 1
                        yield record["module"], record["texts"]
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            if done < len(pending):  # the child died on pending[done]
                yield pending[done], []
                done += 1
            pending = pending[done:]


def _paragraphs(text: str) -> list[str]:
    paragraphs, current = [], []
    for line in text.splitlines():
        if not line.strip():
            if current:
                paragraphs.append("\n".join(current))
                current = []
        else:
            current.append(line)
    if current:
        paragraphs.append("\n".join(current))
    return paragraphs


def _chunks(paragraph: str, limit: int) -> Iterator[str]:
    """A paragraph longer than `limit` cut at line boundaries (a single long line is cut)."""
    current = ""
    for line in paragraph.split("\n"):
        while len(line) > limit:
            if current:
                yield current
                current = ""
            yield line[:limit]
            line = line[limit:]
        if current and len(current) + 1 + len(line) > limit:
            yield current
            current = ""
        current = f"{current}\n{line}" if current else line
    if current:
        yield current


def group_paragraphs(
    text: str, seen: set[str] | None = None, max_chars: int = DOC_MAX_CHARS
) -> list[str]:
    """Split `text` into documents of whole paragraphs, each at most `max_chars`.

    Paragraphs already in `seen` are dropped (and new ones added): pydoc repeats inherited
    method docs in every subclass, which would otherwise fill the corpus with copies.
    """
    documents, current = [], ""
    for paragraph in _paragraphs(text):
        if seen is not None:
            key = "\n".join(line.strip() for line in paragraph.split("\n"))
            if key in seen:
                continue
            seen.add(key)
        for piece in _chunks(paragraph, max_chars):
            if current and len(current) + 2 + len(piece) > max_chars:
                documents.append(current)
                current = ""
            current = f"{current}\n\n{piece}" if current else piece
    if current:
        documents.append(current)
    return documents


def _stdlib_documents(names: Sequence[str]) -> Iterator[str]:
    seen: set[str] = set()
    with contextlib.closing(iter_stdlib_docs(names)) as stream:
        for _, texts in stream:
            for text in texts:
                yield from group_paragraphs(text, seen)


def builtin_documents(max_chars: int | None = None, seed: int = DEFAULT_SEED) -> list[str]:
    """The built-in corpus as a shuffled list of documents, at most `max_chars` in total.

    Modules are visited in a seeded random order, so a small corpus still spans many topics.
    """
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be positive (or None for everything), got {max_chars}")
    rng = random.Random(seed)
    names = stdlib_corpus_sources()
    rng.shuffle(names)
    documents: list[str] = []
    total = 0
    # Closing the stream early (budget reached) stops the rendering child process.
    with contextlib.closing(_stdlib_documents(names)) as stream:
        for document in stream:
            if max_chars is not None and total + len(document) > max_chars:
                break
            documents.append(document)
            total += len(document)
    rng.shuffle(documents)
    return documents


def build_builtin_corpus(
    out_dir: str | os.PathLike,
    max_chars: int | None = None,
    num_shards: int = DEFAULT_SHARDS,
    seed: int = DEFAULT_SEED,
    overwrite: bool = False,
) -> list[Path]:
    """Write the built-in corpus as `num_shards` shards (the last one is validation)."""
    return write_corpus(out_dir, builtin_documents(max_chars, seed), num_shards, overwrite)


# ---- import of a user's files -------------------------------------------------------------

IMPORT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not valid UTF-8 (byte {exc.start}): {exc.reason}") from None


def _txt_documents(path: Path, split_paragraphs: bool) -> Iterator[str]:
    text = _read_utf8(path)
    if split_paragraphs:
        yield from re.split(r"\n[ \t]*\n", text)
    else:
        yield text


def _jsonl_documents(path: Path) -> Iterator[str]:
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends unescaped.
    for lineno, line in enumerate(_read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
        if not isinstance(record, dict) or "text" not in record:
            raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'text' field")
        if not isinstance(record["text"], str):
            raise ValueError(
                f"{path}:{lineno}: 'text' must be a string, got {type(record['text']).__name__}"
            )
        yield record["text"]


def _parquet_documents(path: Path) -> Iterator[str]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path}: not a readable parquet file: {exc}") from None
    schema = parquet.schema_arrow
    if TEXT_COLUMN not in schema.names:
        raise ValueError(
            f"{path}: no '{TEXT_COLUMN}' column (columns: {', '.join(schema.names) or 'none'})"
        )
    kind = schema.field(TEXT_COLUMN).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: the '{TEXT_COLUMN}' column holds {kind}, not strings")
    for rg in range(parquet.num_row_groups):
        column = parquet.read_row_group(rg, columns=[TEXT_COLUMN]).column(TEXT_COLUMN)
        yield from (text for text in column.to_pylist() if text is not None)


def import_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files to import: the given files, and the supported files inside given directories."""
    files = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(
                sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in IMPORT_SUFFIXES)
            )
        elif not path.exists():
            raise FileNotFoundError(f"no such file: {path}")
        elif path.suffix not in IMPORT_SUFFIXES:
            raise ValueError(
                f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
                f"expected one of {', '.join(IMPORT_SUFFIXES)}"
            )
        else:
            files.append(path)
    if not files:
        raise ValueError("no .txt, .jsonl or .parquet files to import")
    return files


def read_documents(
    paths: Iterable[str | os.PathLike], split_paragraphs: bool = False
) -> Iterator[str]:
    """Documents from .txt (one per file, or per blank-line paragraph), .jsonl and .parquet.

    Whitespace-only documents are dropped.
    """
    for path in import_paths(paths):
        if path.suffix == ".txt":
            documents = _txt_documents(path, split_paragraphs)
        elif path.suffix == ".jsonl":
            documents = _jsonl_documents(path)
        else:
            documents = _parquet_documents(path)
        yield from (d for d in documents if d.strip())


def import_files(
    out_dir: str | os.PathLike,
    paths: Iterable[str | os.PathLike],
    num_shards: int | None = None,
    split_paragraphs: bool = False,
    shuffle: bool = True,
    seed: int = DEFAULT_SEED,
    overwrite: bool = False,
) -> list[Path]:
    """Import files into shards; documents are held in memory, then written.

    Shuffled by default so the validation shard is a fair sample rather than the last file.
    `num_shards` defaults to 8, raised so no shard exceeds ~250M characters.
    """
    documents = list(read_documents(paths, split_paragraphs))
    if shuffle:
        random.Random(seed).shuffle(documents)
    if num_shards is None:
        total = sum(len(d) for d in documents)
        num_shards = max(DEFAULT_SHARDS, math.ceil(total / MAX_SHARD_CHARS))
    return write_corpus(out_dir, documents, num_shards, overwrite)


# ---- command line -------------------------------------------------------------------------

_OUT = Flag("out", str, None, "output directory (default: <data home>/base_data)", path=True)
_RUN_DIR = Flag("run_dir", str, None, "write events.jsonl here", path=True)
_REPORT_DIR = Flag(
    "report_dir", str, "", "append this stage's section to a report in this directory", path=True
)
_OVERWRITE = Flag("overwrite", bool, False, "replace parquet files already in --out")
_SEED = Flag("seed", int, DEFAULT_SEED, "shuffle seed", min=0, max=MAX_SEED)

COMMANDS: dict[str, FlagSet] = {
    "builtin": FlagSet(
        "dataset_builtin",
        [
            _OUT,
            Flag(
                "max_chars",
                int,
                -1,
                "stop at this many characters (-1: everything)",
                min=-1,
                max=MAX_TOKENS,
            ),
            Flag(
                "shards",
                int,
                DEFAULT_SHARDS,
                "number of shards (the last is val)",
                min=2,
                max=MAX_SHARDS,
            ),
            _SEED,
            _OVERWRITE,
            _RUN_DIR,
            _REPORT_DIR,
        ],
        "Build the offline corpus from the Python standard library's documentation.",
    ),
    "download": FlagSet(
        "dataset_download",
        [
            _OUT,
            Flag("num_shards", int, 8, "shards 0..N-1 to fetch (-1: all)", min=-1, max=MAX_SHARDS),
            Flag("base_url", str, FINEWEB_BASE_URL, "where shard_XXXXX.parquet files live"),
            Flag(
                "total_shards",
                int,
                FINEWEB_NUM_SHARDS,
                "shards the source has",
                min=1,
                max=MAX_SHARDS,
            ),
            Flag("workers", int, 4, "parallel downloads", min=1, max=64),
            Flag("attempts", int, 5, "tries per shard", min=1, max=20),
            Flag("backoff", float, 2.0, "seconds before the first retry (doubles)", min=0, max=600),
            _RUN_DIR,
            _REPORT_DIR,
        ],
        "Download the public pretraining shards (FineWeb-edu shuffle by default).",
    ),
    "import": FlagSet(
        "dataset_import",
        [
            _OUT,
            Flag(
                "shards",
                int,
                -1,
                "number of shards (-1: 8, more for big inputs)",
                min=-1,
                max=MAX_SHARDS,
            ),
            Flag("split_paragraphs", bool, False, ".txt: one document per blank-line paragraph"),
            Flag("shuffle", bool, True, "shuffle documents before sharding"),
            _SEED,
            _OVERWRITE,
            _RUN_DIR,
            _REPORT_DIR,
        ],
        "Import .txt / .jsonl / .parquet files (and directories of them) into shards.",
    ),
    "stats": FlagSet(
        "dataset_stats", [_RUN_DIR, _REPORT_DIR], "Count documents, characters and bytes."
    ),
}
# Positional arguments (not settings a preset could hold): name, nargs, help.
_POSITIONALS = {
    "import": ("files", "+", "files or directories to import"),
    "stats": ("data_dir", None, "dataset directory"),
}


def parse_command(argv: Sequence[str]) -> tuple[str, dict[str, Any], Any]:
    """(command, validated config, positional value) from `argv`; exits on a usage error."""
    if not argv or argv[0] not in COMMANDS:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        lines = [f"usage: python -m training.dataset {{{','.join(COMMANDS)}}} [options]", ""]
        lines += [f"  {name:<9} {flags.description}" for name, flags in COMMANDS.items()]
        print("\n".join(lines), file=sys.stdout if asked else sys.stderr)
        raise SystemExit(0 if asked else 2)
    command, flagset = argv[0], COMMANDS[argv[0]]
    parser = flagset.parser()
    parser.prog = f"python -m training.dataset {command}"
    positional = _POSITIONALS.get(command)
    if positional:
        parser.add_argument(positional[0], nargs=positional[1], help=positional[2])
    given = vars(parser.parse_args(list(argv[1:])))
    value = given.pop(positional[0]) if positional else None
    preset = given.pop("config", None)
    try:
        config = flagset.load_config_file(preset) if preset else {}
        config.update(flagset.validate(given, partial=True))
        return command, flagset.validate(config), value
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def stats_markdown(data_dir: Path, stats: DatasetStats, source: str) -> str:
    return "\n".join(
        [
            "## Dataset",
            f"timestamp: {time.strftime('%Y-%m-%d %H:%M:%S')}",
            "",
            f"- source: {source}",
            f"- directory: {data_dir}",
            f"- shards: {stats.shards} (last = validation)",
            f"- documents: {stats.documents:,}",
            f"- characters: {stats.characters:,}",
            f"- validation documents: {stats.val_documents:,}",
            f"- validation characters: {stats.val_characters:,}",
            f"- bytes on disk: {stats.bytes_on_disk:,}",
        ]
    )


def _download_indices(config: dict[str, Any]) -> range:
    count = config["total_shards"] if config["num_shards"] < 0 else config["num_shards"]
    return range(min(count, config["total_shards"]))


def _run(command: str, config: dict[str, Any], positional: Any, events: EventWriter) -> None:
    out = Path(config["out"]) if config.get("out") else data_home() / "base_data"
    if command == "builtin":
        max_chars = None if config["max_chars"] < 0 else config["max_chars"]
        print(f"building the built-in corpus into {out} ...", flush=True)
        build_builtin_corpus(out, max_chars, config["shards"], config["seed"], config["overwrite"])
        source = "built-in (Python standard library documentation)"
    elif command == "download":
        indices = _download_indices(config)
        done: list[ShardDownload] = []

        def report(result: ShardDownload) -> None:
            done.append(result)
            print(f"[{len(done)}/{len(indices)}] {result.name} {result.status} "
                  f"({result.bytes / 1e6:.1f} MB)", flush=True)  # fmt: skip
            events.metrics(len(done), {"dataset/shards_done": len(done)})

        print(f"downloading {len(indices)} shard(s) from {config['base_url']} into {out}")
        download_shards(
            out, indices, config["base_url"], config["workers"], config["attempts"],
            config["backoff"], on_done=report,
        )  # fmt: skip
        source = config["base_url"]
    elif command == "import":
        shards = None if config["shards"] < 0 else config["shards"]
        files = import_paths(positional)
        print(f"importing {len(files)} file(s) into {out} ...", flush=True)
        import_files(
            out, files, shards, config["split_paragraphs"], config["shuffle"], config["seed"],
            config["overwrite"],
        )  # fmt: skip
        source = f"import of {len(files)} file(s)"
    else:
        out = Path(positional)
        source = "existing directory"
    stats = dataset_stats(out)
    print(
        f"{out}: {stats.shards} shards, {stats.documents:,} documents, "
        f"{stats.characters:,} characters, {stats.bytes_on_disk / 1e6:.1f} MB on disk"
    )
    events.emit("dataset", path=str(out), source=source, **stats.to_dict())
    markdown = stats_markdown(out, stats, source)
    events.report("Dataset", markdown)
    write_section(config["report_dir"], "dataset", markdown)


def main(argv: Sequence[str] | None = None) -> int:
    command, config, positional = parse_command(sys.argv[1:] if argv is None else argv)
    total_steps = len(_download_indices(config)) if command == "download" else 0
    with EventWriter(config["run_dir"]) as events:
        events.start(
            {"command": command, **config, "inputs": positional}, total_steps=total_steps,
            world_size=1, device="cpu", program="dataset",
        )  # fmt: skip
        started = time.time()

        def body() -> None:
            _run(command, config, positional, events)
            print(f"done in {time.time() - started:.1f}s")

        return run_program(events, body, user_errors=(*USER_ERRORS, DownloadError))


if __name__ == "__main__":
    cancel_on_sigterm()
    sys.exit(main())
