"""Fine-tuning a trained model (any family) on conversations: the loop mid-training and SFT share.

Both stages start from a saved checkpoint rather than from random weights, read conversations
from a task mixture instead of text shards, and differ only in how they turn conversations
into rows and which tokens they learn:

- mid-training (`dense` packing) concatenates rendered conversations into one token stream and
  cuts it into rows, training on every token: the model learns the chat format itself (special
  tokens, turn structure, tool calls) as ordinary language modelling;
- SFT (`masked` packing, `training.dataloader.sft_batches`) packs whole conversations into rows
  by best fit and pads the rest; targets are -1 on padding and wherever the render mask is 0,
  so only the assistant's own tokens are learned.

What this module owns, once for both programs: the shared flags, finding and loading the
source checkpoint with its tokenizer (refusing a tokenizer of another vocabulary; what RL and
the evaluations share with it is in training/checkpoints.py), building
the mixtures with errors that name the flag, planning the number of steps up front (so every
rank of a torchrun job takes the same number and the LR schedule knows its end), the
optimizer (the base optimizer with every LR times `init_lr_frac` and, as in base training,
times sqrt(batch / 2^19): `training.scaling.optimizer_hyperparameters`), the schedule (an
optional warmup, flat, then a linear decay to `final_lr_frac` over the last `warmdown_ratio` of
the steps), evaluation, checkpoints, the report section and the events.

Loss normalisation: a masked batch holds a varying number of supervised tokens, so each
micro-batch's summed loss is divided by the number of supervised tokens of the whole step
(every micro-batch of every rank). The gradient is then that of the mean loss per supervised
token of the step, however the tokens happen to fall into micro-batches and ranks. (The summed
loss is taken as the micro-batch's mean times its supervised tokens, so that an auxiliary loss
a family adds in training -- the hybrid's MoE load balancing -- counts per token too.)
"""

from __future__ import annotations

import gc
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import checkpoint as ckpt
from engine.models.registry import config_from_dict
from engine.tokenizer import Tokenizer
from training.checkpoints import (
    checkpoint_flags,
    resolve_output,
    resolve_source_dir,
    save_tokenizer_copy,
)
from training.dataloader import sft_batches
from training.events import EventWriter
from training.flags import (
    AUTO,
    MAX_EPOCHS,
    MAX_ROWS,
    MAX_SEQ_LEN,
    MAX_STEPS,
    Flag,
    format_config,
    output_flags,
)
from training.loop import (
    LoopState,
    StepReporter,
    due,
    format_duration,
    model_metrics,
    resource_lines,
    save_training_checkpoint,
    timing_summary,
)
from training.memory import (
    BatchChoice,
    choose_device_batch,
    device_batch_for,
    planned_batch,
    planning_gpu,
)
from training.optim import (
    LR_NAMES,
    MAX_LR_FRAC,
    MAX_WEIGHT_DECAY,
    build_for,
    effective_groups,
    lr_flags,
    recipe_flags,
    set_schedule,
)
from training.report import model_lines, write_section
from training.runtime import Runtime, maybe_compile, runtime_flags
from training.scaling import (
    MAX_BATCH_TOKENS,
    lr_multiplier,
    muon_momentum,
    optimizer_hyperparameters,
)
from training.tasks.registry import parse_mixture

PACKINGS = ("dense", "masked")
TASK_SOURCES = ("builtin", "hub")
# Conversations longer than this are cut when rendered (SPEC §3); masked rows cut at T + 1.
RENDER_MAX_TOKENS = 2048
# Logits (fp32 values) evaluated per forward pass at most: 2^28 = 1 GiB.
EVAL_LOGITS_BUDGET = 2**28

Batch = tuple[torch.Tensor, torch.Tensor, dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    """What distinguishes one fine-tuning program from the other."""

    program: str  # module name under training/, e.g. "chat_sft"
    stage: str  # checkpoint meta "stage": "mid" | "sft"
    title: str  # report section title
    checkpoints: str  # output folder under the data home, e.g. "sft_checkpoints"
    source_stages: tuple[str, ...]  # where to look for a source, in order of preference
    packing: str  # "dense" (every token) | "masked" (assistant tokens only)


def finetune_flags(
    *, default_mixture: str, init_lr_frac: float, stage: Stage, warmdown_ratio: float = 0.2
) -> list[Flag]:
    """The flags of a fine-tuning program (both programs have the same ones, different defaults)."""
    sources = " else ".join(f"<NANOCHAT_HOME>/{s}" for s in stage.source_stages)
    return [
        # source
        Flag(
            "source_dir",
            str,
            "",
            f"checkpoint directory to start from (default: the largest d<N> model in {sources})",
            path=True,
        ),
        Flag(
            "source_step",
            int,
            -1,
            "step of the source checkpoint (-1: the latest)",
            min=-1,
            max=MAX_STEPS,
        ),
        Flag(
            "tokenizer_dir",
            str,
            "",
            "tokenizer (default: the one saved with the source checkpoint); must match the model",
            path=True,
        ),
        # data
        Flag(
            "mixture",
            str,
            default_mixture,
            "training conversations: comma-separated task names; name*k repeats a task, "
            "customjson:FILE.jsonl adds your own",
        ),
        Flag(
            "val_mixture",
            str,
            "",
            "validation conversations, test split (default: the mixture's tasks, once each)",
        ),
        Flag(
            "task_source",
            str,
            "builtin",
            "builtin (small offline data) or hub (the public datasets, downloaded once)",
            choices=TASK_SOURCES,
        ),
        Flag(
            "task_cache_dir",
            str,
            "",
            "where hub datasets are cached (default <NANOCHAT_HOME>/task_data)",
            path=True,
        ),
        # horizon and batch
        Flag(
            "num_epochs",
            int,
            1,
            "passes over the mixture (when num_iterations is -1)",
            min=1,
            max=MAX_EPOCHS,
        ),
        Flag(
            "num_iterations",
            int,
            -1,
            "optimizer steps (-1: from num_epochs)",
            min=-1,
            max=MAX_STEPS,
        ),
        Flag(
            "device_batch_size",
            int,
            AUTO,
            "rows per forward pass per process; auto (-1): the largest power of two up to 32 "
            "whose predicted step fits the GPU (the machine's memory on a CPU), with gradient "
            "accumulation keeping the total batch",
            min=1,
            max=MAX_ROWS,
            auto=AUTO,
        ),
        Flag(
            "total_batch_size",
            int,
            -1,
            "tokens per optimizer step (-1: one forward pass per process, no accumulation)",
            min=-1,
            max=MAX_BATCH_TOKENS,
        ),
        Flag(
            "max_seq_len",
            int,
            -1,
            "row length in tokens (<= 0: the model's sequence_len)",
            min=-1,
            max=MAX_SEQ_LEN,
        ),
        # optimization
        *recipe_flags(),
        *lr_flags(),
        Flag(
            "init_lr_frac",
            float,
            init_lr_frac,
            "every LR is the base LR times this",
            min=0,
            max=MAX_LR_FRAC,
        ),
        Flag(
            "lr_batch_scaling",
            bool,
            True,
            "scale every LR by sqrt(batch / 2^19), as base training does",
        ),
        Flag("warmup_ratio", float, 0.0, "fraction of steps of linear LR warmup", min=0, max=1),
        Flag(
            "warmdown_ratio",
            float,
            warmdown_ratio,
            "fraction of steps at the end over which the LR decays linearly to final_lr_frac",
            min=0,
            max=1,
        ),
        Flag("final_lr_frac", float, 0.0, "LR multiplier at the end of the warmdown", min=0, max=1),
        Flag("weight_decay", float, 0.0, "Muon cautious weight decay", min=0, max=MAX_WEIGHT_DECAY),
        # evaluation and checkpoints
        Flag(
            "eval_every",
            int,
            100,
            "steps between validation evaluations (<= 0: only at the end)",
            min=-1,
            max=MAX_STEPS,
        ),
        Flag("eval_steps", int, 20, "validation batches per evaluation", min=1, max=MAX_STEPS),
        Flag(
            "save_every",
            int,
            -1,
            "steps between checkpoints (<= 0: only at the end)",
            min=-1,
            max=MAX_STEPS,
        ),
        Flag("log_every", int, 1, "print a log line every N steps", min=1, max=MAX_STEPS),
        # runtime
        *runtime_flags(compile=True),
        # outputs
        *checkpoint_flags(stage.checkpoints),
        *output_flags(),
    ]


# ---- the source checkpoint ------------------------------------------------------------------


@dataclass
class Source:
    checkpoint_dir: Path
    step: int
    meta: dict[str, Any]
    tokenizer: Tokenizer
    tokenizer_dir: Path

    @property
    def model_tag(self) -> str:
        return self.checkpoint_dir.name

    @property
    def stage(self) -> str:
        # Base checkpoints predate the "stage" key; anything unlabelled is a base model.
        return str(self.meta.get("stage") or "base")

    def load_model(self, runtime: Runtime) -> torch.nn.Module:
        """The source weights on the run's device, in fp32 (the optimizer's master weights)."""
        model, _ = ckpt.load_model(
            self.checkpoint_dir, self.step, device=runtime.device, dtype=torch.float32
        )
        model.train()
        return model

    def describe(self) -> dict[str, Any]:
        """What the new checkpoint's meta records about where it came from."""
        return {
            "checkpoint_dir": str(self.checkpoint_dir),
            "step": self.step,
            "stage": self.stage,
            "model_tag": self.model_tag,
        }


def check_vocab(
    checkpoint_dir: str | Path, model_vocab: int, tokenizer: Tokenizer, tokenizer_dir: str | Path
) -> None:
    """Refuse a tokenizer whose ids do not match the model's embedding table.

    A mismatched tokenizer would not crash -- the ids simply mean other tokens, or index past
    the table -- so it would silently train garbage; this must be caught before any step.
    """
    if model_vocab != tokenizer.vocab_size:
        raise ValueError(
            f"checkpoint {checkpoint_dir} has a model of vocab_size {model_vocab} but the "
            f"tokenizer {tokenizer_dir} has {tokenizer.vocab_size} tokens: use the tokenizer "
            f"the model was trained with"
        )


def find_source(config: dict[str, Any], stage: Stage) -> Source:
    """The source checkpoint's directory, step, meta and tokenizer, checked against each other.

    The weights are not read here (`Source.load_model`), so that every cheap check -- paths,
    vocabulary, the mixture -- can fail before a multi-GB load.
    """
    directory = resolve_source_dir(config["source_dir"], stage.source_stages)
    try:
        step = ckpt.latest_step(directory) if config["source_step"] < 0 else config["source_step"]
        meta_file = ckpt.meta_path(directory, step)
        if not meta_file.is_file():
            available = ckpt.list_steps(directory)
            raise FileNotFoundError(
                f"no checkpoint of step {step} in {directory} (available: {available})"
            )
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"source_dir: {exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"source_dir: {meta_file} is not valid JSON: {exc}") from None
    model_vocab = (meta.get("model_config") or {}).get("vocab_size")
    if not isinstance(model_vocab, int):
        raise ValueError(f"source_dir: {meta_file} has no model_config.vocab_size")
    if config["tokenizer_dir"]:
        tokenizer_dir = Path(config["tokenizer_dir"])
        tokenizer = Tokenizer.load(tokenizer_dir)
    else:
        tokenizer_dir = ckpt.tokenizer_dir(directory)
        try:
            tokenizer = ckpt.load_tokenizer_for(directory)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{exc}; pass --tokenizer-dir") from None
    check_vocab(directory, model_vocab, tokenizer, tokenizer_dir)
    return Source(directory, step, meta, tokenizer, tokenizer_dir)


# ---- data -----------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def build_mixture(
    spec: str,
    split: str,
    config: dict[str, Any],
    flag: str = "mixture",
    *,
    skip_missing_splits: bool = False,
):
    """`parse_mixture(spec, split)`, with any error turned into one line naming the flag."""
    try:
        return parse_mixture(
            spec,
            split,
            source=config["task_source"],
            cache_dir=config["task_cache_dir"] or None,
            skip_missing_splits=skip_missing_splits,
        )
    except ValueError as exc:
        raise ValueError(f"{flag}: {_one_line(exc)}") from None
    except OSError as exc:
        raise OSError(f"{flag}: {_one_line(exc)}") from None


def default_val_spec(spec: str) -> str:
    """The entries of a mixture spec to validate on: each distinct task once (weights dropped)."""
    entries = []
    for raw in spec.split(","):
        entry = raw.strip()
        head, star, weight = entry.rpartition("*")
        if star and weight.strip().isdigit():
            entry = head.strip()
        if entry and entry not in entries:
            entries.append(entry)
    return ",".join(entries)


def build_val_mixture(config: dict[str, Any]):
    """The validation conversations: `val_mixture`, else the training tasks' test splits.

    By default each task of the training mixture counts once, and tasks without a test split
    (mmlu_aux) are left out; a custom JSONL file has no splits and validates on itself.
    """
    if config["val_mixture"].strip():
        return build_mixture(config["val_mixture"], "test", config, flag="val_mixture")
    spec = default_val_spec(config["mixture"])
    return build_mixture(spec, "test", config, skip_missing_splits=True)


def _describe_conversation(conversations: Any, index: int) -> str:
    task_at = getattr(conversations, "task_at", None)
    if task_at is not None:
        try:
            return f"conversation {index} (task {task_at(index).name})"
        except (IndexError, ValueError):
            pass
    return f"conversation {index}"


def _render(tokenizer: Tokenizer, conversations: Any, index: int, max_tokens: int) -> list[int]:
    try:
        ids, _ = tokenizer.render_conversation(conversations[index], max_tokens=max_tokens)
    except ValueError as exc:
        where = _describe_conversation(conversations, index)
        raise ValueError(f"{where}: {_one_line(exc)}") from None
    return ids


def render_lengths(
    conversations: Any, tokenizer: Tokenizer, max_tokens: int, rank: int = 0, world_size: int = 1
) -> dict[int, int]:
    """Rendered length of each conversation this rank reads (indices rank, rank + world, ...).

    One pass up front: it also finds a malformed conversation before the first step.
    """
    return {
        index: len(_render(tokenizer, conversations, index, max_tokens))
        for index in range(rank, len(conversations), world_size)
    }


class _LengthsOnly:
    """Stands in for the conversations *and* the tokenizer to replay SFT packing on lengths.

    `sft_batches` reads a conversation by index and renders it; handing it this object as
    both makes each "conversation" an index whose "rendering" is that many placeholder tokens,
    so the packer itself (not a copy of its rules) says how many batches a pass yields.
    """

    def __init__(self, size: int, lengths: dict[int, int], bos: int) -> None:
        self.size, self.lengths, self.bos = size, lengths, bos

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index

    def get_bos_token_id(self) -> int:
        return self.bos

    def render_conversation(self, index: int, max_tokens: int) -> tuple[list[int], list[int]]:
        length = min(self.lengths[index], max_tokens)
        return [self.bos] * length, [0] * length


def count_masked_batches(
    size: int,
    lengths: dict[int, int],
    bos: int,
    B: int,
    T: int,
    rank: int,
    world_size: int,
    num_epochs: int,
) -> int:
    """How many batches `sft_batches(..., num_epochs=num_epochs)` yields on this rank."""
    stand_in = _LengthsOnly(size, lengths, bos)
    stream = sft_batches(
        stand_in, stand_in, B, T, rank=rank, world_size=world_size, num_epochs=num_epochs
    )
    return sum(1 for _ in stream)


def count_dense_batches(total_tokens: int, B: int, T: int) -> int:
    """Full batches in a stream of `total_tokens` tokens cut as `dense_batches` does."""
    return max(0, (total_tokens - 1) // (B * T))


def dense_batches(
    conversations: Any,
    tokenizer: Tokenizer,
    B: int,
    T: int,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    max_tokens: int = RENDER_MAX_TOKENS,
) -> Iterator[Batch]:
    """Endless `(inputs, targets, progress)` of conversations rendered back to back.

    Rank `r` of `w` reads conversations `r, r+w, ...` pass after pass, renders each
    (`<|bos|>` first) and appends it to one token stream; every batch takes the next `B*T + 1`
    tokens, `inputs` the first `B*T` and `targets` the last, as (B, T), and the last token
    stays for the next batch. Nothing is padded or masked: every token is a target, and a
    conversation may continue from one row into the next. `progress` is
    `{"consumed": conversations read, "epochs": consumed / this rank's share}`.
    """
    if B < 1 or T < 1:
        raise ValueError(f"B and T must be positive, got B={B}, T={T}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    mine = range(rank, len(conversations), world_size)
    if not mine:
        raise ValueError(
            f"rank {rank} of {world_size} gets none of the {len(conversations)} conversations"
        )
    return _dense_stream(conversations, mine, tokenizer, B, T, torch.device(device), max_tokens)


def _dense_stream(
    conversations: Any,
    mine: range,
    tokenizer: Tokenizer,
    B: int,
    T: int,
    device: torch.device,
    max_tokens: int,
) -> Iterator[Batch]:
    need = B * T + 1
    stream: list[int] = []
    consumed = 0
    while True:
        while len(stream) < need:
            stream.extend(_render(tokenizer, conversations, mine[consumed % len(mine)], max_tokens))
            consumed += 1
        chunk = np.asarray(stream[:need], dtype=np.int64)
        del stream[: need - 1]
        inputs = torch.from_numpy(chunk[:-1].reshape(B, T))
        targets = torch.from_numpy(chunk[1:].reshape(B, T))
        non_blocking = device.type == "cuda"
        if non_blocking:
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        progress = {"consumed": consumed, "epochs": consumed / len(mine)}
        yield (
            inputs.to(device, non_blocking=non_blocking),
            targets.to(device, non_blocking=non_blocking),
            progress,
        )


def make_batches(
    stage: Stage,
    conversations: Any,
    tokenizer: Tokenizer,
    B: int,
    T: int,
    runtime: Runtime,
    num_epochs: int | None = None,
) -> Iterator[Batch]:
    """The stage's training (or validation) batches for this rank; endless unless num_epochs."""
    mine = {"rank": runtime.rank, "world_size": runtime.world_size, "device": runtime.device}
    if stage.packing == "masked":
        return sft_batches(conversations, tokenizer, B, T, **mine, num_epochs=num_epochs)
    # Dense batches never run short (the stream loops), so num_epochs only matters to the plan.
    max_tokens = max(RENDER_MAX_TOKENS, T + 1)
    return dense_batches(conversations, tokenizer, B, T, **mine, max_tokens=max_tokens)


# ---- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    num_iterations: int
    grad_accum_steps: int
    total_batch_size: int  # tokens per optimizer step, padding included
    source: str  # "num_iterations" | "num_epochs"
    num_epochs: int | None  # passes the stream is limited to (None: endless)
    epoch_tokens: int | None  # rendered tokens of one pass, all ranks (None: not counted)


def plan_steps(
    config: dict[str, Any],
    stage: Stage,
    conversations: Any,
    tokenizer: Tokenizer,
    B: int,
    T: int,
    runtime: Runtime,
) -> Plan:
    """Batch arithmetic and the number of optimizer steps, identical on every rank.

    With `num_iterations` given that is the horizon. Otherwise every rank renders its share
    once and counts how many micro-batches `num_epochs` passes yield; ranks may differ by a
    batch or two, so all take the smallest count (a rank that stopped early would leave the
    others waiting forever in their gradient all-reduce).
    """
    tokens_per_pass = B * T * runtime.world_size
    total_batch = config["total_batch_size"]
    if total_batch <= 0:
        total_batch = tokens_per_pass
    if total_batch % tokens_per_pass:
        raise ValueError(
            f"total_batch_size: {total_batch} tokens per step must be a multiple of "
            f"device_batch_size x max_seq_len x processes = {B} x {T} x {runtime.world_size}"
        )
    accum = total_batch // tokens_per_pass
    if config["num_iterations"] > 0:
        return Plan(config["num_iterations"], accum, total_batch, "num_iterations", None, None)
    if config["num_iterations"] == 0:
        raise ValueError("num_iterations: must be positive, or -1 to train for num_epochs")
    epochs = config["num_epochs"]
    if len(conversations) < runtime.world_size:
        raise ValueError(
            f"mixture: {len(conversations)} conversation(s) cannot feed "
            f"{runtime.world_size} processes"
        )
    if stage.packing == "masked":
        lengths = render_lengths(conversations, tokenizer, T + 1, runtime.rank, runtime.world_size)
        micro = count_masked_batches(
            len(conversations),
            lengths,
            tokenizer.get_bos_token_id(),
            B,
            T,
            runtime.rank,
            runtime.world_size,
            epochs,
        )
    else:
        lengths = render_lengths(
            conversations,
            tokenizer,
            max(RENDER_MAX_TOKENS, T + 1),
            runtime.rank,
            runtime.world_size,
        )
        micro = count_dense_batches(epochs * sum(lengths.values()), B, T)
    gathered = runtime.all_gather_object((micro, sum(lengths.values())))
    steps = min(count for count, _ in gathered) // accum
    epoch_tokens = sum(tokens for _, tokens in gathered)
    if steps < 1:
        raise ValueError(
            f"mixture: {len(conversations)} conversations ({epoch_tokens:,} tokens) x "
            f"{epochs} epoch(s) do not fill one step of {total_batch:,} tokens; lower "
            f"device_batch_size / max_seq_len or raise num_epochs"
        )
    return Plan(steps, accum, total_batch, "num_epochs", epochs, epoch_tokens)


def choose_batch(config: dict[str, Any], source: Source, T: int, runtime: Runtime) -> BatchChoice:
    """The device batch for this device: the given one (refused only if not even one row of
    the source model fits), or auto's pick (training/memory.py)."""
    model_config = config_from_dict({**source.meta["model_config"], "sequence_len": T})
    return device_batch_for(
        model_config,
        config["device_batch_size"],
        device=runtime.device,
        world_size=runtime.world_size,
        dtype=runtime.dtype,
        max_batch=planned_batch(
            config["device_batch_size"], config["total_batch_size"], T, runtime.world_size
        ),
    )


def memory_choice(
    config: dict[str, Any], model_config: dict[str, Any], world_size: int
) -> BatchChoice | None:
    """Before anything runs (the web app's check): the device batch and predicted memory per
    GPU of fine-tuning the model of `model_config` (a checkpoint's meta), or None for a run
    meant for a CPU. Raises ValueError naming device_batch_size when not even one row fits
    this server's GPU (or a reference H100-80GB where it has none)."""
    if str(config["device"]).startswith(("cpu", "mps")):
        return None
    fields = dict(model_config)
    if config["max_seq_len"] > 0:
        fields["sequence_len"] = config["max_seq_len"]
    T = fields["sequence_len"]
    capacity, where = planning_gpu()
    return choose_device_batch(
        config_from_dict(fields),
        config["device_batch_size"],
        capacity_bytes=capacity,
        where=where,
        world_size=world_size,
        dtype="fp32" if config["dtype"] == "fp32" else "bf16",
        max_batch=planned_batch(
            config["device_batch_size"], config["total_batch_size"], T, world_size
        ),
    )


def planning_config(config: dict[str, Any], T: int, world_size: int) -> dict[str, Any]:
    """The config `plan_steps` plans with: under auto, an automatic total batch (-1: one
    pass per process) becomes the one pass of the batch auto starts from, so a GPU that
    fits fewer rows accumulates more micro-batches instead of taking smaller steps."""
    if config["device_batch_size"] > 0 or config["total_batch_size"] > 0:
        return config
    rows = planned_batch(config["device_batch_size"], -1, T, world_size)
    return {**config, "total_batch_size": rows * T * world_size}


# ---- training -------------------------------------------------------------------------------


def finetune_lr_multiplier(
    step: int,
    total: int,
    warmdown_ratio: float,
    *,
    warmup_ratio: float = 0.0,
    final_lr_frac: float = 0.0,
) -> float:
    """An optional linear warmup, 1.0, then a linear decay to `final_lr_frac` over the last
    `warmdown_ratio` of the steps (nanochat's SFT: no warmup, the last half, down to 0)."""
    return lr_multiplier(step, total, warmup_ratio, warmdown_ratio, final_lr_frac)


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    batches: Iterator,
    steps: int,
    token_bytes: torch.Tensor,
    runtime: Runtime,
) -> dict[str, float]:
    """Mean loss per target token and bits per byte over `steps` batches, all ranks together.

    Targets of -1 (prompts, padding) count in neither; zero-byte targets (special tokens)
    count in the loss but not in bits per byte, which measures only text.
    """
    token_bytes = token_bytes.to(runtime.device)
    vocab_size = token_bytes.numel()
    # nats (all targets), targets, nats (text targets), bytes
    totals = torch.zeros(4, dtype=torch.float64, device=runtime.device)
    was_training = model.training
    model.eval()
    for _ in range(steps):
        inputs, targets = next(batches)[:2]
        # A few rows at a time: the full (B, T, vocab) fp32 logits of a large batch would take
        # tens of GB (32 x 2048 x 65536 x 4 bytes = 17 GB, before the soft-cap's temporaries).
        rows = max(1, EVAL_LOGITS_BUDGET // (inputs.size(1) * vocab_size))
        with runtime.autocast():
            loss = torch.cat([
                model(inputs[i : i + rows], targets[i : i + rows], loss_reduction="none").flatten()
                for i in range(0, inputs.size(0), rows)
            ]).double()  # fmt: skip
        flat = targets.flatten()
        valid = flat >= 0
        nbytes = torch.where(valid, token_bytes[flat.clamp(min=0)], 0)
        totals += torch.stack(
            [
                (loss * valid).sum(),
                valid.sum().double(),
                (loss * (nbytes > 0)).sum(),
                nbytes.sum().double(),
            ]
        )
    model.train(was_training)
    runtime.all_reduce_sum(totals)
    nats, count, text_nats, nbytes = totals.tolist()
    return {
        "val/loss": nats / count if count else math.inf,
        "val/bpb": text_nats / (math.log(2) * nbytes) if nbytes else math.inf,
    }


def run_finetune(
    config: dict[str, Any], runtime: Runtime, events: EventWriter, stage: Stage
) -> dict[str, Any]:
    """The whole program: load, plan, train, evaluate, save, report. Returns the summary."""
    started = time.time()
    source = find_source(config, stage)
    tokenizer = source.tokenizer
    context = source.meta["model_config"].get("sequence_len", 0)
    T = config["max_seq_len"] if config["max_seq_len"] > 0 else context
    if context < T:
        raise ValueError(
            f"max_seq_len: {T} is longer than the model's context ({context}, "
            f"from {source.checkpoint_dir})"
        )
    batch = choose_batch(config, source, T, runtime)
    runtime.print(f"memory: {batch.describe()} [{batch.estimate.breakdown()}]")
    B = batch.device_batch_size
    train_set = build_mixture(config["mixture"], "train", config)
    val_set = build_val_mixture(config)
    plan = plan_steps(planning_config(config, T, runtime.world_size), stage, train_set,
                      tokenizer, B, T, runtime)  # fmt: skip
    total = plan.num_iterations
    model = source.load_model(runtime)
    model_tag, checkpoint_dir = resolve_output(config, stage.checkpoints, source.checkpoint_dir)

    frac = config["init_lr_frac"]
    # Every LR of the recipe the flags pick, Muon's groups' or the adamw recipe's, times frac;
    # then the batch scaling every stage shares (SFT's decay is taken as given: nanochat's is 0
    # since pretraining already took its decay to zero).
    lrs = {name: config[name] * frac for name in (*LR_NAMES, "adamw_lr")}
    hparams = optimizer_hyperparameters(
        total_batch_size=plan.total_batch_size,
        weight_decay=config["weight_decay"],
        lr_batch_scaling=config.get("lr_batch_scaling", True),
    )
    optimizer = build_for(model, config, weight_decay=hparams.weight_decay,
                          lr_scale=hparams.lr_scale, lr_frac=frac,
                          compute_dtype=runtime.dtype)  # fmt: skip
    muon = config["optimizer"] == "muon"
    if runtime.master:
        save_tokenizer_copy(tokenizer, checkpoint_dir)
    flops_per_token = model.estimate_flops()
    params = model.num_scaling_params()
    derived = {
        "source": source.describe(),
        "model_tag": model_tag,
        "checkpoint_dir": str(checkpoint_dir),
        "model_config": model.config.to_dict(),
        "parameters": params,
        "flops_per_token": flops_per_token,
        "packing": stage.packing,
        "max_seq_len": T,
        "device_batch_size": B,
        "memory": batch.to_dict(),
        "train_conversations": len(train_set),
        "val_conversations": len(val_set),
        "epoch_tokens": plan.epoch_tokens,
        "num_iterations": total,
        "horizon_source": plan.source,
        "total_batch_size": plan.total_batch_size,
        "grad_accum_steps": plan.grad_accum_steps,
        "learning_rates": lrs,
        # Every group's LR, betas and decay after all scaling: what the run actually used.
        "optimizer": {**hparams.to_dict(), "groups": effective_groups(optimizer)},
        "dtype": str(runtime.dtype).removeprefix("torch."),
    }
    runtime.print(format_config(config))
    runtime.print(json.dumps(derived, indent=2))
    events.start(
        config,
        total_steps=total,
        world_size=runtime.world_size,
        device=str(runtime.device),
        program=stage.program,
        derived=derived,
        start_step=0,
    )

    train_model = maybe_compile(model, config["compile"], runtime)
    batches = make_batches(stage, train_set, tokenizer, B, T, runtime, plan.num_epochs)
    token_bytes = tokenizer.token_bytes()
    reporter = StepReporter(runtime, total, plan.total_batch_size, flops_per_token)
    state = LoopState()
    val: dict[str, float] = {}
    trained_tokens = 0
    epochs_done = 0.0

    while True:
        step = state.step
        last = step == total
        if due(step, config["eval_every"], total):
            val_batches = make_batches(stage, val_set, tokenizer, B, T, runtime)
            val = evaluate_loss(model, val_batches, config["eval_steps"], token_bytes, runtime)
            if state.min_val_bpb is None or val["val/bpb"] < state.min_val_bpb:
                state.min_val_bpb = val["val/bpb"]
            runtime.print(
                f"step {step:05d} | val loss {val['val/loss']:.4f} | val bpb {val['val/bpb']:.4f}"
            )
            events.eval(step, val)
        if last or (config["save_every"] > 0 and step > 0 and step % config["save_every"] == 0):
            meta = {
                "stage": stage.stage,
                "source": source.describe(),
                "mixture": config["mixture"],
                "val_bpb": val.get("val/bpb"),
                "val_loss": val.get("val/loss"),
                "user_config": config,
                "derived": derived,
                "loop_state": state.to_dict(),
            }
            # No optimizer state: fine-tuning runs are not resumed, and it would double the size.
            save_training_checkpoint(runtime, events, checkpoint_dir, step, model, None, meta)
        if last:
            break

        reporter.start_step()
        micro = [next(batches) for _ in range(plan.grad_accum_steps)]
        count = torch.tensor(
            sum(int((t >= 0).sum()) for _, t, _ in micro),
            dtype=torch.float64,
            device=runtime.device,
        )
        step_tokens = runtime.all_reduce_sum(count).item()
        # The optimizer averages gradients over ranks; scaling by world / (step's tokens)
        # makes that average the gradient of the mean loss per supervised token.
        scale = runtime.world_size / max(step_tokens, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
        for inputs, targets, progress in micro:
            # The mean times the micro-batch's supervised tokens is their summed loss, plus any
            # auxiliary loss the family adds when training (a MoE's load balancing, which the
            # 'sum' reduction leaves out) weighted by those tokens, as each token's mean is.
            supervised = (targets >= 0).sum()
            with runtime.autocast():
                loss = train_model(inputs, targets) * supervised
            loss_sum += loss.detach().double()
            (loss * scale).backward()
            if progress.get("epochs") is not None:
                epochs_done = progress["epochs"]
        lr_mult = finetune_lr_multiplier(
            step, total, config["warmdown_ratio"], warmup_ratio=config.get("warmup_ratio", 0.0),
            final_lr_frac=config.get("final_lr_frac", 0.0),
        )  # fmt: skip
        set_schedule(optimizer, lr_mult=lr_mult, momentum=muon_momentum(step) if muon else None)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        state.step += 1
        trained_tokens += int(step_tokens)
        mean_loss = runtime.all_reduce_sum(loss_sum).item() / max(step_tokens, 1.0)
        values = reporter.end_step(state, mean_loss, lr_mult)
        values["train/lr"] = lrs["matrix_lr" if muon else "adamw_lr"] * hparams.lr_scale * lr_mult
        values["train/trained_tokens"] = step_tokens
        values["train/epoch"] = epochs_done
        values.update(model_metrics(model, optimizer))
        events.metrics(state.step, values)
        if state.step % config["log_every"] == 0 or state.step == total:
            runtime.print(reporter.format(state, values) + f" | epoch {epochs_done:.2f}")
        if state.step == 1:
            gc.collect()  # then keep the collector out of the timed loop
            gc.freeze()

    summary = {
        "val_loss": val.get("val/loss"),
        "val_bpb": val.get("val/bpb"),
        "min_val_bpb": state.min_val_bpb,
        "steps": total,
        "epochs": epochs_done,
        "trained_tokens": trained_tokens,
        **timing_summary(state, plan.total_batch_size, started, runtime),
    }
    runtime.print(
        f"done: {total} steps in {format_duration(summary['wall_time_sec'])}, "
        f"val bpb {summary['val_bpb']:.4f}"
    )
    markdown = report_markdown(stage, config, derived, summary)
    events.report(stage.title, markdown)
    if runtime.master:
        write_section(config["report_dir"] or None, stage.program, markdown)
    return summary


def report_markdown(
    stage: Stage, config: dict[str, Any], derived: dict[str, Any], summary: dict[str, Any]
) -> str:
    source = derived["source"]
    what = "every token (chat format)" if stage.packing == "dense" else "assistant tokens only"
    lines = [
        f"## {stage.title}",
        f"- source: {source['stage']} checkpoint {source['checkpoint_dir']} (step {source['step']})",
        *model_lines(derived["model_config"], derived.get("parameters")),
        f"- mixture: {config['mixture']} ({derived['train_conversations']:,} conversations)",
        f"- trained on: {what}",
        f"- steps: {summary['steps']} ({derived['horizon_source']}), batch "
        f"{derived['total_batch_size']:,} tokens, grad accum {derived['grad_accum_steps']}, "
        f"{summary['epochs']:.2f} epoch(s)",
        f"- supervised tokens: {summary['trained_tokens']:,}",
        f"- LR fraction of base: {config['init_lr_frac']} "
        f"(x{derived.get('optimizer', {}).get('lr_scale', 1.0):.4g} for the batch), "
        f"warmdown {config['warmdown_ratio']}",
        f"- precision: {derived['dtype']}",
    ]
    if summary.get("val_loss") is not None:
        lines.append(f"- validation loss: {summary['val_loss']:.4f}, bpb {summary['val_bpb']:.4f}")
    if summary.get("min_val_bpb") is not None:
        lines.append(f"- minimum validation bpb: {summary['min_val_bpb']:.4f}")
    lines += resource_lines(summary)
    lines.append(f"- checkpoint: {derived['checkpoint_dir']}")
    lines.append(f"- total training time: {format_duration(summary['training_time_sec'])}")
    return "\n".join(lines) + "\n"
