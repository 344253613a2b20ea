"""What every family does after its last norm, and its ground-truth generation, in one place.

A language model's output has three callers with different needs: training wants only the
loss and its gradient (the fused, chunked head + cross-entropy of engine/fused_loss.py: no
(tokens x vocab) logits kept), evaluation wants each token's loss without autograd (a few rows
of logits at a time: a d20 batch's full fp32 logits are 17 GB), and everything else wants
logits. The families differ only in the head's weight (tied or not), the soft-cap and how
logits are made, so they pass those in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from engine.fused_loss import softcap_linear_cross_entropy

LOSS_REDUCTIONS = ("mean", "none", "sum")
# fp32 logits per chunk when evaluation computes per-token losses (`token_losses`): 2048
# tokens of an 8k vocabulary, 256 of a 64k one.
EVAL_LOGITS_CHUNK_BYTES = 64 * 2**20


def check_forward_args(
    idx: torch.Tensor, targets: torch.Tensor | None, loss_reduction: str
) -> None:
    """The shape and argument checks every family's forward starts with."""
    if idx.dim() != 2 or idx.is_floating_point():
        raise ValueError(f"idx must be a (B, T) integer tensor, got {idx.dtype} {tuple(idx.shape)}")
    if targets is not None and targets.shape != idx.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}"
        )
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")


def head_output(
    x: torch.Tensor,
    targets: torch.Tensor | None,
    loss_reduction: str,
    *,
    weight: torch.Tensor,
    vocab_size: int,
    softcap: float | None,
    logits: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """From the final hidden states x (B, T, C): fp32 logits (B, T, vocab) without targets;
    with them the loss ('none': (B, T), targets of -1 ignored).

    weight: the head's (padded vocab, C) matrix; softcap: the logit cap (None: none);
    logits(hidden rows) -> fp32 logits of the real vocabulary, as the family makes them.
    """
    batch, seq = x.shape[:2]
    if targets is not None and loss_reduction != "none" and torch.is_grad_enabled():
        # Training: head + cap + loss fused and chunked.
        device_type = x.device.type
        dtype = (
            torch.get_autocast_dtype(device_type)
            if torch.is_autocast_enabled(device_type)
            else x.dtype
        )
        return softcap_linear_cross_entropy(
            x.reshape(-1, x.size(-1)),
            weight,
            targets.reshape(-1),
            vocab_size=vocab_size,
            softcap=softcap,
            reduction=loss_reduction,
            compute_dtype=dtype,
        )
    if targets is not None and loss_reduction == "none" and not torch.is_grad_enabled():
        return token_losses(x, targets, vocab_size, logits)
    out = logits(x)
    if targets is None:
        return out
    loss = F.cross_entropy(
        out.reshape(-1, out.size(-1)),
        targets.reshape(-1),
        ignore_index=-1,
        reduction=loss_reduction,
    )
    return loss.view(batch, seq) if loss_reduction == "none" else loss


def token_losses(
    x: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    logits: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Per-token loss (B, T) without autograd, a few rows of logits at a time.

    Evaluation needs only the loss of each token, so its (B, T, vocab) fp32 logits -- 128 MiB
    for a CPU demo batch, 17 GB for a d20 one -- never exist at once. Each row's loss is the
    same number either way, up to how a matmul over fewer rows rounds (last bits).
    """
    batch, seq = targets.shape
    hidden, flat_targets = x.reshape(batch * seq, -1), targets.reshape(-1)
    losses = torch.empty(flat_targets.shape, dtype=torch.float32, device=x.device)
    step = max(1, EVAL_LOGITS_CHUNK_BYTES // (4 * vocab_size))
    for start in range(0, flat_targets.numel(), step):
        rows = slice(start, start + step)
        losses[rows] = F.cross_entropy(
            logits(hidden[rows]), flat_targets[rows], ignore_index=-1, reduction="none"
        )
    return losses.view(batch, seq)


@torch.inference_mode()
def generate_naive(
    next_logits: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    tokens: Sequence[int],
    max_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 42,
    context: int | None = None,
) -> Iterator[int]:
    """Yield up to `max_tokens` continuation tokens, re-running the whole sequence each step.

    Slow on purpose: the ground truth the cached engine must reproduce (SPEC §9).
    next_logits(ids (1, T)) -> (1, vocab) logits of the last position; context: condition on
    at most this many last tokens (a model with learned positions cannot place more).
    """
    if not tokens:
        raise ValueError("generate_naive needs at least one prompt token")
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
    rng = torch.Generator(device=device).manual_seed(seed)
    for _ in range(max_tokens):
        window = ids if context is None else ids[:, -context:]
        next_id = sample_next_token(next_logits(window), rng, temperature, top_k)
        ids = torch.cat((ids, next_id), dim=1)
        yield int(next_id.item())


def sample_next_token(
    logits: torch.Tensor,
    rng: torch.Generator,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """(B, V) logits -> (B, 1) token ids: argmax at temperature 0, else sampled (top-k optional)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive or None, got {top_k}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None:
        values, indices = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
        probs = F.softmax(values / temperature, dim=-1)
        return indices.gather(-1, torch.multinomial(probs, 1, generator=rng))
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=rng)
