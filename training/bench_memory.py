"""Training memory side by side with nanochat: bytes saved for backward, and peak RSS.

Two measurements, each model in a fresh subprocess (nanochat picks its compute dtype from
NANOCHAT_DTYPE when it is imported, and a process's peak RSS is only its own in its own
process):

  saved  Bytes autograd saves for backward per token per layer, by `training.memory`'s
         saved-tensor probe (one count per storage; parameters and buffers are not
         activations; slopes over two batch sizes, so weight casts, masks and rotary tables
         drop out) at d20's width with 3 layers and rows of 64 tokens -- the same probe and
         shape for every model.
  rss    Peak resident memory (ru_maxrss) of a process that builds one model at the CPU demo
         shape (depth 4, width 256, 4 heads of 64, full context, batch 16 x 256) and runs a few
         training steps with that project's own optimizer: ours `training.optim.build_optimizer`
         under the demo's bf16 autocast, nanochat `GPT.setup_optimizer` in its NANOCHAT_DTYPE.
         Runs alternate between the two models.

nanochat's source is read from --nanochat-src (a checkout; default /tmp/nanochat) and imported
at run time only; nothing of it is copied here. On CPU nanochat computes in fp32 unless
NANOCHAT_DTYPE says otherwise; `--dtype bf16` runs it with NANOCHAT_DTYPE=bfloat16 (its
embeddings, activations and matmuls in bf16, master weights fp32), ours under
torch.autocast("cpu", bfloat16) as `training.runtime` does.

  python -m training.bench_memory saved --dtype bf16
  python -m training.bench_memory rss --dtype bf16 --runs 3
  python -m training.bench_memory rss --models old,ours --old-src /tmp/old   # a change, side by side
  python -m training.bench_memory eval --models old,ours --old-src /tmp/old  # an eval forward
  python -m training.bench_memory step-ab --old-src /tmp/old --runs 24       # step time, A/B
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext

# "old": this GPT from another checkout (--old-src), to measure a change side by side.
MODELS = ("ours", "nanochat", "old")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = ("bf16", "fp32")
NANOCHAT_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
DEFAULT_NANOCHAT_SRC = "/tmp/nanochat"


# --- building either model ----------------------------------------------------------------------


def build_model(kind: str, *, depth: int, n_embd: int, n_head: int, seq: int, vocab: int):
    """One freshly initialised model of `kind` on the CPU, built on meta then materialised."""
    import torch

    if kind == "ours":
        try:
            from engine.models.gpt import GPT, GPTConfig
        except ImportError:  # an "old" checkout from before engine/models/
            from engine.gpt import GPT, GPTConfig

        config = GPTConfig(
            sequence_len=seq,
            vocab_size=vocab,
            n_layer=depth,
            n_head=n_head,
            n_kv_head=n_head,
            n_embd=n_embd,
            window_pattern="L",
        )
    else:
        from nanochat.gpt import GPT, GPTConfig

        config = GPTConfig(
            sequence_len=seq,
            vocab_size=vocab,
            n_layer=depth,
            n_head=n_head,
            n_kv_head=n_head,
            n_embd=n_embd,
            window_pattern="L",
        )
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def step_context(kind: str, dtype: str):
    """How each project runs a bf16 step on the CPU: ours under autocast, nanochat by itself."""
    import torch

    if kind == "ours" and dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


# --- saved-tensor probe (training.memory's, for every model) ------------------------------------


def load_probe():
    """This checkout's training/memory.py, loaded by path.

    The "old" model's child imports `engine` and `training` from another checkout, which may
    not have the probe; loading it by path keeps the probe the same for every model.
    """
    name = "_bench_memory_probe"
    if name not in sys.modules:
        path = os.path.join(REPO_ROOT, "training", "memory.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it executes
        spec.loader.exec_module(module)
    return sys.modules[name]


def probe_per_token_per_layer(kind: str, dtype: str, args) -> dict:
    """Saved bytes per token per layer of `kind` by `training.memory`'s probe, at the CLI's
    probe shape (3 layers of the given width, d20's window pattern, rows of 64 tokens)."""
    from engine.models.gpt import GPTConfig

    probe = load_probe()
    full = GPTConfig(
        sequence_len=2048,
        vocab_size=512,
        n_layer=20,
        n_head=args.n_head,
        n_kv_head=args.n_head,
        n_embd=args.n_embd,
        window_pattern="SSSL",
    )
    config = probe.probe_model_config(full, seq=args.seq or 64)
    if kind == "nanochat":
        profile = probe.profile_nanochat(args.nanochat_src, config, dtype)
    else:
        profile = probe.profile_ours(config, dtype)
    return {"per_token_per_layer": profile.per_token_per_layer, "per_layer": profile.per_layer}


# --- training loop for peak RSS -----------------------------------------------------------------


def build_optimizer_for(kind: str, model, optimizer: str = "own"):
    """Each project's own optimizer with its default learning rates, or torch's AdamW for both."""
    import torch

    if optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    if kind == "ours":
        from training.optim import build_optimizer

        return build_optimizer(
            model,
            embedding_lr=0.3,
            unembedding_lr=0.004,
            matrix_lr=0.02,
            scalar_lr=0.5,
            weight_decay=0.2,
            distributed=False,
        )
    return model.setup_optimizer()


def train_steps(
    kind: str, dtype: str, *, steps: int, batch: int, seq: int, vocab: int, optimizer: str
) -> dict:
    """Build the d4 demo-shaped model and run `steps` training steps; memory and time as a dict."""
    import torch

    marks = {"imported": _peak_rss()}
    torch.manual_seed(0)
    model = build_model(kind, depth=4, n_embd=256, n_head=4, seq=seq, vocab=vocab)
    optimizer = build_optimizer_for(kind, model, optimizer)
    marks["built"] = _peak_rss()
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (steps, batch, seq + 1), generator=gen)
    losses, times = [], []
    for step in range(steps):
        # Contiguous rows, as a data loader hands them out (nanochat's loss views them).
        inputs, targets = data[step, :, :-1].contiguous(), data[step, :, 1:].contiguous()
        started = time.perf_counter()
        with step_context(kind, dtype):
            loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - started)
        if step == 0:
            marks["first_step"] = _peak_rss()
    marks["last_step"] = _peak_rss()
    return {"peak_rss_marks": marks, "losses": losses, "step_seconds": times}


def eval_forward(kind: str, dtype: str, *, batch: int, seq: int, vocab: int) -> dict:
    """Peak RSS before and after one evaluation forward (per-token losses, no autograd)."""
    import torch

    torch.manual_seed(0)
    model = build_model(kind, depth=4, n_embd=256, n_head=4, seq=seq, vocab=vocab)
    rows = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    before = _peak_rss()
    with torch.no_grad(), step_context(kind, dtype):
        losses = model(rows, rows, loss_reduction="none")
    return {"built": before, "after_eval": _peak_rss(), "loss_sum": losses.double().sum().item()}


def step_ab(old_src: str, dtype: str, rounds: int, *, batch: int, seq: int, vocab: int) -> None:
    """Time one training forward + backward of the demo model, old engine/gpt.py against this
    one, interleaved in one process (both use this checkout's attention and loss), so load
    from other processes falls on both alike. Prints medians, minima and their ratios."""
    import statistics

    import torch

    from engine.models import gpt as new_gpt

    # An old checkout has the model at engine/gpt.py, a newer one at engine/models/gpt.py.
    path = os.path.join(old_src, "engine", "models", "gpt.py")
    if not os.path.exists(path):
        path = os.path.join(old_src, "engine", "gpt.py")
    spec = importlib.util.spec_from_file_location("_bench_memory_old_gpt", path)
    old_gpt = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = old_gpt
    spec.loader.exec_module(old_gpt)
    rows = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(2))
    inputs, targets = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    models = {}
    for name, module in (("old", old_gpt), ("new", new_gpt)):
        config = module.GPTConfig.from_depth(
            4, vocab_size=vocab, sequence_len=seq, head_dim=64, window_pattern="L"
        )
        torch.manual_seed(0)
        models[name] = module.GPT(config)
        # Non-zero output projections, as after a few steps (at init they are zero).
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in models[name].transformer.h.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) / param.size(1) ** 0.5)

    def step(model) -> tuple[float, float]:
        started = time.perf_counter()
        with step_context("ours", dtype):
            loss = model(inputs, targets)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - started, loss.item()

    for model in models.values():
        step(model)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in models}
    losses = {}
    for round_ in range(rounds):
        for name in ("old", "new") if round_ % 2 == 0 else ("new", "old"):
            seconds, losses[name] = step(models[name])
            times[name].append(seconds)
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name}: median {1000 * median:.0f} ms  min {1000 * min(values):.0f} ms  "
              f"({batch * seq / median:,.0f} tok/s)  loss {losses[name]:.6f}")  # fmt: skip
    ratio = statistics.median(times["new"]) / statistics.median(times["old"])
    print(f"  new/old: median {ratio:.3f}  min {min(times['new']) / min(times['old']):.3f}")


def _peak_rss() -> int:
    """This process's peak resident set so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- running each measurement in its own process ------------------------------------------------


def child_env(model: str, dtype: str, args) -> dict[str, str]:
    """The environment of a child measuring `model`: which checkout it imports, which dtype."""
    env = dict(os.environ)
    paths = [args.old_src if model == "old" else REPO_ROOT]
    if model == "nanochat":
        env["NANOCHAT_DTYPE"] = NANOCHAT_DTYPES[dtype]
        paths.insert(0, args.nanochat_src)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, env.get("PYTHONPATH")]))
    return env


def run_child(args: list[str], env: dict[str, str]) -> dict:
    """Run this file in a fresh interpreter and return the JSON line it prints last.

    It runs by path, so `engine` and `training` come from PYTHONPATH (this checkout, or an
    older one for the "old" model) rather than from wherever this file lives.
    """
    command = [sys.executable, os.path.abspath(__file__), *args]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd="/")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.bench_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "what",
        choices=("saved", "rss", "eval", "step-ab", "child-saved", "child-rss", "child-eval"),
    )
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument(
        "--models", default="ours,nanochat", help="comma-separated: ours,nanochat,old"
    )
    parser.add_argument("--nanochat-src", default=DEFAULT_NANOCHAT_SRC, help="nanochat checkout")
    parser.add_argument("--old-src", default="", help="another checkout of this repo (model old)")
    parser.add_argument("--n-embd", type=int, default=1280, help="saved: width (d20's)")
    parser.add_argument("--n-head", type=int, default=10, help="saved: heads (d20's)")
    parser.add_argument("--seq", type=int, default=0, help="tokens per row (saved 64, rss 256)")
    parser.add_argument("--runs", type=int, default=3, help="runs per model (step-ab: rounds)")
    parser.add_argument("--steps", type=int, default=5, help="rss: training steps per run")
    parser.add_argument("--batch", type=int, default=16, help="rss: rows per step")
    parser.add_argument("--vocab", type=int, default=8192, help="rss: vocabulary size")
    parser.add_argument("--optimizer", choices=("own", "adamw"), default="own",
                        help="rss: each project's own optimizer, or torch's AdamW for both")  # fmt: skip
    parser.add_argument("--model", choices=MODELS, default="ours", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if set(models) - set(MODELS):
        parser.error(f"--models takes {', '.join(MODELS)}")
    if "old" in models and not args.old_src:
        parser.error("model old needs --old-src")

    if args.what == "child-saved":
        result = probe_per_token_per_layer(args.model, args.dtype, args)
        print(json.dumps({**result, "peak_rss": _peak_rss()}))
        return
    if args.what == "child-rss":
        result = train_steps(args.model, args.dtype, steps=args.steps, batch=args.batch,
                             seq=args.seq or 256, vocab=args.vocab,
                             optimizer=args.optimizer)  # fmt: skip
        print(json.dumps({**result, "peak_rss": _peak_rss()}))
        return

    if args.what == "child-eval":
        result = eval_forward(args.model, args.dtype, batch=args.batch, seq=args.seq or 256,
                              vocab=args.vocab)  # fmt: skip
        print(json.dumps({**result, "peak_rss": _peak_rss()}))
        return

    if args.what == "step-ab":
        if not args.old_src:
            parser.error("step-ab needs --old-src")
        print(f"forward + backward, old vs new engine/gpt.py interleaved: depth 4, batch "
              f"{args.batch} x {args.seq or 256}, vocab {args.vocab}, {args.dtype}, "
              f"{args.runs} rounds")  # fmt: skip
        step_ab(args.old_src, args.dtype, args.runs, batch=args.batch, seq=args.seq or 256,
                vocab=args.vocab)  # fmt: skip
        return

    common = ["--dtype", args.dtype, "--nanochat-src", args.nanochat_src]
    if args.what == "eval":
        seq = args.seq or 256
        print(f"one evaluation forward (per-token losses, no autograd): depth 4, batch "
              f"{args.batch} x {seq}, vocab {args.vocab}, {args.dtype}; peak RSS MiB")  # fmt: skip
        shape = ["--seq", str(seq), "--batch", str(args.batch), "--vocab", str(args.vocab)]
        for run in range(args.runs):
            for kind in models:
                result = run_child(
                    ["child-eval", "--model", child_model(kind), *common, *shape],
                    child_env(kind, args.dtype, args),
                )
                built, after = result["built"] / 2**20, result["after_eval"] / 2**20
                print(f"  run {run + 1} {kind:9s} built {built:6.0f}  after eval {after:6.0f}  "
                      f"(+{after - built:.0f})   loss sum {result['loss_sum']:.6f}")  # fmt: skip
        return
    if args.what == "saved":
        seq = args.seq or 64
        print(f"saved for backward, bytes per token per layer: width {args.n_embd}, "
              f"{args.n_head} heads, {seq} tokens per row, {args.dtype}")  # fmt: skip
        for kind in models:
            shape = ["--n-embd", str(args.n_embd), "--n-head", str(args.n_head), "--seq", str(seq)]
            result = run_child(
                ["child-saved", "--model", child_model(kind), *common, *shape],
                child_env(kind, args.dtype, args),
            )
            layers = ", ".join(f"{v:,.0f}" for v in result["per_layer"])
            print(f"  {kind:9s} {result['per_token_per_layer']:10,.0f}   (layers: {layers})")
        return

    seq = args.seq or 256
    print(f"peak RSS of a training process: depth 4, batch {args.batch} x {seq}, vocab "
          f"{args.vocab}, {args.steps} steps, {args.dtype}, optimizer {args.optimizer}")  # fmt: skip
    shape = ["--seq", str(seq), "--steps", str(args.steps), "--batch", str(args.batch),
             "--vocab", str(args.vocab), "--optimizer", args.optimizer]  # fmt: skip
    peaks: dict[str, list[int]] = {kind: [] for kind in models}
    for run in range(args.runs):
        for kind in models:
            result = run_child(
                ["child-rss", "--model", child_model(kind), *common, *shape],
                child_env(kind, args.dtype, args),
            )
            peak = result["peak_rss"]
            peaks[kind].append(peak)
            marks = result["peak_rss_marks"]
            step_ms = 1000 * sorted(result["step_seconds"][1:] or result["step_seconds"])[0]
            print(f"  run {run + 1} {kind:9s} peak {peak / 2**20:7.1f} MiB   "
                  + "  ".join(f"{k} {v / 2**20:.0f}" for k, v in marks.items())
                  + f"   loss {result['losses'][-1]:.3f}   best step {step_ms:.0f} ms")  # fmt: skip
    for kind, values in peaks.items():
        mib = ", ".join(f"{v / 2**20:.0f}" for v in values)
        print(f"  {kind:9s} peak RSS MiB: {mib}  (max {max(values) / 2**20:.0f})")
    if {"ours", "nanochat"} <= set(peaks):
        ratio = max(peaks["ours"]) / max(peaks["nanochat"])
        print(f"  ours / nanochat (max over runs): {ratio:.3f}")


def child_model(model: str) -> str:
    """The model a child builds: "old" is this GPT, imported from --old-src."""
    return "ours" if model == "old" else model


if __name__ == "__main__":
    main()
