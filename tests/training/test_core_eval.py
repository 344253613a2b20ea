"""CORE scoring checked against answers computed by hand.

The model here is not trained: `RepeatModel` always predicts that the next character repeats
the current one, and `CharTokenizer` makes every character one token. So for any option we
can say which continuation tokens it "gets right", and the winning option, the greedy check
and the accuracies follow by hand.
"""

import json
import random
import zipfile
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from engine.models.gpt import GPT, GPTConfig
from training import core_eval
from training.core_eval import (
    CoreTask,
    continuation_spans,
    crop_left,
    download_bundle,
    encode_item,
    evaluate_core,
    evaluate_task,
    fewshot_indices,
    install_bundle_zip,
    load_bundle,
    load_items,
    render_prompts,
    score_item,
    subset,
)
from training.runtime import Runtime

VOCAB = 257  # 256 bytes + BOS


class CharTokenizer:
    def get_bos_token_id(self) -> int:
        return 256

    def encode(self, text, prepend=None):
        def one(t):
            return ([] if prepend is None else [prepend]) + list(t.encode())

        return one(text) if isinstance(text, str) else [one(t) for t in text]


class RepeatModel(nn.Module):
    """Logit 10 on the current token, 0 elsewhere: 'the next character repeats this one'."""

    def __init__(self, sequence_len=None):
        super().__init__()
        self.config = SimpleNamespace(sequence_len=sequence_len)

    def forward(self, ids):
        return 10.0 * F.one_hot(ids, VOCAB).float()


CPU = Runtime(torch.device("cpu"), torch.float32, 0, 0, 1)

MC_ITEMS = [
    # span = whole choice; "aaaa" has 3 repeats -> lowest mean loss -> correct
    {"query": "Q0:", "choices": ["xyz", "aaaa", "bcd", "efg"], "gold": 1},
    {"query": "Q1:", "choices": ["bb", "cd", "ef", "gh"], "gold": 0},  # "bb" wins: correct
    {"query": "Q2:", "choices": ["pp", "qr"], "gold": 1},  # "pp" wins: wrong
    # shared first "k" is not scored: "kkk" (3 hits) beats "l" (a miss): correct
    {"query": "Q3:", "choices": ["kkkk", "kl"], "gold": 0},
]
SCHEMA_ITEMS = [
    # "xabbb" vs "xbbbb": common suffix "bbb"; under "xb" all three repeat: option 1, correct
    {"context_options": ["xa", "xb"], "continuation": "bbb", "gold": 1},
    {"context_options": ["zc", "zd"], "continuation": "ccc", "gold": 1},  # picks 0: wrong
    {"context_options": ["m", "n"], "continuation": "nn", "gold": 1},  # picks 1: correct
]
LM_ITEMS = [
    {"context": "saaa", "continuation": "aa"},  # greedy 'a','a': correct
    {"context": "hi ", "continuation": "ii"},  # context stripped -> "hi" + "ii": correct
    {"context": "hi", "continuation": "io"},  # 'o' is not predicted: wrong
    {"context": "xy", "continuation": "z"},  # wrong
]
# accuracies 3/4, 2/3, 2/4 against baselines 25%, 50%, 0%
EXPECTED = {"mc": (0.75, 2 / 3), "schema": (2 / 3, 1 / 3), "lm": (0.5, 0.5)}


def write_bundle(root, *, icl_format=False, tasks=None, items=None, baselines=None):
    """A bundle of three tasks (one per type) in this project's or the public format."""
    tasks = tasks or [
        ("mc", "multiple_choice", 1, " "),
        ("schema", "schema", 0, ""),
        ("lm", "language_modeling", 0, ""),
    ]
    items = items or {"mc": MC_ITEMS, "schema": SCHEMA_ITEMS, "lm": LM_ITEMS}
    baselines = baselines or {"mc": 25, "schema": 50, "lm": 0}
    (root / "eval_data").mkdir(parents=True, exist_ok=True)
    entries = []
    for label, task_type, shots, delim in tasks:
        (root / "eval_data" / f"{label}.jsonl").write_text(
            "".join(json.dumps(item) + "\n" for item in items.get(label, []))
        )
        if icl_format:
            entries.append({"label": label, "dataset_uri": f"{label}.jsonl",
                            "icl_task_type": task_type, "num_fewshot": [shots],
                            "continuation_delimiter": delim})  # fmt: skip
        else:
            entries.append({"label": label, "dataset_uri": f"eval_data/{label}.jsonl",
                            "task_type": task_type, "num_fewshot": shots,
                            "continuation_delimiter": delim})  # fmt: skip
    config = {"icl_tasks": entries} if icl_format else entries
    (root / "core.yaml").write_text(yaml.safe_dump(config))
    header = "Eval Task,Random baseline" if icl_format else "label,baseline"
    rows = "".join(f"{label},{value}\n" for label, value in baselines.items())
    (root / "eval_meta_data.csv").write_text(f"{header}\n{rows}")
    return root


def test_hand_computed_accuracies_and_core(tmp_path):
    bundle = write_bundle(tmp_path / "bundle")
    seen = []
    result = evaluate_core(RepeatModel(), CharTokenizer(), bundle, CPU, on_task=seen.append)
    assert [t.label for t in seen] == ["mc", "schema", "lm"]
    for task in result.tasks:
        accuracy, centered = EXPECTED[task.label]
        assert task.accuracy == pytest.approx(accuracy)
        assert task.centered == pytest.approx(centered)
    assert [t.n for t in result.tasks] == [4, 3, 4]
    assert [t.correct for t in result.tasks] == [3, 2, 2]
    assert result.core == pytest.approx((2 / 3 + 1 / 3 + 0.5) / 3)
    assert result.to_dict()["tasks"][0]["label"] == "mc"


def test_public_bundle_format_gives_the_same_scores(tmp_path):
    ours = evaluate_core(RepeatModel(), CharTokenizer(), write_bundle(tmp_path / "a"), CPU)
    public = evaluate_core(
        RepeatModel(), CharTokenizer(), write_bundle(tmp_path / "b", icl_format=True), CPU
    )
    assert [t.accuracy for t in public.tasks] == [t.accuracy for t in ours.tasks]
    tasks = load_bundle(tmp_path / "b")
    assert tasks[0].num_fewshot == 1 and tasks[0].baseline == 0.25
    assert tasks[0].data_path == tmp_path / "b" / "eval_data" / "mc.jsonl"


def test_ranks_score_strided_items_and_sum_counts(tmp_path):
    task = load_bundle(write_bundle(tmp_path))[0]  # mc: items 0, 1, 3 correct
    reduced = []

    def all_reduce_sum(tensor):
        reduced.append(int(tensor.item()))
        return tensor + 10  # what the other rank contributed

    runtime = SimpleNamespace(rank=1, world_size=2, device=torch.device("cpu"),
                              autocast=CPU.autocast, all_reduce_sum=all_reduce_sum)  # fmt: skip
    result = evaluate_task(RepeatModel(), CharTokenizer(), task, runtime)
    assert reduced == [2]  # rank 1 scored items 1 and 3, both correct
    assert result.correct == 12 and result.n == 4


def test_max_per_task_takes_a_fixed_subset(tmp_path):
    items = [{"context": f"c{i}", "continuation": "x"} for i in range(10)]
    first = subset(items, 4)
    assert len(first) == 4 and first == subset(items, 4)
    assert subset(items, -1) is items and subset(items, 20) is items
    task = load_bundle(write_bundle(tmp_path))[2]
    assert evaluate_task(RepeatModel(), CharTokenizer(), task, CPU, max_per_task=2).n == 2


def test_fewshot_sampling_is_seeded_and_excludes_the_item():
    for index in range(10):
        picked = fewshot_indices(10, index, 3)
        assert len(picked) == 3 and len(set(picked)) == 3 and index not in picked
        assert picked == fewshot_indices(10, index, 3)
        others = [i for i in range(10) if i != index]
        assert picked == random.Random(1234 + index).sample(others, 3)
    assert fewshot_indices(10, 0, 0) == []
    assert sorted(fewshot_indices(3, 1, 5)) == [0, 2]  # capped at the other items


def test_render_prompts():
    shot = {"query": "Q:", "choices": ["no", "yes"], "gold": 1}
    assert render_prompts("multiple_choice", MC_ITEMS[1], [shot], " ") == [
        f"Q: yes\n\nQ1: {c}" for c in ("bb", "cd", "ef", "gh")
    ]
    schema_shot = {"context_options": ["A", "B"], "continuation": "c", "gold": 0}
    assert render_prompts("schema", SCHEMA_ITEMS[0], [schema_shot], " ") == [
        "A c\n\nxa bbb",
        "A c\n\nxb bbb",
    ]
    lm_shot = {"context": " one two ", "continuation": "three"}
    assert render_prompts("language_modeling", {"context": "four ", "continuation": "five"},
                          [lm_shot], " ") == ["one two three\n\nfour", "one two three\n\nfour five"]  # fmt: skip


def test_continuation_spans():
    assert continuation_spans("multiple_choice", [[9, 1, 2, 3], [9, 1, 4]]) == [(2, 4), (2, 3)]
    assert continuation_spans("multiple_choice", [[9, 1, 2]]) == [(2, 3)]  # single choice
    assert continuation_spans("schema", [[9, 1, 5, 6], [9, 2, 2, 5, 6]]) == [(2, 4), (3, 5)]
    assert continuation_spans("language_modeling", [[9, 1], [9, 1, 7, 8]]) == [(2, 4)]


def test_encode_item_puts_bos_first(tmp_path):
    task = load_bundle(write_bundle(tmp_path))[2]
    sequences, spans = encode_item(CharTokenizer(), task, LM_ITEMS, 0)
    assert sequences == [[256, *b"saaaaa"]]
    assert spans == [(5, 7)]


def test_crop_left_keeps_the_span():
    seqs, spans = crop_left([[1, 2, 3, 4, 5, 6], [1, 2, 3]], [(4, 6), (2, 3)], 4)
    assert seqs == [[3, 4, 5, 6], [1, 2, 3]]
    assert spans == [(2, 4), (2, 3)]
    assert crop_left([[1, 2]], [(1, 2)], None) == ([[1, 2]], [(1, 2)])
    # A model with a short context still scores the item (the few-shot prefix is dropped).
    task = CoreTask("mc", "multiple_choice", None, 3, " ", 0.25)
    result = evaluate_task(RepeatModel(sequence_len=8), CharTokenizer(), task, CPU,
                           items=MC_ITEMS)  # fmt: skip
    assert result.correct == 3


def test_batched_options_score_like_single_forwards():
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=32, vocab_size=VOCAB, n_layer=1, n_head=1, n_kv_head=1,
                       n_embd=32, window_pattern="L")  # fmt: skip
    model = GPT(config)
    model.init_weights()
    model.eval()
    sequences = [[256, 1, 2, 3, 4, 5], [256, 1, 2, 9], [256, 1, 2, 7, 7, 7, 7, 7]]
    spans = continuation_spans("multiple_choice", sequences)
    _, batched = score_item(model, "multiple_choice", sequences, spans, 0,
                            device=torch.device("cpu"), pad_id=256)  # fmt: skip
    for seq, span, loss in zip(sequences, spans, batched, strict=True):
        _, single = score_item(model, "multiple_choice", [seq], [span], 0,
                               device=torch.device("cpu"), pad_id=256)  # fmt: skip
        assert loss == pytest.approx(single[0], abs=1e-5)


# ---- bundle errors ----------------------------------------------------------------------


def test_missing_bundle_pieces_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="core.yaml is missing"):
        load_bundle(tmp_path / "empty")
    bundle = write_bundle(tmp_path / "b")
    (bundle / "eval_data" / "lm.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="lm.jsonl is missing"):
        load_bundle(bundle)
    bundle = write_bundle(tmp_path / "c")
    (bundle / "eval_meta_data.csv").unlink()
    with pytest.raises(FileNotFoundError, match="eval_meta_data.csv is missing"):
        load_bundle(bundle)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("[unclosed", "invalid YAML"),
        ("[]", "non-empty list of tasks"),
        ("- label: mc\n  dataset_uri: eval_data/mc.jsonl\n  task_type: essay\n", "task_type"),
        ("- label: mc\n  task_type: schema\n", "missing dataset_uri"),
        ("- dataset_uri: x\n", "missing label"),
        ("- {label: mc, dataset_uri: eval_data/mc.jsonl, task_type: schema, num_fewshot: -1}",
         "num_fewshot"),
    ],
)  # fmt: skip
def test_bad_core_yaml(tmp_path, config, message):
    bundle = write_bundle(tmp_path)
    (bundle / "core.yaml").write_text(config)
    with pytest.raises(ValueError, match=message):
        load_bundle(bundle)


def test_bad_baselines(tmp_path):
    bundle = write_bundle(tmp_path, baselines={"mc": 25, "schema": 50})
    with pytest.raises(ValueError, match="no baseline for task 'lm'"):
        load_bundle(bundle)
    (bundle / "eval_meta_data.csv").write_text("label,baseline\nmc,lots\n")
    with pytest.raises(ValueError, match=r"eval_meta_data.csv:2: baseline 'lots'"):
        load_bundle(bundle)
    (bundle / "eval_meta_data.csv").write_text("task,chance\nmc,1\n")
    with pytest.raises(ValueError, match="needs columns"):
        load_bundle(bundle)


@pytest.mark.parametrize(
    ("label", "line", "message"),
    [
        ("mc", "{not json", "invalid JSON"),
        ("mc", '{"query": "q", "choices": ["a"], "gold": 3}', "gold"),
        ("mc", '{"query": "q", "choices": [], "gold": 0}', "choices"),
        ("schema", '{"context_options": ["a"], "gold": 0}', "continuation"),
        ("lm", '{"context": "a", "continuation": "  "}', "continuation"),
        ("lm", "[1, 2]", "JSON object"),
    ],
)
def test_bad_items_name_file_and_line(tmp_path, label, line, message):
    tasks = {t.label: t for t in load_bundle(write_bundle(tmp_path))}
    path = tasks[label].data_path
    path.write_text(path.read_text() + line + "\n")
    expected_line = len(path.read_text().splitlines())
    with pytest.raises(ValueError, match=rf"{label}.jsonl:{expected_line}: .*{message}"):
        load_items(tasks[label])


def test_empty_task_file(tmp_path):
    task = load_bundle(write_bundle(tmp_path))[0]
    task.data_path.write_text("\n")
    with pytest.raises(ValueError, match=r"mc.jsonl: no items"):
        load_items(task)


def test_shipped_bundle_is_valid_and_small():
    tasks = load_bundle(core_eval.SHIPPED_BUNDLE)
    assert {t.task_type for t in tasks} == set(core_eval.TASK_TYPES)
    assert 4 <= len(tasks) <= 6
    for task in tasks:
        items = load_items(task)
        assert 20 <= len(items) <= 50, task.label
        assert 0 <= task.baseline < 1
    size = sum(p.stat().st_size for p in core_eval.SHIPPED_BUNDLE.rglob("*") if p.is_file())
    assert size < 100_000


# ---- the public bundle download -----------------------------------------------------------


def make_zip(tmp_path, top="eval_bundle"):
    source = write_bundle(tmp_path / "src" / top)
    path = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for file in source.rglob("*"):
            archive.write(file, file.relative_to(tmp_path / "src"))
    return path


def test_download_bundle_from_a_local_zip(tmp_path):
    zip_path = make_zip(tmp_path)
    dest = tmp_path / "home" / "eval_bundle"
    assert download_bundle(dest, url=zip_path.as_uri(), attempts=1) == dest
    assert [t.label for t in load_bundle(dest)] == ["mc", "schema", "lm"]
    assert not (dest.parent / "eval_bundle.zip").exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["eval_bundle"]  # no temp leftovers
    zip_path.unlink()  # already installed: nothing is fetched again
    assert download_bundle(dest, url=zip_path.as_uri(), attempts=1) == dest


def test_download_bundle_defaults_to_the_data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path / "home"))
    zip_path = make_zip(tmp_path)
    assert download_bundle(url=zip_path.as_uri()) == (tmp_path / "home" / "eval_bundle").resolve()


def test_download_failure_and_bad_zips(tmp_path):
    with pytest.raises(OSError, match="could not download"):
        download_bundle(tmp_path / "x", url=(tmp_path / "missing.zip").as_uri(), attempts=1)
    assert not (tmp_path / "x").exists()
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.zip: not a valid zip"):
        install_bundle_zip(bad, tmp_path / "y")
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("readme.txt", "hi")
    with pytest.raises(ValueError, match="no core.yaml"):
        install_bundle_zip(empty, tmp_path / "z")
    assert not (tmp_path / "z").exists()


def test_resolve_bundle():
    assert core_eval.resolve_bundle("") == core_eval.SHIPPED_BUNDLE
    assert core_eval.resolve_bundle("/some/dir").as_posix() == "/some/dir"


def test_scores_on_the_shipped_bundle_are_offline_and_on_any_other_hub(tmp_path):
    assert core_eval.bundle_data_source(core_eval.SHIPPED_BUNDLE) == "offline"
    assert core_eval.bundle_data_source(tmp_path / "eval_bundle") == "hub"
