"""Short causal depthwise convolution (+ SiLU), the hybrid's mixing step on q/k/v.

Each channel c of x (B, T, C) is convolved with its own K taps (weight (C, K), K = 4 in
Qwen3-Next), causally: y_t = act(bias + Σ_i weight[:, i] · x_{t-K+1+i}), where inputs before
the first token come from `initial_state` (the previous K-1 inputs, oldest first; zeros for a
fresh sequence). The state handed back is the last K-1 inputs, which is all decode needs to
continue, so the cache of a linear-attention layer holds it instead of the whole prefix.

Why three forms:

- `causal_conv1d_naive` sums the K shifted copies explicitly: the reference.
- `causal_conv1d` is training and prefill: prepend the state, one grouped `F.conv1d`
  (groups = C, PyTorch's vectorised depthwise kernel) with no padding, so the output has exactly
  T positions. On CUDA, when Dao-AILab's optional `causal_conv1d` package imports, its fused
  kernel (conv + bias + SiLU in one pass, state in and out) runs instead.
- `causal_conv1d_step` is decode: one token, a K-tap dot product per channel, and the state
  shifted in place so the cache tensor is reused step after step.

The activations are channels-last (B, T, C) like the model's projections; the transposes to the
(B, C, T) layout convolutions want happen here. Arithmetic is in float32 for half-precision
inputs in the reference and the step (K terms, cheap); the fast form runs in the input dtype,
as the CUDA kernel does (it accumulates in fp32 internally).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "causal_conv1d",
    "causal_conv1d_naive",
    "causal_conv1d_step",
    "causal_conv_available",
]


def _check(
    x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None, T_dim: bool = True
) -> tuple[int, int]:
    """Validate shapes and activation; return (C, K)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be (C, K), got shape {tuple(weight.shape)}")
    C, K = weight.shape
    if K < 1:
        raise ValueError(f"weight must have at least one tap, got shape {tuple(weight.shape)}")
    expected = "(B, T, C)" if T_dim else "(B, C)"
    if x.dim() != (3 if T_dim else 2) or x.shape[-1] != C:
        raise ValueError(f"x must be {expected} with C = {C}, got shape {tuple(x.shape)}")
    if bias is not None and bias.shape != (C,):
        raise ValueError(f"bias must be (C,) = ({C},), got shape {tuple(bias.shape)}")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    return C, K


def _check_state(state: Tensor, B: int, C: int, K: int, name: str) -> None:
    if state.shape != (B, C, K - 1):
        raise ValueError(
            f"{name} must be (B, C, K-1) = ({B}, {C}, {K - 1}), got shape {tuple(state.shape)}"
        )


def _with_history(x: Tensor, initial_state: Tensor | None, K: int) -> Tensor:
    """(B, C, K-1+T): the previous K-1 inputs (zeros if none) followed by x, channels first."""
    B, T, C = x.shape
    xt = x.transpose(1, 2)
    if initial_state is None:
        return F.pad(xt, (K - 1, 0))
    _check_state(initial_state, B, C, K, "initial_state")
    return torch.cat([initial_state.to(x.dtype), xt], dim=-1)


def causal_conv1d_naive(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference: the K shifted copies of the input, weighted and summed, in float32.

    Returns (y (B, T, C) in x's dtype, final_state (B, C, K-1) in x's dtype).
    """
    C, K = _check(x, weight, bias, activation)
    T = x.shape[1]
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xp = _with_history(x, initial_state, K).to(dt)  # (B, C, K-1+T)
    y = torch.zeros(x.shape[0], C, T, dtype=dt, device=x.device)
    for i in range(K):
        y = y + weight[:, i].to(dt)[None, :, None] * xp[:, :, i : i + T]
    if bias is not None:
        y = y + bias.to(dt)[None, :, None]
    if activation is not None:
        y = F.silu(y)
    final_state = xp[:, :, xp.shape[-1] - (K - 1) :].to(x.dtype)
    return y.transpose(1, 2).to(x.dtype), final_state


@functools.cache
def _cuda_kernel():
    """Dao-AILab's `causal_conv1d_fn`, or None when the package does not import."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception as exc:  # ImportError, or a CUDA ABI mismatch raised at import time
        logger.debug("causal-conv1d unavailable: %s", exc)
        return None
    return causal_conv1d_fn


def causal_conv_available(device: torch.device | str) -> bool:
    """True when `causal_conv1d` would run the `causal_conv1d` package's CUDA kernel."""
    return torch.device(device).type == "cuda" and _cuda_kernel() is not None


def _causal_conv1d_cuda(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    activation: str | None,
    initial_state: Tensor | None,
) -> tuple[Tensor, Tensor]:
    kernel = _cuda_kernel()
    B, T, C = x.shape
    K = weight.shape[1]
    # (B, T, C) contiguous viewed as (B, C, T) is the "channels-last" layout the kernel needs
    # to take and return states; no copy.
    xt = x.contiguous().transpose(1, 2)
    if initial_state is not None:
        _check_state(initial_state, B, C, K, "initial_state")
        # Channels-last too: (B, K-1, C) storage seen as (B, C, K-1).
        initial_state = initial_state.to(x.dtype).transpose(1, 2).contiguous().transpose(1, 2)
    y, final_state = kernel(
        xt,
        weight.to(x.dtype).contiguous(),
        None if bias is None else bias.to(x.dtype).contiguous(),
        initial_states=initial_state,
        return_final_states=True,
        activation="silu" if activation is not None else None,
    )
    return y.transpose(1, 2), final_state.contiguous()


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Fast form (training, prefill): one grouped conv over the state-prefixed input.

    Same contract as `causal_conv1d_naive`. Uses the `causal_conv1d` CUDA kernel when it is
    installed, the input is on CUDA in half precision or fp32, and K is one it supports (2-4).
    """
    C, K = _check(x, weight, bias, activation)
    if (
        causal_conv_available(x.device)
        and 2 <= K <= 4
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and x.shape[1] > 0
    ):
        return _causal_conv1d_cuda(x, weight, bias, activation, initial_state)
    xp = _with_history(x, initial_state, K)  # (B, C, K-1+T)
    w = weight.to(x.dtype).unsqueeze(1)  # (C, 1, K): one filter per channel
    b = None if bias is None else bias.to(x.dtype)
    # (B, C, T); F.conv1d rejects an input shorter than the kernel, so T == 0 is its own case.
    y = F.conv1d(xp, w, b, groups=C) if x.shape[1] else xp.new_zeros(x.shape[0], C, 0)
    if activation is not None:
        y = F.silu(y)
    final_state = xp[:, :, xp.shape[-1] - (K - 1) :]
    return y.transpose(1, 2), final_state.contiguous()


def causal_conv1d_step(
    x: Tensor,
    state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
) -> Tensor:
    """Decode one token: x (B, C); state (B, C, K-1) is shifted left and x appended IN PLACE.

    Returns y (B, C) in x's dtype; equal to the matching position of `causal_conv1d` run over
    the whole sequence.
    """
    C, K = _check(x, weight, bias, activation, T_dim=False)
    _check_state(state, x.shape[0], C, K, "state")
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = weight.to(dt)
    # Taps 0..K-2 read the state, tap K-1 the new token.
    y = torch.einsum("bck,ck->bc", state.to(dt), w[:, :-1]) + x.to(dt) * w[:, -1]
    if bias is not None:
        y = y + bias.to(dt)
    if activation is not None:
        y = F.silu(y)
    if K > 1:
        state.copy_(state.roll(-1, dims=-1))
        state[:, :, -1] = x.to(state.dtype)
    return y.to(x.dtype)
