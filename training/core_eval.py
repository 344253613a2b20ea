"""CORE: the DCLM in-context benchmark that nanochat reports for base models (SPEC §8).

A bundle directory holds `core.yaml` (the tasks), the tasks' JSONL files (normally under
`eval_data/`) and `eval_meta_data.csv` (each task's random-guess accuracy in percent). Three
kinds of task, all scored from one forward pass per item, never by sampling:

- multiple_choice `{query, choices, gold}`: the same question continued by each choice; the
  choice whose own tokens get the lowest mean loss wins.
- schema `{context_options, continuation, gold}`: different contexts followed by the same
  continuation; the context under which the continuation is cheapest wins (Winograd-style).
- language_modeling `{context, continuation}`: correct only when greedy decoding reproduces
  every token of the continuation.

Each item may be preceded by `num_fewshot` solved examples of the same task, drawn with
`random.Random(1234 + index)` from the other items, so every run, and every rank, sees the
same prompts. A task's accuracy is turned into a centered score `(acc - b) / (1 - b)` (b = the
random baseline), so 0 means chance and 1 perfect whatever the number of choices; CORE is the
mean centered score over tasks.

Which tokens count as "the continuation" is found on the token ids, not the text: BPE merges
across the boundary (a delimiter space joins the next word), so the span is where the options'
token sequences stop sharing a prefix (multiple choice) or a suffix (schema), and for language
modelling where the prompt without the continuation ends.

Both formats of `core.yaml` are read: this project's (a list of tasks with `task_type` and an
integer `num_fewshot`, `dataset_uri` relative to the bundle) and the public DCLM/nanochat
bundle's (`icl_tasks`, `icl_task_type`, `num_fewshot: [k]`, paths relative to `eval_data/`).
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from engine.paths import data_home
from training.events import HUB, OFFLINE

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
SHIPPED_BUNDLE = Path(__file__).with_name("corpus") / "core"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
CONFIG_FILE, META_FILE, DATA_SUBDIR = "core.yaml", "eval_meta_data.csv", "eval_data"
FEWSHOT_SEED = 1234
# `max_per_task` keeps a fixed random subset, the same on every run and rank.
SUBSET_SEED = 1337
DEFAULT_DELIMITER = " "


# ---- the bundle ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CoreTask:
    label: str
    task_type: str
    data_path: Path
    num_fewshot: int
    continuation_delimiter: str
    baseline: float  # random-guess accuracy as a fraction (the CSV holds percent)


@dataclass(frozen=True)
class TaskResult:
    label: str
    accuracy: float
    centered: float
    baseline: float
    correct: int
    n: int


@dataclass(frozen=True)
class CoreResult:
    core: float
    tasks: list[TaskResult]

    def to_dict(self) -> dict[str, Any]:
        return {"core": self.core, "tasks": [asdict(t) for t in self.tasks]}


def centered_accuracy(accuracy: float, baseline: float) -> float:
    """Rescale so chance is 0 and perfect is 1 (baseline as a fraction)."""
    return (accuracy - baseline) / (1.0 - baseline)


def _read_baselines(path: Path) -> dict[str, float]:
    if not path.is_file():
        raise FileNotFoundError(f"CORE bundle: baselines file {path} is missing")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        label_col = next((c for c in ("label", "Eval Task") if c in fields), None)
        base_col = next((c for c in ("baseline", "Random baseline") if c in fields), None)
        if label_col is None or base_col is None:
            raise ValueError(
                f"{path}: needs columns label,baseline (or 'Eval Task','Random baseline'), "
                f"got {fields}"
            )
        baselines = {}
        for line, row in enumerate(reader, start=2):
            try:
                value = float(row[base_col])
            except (TypeError, ValueError):
                raise ValueError(
                    f"{path}:{line}: baseline {row[base_col]!r} is not a number"
                ) from None
            if not 0 <= value < 100:
                raise ValueError(
                    f"{path}:{line}: baseline must be in [0, 100) percent, got {value}"
                )
            baselines[str(row[label_col]).strip()] = value
    return baselines


def load_bundle(bundle_dir: str | os.PathLike) -> list[CoreTask]:
    """The tasks of a bundle, checked: every data file exists and every task has a baseline."""
    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        raise FileNotFoundError(f"CORE bundle directory {bundle} does not exist")
    config_path = bundle / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"CORE bundle: {config_path} is missing")
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{config_path}: invalid YAML: {exc}") from None
    entries = config.get("icl_tasks") if isinstance(config, dict) else config
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{config_path}: expected a non-empty list of tasks (or icl_tasks: [...])")
    baselines = _read_baselines(bundle / META_FILE)
    tasks, seen = [], set()
    for i, entry in enumerate(entries):
        where = f"{config_path}: task {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping, got {entry!r}")
        label = entry.get("label")
        if not isinstance(label, str) or not label:
            raise ValueError(f"{where}: missing label")
        where = f"{config_path}: task {label!r}"
        if label in seen:
            raise ValueError(f"{where}: label used twice")
        seen.add(label)
        task_type = entry.get("task_type", entry.get("icl_task_type"))
        if task_type not in TASK_TYPES:
            raise ValueError(f"{where}: task_type must be one of {TASK_TYPES}, got {task_type!r}")
        fewshot = entry.get("num_fewshot", 0)
        if isinstance(fewshot, list):
            fewshot = fewshot[0] if fewshot else 0
        if isinstance(fewshot, bool) or not isinstance(fewshot, int) or fewshot < 0:
            raise ValueError(
                f"{where}: num_fewshot must be a non-negative integer, got {fewshot!r}"
            )
        delimiter = entry.get("continuation_delimiter", DEFAULT_DELIMITER)
        if not isinstance(delimiter, str):
            raise ValueError(f"{where}: continuation_delimiter must be a string")
        uri = entry.get("dataset_uri")
        if not isinstance(uri, str) or not uri:
            raise ValueError(f"{where}: missing dataset_uri")
        candidates = [bundle / uri, bundle / DATA_SUBDIR / uri]
        data_path = next((p for p in candidates if p.is_file()), None)
        if data_path is None:
            raise FileNotFoundError(f"{where}: data file {candidates[0]} is missing")
        if label not in baselines:
            raise ValueError(f"{bundle / META_FILE}: no baseline for task {label!r}")
        tasks.append(
            CoreTask(label, task_type, data_path, fewshot, delimiter, baselines[label] / 100.0)
        )
    return tasks


def _check_item(task_type: str, item: Any) -> str | None:
    """What is wrong with one record, or None."""
    if not isinstance(item, dict):
        return "expected a JSON object"

    def text(key: str) -> bool:
        return isinstance(item.get(key), str)

    def texts(key: str) -> bool:
        value = item.get(key)
        return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)

    if task_type == "multiple_choice":
        if not text("query"):
            return "field 'query' must be a string"
        if not texts("choices"):
            return "field 'choices' must be a non-empty list of strings"
        options = item["choices"]
    elif task_type == "schema":
        if not texts("context_options"):
            return "field 'context_options' must be a non-empty list of strings"
        if not text("continuation"):
            return "field 'continuation' must be a string"
        options = item["context_options"]
    else:
        if not text("context"):
            return "field 'context' must be a string"
        if not text("continuation") or not item["continuation"].strip():
            return "field 'continuation' must be a non-empty string"
        return None
    gold = item.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
        return f"field 'gold' must be an index into its {len(options)} options, got {gold!r}"
    return None


def load_items(task: CoreTask) -> list[dict[str, Any]]:
    """The task's records, each checked for its type's fields (errors name file and line)."""
    items = []
    with open(task.data_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{task.data_path}:{line_no}: invalid JSON: {exc.msg}") from None
            problem = _check_item(task.task_type, item)
            if problem:
                raise ValueError(f"{task.data_path}:{line_no}: {problem}")
            items.append(item)
    if not items:
        raise ValueError(f"{task.data_path}: no items")
    return items


# ---- prompts -------------------------------------------------------------------------------


def fewshot_indices(num_items: int, index: int, k: int) -> list[int]:
    """`k` other items to show before item `index`: deterministic per item, never itself."""
    if k <= 0:
        return []
    rng = random.Random(FEWSHOT_SEED + index)
    others = [i for i in range(num_items) if i != index]
    return rng.sample(others, min(k, len(others)))


def _shot(task_type: str, example: Mapping[str, Any], delimiter: str) -> str:
    if task_type == "multiple_choice":
        return example["query"] + delimiter + example["choices"][example["gold"]]
    if task_type == "schema":
        return example["context_options"][example["gold"]] + delimiter + example["continuation"]
    return example["context"].strip() + delimiter + example["continuation"]


def render_prompts(
    task_type: str,
    item: Mapping[str, Any],
    fewshot: Sequence[Mapping[str, Any]],
    delimiter: str,
) -> list[str]:
    """The texts to score for one item.

    multiple_choice / schema: one full text per option. language_modeling: [prompt without
    the continuation (stripped, so its last token cannot merge into the continuation), the
    full text].
    """
    prefix = "".join(_shot(task_type, ex, delimiter) + "\n\n" for ex in fewshot)
    if task_type == "multiple_choice":
        return [prefix + item["query"] + delimiter + choice for choice in item["choices"]]
    if task_type == "schema":
        return [prefix + ctx + delimiter + item["continuation"] for ctx in item["context_options"]]
    context = prefix + item["context"].strip() + delimiter
    return [context.strip(), context + item["continuation"]]


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows[1:]):
            return i
    return n


def _common_suffix(rows: Sequence[Sequence[int]]) -> int:
    return _common_prefix([list(reversed(r)) for r in rows])


def continuation_spans(task_type: str, sequences: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Per sequence, [start, end) of the tokens being scored; start >= 1 (a token to predict
    from) and the span is never empty."""
    if task_type == "language_modeling":
        without, full = sequences
        start = _common_prefix([without, full])
        start = max(1, min(start, len(full) - 1))
        return [(start, len(full))]
    shortest = min(len(s) for s in sequences)
    if task_type == "multiple_choice":
        # With a single choice everything is "shared"; keep at least its last token.
        start = max(1, min(_common_prefix(sequences), shortest - 1))
        return [(start, len(s)) for s in sequences]
    suffix = max(1, min(_common_suffix(sequences), shortest - 1))
    return [(len(s) - suffix, len(s)) for s in sequences]


def encode_item(
    tokenizer: Any,
    task: CoreTask,
    items: Sequence[Mapping[str, Any]],
    index: int,
) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """(token sequences with BOS first, scored spans) of item `index`, few-shot included."""
    shots = [items[i] for i in fewshot_indices(len(items), index, task.num_fewshot)]
    prompts = render_prompts(task.task_type, items[index], shots, task.continuation_delimiter)
    sequences = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    if task.task_type == "language_modeling":
        spans = continuation_spans(task.task_type, sequences)
        return [sequences[1]], spans
    return sequences, continuation_spans(task.task_type, sequences)


def crop_left(
    sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]], max_len: int | None
) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Drop the oldest tokens of sequences longer than `max_len` (the model's context)."""
    if max_len is None:
        return [list(s) for s in sequences], list(spans)
    out_seqs, out_spans = [], []
    for seq, (start, end) in zip(sequences, spans, strict=True):
        cut = max(0, len(seq) - max_len)
        out_seqs.append(list(seq[cut:]))
        out_spans.append((max(1, start - cut), end - cut))
    return out_seqs, out_spans


# ---- scoring -------------------------------------------------------------------------------


def token_scores(model: Callable, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses, predictions), both (B, T-1): at t, the loss of ids[:, t+1] and the argmax."""
    logits = model(ids)
    logits = logits[:, :-1].float()
    targets = ids[:, 1:]
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return losses.view(targets.shape), logits.argmax(dim=-1)


@torch.no_grad()
def score_item(
    model: Callable,
    task_type: str,
    sequences: Sequence[Sequence[int]],
    spans: Sequence[tuple[int, int]],
    gold: int | None,
    *,
    device: torch.device,
    pad_id: int,
    autocast: Any = None,
) -> tuple[bool, list[float]]:
    """Score all options of one item in one forward; (correct, mean loss per option).

    Rows are right-padded: the model is causal, so padding after a row's end never changes
    the logits inside it.
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    ids = ids.to(device)
    if autocast is None:
        losses, predictions = token_scores(model, ids)
    else:
        with autocast:
            losses, predictions = token_scores(model, ids)
    # Position t of losses/predictions predicts token t+1, hence the shift by one.
    means = [losses[row, start - 1 : end - 1].mean().item() for row, (start, end) in
             enumerate(spans)]  # fmt: skip
    if task_type == "language_modeling":
        start, end = spans[0]
        correct = bool(torch.equal(predictions[0, start - 1 : end - 1], ids[0, start:end]))
        return correct, means
    best = min(range(len(means)), key=means.__getitem__)
    return best == gold, means


def _max_len(model: Any) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "sequence_len", None)


def _device(model: Any, runtime: Any) -> torch.device:
    if runtime is not None and getattr(runtime, "device", None) is not None:
        return runtime.device
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def subset(items: list[dict[str, Any]], max_per_task: int) -> list[dict[str, Any]]:
    """A fixed random subset of at most `max_per_task` items (all of them when <= 0)."""
    if max_per_task <= 0 or len(items) <= max_per_task:
        return items
    shuffled = list(items)
    random.Random(SUBSET_SEED).shuffle(shuffled)
    return shuffled[:max_per_task]


def evaluate_task(
    model: Callable,
    tokenizer: Any,
    task: CoreTask,
    runtime: Any = None,
    max_per_task: int = -1,
    items: list[dict[str, Any]] | None = None,
) -> TaskResult:
    """Accuracy and centered score of one task; items strided over ranks, counts summed."""
    items = subset(load_items(task) if items is None else items, max_per_task)
    rank = getattr(runtime, "rank", 0)
    world = getattr(runtime, "world_size", 1)
    device = _device(model, runtime)
    autocast = runtime.autocast() if runtime is not None else None
    pad_id = tokenizer.get_bos_token_id()
    max_len = _max_len(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    correct = 0
    for index in range(rank, len(items), world):
        sequences, spans = encode_item(tokenizer, task, items, index)
        sequences, spans = crop_left(sequences, spans, max_len)
        ok, _ = score_item(
            model, task.task_type, sequences, spans, items[index].get("gold"),
            device=device, pad_id=pad_id, autocast=autocast,
        )  # fmt: skip
        correct += int(ok)
    if hasattr(model, "train"):
        model.train(was_training)
    total = torch.tensor([correct], dtype=torch.long, device=device)
    if runtime is not None:
        total = runtime.all_reduce_sum(total)
    correct = int(total.item())
    accuracy = correct / len(items)
    return TaskResult(
        task.label, accuracy, centered_accuracy(accuracy, task.baseline), task.baseline,
        correct, len(items),
    )  # fmt: skip


def evaluate_core(
    model: Callable,
    tokenizer: Any,
    tasks: Sequence[CoreTask] | str | os.PathLike,
    runtime: Any = None,
    max_per_task: int = -1,
    on_task: Callable[[TaskResult], None] | None = None,
) -> CoreResult:
    """Every task of a bundle (a directory or loaded tasks); CORE = mean centered score."""
    if isinstance(tasks, (str, os.PathLike)):
        tasks = load_bundle(tasks)
    if not tasks:
        raise ValueError("CORE needs at least one task")
    results = []
    for task in tasks:
        result = evaluate_task(model, tokenizer, task, runtime, max_per_task)
        results.append(result)
        if on_task is not None:
            on_task(result)
    core = sum(r.centered for r in results) / len(results)
    return CoreResult(core, results)


# ---- the public bundle ---------------------------------------------------------------------


def _retryable(exc: BaseException) -> bool:
    # 4xx (other than timeout/throttling) will not change by asking again.
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code in (408, 429)
    return True


def _fetch(url: str, dest: Path, attempts: int, backoff_s: float, timeout_s: float) -> None:
    for attempt in range(1, attempts + 1):
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f, urllib.request.urlopen(url, timeout=timeout_s) as resp:
                shutil.copyfileobj(resp, f, 1 << 20)
            os.replace(tmp, dest)
            return
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            if attempt == attempts or not _retryable(exc):
                raise OSError(f"could not download {url}: {exc}") from exc
            time.sleep(backoff_s * 2 ** (attempt - 1))


def install_bundle_zip(zip_path: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Unpack an eval bundle zip into `dest` (unpacked beside it, then renamed into place).

    The public zip holds one top folder (`eval_bundle/`); a zip with core.yaml at its root
    works too. The result is checked with `load_bundle` before it replaces nothing: `dest`
    must not exist yet.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".eval_bundle.") as tmp:
        try:
            with zipfile.ZipFile(zip_path) as archive:
                root = Path(tmp).resolve()
                for name in archive.namelist():
                    if not (root / name).resolve().is_relative_to(root):
                        raise ValueError(f"{zip_path}: unsafe path {name!r} in the archive")
                archive.extractall(tmp)
        except zipfile.BadZipFile as exc:
            raise ValueError(f"{zip_path}: not a valid zip file: {exc}") from None
        unpacked = Path(tmp)
        if not (unpacked / CONFIG_FILE).is_file():
            inner = [p for p in unpacked.iterdir() if (p / CONFIG_FILE).is_file()]
            if len(inner) != 1:
                raise ValueError(f"{zip_path}: no {CONFIG_FILE} at the top or in one folder")
            unpacked = inner[0]
        load_bundle(unpacked)
        os.replace(unpacked, dest)
    return dest


def download_bundle(
    dest: str | os.PathLike | None = None,
    url: str = EVAL_BUNDLE_URL,
    attempts: int = 5,
    backoff_s: float = 2.0,
    timeout_s: float = 60.0,
) -> Path:
    """The public CORE bundle in `dest` (default <NANOCHAT_HOME>/eval_bundle), fetched once.

    `url` may be a file:// URL (a local copy of the zip).
    """
    dest = Path(dest) if dest else data_home() / "eval_bundle"
    if (dest / CONFIG_FILE).is_file():
        return dest
    if dest.exists():
        raise FileExistsError(f"{dest} exists but has no {CONFIG_FILE}: remove it and retry")
    dest.parent.mkdir(parents=True, exist_ok=True)
    zip_path = dest.with_name(dest.name + ".zip")
    if not zip_path.is_file():
        _fetch(url, zip_path, attempts, backoff_s, timeout_s)
    install_bundle_zip(zip_path, dest)
    zip_path.unlink(missing_ok=True)
    return dest


def bundle_data_source(bundle: Path) -> str:
    """The event file's data_source of scores on this bundle: the shipped sample is "offline";
    any other bundle is the public one, downloaded here or copied by hand ("hub")."""
    return OFFLINE if Path(bundle).resolve() == SHIPPED_BUNDLE.resolve() else HUB


def resolve_bundle(spec: str | os.PathLike | None) -> Path:
    """ "" -> the small offline bundle shipped here; "download" -> the public one; else a path."""
    if spec is None or str(spec) == "":
        return SHIPPED_BUNDLE
    if str(spec) == "download":
        return download_bundle()
    return Path(spec)
