"""What a run will need per GPU, shown before it starts (the new-run form and the run API),
and how long a pipeline has left (its page, the runs list and the dashboard).

A plain function over the run's kind, its validated config and its inputs, so the page, the
API and any later caller read the same words. The numbers come from `training.memory` (pure
arithmetic on the model's shape, the same work for any size). The GPU is this server's first
one; a server without one predicts for a reference H100-80GB and says so. A run meant for a
CPU is predicted against this machine's memory, shared by its processes.

Refusing a config that cannot fit one sequence per pass is not done here: base runs are
refused by `training.base_train.plan`, which the submission already calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.models.registry import config_from_dict
from training import base_train
from training.memory import (
    DEFAULT_VOCAB,
    choose_device_batch,
    host_memory,
    planned_batch,
    planning_gpu,
)

# Kinds that train a model (and so have a device batch to fit).
TRAINING_KINDS = ("base", "mid", "sft")


def _model_config(
    kind: str, config: Mapping[str, Any], tokenizer, parent_checkpoint
) -> tuple[Any, str] | None:
    """The model the run trains and a note on what was assumed, or None when unknown."""
    if kind == "base":
        if tokenizer is not None:
            return base_train.model_config_for(dict(config), tokenizer.vocab_size), ""
        return base_train.model_config_for(dict(config), DEFAULT_VOCAB), (
            f"; a {DEFAULT_VOCAB:,}-token vocabulary assumed until a tokenizer is chosen"
        )
    if parent_checkpoint is None or not parent_checkpoint.model_config:
        return None
    fields = dict(parent_checkpoint.model_config)
    if config.get("max_seq_len", -1) > 0:
        fields["sequence_len"] = config["max_seq_len"]
    try:
        return config_from_dict(fields), ""
    except (TypeError, ValueError):
        return None


def memory_prediction(
    kind: str,
    config: Mapping[str, Any],
    *,
    tokenizer=None,
    parent_checkpoint=None,
    nproc_per_node: int = 1,
) -> dict[str, Any] | None:
    """{"text", "fits", "device_batch_size", "predicted_bytes", "capacity_bytes", "where"}
    for a validated config of a training kind; None for other kinds or an unknown model.

    `text` is what a user reads: "≈ 61 of 80 GiB per GPU (NVIDIA H100 80GB HBM3), device
    batch 16 (auto)", or the refusal with its numbers when one sequence does not fit.
    """
    if kind not in TRAINING_KINDS:
        return None
    try:
        found = _model_config(kind, config, tokenizer, parent_checkpoint)
    except (KeyError, TypeError, ValueError):
        # A config without the model's settings: a pipeline stage whose program has not
        # started yet (its config comes from the program's start event).
        return None
    if found is None:
        return None
    model_config, assumed = found
    world = max(1, nproc_per_node)
    device = str(config.get("device", "auto"))
    on_cpu = device.startswith(("cpu", "mps"))
    if on_cpu:
        total = host_memory()
        capacity = None if total is None else total // world
        where, device_type = "this server's memory", "cpu"
        dtype = "bf16" if config.get("dtype") == "bf16" else "fp32"
    else:
        capacity, where = planning_gpu()
        device_type = "cuda"
        dtype = "fp32" if config.get("dtype") == "fp32" else "bf16"
    requested = config.get("device_batch_size", -1)
    try:
        choice = choose_device_batch(
            model_config,
            requested,
            capacity_bytes=capacity,
            where=where,
            world_size=world,
            dtype=dtype,
            device_type=device_type,
            max_batch=planned_batch(
                requested, config.get("total_batch_size", -1), model_config.sequence_len, world
            ),
        )
    except ValueError as exc:
        return {"text": str(exc) + assumed, "fits": False, "device_batch_size": None,
                "predicted_bytes": None, "capacity_bytes": capacity, "where": where}  # fmt: skip
    return {
        "text": choice.describe() + assumed,
        "fits": capacity is None or choice.estimate.fits(capacity),
        "device_batch_size": choice.device_batch_size,
        "predicted_bytes": choice.estimate.total,
        "capacity_bytes": capacity,
        "where": where,
    }


# ---- how long a pipeline has left ----------------------------------------------------------

# How far this pipeline's measured speed may scale the usual stage times (a first stage that
# ran oddly fast or slow must not make the whole ETA absurd).
SPEED_RANGE = (0.25, 4.0)
# A running stage's own progress says how long it has left once it is this far along.
MIN_PROGRESS = 0.02


@dataclass(frozen=True)
class StageTime:
    """One planned stage of a pipeline as far as it got: `state` is "done", "running" or
    "waiting"; `elapsed` the seconds it ran; a running stage's `progress` (0..1) and own `eta`
    (its program's measured speed); `typical` the seconds it took in earlier pipelines."""

    name: str
    state: str
    elapsed: float = 0.0
    progress: float = 0.0
    eta: float | None = None
    typical: float | None = None


def pipeline_eta(stages: Sequence[StageTime]) -> float | None:
    """Seconds until a pipeline is done, None when nothing says yet.

    The running stage has what its own ETA says (else what its progress so far implies);
    each waiting stage takes its usual time (`typical`), scaled by how fast this pipeline's
    finished stages ran compared with theirs (a busy or faster machine). A stage never run
    before is taken to last as long as this pipeline's finished stages did on average: rough,
    but an ETA from the first stage on, corrected as the stages finish.
    """
    done = [s for s in stages if s.state == "done"]
    timed = [s for s in done if s.typical and s.elapsed > 0]
    speed = 1.0
    if timed:
        speed = sum(s.elapsed for s in timed) / sum(s.typical for s in timed)
        speed = min(max(speed, SPEED_RANGE[0]), SPEED_RANGE[1])
    measured = [s.elapsed for s in done if s.elapsed > 0]
    average = sum(measured) / len(measured) if measured else None

    def usual(stage: StageTime) -> float | None:
        return stage.typical * speed if stage.typical else average

    left = 0.0
    for stage in stages:
        if stage.state == "running":
            if stage.eta is not None:
                remaining = stage.eta
            elif stage.progress >= MIN_PROGRESS:
                remaining = stage.elapsed * (1 - stage.progress) / stage.progress
            elif usual(stage) is not None:
                remaining = max(usual(stage) - stage.elapsed, 0.0)
            else:
                return None
            left += max(remaining, 0.0)
        elif stage.state == "waiting":
            estimate = usual(stage)
            if estimate is None:
                return None
            left += estimate
    return left
