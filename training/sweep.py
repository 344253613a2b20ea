"""A few base-training settings side by side on this machine: val bpb at equal steps and time.

    python -m training.sweep --config demo-cpu \\
        --variant nanochat= \\
        --variant old="--no-lr-batch-scaling --warmup-steps 0 --warmdown-ratio 0.4" \\
        --variant lr2x="--matrix-lr 0.04 --embedding-lr 0.6 --unembedding-lr 0.016" \\
        --repeats 2 --work-dir /tmp/sweep --json /tmp/sweep.json

Each variant is the preset plus its own flags (any `training.base_train` flag); each runs in a
fresh process, in turn (the order rotates every repeat, so a drift in machine load does not
always favour one), on the same data and tokenizer (`--data-dir`, `--tokenizer-dir`, default
<NANOCHAT_HOME>/base_data and /tokenizer). For every run it reports the load average before it,
tok/s (median over timed steps), peak RSS, the final and minimum val bpb, and val bpb at
common training times up to the shortest run's end (each run's curve against its own training
clock, as `training.compare_reference` does), so a setting that makes steps slower is judged on
what it reaches in the same time, not in the same steps. It is how the presets' numbers in
docs/benchmarks.md are chosen: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training import base_train
from training.compare_reference import (
    REPO_ROOT,
    Curve,
    RssMonitor,
    _fmt,
    _kill_tree,
    equal_time_grid,
    interpolate,
    parse_our_events,
)

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
MAX_VARIANTS = 32


def parse_variants(items: Sequence[str]) -> dict[str, list[str]]:
    """NAME=FLAGS pairs: a safe name (it becomes a directory) and base_train flags."""
    variants: dict[str, list[str]] = {}
    for item in items:
        name, sep, flags = item.partition("=")
        if not sep or not _NAME.match(name):
            raise ValueError(
                f"--variant: expected NAME=FLAGS with NAME of lowercase letters, digits, - and _ "
                f"(at most 40), got {item!r}"
            )
        if name in variants:
            raise ValueError(f"--variant: {name!r} given twice")
        args = shlex.split(flags)
        if any(a in ("--config", "--run-dir", "--data-dir", "--tokenizer-dir") for a in args):
            raise ValueError(f"--variant {name}: the sweep sets --config and the paths itself")
        variants[name] = args
    if not variants or len(variants) > MAX_VARIANTS:
        raise ValueError(f"give 1 to {MAX_VARIANTS} --variant, got {len(variants)}")
    return variants


def variant_config(name: str, preset: str, args: list[str]) -> dict[str, Any]:
    """The config a variant runs with, checked by base_train's own parser before anything runs
    (so a typo fails the sweep at once; argparse has printed which flag)."""
    try:
        return base_train.FLAGS.parse(["--config", preset, *args])
    except SystemExit:
        raise ValueError(f"--variant {name}: base_train refuses {shlex.join(args)!r}") from None


def run_variant(
    name: str,
    args: list[str],
    *,
    preset: str,
    repeat: int,
    work_dir: Path,
    data_dir: Path,
    tokenizer_dir: Path,
    timeout: float,
) -> dict[str, Any]:
    run_dir = work_dir / "runs" / f"{name}-{repeat}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    command = [
        sys.executable, "-m", "training.base_train", "--config", preset, *args,
        "--data-dir", str(data_dir), "--tokenizer-dir", str(tokenizer_dir),
        "--checkpoint-dir", str(run_dir / "checkpoints"), "--run-dir", str(run_dir),
        "--sample-every", "-1",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", NANOCHAT_HOME=str(run_dir / "home"))
    load = os.getloadavg()
    started = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)  # fmt: skip
        monitor = RssMonitor(process.pid)
        monitor.start()
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(process.pid)
            code = process.wait()
        finally:
            monitor.stop()
    events = run_dir / "events.jsonl"
    curve = parse_our_events(events) if events.exists() else Curve()
    return {
        "variant": name,
        "args": args,
        "repeat": repeat,
        "returncode": code,
        "load_before": list(load),
        "wall_seconds": time.perf_counter() - started,
        "peak_rss_mib": monitor.peak_tree / 2**20,
        "curve": curve,
        "log": str(run_dir / "log.txt"),
    }


def summarize(runs: list[dict[str, Any]], tokens_per_step: dict[str, int], skip: int,
              time_points: int) -> tuple[str, list[dict[str, Any]]]:  # fmt: skip
    """The printed table and one JSON row per run (curves as eval lists)."""
    timed = {id(r): r["curve"].timed_evals(skip) for r in runs}
    grid = equal_time_grid([t[-1][0] for t in timed.values() if t], time_points)
    lines = [
        f"{'variant':<16} {'rep':>3} {'load':>5} {'tok/s':>8} {'RSS':>7} {'steps':>6} "
        f"{'final':>7} {'min':>7}  " + " ".join(f"{t:>6.0f}s" for t in grid)
    ]
    rows = []
    for r in runs:
        curve: Curve = r["curve"]
        evals = curve.evals
        points = [(x, y) for x, y, _ in timed[id(r)]]
        at = [interpolate(points, t) for t in grid]
        row = {k: v for k, v in r.items() if k != "curve"}
        row.update(
            steps=max(curve.step_seconds, default=0),
            tok_per_sec=curve.tok_per_sec(
                curve.tokens_per_step or tokens_per_step[r["variant"]], skip
            ),
            evals=evals,
            final_val_bpb=evals[-1][1] if evals else None,
            min_val_bpb=min((b for _, b in evals), default=None),
            equal_time=[{"seconds": t, "val_bpb": v} for t, v in zip(grid, at, strict=True)],
        )
        rows.append(row)
        failed = "" if r["returncode"] == 0 else f"  (exit {r['returncode']}: {r['log']})"
        lines.append(
            f"{r['variant']:<16} {r['repeat'] + 1:>3} {r['load_before'][0]:>5.2f} "
            f"{_fmt(row['tok_per_sec'], ',.0f'):>8} {r['peak_rss_mib']:>6.0f}M {row['steps']:>6} "
            f"{_fmt(row['final_val_bpb'], '.4f'):>7} {_fmt(row['min_val_bpb'], '.4f'):>7}  "
            + " ".join(f"{_fmt(v, '.4f'):>7}" for v in at)
            + failed
        )
    lines += ["", "medians over repeats (final val bpb, tok/s):"]
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name and r["final_val_bpb"] is not None]
        if mine:
            bpb = statistics.median(r["final_val_bpb"] for r in mine)
            rates = [r["tok_per_sec"] for r in mine if r["tok_per_sec"]]
            rate = statistics.median(rates) if rates else None
            lines.append(f"  {name:<16} {bpb:.4f}  {_fmt(rate, ',.0f')}")
    return "\n".join(lines), rows


def main(argv: Sequence[str] | None = None) -> int:
    from engine.paths import data_home

    parser = argparse.ArgumentParser(prog="python -m training.sweep", description=__doc__.split(
        "\n")[0])  # fmt: skip
    parser.add_argument(
        "--config", default="demo-cpu", help="base_train preset every run starts from"
    )
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--tokenizer-dir", default="")
    parser.add_argument("--work-dir", default="")
    parser.add_argument("--clock-skip-steps", type=int, default=10)
    parser.add_argument("--time-points", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per run")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    try:
        variants = parse_variants(args.variant)
        configs = {name: variant_config(name, args.config, flags)
                   for name, flags in variants.items()}  # fmt: skip
        if args.repeats < 1:
            raise ValueError("--repeats must be >= 1")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    home = data_home()
    work = Path(args.work_dir or f"/tmp/sweep-{os.getpid()}").expanduser().resolve()
    data_dir = Path(args.data_dir or home / "base_data").expanduser().resolve()
    tokenizer_dir = Path(args.tokenizer_dir or home / "tokenizer").expanduser().resolve()
    runs = []
    names = list(variants)
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            print(f"[{repeat + 1}/{args.repeats}] {name}: load {os.getloadavg()[0]:.2f} ...")
            run = run_variant(name, variants[name], preset=args.config, repeat=repeat,
                              work_dir=work, data_dir=data_dir, tokenizer_dir=tokenizer_dir,
                              timeout=args.timeout)  # fmt: skip
            print(f"    exit {run['returncode']} in {run['wall_seconds']:.0f}s")
            runs.append(run)
    tokens = {name: config["total_batch_size"] for name, config in configs.items()}
    text, rows = summarize(runs, tokens, args.clock_skip_steps, args.time_points)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "runs": rows}, indent=2))
    return 0 if all(r["returncode"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
