"""Memory of one training step: predicted from the config, measured by a probe.

    python -m training.memory --config d20
    python -m training.memory --depth 26 --device-batch-size 16 --world-size 4 --dtype fp32
    python -m training.memory --config d20 --nanochat /tmp/nanochat   # also probe nanochat

Why a model of memory at all: a run that does not fit fails minutes in, after the data and the
weights were loaded, and the only fix a user has is the device batch. So the web app and the
training programs predict the peak per GPU *before* anything is built (`estimate_step`, pure
arithmetic on the config, the same for any size), refuse a config that cannot fit even one
sequence per pass, and `--device-batch-size auto` picks the largest power of two that fits
(`auto_device_batch`).

What the prediction counts, per GPU, at its peak (just after the forward of the last
micro-batch of a step, or inside the optimizer step, whichever is larger):
  - params: the fp32 master weights (and the rotary tables);
  - grads: one fp32 gradient per parameter (every rank holds them whole until the optimizer
    reduce-scatters them). They are counted as alive during the forward, which is true from
    the second micro-batch of a step on (gradient accumulation); a step of one micro-batch
    makes them while backward frees activations, so there the prediction errs high by up to
    their size;
  - optimizer: this rank's shard of the state (training/optim.py): Muon keeps a momentum
    matrix and one second moment per row or column for the ceil(K / world) matrices of each
    shape it owns, AdamW two moments for its ceil(numel / world) elements of each parameter;
  - activations: what autograd saves for backward, per token per layer (`_layer_bytes`) plus
    the embeddings' and the final norm's (`_stem_bytes`), for one micro-batch;
  - logits: the fused loss's saved gradients (engine/fused_loss.py: hidden-size gradient per
    token, a vocab x width fp32 weight gradient) and its working set (a group of matmul rows
    of logits and their gradient, three fp32 copies of one softmax chunk);
  - workspace: the larger of the backward pass's transients (a few gradient buffers of one
    layer) and the optimizer step's (stacked gradients and parameters, the orthogonalisation's
    copies), plus a margin for the allocator's rounding.

The activation formula is checked, term by term, against what a probe measures
(`measure_saved`, saved-tensor hooks: the bytes autograd keeps, deduplicated by storage), and
the whole prediction against a measured step (`measure_step_peak`: CUDA's peak allocated
bytes, or on a CPU the peak of live tensor storage tracked op by op). The probe takes any
model and any loss closure, so the same numbers can be taken of another implementation.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from engine import fused_loss
from engine.models import registry
from engine.models.base import Family
from engine.models.gpt import (
    ROTARY_LENGTH_FACTOR,
    SMEAR_GATE_CHANNELS,
    GPTConfig,
    count_params,
)
from training.flags import CONFIGS_DIR

GIB = 2**30
# Fraction of the device a run may plan to use: the CUDA context, the caching allocator's
# fragmentation and NCCL's buffers live in the rest.
DEFAULT_HEADROOM = 0.9
# The device batch `auto` starts from (and never exceeds): the batch the GPU presets were
# written for. Smaller powers of two keep the total batch with more gradient accumulation.
AUTO_MAX_BATCH = 32
# Allocator rounding and small tensors nobody counts (CUDA rounds blocks up to 512 bytes and
# 2 MiB segments): a fraction of everything, plus a fixed amount for cuBLAS workspaces.
ALLOCATOR_MARGIN = 0.02
FIXED_WORKSPACE = 256 * 2**20
# The tokenizer the speedrun presets train (training/configs/pipeline/speedrun.yaml), as in
# nanochat: what a prediction assumes when a base config alone does not say.
DEFAULT_VOCAB = 65536


@dataclass(frozen=True)
class Gpu:
    name: str
    capacity_bytes: int  # what torch.cuda.get_device_properties(...).total_memory reports


# Total memory as CUDA reports it (MiB from nvidia-smi x 2^20): 80 GB and 141 GB of HBM are
# 79.6 and 140.4 GiB; a "24 GB" card is 23.99 GiB.
GPUS = (
    Gpu("H100-80GB", 81559 * 2**20),
    Gpu("H200", 143771 * 2**20),
    Gpu("24GB", 24564 * 2**20),
)
REFERENCE_GPU = GPUS[0]


def gpu(name: str) -> Gpu:
    for entry in GPUS:
        if entry.name == name:
            return entry
    raise ValueError(f"unknown GPU {name!r} (known: {', '.join(g.name for g in GPUS)})")


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    """'bf16' / 'fp32' (the runtime flag's spelling) or a torch dtype; 'auto' counts as bf16,
    what it means on the GPUs this model is for."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "auto": torch.bfloat16, "fp32": torch.float32}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {', '.join(names)}, got {dtype!r}")
    return names[dtype]


# ---- the prediction -------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak bytes of one training step on one GPU, by part."""

    params: int
    grads: int
    optimizer: int
    activations: int
    logits: int
    workspace: int

    @property
    def total(self) -> int:
        return (
            self.params
            + self.grads
            + self.optimizer
            + self.activations
            + self.logits
            + self.workspace
        )

    def parts(self) -> dict[str, int]:
        return {
            "params": self.params,
            "grads": self.grads,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "logits": self.logits,
            "workspace": self.workspace,
        }

    def fits(self, capacity_bytes: int, headroom: float = DEFAULT_HEADROOM) -> bool:
        return self.total <= capacity_bytes * headroom

    def describe(self, capacity_bytes: int, per: str = "GPU") -> str:
        """'≈ 61 of 80 GiB per GPU' (whole GiB; tenths below 10 GiB)."""
        return f"≈ {_gib(self.total)} of {_gib(capacity_bytes)} GiB per {per}"

    def breakdown(self) -> str:
        """'params 2.1 + grads 2.1 + ... GiB', for logs."""
        return " + ".join(f"{k} {v / GIB:.1f}" for k, v in self.parts().items()) + " GiB"


def _gib(n: int) -> str:
    value = n / GIB
    return f"{value:.0f}" if value >= 9.95 else f"{value:.1f}"


def _muon_shapes(config: GPTConfig) -> dict[tuple[int, int], int]:
    """How many block matrices of each shape the model has (one Muon group per shape)."""
    c, kv = config.n_embd, config.kv_dim
    shapes: dict[tuple[int, int], int] = {}
    for layer in range(config.n_layer):
        per_layer = [(c, c), (kv, c), (kv, c), (c, c), (4 * c, c), (c, 4 * c)]
        if config.has_value_embedding(layer):
            per_layer.append((config.n_kv_head, config.ve_gate_channels))
        for shape in per_layer:
            shapes[shape] = shapes.get(shape, 0) + 1
    return shapes


def _adamw_numels(config: GPTConfig) -> list[int]:
    """Element counts of the AdamW parameters (each sharded on its own)."""
    counts = count_params(config)
    value_tables = [config.vocab_size * config.kv_dim] * ((config.n_layer + 1) // 2)
    smear = [SMEAR_GATE_CHANNELS, 1] * config.smear + [1] * config.backout
    return [counts["lm_head"], counts["wte"], *value_tables, config.n_layer, config.n_layer, *smear]


def optimizer_bytes(config: GPTConfig, world_size: int = 1) -> int:
    """The optimizer state one rank keeps (its shard; rank 0 owns the most)."""
    total = 0
    for (rows, cols), count in _muon_shapes(config).items():
        owned = min(count, math.ceil(count / world_size))
        total += owned * (rows * cols + max(rows, cols)) * 4  # momentum + second moment
    for numel in _adamw_numels(config):
        total += 2 * math.ceil(numel / world_size) * 4  # exp_avg + exp_avg_sq
    return total


def _step_transients(config: GPTConfig, world_size: int) -> int:
    """Peak temporaries of `MuonAdamW.step` (no activations are alive by then).

    One process: every Muon stack's stacked gradients and stacked parameters are alive
    together (the step starts every group before finishing any), plus the orthogonalisation
    of the largest stack (an fp32 and a bf16 copy, the Gram products, NorMuon's scaled copy).
    Sharded: a padded copy of every gradient and a gathered copy of every parameter.
    """
    shapes = _muon_shapes(config)
    largest = max(rows * cols * count for (rows, cols), count in shapes.items())
    muon_elems = sum(rows * cols * count for (rows, cols), count in shapes.items())
    if world_size == 1:
        stacked = 2 * muon_elems * 4
        largest_owned = largest
    else:
        stacked = 2 * count_params(config)["total"] * 4
        largest_owned = max(
            rows * cols * math.ceil(count / world_size) for (rows, cols), count in shapes.items()
        )
    # fp32 transpose copy + bf16 copy + two bf16 iterates + NorMuon's two fp32 products.
    polar = largest_owned * (4 + 2 + 2 * 2 + 2 * 4)
    return stacked + polar


def _layer_bytes(config: GPTConfig, dtype: torch.dtype, value_embedding: bool) -> float:
    """Bytes autograd saves per token in one block, with the residual mix before it.

    Term by term what engine/models/gpt.py keeps (`measure_saved` checks the sum), with r the
    residual stream's bytes per value (fp32) and a the compute dtype's:
      mix: the incoming residual (r C; for the first layer that is x0, counted in the stem);
      attention: the mixed residual and its norm's rstd (r C + 4), the normed input in the
      compute dtype (a C: the matmul's input), rotated q and k as the q/k norm's fp32 input
      with one rstd per head (4 (C + kv) + 4 (H + Hkv)), normed q and k (a (C + kv)), v
      (a kv), the attention output and its log-sum-exp (a C + 4 H);
      MLP: the residual after attention and its rstd (r C + 4), the normed input (a C), relu
      of the hidden layer (4 a C; the square is recomputed in backward);
      value embedding (every other layer): the table's row (4 kv, fp32), the gate twice
      (sigmoid and its multiple, a Hkv each) and the gate's input (a ve_gate_channels, under
      autocast only).
    """
    c, kv = config.n_embd, config.kv_dim
    heads, kv_heads = config.n_head, config.n_kv_head
    r, a = 4, dtype.itemsize
    mix = r * c
    attention = (r * c + 4) + a * c + 4 * (c + kv) + 4 * (heads + kv_heads)
    attention += a * (c + kv) + a * kv + a * c + 4 * heads
    mlp = (r * c + 4) + a * c + 4 * a * c
    total = mix + attention + mlp
    if value_embedding:
        total += 4 * kv + 2 * a * kv_heads
        if dtype != torch.float32:
            total += a * config.ve_gate_channels
    return total


def _stem_bytes(config: GPTConfig, dtype: torch.dtype) -> float:
    """Bytes saved per token outside the blocks, less the first layer's mix (which is x0).

    The token ids (int64, shared by every embedding), the embedding and its norm's rstd
    (4 C + 4), x0 (4 C), the last residual and the final norm's rstd (4 C + 4) and the fused
    loss's gradient of the hidden states (a C). The smear gate adds the normed embedding
    before it (4 C: x0 is the smeared one), its gate's input (a 24: a copy, cast or made
    contiguous), the sigmoid (a) and the gate (4). Backout keeps the middle layer's output,
    which the next layer's mix saves anyway -- unless the middle layer is the last one
    (n_layer <= 2): then the final norm saves the difference and the product its input (4 C).
    """
    c, r, a = config.n_embd, 4, dtype.itemsize
    stem = 8 + (4 * c + 4) + 4 * c + (r * c + 4) + a * c
    if config.smear:
        stem += 4 * c + a * SMEAR_GATE_CHANNELS + a + 4
    if config.backout and config.backout_layer == config.n_layer - 1:
        stem += r * c
    return stem - r * c


def activation_bytes_per_token(config: GPTConfig, dtype: torch.dtype | str = "bf16") -> float:
    """Saved-for-backward bytes per token of the whole model (blocks and stem)."""
    dt = _dtype(dtype)
    layers = sum(
        _layer_bytes(config, dt, config.has_value_embedding(i)) for i in range(config.n_layer)
    )
    return layers + _stem_bytes(config, dt)


def activation_bytes_per_token_per_layer(
    config: GPTConfig, dtype: torch.dtype | str = "bf16"
) -> float:
    """The mean over the blocks of `_layer_bytes` (half of them carry a value embedding)."""
    dt = _dtype(dtype)
    total = sum(
        _layer_bytes(config, dt, config.has_value_embedding(i)) for i in range(config.n_layer)
    )
    return total / config.n_layer


def _fixed_saves(config: GPTConfig, dtype: torch.dtype) -> int:
    """Saved bytes that do not grow with the batch: weight copies and rotary tables.

    Under autocast every matmul keeps its half-precision weight copy for backward; in fp32
    only the stacked q/k/v weight is a copy. The rotary tables of one sequence are stacked
    once per forward (fp32) and, under autocast, cast again by every layer.
    """
    c, kv, seq = config.n_embd, config.kv_dim, config.sequence_len
    rotary = 2 * seq * config.head_dim * 4
    # SDPA's sliding-window layers take an explicit additive mask, seq x seq in the compute dtype.
    masks = sum(w < seq - 1 for w in config.window_sizes()) * seq * seq * dtype.itemsize
    if dtype == torch.float32:
        return config.n_layer * (c + 2 * kv) * c * 4 + rotary + masks
    matrices = count_params(config)["transformer_matrices"]
    per_layer_rotary = 2 * seq * config.head_dim * dtype.itemsize
    return matrices * dtype.itemsize + rotary + config.n_layer * per_layer_rotary + masks


def _loss_bytes(config: GPTConfig, tokens: int, dtype: torch.dtype, device_type: str) -> int:
    """The fused loss: saved gradients plus its working set (see the module docstring)."""
    c, vocab, padded = config.n_embd, config.vocab_size, config.padded_vocab_size
    item = dtype.itemsize
    chunk, rows = fused_loss.chunk_sizes(device_type, vocab)
    group = min(tokens, max(chunk, rows // chunk * chunk))
    saved = tokens * c * item + padded * c * 4  # grad_hidden, grad_weight
    casts = (tokens * c + vocab * c) * item if dtype != torch.float32 else 0
    working = 2 * group * vocab * item + 3 * min(chunk, tokens) * vocab * 4
    return saved + casts + working


def _backward_transients(config: GPTConfig, tokens: int, dtype: torch.dtype) -> int:
    """Gradient buffers alive while one block runs backward: the MLP's hidden-size gradients
    (two, in the compute dtype) and the residual stream's (two, fp32)."""
    c = config.n_embd
    return tokens * (2 * 4 * c * dtype.itemsize + 2 * c * 4)


def estimate_step(
    model_config: GPTConfig,
    *,
    device_batch_size: int,
    world_size: int = 1,
    dtype: torch.dtype | str = "bf16",
    device_type: str = "cuda",
) -> MemoryEstimate:
    """The predicted peak of one training step per GPU; arithmetic only, no tensor is built.

    device_batch_size sequences of model_config.sequence_len tokens per forward pass;
    world_size processes share the optimizer state (ZeRO-2, training/optim.py); dtype is the
    matmul precision ('bf16' autocast or 'fp32'; weights are fp32 either way). device_type
    'cuda' adds the allocator's margin and cuBLAS workspace; 'cpu' predicts live tensor bytes
    only (what `measure_step_peak` measures there).
    """
    if device_batch_size < 1 or world_size < 1:
        raise ValueError(
            f"device_batch_size and world_size must be >= 1, got {device_batch_size}, {world_size}"
        )
    dt = _dtype(dtype)
    family = registry.family_of(model_config)
    if family.activation_bytes_per_token is not None:
        return _estimate_family_step(
            model_config, family, tokens=device_batch_size * model_config.sequence_len,
            world_size=world_size, dtype=dt, device_type=device_type,
        )  # fmt: skip
    counts = count_params(model_config)
    rotary = 2 * model_config.sequence_len * ROTARY_LENGTH_FACTOR * model_config.head_dim // 2
    params = (counts["total"] + rotary) * 4
    grads = counts["total"] * 4
    optimizer = optimizer_bytes(model_config, world_size)
    tokens = device_batch_size * model_config.sequence_len
    activations = math.ceil(activation_bytes_per_token(model_config, dt) * tokens)
    activations += _fixed_saves(model_config, dt)
    logits = _loss_bytes(model_config, tokens, dt, device_type)
    backward = _backward_transients(model_config, tokens, dt)
    step = _step_transients(model_config, world_size)
    transient = max(backward, step - activations - logits)
    workspace = transient
    if device_type == "cuda":
        margin = ALLOCATOR_MARGIN * (params + grads + optimizer + activations + logits + transient)
        workspace += math.ceil(margin) + FIXED_WORKSPACE
    return MemoryEstimate(params, grads, optimizer, activations, logits, workspace)


def _estimate_family_step(
    model_config: Any,
    family: Family,
    *,
    tokens: int,
    world_size: int,
    dtype: torch.dtype,
    device_type: str,
) -> MemoryEstimate:
    """`estimate_step` for a family whose activations the family itself predicts (GPT-2, the
    hybrid): the same terms with coarser constants. Weights, gradients and the optimizer
    state (Muon's momentum for the matrices, Adam's two moments for the rest) sharded over the
    ranks; under autocast one half-precision copy of every weight;
    the fused loss as for GPT; the optimizer step's stacked copies of gradients and weights."""
    counts = family.count_params(model_config)
    total = counts["total"]
    params = grads = total * 4
    # Muon keeps one momentum per matrix value (its second moment is a row or column), AdamW
    # two moments per value; the GPT-2 recipe's AdamW-everywhere costs the matrices one more.
    matrices = counts.get("matrices", 0)
    optimizer = 4 * math.ceil((matrices + 2 * (total - matrices)) / world_size)
    activations = math.ceil(family.activation_bytes_per_token(model_config, dtype) * tokens)
    if dtype != torch.float32:
        activations += total * dtype.itemsize
    logits = _loss_bytes(model_config, tokens, dtype, device_type)
    backward = _backward_transients(model_config, tokens, dtype)
    transient = max(backward, 2 * total * 4 - activations - logits)
    workspace = transient
    if device_type == "cuda":
        margin = ALLOCATOR_MARGIN * (params + grads + optimizer + activations + logits + transient)
        workspace += math.ceil(margin) + FIXED_WORKSPACE
    return MemoryEstimate(params, grads, optimizer, activations, logits, workspace)


def auto_device_batch(
    model_config: GPTConfig,
    *,
    capacity_bytes: int,
    world_size: int = 1,
    dtype: torch.dtype | str = "bf16",
    max_batch: int = AUTO_MAX_BATCH,
    headroom: float = DEFAULT_HEADROOM,
    device_type: str = "cuda",
) -> tuple[int, MemoryEstimate]:
    """The largest power of two <= max_batch whose predicted step fits capacity x headroom.

    Raises ValueError naming device_batch_size, with the numbers, when one sequence per
    forward pass already does not fit.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    batch = 2 ** int(math.log2(max_batch))
    while True:
        estimate = estimate_step(
            model_config,
            device_batch_size=batch,
            world_size=world_size,
            dtype=dtype,
            device_type=device_type,
        )
        if estimate.fits(capacity_bytes, headroom) or batch == 1:
            break
        batch //= 2
    if not estimate.fits(capacity_bytes, headroom):
        per = "GPU" if device_type == "cuda" else "process"
        raise ValueError(fit_error(estimate, capacity_bytes, headroom, batch=1, per=per))
    return batch, estimate


def fit_error(
    estimate: MemoryEstimate, capacity_bytes: int, headroom: float = DEFAULT_HEADROOM, *,
    batch: int, per: str = "GPU",
) -> str:  # fmt: skip
    """The refusal message: it starts with the flag's name, so forms put it next to it."""
    has = "this GPU has" if per == "GPU" else "each process has"
    return (
        f"device_batch_size: even {batch} sequence(s) per forward pass need "
        f"{estimate.total / GIB:.1f} GiB per {per} ({estimate.breakdown()}), more than "
        f"{headroom:.0%} of the {capacity_bytes / GIB:.1f} GiB {has}; use a smaller "
        "model, a shorter max_seq_len or more GPUs"
    )


def device_capacity(device: torch.device | str) -> int | None:
    """Total memory of a CUDA device in bytes; None for anything else (CPU, MPS)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).total_memory


def planned_batch(requested: int, total_batch_size: int, seq_len: int, world_size: int) -> int:
    """The device batch a run's total batch is planned with.

    A given batch (> 0) is itself. For auto, the largest power of two up to AUTO_MAX_BATCH
    that divides the rows per process of a given total batch (AUTO_MAX_BATCH when the total is
    automatic): whatever smaller power of two the GPU then takes divides the total too, so
    only the gradient accumulation changes, never the tokens per step.
    """
    if requested > 0:
        return requested
    batch = AUTO_MAX_BATCH
    if total_batch_size > 0:
        rows, rest = divmod(total_batch_size, seq_len * world_size)
        while batch > 1 and (rest or rows % batch):
            batch //= 2
    return batch


def host_memory() -> int | None:
    """Physical memory of this machine in bytes (what `auto` plans a CPU run against)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


@dataclass(frozen=True)
class BatchChoice:
    """The device batch a run uses, and the prediction behind it."""

    device_batch_size: int
    auto: bool  # chosen by `auto`, not given
    estimate: MemoryEstimate
    capacity_bytes: int | None  # None: nothing to compare with (the batch was not checked)
    where: str  # which memory the prediction is for, e.g. "cuda:0 (NVIDIA H100 80GB HBM3)"
    per: str = "GPU"  # "process" when the memory is the machine's (a CPU run)

    def describe(self) -> str:
        """'≈ 61 of 80 GiB per GPU (H100-80GB), device batch 32 (auto)'."""
        how = "auto" if self.auto else "given"
        if self.capacity_bytes is None:
            text = f"≈ {_gib(self.estimate.total)} GiB per {self.per}"
        else:
            text = self.estimate.describe(self.capacity_bytes, self.per)
        return f"{text} ({self.where}), device batch {self.device_batch_size} ({how})"

    def to_dict(self) -> dict:
        """What the run's events record (derived.memory)."""
        return {
            "device_batch_size": self.device_batch_size,
            "auto": self.auto,
            "predicted_bytes": self.estimate.total,
            "predicted": self.estimate.parts(),
            "capacity_bytes": self.capacity_bytes,
            "where": self.where,
            "text": self.describe(),
        }


def choose_device_batch(
    model_config: GPTConfig,
    requested: int,
    *,
    capacity_bytes: int | None,
    where: str,
    world_size: int = 1,
    dtype: torch.dtype | str = "bf16",
    device_type: str = "cuda",
    max_batch: int = AUTO_MAX_BATCH,
    headroom: float = DEFAULT_HEADROOM,
) -> BatchChoice:
    """`requested` (a positive batch, or <= 0 for auto) checked against `capacity_bytes`.

    auto: the largest power of two <= max_batch that fits; max_batch when there is no
    capacity to compare with. A given batch is kept even if predicted over capacity (the
    prediction errs high); only a config that cannot fit one sequence is refused
    (ValueError naming device_batch_size, with the numbers).
    """
    auto = requested <= 0
    batch = max_batch if auto else requested
    per = "GPU" if device_type == "cuda" else "process"

    def estimate(b: int) -> MemoryEstimate:
        return estimate_step(
            model_config,
            device_batch_size=b,
            world_size=world_size,
            dtype=dtype,
            device_type=device_type,
        )

    if capacity_bytes is None:
        return BatchChoice(batch, auto, estimate(batch), None, where, per)
    if auto:
        batch, chosen = auto_device_batch(
            model_config,
            capacity_bytes=capacity_bytes,
            world_size=world_size,
            dtype=dtype,
            max_batch=max_batch,
            headroom=headroom,
            device_type=device_type,
        )
        return BatchChoice(batch, True, chosen, capacity_bytes, where, per)
    smallest = estimate(1)
    if not smallest.fits(capacity_bytes, headroom):
        raise ValueError(fit_error(smallest, capacity_bytes, headroom, batch=1, per=per))
    return BatchChoice(batch, False, estimate(batch), capacity_bytes, where, per)


def device_batch_for(
    model_config: GPTConfig,
    requested: int,
    *,
    device: torch.device,
    world_size: int,
    dtype: torch.dtype,
    max_batch: int = AUTO_MAX_BATCH,
) -> BatchChoice:
    """`choose_device_batch` for the device a program runs on.

    CUDA: that GPU's total memory. CPU: the machine's physical memory, shared by the
    `world_size` processes of a torchrun job (so auto never plans a laptop into swap).
    Other devices (MPS): no check; auto means max_batch.
    """
    if device.type == "cuda":
        capacity = device_capacity(device)
        where = f"{device} ({device_name(device)})"
        device_type = "cuda"
    elif device.type == "cpu":
        total = host_memory()
        capacity = None if total is None else total // world_size
        where = "this machine's memory" + (f" / {world_size} processes" if world_size > 1 else "")
        device_type = "cpu"
    else:
        capacity, where, device_type = None, str(device), device.type
    return choose_device_batch(
        model_config,
        requested,
        capacity_bytes=capacity,
        where=where,
        world_size=world_size,
        dtype=dtype,
        device_type=device_type,
        max_batch=max_batch,
    )


def device_name(device: torch.device | str) -> str:
    """The GPU's marketing name, e.g. 'NVIDIA H100 80GB HBM3' ('' off CUDA)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return ""
    return torch.cuda.get_device_name(device)


def planning_gpu() -> tuple[int, str]:
    """(capacity, label) of the GPU a server plans runs for: its own first GPU, or a
    reference H100-80GB when it has none (labelled so)."""
    capacity = device_capacity("cuda:0")
    if capacity is not None:
        return capacity, device_name("cuda:0")
    return REFERENCE_GPU.capacity_bytes, f"reference {REFERENCE_GPU.name}: no GPU on this server"


# ---- the probe ------------------------------------------------------------------------------


@dataclass
class SavedBytes:
    """What autograd kept for backward during one forward, by where it was saved."""

    per_layer: list[int]  # bytes first saved while each layer (and what follows it) ran
    before_layers: int  # embeddings and anything before the first layer
    after_layers: int  # final norm, head, loss
    storages: int = 0  # distinct storages counted

    @property
    def total(self) -> int:
        return self.before_layers + sum(self.per_layer) + self.after_layers


@dataclass
class _SaveTracker:
    ignore: set[int]
    layers: Sequence[nn.Module]
    seen: set[int] = field(default_factory=set)
    current: int = -1  # index of the layer running, -1 before the first
    done: bool = False  # the last layer has finished
    per_layer: list[int] = field(default_factory=list)
    before: int = 0
    after: int = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in self.ignore and key not in self.seen:
                self.seen.add(key)
                self._add(storage.nbytes())
        return tensor

    def _add(self, nbytes: int) -> None:
        if self.done:
            self.after += nbytes
        elif self.current < 0:
            self.before += nbytes
        else:
            self.per_layer[self.current] += nbytes


def measure_saved(
    run: Callable[[], object],
    *,
    layers: Sequence[nn.Module] = (),
    ignore: Iterable[torch.Tensor] = (),
) -> SavedBytes:
    """Bytes autograd saves for backward while `run()` runs a forward pass.

    Every tensor autograd keeps goes through a saved-tensors hook; its storage is counted once
    however many tensors view it (a weight's transpose, q and k sliced from one projection),
    which is what the allocator holds. `ignore`: tensors whose storages are not activations
    (pass the model's parameters and buffers). `layers`: modules whose forward marks where
    each layer starts; bytes saved from one layer's start to the next one's count for that
    layer, so anything the model computes between blocks (a residual mix) counts for the
    layer before. Nothing is assumed about the model beyond that, so any implementation can be
    measured the same way. `run` should return its loss (kept alive until measuring ends).
    """
    ignore_keys = {t.untyped_storage().data_ptr() for t in ignore}
    tracker = _SaveTracker(ignore_keys, layers, per_layer=[0] * len(layers))
    handles = []
    for index, layer in enumerate(layers):

        def start(module, args, index=index):
            tracker.current = index

        def finish(module, args, output, index=index):
            if index == len(layers) - 1:
                tracker.done = True

        handles.append(layer.register_forward_pre_hook(start))
        handles.append(layer.register_forward_hook(finish))
    try:
        with torch.autograd.graph.saved_tensors_hooks(tracker.pack, lambda t: t):
            result = run()
        del result
    finally:
        for handle in handles:
            handle.remove()
    return SavedBytes(tracker.per_layer, tracker.before, tracker.after, len(tracker.seen))


class _LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage alive, op by op, and their peak: a CPU stand-in for CUDA's
    `max_memory_allocated`.

    Every op's outputs are seen here; a storage counts from the first output that uses it
    until the last tensor using it is freed (a weakref per tensor; torch keeps a tensor's
    Python object alive while autograd still holds it). Storages that existed before
    (`ignore`: parameters, inputs) are not counted. Scratch buffers a kernel allocates inside
    itself are invisible, like the allocator's rounding, which is why the CPU prediction
    leaves out the margin.
    """

    def __init__(self, ignore: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.ignore = {t.untyped_storage().data_ptr() for t in ignore}
        self.refs: dict[int, list[int]] = {}
        self.live = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self.refs[key]
            self.live -= entry[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in self.ignore or storage.nbytes() == 0:
                continue
            entry = self.refs.get(key)
            if entry is None:
                entry = self.refs[key] = [0, storage.nbytes()]
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            entry[0] += 1
            weakref.finalize(tensor, self._release, key)
        return out


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [
        value
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    ]


def measure_step_peak(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: Callable[[], None],
) -> int:
    """Peak bytes of one training step `step()` (forward, backward, optimizer step).

    Call it after one warm-up step (so the optimizer state exists) with the gradients set to
    None, as the training loop leaves them. CUDA: the allocator's peak allocated bytes
    (`torch.cuda.max_memory_allocated`). Elsewhere: the parameters, buffers and optimizer
    state, plus the peak of every tensor storage the step makes while alive
    (`_LiveTensorBytes`), which measures the same thing as CUDA's counter less the rounding.
    """
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    resident = [*model.parameters(), *model.buffers(), *_state_tensors(optimizer)]
    tracker = _LiveTensorBytes(ignore=resident)
    with tracker:
        step()
    return _tensor_bytes(resident) + tracker.peak


@dataclass(frozen=True)
class LayerProfile:
    """Saved-for-backward bytes per token of each layer, from two batch sizes."""

    per_layer: list[float]  # per token, layer by layer (the last lacks the next layer's mix)
    before_layers: float  # per token, before the first layer
    after_layers: float  # per token, after the last
    fixed_bytes: int  # what does not grow with the batch (weight copies, masks, rotary)

    @property
    def per_token_per_layer(self) -> float:
        """The mean over every layer but the last: each of those spans one block and the
        residual mix before the next, which is what a layer costs in a deep model."""
        layers = self.per_layer[:-1] or self.per_layer
        return sum(layers) / len(layers)


def profile_layers(
    model: nn.Module,
    layers: Sequence[nn.Module],
    forward: Callable[[int], object],
    *,
    tokens_per_row: int,
    rows: tuple[int, int] = (2, 4),
) -> LayerProfile:
    """Bytes saved per token per layer by any model, measured by `measure_saved`.

    `forward(b)` runs the model's training forward on b rows (autocast included) and returns
    the loss; `layers` are its blocks in order. Two batch sizes separate what grows with
    the tokens from what does not (half-precision weight copies, masks): the per-token
    figures are the slopes. Nothing else about the model is assumed, so another GPT
    implementation is measured the same way.
    """
    ignore = [*model.parameters(), *model.buffers()]
    small, large = (
        measure_saved(lambda b=b: forward(b), layers=layers, ignore=ignore) for b in rows
    )
    tokens = (rows[1] - rows[0]) * tokens_per_row
    per_layer = [(y - x) / tokens for x, y in zip(small.per_layer, large.per_layer, strict=True)]
    before = (large.before_layers - small.before_layers) / tokens
    after = (large.after_layers - small.after_layers) / tokens
    growth = sum(per_layer) + before + after
    fixed = round(small.total - growth * rows[0] * tokens_per_row)
    return LayerProfile(per_layer, before, after, fixed)


def _autocast(dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


def probe_model_config(config: GPTConfig, *, layers: int = 3, seq: int = 64, vocab: int = 512):
    """The shape the CLI probes on a CPU: the same width, heads and behaviour fields (smear,
    backout, gates...), few layers, short rows."""
    return dataclasses.replace(config, sequence_len=seq, vocab_size=vocab, n_layer=layers)


def profile_ours(config: GPTConfig, dtype: torch.dtype | str = "bf16") -> LayerProfile:
    """`profile_layers` of this repo's GPT at `config` on the CPU (bf16 = CPU autocast)."""
    from engine.models.gpt import GPT

    dt = _dtype(dtype)
    torch.manual_seed(0)
    model = GPT(config)
    rows = torch.randint(0, config.vocab_size, (4, config.sequence_len))

    def forward(b: int):
        with _autocast(dt):
            return model(rows[:b], rows[:b])

    return profile_layers(
        model, list(model.transformer.h), forward, tokens_per_row=config.sequence_len
    )


def profile_nanochat(path: str, config: GPTConfig, dtype: torch.dtype | str = "bf16"):
    """`profile_layers` of karpathy's nanochat GPT (source checkout at `path`), same shape.

    nanochat picks its compute dtype from NANOCHAT_DTYPE when it is imported and casts by
    itself (no autocast), so the variable is set to match before the import.
    """
    import importlib
    import sys

    dt = _dtype(dtype)
    os.environ["NANOCHAT_DTYPE"] = "bfloat16" if dt == torch.bfloat16 else "float32"
    if path not in sys.path:
        sys.path.insert(0, path)
    gpt = importlib.import_module("nanochat.gpt")
    nano_config = gpt.GPTConfig(
        sequence_len=config.sequence_len,
        vocab_size=config.vocab_size,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_kv_head=config.n_kv_head,
        n_embd=config.n_embd,
        window_pattern=config.window_pattern,
    )
    with torch.device("meta"):
        model = gpt.GPT(nano_config)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    rows = torch.randint(0, config.vocab_size, (4, config.sequence_len))
    return profile_layers(
        model,
        list(model.transformer.h),
        lambda b: model(rows[:b], rows[:b]),
        tokens_per_row=config.sequence_len,
    )


# ---- the command line -----------------------------------------------------------------------


def preset_model(
    preset: str | None, vocab_size: int, overrides: dict | None = None
) -> tuple[Any, int]:
    """(model config, requested device batch) of a base preset, read without base_train
    (which imports this module): the preset's YAML, then `overrides`, on from_depth defaults.
    The batch is -1 for auto."""
    values: dict = {"depth": 20, "device_batch_size": -1}
    if preset:
        path = Path(preset)
        if not path.exists():
            path = CONFIGS_DIR / "base" / f"{preset}.yaml"
        values.update(yaml.safe_load(path.read_text()) or {})
    values.update(overrides or {})
    family = registry.family(values.get("model", registry.DEFAULT))
    model_config = family.config_from_flags({"max_seq_len": 2048, **values}, vocab_size)
    batch = values["device_batch_size"]
    return model_config, -1 if str(batch).strip().lower() in ("auto", "-1") else int(batch)


def _table(config: GPTConfig, batch: int, dtype: str, worlds: Sequence[int]) -> list[str]:
    head = f"{'GPU':<10} {'procs':>5} " + " ".join(
        f"{name:>11}" for name in ("params", "grads", "optimizer", "activations", "logits")
    )
    lines = [head + f" {'workspace':>11} {'total':>9}   per GPU", "-" * (len(head) + 36)]
    for card in (gpu("H100-80GB"), gpu("H200")):
        for world in worlds:
            est = estimate_step(config, device_batch_size=batch, world_size=world, dtype=dtype)
            parts = " ".join(f"{v / GIB:>11.1f}" for v in est.parts().values())
            fits = "" if est.fits(card.capacity_bytes) else "  (over 90%: does not fit)"
            lines.append(
                f"{card.name:<10} {world:>5} {parts} {est.total / GIB:>9.1f}   "
                f"{est.describe(card.capacity_bytes)}{fits}"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.memory",
        description="Predicted memory of a base training step per GPU, and activation bytes "
        "per token per layer measured by the saved-tensor probe.",
    )
    parser.add_argument("--config", help="a base_train preset (d12, d20, d26, ...) or YAML path")
    parser.add_argument("--depth", type=int)
    parser.add_argument("--max-seq-len", type=int)
    parser.add_argument(
        "--device-batch-size", help="sequences per forward pass (default: the preset's; auto)"
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB,
        help=f"tokenizer size (default {DEFAULT_VOCAB}, the speedrun's and nanochat's)",
    )
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument(
        "--world-size", type=int, help="also show this many processes (1 and 8 always shown)"
    )
    parser.add_argument(
        "--no-probe", action="store_true", help="skip the CPU measurement of activations"
    )
    parser.add_argument(
        "--nanochat", metavar="PATH", help="also probe nanochat's GPT from this source checkout"
    )
    args = parser.parse_args(argv)
    overrides = {
        name: getattr(args, name)
        for name in ("depth", "max_seq_len", "device_batch_size")
        if getattr(args, name) is not None
    }
    model_config, requested = preset_model(args.config, args.vocab_size, overrides)
    counts = count_params(model_config)
    c = model_config
    print(
        f"model: depth {c.n_layer}, width {c.n_embd}, {c.n_head} heads ({c.n_kv_head} kv), "
        f"context {c.sequence_len}, vocab {c.vocab_size:,}, {counts['total']:,} parameters, "
        f"{args.dtype}"
    )
    batch = requested if requested > 0 else AUTO_MAX_BATCH
    print(f"\npredicted peak per GPU at device batch {batch} (GiB):")
    worlds = sorted({1, 8, *([args.world_size] if args.world_size else [])})
    print("\n".join(_table(model_config, batch, args.dtype, worlds)))
    print("\ndevice batch auto (largest power of two <= 32 within 90% of the GPU):")
    for card in (gpu("H100-80GB"), gpu("H200"), gpu("24GB")):
        for world in worlds:
            try:
                chosen, est = auto_device_batch(
                    model_config,
                    capacity_bytes=card.capacity_bytes,
                    world_size=world,
                    dtype=args.dtype,
                )
                text = f"{chosen:>3}  {est.describe(card.capacity_bytes)}"
            except ValueError as exc:
                text = f"does not fit: {exc}"
            print(f"  {card.name:<10} x{world}: {text}")
    predicted = activation_bytes_per_token_per_layer(model_config, args.dtype)
    print(f"\nactivations per token per layer: predicted {predicted:,.0f} bytes ({args.dtype})")
    if not args.no_probe:
        shape = probe_model_config(model_config)
        where = (
            f"CPU, {shape.n_layer} layers, 2 and 4 rows of {shape.sequence_len} tokens, "
            f"{'autocast ' if args.dtype == 'bf16' else ''}{args.dtype}"
        )
        ours = profile_ours(shape, args.dtype)
        print(f"  measured, this GPT:  {ours.per_token_per_layer:,.0f} bytes ({where})")
        if args.nanochat:
            theirs = profile_nanochat(args.nanochat, shape, args.dtype)
            print(f"  measured, nanochat:  {theirs.per_token_per_layer:,.0f} bytes (same shape)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
