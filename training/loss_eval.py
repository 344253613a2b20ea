"""Bits per byte: a loss that does not depend on the tokenizer.

Cross-entropy per token favours big vocabularies; dividing the summed loss (in nats, turned to
bits) by the UTF-8 bytes those tokens stand for makes models with different tokenizers
comparable. Tokens with zero bytes (special tokens) are left out of both sums.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from training.runtime import Runtime


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
    was_training = model.training
    model.eval()
    for _ in range(steps):
        inputs, targets = next(batches)[:2]
        with runtime.autocast():
            loss = model(inputs, targets, loss_reduction="none").flatten()
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
