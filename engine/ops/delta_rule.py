"""The gated delta rule (Qwen3-Next linear attention) in three equal forms, plus a dispatcher.

Per batch row and head, with a state S of shape (Dk, Dv), decay alpha_t = exp(g_t) and write
strength beta_t (SPEC §13):

    S_t = alpha_t * S_{t-1} + k_t ⊗ (beta_t * (v_t - alpha_t * S_{t-1}ᵀ k_t))
    o_t = S_tᵀ q_t

The caller (the model) has already L2-normalised q and k and scaled q by 1/sqrt(Dk); nothing
here normalises. Shapes follow the projections' layout so no caller transposes: q, k
(B, T, H, Dk); v (B, T, H, Dv); g, beta (B, T, H); state (B, H, Dk, Dv).

Why three forms:

- `delta_rule_naive` is the recurrence written token by token for clarity. It is the reference
  every other form is tested against, and far too slow for anything but tests.
- `delta_rule_chunked` is what training and prefill run. The recurrence is sequential in T, but
  within a chunk of C tokens the corrections u_t = beta_t (v_t - alpha_t S_{t-1}ᵀ k_t) satisfy a
  unit lower-triangular system (the WY representation); solving it for every chunk at once turns
  the work into batched matmuls, and only the hand-over of S between chunks stays a Python loop
  (T / C steps instead of T). It is plain autograd, so training backprops through it.
- `delta_rule_recurrent` is what decode runs: one token per row per step, where the chunked
  form's padding and triangular solve are pure overhead. It updates one state buffer in place
  (when no gradient is needed) instead of allocating per step.

`delta_rule` picks among them: flash-linear-attention's Triton kernel on CUDA when the optional
`fla` package imports, else recurrent for T == 1 and chunked otherwise.

Precision: every form computes in float32 (float64 when given float64, for tests) whatever the
input dtype. The state is a running sum over the whole sequence and the chunk solve divides out
nothing but subtracts nearly-equal terms, so bf16 accumulation would drift with length; the
output is cast back to v's dtype and the final state is returned in the compute dtype (float32)
so decode continues from an unrounded state.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "delta_rule",
    "delta_rule_chunked",
    "delta_rule_naive",
    "delta_rule_recurrent",
    "fla_available",
]


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float32, or float64 when any input is float64 (lets tests compare at double precision)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _check_inputs(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None
) -> tuple[int, int, int, int, int]:
    """Validate shapes; return (B, T, H, Dk, Dv)."""
    if q.dim() != 4:
        raise ValueError(f"q must be (B, T, H, Dk), got shape {tuple(q.shape)}")
    B, T, H, Dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be (B, T, H, Dv) = ({B}, {T}, {H}, Dv), got {tuple(v.shape)}")
    Dv = v.shape[3]
    if g.shape != (B, T, H):
        raise ValueError(f"g must be (B, T, H) = ({B}, {T}, {H}), got {tuple(g.shape)}")
    if beta.shape != (B, T, H):
        raise ValueError(f"beta must be (B, T, H) = ({B}, {T}, {H}), got {tuple(beta.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, Dk, Dv):
        raise ValueError(
            f"initial_state must be (B, H, Dk, Dv) = ({B}, {H}, {Dk}, {Dv}), "
            f"got {tuple(initial_state.shape)}"
        )
    return B, T, H, Dk, Dv


def _initial(
    initial_state: Tensor | None, B: int, H: int, Dk: int, Dv: int, dtype, device
) -> Tensor:
    if initial_state is None:
        return torch.zeros(B, H, Dk, Dv, dtype=dtype, device=device)
    return initial_state.to(dtype)


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def delta_rule_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference: the recurrence one token at a time, exactly as written in the formula.

    Returns (o (B, T, H, Dv) in v's dtype, final_state (B, H, Dk, Dv) in float32).
    """
    B, T, H, Dk, Dv = _check_inputs(q, k, v, g, beta, initial_state)
    dt = _compute_dtype(q, k, v, g, beta, initial_state)
    S = _initial(initial_state, B, H, Dk, Dv, dt, q.device)
    outs = []
    for t in range(T):
        q_t = q[:, t].to(dt)  # (B, H, Dk)
        k_t = k[:, t].to(dt)
        v_t = v[:, t].to(dt)  # (B, H, Dv)
        alpha_t = g[:, t].to(dt).exp()[..., None, None]  # (B, H, 1, 1)
        beta_t = beta[:, t].to(dt)[..., None]  # (B, H, 1)
        decayed = alpha_t * S  # alpha_t * S_{t-1}
        recalled = torch.einsum("bhkv,bhk->bhv", decayed, k_t)  # alpha_t * S_{t-1}ᵀ k_t
        u_t = beta_t * (v_t - recalled)
        S = decayed + k_t[..., :, None] * u_t[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q_t))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, Dv, dtype=dt)
    return o.to(v.dtype), S


# --------------------------------------------------------------------------------------------
# Chunked (WY representation): training and prefill
# --------------------------------------------------------------------------------------------


def _unit_lower_inverse(A: Tensor, block: int = 16) -> Tensor:
    """(I + strict_lower(A))⁻¹ for a batch of (C, C) matrices; A's diagonal and upper triangle
    are not read.

    Forward substitution in blocks, every op batched over all matrices: the (block x block)
    diagonal blocks of every matrix are inverted together one row at a time (row i from rows
    < i: a (1 x i) @ (i x i) product), then each block row from the ones above it,
    X_I = -X_II (A_I,<I X_<I). That is block - 1 + 2 (C / block - 1) small matmuls instead of
    LAPACK's triangular solve, which on CPU loops over the batch one matrix at a time (and
    threads poorly at these sizes). Rows are built from already-inverted rows only, never from
    powers of A, so entries stay as bounded as the inverse's own (a Neumann series passes
    through A^j, whose entries grow like binomial coefficients when keys repeat)."""
    C = A.shape[-1]
    b = block if C % block == 0 else C
    nb = C // b
    inv = torch.zeros_like(A)
    # The diagonal blocks as one (..., nb, b, b) view of each tensor (no copy).
    lead = A.shape[:-2]
    diag_A = A.unflatten(-1, (nb, b)).unflatten(-3, (nb, b)).diagonal(dim1=-4, dim2=-2)
    diag_inv = inv.unflatten(-1, (nb, b)).unflatten(-3, (nb, b)).diagonal(dim1=-4, dim2=-2)
    diag_A, diag_inv = (x.permute(*range(len(lead)), -1, -3, -2) for x in (diag_A, diag_inv))
    diag_inv.diagonal(dim1=-2, dim2=-1).fill_(1)
    for i in range(1, b):
        row = diag_inv[..., i : i + 1, :i]
        row.copy_(diag_A[..., i : i + 1, :i] @ diag_inv[..., :i, :i]).neg_()
    for s in range(b, C, b):
        e = s + b
        inv[..., s:e, :s] = (inv[..., s:e, s:e] @ (A[..., s:e, :s] @ inv[..., :s, :s])).neg_()
    return inv


class _SolveUnitLower(torch.autograd.Function):
    """X = (I + strict_lower(A))⁻¹ B, with the inverse kept for backward.

    Backward is two batched matmuls with the saved inverse instead of a second triangular
    solve: dB = L⁻ᵀ dX and dA = -strict_lower(dB Xᵀ) (the diagonal is fixed at 1, so it
    gets no gradient, as with `solve_triangular(..., unitriangular=True)`)."""

    @staticmethod
    def forward(ctx, A: Tensor, B: Tensor) -> Tensor:
        inv = _unit_lower_inverse(A)
        X = inv @ B
        ctx.save_for_backward(inv, X)
        return X

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_X: Tensor) -> tuple[Tensor | None, Tensor | None]:
        inv, X = ctx.saved_tensors
        grad_B = inv.transpose(-1, -2) @ grad_X
        grad_A = None
        if ctx.needs_input_grad[0]:
            grad_A = (grad_B @ X.transpose(-1, -2)).tril_(-1).neg_()
        return grad_A, grad_B


def delta_rule_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Chunk-parallel form; equal to `delta_rule_naive`, differentiable with autograd.

    Within a chunk (local positions 1..C, state S0 on entry, Γ_t = exp(G_t) with G the
    within-chunk cumulative sum of g), unrolling the recurrence gives for the corrections
    u_t = beta_t (v_t - alpha_t S_{t-1}ᵀ k_t):

        u_t + Σ_{j<t} beta_t exp(G_t - G_j) (k_t·k_j) u_j = beta_t v_t - beta_t Γ_t S0ᵀ k_t

    i.e. (I + A) U = diag(beta) V - diag(beta Γ) K S0 with A strictly lower triangular. One
    batched triangular solve over all chunks gives U' = (I+A)⁻¹ diag(beta) V and
    W = (I+A)⁻¹ diag(beta Γ) K, both independent of S0, so U = U' - W S0. Then

        O   = diag(Γ) Q S0 + (Q Kᵀ ⊙ D) U        (D_tj = exp(G_t - G_j) for j ≤ t, else 0)
        S_C = Γ_C S0 + K̃ᵀ U                      (K̃ = K ⊙ exp(G_C - G), k decayed to the end)

    Everything but S0 -- D, the solve, Q Kᵀ ⊙ D, diag(Γ) Q, K̃ -- is computed once, batched
    over every chunk of every row and head; the loop over chunks is what needs S0: U, then the
    chunk's output and the next state, three (batched) matmul-adds per chunk.

    Why it is shaped this way (measured on CPU, engine/bench_hybrid.py, docs/benchmarks.md):
    heads are folded into the batch, (B·H, N, C, D), so every op is one batched call; the
    solve is `_SolveUnitLower` (block forward substitution, not LAPACK's per-matrix loop)
    and reads A's strict lower triangle only, so neither I + A nor tril(A) is formed; the
    loop computes O from U directly rather than O = (Q Kᵀ ⊙ D) U' + (diag(Γ) Q -
    (Q Kᵀ ⊙ D) W) S0, which costs two extra C x C x D products per chunk; and the loop's
    slices come from one `unbind` (a `select` per chunk would make backward zero-fill and
    add a full-size gradient per chunk). T not divisible by `chunk_size` is zero-padded at
    the end (k = v = q = 0, g = 0, beta = 0: padded tokens leave the state untouched and
    their outputs are dropped).
    """
    B, T, H, Dk, Dv = _check_inputs(q, k, v, g, beta, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dt = _compute_dtype(q, k, v, g, beta, initial_state)
    S = _initial(initial_state, B, H, Dk, Dv, dt, q.device)
    if T == 0:
        return v.new_zeros(B, 0, H, Dv), S

    C = min(chunk_size, T)
    pad = (-T) % C
    N = (T + pad) // C
    BH = B * H

    def to_chunks(x: Tensor) -> Tensor:
        # (B, T, H, ...) -> (B*H, N, C, ...) in the compute dtype, zero-padded in T: one copy.
        x = x.to(dt)
        if pad:
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        return x.transpose(1, 2).reshape(BH, N, C, *x.shape[3:])

    qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v)
    gc, bc = to_chunks(g), to_chunks(beta)  # (BH, N, C)

    G = gc.cumsum(dim=-1)  # within-chunk cumulative log decay
    gamma = G.exp()  # decay from the chunk start to position t (inclusive)
    # D_tj = exp(G_t - G_j) for j <= t, 0 above the diagonal (masked before exp: no overflow).
    upper = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
    decay = (G.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill_(upper, float("-inf")).exp_()

    # A_tj = beta_t exp(G_t - G_j) (k_t·k_j); only j < t is read by the solve.
    kb = kc * bc.unsqueeze(-1)  # beta_t k_t
    A = (kb @ kc.transpose(-1, -2)) * decay
    rhs = torch.cat([vc * bc.unsqueeze(-1), kb * gamma.unsqueeze(-1)], dim=-1)
    u_free, W = _SolveUnitLower.apply(A, rhs).split([Dv, Dk], dim=-1)  # U', W

    P = (qc @ kc.transpose(-1, -2)) * decay  # causal, decayed q·k within the chunk
    q_decayed = qc * gamma.unsqueeze(-1)  # Γ_t q_t: reads the entering state
    k_to_end = (kc * (G[..., -1:] - G).exp().unsqueeze(-1)).transpose(-1, -2)  # K̃ᵀ
    gamma_end = gamma[..., -1:].unsqueeze(-1)  # (BH, N, 1, 1)

    # The hand-over: U = U' - W S0 (the chunk's corrections), S_C = Γ_C S0 + K̃ᵀ U.
    S = S.reshape(BH, Dk, Dv)
    outs = []
    chunks = zip(
        *(x.unbind(1) for x in (u_free, W, P, q_decayed, k_to_end, gamma_end)), strict=True
    )
    for u_n, W_n, P_n, q_n, k_n, gamma_n in chunks:
        u = torch.baddbmm(u_n, W_n, S, alpha=-1)  # U = U' - W S0
        outs.append(torch.baddbmm(q_n @ S, P_n, u))  # O = diag(Γ) Q S0 + P U
        S = torch.baddbmm(gamma_n * S, k_n, u)  # S_C = Γ_C S0 + K̃ᵀ U
    o = torch.stack(outs, dim=1)
    o = o.reshape(B, H, N * C, Dv)[:, :, :T].transpose(1, 2)
    return o.to(v.dtype), S.reshape(B, H, Dk, Dv)


# --------------------------------------------------------------------------------------------
# Recurrent: decode
# --------------------------------------------------------------------------------------------


def delta_rule_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The recurrence written for decode (T usually 1; any T works).

    Heads are folded into the batch so each step is two batched matmuls and one batched
    rank-1 update on a single (B*H, Dk, Dv) state buffer. When no input needs a gradient (the
    decode case) that buffer is updated in place: one copy of the initial state per call (the
    caller's tensor is never modified) and no per-step state allocations. Under autograd it
    falls back to out-of-place ops, so it stays correct (if not fast) for training.
    """
    B, T, H, Dk, Dv = _check_inputs(q, k, v, g, beta, initial_state)
    dt = _compute_dtype(q, k, v, g, beta, initial_state)
    BH = B * H
    if initial_state is None:
        S = torch.zeros(BH, Dk, Dv, dtype=dt, device=q.device)
    else:
        S = initial_state.to(dt).reshape(BH, Dk, Dv).clone()
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g, beta, initial_state)
    )

    # (B, T, H, D) -> (T, B*H, D): one contiguous slab per step.
    qs = q.to(dt).transpose(0, 1).reshape(T, BH, Dk)
    ks = k.to(dt).transpose(0, 1).reshape(T, BH, Dk)
    vs = v.to(dt).transpose(0, 1).reshape(T, BH, Dv)
    alphas = g.to(dt).exp().transpose(0, 1).reshape(T, BH, 1, 1)
    betas = beta.to(dt).transpose(0, 1).reshape(T, BH, 1)

    if needs_grad:
        outs = []
        for t in range(T):
            k_t = ks[t].unsqueeze(1)  # (BH, 1, Dk)
            S = alphas[t] * S
            u = betas[t].unsqueeze(1) * (vs[t].unsqueeze(1) - k_t @ S)  # (BH, 1, Dv)
            S = S + k_t.transpose(1, 2) @ u
            outs.append(qs[t].unsqueeze(1) @ S)
        o = torch.cat(outs, dim=1)  # (BH, T, Dv)
    else:
        o = torch.empty(BH, T, Dv, dtype=dt, device=q.device)
        u = torch.empty(BH, 1, Dv, dtype=dt, device=q.device)
        for t in range(T):
            k_t = ks[t].unsqueeze(1)  # (BH, 1, Dk)
            S.mul_(alphas[t])
            torch.bmm(k_t, S, out=u)  # alpha_t S_{t-1}ᵀ k_t
            torch.sub(vs[t].unsqueeze(1), u, out=u)
            u.mul_(betas[t].unsqueeze(1))
            S.baddbmm_(k_t.transpose(1, 2), u)
            if T == 1:
                torch.bmm(qs[t].unsqueeze(1), S, out=o)
            else:
                o[:, t : t + 1] = torch.bmm(qs[t].unsqueeze(1), S)
    o = o.reshape(B, H, T, Dv).transpose(1, 2)
    return o.to(v.dtype), S.reshape(B, H, Dk, Dv)


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------


@functools.cache
def _fla_kernel():
    """flash-linear-attention's `chunk_gated_delta_rule`, or None when `fla` does not import."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as exc:  # ImportError, or a Triton/CUDA mismatch raised at import time
        logger.debug("flash-linear-attention unavailable: %s", exc)
        return None
    return chunk_gated_delta_rule


@functools.cache
def _fla_takes_head_first() -> bool:
    try:
        return "head_first" in inspect.signature(_fla_kernel()).parameters
    except (TypeError, ValueError):  # no introspectable signature (wrapped/compiled)
        return False


def fla_available(device: torch.device | str) -> bool:
    """True when `delta_rule` would run flash-linear-attention's kernel on `device`."""
    return torch.device(device).type == "cuda" and _fla_kernel() is not None


def _delta_rule_fla(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Call fla with our conventions: (B, T, H, D) layout, q already scaled, q/k already
    normalised, fp32 state in and out. fla wants one dtype for q/k/v and fp32 gates."""
    kernel = _fla_kernel()
    dtype = v.dtype
    kwargs = dict(
        scale=1.0,  # the model already scaled q by 1/sqrt(Dk); fla's default would rescale
        initial_state=None if initial_state is None else initial_state.float().contiguous(),
        output_final_state=True,
        use_qk_l2norm_in_kernel=False,  # already normalised
    )
    if _fla_takes_head_first():
        # Releases that still have the argument defaulted it to head-first (B, H, T, D) at
        # one point; say which layout we pass. Newer ones reject it (always (B, T, H, D)).
        kwargs["head_first"] = False
    o, final_state = kernel(
        q=q.to(dtype).contiguous(),
        k=k.to(dtype).contiguous(),
        v=v.contiguous(),
        g=g.float().contiguous(),
        beta=beta.to(dtype).contiguous(),
        **kwargs,
    )
    return o.to(dtype), final_state.float()


def delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """The gated delta rule on the fastest form the device and installed packages allow.

    CUDA with `fla` importable and half-precision inputs: flash-linear-attention's chunk kernel
    (its Triton kernels do not take fp32 in every release, so fp32 stays on our forms). Otherwise
    T == 1 (decode) runs the recurrent form and longer inputs the chunked form.
    """
    _check_inputs(q, k, v, g, beta, initial_state)
    if v.dtype in (torch.bfloat16, torch.float16) and fla_available(q.device):
        return _delta_rule_fla(q, k, v, g, beta, initial_state)
    if q.shape[1] == 1:
        return delta_rule_recurrent(q, k, v, g, beta, initial_state)
    return delta_rule_chunked(q, k, v, g, beta, initial_state, chunk_size=chunk_size)
