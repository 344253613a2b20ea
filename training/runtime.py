"""Where a program runs: device, precision, and the torchrun process group.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain `python -m` run has none and is rank 0
of 1. CUDA ranks use NCCL and their own GPU (LOCAL_RANK); CPU ranks use gloo. Only rank 0
prints, writes events and saves model files.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from engine.attention import load_hub_fa3
from engine.common import autodetect_device, compute_dtype
from training.flags import MAX_SEED, Flag

DTYPES = ("auto", "fp32", "bf16")


def runtime_flags(seed_help: str = "random seed", *, compile: bool = False) -> list[Flag]:
    """The flags `init_runtime` reads (device, dtype, seed), plus `compile` where a program has it.

    `seed_help` says what the seed drives in that program (initial weights, sampling, ...).
    `compile` is a bool whose default, unset (None), means "on where it pays": on CUDA, where
    the compiled step is much faster after a warm-up of a minute or so, and off elsewhere
    (a CPU run is short and compiling it costs more than it saves). --compile / --no-compile
    (or `compile: true|false` in a preset, on/off in the form) decide explicitly.
    """
    flags = [
        Flag("device", str, "auto", "auto, cpu, cuda, cuda:N, mps", max_length=32),
        Flag(
            "dtype",
            str,
            "auto",
            "matmul precision; auto = bf16 on CUDA SM80+, fp32 elsewhere",
            choices=DTYPES,
        ),
    ]
    if compile:
        flags.append(
            Flag(
                "compile",
                bool,
                None,
                "torch.compile the training step; unset: on for CUDA devices, off elsewhere",
            )
        )
    flags.append(Flag("seed", int, 42, seed_help, min=0, max=MAX_SEED))
    return flags


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype  # matmul compute dtype (weights stay fp32)
    rank: int
    local_rank: int
    world_size: int

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    def print(self, *args, **kwargs) -> None:
        if self.master:
            print(*args, **kwargs, flush=True)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast where chosen (CUDA SM80+ by default, CPU when asked), else nothing."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj):
        """Every rank's `obj`, in rank order (a list of one without torchrun)."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _pick_dtype(device: torch.device, choice: str) -> torch.dtype:
    if choice not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {choice!r}")
    if choice == "fp32":
        return torch.float32
    if choice == "bf16":
        return torch.bfloat16
    return compute_dtype(device)


def _auto_device(world_size: int) -> torch.device:
    """`autodetect_device`, except that several torchrun processes never fall back to a CPU
    by accident: a multi-GPU launch on a host without a working CUDA torch would otherwise
    train the whole model once per rank on gloo, slowly and silently."""
    chosen = autodetect_device()
    if world_size > 1 and chosen.type != "cuda":
        raise RuntimeError(
            f"device: auto found no CUDA GPU but WORLD_SIZE={world_size}; pass --device cpu "
            f"to run {world_size} gloo processes on the CPU, or run on a host with a CUDA GPU "
            "and a CUDA build of torch"
        )
    return chosen


def init_runtime(device: str = "auto", dtype: str = "auto", seed: int = 42) -> Runtime:
    """Join the torchrun group if there is one, choose the device, seed every RNG."""
    # Before CUDA's allocator starts: expandable segments keep fragmentation from turning a
    # predicted fit into an out-of-memory error. A value the user set (even empty) wins; the site
    # sets the same for the processes it starts (runs/execution.py), this covers plain torchrun.
    if "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = _auto_device(world_size) if device == "auto" else torch.device(device)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # Before any model code runs, so neither the import nor a compiled step fetches it.
        load_hub_fa3(chosen)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=chosen if backend == "nccl" else None)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return Runtime(chosen, _pick_dtype(chosen, dtype), rank, local_rank, world_size)


def compile_enabled(choice: bool | None, device: torch.device) -> bool:
    """The `compile` flag resolved for `device`: None (unset) means on for CUDA only."""
    return device.type == "cuda" if choice is None else choice


def maybe_compile(model: torch.nn.Module, choice: bool | None, runtime: Runtime):
    """`model` compiled for training where `compile_enabled` says so, else `model` itself.

    dynamic=False: every training step has the same shapes, and static shapes let the
    compiler specialise the window masks and the loss chunks.
    """
    if not compile_enabled(choice, runtime.device):
        return model
    runtime.print("compiling the training step (torch.compile; the first steps are slow)")
    return torch.compile(model, dynamic=False)


def shutdown(runtime: Runtime, *, together: bool = False) -> None:
    """Leave the process group. With `together` (every rank finished its work) the ranks meet
    first: a gloo rank that tears its group down while a peer still uses the connection can
    abort with "terminate called without an active exception". After a failure there is no
    meeting, since the other ranks may be stuck in a different collective."""
    if runtime.distributed and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


# bf16 dense peak FLOP/s per device (vendor datasheets), for MFU. Matched by substring of
# torch.cuda.get_device_name(); unknown devices (and CPUs) report no MFU rather than a guess.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None
