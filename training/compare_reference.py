"""This project's base training side by side with karpathy's nanochat, on the same data.

    python -m training.compare_reference --nanochat /tmp/nanochat-src --steps 300
    python -m training.compare_reference --nanochat /tmp/nanochat-src --steps 300 \\
        --modes defaults,explicit --repeats 2 --work-dir /tmp/compare --json /tmp/compare.json

Given a nanochat checkout (its source tree: `scripts/base_train.py`, `nanochat/`), this
prepares ONE dataset and tokenizer for both -- our parquet shards and tokenizer (`--data-dir`,
`--tokenizer-dir`, default <NANOCHAT_HOME>/base_data and /tokenizer), laid out where nanochat
reads them (`$NANOCHAT_BASE_DIR/base_data_climbmix/*.parquet`, the last shard being the
validation split in both projects, and `$NANOCHAT_BASE_DIR/tokenizer/{tokenizer.pkl,
token_bytes.pt}`, the same two files both projects write) -- then runs our
`training.base_train` and nanochat's `scripts.base_train` alternately (the order flips every
repeat, so a drift in machine load does not always favour one), each in its own process with
the same shape (depth, aspect ratio, head dim, sequence length, window pattern, device and total
batch, dtype, steps, evaluation cadence and tokens) and reports for each run:

- the machine's load average just before it started (`os.getloadavg`);
- tok/s: the median over the timed steps of tokens per step / step time;
- peak RSS of the whole process tree (torch.compile's workers included) and of the main
  process alone, sampled every 0.2 s with psutil;
- validation bits per byte at every evaluation step (equal steps), and at equal training time:
  each run's bpb curve against its own training clock (the sum of its step times after the
  first `--clock-skip-steps` steps, which pay for compilation and warm-up; evaluations are not
  counted), linearly interpolated at common times up to the shorter run's end.

Modes: `defaults` gives each program only the shape, horizon and evaluation flags, so each uses
its own optimizer recipe; `explicit` also passes both the same optimizer hyperparameters
(`--hparam name=value`, default nanochat's own defaults), so what remains different is the
implementation; `preset` runs ours from the preset this project recommends for the shape
(`--our-config`, default demo-cpu: the recipe tuned for a d4 model on a small CPU, see its
YAML) under the same shape, horizon, dtype and evaluation flags, and nanochat as in `defaults`
-- what a user of each tool gets for this model out of the box.

nanochat is run from its checkout with `NANOCHAT_BASE_DIR` pointing into the work directory;
nothing of it is copied into this repository. It compiles its model and optimizer with
torch.compile (a C compiler is needed on a CPU); ours runs eager on a CPU unless
`--our-compile` says otherwise.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.tokenizer import TOKEN_BYTES_FILE, TOKENIZER_FILE, Tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("ours", "nanochat")
MODES = ("defaults", "explicit", "preset")
# The shape of the issue's measurement (depth 4, head dim 64, 256 tokens, window L, 16 x 256
# rows per pass, 4096 tokens per step).
SHAPE_DEFAULTS: dict[str, Any] = {
    "depth": 4,
    "aspect_ratio": 64,
    "head_dim": 64,
    "max_seq_len": 256,
    "window_pattern": "L",
    "device_batch_size": 16,
    "total_batch_size": 4096,
}
# The optimizer hyperparameters both programs take under the same names, at nanochat's
# defaults (92d63d4): what `explicit` passes to both unless --hparam changes one.
EXPLICIT_HPARAMS: dict[str, float] = {
    "embedding_lr": 0.3,
    "unembedding_lr": 0.008,
    "matrix_lr": 0.02,
    "scalar_lr": 0.5,
    "weight_decay": 0.28,
    "warmup_steps": 40,
    "warmdown_ratio": 0.65,
    "final_lr_frac": 0.05,
}
NANOCHAT_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
RSS_INTERVAL = 0.2
NANOCHAT_DATA = "base_data_climbmix"
_NANOCHAT_STEP = re.compile(
    r"^step (\d+)/(\d+) .*?\| loss: ([0-9.]+) .*?\| dt: ([0-9.]+)ms", re.MULTILINE
)
_NANOCHAT_EVAL = re.compile(r"^Step (\d+) \| Validation bpb: ([0-9.]+)", re.MULTILINE)


# ---- what a run leaves: parsing -------------------------------------------------------------


@dataclass
class Curve:
    """One run's numbers: per completed step its time and train loss, and the evaluations."""

    step_seconds: dict[int, float] = field(default_factory=dict)  # step n (1-based) -> dt
    train_loss: dict[int, float] = field(default_factory=dict)  # step n -> smoothed loss
    evals: list[tuple[int, float]] = field(default_factory=list)  # (steps done, val bpb)
    tokens_per_step: int | None = None  # where the run said (our start event's derived)

    def clock(self, skip: int) -> dict[int, float]:
        """{step: training seconds after it}, counting only steps after the first `skip`."""
        elapsed, out = 0.0, {0: 0.0}
        for step in sorted(self.step_seconds):
            if step > skip:
                elapsed += self.step_seconds[step]
            out[step] = elapsed
        return out

    def tok_per_sec(self, tokens_per_step: int, skip: int) -> float | None:
        """Median tokens/s over the steps after the first `skip` (None if there are none)."""
        rates = [tokens_per_step / dt for s, dt in self.step_seconds.items() if s > skip and dt > 0]
        return statistics.median(rates) if rates else None

    def timed_evals(self, skip: int) -> list[tuple[float, float, int]]:
        """[(training seconds, val bpb, step)] for the evaluations whose step has a time."""
        clock = self.clock(skip)
        return [(clock[step], bpb, step) for step, bpb in self.evals if step in clock]


def parse_nanochat_log(text: str) -> Curve:
    """A nanochat `scripts.base_train` log's step lines and validation lines.

    Its step line names the step index before it was taken (`step 00000/00300 ... dt: 812.3ms`
    is the first step), so it becomes completed step n + 1, as our metrics events count.
    """
    curve = Curve()
    for match in _NANOCHAT_STEP.finditer(text):
        done = int(match.group(1)) + 1
        curve.train_loss[done] = float(match.group(3))
        curve.step_seconds[done] = float(match.group(4)) / 1000
    curve.evals = [(int(m.group(1)), float(m.group(2))) for m in _NANOCHAT_EVAL.finditer(text)]
    return curve


def parse_our_events(path: Path) -> Curve:
    """Our `events.jsonl`: metrics events (step, train/step_ms, train/loss) and eval events."""
    curve = Curve()
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed run
        if event.get("type") == "start":
            batch = (event.get("derived") or {}).get("total_batch_size")
            curve.tokens_per_step = batch if isinstance(batch, int) else None
        values = event.get("values") or {}
        step = event.get("step")
        if not isinstance(step, int):
            continue
        if event.get("type") == "metrics" and isinstance(values.get("train/step_ms"), float):
            curve.step_seconds[step] = values["train/step_ms"] / 1000
            if isinstance(values.get("train/loss"), float):
                curve.train_loss[step] = values["train/loss"]
        elif event.get("type") == "eval" and isinstance(values.get("val/bpb"), float):
            curve.evals.append((step, values["val/bpb"]))
    return curve


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """y at x on the piecewise-linear curve through `points` (sorted by x); None outside it.

    Where several points share an x (evaluations inside the untimed warm-up all sit at time
    0), the last of them counts."""
    if not points or x < points[0][0] or x > points[-1][0]:
        return None
    xs = [p[0] for p in points]
    i = bisect.bisect_right(xs, x)
    if i == len(points) or xs[i - 1] == x:
        return points[i - 1][1]
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def equal_time_grid(ends: Iterable[float], count: int) -> list[float]:
    """`count` evenly spaced times up to the earliest of `ends` (the shorter run's end)."""
    end = min(ends, default=0.0)
    if end <= 0 or count < 1:
        return []
    return [end * (i + 1) / count for i in range(count)]


# ---- running both ---------------------------------------------------------------------------


@dataclass
class RunResult:
    tool: str
    mode: str
    repeat: int
    load_before: tuple[float, float, float]
    returncode: int
    wall_seconds: float
    peak_rss_tree: int  # bytes, the process and all its descendants
    peak_rss_main: int  # bytes, the process alone
    log_path: str
    curve: Curve

    def summary(self, tokens_per_step: int, skip: int) -> dict[str, Any]:
        evals = self.curve.evals
        clock = self.curve.clock(skip)
        return {
            "tool": self.tool,
            "mode": self.mode,
            "repeat": self.repeat,
            "load_before": list(self.load_before),
            "returncode": self.returncode,
            "wall_seconds": self.wall_seconds,
            "training_seconds": clock[max(clock)],
            "steps": max(self.curve.step_seconds, default=0),
            "tok_per_sec": self.curve.tok_per_sec(tokens_per_step, skip),
            "peak_rss_tree_mib": self.peak_rss_tree / 2**20,
            "peak_rss_main_mib": self.peak_rss_main / 2**20,
            "final_val_bpb": evals[-1][1] if evals else None,
            "min_val_bpb": min((b for _, b in evals), default=None),
            "evals": evals,
            "final_train_loss": self.curve.train_loss.get(max(self.curve.train_loss, default=0)),
            "log": self.log_path,
        }


class RssMonitor(threading.Thread):
    """Samples the RSS of a process and its descendants until it exits; keeps the peaks."""

    def __init__(self, pid: int, interval: float = RSS_INTERVAL) -> None:
        super().__init__(daemon=True)
        import psutil

        self._psutil = psutil
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak_tree = 0
        self.peak_main = 0
        self._done = threading.Event()

    def sample(self) -> None:
        psutil = self._psutil
        try:
            main = self.process.memory_info().rss
            children = self.process.children(recursive=True)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return
        total = main
        for child in children:
            try:
                total += child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self.peak_main = max(self.peak_main, main)
        self.peak_tree = max(self.peak_tree, total)

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


@dataclass(frozen=True)
class Setup:
    """Everything both runs share, and where each one writes."""

    nanochat: Path
    work_dir: Path
    data_dir: Path
    tokenizer_dir: Path
    shape: dict[str, Any]
    steps: int
    eval_every: int
    eval_tokens: int
    dtype: str
    hparams: dict[str, float]
    our_compile: str  # "auto" (our default: off on a CPU), "on" or "off"
    our_config: str  # our base_train preset in `preset` mode
    threads: int | None
    timeout: float
    python: str

    @property
    def nanochat_home(self) -> Path:
        return self.work_dir / "nanochat_home"

    @property
    def tokens_per_step(self) -> int:
        return self.shape["total_batch_size"]


def check_nanochat(checkout: Path) -> Path:
    """The checkout's root, refusing one without nanochat's base training (clear message)."""
    root = checkout.expanduser().resolve()
    missing = [p for p in ("scripts/base_train.py", "nanochat/gpt.py") if not (root / p).is_file()]
    if missing:
        raise ValueError(
            f"--nanochat: {root} is not a nanochat source tree (missing {', '.join(missing)}); "
            "e.g. git clone https://github.com/karpathy/nanochat, or `git archive` a mirror"
        )
    return root


def prepare_shared(work_dir: Path, data_dir: Path, tokenizer_dir: Path) -> dict[str, Any]:
    """Lay our shards and tokenizer out where nanochat reads them; returns what was shared.

    The shards are linked (not copied) under their own names, so both projects list them in
    the same order and take the same last shard as validation. The tokenizer is loaded first,
    so a directory that is not one fails here with our error, not deep inside nanochat.
    """
    shards = sorted(p for p in data_dir.glob("*.parquet") if p.is_file())
    if len(shards) < 2:
        raise ValueError(
            f"--data-dir: {data_dir} holds {len(shards)} parquet shard(s); training needs at "
            "least 2 (train + the last as validation): python -m training.dataset builtin"
        )
    tokenizer = Tokenizer.load(tokenizer_dir)
    home = work_dir / "nanochat_home"
    shard_dir = home / NANOCHAT_DATA
    if shard_dir.exists():
        shutil.rmtree(shard_dir)
    shard_dir.mkdir(parents=True)
    for shard in shards:
        (shard_dir / shard.name).symlink_to(shard.resolve())
    tok_dir = home / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    for name in (TOKENIZER_FILE, TOKEN_BYTES_FILE):
        shutil.copyfile(tokenizer_dir / name, tok_dir / name)
    return {
        "shards": [s.name for s in shards],
        "val_shard": shards[-1].name,
        "vocab_size": tokenizer.vocab_size,
    }


def our_command(setup: Setup, mode: str, run_dir: Path) -> list[str]:
    shape = setup.shape
    # The preset comes first: every flag after it (shape, horizon, dtype, evals) overrides it.
    preset = ["--config", setup.our_config] if mode == "preset" else []
    args = [
        setup.python, "-m", "training.base_train", *preset, "--device", "cpu",
        "--dtype", setup.dtype,
        "--num-iterations", str(setup.steps), "--eval-every", str(setup.eval_every),
        "--eval-tokens", str(setup.eval_tokens), "--sample-every", "-1", "--save-every", "-1",
        "--log-every", "1",
        "--data-dir", str(setup.data_dir), "--tokenizer-dir", str(setup.tokenizer_dir),
        "--checkpoint-dir", str(run_dir / "checkpoints"), "--run-dir", str(run_dir),
    ]  # fmt: skip
    for name, value in shape.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    if setup.our_compile != "auto":
        args.append("--compile" if setup.our_compile == "on" else "--no-compile")
    if mode == "explicit":
        for name, value in setup.hparams.items():
            args += ["--" + name.replace("_", "-"), str(value)]
    return args


def nanochat_command(setup: Setup, mode: str, tag: str) -> list[str]:
    shape = setup.shape
    args = [
        setup.python, "-m", "scripts.base_train", "--device-type", "cpu",
        "--num-iterations", str(setup.steps), "--eval-every", str(setup.eval_every),
        "--eval-tokens", str(setup.eval_tokens), "--core-metric-every", "-1",
        "--sample-every", "-1", "--save-every", "-1", "--run", "dummy", "--model-tag", tag,
    ]  # fmt: skip
    for name, value in shape.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    if mode == "explicit":
        for name, value in setup.hparams.items():
            args += ["--" + name.replace("_", "-"), str(value)]
    return args


def child_env(setup: Setup, tool: str, run_dir: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    if setup.threads:
        env.update(OMP_NUM_THREADS=str(setup.threads), MKL_NUM_THREADS=str(setup.threads))
    if tool == "nanochat":
        env["NANOCHAT_BASE_DIR"] = str(setup.nanochat_home)
        env["NANOCHAT_DTYPE"] = NANOCHAT_DTYPES[setup.dtype]
        env["PYTHONPATH"] = str(setup.nanochat)
    else:
        # Our defaults (reports, checkpoints) stay inside the work directory.
        env["NANOCHAT_HOME"] = str(run_dir / "home")
        env.pop("NANOCHAT_BASE_DIR", None)
        env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def run_one(setup: Setup, tool: str, mode: str, repeat: int) -> RunResult:
    """One program's run in a fresh process, watched for RSS; its numbers parsed after."""
    run_dir = setup.work_dir / "runs" / f"{mode}-{repeat}-{tool}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    tag = f"compare-{mode}-{repeat}"
    if tool == "ours":
        command, cwd = our_command(setup, mode, run_dir), REPO_ROOT
    else:
        command, cwd = nanochat_command(setup, mode, tag), setup.nanochat
    log_path = run_dir / "log.txt"
    (run_dir / "command.json").write_text(json.dumps(command))
    load = os.getloadavg()
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=cwd, env=child_env(setup, tool, run_dir),
                                   stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        monitor = RssMonitor(process.pid)
        monitor.start()
        try:
            returncode = process.wait(timeout=setup.timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(process.pid)
            returncode = process.wait()
        finally:
            monitor.stop()
    wall = time.perf_counter() - started
    text = log_path.read_text(errors="replace")
    events = run_dir / "events.jsonl"
    if tool == "ours":
        curve = parse_our_events(events) if events.exists() else Curve()
    else:
        curve = parse_nanochat_log(text)
    return RunResult(tool=tool, mode=mode, repeat=repeat, load_before=load,
                     returncode=returncode, wall_seconds=wall,
                     peak_rss_tree=monitor.peak_tree, peak_rss_main=monitor.peak_main,
                     log_path=str(log_path), curve=curve)  # fmt: skip


def _kill_tree(pid: int) -> None:
    """End the run that went past --timeout and everything it started (by pid, not name)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue


def run_all(setup: Setup, modes: Sequence[str], repeats: int, echo=print) -> list[RunResult]:
    results = []
    for mode in modes:
        for repeat in range(repeats):
            order = TOOLS if repeat % 2 == 0 else TOOLS[::-1]
            for tool in order:
                echo(f"[{mode} {repeat + 1}/{repeats}] {tool}: load {os.getloadavg()[0]:.2f} ...")
                result = run_one(setup, tool, mode, repeat)
                status = "ok" if result.returncode == 0 else f"exit {result.returncode}"
                echo(f"    {status} in {result.wall_seconds:.0f}s, log {result.log_path}")
                results.append(result)
    return results


# ---- the report -----------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else (
        format(value, spec))  # fmt: skip


def compare_pair(a: RunResult, b: RunResult, skip: int, time_points: int) -> dict[str, Any]:
    """Equal steps and equal training time for two runs of one mode and repeat."""
    a_evals, b_evals = dict(a.curve.evals), dict(b.curve.evals)
    steps = sorted(set(a_evals) & set(b_evals))
    a_timed, b_timed = a.curve.timed_evals(skip), b.curve.timed_evals(skip)
    grid = equal_time_grid([t[-1][0] for t in (a_timed, b_timed) if t] if a_timed and b_timed
                           else [], time_points)  # fmt: skip
    a_clock, b_clock = a.curve.clock(skip), b.curve.clock(skip)
    return {
        "equal_steps": [{"step": s, a.tool: a_evals[s], b.tool: b_evals[s]} for s in steps],
        "equal_time": [
            {
                "seconds": t,
                a.tool: interpolate([(x, y) for x, y, _ in a_timed], t),
                b.tool: interpolate([(x, y) for x, y, _ in b_timed], t),
                f"{a.tool}_step": _step_at(a_clock, t),
                f"{b.tool}_step": _step_at(b_clock, t),
            }
            for t in grid
        ],
    }


def _step_at(clock: dict[int, float], seconds: float) -> int:
    """The last step completed by `seconds` of training time."""
    return max((s for s, t in clock.items() if t <= seconds + 1e-9), default=0)


def report(results: list[RunResult], setup: Setup, skip: int, time_points: int) -> tuple[str, dict]:
    """The printed tables and the JSON document of a comparison."""
    lines, doc = [], {"setup": _setup_doc(setup), "runs": [], "pairs": []}
    for result in results:
        doc["runs"].append(result.summary(setup.tokens_per_step, skip))
    header = (f"{'tool':<9} {'load':>5} {'tok/s':>8} {'RSS tree':>9} {'RSS main':>9} "
              f"{'train s':>8} {'steps':>6} {'final bpb':>9} {'min bpb':>8} {'loss':>7}")  # fmt: skip
    keys = sorted({(r.mode, r.repeat) for r in results})
    for mode, repeat in keys:
        pair = [r for r in results if (r.mode, r.repeat) == (mode, repeat)]
        lines += ["", f"== {mode}, repeat {repeat + 1} ==", header]
        for r in pair:
            s = r.summary(setup.tokens_per_step, skip)
            failed = "" if r.returncode == 0 else f"  (exit {r.returncode}: {r.log_path})"
            lines.append(
                f"{r.tool:<9} {s['load_before'][0]:>5.2f} {_fmt(s['tok_per_sec'], ',.0f'):>8} "
                f"{s['peak_rss_tree_mib']:>8.0f}M {s['peak_rss_main_mib']:>8.0f}M "
                f"{s['training_seconds']:>8.1f} {s['steps']:>6} "
                f"{_fmt(s['final_val_bpb'], '.4f'):>9} {_fmt(s['min_val_bpb'], '.4f'):>8} "
                f"{_fmt(s['final_train_loss'], '.4f'):>7}{failed}"
            )
        if len(pair) == 2:
            a, b = pair if pair[0].tool == TOOLS[0] else pair[::-1]
            compared = compare_pair(a, b, skip, time_points)
            doc["pairs"].append({"mode": mode, "repeat": repeat, **compared})
            lines.append(f"val bpb at equal steps:   {'step':>6} {a.tool:>9} {b.tool:>9}")
            for row in compared["equal_steps"]:
                lines.append(f"{'':26}{row['step']:>6} {row[a.tool]:>9.4f} {row[b.tool]:>9.4f}")
            lines.append(
                f"val bpb at equal time:    {'train s':>7} {a.tool:>9} {'(step)':>7} "
                f"{b.tool:>9} {'(step)':>7}"
            )
            for row in compared["equal_time"]:
                lines.append(
                    f"{'':26}{row['seconds']:>7.1f} {_fmt(row[a.tool], '.4f'):>9} "
                    f"({row[a.tool + '_step']:>5}) {_fmt(row[b.tool], '.4f'):>9} "
                    f"({row[b.tool + '_step']:>5})"
                )
    lines += ["", *median_lines(doc["runs"])]
    return "\n".join(lines), doc


def median_lines(runs: list[dict[str, Any]]) -> list[str]:
    """Per mode and tool, the median over repeats of tok/s, peak RSS and final bpb."""
    out = ["== medians over repeats =="]
    for mode in MODES:
        for tool in TOOLS:
            mine = [r for r in runs if r["mode"] == mode and r["tool"] == tool and
                    r["returncode"] == 0]  # fmt: skip
            if not mine:
                continue

            def med(key: str, rows: list[dict[str, Any]] = mine) -> float | None:
                values = [r[key] for r in rows if r[key] is not None]
                return statistics.median(values) if values else None

            out.append(
                f"{mode:<9} {tool:<9} runs {len(mine)}: tok/s {_fmt(med('tok_per_sec'), ',.0f')}, "
                f"RSS tree {_fmt(med('peak_rss_tree_mib'), ',.0f')} MiB, final val bpb "
                f"{_fmt(med('final_val_bpb'), '.4f')}"
            )
    return out


def _setup_doc(setup: Setup) -> dict[str, Any]:
    doc = asdict(setup)
    doc.update({k: str(v) for k, v in doc.items() if isinstance(v, Path)})
    doc["torch_threads"] = setup.threads or os.cpu_count()
    return doc


# ---- command line ---------------------------------------------------------------------------


def parse_hparams(items: Sequence[str]) -> dict[str, float]:
    """`name=value` pairs over EXPLICIT_HPARAMS (only names both programs take)."""
    hparams = dict(EXPLICIT_HPARAMS)
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in EXPLICIT_HPARAMS:
            raise ValueError(
                f"--hparam: expected NAME=VALUE with NAME one of {', '.join(EXPLICIT_HPARAMS)}, "
                f"got {item!r}"
            )
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"--hparam {name}: {raw!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"--hparam {name}: must be a finite number >= 0, got {raw!r}")
        hparams[name] = int(value) if name == "warmup_steps" else value
    return hparams


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.compare_reference",
        description="Our base training and nanochat's, side by side on the same data.",
    )
    parser.add_argument("--nanochat", required=True, help="nanochat source checkout")
    parser.add_argument("--data-dir", default="", help="parquet shards (default <home>/base_data)")
    parser.add_argument("--tokenizer-dir", default="", help="tokenizer (default <home>/tokenizer)")
    parser.add_argument("--work-dir", default="", help="runs and logs (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every run")
    parser.add_argument("--eval-every", type=int, default=50, help="steps between val bpb")
    parser.add_argument("--eval-tokens", type=int, default=65536, help="tokens per evaluation")
    for name, value in SHAPE_DEFAULTS.items():
        kind = str if isinstance(value, str) else int
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    parser.add_argument("--dtype", choices=tuple(NANOCHAT_DTYPES), default="fp32")
    parser.add_argument("--modes", default="defaults,explicit",
                        help="comma-separated: defaults (each its own recipe), explicit, "
                             "preset (ours from --our-config)")  # fmt: skip
    parser.add_argument(
        "--our-config",
        default="demo-cpu",
        help="preset mode: our base_train preset (a name or a YAML path)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool and mode")
    parser.add_argument("--hparam", action="append", default=[], metavar="NAME=VALUE",
                        help="explicit mode: " + ", ".join(EXPLICIT_HPARAMS))  # fmt: skip
    parser.add_argument("--our-compile", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--threads", type=int, default=0, help="OMP threads (0: inherit)")
    parser.add_argument("--clock-skip-steps", type=int, default=10,
                        help="steps left out of the training clock (compile, warm-up)")  # fmt: skip
    parser.add_argument("--time-points", type=int, default=6, help="equal-time rows")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per run")
    parser.add_argument("--json", default="", help="also write the results here")
    return parser


def setup_from_args(args: argparse.Namespace) -> tuple[Setup, list[str]]:
    from engine.paths import data_home

    if args.steps < 1 or args.repeats < 1 or args.eval_every < 1 or args.eval_tokens < 1:
        raise ValueError("--steps, --repeats, --eval-every and --eval-tokens must be >= 1")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"--modes: comma-separated from {', '.join(MODES)}, got {args.modes!r}")
    home = data_home()
    work = Path(args.work_dir).expanduser() if args.work_dir else None
    if work is None:
        import tempfile

        work = Path(tempfile.mkdtemp(prefix="compare-reference-"))
    setup = Setup(
        nanochat=check_nanochat(Path(args.nanochat)),
        work_dir=work.resolve(),
        data_dir=Path(args.data_dir or home / "base_data").expanduser().resolve(),
        tokenizer_dir=Path(args.tokenizer_dir or home / "tokenizer").expanduser().resolve(),
        shape={name: getattr(args, name) for name in SHAPE_DEFAULTS},
        steps=args.steps,
        eval_every=args.eval_every,
        eval_tokens=args.eval_tokens,
        dtype=args.dtype,
        hparams=parse_hparams(args.hparam),
        our_compile=args.our_compile,
        our_config=args.our_config,
        threads=args.threads or None,
        timeout=args.timeout,
        python=sys.executable,
    )
    return setup, modes


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        setup, modes = setup_from_args(args)
        setup.work_dir.mkdir(parents=True, exist_ok=True)
        shared = prepare_shared(setup.work_dir, setup.data_dir, setup.tokenizer_dir)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"work dir {setup.work_dir}; {len(shared['shards'])} shards (val: "
          f"{shared['val_shard']}), vocab {shared['vocab_size']}")  # fmt: skip
    results = run_all(setup, modes, args.repeats)
    text, doc = report(results, setup, args.clock_skip_steps, args.time_points)
    doc["shared"] = shared
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0 if all(r.returncode == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
