"""Pretraining and SFT data loaders (training/dataloader.py), on small shards written here."""

import itertools
import json
import random
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from engine.tokenizer import Tokenizer
from training import dataloader
from training.dataloader import pretrain_batches, sft_batches

WORDS = [
    "the", "a", "of", "to", "and", "in", "is", "was", "for", "on", "that", "with", "as", "by",
    "at", "from", "it", "an", "be", "this", "are", "or", "which", "river", "mountain", "cloud",
    "engine", "garden", "library", "window", "lantern", "harbor", "meadow", "signal", "copper",
    "quietly", "rapidly", "under", "over", "between", "beyond", "during", "because", "although",
    "whenever", "seven", "eleven",
]  # fmt: skip

# Documents per shard: the last shard is validation. Row groups of 8 leave a short last group,
# and the shards have different numbers of row groups (5, 3, 4 | 3).
SHARD_SIZES = (37, 20, 29, 21)
TRAIN = range(len(SHARD_SIZES) - 1)
ROW_GROUP = 8
B, T = 2, 32
T_SFT = 64  # conversations are longer than documents: room for two or three a row


def _text(rng: random.Random, tag: str, n_words: int) -> str:
    # The fixed-width tag makes every text unique, and no document's tokens a prefix of another's.
    return tag + " " + " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


def _shard_texts() -> list[list[str]]:
    rng = random.Random(1234)
    shards, doc = [], 0
    for size in SHARD_SIZES:
        texts = []
        for _ in range(size):
            # Mostly short documents, some much longer than a row (T + 1 tokens): those get cropped.
            n_words = rng.choice([rng.randint(2, 12)] * 6 + [rng.randint(13, 30)] * 3 + [70])
            texts.append(_text(rng, f"doc{doc:04d}", n_words))
            doc += 1
        shards.append(texts)
    return shards


@pytest.fixture(scope="module")
def shard_texts() -> list[list[str]]:
    return _shard_texts()


@pytest.fixture(scope="module")
def tok(shard_texts) -> Tokenizer:
    texts = [text for shard in shard_texts for text in shard] + [" ".join(WORDS)] * 50
    return Tokenizer.train(texts, vocab_size=400)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shard_texts):
    directory = tmp_path_factory.mktemp("shards")
    for index, texts in enumerate(shard_texts):
        table = pa.table({"text": texts})
        path = directory / f"shard_{index:05d}.parquet"
        pq.write_table(table, path, row_group_size=ROW_GROUP, compression="zstd")
    return directory


def _doc_tokens(tok: Tokenizer, shard_texts) -> dict[tuple[int, int, int], list[int]]:
    """(shard, row group, row) -> the document's tokens with BOS first."""
    out = {}
    for pq_idx, texts in enumerate(shard_texts):
        encoded = tok.encode(texts, prepend=tok.get_bos_token_id())
        for i, ids in enumerate(encoded):
            out[pq_idx, i // ROW_GROUP, i % ROW_GROUP] = ids
    return out


def _reading_order(shard_texts, shards, rank, world) -> list[tuple[int, int, int]]:
    """The documents a rank should read in one pass, in order.

    The split's row groups in shard order form one list; rank r takes every world-th from r.
    """
    groups = [
        (pq_idx, rg) for pq_idx in shards for rg in range(-(-len(shard_texts[pq_idx]) // ROW_GROUP))
    ]
    order = []
    for pq_idx, rg in groups[rank::world]:
        n = len(shard_texts[pq_idx])
        order += [(pq_idx, rg, d) for d in range(min(ROW_GROUP, n - rg * ROW_GROUP))]
    return order


def _rows(inputs: torch.Tensor, targets: torch.Tensor) -> list[list[int]]:
    return torch.cat([inputs, targets[:, -1:]], dim=1).tolist()


def _pieces(row: list[int], bos: int) -> list[list[int]]:
    """Split a packed row at its BOS tokens: one piece per document (text never encodes BOS)."""
    starts = [i for i, token in enumerate(row) if token == bos]
    return [row[a:b] for a, b in itertools.pairwise([*starts, len(row)])]


def _buffered(state) -> Counter:
    return Counter((pq_idx, rg, d) for pq_idx, rg, docs in state["buffer"] for d in docs)


def _take(loader, n):
    return list(itertools.islice(loader, n))


# ---- pretraining ---------------------------------------------------------------------------


def test_rows_start_with_bos_and_targets_are_inputs_shifted(data_dir, tok):
    bos = tok.get_bos_token_id()
    for inputs, targets, _ in _take(pretrain_batches(data_dir, tok, B, T, buffer_docs=8), 20):
        assert inputs.shape == targets.shape == (B, T)
        assert inputs.dtype == targets.dtype == torch.int64
        assert inputs.device.type == "cpu" and inputs.is_contiguous() and targets.is_contiguous()
        assert (inputs[:, 0] == bos).all()
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        assert ((targets >= 0) & (targets < tok.vocab_size)).all()


@pytest.mark.parametrize(("buffer_docs", "tokenize_batch"), [(8, 128), (30, 128), (8, 3)])
def test_packing_is_best_fit_as_the_plain_rule_states(
    data_dir, tok, shard_texts, buffer_docs, tokenize_batch, monkeypatch
):
    """Compare with the rule written as plainly as possible: scans over a list in arrival order.

    While fewer than `buffer_docs` wait, the next tokenizer chunk (up to TOKENIZE_BATCH
    documents of one row group, counted from its first) joins the buffer whole. Then the
    longest document that fits, else the shortest one cropped; `max`/`min` return the first of
    equals, i.e. the earliest arrival, which is the loader's tie-break too.
    """
    monkeypatch.setattr(dataloader, "TOKENIZE_BATCH", tokenize_batch)
    tokens = _doc_tokens(tok, shard_texts)
    order = _reading_order(shard_texts, range(len(SHARD_SIZES) - 1), 0, 1)
    chunks = [
        [tokens[doc] for doc in docs]
        for _, group in itertools.groupby(order, key=lambda doc: doc[:2])
        for _, docs in itertools.groupby(group, key=lambda doc: doc[2] // tokenize_batch)
    ]
    assert tokenize_batch > ROW_GROUP or len(chunks) > len({doc[:2] for doc in order})
    incoming = itertools.cycle(chunks)
    buffer: list[list[int]] = []
    loader = pretrain_batches(data_dir, tok, B, T, buffer_docs=buffer_docs)
    for inputs, targets, _ in _take(loader, 60):
        for row in _rows(inputs, targets):
            expected: list[int] = []
            while len(expected) < T + 1:
                while len(buffer) < buffer_docs:
                    buffer += next(incoming)
                space = T + 1 - len(expected)
                fitting = [i for i, doc in enumerate(buffer) if len(doc) <= space]
                if fitting:
                    expected += buffer.pop(max(fitting, key=lambda i: len(buffer[i])))
                else:
                    expected += buffer.pop(min(range(len(buffer)), key=lambda i: len(buffer[i])))[
                        :space
                    ]
            assert row == expected


@pytest.mark.parametrize(("rank", "world"), [(0, 1), (1, 2)])
def test_every_token_is_a_source_document_whole_or_cropped_at_the_row_end(
    data_dir, tok, shard_texts, rank, world
):
    """Account for every document a rank reads, batch by batch, against the source texts.

    The documents placed in a batch are those that were buffered or newly read, minus those
    still buffered afterwards. Each must fill exactly one piece of the batch's rows: whole, or
    (only as the last piece of a row) a strict prefix of itself. Nothing else may be in a row.
    """
    bos = tok.get_bos_token_id()
    tokens = _doc_tokens(tok, shard_texts)
    order = _reading_order(shard_texts, range(len(SHARD_SIZES) - 1), rank, world)
    start_of = {}
    for i, (pq_idx, rg, d) in enumerate(order):
        start_of.setdefault((pq_idx, rg), i - d)

    def read_so_far(state) -> int:
        in_pass = start_of[state["pq_idx"], state["rg_idx"]] + state["doc_idx"]
        return (state["epoch"] - 1) * len(order) + in_pass

    loader = pretrain_batches(data_dir, tok, B, T, rank=rank, world_size=world, buffer_docs=8)
    before, buffered, crops, epochs_seen = 0, Counter(), 0, set()
    for inputs, targets, state in _take(loader, 120):
        epochs_seen.add(state["epoch"])
        now = read_so_far(state)
        read = Counter(order[i % len(order)] for i in range(before, now))
        assert not _buffered(state) - (buffered + read), "buffered documents nobody read"
        placed = (buffered + read) - _buffered(state)
        before, buffered = now, _buffered(state)

        cropped_pieces = []
        for row in _rows(inputs, targets):
            pieces = _pieces(row, bos)
            assert pieces[0][0] == bos and sum(map(len, pieces)) == T + 1
            for j, piece in enumerate(pieces):
                whole = next((doc for doc in placed if tokens[doc] == piece), None)
                if whole is not None:
                    placed[whole] -= 1
                    placed = +placed
                else:
                    assert j == len(pieces) - 1, "a document was cropped before the row's end"
                    cropped_pieces.append(piece)
        # What is left over must be the cropped documents, each matching one cropped piece.
        left = list(placed.elements())
        assert len(left) == len(cropped_pieces)
        assert any(
            all(
                len(piece) < len(tokens[doc]) and tokens[doc][: len(piece)] == piece
                for piece, doc in zip(cropped_pieces, perm, strict=True)
            )
            for perm in itertools.permutations(left)
        )
        crops += len(cropped_pieces)
    assert crops > 0 and len(epochs_seen) >= 3, "the data should exercise crops and epochs"


def test_ranks_read_disjoint_row_groups_that_together_cover_the_train_split(
    data_dir, tok, shard_texts
):
    bos = tok.get_bos_token_id()
    where = {
        tuple(ids): (pq_idx, rg) for (pq_idx, rg, _), ids in _doc_tokens(tok, shard_texts).items()
    }
    world = 3
    seen_by_rank = []
    for rank in range(world):
        seen = set()
        loader = pretrain_batches(data_dir, tok, B, T, rank=rank, world_size=world, buffer_docs=8)
        for inputs, targets, state in loader:
            for row in _rows(inputs, targets):
                seen |= {where[tuple(p)] for p in _pieces(row, bos) if tuple(p) in where}
            if state["epoch"] == 3:
                break
        expected = {(pq, rg) for pq, rg, _ in _reading_order(shard_texts, TRAIN, rank, world)}
        assert seen == expected
        seen_by_rank.append(seen)
    for a, b in itertools.combinations(seen_by_rank, 2):
        assert not a & b
    train_groups = {
        (pq_idx, rg) for (pq_idx, rg) in where.values() if pq_idx < len(SHARD_SIZES) - 1
    }
    assert set().union(*seen_by_rank) == train_groups


def _batch_equal(a, b) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


@pytest.mark.parametrize(("rank", "world", "buffer_docs"), [(0, 1, 8), (1, 2, 8), (0, 1, 30)])
def test_resuming_from_a_state_yields_exactly_the_next_batches(
    data_dir, tok, rank, world, buffer_docs
):
    def loader(state=None):
        return pretrain_batches(
            data_dir, tok, B, T, rank=rank, world_size=world, buffer_docs=buffer_docs,
            resume_state=state,
        )  # fmt: skip

    reference = _take(loader(), 100)
    states = [state for _, _, state in reference]
    epoch_ends = [k for k in range(99) if states[k]["epoch"] != states[k + 1]["epoch"]]
    shard_ends = [k for k in range(99) if states[k]["pq_idx"] != states[k + 1]["pq_idx"]]
    # Mid row group, with documents from an earlier row group still waiting in the buffer.
    lingering = [
        k
        for k, s in enumerate(states[:99])
        if s["doc_idx"] > 0 and any((p, r) != (s["pq_idx"], s["rg_idx"]) for p, r, _ in s["buffer"])
    ]
    assert epoch_ends and shard_ends and lingering
    for k in {0, epoch_ends[0], shard_ends[0], shard_ends[-1], lingering[len(lingering) // 2]}:
        saved = json.loads(json.dumps(states[k]))
        resumed = _take(loader(saved), 3)
        assert all(map(_batch_equal, resumed, reference[k + 1 : k + 4])), f"resume after {k}"


def test_val_split_reads_only_the_last_shard_deterministically_and_loops(
    data_dir, tok, shard_texts
):
    bos = tok.get_bos_token_id()
    tokens = _doc_tokens(tok, shard_texts)
    val = len(SHARD_SIZES) - 1
    val_docs = [ids for (pq_idx, _, _), ids in tokens.items() if pq_idx == val]
    # More batches than the val shard has tokens: it must loop rather than end.
    n = sum(map(len, val_docs)) // (B * (T + 1)) + 3
    first = _take(pretrain_batches(data_dir, tok, B, T, split="val", buffer_docs=8), n)
    second = _take(pretrain_batches(data_dir, tok, B, T, split="val", buffer_docs=8), n)
    assert len(first) == n and all(map(_batch_equal, first, second))
    for inputs, targets, state in first:
        assert state["pq_idx"] == val
        for row in _rows(inputs, targets):
            for piece in _pieces(row, bos):
                assert any(doc[: len(piece)] == piece for doc in val_docs)


def test_bad_arguments_and_foreign_states_are_refused(data_dir, tok, tmp_path):
    def first(**kwargs):
        args = {"data_dir": data_dir, "tokenizer": tok, "B": B, "T": T, "buffer_docs": 8}
        return pretrain_batches(**(args | kwargs))

    with pytest.raises(ValueError, match="split"):
        first(split="test")
    with pytest.raises(ValueError, match="rank"):
        first(rank=2, world_size=2)
    with pytest.raises(ValueError, match="B must be"):
        first(B=0)
    with pytest.raises(FileNotFoundError):
        first(data_dir=tmp_path / "missing")
    # The val shard has 3 row groups: a fourth rank would get none and wait forever.
    with pytest.raises(ValueError, match="no row groups"):
        first(split="val", rank=3, world_size=4)

    single = tmp_path / "single"
    single.mkdir()
    pq.write_table(pa.table({"text": ["a b c"]}), single / "shard_00000.parquet")
    with pytest.raises(ValueError, match="at least 2"):
        first(data_dir=single)
    assert next(first(data_dir=single, split="val"))[0].shape == (B, T)
    untitled = tmp_path / "untitled"
    untitled.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"body": ["a b c"]}), untitled / f"shard_{i:05d}.parquet")
    with pytest.raises(ValueError, match="'text'"):
        first(data_dir=untitled)

    _, _, state = next(first(rank=0, world_size=2))
    with pytest.raises(ValueError, match="rank 0 of 2"):
        first(rank=1, world_size=2, resume_state=state)
    with pytest.raises(ValueError, match="not a shard of this split"):
        first(split="val", rank=0, world_size=2, resume_state=state)
    with pytest.raises(ValueError, match="lacks"):
        first(resume_state={"pq_idx": 0, "rg_idx": 0, "epoch": 1})
    broken = dict(state, buffer=[[0, 0, [999]]])
    with pytest.raises(ValueError, match="document 999"):
        first(rank=0, world_size=2, resume_state=broken)


# ---- SFT -----------------------------------------------------------------------------------


def _conversations(n: int) -> list[dict]:
    rng = random.Random(99)
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": _text(rng, f"ask{i:04d}", rng.randint(2, 14))}]
        if i % 5 == 0:
            messages.insert(0, {"role": "system", "content": "be brief"})
        reply = _text(rng, "so", rng.randint(1, 10))
        if i % 4 == 0:
            reply = [
                {"type": "text", "text": reply},
                {"type": "python", "text": "2+3"},
                {"type": "python_output", "text": "5"},
            ]
        messages.append({"role": "assistant", "content": reply})
        if i % 7 == 0:  # a long multi-turn one, longer than a row: rendered truncated
            messages += [
                {"role": "user", "content": _text(rng, "more", 20)},
                {"role": "assistant", "content": _text(rng, "ok", 20)},
            ]
        out.append({"messages": messages})
    return out


def _parse_sft_rows(inputs, targets, rendered, bos, T=T_SFT):
    """Find which whole conversations each row holds; check inputs and targets against them.

    Returns the conversation indices of each row, in order. The last position of a row is only
    visible through the last target, which is -1 when that token is not trained on.
    """
    per_row = []
    for row_in, row_tg in zip(inputs.tolist(), targets.tolist(), strict=True):
        assert row_in[0] == bos
        found, ids_row, mask_row, p = [], [], [], 0
        while p < T and row_in[p] == bos:
            match = None
            for index, (ids, mask) in enumerate(rendered):
                n = len(ids)
                if p + n > T + 1 or row_in[p : min(p + n, T)] != ids[: T - p]:
                    continue
                if p + n == T + 1 and row_tg[-1] != (ids[-1] if mask[-1] else -1):
                    continue
                match = index
                break
            if match is None:
                break  # padding from here on
            found.append(match)
            ids_row += rendered[match][0]
            mask_row += rendered[match][1]
            p += len(rendered[match][0])
        per_row.append(found)
        pad = T + 1 - p
        assert row_in[p:] == [bos] * (T - p)
        ids_row += [bos] * pad
        mask_row += [0] * pad
        expected = [t if m else -1 for t, m in zip(ids_row[1:], mask_row[1:], strict=True)]
        assert row_tg == expected
    return per_row


def test_sft_targets_follow_the_mask_and_every_conversation_lands_whole_once(tok):
    conversations = _conversations(40)
    rendered = [tok.render_conversation(c, max_tokens=T_SFT + 1) for c in conversations]
    assert any(len(ids) == T_SFT + 1 for ids, _ in rendered), "some must be truncated to a full row"
    batches = list(sft_batches(conversations, tok, 3, T_SFT, num_epochs=1, buffer_size=6))
    seen, consumed = [], 0
    for k, (inputs, targets, progress) in enumerate(batches):
        assert inputs.shape == targets.shape == (3, T_SFT)
        assert inputs.dtype == targets.dtype == torch.int64
        rows = _parse_sft_rows(inputs, targets, rendered, tok.get_bos_token_id())
        # Only the final batch may hold rows of pure padding, once the data has run out.
        assert all(rows) or k == len(batches) - 1
        assert rows[0], "a batch without any conversation"
        seen += [index for row in rows for index in row]
        consumed += sum(map(len, rows))
        assert progress["consumed"] == consumed
        assert progress["last"] == (k == len(batches) - 1)
    assert sorted(seen) == list(range(len(conversations)))
    assert batches[-1][2]["epochs"] == 1.0
    assert (torch.cat([t for _, t, _ in batches]) == -1).any()


def test_sft_ranks_take_disjoint_conversations_and_loop_over_epochs(tok):
    conversations = _conversations(25)
    rendered = [tok.render_conversation(c, max_tokens=T_SFT + 1) for c in conversations]
    bos = tok.get_bos_token_id()

    def placed(batches) -> Counter:
        return Counter(
            i for x, y, _ in batches for row in _parse_sft_rows(x, y, rendered, bos) for i in row
        )

    for rank in range(2):
        share = len(range(rank, len(conversations), 2))
        batches = list(
            sft_batches(conversations, tok, 2, T_SFT, rank, 2, num_epochs=2, buffer_size=4)
        )
        assert placed(batches) == Counter({i: 2 for i in range(rank, len(conversations), 2)})
        assert batches[-1][2] == {"consumed": 2 * share, "epochs": 2.0, "last": True}

        endless = sft_batches(conversations, tok, 2, T_SFT, rank, 2, buffer_size=4)
        batches = list(itertools.takewhile(lambda b: b[2]["epochs"] < 3, endless))
        counts = placed(batches)
        assert set(counts) == set(range(rank, len(conversations), 2))
        assert sum(counts.values()) == batches[-1][2]["consumed"] > 2 * share
        assert not any(b[2]["last"] for b in batches)


def test_sft_reads_one_shot_iterators_once_and_names_bad_conversations(tok):
    conversations = _conversations(12)
    rendered = [tok.render_conversation(c, max_tokens=T_SFT + 1) for c in conversations]
    with pytest.raises(ValueError, match="num_epochs=1"):
        sft_batches(iter(conversations), tok, 2, T_SFT)
    batches = list(sft_batches(iter(conversations), tok, 2, T_SFT, num_epochs=1))
    bos = tok.get_bos_token_id()
    seen = [i for x, y, _ in batches for row in _parse_sft_rows(x, y, rendered, bos) for i in row]
    assert sorted(seen) == list(range(12)) and batches[-1][2]["epochs"] is None

    broken = [*conversations[:3], {"messages": [{"role": "assistant", "content": "hi"}]}]
    with pytest.raises(ValueError, match="conversation 3"):
        list(sft_batches(broken, tok, 2, T_SFT, num_epochs=1))
    with pytest.raises(ValueError, match="not one dict"):
        sft_batches(conversations[0], tok, 2, T_SFT)
    with pytest.raises(ValueError, match="rank 1 of 2 gets none"):
        sft_batches(conversations[:1], tok, 2, T_SFT, rank=1, world_size=2)


def test_shards_of_one_row_group_still_feed_every_rank(tmp_path, tok, shard_texts):
    """Like the built-in corpus: each shard is a single row group, and 2 ranks share 3 shards."""
    for i, texts in enumerate(shard_texts):
        pq.write_table(pa.table({"text": texts}), tmp_path / f"shard_{i:05d}.parquet")
    seen = []
    for rank in range(2):
        loader = pretrain_batches(tmp_path, tok, 2, 16, rank=rank, world_size=2, buffer_docs=4)
        inputs, _, state = next(loader)
        assert inputs.shape == (2, 16)
        seen.append(state["pq_idx"])
    assert seen[0] != seen[1]
    with pytest.raises(ValueError, match="rank 3 of 4 gets no row groups"):
        pretrain_batches(tmp_path, tok, 2, 16, rank=3, world_size=4)
