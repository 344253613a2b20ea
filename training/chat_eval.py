"""Chat evaluation: a chat checkpoint on ARC, MMLU, GSM8K, HumanEval and SpellingBee, and ChatCORE.

    python -m training.chat_eval --checkpoint-dir ~/.cache/nanochat/sft_checkpoints/d20
    torchrun --standalone --nproc_per_node=8 -m training.chat_eval --checkpoint-dir DIR --tasks mmlu

Two kinds of task (SPEC §8). Categorical ones (ARC, MMLU) are multiple choice: the question is
rendered as a prompt ending in `<|assistant_start|>`, one forward pass gives the next-token
logits, and the answer is the allowed letter whose token scores highest -- no sampling, so a
small model that cannot yet write a tidy reply is still measured on what it knows. Generative
ones (GSM8K, HumanEval, SpellingBee) let the model write a reply with the inference engine
(continuous batching, calculator tool use) and grade the text; a problem passes when any of
`num_samples` replies passes.

ChatCORE puts the six tasks on one scale: each accuracy is centred on its random-guess baseline,
`(acc - b) / (1 - b)`, and averaged -- 0 is chance, 1 is perfect. It is reported only when all
six were evaluated, since a mean over a subset would not be comparable across runs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.engine import Batch, FinishReason, Row, SamplingParams
from engine.models.base import LanguageModel
from engine.sandbox import SandboxUnavailable
from engine.tokenizer import Tokenizer
from training.checkpoints import load_evaluated
from training.events import HUB, OFFLINE, EventWriter
from training.flags import (
    MAX_ROWS,
    MAX_SEQ_LEN,
    MAX_STEPS,
    MAX_VOCAB,
    Flag,
    FlagSet,
    format_config,
    output_flags,
)
from training.program import cancel_on_sigterm, program_main
from training.report import model_lines, write_section
from training.runtime import Runtime, runtime_flags
from training.tasks.gsm8k import extract_answer
from training.tasks.humaneval import HumanEval
from training.tasks.registry import build_task, chat_eval_tasks
from training.tasks.registry import chatcore as centered_mean

# Report column per checkpoint stage (meta "stage", else the `<stage>_checkpoints` folder).
STAGE_COLUMNS = {"base": "BASE", "mid": "MID", "sft": "SFT", "rl": "RL"}
# Registry name -> the name in the report's summary table (training.report.SUMMARY_METRICS).
SUMMARY_NAMES = {
    "arc_easy": "ARC-Easy",
    "arc_challenge": "ARC-Challenge",
    "mmlu": "MMLU",
    "gsm8k": "GSM8K",
    "humaneval": "HumanEval",
    "spelling_bee": "SpellingBee",
}
# Highest sampling temperature a flag takes (beyond ~2 samples are noise already).
MAX_TEMPERATURE = 100.0
# Sample events written per task (rank 0's first problems): enough to eyeball, not a dump.
SAMPLES_PER_TASK = 2


def task_source_flags() -> list[Flag]:
    """Where the task data comes from (shared with chat_rl, which reads its tasks alike)."""
    return [
        Flag(
            "task_source",
            str,
            "builtin",
            "builtin (offline data) or hub (the real datasets)",
            choices=("builtin", "hub"),
        ),
        Flag(
            "task_cache_dir",
            str,
            "",
            "downloaded task data (default <NANOCHAT_HOME>/task_data)",
            path=True,
        ),
    ]


FLAGS = FlagSet(
    "chat_eval",
    configs="chat_eval",
    description="Evaluate a chat checkpoint on the chat tasks and compute ChatCORE.",
    flags=[
        Flag(
            "checkpoint_dir", str, "", "the checkpoint directory to evaluate (required)", path=True
        ),
        Flag("step", int, -1, "checkpoint step (-1: the latest)", min=-1, max=MAX_STEPS),
        Flag("tasks", str, "", "comma-separated task names (default: all six chat tasks)"),
        *task_source_flags(),
        Flag("max_problems", int, -1, "problems per task (-1: all)", min=-1, max=MAX_STEPS),
        Flag(
            "batch_size",
            int,
            8,
            "prompts per forward pass (categorical tasks)",
            min=1,
            max=MAX_ROWS,
        ),
        Flag(
            "num_samples",
            int,
            1,
            "replies per problem (generative; pass if any passes)",
            min=1,
            max=MAX_ROWS,
        ),
        Flag(
            "max_rows",
            int,
            32,
            "rows decoded together (generative; >= num_samples)",
            min=1,
            max=MAX_ROWS,
        ),
        Flag(
            "max_new_tokens",
            int,
            512,
            "longest reply in tokens (generative)",
            min=1,
            max=MAX_SEQ_LEN,
        ),
        Flag(
            "temperature",
            float,
            0.0,
            "sampling temperature (0: greedy)",
            min=0,
            max=MAX_TEMPERATURE,
        ),
        Flag(
            "top_k", int, 50, "sample among the k likeliest tokens (0: off)", min=0, max=MAX_VOCAB
        ),
        Flag(
            "column",
            str,
            "",
            "report column (default: from the checkpoint's stage)",
            choices=("", "BASE", "MID", "SFT", "RL"),
        ),
        *runtime_flags("random seed (sampling)"),
        *output_flags(),
    ],
)


# ---- generation (shared with chat_rl) -------------------------------------------------------


@dataclass
class Sample:
    """One generated reply: its tokens (the stop token included), their masks (1 sampled,
    0 forced by the calculator) and the decoded text (without the stop token)."""

    tokens: list[int]
    masks: list[int]
    text: str
    finish_reason: FinishReason | None


def prompt_limit(model: LanguageModel, max_new_tokens: int) -> int:
    """The longest prompt that leaves room for `max_new_tokens` in the rotary table."""
    table = model.max_positions()
    return max(1, table - max_new_tokens)


def fit_prompt(ids: Sequence[int], limit: int) -> list[int]:
    """Keep the last `limit` tokens: the question sits at the end of a chat prompt."""
    ids = list(ids)
    return ids if len(ids) <= limit else ids[len(ids) - limit :]


def generate_samples(
    model: LanguageModel,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 42,
    max_rows: int = 32,
    seeds: Sequence[int] | None = None,
) -> list[list[Sample]]:
    """`num_samples` replies to each prompt, decoded with continuous batching.

    Prompts join the batch as rows free up, each prefilled once and shared by its samples
    (`Batch.add_samples`), so short replies do not hold long ones back. Problem i samples with
    seed `seeds[i]` (default `seed + i`): its replies do not depend on what else shares the
    batch. Rows stop at `<|assistant_end|>` (or BOS) or after `max_new_tokens`; calculator
    calls get their results forced in, as in the chat.
    """
    if not prompts:
        return []
    limit = prompt_limit(model, max_new_tokens)
    prompts = [fit_prompt(p, limit) for p in prompts]
    seeds = [seed + i for i in range(len(prompts))] if seeds is None else list(seeds)
    table = model.max_positions()
    max_len = min(table, max(len(p) for p in prompts) - 1 + max_new_tokens)
    batch = Batch(model, tokenizer, max_rows=max(max_rows, num_samples), max_len=max(max_len, 1))
    results: list[list[Sample | None]] = [[None] * num_samples for _ in prompts]
    owners: dict[Row, int] = {}
    stops = {tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")}
    waiting = 0
    while waiting < len(prompts) or batch.rows:
        while waiting < len(prompts) and batch.free_rows >= num_samples:
            params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                    top_k=top_k, seed=seeds[waiting])  # fmt: skip
            for row in batch.add_samples(prompts[waiting], params, num_samples):
                owners[row] = waiting
            waiting += 1
        for row, _token, _mask in batch.step():
            if not row.done:
                continue
            tokens = row.output_tokens
            body = tokens[:-1] if tokens and tokens[-1] in stops else tokens
            sample = Sample(list(tokens), list(row.masks), tokenizer.decode(body),
                            row.finish_reason)  # fmt: skip
            results[owners.pop(row)][row.index] = sample
    return results  # type: ignore[return-value]


# ---- categorical scoring --------------------------------------------------------------------


def letter_ids(tokenizer: Tokenizer, letters: Iterable[str]) -> list[int]:
    """The single token of each answer letter; a letter that is several tokens is an error."""
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise ValueError(
                f"answer letter {letter!r} is {len(encoded)} tokens with this tokenizer; "
                "categorical scoring needs each letter to be exactly one token"
            )
        ids.append(encoded[0])
    return ids


@torch.no_grad()
def score_categorical(
    model: LanguageModel,
    tokenizer: Tokenizer,
    conversations: Sequence[Mapping[str, Any]],
    runtime: Runtime,
    batch_size: int = 8,
) -> list[str]:
    """The chosen letter for each multiple-choice conversation.

    Prompts are padded on the right and run `batch_size` at a time; causal attention means
    the padding never reaches a row's real positions, so each row's last real position gives
    the same logits as running it alone. Only the conversation's allowed letters compete.
    """
    limit = model.max_positions()
    pad = tokenizer.get_bos_token_id()
    chosen: list[str] = []
    for start in range(0, len(conversations), batch_size):
        group = conversations[start : start + batch_size]
        prompts = [fit_prompt(tokenizer.render_for_completion(dict(c)), limit) for c in group]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        with runtime.autocast():
            logits = model(ids.to(runtime.device))
        last = torch.tensor([len(p) - 1 for p in prompts], device=logits.device)
        final = logits[torch.arange(len(prompts), device=logits.device), last].float()
        for row, conversation in zip(final, group, strict=True):
            letters = list(conversation.get("letters") or [])
            if not letters:
                raise ValueError("a categorical conversation needs a non-empty 'letters' list")
            candidates = torch.tensor(letter_ids(tokenizer, letters), device=row.device)
            chosen.append(letters[int(row[candidates].argmax())])
    return chosen


# ---- one task -------------------------------------------------------------------------------


@dataclass
class TaskResult:
    """Counts for one task, summed over ranks."""

    name: str
    correct: int = 0
    total: int = 0
    # Completions with an extractable "#### <n>" answer, for tasks whose answers have one.
    formatted: int = 0
    format_total: int = 0
    samples: list[tuple[str, str]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def format_rate(self) -> float | None:
        return self.formatted / self.format_total if self.format_total else None


def gold_text(conversation: Mapping[str, Any]) -> str:
    """The text of the conversation's last (assistant) message, tool parts flattened."""
    content = conversation["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


def has_numeric_answer(conversation: Mapping[str, Any]) -> bool:
    """Whether the reference answer ends in "#### <n>" (GSM8K, SpellingBee)."""
    return extract_answer(gold_text(conversation)) is not None


def evaluate_task(
    name: str,
    task: Any,
    model: LanguageModel,
    tokenizer: Tokenizer,
    runtime: Runtime,
    config: Mapping[str, Any],
) -> TaskResult:
    """Grade this rank's share of `task` (problems rank, rank + world, ...), counts all-reduced."""
    result = TaskResult(name)
    indices = range(runtime.rank, len(task), runtime.world_size)
    conversations = [task[i] for i in indices]
    if task.eval_type == "categorical":
        letters = score_categorical(model, tokenizer, conversations, runtime, config["batch_size"])
        for conversation, letter in zip(conversations, letters, strict=True):
            result.correct += bool(task.evaluate(conversation, letter))
            if len(result.samples) < SAMPLES_PER_TASK:
                result.samples.append((_prompt_text(conversation), letter))
        result.total = len(conversations)
    elif task.eval_type == "generative":
        prompts = [tokenizer.render_for_completion(dict(c)) for c in conversations]
        top_k = config["top_k"] or None
        replies = generate_samples(
            model, tokenizer, prompts, num_samples=config["num_samples"],
            max_new_tokens=config["max_new_tokens"], temperature=config["temperature"],
            top_k=top_k, max_rows=config["max_rows"],
            seeds=[config["seed"] + i for i in indices],
        )  # fmt: skip
        for conversation, samples in zip(conversations, replies, strict=True):
            passed = [bool(task.evaluate(conversation, s.text)) for s in samples]
            result.correct += any(passed)
            if has_numeric_answer(conversation):
                result.format_total += len(samples)
                result.formatted += sum(extract_answer(s.text) is not None for s in samples)
            if len(result.samples) < SAMPLES_PER_TASK:
                result.samples.append((_prompt_text(conversation), samples[0].text))
        result.total = len(conversations)
    else:
        raise ValueError(f"task {name}: unknown eval_type {task.eval_type!r}")
    counts = torch.tensor(
        [result.correct, result.total, result.formatted, result.format_total],
        dtype=torch.long, device=runtime.device,
    )  # fmt: skip
    runtime.all_reduce_sum(counts)
    result.correct, result.total, result.formatted, result.format_total = counts.tolist()
    return result


def _prompt_text(conversation: Mapping[str, Any]) -> str:
    """The last user message, for sample events."""
    users = [m for m in conversation["messages"] if m["role"] == "user"]
    return users[-1]["content"] if users else ""


# ---- ChatCORE and the report ----------------------------------------------------------------


def chatcore(accuracies: Mapping[str, float]) -> float | None:
    """Mean centred accuracy over the six chat tasks; None unless all six are present."""
    names = chat_eval_tasks()
    if any(name not in accuracies for name in names):
        return None
    return centered_mean({name: accuracies[name] for name in names})


def column_for(checkpoint_dir: Path, meta: Mapping[str, Any]) -> str:
    """The report column of a checkpoint: its meta's stage, else its `<stage>_checkpoints`
    folder, else BASE (base training records no stage)."""
    stage = meta.get("stage")
    if stage is None:
        parent = checkpoint_dir.resolve().parent.name
        stage = parent.removesuffix("_checkpoints") if parent.endswith("_checkpoints") else "base"
    column = STAGE_COLUMNS.get(str(stage).lower())
    if column is None:
        raise ValueError(
            f"{checkpoint_dir}: unknown checkpoint stage {stage!r}; give --column "
            f"({', '.join(STAGE_COLUMNS.values())})"
        )
    return column


def parse_tasks(spec: str) -> list[str]:
    """The task names of `--tasks` (default all six), checked against the chat tasks."""
    known = chat_eval_tasks()
    names = [n.strip() for n in spec.split(",") if n.strip()] if spec else list(known)
    if not names:
        raise ValueError("tasks: no task names given")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"tasks: unknown task(s) {', '.join(unknown)} (known: {', '.join(known)})")
    return list(dict.fromkeys(names))


def report_markdown(
    column: str,
    checkpoint: str,
    step: int,
    results: Sequence[TaskResult],
    score: float | None,
    model: Sequence[str] = (),
) -> str:
    """The section; `model`: lines describing the model (training.report.model_lines)."""
    lines = [
        f"## Chat evaluation ({column})",
        f"- checkpoint: {checkpoint} (step {step})",
        *model,
        "",
        "| Task | Accuracy | Correct | Problems | Format |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        fmt = "" if r.format_rate is None else f"{r.format_rate:.4f}"
        label = SUMMARY_NAMES.get(r.name, r.name)
        lines.append(f"| {label} | {r.accuracy:.4f} | {r.correct} | {r.total} | {fmt} |")
    lines.append("")
    if score is None:
        lines.append("- ChatCORE: not computed (needs all six chat tasks)")
    else:
        lines.append(f"- ChatCORE: {score:.4f}")
    return "\n".join(lines) + "\n"


# ---- the program ----------------------------------------------------------------------------


def evaluate(config: dict[str, Any], runtime: Runtime, events: EventWriter) -> dict[str, Any]:
    names = parse_tasks(config["tasks"])
    model, tokenizer, meta, directory = load_evaluated(config, runtime)
    column = config["column"] or column_for(directory, meta)
    step = int(meta.get("step", 0))
    if config["num_samples"] > config["max_rows"]:
        raise ValueError(
            f"max_rows: {config['max_rows']} rows cannot hold num_samples={config['num_samples']}"
        )
    derived = {
        "checkpoint_dir": str(directory),
        "checkpoint_step": step,
        "column": column,
        "tasks": names,
        "model_config": model.config.to_dict(),
        "dtype": str(runtime.dtype).removeprefix("torch."),
    }
    runtime.print(format_config(config))
    events.start(config, total_steps=len(names), world_size=runtime.world_size,
                 device=str(runtime.device), program="chat_eval", derived=derived)  # fmt: skip
    slicing = {} if config["max_problems"] < 0 else {"stop": config["max_problems"]}
    # The task_source "builtin" is the tasks' small offline data, "hub" the real datasets.
    data_source = HUB if config["task_source"] == "hub" else OFFLINE
    results: list[TaskResult] = []
    for name in names:
        try:
            task = build_task(name, "test", source=config["task_source"],
                              cache_dir=config["task_cache_dir"] or None, **slicing)  # fmt: skip
        except SandboxUnavailable as exc:
            # HumanEval without isolation is refused, not the whole evaluation: the other
            # tasks still count, and the result says why this one has no score.
            events.eval_result(name, "accuracy", None, {"skipped": str(exc)}, data_source)
            runtime.print(f"{name}: skipped ({exc})")
            continue
        result = evaluate_task(name, task, model, tokenizer, runtime, config)
        results.append(result)
        details: dict[str, Any] = {"correct": result.correct, "total": result.total}
        if result.format_rate is not None:
            details["format_rate"] = result.format_rate
        if isinstance(task, HumanEval):
            details["sandbox_mode"] = task.sandbox_mode  # "isolated", or "weak" where allowed
        events.eval_result(name, "accuracy", result.accuracy, details, data_source)
        if result.format_rate is not None:
            events.eval_result(
                name,
                "format",
                result.format_rate,
                {"formatted": result.formatted, "total": result.format_total},
                data_source,
            )
        for prompt, completion in result.samples:
            events.sample(step, f"[{name}] {prompt}", completion)
        fmt = "" if result.format_rate is None else f", format {result.format_rate:.4f}"
        runtime.print(f"{name}: accuracy {result.accuracy:.4f} "
                      f"({result.correct}/{result.total}){fmt}")  # fmt: skip

    accuracies = {r.name: r.accuracy for r in results}
    score = chatcore(accuracies)
    values: dict[str, float] = {f"{n}/accuracy": a for n, a in accuracies.items()}
    if score is not None:
        values["chatcore"] = score
        runtime.print(f"ChatCORE: {score:.4f}")
    else:
        runtime.print("ChatCORE: not computed (needs all six chat tasks)")
    events.eval(step, values, data_source)
    markdown = report_markdown(column, str(directory), step, results, score,
                               model=model_lines(derived["model_config"]))  # fmt: skip
    summary = {SUMMARY_NAMES[n]: a for n, a in accuracies.items() if n in SUMMARY_NAMES}
    if score is not None:
        summary["ChatCORE"] = score
    events.report(f"Chat evaluation ({column})", markdown)
    if runtime.master:
        write_section(config["report_dir"] or None, f"chat_eval_{column.lower()}", markdown,
                      summary=summary, column=column)  # fmt: skip
    return {"column": column, "step": step, "accuracies": accuracies, "chatcore": score}


def main(argv: list[str] | None = None) -> int:
    return program_main(FLAGS, evaluate, argv)


if __name__ == "__main__":
    cancel_on_sigterm()
    sys.exit(main())
