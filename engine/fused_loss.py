"""The lm_head, the logit soft-cap and cross-entropy in one chunked pass, for training.

Done naively, a batch of N tokens materialises N x vocab logits several times over (matmul
output, fp32 copy, /15, tanh, x15, log-softmax, and as many again in backward). At 4096 tokens
and an 8k vocab that is 33M floats per pass: on a CPU these memory-bound passes cost more
than the matmuls themselves. Here the tokens are processed a chunk at a time, so each chunk's
logits stay in cache, and the gradient with respect to the hidden states and the head weight
is computed in the same pass (the loss is a sum over tokens, so its gradient is known up to
the one upstream scalar). Backward then only scales the stored gradients.

Per chunk the vocabulary-wide work is seven passes: fp32 copy, /cap, tanh, x cap, softmax (one
row-local kernel), x (row weight), and tanh's derivative, cast to the compute dtype. The loss
comes from the softmax itself: -log p[target] equals logsumexp - logit, and p cannot underflow
because capped logits lie within ±cap (p >= e^(-2 cap) / vocab). The matmuls run on groups of
chunks (`MATMUL_ROWS`).

Chunk sizes depend on the device (`chunk_sizes`): a CPU wants a chunk's logits to stay in its
cache (the tuned 256/1024 below); a GPU has no such cache to fit but pays per kernel launch and,
under torch.compile, per unrolled loop iteration, so its chunks are as large as a fixed fp32
budget allows. Nothing reads a tensor's value on the host (the mean's token count stays a
tensor), so a GPU never waits here and a compiled step has no graph break.

Used only for `loss_reduction` 'mean'/'sum' with gradients; evaluation ('none') keeps the plain
path in gpt.py, and the test suite checks both give the same loss and gradients.
"""

from __future__ import annotations

import torch

# Tokens per elementwise chunk. 256 tokens x 8192 vocab x 4 bytes = 8 MiB per fp32 pass.
# Measured on the 2-core dev box (depth 4, 8k vocab, bf16, 4096 tokens, forward + backward):
# chunks of 1024 took 350 ms, 256 took 210 ms with the one-matmul-per-chunk kernel that came
# before; above 32 MiB per tensor glibc serves every allocation with a fresh mmap, so each
# pass also paid for page faults. With matmul groups, 32 to 256 all take ~115 ms.
DEFAULT_CHUNK = 256
# Tokens per matmul: the head matmuls run on groups of whole chunks this large, which keeps
# them efficient and adds each group's weight gradient to the fp32 total once, not per chunk.
MATMUL_ROWS = 1024
# On a GPU: the bytes of one chunk's fp32 logits (about three such tensors live at once, plus
# the matmul group's logits and gradient in the compute dtype). 64 MiB is 512 rows of a 32k
# vocabulary: 128 chunks for a 32 x 2048 device batch.
GPU_CHUNK_BYTES = 64 * 2**20
GPU_GROUP_CHUNKS = 4
# e^(-2 cap) / vocab must stay a normal fp32 number (> 1.2e-38) for -log p to be exact
# enough: cap 30 leaves a margin for vocabularies up to ~10^8.
MAX_SOFTCAP = 30.0


class _SoftcapLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, softcap, reduction, chunk, group, dtype):
        # Explicit dtypes below; autocast would only add casts of what is already cast.
        with torch.autocast(hidden.device.type, enabled=False):
            return _forward(ctx, hidden, weight, targets, vocab_size, softcap, reduction, chunk,
                            group, dtype)  # fmt: skip

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            (grad_hidden * grad_output).to(ctx.hidden_dtype),
            (grad_weight * grad_output).to(ctx.weight_dtype),
            None, None, None, None, None, None, None,
        )  # fmt: skip


def _forward(ctx, hidden, weight, targets, vocab_size, softcap, reduction, chunk, group, dtype):
    n = hidden.shape[0]
    device = hidden.device
    w = weight[:vocab_size].to(dtype)
    h_all = hidden.to(dtype)
    valid_all = targets >= 0
    # Each token's share of the loss: 0 for ignored targets. The mean's scale stays on the
    # device: reading the count back would make every step wait for the GPU.
    row_weight_all = valid_all.to(torch.float32)
    if reduction == "mean":
        scale = 1.0 / row_weight_all.sum().clamp(min=1.0)
        row_weight_all = row_weight_all * scale
    else:
        scale = 1.0
    total = torch.zeros((), dtype=torch.float32, device=device)
    grad_hidden = torch.empty((n, hidden.shape[1]), dtype=dtype, device=device)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device)
    group = max(chunk, group // chunk * chunk)
    for g_start in range(0, n, group):
        g_stop = min(g_start + group, n)
        h = h_all[g_start:g_stop]
        logits = h @ w.t()
        grad_logits = torch.empty_like(logits)
        for start in range(0, g_stop - g_start, chunk):
            rows = slice(start, start + chunk)
            total += _chunk_grad(
                logits[rows],
                targets[g_start:g_stop][rows],
                valid_all[g_start:g_stop][rows],
                row_weight_all[g_start:g_stop][rows, None],
                softcap,
                out=grad_logits[rows],
            )
        torch.mm(grad_logits, w, out=grad_hidden[g_start:g_stop])
        grad_weight[:vocab_size] += grad_logits.t() @ h
    ctx.save_for_backward(grad_hidden, grad_weight)
    ctx.hidden_dtype = hidden.dtype
    ctx.weight_dtype = weight.dtype
    return total * scale


def _chunk_grad(logits, targets, valid, row_weight, softcap, *, out):
    """Loss sum of one chunk of rows; writes d loss / d logits into `out`."""
    if softcap is None:
        return _plain_chunk_grad(logits, targets, valid, row_weight, out=out)
    capped = logits.float().div_(softcap).tanh_()
    probs = torch.softmax(capped * softcap, dim=-1)
    safe = targets.clamp(min=0)[:, None]
    nll = probs.gather(1, safe).log_().neg_()
    # d loss / d capped logit = (softmax - onehot(target)) * row weight, then through the cap:
    # x (1 - tanh^2), which tanh_backward computes in one pass.
    probs.mul_(row_weight).scatter_add_(1, safe, -row_weight)
    if out.dtype == probs.dtype:
        torch.ops.aten.tanh_backward.grad_input(probs, capped, grad_input=out)
    else:
        # In place, then one cast: faster than tanh_backward writing another dtype itself.
        out.copy_(torch.ops.aten.tanh_backward.grad_input(probs, capped, grad_input=probs))
    return torch.where(valid[:, None], nll, 0.0).sum()


def _plain_chunk_grad(logits, targets, valid, row_weight, *, out):
    """`_chunk_grad` without a cap: uncapped logits can be far apart, so the loss comes from
    logsumexp - logit (a softmax probability could underflow to 0 and its log to -inf)."""
    x = logits.float()
    safe = targets.clamp(min=0)[:, None]
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    nll = lse - x.gather(1, safe)
    probs = x.sub_(lse).exp_()
    probs.mul_(row_weight).scatter_add_(1, safe, -row_weight)
    out.copy_(probs)
    return torch.where(valid[:, None], nll, 0.0).sum()


def chunk_sizes(device: torch.device | str, vocab_size: int) -> tuple[int, int]:
    """(chunk, matmul_rows) for `device`: the CPU-tuned constants on a CPU (and MPS), rows
    filling `GPU_CHUNK_BYTES` of fp32 logits (a multiple of 64, at least 256) on CUDA."""
    if torch.device(device).type != "cuda":
        return DEFAULT_CHUNK, MATMUL_ROWS
    rows = max(DEFAULT_CHUNK, GPU_CHUNK_BYTES // (4 * vocab_size) // 64 * 64)
    return rows, rows * GPU_GROUP_CHUNKS


def softcap_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_size: int,
    softcap: float | None,
    reduction: str = "mean",
    compute_dtype: torch.dtype | None = None,
    chunk: int | None = None,
    matmul_rows: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of `softcap * tanh((hidden @ weight[:vocab].T) / softcap)` vs targets
    (of the plain logits `hidden @ weight[:vocab].T` with softcap None: GPT-2 and the hybrid).

    hidden (N, C), weight (V_padded, C), targets (N,) with -1 = ignore. Matmuls run in
    `compute_dtype` (default: hidden's dtype) on `matmul_rows` tokens at a time (rounded down
    to whole chunks), the softmax in fp32 on `chunk` tokens at a time; both default to
    `chunk_sizes` for hidden's device.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if softcap is not None and not 0 < softcap <= MAX_SOFTCAP:
        raise ValueError(f"softcap must be None or in (0, {MAX_SOFTCAP}], got {softcap!r}")
    dtype = compute_dtype or hidden.dtype
    default_chunk, default_rows = chunk_sizes(hidden.device, vocab_size)
    chunk = chunk or default_chunk
    matmul_rows = matmul_rows or default_rows
    return _SoftcapLinearCrossEntropy.apply(
        hidden, weight, targets, vocab_size, softcap, reduction, chunk, matmul_rows, dtype
    )
