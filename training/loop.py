"""What every training program's loop shares: timing, smoothed loss, progress, cadence, saving.

Base, mid, SFT and RL differ in data and loss; they all report the same per-step numbers
(loss EMA, step time, tokens/s, MFU, progress, ETA), evaluate and sample on a cadence, and
save checkpoints the same way (model + meta on rank 0, optimizer shards on every rank), so
that lives here once.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine import checkpoint as ckpt
from training.events import EventWriter
from training.runtime import Runtime, peak_flops

# Steps whose timing is left out of throughput and ETA: the first ones pay for allocator
# warm-up (and compilation when enabled).
WARMUP_STEPS_UNTIMED = 3


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout) for the block, then back to how it was."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def model_metrics(model: torch.nn.Module, optimizer: Any) -> dict[str, float]:
    """Per-step values beyond the loss: the family's own (a MoE's expert load) and, when the
    optimizer clips, the gradients' global norm before clipping."""
    values = dict(model.training_metrics())
    norm = getattr(optimizer, "last_grad_norm", None)
    if norm is not None:
        values["train/grad_norm"] = float(norm)
    return values


def due(step: int, every: int, last_step: int) -> bool:
    """True on multiples of `every` (> 0) and always on the last step."""
    return step == last_step or (every > 0 and step % every == 0)


@dataclass
class LoopState:
    """Loop counters that must survive a resume (saved in checkpoint meta)."""

    step: int = 0
    ema_loss: float = 0.0  # raw EMA; `smoothed()` removes the start-up bias
    ema_beta: float = 0.9
    training_time: float = 0.0  # seconds spent in timed steps
    timed_steps: int = 0
    min_val_bpb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def update_loss(self, loss: float) -> float:
        self.ema_loss = self.ema_beta * self.ema_loss + (1 - self.ema_beta) * loss
        return self.smoothed()

    def smoothed(self) -> float:
        # EMA started at 0 is biased low for the first steps; divide it out.
        return self.ema_loss / (1 - self.ema_beta ** max(self.step, 1))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> LoopState:
        return cls(**data) if data else cls()


class StepReporter:
    """Per-step numbers for the log and the `metrics` event."""

    def __init__(self, runtime: Runtime, total_steps: int, tokens_per_step: int,
                 flops_per_token: float):  # fmt: skip
        self.runtime = runtime
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        peak = peak_flops(runtime.device)
        self.peak_total = peak * runtime.world_size if peak else None
        self._started: float | None = None

    def start_step(self) -> None:
        self.runtime.synchronize()
        self._started = time.perf_counter()

    def end_step(self, state: LoopState, loss: float, lr_mult: float) -> dict[str, float]:
        """Record the step that just finished (state.step already advanced)."""
        self.runtime.synchronize()
        dt = time.perf_counter() - self._started
        if state.step > WARMUP_STEPS_UNTIMED:
            state.training_time += dt
            state.timed_steps += 1
        smooth = state.update_loss(loss)
        tok_per_sec = self.tokens_per_step / dt
        values = {
            "train/loss": smooth,
            "train/loss_raw": loss,
            "train/lr_mult": lr_mult,
            "train/step_ms": dt * 1000,
            "train/tok_per_sec": tok_per_sec,
            "train/progress": state.step / self.total_steps,
        }
        if self.peak_total:
            values["train/mfu"] = 100 * tok_per_sec * self.flops_per_token / self.peak_total
        eta = self.eta_seconds(state)
        if eta is not None:
            values["train/eta_sec"] = eta
        return values

    def eta_seconds(self, state: LoopState) -> float | None:
        if state.timed_steps == 0:
            return None
        return (self.total_steps - state.step) * state.training_time / state.timed_steps

    def format(self, state: LoopState, values: Mapping[str, float]) -> str:
        parts = [
            f"step {state.step:05d}/{self.total_steps:05d} ({100 * values['train/progress']:.1f}%)",
            f"loss {values['train/loss']:.4f}",
            f"lrm {values['train/lr_mult']:.2f}",
            f"dt {values['train/step_ms']:.0f}ms",
            f"tok/s {values['train/tok_per_sec']:,.0f}",
        ]
        if "train/mfu" in values:
            parts.append(f"mfu {values['train/mfu']:.1f}%")
        if "train/eta_sec" in values:
            parts.append(f"eta {format_duration(values['train/eta_sec'])}")
        return " | ".join(parts)


def timing_summary(
    state: LoopState, tokens_per_step: int, started: float, runtime: Runtime
) -> dict[str, Any]:
    """The end-of-run timing numbers of a training program's summary.

    Throughput counts only the timed steps (None if none was timed); peak memory is CUDA's.
    """
    summary: dict[str, Any] = {
        "training_time_sec": state.training_time,
        "wall_time_sec": time.time() - started,
        "tok_per_sec": (
            tokens_per_step * state.timed_steps / state.training_time
            if state.training_time
            else None
        ),
    }
    if runtime.device.type == "cuda":
        summary["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return summary


def resource_lines(summary: Mapping[str, Any]) -> list[str]:
    """Report lines for the throughput and peak memory of `timing_summary`, where known."""
    lines = []
    if summary.get("tok_per_sec"):
        lines.append(f"- throughput: {summary['tok_per_sec']:,.0f} tok/s")
    if summary.get("peak_memory_mib"):
        lines.append(f"- peak memory: {summary['peak_memory_mib']:,.0f} MiB")
    return lines


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def save_training_checkpoint(
    runtime: Runtime,
    events: EventWriter,
    checkpoint_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    meta: dict[str, Any],
) -> None:
    """Optimizer shard on every rank, then (after a barrier) model + meta on rank 0.

    The meta file commits the step, so it must come after every rank's shard is on disk.
    """
    if optimizer is not None:
        ckpt.save_checkpoint(checkpoint_dir, step, optim_state=optimizer.state_dict(),
                             rank=runtime.rank)  # fmt: skip
    runtime.barrier()
    if runtime.master:
        ckpt.save_checkpoint(
            checkpoint_dir, step, model_state=model.state_dict(),
            model_config=model.config, meta=meta,
        )  # fmt: skip
        events.checkpoint(step, Path(checkpoint_dir), {
            "val_bpb": meta.get("val_bpb"), "model_config": model.config.to_dict(),
        })  # fmt: skip
        runtime.print(f"saved checkpoint step {step} to {checkpoint_dir}")
    runtime.barrier()
