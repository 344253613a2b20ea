"""Training-step speed of the hybrid family: this tree's layers against a baseline commit's.

    python -m engine.bench_hybrid                                  # hybrid-small, fp32 and bf16
    python -m engine.bench_hybrid --chunk-sizes 16,32,64 --baseline none --dtype fp32
    python -m engine.bench_hybrid --threads 1 --rounds 7

One step is what base_train does per micro-batch: forward with the loss, backward, zero the
gradients, at the preset's shape (device_batch_size × max_seq_len, vocab 8192, random tokens;
speed depends on shapes, not values). Two kinds of model are timed on the same weights:

* "baseline": the delta rule, conv and layers (engine/ops/delta_rule.py, engine/ops/conv1d.py,
  engine/models/hybrid_layers.py) as they were at --baseline (a git revision; default 3a47bfa,
  where the hybrid landed), loaded from `git show` into private modules -- no copy of old code
  lives in the tree;
* "current @ C": this tree's layers with delta-rule chunk size C (each of --chunk-sizes).

Why alternating rounds: the CPUs this runs on are shared and their speed drifts by 2x within
minutes, so timing one variant for a while and then the other measures the drift. Each round
times every variant back to back (--steps steps each, order rotated between rounds) and the
report is the median over rounds, with the current/baseline ratio taken per round first.
The first step of each variant is a warm-up (allocator, oneDNN primitive caches) and is
not timed. The first step's loss is printed per variant: the forms are the same math, so the
losses agree to rounding.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.models.hybrid import config_from_flags
from engine.models.registry import build_model
from engine.ops import delta_rule

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PRESET = REPO / "training" / "configs" / "base" / "hybrid-small.yaml"
DEFAULT_BASELINE = "3a47bfa"
VOCAB_SIZE = 8192
# Module name -> path of the files the baseline replaces, in import order (the layers import
# the two kernels by name).
BASELINE_MODULES = {
    "engine.ops.delta_rule": "engine/ops/delta_rule.py",
    "engine.ops.conv1d": "engine/ops/conv1d.py",
    "engine.models.hybrid_layers": "engine/models/hybrid_layers.py",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.bench_hybrid",
        description="ms per hybrid training step (forward + backward), baseline vs this tree",
    )
    parser.add_argument("--preset", type=Path, default=DEFAULT_PRESET, help="base_train YAML")
    parser.add_argument("--dtype", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--chunk-sizes", default="", help="comma list of delta-rule chunk sizes (default: preset's)"
    )
    parser.add_argument(
        "--baseline", default=DEFAULT_BASELINE, help="git revision of the baseline, or 'none'"
    )
    parser.add_argument(
        "--kernel-only",
        action="store_true",
        help="time delta_rule_chunked alone (forward + backward) at a linear layer's shape",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser


def load_preset(path: Path) -> dict:
    import yaml  # training's dependency; only this script needs it in engine/

    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def baseline_modules(revision: str) -> dict[str, types.ModuleType]:
    """The files of BASELINE_MODULES at `revision`, by module name; the layers import that
    revision's kernels.

    Each file is executed as a fresh module while sys.modules briefly maps its name to the old
    module, so the old layers' `from engine.ops.delta_rule import delta_rule` binds the old
    kernel; the real modules are put back afterwards."""
    saved = {name: sys.modules.get(name) for name in BASELINE_MODULES}
    modules: dict[str, types.ModuleType] = {}
    try:
        for name, path in BASELINE_MODULES.items():
            source = subprocess.run(
                ["git", "show", f"{revision}:{path}"],
                cwd=REPO,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            module = types.ModuleType(name)
            module.__file__ = f"{revision}:{path}"
            sys.modules[name] = module
            exec(compile(source, module.__file__, "exec"), module.__dict__)
            modules[name] = module
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return modules


def with_layers(model: nn.Module, layers: types.ModuleType) -> nn.Module:
    """A copy of `model` (same weights) whose mixers and MoEs run `layers`' forwards."""
    twin = copy.deepcopy(model)
    for block in twin.blocks:
        for part in (block.mixer, block.moe, block.norm1, block.norm2):
            part.__class__ = getattr(layers, type(part).__name__)
    twin.norm_f.__class__ = layers.RMSNorm
    return twin


def with_chunk_size(model: nn.Module, chunk_size: int) -> nn.Module:
    """`model` itself when the chunk size is already `chunk_size`, else a copy that uses it."""
    mixers = [b.mixer for b in model.blocks if hasattr(b.mixer, "chunk_size")]
    if all(m.chunk_size == chunk_size for m in mixers):
        return model
    twin = copy.deepcopy(model)
    for block in twin.blocks:
        if hasattr(block.mixer, "chunk_size"):
            block.mixer.chunk_size = chunk_size
    return twin


def train_step(model: nn.Module, ids: torch.Tensor, dtype: str) -> float:
    """One micro-batch of base_train: forward with the loss, backward, zero the gradients."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        loss = model(ids, ids)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def kernel_step(chunked: Callable, inputs: list[torch.Tensor], chunk: int, dtype: str) -> float:
    """delta_rule_chunked forward + backward on leaf inputs, as a linear layer's training step
    runs it (gradients into q, k, v, g, beta; the final state unused). `dtype` is unused: the
    kernel computes in fp32 either way."""
    q, k, v, g, beta = inputs
    o, _ = chunked(q, k, v, g, beta, chunk_size=chunk)
    o.backward(torch.ones_like(o))
    for x in inputs:
        x.grad = None
    return 0.0


def kernel_inputs(config, batch: int) -> list[torch.Tensor]:
    """Unit-norm q (scaled) and k, gates in the ranges the model's init gives."""
    shape = (batch, config.sequence_len, config.n_v_heads)
    q = F.normalize(torch.randn(*shape, config.k_head_dim), dim=-1) * config.k_head_dim**-0.5
    k = F.normalize(torch.randn(*shape, config.k_head_dim), dim=-1)
    v = torch.randn(*shape, config.v_head_dim)
    g = -torch.rand(shape) * 0.5
    beta = torch.rand(shape)
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def time_steps(step: Callable[[], float], steps: int) -> float:
    """Median ms of `steps` calls."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    if not dtypes or any(d not in ("fp32", "bf16") for d in dtypes):
        print(f"error: --dtype takes fp32 and/or bf16, got {args.dtype!r}", file=sys.stderr)
        return 2
    if args.rounds < 1 or args.steps < 1:
        print("error: --rounds and --steps must be >= 1", file=sys.stderr)
        return 2
    flags = load_preset(args.preset)
    config = config_from_flags(flags, vocab_size=VOCAB_SIZE)
    chunk_sizes = [int(c) for c in args.chunk_sizes.split(",") if c.strip()] or [config.chunk_size]
    torch.manual_seed(args.seed)
    model = build_model(config)
    ids = torch.randint(0, VOCAB_SIZE, (flags.get("device_batch_size", 8), config.sequence_len))

    # name -> step(dtype): one timed unit of work
    variants: dict[str, Callable[[str], float]] = {}
    old = None
    if args.baseline != "none":
        try:
            old = baseline_modules(args.baseline)
        except (subprocess.CalledProcessError, FileNotFoundError) as exc:
            print(f"error: cannot read the baseline {args.baseline!r} from git: {exc}",
                  file=sys.stderr)  # fmt: skip
            return 2
    base_name = f"baseline {args.baseline} @ {config.chunk_size}"
    if args.kernel_only:
        dtypes = ["fp32"]  # the kernel computes in fp32 whatever the model's dtype
        inputs = kernel_inputs(config, ids.shape[0])
        if old is not None:
            chunked = old["engine.ops.delta_rule"].delta_rule_chunked
            variants[base_name] = functools.partial(kernel_step, chunked, inputs, config.chunk_size)
        for chunk in chunk_sizes:
            variants[f"current @ {chunk}"] = functools.partial(
                kernel_step, delta_rule.delta_rule_chunked, inputs, chunk
            )
    else:
        if old is not None:
            twin = with_layers(model, old["engine.models.hybrid_layers"])
            variants[base_name] = functools.partial(train_step, twin, ids)
        for chunk in chunk_sizes:
            variants[f"current @ {chunk}"] = functools.partial(
                train_step, with_chunk_size(model, chunk), ids
            )

    print(
        f"preset {args.preset.name}: depth {config.n_layer}, n_embd {config.n_embd}, "
        f"pattern {config.layer_pattern}, batch {ids.shape[0]} x {ids.shape[1]} tokens, "
        f"vocab {VOCAB_SIZE}; {torch.get_num_threads()} threads; {args.rounds} rounds x "
        f"{args.steps} steps"
    )
    names = list(variants)
    for dtype in dtypes:
        steps = {name: functools.partial(step, dtype) for name, step in variants.items()}
        for name in names:  # warm-up, and the losses side by side
            loss = steps[name]()
            if not args.kernel_only:
                print(f"  {dtype} {name}: first loss {loss:.6f}")
        per_round: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                per_round[name].append(time_steps(steps[name], args.steps))
        base = names[0] if old is not None else None
        what = "delta_rule_chunked fwd+bwd" if args.kernel_only else "step"
        print(f"{dtype}: ms/{what}, median over {args.rounds} rounds (min .. max)")
        for name in names:
            times = per_round[name]
            line = (
                f"  {name:28s} {statistics.median(times):8.0f}  "
                f"({min(times):.0f} .. {max(times):.0f})"
            )
            if base is not None and name != base:
                ratios = [b / t for b, t in zip(per_round[base], times, strict=True)]
                line += f"  speedup x{statistics.median(ratios):.2f}"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
