"""Base model evaluation: CORE, train/val bits per byte and greedy samples of one checkpoint.

    python -m training.base_eval --checkpoint-dir ~/.cache/nanochat/base_checkpoints/d20
    torchrun --standalone --nproc_per_node=8 -m training.base_eval --checkpoint-dir ... \
        --bundle-dir download --report-dir ~/.cache/nanochat/report

By default CORE runs on the small offline bundle shipped in training/corpus/core (a smoke test
of the pipeline, not a number to compare with published ones); `--bundle-dir download` fetches
the public 22-task DCLM bundle once. Bits per byte needs the pretraining shards; without them
that part is skipped with a note rather than failing the whole evaluation. Under torchrun the
CORE items and the bpb batches are split over the ranks and the counts summed; rank 0 alone
samples, writes events and the report section.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from engine.paths import data_home
from engine.tokenizer import Tokenizer
from training.base_train import SAMPLE_PROMPTS
from training.checkpoints import load_evaluated
from training.core_eval import (
    SHIPPED_BUNDLE,
    CoreResult,
    CoreTask,
    TaskResult,
    bundle_data_source,
    evaluate_core,
    load_bundle,
    resolve_bundle,
)
from training.dataloader import pretrain_batches
from training.events import EventWriter
from training.flags import (
    MAX_ROWS,
    MAX_SEQ_LEN,
    MAX_STEPS,
    MAX_TOKENS,
    Flag,
    FlagSet,
    format_config,
    output_flags,
)
from training.loop import format_duration
from training.loss_eval import evaluate_bpb
from training.program import cancel_on_sigterm, program_main
from training.report import model_lines, write_section
from training.runtime import Runtime, runtime_flags

FLAGS = FlagSet(
    "base_eval",
    configs="base_eval",
    description="Evaluate a base checkpoint: CORE, train/val bits per byte, samples.",
    flags=[
        Flag("checkpoint_dir", str, "", "base checkpoint directory to evaluate", path=True),
        Flag("step", int, -1, "checkpoint step (-1: the latest)", min=-1, max=MAX_STEPS),
        Flag(
            "bundle_dir",
            str,
            "",
            "CORE bundle directory ('' = the small offline one shipped, 'download' = public DCLM)",
            path=True,
        ),  # fmt: skip
        Flag(
            "max_per_task",
            int,
            -1,
            "evaluate at most this many items per task (<= 0: all)",
            min=-1,
            max=MAX_STEPS,
        ),
        Flag(
            "data_dir",
            str,
            "",
            "parquet shards for train/val bpb (default <NANOCHAT_HOME>/base_data if present)",
            path=True,
        ),  # fmt: skip
        Flag(
            "eval_tokens",
            int,
            20 * 2**20,
            "tokens per split for bits per byte",
            min=1,
            max=MAX_TOKENS,
        ),
        Flag(
            "device_batch_size",
            int,
            32,
            "sequences per forward pass for bpb",
            min=1,
            max=MAX_ROWS,
        ),
        Flag(
            "sample_tokens",
            int,
            16,
            "greedy tokens per sample prompt (0: no samples)",
            min=0,
            max=MAX_SEQ_LEN,
        ),
        *runtime_flags(),
        *output_flags(),
    ],
)
REPORT_KEY, REPORT_TITLE = "base_eval", "Base model evaluation"


def _data_dir(configured: str) -> Path | None:
    if configured:
        path = Path(configured)
        if not path.is_dir():
            raise FileNotFoundError(f"data_dir: {path} does not exist")
        return path
    default = data_home() / "base_data"
    return default if default.is_dir() else None


def _bundle(config: dict[str, Any], runtime: Runtime) -> tuple[Path, list[CoreTask]]:
    # The public bundle is downloaded by rank 0 alone; the others wait, then read it.
    if runtime.master:
        bundle = resolve_bundle(config["bundle_dir"])
    runtime.barrier()
    if not runtime.master:
        bundle = resolve_bundle(config["bundle_dir"])
    return bundle, load_bundle(bundle)


def bits_per_byte(
    model, tokenizer: Tokenizer, data_dir: Path, config: dict[str, Any], runtime: Runtime
) -> dict[str, float]:
    B, T = config["device_batch_size"], model.config.sequence_len
    steps = max(1, config["eval_tokens"] // (B * T * runtime.world_size))
    token_bytes = tokenizer.token_bytes()
    results = {}
    for split in ("train", "val"):
        batches = pretrain_batches(
            data_dir, tokenizer, B, T, split=split, rank=runtime.rank,
            world_size=runtime.world_size, device=runtime.device,
        )  # fmt: skip
        results[f"{split}/bpb"] = evaluate_bpb(model, batches, steps, token_bytes, runtime)
    return results


@torch.no_grad()
def greedy_samples(
    model, tokenizer: Tokenizer, runtime: Runtime, max_tokens: int
) -> list[tuple[str, str]]:
    samples = []
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        with runtime.autocast():
            out = list(model.generate_naive(ids, max_tokens, temperature=0.0))
        samples.append((prompt, tokenizer.decode(out)))
    return samples


def report_markdown(
    directory: Path,
    step: int,
    bundle: Path,
    tasks: list[CoreTask],
    core: CoreResult,
    bpb: dict[str, float],
    notes: list[str],
    samples: list[tuple[str, str]],
    model: Sequence[str] = (),
) -> str:
    """The section; `model`: lines describing the model (training.report.model_lines)."""
    by_label = {t.label: t for t in tasks}
    lines = [
        f"## {REPORT_TITLE}",
        f"timestamp: {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        f"- checkpoint: {directory} (step {step})",
        *model,
        f"- CORE bundle: {'offline (shipped)' if bundle == SHIPPED_BUNDLE else bundle} "
        f"({len(tasks)} tasks)",
    ]
    lines += [f"- {name}: {value:.4f}" for name, value in bpb.items()]
    lines += [f"- note: {note}" for note in notes]
    lines += [
        f"- CORE: {core.core:.4f}",
        "",
        "| Task | Type | Shots | Items | Accuracy | Centered |",
        "|---|---|---|---|---|---|",
    ]
    for result in core.tasks:
        task = by_label[result.label]
        lines.append(
            f"| {result.label} | {task.task_type} | {task.num_fewshot} | {result.n} | "
            f"{result.accuracy:.4f} | {result.centered:.4f} |"
        )
    if samples:
        lines += ["", "### Samples", ""]
        lines += [f"- {prompt!r} -> {completion!r}" for prompt, completion in samples]
    return "\n".join(lines) + "\n"


def evaluate(config: dict[str, Any], runtime: Runtime, events: EventWriter) -> dict[str, Any]:
    started = time.time()
    model, tokenizer, meta, directory = load_evaluated(config, runtime)
    step = int(meta.get("step", 0))
    bundle, tasks = _bundle(config, runtime)
    data_source = bundle_data_source(bundle)
    data_dir = _data_dir(config["data_dir"])
    runtime.print(format_config(config))
    events.start(
        config, total_steps=0, world_size=runtime.world_size, device=str(runtime.device),
        program="base_eval", step=step, checkpoint=str(directory), bundle=str(bundle),
        tasks=[t.label for t in tasks],
    )  # fmt: skip
    described = model_lines(model.config.to_dict(), model.num_scaling_params())
    runtime.print(f"checkpoint {directory} step {step}: {described[0].removeprefix('- model: ')}, "
                  f"vocab {tokenizer.vocab_size:,}; CORE bundle {bundle}")  # fmt: skip

    notes: list[str] = []
    bpb: dict[str, float] = {}
    if data_dir is None:
        notes.append("train/val bpb skipped: no --data-dir given and no default dataset")
        runtime.print(f"note: {notes[-1]}")
    else:
        bpb = bits_per_byte(model, tokenizer, data_dir, config, runtime)
        runtime.print(" | ".join(f"{k} {v:.4f}" for k, v in bpb.items()))

    def on_task(result: TaskResult) -> None:
        runtime.print(f"{result.label:<28} accuracy {result.accuracy:.4f} "
                      f"centered {result.centered:+.4f} ({result.correct}/{result.n})")  # fmt: skip
        details = {"accuracy": result.accuracy, "baseline": result.baseline, "n": result.n}
        events.eval_result(result.label, "centered", result.centered, details, data_source)

    core = evaluate_core(model, tokenizer, tasks, runtime, config["max_per_task"], on_task)
    runtime.print(f"CORE: {core.core:.4f}")
    events.eval(step, {"core": core.core, **bpb}, data_source)

    samples: list[tuple[str, str]] = []
    if runtime.master and config["sample_tokens"] > 0:
        samples = greedy_samples(model, tokenizer, runtime, config["sample_tokens"])
        for prompt, completion in samples:
            runtime.print(f"sample: {prompt!r} -> {completion!r}")
            events.sample(step, prompt, completion)

    markdown = report_markdown(directory, step, bundle, tasks, core, bpb, notes, samples,
                               model=described)  # fmt: skip
    events.report(REPORT_TITLE, markdown)
    if runtime.master:
        write_section(config["report_dir"], REPORT_KEY, markdown, summary={"CORE": core.core},
                      column="BASE")  # fmt: skip
    runtime.print(f"done in {format_duration(time.time() - started)}")
    return {"step": step, "core": core.to_dict(), **bpb}


def main(argv: list[str] | None = None) -> int:
    return program_main(FLAGS, evaluate, argv)


if __name__ == "__main__":
    cancel_on_sigterm()
    sys.exit(main())
