"""The lm_head, the logit soft-cap and cross-entropy in one chunked pass, for training.

Done naively, a batch of N tokens materialises N x vocab logits several times over (matmul
output, fp32 copy, /15, tanh, x15, log-softmax, and as many again in backward). At 4096 tokens
and an 8k vocab that is 33M floats per pass: on a CPU these memory-bound passes cost more
than the matmuls themselves. Here the tokens are processed a chunk at a time, so each chunk's
logits stay in cache, and the gradient with respect to the hidden states and the head weight
is computed in the same pass (the loss is a sum over tokens, so its gradient is known up to
the one upstream scalar). Backward then only scales the stored gradients.

Used only for `loss_reduction` 'mean'/'sum' with gradients; evaluation ('none') keeps the plain
path in gpt.py, and the test suite checks both give the same loss and gradients.
"""

from __future__ import annotations

import torch

# Tokens per chunk: 1024 tokens x 8192 vocab x 4 bytes = 32 MiB of fp32 logits per pass
# at most; smaller chunks did not help on a 2-core CPU, larger ones spill to memory.
DEFAULT_CHUNK = 1024


class _SoftcapLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, softcap, reduction, chunk, dtype):
        n = hidden.shape[0]
        w = weight[:vocab_size].to(dtype)
        h_all = hidden.to(dtype)
        valid_all = targets >= 0
        count = int(valid_all.sum())
        scale = 1.0 / max(count, 1) if reduction == "mean" else 1.0
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty((n, hidden.shape[1]), dtype=dtype, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, n, chunk):
            h = h_all[start : start + chunk]
            tgt = targets[start : start + chunk]
            valid = valid_all[start : start + chunk]
            z = (h @ w.t()).float()
            t = torch.tanh(z.div_(softcap))
            s = t * softcap
            lse = torch.logsumexp(s, dim=-1)
            safe = tgt.clamp(min=0)
            picked = s.gather(1, safe[:, None]).squeeze(1)
            total += ((lse - picked) * valid).sum()
            # d loss / d s = softmax(s) - onehot(target); through the cap: x (1 - tanh^2).
            g = s.sub_(lse[:, None]).exp_()
            g.scatter_add_(1, safe[:, None], -valid[:, None].to(g.dtype))
            g.mul_(t.square_().neg_().add_(1.0))
            g.mul_((valid.to(g.dtype) * scale)[:, None])
            g = g.to(dtype)
            grad_hidden[start : start + chunk] = g @ w
            grad_weight[:vocab_size] += (g.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.hidden_dtype = hidden.dtype
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            (grad_hidden * grad_output).to(ctx.hidden_dtype),
            (grad_weight * grad_output).to(ctx.weight_dtype),
            None, None, None, None, None, None,
        )  # fmt: skip


def softcap_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_size: int,
    softcap: float,
    reduction: str = "mean",
    compute_dtype: torch.dtype | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Cross-entropy of `softcap * tanh((hidden @ weight[:vocab].T) / softcap)` vs targets.

    hidden (N, C), weight (V_padded, C), targets (N,) with -1 = ignore. Matmuls run in
    `compute_dtype` (default: hidden's dtype), the softmax in fp32.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    dtype = compute_dtype or hidden.dtype
    return _SoftcapLinearCrossEntropy.apply(
        hidden, weight, targets, vocab_size, softcap, reduction, chunk, dtype
    )
