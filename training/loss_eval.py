"""Bits per byte: a loss that does not depend on the tokenizer.

Cross-entropy per token favours big vocabularies; dividing the summed loss (in nats, turned to
bits) by the UTF-8 bytes those tokens stand for makes models with different tokenizers
comparable. Tokens with zero bytes (special tokens) are left out of both sums.

The loss per token comes from the model's evaluation path, which materialises fp32 logits for
every token it is given: at a d20 shape (32 x 2048 tokens, 64k vocabulary) that is 17 GB, and
its soft-cap and log-softmax need as much again. So a batch is evaluated a few rows at a time
(`rows_per_forward`), each forward's fp32 logits within `EVAL_LOGITS_BYTES`, like the chunked
loss of training; the sums are the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from training.runtime import Runtime

# fp32 logits one evaluation forward may produce: 1 GiB is two rows of 2048 tokens with a 64k
# vocabulary, and leaves a CPU demo batch (16 x 256 x 8k = 128 MiB) in one forward.
EVAL_LOGITS_BYTES = 2**30


def rows_per_forward(rows: int, seq_len: int, vocab_size: int, budget: int | None = None) -> int:
    """How many of a batch's `rows` one forward takes: the most that keep its fp32 logits
    within `budget` (default `EVAL_LOGITS_BYTES`; at least one row), rounded down to a divisor
    of `rows` so every forward has the same shape (a compiled model would otherwise compile
    the remainder again)."""
    budget = EVAL_LOGITS_BYTES if budget is None else budget
    fit = max(1, budget // (4 * seq_len * vocab_size))
    if fit >= rows:
        return rows
    return max(d for d in range(1, fit + 1) if rows % d == 0)


@torch.no_grad()
def evaluate_bpb(
    model: torch.nn.Module,
    batches: Iterator,
    steps: int,
    token_bytes: torch.Tensor,
    runtime: Runtime,
) -> float:
    """Bits per byte over `steps` batches of (inputs, targets, ...) on every rank, all-reduced."""
    token_bytes = token_bytes.to(runtime.device)
    total_nats = torch.zeros((), dtype=torch.float64, device=runtime.device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=runtime.device)
    vocab_size = model.config.vocab_size
    was_training = model.training
    model.eval()
    for _ in range(steps):
        inputs, targets = next(batches)[:2]
        step = rows_per_forward(inputs.size(0), inputs.size(1), vocab_size)
        with runtime.autocast():
            loss = torch.cat([
                model(inputs[i : i + step], targets[i : i + step], loss_reduction="none").flatten()
                for i in range(0, inputs.size(0), step)
            ])  # fmt: skip
        flat = targets.flatten()
        valid = flat >= 0
        nbytes = torch.where(valid, token_bytes[flat.clamp(min=0)], 0)
        counted = nbytes > 0
        total_nats += (loss.double() * counted).sum()
        total_bytes += nbytes.sum()
    model.train(was_training)
    runtime.all_reduce_sum(total_nats)
    runtime.all_reduce_sum(total_bytes)
    if total_bytes.item() == 0:
        return math.inf
    return total_nats.item() / (math.log(2) * total_bytes.item())
