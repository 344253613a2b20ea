"""Data loaders: text shards to packed token rows (pretraining), conversations to masked rows (SFT).

Pretraining (`pretrain_batches`) reads the parquet shards of a data directory (one `text`
column; sorted by file name; the last shard is the validation split, the others are train).
The split's row groups, taken in shard order, form one list; rank `r` of `w` reads entries
`r, r+w, r+2w, ...` of it and loops over them forever, counting epochs from 1. Striding over the
whole split rather than within each shard lets small corpora whose shards hold a single row
group (the built-in one) still feed several ranks. The validation split loops
too: an evaluator takes a fixed number of batches from a fresh loader, which is deterministic,
and no rank can run dry before the others (a finite split would let a rank with fewer row
groups stop early and hang the others in their all-reduce).

Documents are tokenized `TOKENIZE_BATCH` at a time (chunks of a row group counted from its
first document) with BOS prepended and wait in a buffer: whenever it holds fewer than
`buffer_docs`, the next whole chunk joins it (so it holds up to `buffer_docs + TOKENIZE_BATCH -
1`). This is nanochat's refill rule, kept exactly so that on the same shards and tokenizer both
projects train and evaluate on identical rows (`training.compare_reference` relies on it). A
row of `T + 1` tokens is filled by best fit: repeatedly place the longest buffered document
that fits entirely in the space left; when none fits, crop the shortest one to fill the row
exactly and discard the rest of it (as nanochat does: the remainder would start mid-document,
without its BOS). Every row therefore starts at a document
boundary with BOS and has no padding; the price is the cropped-off tokens. Rows become
`inputs = row[:-1]` and `targets = row[1:]`, int64 of shape (B, T).

The buffer is kept as a list of (length, arrival) keys sorted with `bisect`, so each placement
is two binary searches, not a scan; a row is assembled with `list.extend` and a batch becomes a
numpy array in one call. Tokenization (tiktoken, threaded) is the dominant cost.

Resuming. Each batch comes with a JSON-serializable `state` from which a new loader continues
with exactly the batch the uninterrupted loader would have produced next. What comes next
depends only on where reading stands and on which documents wait in the buffer (rows never
carry anything across batches), so the state records exactly that:

    pq_idx, rg_idx, doc_idx, epoch   the next document to read: shard (index among all sorted
                                     shards of the directory), row group, row in it, and pass
    buffer                           the waiting documents, in arrival order, as
                                     [[pq_idx, rg_idx, [row, row, ...]], ...]
    rank, world_size                 whose state it is (each rank has its own)

A resumed loader re-reads the row groups those documents come from and re-tokenizes just them,
then continues reading from `doc_idx`; nothing is replayed. The state holds about `buffer_docs`
small integers (a few KB as JSON at the default 1000). Every rank's state differs: save all of
them (e.g. gathered into the checkpoint meta, or one per rank next to the optimizer state).

SFT (`sft_batches`) renders conversations with the tokenizer's chat format (truncated to
`T + 1` tokens, so each fits an empty row) and packs them by the same best fit, except that a
conversation never gets cropped: when none of the buffered ones fits the space left, the row is
padded. Targets are -1 on padding and wherever the render mask is 0 (prompts, tool outputs),
so only the assistant's own tokens are trained on; padded inputs hold BOS, which no target sees.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from engine.tokenizer import Tokenizer

TEXT_COLUMN = "text"
SPLITS = ("train", "val")

# Enough documents per call for tiktoken's threads to share out, few enough that a whole row
# group's tokens (a million Python ints for 1024 web documents) never sit in memory at once.
TOKENIZE_BATCH = 128

_STATE_KEYS = ("pq_idx", "rg_idx", "doc_idx", "epoch", "buffer", "rank", "world_size")


# ---- pretraining ---------------------------------------------------------------------------


def pretrain_batches(
    data_dir: str | Path,
    tokenizer: Tokenizer,
    B: int,
    T: int,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    resume_state: Mapping[str, Any] | None = None,
    tokenizer_threads: int = 4,
    buffer_docs: int = 1000,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
    """Endless `(inputs, targets, state)` batches of best-fit packed documents (see module doc).

    `resume_state` is a `state` from an earlier loader with the same data, split, rank and
    world size; the first batch is then the one that loader would have yielded next. Arguments
    are checked here, before the first batch is asked for.
    """
    _check_positive(B=B, T=T, tokenizer_threads=tokenizer_threads, buffer_docs=buffer_docs)
    _check_rank(rank, world_size)
    shards = _split_shards(data_dir, split)
    mine = _rank_row_groups(shards, rank, world_size)
    if not mine:
        total = sum(len(shard.rows) for shard in shards)
        raise ValueError(
            f"rank {rank} of {world_size} gets no row groups: the {split} split of {data_dir} "
            f"has {total} row group(s) in {len(shards)} shard(s); use fewer ranks or more data"
        )
    if resume_state is None:
        position, waiting = (1, mine[0][0].index, mine[0][1], 0), []
    else:
        position, waiting = _checked_state(resume_state, shards, rank, world_size)
    return _pretrain_stream(
        shards, tokenizer, B, T, rank, world_size, torch.device(device), position, waiting,
        tokenizer_threads, buffer_docs,
    )  # fmt: skip


@dataclass(frozen=True)
class _Shard:
    index: int  # position among all sorted shards of the directory: the state's pq_idx
    path: Path
    rows: tuple[int, ...]  # documents per row group


def _rank_row_groups(shards: list[_Shard], rank: int, world_size: int) -> list[tuple[_Shard, int]]:
    """This rank's (shard, row group) pairs: every world_size-th of the split's row groups."""
    every = [(shard, rg) for shard in shards for rg in range(len(shard.rows))]
    return every[rank::world_size]


def _split_shards(data_dir: str | Path, split: str) -> list[_Shard]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    directory = Path(data_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"data directory not found: {directory}")
    # Hidden files are skipped: a shard being downloaded lives in a temp file until renamed.
    paths = sorted(p for p in directory.glob("*.parquet") if not p.name.startswith("."))
    needed = 1 if split == "val" else 2
    if len(paths) < needed:
        raise ValueError(
            f"{directory} has {len(paths)} parquet shard(s); the {split} split needs at least "
            f"{needed} (the last shard is the validation split, the others are train)"
        )
    chosen = [len(paths) - 1] if split == "val" else range(len(paths) - 1)
    shards = []
    for index in chosen:
        meta = pq.read_metadata(paths[index])
        schema = meta.schema.to_arrow_schema()
        field = schema.field(TEXT_COLUMN) if TEXT_COLUMN in schema.names else None
        if field is None or not _is_string_type(field.type):
            raise ValueError(
                f"{paths[index]} needs a string column {TEXT_COLUMN!r}; its schema is: {schema}"
            )
        rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        shards.append(_Shard(index, paths[index], rows))
    return shards


def _read_texts(parquet: pq.ParquetFile, shard: _Shard, rg_idx: int) -> list[str]:
    column = parquet.read_row_group(rg_idx, columns=[TEXT_COLUMN]).column(TEXT_COLUMN)
    if column.null_count:
        raise ValueError(
            f"{shard.path} row group {rg_idx} has {column.null_count} null {TEXT_COLUMN!r} values"
        )
    return column.to_pylist()


def _document_chunks(
    shards: list[_Shard],
    position: tuple[int, int, int, int],
    rank: int,
    world_size: int,
    tokenizer: Tokenizer,
    threads: int,
) -> Iterator[list[tuple[tuple[int, int, int, int], list[int]]]]:
    """This rank's documents from `position` = (epoch, pq_idx, rg_idx, doc_idx) on, forever.

    Yields them a tokenizer call at a time (up to `TOKENIZE_BATCH` documents of one row group,
    from `doc_idx` on) as lists of (the document's own position, its tokens with BOS first).
    """
    epoch, pq_idx, rg_idx, doc_idx = position
    bos = tokenizer.get_bos_token_id()
    mine = _rank_row_groups(shards, rank, world_size)
    first = [(shard.index, rg) for shard, rg in mine].index((pq_idx, rg_idx))
    parquet, opened = None, None
    try:
        while True:
            for shard, rg in mine[first:]:
                if opened is not shard:
                    if parquet is not None:
                        parquet.close()
                    parquet, opened = pq.ParquetFile(shard.path), shard
                texts = _read_texts(parquet, shard, rg)
                for start in range(doc_idx, len(texts), TOKENIZE_BATCH):
                    chunk = texts[start : start + TOKENIZE_BATCH]
                    encoded = tokenizer.encode(chunk, prepend=bos, num_threads=threads)
                    yield [
                        ((epoch, shard.index, rg, start + offset), ids)
                        for offset, ids in enumerate(encoded)
                    ]
                doc_idx = 0
            first = 0
            epoch += 1
    finally:
        if parquet is not None:
            parquet.close()


def _pretrain_stream(
    shards: list[_Shard],
    tokenizer: Tokenizer,
    B: int,
    T: int,
    rank: int,
    world_size: int,
    device: torch.device,
    position: tuple[int, int, int, int],
    waiting: list[tuple[int, int, int]],
    threads: int,
    buffer_docs: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
    buffer = _BestFitBuffer()
    for tag, ids in zip(
        waiting, _tokenize_waiting(shards, waiting, tokenizer, threads), strict=True
    ):
        buffer.add(ids, len(ids), tag)
    chunks = _document_chunks(shards, position, rank, world_size, tokenizer, threads)
    next_position = position
    row_len = T + 1

    while True:
        flat: list[int] = []
        for _ in range(B):
            space = row_len
            while space:
                while len(buffer) < buffer_docs:
                    for (epoch, pq_idx, rg_idx, doc_idx), ids in next(chunks):
                        buffer.add(ids, len(ids), (pq_idx, rg_idx, doc_idx))
                        next_position = (epoch, pq_idx, rg_idx, doc_idx + 1)
                ids = buffer.pop_longest_fitting(space)
                if ids is None:
                    ids = buffer.pop_shortest()[:space]
                flat.extend(ids)
                space -= len(ids)
        rows = np.array(flat, dtype=np.int64).reshape(B, row_len)
        inputs, targets = _to_device(rows[:, :-1], rows[:, 1:], device)
        yield inputs, targets, _state(next_position, buffer.tags(), rank, world_size)


def _state(
    position: tuple[int, int, int, int],
    tags: list[tuple[int, int, int]],
    rank: int,
    world_size: int,
) -> dict[str, Any]:
    epoch, pq_idx, rg_idx, doc_idx = position
    groups: list[list[Any]] = []
    for tag_pq, tag_rg, tag_doc in tags:
        # Only the order of the list matters, so consecutive documents of one row group share
        # an entry even when they were read in different epochs.
        if groups and groups[-1][0] == tag_pq and groups[-1][1] == tag_rg:
            groups[-1][2].append(tag_doc)
        else:
            groups.append([tag_pq, tag_rg, [tag_doc]])
    return {
        "pq_idx": pq_idx,
        "rg_idx": rg_idx,
        "doc_idx": doc_idx,
        "epoch": epoch,
        "buffer": groups,
        "rank": rank,
        "world_size": world_size,
    }


def _checked_state(
    state: Mapping[str, Any], shards: list[_Shard], rank: int, world_size: int
) -> tuple[tuple[int, int, int, int], list[tuple[int, int, int]]]:
    """Validate a resume state against the data; return (position, waiting documents)."""
    if not isinstance(state, Mapping):
        raise ValueError(f"resume_state must be a dict, got {type(state).__name__}")
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing:
        raise ValueError(f"resume_state lacks {missing}; it needs all of {list(_STATE_KEYS)}")
    for key in _STATE_KEYS:
        if key != "buffer" and not _is_int(state[key]):
            raise ValueError(f"resume_state[{key!r}] must be an int, got {state[key]!r}")
    if (state["rank"], state["world_size"]) != (rank, world_size):
        raise ValueError(
            f"resume_state belongs to rank {state['rank']} of {state['world_size']}, "
            f"not rank {rank} of {world_size}: each rank resumes from its own state"
        )
    if state["epoch"] < 1:
        raise ValueError(f"resume_state['epoch'] counts from 1, got {state['epoch']}")
    by_index = {shard.index: shard for shard in shards}
    mine = {(shard.index, rg) for shard, rg in _rank_row_groups(shards, rank, world_size)}

    def check_place(pq_idx: Any, rg_idx: Any, what: str) -> _Shard:
        if not _is_int(pq_idx) or pq_idx not in by_index:
            raise ValueError(
                f"resume_state {what}: pq_idx {pq_idx!r} is not a shard of this split "
                f"(its shards are {sorted(by_index)}): was the data directory changed?"
            )
        if not _is_int(rg_idx) or (pq_idx, rg_idx) not in mine:
            raise ValueError(
                f"resume_state {what}: rg_idx {rg_idx!r} is not a row group of rank {rank} "
                f"of {world_size}"
            )
        return by_index[pq_idx]

    shard = check_place(state["pq_idx"], state["rg_idx"], "position")
    rows = shard.rows[state["rg_idx"]] if state["rg_idx"] < len(shard.rows) else 0
    if not 0 <= state["doc_idx"] <= rows:
        raise ValueError(
            f"resume_state doc_idx {state['doc_idx']} is outside row group {state['rg_idx']} of "
            f"{shard.path} ({rows} documents)"
        )
    buffer = state["buffer"]
    if not isinstance(buffer, list):
        raise ValueError(f"resume_state['buffer'] must be a list, got {type(buffer).__name__}")
    waiting = []
    for entry in buffer:
        if not (isinstance(entry, list | tuple) and len(entry) == 3 and isinstance(entry[2], list)):
            raise ValueError(
                f"resume_state buffer entries are [pq_idx, rg_idx, [doc, ...]], got {entry!r}"
            )
        pq_idx, rg_idx, docs = entry
        entry_shard = check_place(pq_idx, rg_idx, "buffer")
        rows = entry_shard.rows[rg_idx] if rg_idx < len(entry_shard.rows) else 0
        for doc in docs:
            if not _is_int(doc) or not 0 <= doc < rows:
                raise ValueError(
                    f"resume_state buffer: document {doc!r} is outside row group {rg_idx} of "
                    f"{entry_shard.path} ({rows} documents)"
                )
            waiting.append((pq_idx, rg_idx, doc))
    position = (state["epoch"], state["pq_idx"], state["rg_idx"], state["doc_idx"])
    return position, waiting


def _tokenize_waiting(
    shards: list[_Shard],
    waiting: list[tuple[int, int, int]],
    tokenizer: Tokenizer,
    threads: int,
) -> list[list[int]]:
    """Tokens of the documents a resume state says were waiting, in the same order."""
    by_index = {shard.index: shard for shard in shards}
    texts_of: dict[tuple[int, int], list[str]] = {}
    texts = []
    for pq_idx, rg_idx, doc in waiting:
        if (pq_idx, rg_idx) not in texts_of:
            shard = by_index[pq_idx]
            with pq.ParquetFile(shard.path) as parquet:
                texts_of[pq_idx, rg_idx] = _read_texts(parquet, shard, rg_idx)
        texts.append(texts_of[pq_idx, rg_idx][doc])
    if not texts:
        return []
    bos = tokenizer.get_bos_token_id()
    return tokenizer.encode(texts, prepend=bos, num_threads=threads)


# ---- SFT -----------------------------------------------------------------------------------


def sft_batches(
    conversations: Iterable[dict[str, Any]],
    tokenizer: Tokenizer,
    B: int,
    T: int,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    buffer_size: int = 100,
    num_epochs: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
    """`(inputs, targets, progress)` batches of best-fit packed, masked conversations.

    `conversations` is a sequence (anything with `len` and indexing, such as a list or a task)
    or an iterable of conversation dicts; rank `r` of `w` takes those at positions
    `r, r+w, ...`. `num_epochs=None` loops forever (sequences and re-iterable iterables only);
    otherwise the stream ends after that many passes, its last batch possibly holding rows of
    pure padding. A one-shot iterator can only be read once: pass `num_epochs=1`.

    `progress` is `{"consumed": conversations of this rank placed in rows so far, "epochs":
    consumed / this rank's share of one pass (None when the length is unknown), "last": True
    on the final batch of a finite stream}`. Ranks can need different numbers of batches for
    the same pass, so a distributed trainer must agree on when to stop (a fixed step count, or
    an all-reduce of `epochs` / `last`).
    """
    _check_positive(B=B, T=T, buffer_size=buffer_size)
    _check_rank(rank, world_size)
    if num_epochs is not None:
        _check_positive(num_epochs=num_epochs)
    passes, share = _conversation_passes(conversations, rank, world_size, num_epochs)
    return _sft_stream(passes, share, tokenizer, B, T, torch.device(device), buffer_size)


def _conversation_passes(
    conversations: Iterable[dict[str, Any]], rank: int, world_size: int, num_epochs: int | None
) -> tuple[Callable[[], Iterator[tuple[int, dict[str, Any]]]], int | None]:
    """A function giving this rank's (index, conversation) pairs, pass after pass."""
    if isinstance(conversations, Mapping):
        raise ValueError("conversations must be a collection of conversation dicts, not one dict")
    epochs = itertools.count() if num_epochs is None else range(num_epochs)
    if hasattr(conversations, "__len__") and hasattr(conversations, "__getitem__"):
        n = len(conversations)
        share = len(range(rank, n, world_size))
        if share == 0:
            raise ValueError(f"rank {rank} of {world_size} gets none of the {n} conversations")

        def indexed() -> Iterator[tuple[int, dict[str, Any]]]:
            for _ in epochs:
                for index in range(rank, n, world_size):
                    yield index, conversations[index]

        return indexed, share
    if isinstance(conversations, Iterator):
        if num_epochs != 1:
            raise ValueError(
                "a one-shot iterator of conversations can be read only once: pass "
                "num_epochs=1, or a list / task to loop over"
            )
        return lambda: _rank_slice(enumerate(conversations), rank, world_size), None
    if not isinstance(conversations, Iterable):
        raise ValueError(f"conversations must be iterable, got {type(conversations).__name__}")

    def repeated() -> Iterator[tuple[int, dict[str, Any]]]:
        for _ in epochs:
            empty = True
            for item in _rank_slice(enumerate(conversations), rank, world_size):
                empty = False
                yield item
            if empty:
                raise ValueError(f"rank {rank} of {world_size} got no conversations in a pass")

    if hasattr(conversations, "__len__"):
        return repeated, len(range(rank, len(conversations), world_size))
    return repeated, None


def _rank_slice(
    items: Iterator[tuple[int, dict[str, Any]]], rank: int, world_size: int
) -> Iterator[tuple[int, dict[str, Any]]]:
    return ((index, item) for index, item in items if index % world_size == rank)


def _sft_stream(
    passes: Callable[[], Iterator[tuple[int, dict[str, Any]]]],
    share: int | None,
    tokenizer: Tokenizer,
    B: int,
    T: int,
    device: torch.device,
    buffer_size: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
    row_len = T + 1
    bos = tokenizer.get_bos_token_id()
    source = passes()
    buffer = _BestFitBuffer()
    exhausted = False
    consumed = 0

    def refill() -> None:
        nonlocal exhausted
        while not exhausted and len(buffer) < buffer_size:
            item = next(source, None)
            if item is None:
                exhausted = True
                return
            index, conversation = item
            try:
                ids, mask = tokenizer.render_conversation(conversation, max_tokens=row_len)
            except ValueError as exc:
                raise ValueError(f"conversation {index}: {exc}") from exc
            buffer.add((ids, mask), len(ids))

    while True:
        consumed_before = consumed
        flat_ids: list[int] = []
        flat_mask: list[int] = []
        for _ in range(B):
            space = row_len
            while True:
                refill()
                item = buffer.pop_longest_fitting(space)
                if item is None:
                    break
                flat_ids.extend(item[0])
                flat_mask.extend(item[1])
                space -= len(item[0])
                consumed += 1
            flat_ids.extend([bos] * space)
            flat_mask.extend([0] * space)
        if consumed == consumed_before:
            return  # the source is exhausted and the buffer empty: no batch of pure padding
        refill()
        ids = np.array(flat_ids, dtype=np.int64).reshape(B, row_len)
        mask = np.array(flat_mask, dtype=np.bool_).reshape(B, row_len)
        targets = np.where(mask[:, 1:], ids[:, 1:], -1)
        inputs, targets = _to_device(ids[:, :-1], targets, device)
        progress = {
            "consumed": consumed,
            "epochs": None if share is None else consumed / share,
            "last": exhausted and not len(buffer),
        }
        yield inputs, targets, progress


# ---- shared --------------------------------------------------------------------------------


class _BestFitBuffer:
    """Items waiting to be placed, indexed by (length, arrival) for binary-search lookups.

    Among equally long candidates the earliest arrival is taken, so the order of placement is
    a pure function of what arrived and when: the property exact resumption rests on.
    """

    def __init__(self) -> None:
        self._keys: list[tuple[int, int]] = []  # (length, arrival), sorted
        self._items: dict[int, tuple[Any, Any]] = {}  # arrival -> (item, tag), in arrival order
        self._arrivals = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: Any, length: int, tag: Any = None) -> None:
        bisect.insort(self._keys, (length, self._arrivals))
        self._items[self._arrivals] = (item, tag)
        self._arrivals += 1

    def pop_longest_fitting(self, space: int) -> Any | None:
        """The longest item of length <= space (earliest among equals), or None."""
        end = bisect.bisect_right(self._keys, (space, math.inf))
        if end == 0:
            return None
        longest = self._keys[end - 1][0]
        return self._pop(bisect.bisect_left(self._keys, (longest, -1)))

    def pop_shortest(self) -> Any:
        return self._pop(0)

    def tags(self) -> list[Any]:
        """Tags of the waiting items, in arrival order."""
        return [tag for _, tag in self._items.values()]

    def _pop(self, position: int) -> Any:
        _, arrival = self._keys.pop(position)
        return self._items.pop(arrival)[0]


def _to_device(
    inputs: np.ndarray, targets: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 tensors on `device`, each contiguous; one pinned, asynchronous transfer on CUDA.

    Rows are built as numpy arrays: converting a list of ints and slicing off the shifted
    inputs/targets is several times faster there than through `torch.tensor`.
    """
    if device.type != "cuda":
        return (
            torch.from_numpy(np.ascontiguousarray(inputs)).to(device),
            torch.from_numpy(np.ascontiguousarray(targets)).to(device),
        )
    # A fresh pinned tensor per batch: the caching host allocator keeps it alive until the
    # asynchronous copy is done, so the next batch can never overwrite data still in flight.
    staging = torch.empty((2, *inputs.shape), dtype=torch.int64, pin_memory=True)
    staging_np = staging.numpy()
    staging_np[0] = inputs
    staging_np[1] = targets
    on_device = staging.to(device, non_blocking=True)
    return on_device[0], on_device[1]


def _is_string_type(kind: pa.DataType) -> bool:
    return (
        pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_rank(rank: int, world_size: int) -> None:
    _check_positive(world_size=world_size)
    if not _is_int(rank) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
