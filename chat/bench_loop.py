"""The engine worker's decode loop without the site around it: `python -m chat.bench_loop`.

`chat.bench_chat` measures the whole serving path (websocket, daphne, Redis, engine worker)
against the engine alone. This script splits that gap in two: it drives one `ModelLoop` (the
worker's continuous-batching loop, its decode thread, reply building and chunk reporting) in
this process with nothing but a recorder behind it, and compares it with `engine.bench` on
the same checkpoint. With `--load` a child process keeps that much of one core busy in short
bursts, as the web server, Redis and the browsers do on a machine the engine shares, and both
are measured again under it.

The checkpoint is built and the engine benchmarked in child processes: in this one only the
loop's decode thread may run torch, as in the worker (a second thread that has run torch
ops keeps its own OpenMP team, and the two slow each other down severalfold on 2 cores).
Numbers and their reading are in docs/benchmarks.md ("Chat serving").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEP = 1

# Runs in a child: the same random model and tokenizer as chat.bench_chat.
BUILD = """
import argparse, sys
from pathlib import Path
from chat.bench_chat import build_checkpoint
shape = argparse.Namespace(**{k: int(v) for k, v in (a.split("=") for a in sys.argv[2:])})
_, message, prompt = build_checkpoint(shape, Path(sys.argv[1]))
print(message)
"""

# Runs in a child: a busy loop for `duty` of every 4 ms period.
BURN = """
import sys, time
duty, period = float(sys.argv[1]), 0.004
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < duty * period:
        pass
    time.sleep(period * (1 - duty))
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m chat.bench_loop", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (about)")
    parser.add_argument("--gen", type=int, default=128, help="tokens per reply")
    parser.add_argument("--rows", type=int, default=8, help="replies decoded together")
    parser.add_argument("--repeats", type=int, default=7, help="rounds per figure (median)")
    parser.add_argument("--chunk-interval", type=float, default=0.02, help="seconds")
    parser.add_argument(
        "--load", default="0,0.3",
        help="other load to measure under, in cores of busy-looping (comma-separated)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def child_env(args: argparse.Namespace) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}


def build_checkpoint(args: argparse.Namespace, directory: Path) -> str:
    shape = {"depth": 4, "head_dim": 64, "n_embd": 256, "vocab": 4096, "sequence_len": 256,
             "prompt_len": args.prompt_len}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", BUILD, str(directory), *(f"{k}={v}" for k, v in shape.items())],
        capture_output=True, text=True, check=True, env=child_env(args), cwd=REPO,
    )  # fmt: skip
    return done.stdout.strip().splitlines()[-1]


def engine_alone(args: argparse.Namespace, directory: Path) -> dict[int, float]:
    """engine.bench's decode tok/s for 1 row and for --rows rows, in a child process."""
    done = subprocess.run(
        [sys.executable, "-m", "engine.bench", "--checkpoint", str(directory),
         "--threads", str(args.threads), "--prompt-len", str(args.prompt_len),
         "--gen", str(args.gen), "--samples", str(args.rows), "--temperature", "0.8",
         "--top-k", "50", "--repeats", str(args.repeats), "--json"],
        capture_output=True, text=True, check=True, env=child_env(args), cwd=REPO,
    )  # fmt: skip
    result = json.loads(done.stdout)
    return {1: result["decode_tok_per_s"], args.rows: result["decode_samples_tok_per_s"]}


@contextlib.contextmanager
def background_load(cores: float):
    if cores <= 0:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", BURN, str(cores)])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


class Recorder:
    """The loop's owner: keeps the finals, wakes the round when the last reply ends."""

    def __init__(self) -> None:
        self.finals: list = []
        self.expected = 0
        self.all_done = asyncio.Event()

    def expect(self, count: int) -> None:
        self.finals, self.expected = [], count
        self.all_done.clear()

    def emit(self, gen, message) -> None:
        pass

    def finished(self, gen, final) -> None:
        self.finals.append(final)
        if len(self.finals) == self.expected:
            self.all_done.set()

    def loop_idle(self, loop) -> None:
        pass

    def loop_failed(self, loop) -> None:
        raise SystemExit(f"cannot load the checkpoint {loop.key.path}")


async def loop_rounds(args, directory: Path, message: str, counts: list[int]) -> dict:
    import torch

    from chat.decode_loop import Generation, ModelKey, ModelLoop
    from chat.protocol import GenerationRequest

    recorder = Recorder()
    loop = ModelLoop(ModelKey(str(directory), STEP), recorder, device=torch.device("cpu"),
                     max_rows=args.rows, chunk_interval=args.chunk_interval)  # fmt: skip
    loop.start()
    while not loop.ready:
        await asyncio.sleep(0.01)
    messages = [{"role": "user", "content": message}]
    rounds: dict[int, list[tuple[float, float, float]]] = {n: [] for n in counts}
    for _ in range(args.repeats):
        for n in counts:
            recorder.expect(n)
            start = time.perf_counter()
            for seed in range(n):
                request = GenerationRequest(str(directory), STEP, messages, 0.8, 50, args.gen, seed)
                loop.submit(Generation(request, "bench"))
            await recorder.all_done.wait()
            wall = time.perf_counter() - start
            finals = recorder.finals
            rounds[n].append((
                sum(f.completion_tokens for f in finals) / wall,
                statistics.mean(f.tokens_per_second for f in finals),
                statistics.mean(f.time_to_first_token for f in finals),
            ))  # fmt: skip
    loop.close()
    result = {}
    for n, values in rounds.items():
        tok_per_s, decode, ttft = sorted(values)[len(values) // 2]
        result[n] = {"tok_per_s": tok_per_s, "decode": decode, "ttft": ttft}
    return result


def run(args: argparse.Namespace) -> dict:
    loads = [float(x) for x in args.load.split(",")]
    if args.rows < 1 or args.repeats < 1 or args.gen < 1 or any(x < 0 or x > 1 for x in loads):
        raise ValueError("--rows, --repeats, --gen must be positive and --load within 0..1")
    home = Path(tempfile.mkdtemp(prefix="nanochat-bench-loop-"))
    try:
        directory = home / "ckpt"
        message = build_checkpoint(args, directory)
        counts = sorted({1, args.rows})
        results = []
        for cores in loads:
            with background_load(cores):
                alone = engine_alone(args, directory)
                loop = asyncio.run(loop_rounds(args, directory, message, counts))
            results.append({"load": cores, "engine_tok_per_s": alone, "loop": loop})
        return {"threads": args.threads, "gen": args.gen, "repeats": args.repeats,
                "chunk_interval": args.chunk_interval, "results": results}  # fmt: skip
    finally:
        shutil.rmtree(home, ignore_errors=True)


def format_report(result: dict) -> str:
    lines = [
        f"{result['threads']} torch threads, {result['gen']} tokens per reply, chunk interval "
        f"{result['chunk_interval']} s, median of {result['repeats']} rounds",
        "",
        f"{'load':>5} {'rows':>5} {'engine alone':>13} {'decode loop':>12} {'ratio':>6} "
        f"{'decode/reply':>13} {'ttft':>8}",
    ]
    for entry in result["results"]:
        for rows, loop in entry["loop"].items():
            alone = entry["engine_tok_per_s"][rows]
            lines.append(
                f"{entry['load']:5.2f} {rows:5d} {alone:13.1f} {loop['tok_per_s']:12.1f} "
                f"{loop['tok_per_s'] / alone:5.2f}x {loop['decode']:13.1f} "
                f"{loop['ttft'] * 1000:5.1f} ms"
            )
    lines += [
        "",
        "load: cores kept busy by another process. engine alone: engine.bench decode tok/s.",
        "decode loop: tokens over the wall time from the submits to the last final (prefill",
        "included). decode/reply: a reply's first-to-last-token tok/s. ttft: mean, from submit.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "nanochat_site.settings")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except ValueError as error:
        parser.error(str(error))
    print(json.dumps(result) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
