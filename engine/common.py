"""Device and precision helpers shared by the model, the engine and the training programs.

The rule (SPEC §4 "Precision") is small but used everywhere: weights stay fp32, matmuls run in
bf16 only on CUDA GPUs that do bf16 natively (compute capability 8.0 and up), and everything
else (CPU, MPS, older GPUs) computes in fp32. Keeping the rule in one place means a training
program and the engine worker can never disagree about it.
"""

from __future__ import annotations

import contextlib

import torch

# Ampere (SM80) is the first generation with native bf16 tensor cores.
_BF16_MIN_CAPABILITY = (8, 0)


def autodetect_device() -> torch.device:
    """The best available device: CUDA, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def compute_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype matmuls should run in on `device`: bf16 on CUDA SM80+, otherwise fp32."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= _BF16_MIN_CAPABILITY:
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """A context that runs eligible ops in `compute_dtype(device)`; a no-op wherever that is fp32."""
    device = torch.device(device)
    dtype = compute_dtype(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
