"""One script that tells what this code does on a GPU: `make gpu-check` (about 8 minutes).

    python -m training.gpu_check [--out FILE] [--budget-s 480] [--work-dir DIR]
    GPU_CHECK_DEVICE=cpu python -m training.gpu_check      # the same steps, tiny, on a CPU

In order, each step time-bounded and each failure recorded rather than fatal:
  1. a small corpus (the built-in one) and a tokenizer, in a scratch NANOCHAT_HOME;
  2. the CUDA tests (`pytest -m cuda tests/gpu`, without the Django conftest);
  3. real `python -m training.base_train` processes: d20 at the automatic device batch for 10
     steps, then d12 bf16 compiled for 50 steps;
  4. `python -m engine.bench` at the d20 shape, decoding 1 and 8 rows, eager and with CUDA
     graphs;
  5. every attention backend (SDPA, FlexAttention, FA3 where present) at the d20 shape.
It prints ONE table -- tokens/s, MFU, peak memory predicted (training.memory) vs measured
(torch.cuda.max_memory_allocated in the training process), decode tokens/s -- and writes it as
markdown (--out) for docs/benchmarks.md. Exit status 1 if any step failed.

It needs only what a GPU host's own Python has (torch, numpy, pyarrow, tiktoken, pytest) plus
rustbpe for the tokenizer (scripts/gpu_wheels.sh fetches the wheel where no registry is
reachable). Training processes get PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless the
caller set a value, as the web app's runs do.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
ALLOC_CONF = "expandable_segments:True"
# Steps after which base_train's per-step numbers count (the first ones include compiling).
WARMUP_STEPS = 3


@dataclass(frozen=True)
class Shapes:
    """Everything that differs between the GPU check and its tiny CPU rehearsal."""

    device: str
    dtype: str  # base_train's --dtype
    vocab_size: int
    small: dict[str, Any]  # base_train flags of the "d12" run
    large: dict[str, Any]  # base_train flags of the "d20" run
    bench: dict[str, Any]  # engine.bench flags (samples set per row)
    attention: tuple[int, int, int, int]  # batch, seq, heads, head_dim
    eval_tokens: int  # base_train's end-of-run validation: one small batch
    budget_s: float


GPU = Shapes(
    device="cuda",
    dtype="bf16",
    # The built-in corpus supports ~31k merges; 24k leaves room for a different Python's docs.
    vocab_size=24576,
    small={"depth": 12, "device_batch_size": 32, "total_batch_size": 131072,
           "num_iterations": 50, "compile": True},
    large={"depth": 20, "device_batch_size": "auto", "total_batch_size": 524288,
           "num_iterations": 10},
    bench={"depth": 20, "head_dim": 128, "sequence_len": 2048, "prompt_len": 128, "gen": 128,
           "repeats": 3},
    attention=(8, 2048, 10, 128),
    eval_tokens=4 * 2048,
    budget_s=480,
)  # fmt: skip
CPU = Shapes(
    device="cpu",
    dtype="fp32",
    vocab_size=512,
    small={"depth": 2, "aspect_ratio": 32, "head_dim": 32, "max_seq_len": 64,
           "device_batch_size": 2, "total_batch_size": 256, "num_iterations": 4,
           "compile": False},
    large={"depth": 3, "aspect_ratio": 32, "head_dim": 32, "max_seq_len": 64,
           "device_batch_size": "auto", "total_batch_size": 512, "num_iterations": 3,
           "compile": False},
    bench={"depth": 2, "head_dim": 32, "sequence_len": 64, "prompt_len": 8, "gen": 8,
           "repeats": 1, "threads": 1},
    attention=(1, 128, 2, 32),
    eval_tokens=128,
    budget_s=120,
)  # fmt: skip


@dataclass
class Row:
    """One line of the table; None prints as n/a."""

    check: str
    tok_s: float | None = None
    mfu: float | None = None
    predicted_gib: float | None = None
    measured_gib: float | None = None
    decode_tok_s: float | None = None
    notes: str = ""
    ok: bool = True


@dataclass
class Check:
    shapes: Shapes
    work: Path
    deadline: float
    rows: list[Row] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, argv: Sequence[str], cap_s: float, log_name: str) -> subprocess.CompletedProcess:
        """Run a child process of this repo within min(cap, budget left); output to a log."""
        timeout = max(1.0, min(cap_s, self.left()))
        log = self.work / f"{log_name}.log"
        started = time.monotonic()
        try:
            done = subprocess.run(
                list(argv), cwd=REPO, env=self.env, capture_output=True, text=True,
                timeout=timeout, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            log.write_text(_text(exc.stdout) + _text(exc.stderr))
            raise StepFailed(f"timed out after {timeout:.0f}s (log {log})") from None
        log.write_text(done.stdout + done.stderr)
        print(f"  {log_name}: exit {done.returncode} in {time.monotonic() - started:.0f}s")
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise StepFailed(f"exit {done.returncode}: {' / '.join(tail)} (log {log})")
        return done


class StepFailed(Exception):
    pass


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def step(check: Check, label: str, body: Callable[[], list[Row]], min_s: float = 5) -> None:
    """Run one step; a failure (or no budget left) becomes a failed row, never an exit."""
    print(f"== {label}", flush=True)
    if check.left() < min_s:
        check.rows.append(Row(label, notes="skipped: time budget spent", ok=False))
        return
    try:
        check.rows.extend(body())
    except Exception as exc:  # recorded in the table; the other steps still run
        print(f"  failed: {exc}")
        check.rows.append(Row(label, notes=f"FAILED: {exc}"[:300], ok=False))


# ---- the steps ------------------------------------------------------------------------------


def prepare_data(check: Check) -> list[Row]:
    """A corpus and a tokenizer in the scratch NANOCHAT_HOME, in this process.

    On a GPU the built-in corpus (the standard library's documentation, ~3M characters); the
    CPU rehearsal takes this repository's own Python sources, which need no rendering.
    """
    from training import tok_train
    from training.dataset import build_builtin_corpus, write_corpus

    shapes = check.shapes
    started = time.monotonic()
    data_dir, tokenizer_dir = check.work / "base_data", check.work / "tokenizer"
    if shapes.device == "cuda":
        build_builtin_corpus(data_dir, None, num_shards=4, overwrite=True)
    else:
        write_corpus(data_dir, repo_documents(), num_shards=4, overwrite=True)
    code = tok_train.main(["--data-dir", str(data_dir), "--out", str(tokenizer_dir),
                           "--vocab-size", str(shapes.vocab_size)])  # fmt: skip
    if code:
        raise StepFailed(f"training the tokenizer exited {code}")
    seconds = time.monotonic() - started
    return [Row("data: corpus + tokenizer", notes=f"vocab {shapes.vocab_size}, {seconds:.0f}s")]


def repo_documents() -> list[str]:
    """This repository's engine and training sources, one document per file."""
    files = sorted((REPO / "engine").glob("*.py")) + sorted((REPO / "training").glob("*.py"))
    return [text for path in files if (text := path.read_text(errors="replace")).strip()]


def cuda_tests(check: Check) -> list[Row]:
    """The CUDA tests, on any Python with pytest (no Django: --noconftest)."""
    argv = [sys.executable, "-m", "pytest", "tests/gpu", "-m", "cuda", "-q", "-rfEs",
            "--noconftest", "-p", "no:django", "-p", "no:cacheprovider"]  # fmt: skip
    try:
        done = check.run(argv, 180, "cuda_tests")
        output, failed = done.stdout, False
    except StepFailed as exc:
        output, failed = (check.work / "cuda_tests.log").read_text(), True
        if "timed out" in str(exc):
            raise
    counts = {
        word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", output)
    }
    summary = ", ".join(f"{n} {word}" for word, n in counts.items()) or "no summary"
    return [Row("CUDA tests (pytest -m cuda tests/gpu)", notes=summary, ok=not failed)]


def train(check: Check, label: str, flags: dict[str, Any], cap_s: float) -> list[Row]:
    """One real base_train process; its events give tok/s, MFU, batch and measured peak."""
    name = label.split()[1]  # d12, d20
    run_dir = check.work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # events.jsonl appends: start clean on a rerun
    argv = [sys.executable, "-m", "training.base_train", "--device", check.shapes.device,
            "--dtype", check.shapes.dtype, "--run-dir", str(run_dir),
            "--checkpoint-dir", str(check.work / "checkpoints" / name),
            "--eval-every", "-1", "--eval-tokens", str(check.shapes.eval_tokens),
            "--sample-every", "-1", "--save-every", "-1", "--log-every", "5"]  # fmt: skip
    for flag, value in flags.items():
        option = "--" + flag.replace("_", "-")
        if isinstance(value, bool):
            argv.append(option if value else "--no-" + option[2:])
        else:
            argv += [option, str(value)]
    check.run(argv, cap_s, f"train_{name}")
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["type"] == "start")
    derived = start.get("derived", {})
    batch = derived.get("device_batch_size", start["config"].get("device_batch_size"))
    metrics = [e["values"] for e in events if e["type"] == "metrics"]
    timed = [m for m in metrics[WARMUP_STEPS:] if m.get("train/tok_per_sec")] or metrics[-1:]
    tok_s = statistics.median(m["train/tok_per_sec"] for m in timed) if timed else None
    mfus = [m["train/mfu"] for m in timed if m.get("train/mfu") is not None]
    losses = [m.get("train/loss_raw") for m in metrics]
    finite = bool(losses) and all(isinstance(x, (int, float)) for x in losses)
    report = "\n".join(e.get("markdown", "") for e in events if e["type"] == "report")
    measured = re.search(r"peak memory: ([\d,.]+) MiB", report)
    model_config = derived.get("model_config")
    notes = (
        f"B={batch} x T={start['config'].get('max_seq_len')}, "
        f"accum {derived.get('grad_accum_steps')}, {len(metrics)} steps, "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
        if finite
        else f"B={batch}; loss not finite: {losses[-3:]}"
    )
    return [
        Row(
            label,
            tok_s=tok_s,
            mfu=statistics.median(mfus) if mfus else None,
            predicted_gib=predicted_gib(model_config, batch, check.shapes),
            measured_gib=float(measured.group(1).replace(",", "")) / 1024 if measured else None,
            notes=notes,
            ok=finite,
        )
    ]


def predicted_gib(model_config: dict | None, batch: Any, shapes: Shapes) -> float | None:
    """training.memory's predicted step peak, or None where that module or its input is absent."""
    if not model_config or not isinstance(batch, int):
        return None
    try:
        from training.memory import estimate_step
    except ImportError:
        return None
    from engine.models.registry import config_from_dict

    estimate = estimate_step(
        config_from_dict(model_config), device_batch_size=batch, world_size=1, dtype=shapes.dtype,
        device_type=shapes.device,
    )  # fmt: skip
    return estimate.total / 2**30


# engine.bench's extra decode modes: CUDA graphs on a GPU; on a CPU the same bucketed
# static-shape step, run eagerly (what the graphs capture).
BENCH_MODES = {"cuda": ("graphs", "--cuda-graphs", "CUDA graphs"),
               "cpu": ("static", "--static-decode", "static shapes")}  # fmt: skip


def engine_bench(check: Check) -> list[Row]:
    """engine.bench at the large run's shape: decode tok/s with 1 and 8 rows, eager and in the
    device's extra mode (where this engine.bench has it)."""
    vocab = check.shapes.vocab_size
    argv = [sys.executable, "-m", "engine.bench", "--json", "--device", check.shapes.device,
            "--vocab", str(vocab), "--temperature", "0", "--samples", "8"]  # fmt: skip
    for name, value in check.shapes.bench.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    mode, flag, label = BENCH_MODES[check.shapes.device]
    from engine.bench import build_parser

    if flag in build_parser().format_help():
        argv.append(flag)
    result = json.loads(check.run(argv, 240, "engine_bench").stdout.strip().splitlines()[-1])
    config = result["config"]
    shape = f"d{config['n_layer']} n_embd {config['n_embd']}, vocab {vocab}, {result['gen']} tokens"
    rows = [
        Row("engine decode, 1 row", decode_tok_s=result["decode_tok_per_s"],
            notes=f"{shape}; prefill {result['prefill_tok_per_s']:,.0f} tok/s"),
        Row("engine decode, 8 rows", decode_tok_s=result["decode_samples_tok_per_s"],
            notes=shape),
    ]  # fmt: skip
    for key, rows_label in (("decode_tok_per_s", "1 row"), ("decode_samples_tok_per_s", "8 rows")):
        if f"{mode}_{key}" in result:
            rows.append(Row(f"engine decode, {rows_label}, {label}",
                            decode_tok_s=result[f"{mode}_{key}"], notes=shape))  # fmt: skip
    return rows


def attention_bench(check: Check) -> list[Row]:
    """Forward + backward of each attention backend at the large run's shape, full and window."""
    import engine.attention as attn

    device = torch.device(check.shapes.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch, seq, heads, dim = check.shapes.attention
    if hasattr(attn, "load_hub_fa3"):
        attn.load_hub_fa3(device)
    forceable = hasattr(attn, "set_backend") and hasattr(attn, "backend_for")
    backends = ("sdpa", "flex", "fa3") if forceable else ("default",)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(
            batch, seq, heads, dim, device=device, generator=gen, dtype=dtype
        ).requires_grad_()
        for _ in range(3)
    )
    rows = []
    previous = attn.get_backend() if forceable else None
    try:
        for backend in backends:
            for window in (None, seq // 2):
                if forceable:
                    attn.set_backend(backend)
                    if attn.backend_for(q, k, window=window) != backend:
                        continue  # not available here (FA3 not installed, flex on a CPU, ...)

                def once(window=window) -> None:
                    attn.attention(q, k, v, window=window).sum().backward()

                seconds = _time(once, device)
                visible = sum(min(i, seq if window is None else window) + 1 for i in range(seq))
                flops = 4 * 3.5 * batch * heads * dim * visible  # fwd 2 matmuls, bwd 2.5x
                rows.append(Row(
                    f"attention {backend}, {'full' if window is None else f'window {window}'}",
                    tok_s=batch * seq / seconds,
                    notes=f"fwd+bwd {seconds * 1e3:.2f} ms, {flops / seconds / 1e12:.3g} TFLOP/s "
                          f"(B={batch} T={seq} H={heads} D={dim} {str(dtype)[6:]})",
                ))  # fmt: skip
    finally:
        if forceable:
            attn.set_backend(previous)
    return rows


def _time(fn: Callable[[], None], device: torch.device, repeats: int = 10) -> float:
    """Median seconds of fn after two warm-up calls (CUDA events on a GPU)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


# ---- the table ------------------------------------------------------------------------------

COLUMNS = ("check", "tok/s", "MFU", "peak GiB predicted", "peak GiB measured", "decode tok/s",
           "notes")  # fmt: skip


def _cell(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def table(rows: Sequence[Row]) -> str:
    """The markdown table of the rows (one line per row)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [
            row.check,
            _cell(row.tok_s, ",.0f"),
            "n/a" if row.mfu is None else f"{row.mfu:.1f}%",
            _cell(row.predicted_gib, ".2f"),
            _cell(row.measured_gib, ".2f"),
            _cell(row.decode_tok_s, ",.1f"),
            row.notes.replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(shapes: Shapes) -> str:
    if shapes.device == "cuda":
        where = f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)"
    else:
        where = f"CPU, {os.cpu_count()} cores"
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"gpu-check {date}: {where}; torch {torch.__version__}, Python "
        f"{sys.version.split()[0]}; device {shapes.device}"
    )


def child_env(work: Path, device: str) -> dict[str, str]:
    """The environment of the check's processes: this one's, the scratch data home, and the
    allocator setting training runs get (a value already set is kept)."""
    env = {**os.environ, "NANOCHAT_HOME": str(work), "PYTHONUNBUFFERED": "1"}
    if "PYTORCH_ALLOC_CONF" not in env:  # the newer name of the same setting (torch >= 2.9)
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)
    if device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")  # tiny shapes: threads only wait on each other
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.gpu_check",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--device", default=os.environ.get("GPU_CHECK_DEVICE", "cuda"),
                        choices=("cuda", "cpu"), help="cpu: tiny shapes (default: "
                        "$GPU_CHECK_DEVICE or cuda)")  # fmt: skip
    parser.add_argument(
        "--out",
        default=os.environ.get("GPU_CHECK_OUT", ""),
        help="write the table as markdown here (default: <work dir>/gpu_check.md)",
    )
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting steps after this many seconds (default 480 on "
                        "CUDA, 120 on CPU)")  # fmt: skip
    parser.add_argument("--work-dir", default="", help="scratch NANOCHAT_HOME (default: a "
                        "temporary directory, removed unless --keep)")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, runs)")
    parser.add_argument("--skip-tests", action="store_true", help="leave out the CUDA tests")
    args = parser.parse_args(argv)
    shapes = GPU if args.device == "cuda" else CPU
    if shapes.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with GPU_CHECK_DEVICE=cpu for the CPU rehearsal")
    budget = shapes.budget_s if args.budget_s is None else args.budget_s
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu-check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if "PYTORCH_ALLOC_CONF" not in os.environ:  # this process's benches, like the children
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)
    if shapes.device == "cpu":
        torch.set_num_threads(1)  # the tiny attention bench, like the children (child_env)
    check = Check(shapes, work, time.monotonic() + budget, env=child_env(work, shapes.device))
    print(f"gpu-check on {shapes.device}: work dir {work}, budget {budget:.0f}s", flush=True)

    step(check, "data: corpus + tokenizer", lambda: prepare_data(check))
    if shapes.device != "cuda" or args.skip_tests:
        check.rows.append(Row("CUDA tests (pytest -m cuda tests/gpu)", notes="not run here"))
    else:
        step(check, "CUDA tests (pytest -m cuda tests/gpu)", lambda: cuda_tests(check))
    small = f"train d{shapes.small['depth']} {shapes.dtype} " + (
        "compiled" if shapes.small.get("compile") else "eager"
    )
    large = f"train d{shapes.large['depth']} auto batch"
    # d20 first: its row carries the targets (MFU, fit at auto batch) if the budget runs short.
    step(check, large, lambda: train(check, large, shapes.large, 240), min_s=30)
    step(check, small, lambda: train(check, small, shapes.small, 180), min_s=30)
    step(check, "engine decode", lambda: engine_bench(check))
    step(check, "attention backends", lambda: attention_bench(check))

    text = header(shapes) + "\n\n" + table(check.rows) + "\n"
    print("\n" + text)
    out = Path(args.out) if args.out else work / "gpu_check.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"table written to {out}")
    if not args.keep and not args.work_dir:
        shutil.rmtree(work / "checkpoints", ignore_errors=True)  # GBs at d20; logs stay
    return 0 if all(row.ok for row in check.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
