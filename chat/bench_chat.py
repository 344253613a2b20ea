"""Chat serving throughput through the real stack: `python -m chat.bench_chat`.

What a user of /ws/chat/ gets, compared with what the engine can do on its own. The script
builds a random model of the engine benchmark's shape (depth 4, head_dim 64, n_embd 256,
vocab 4096, context 256; see engine/bench.py) with a tokenizer, saves it as a checkpoint,
starts a real Redis (embedded, or REDIS_URL), a real `manage.py engine_worker` and a real
daphne on a throw-away SQLite database, and then takes turns between:

1. the engine alone, in this process: the same prompt decoded exactly as engine.bench does
   (one prefill, then decode only) with 1 row and with the largest chat count of rows;
2. N websocket chats of a signed-in user, each sending the same message at the same moment.
   Aggregate tok/s is every reply's tokens over the wall time from the sends to the last
   `done` frame.

Taking turns lets both see the same moments of a shared machine. It also records how many
cores each process (and the worker's event-loop thread) kept busy during the chat rounds,
which is where the serving path's cost shows.

Targets: 8 chats >= 4x the aggregate tok/s of one chat (continuous batching works end to
end), and one chat >= 0.9x the engine's single-stream decode (the serving path costs little).
The model never picks its end token (its special tokens' output rows are zero while the
others' logits are spread wide), so every reply is exactly --gen tokens long. Measured
numbers, with the command, are in docs/benchmarks.md ("Chat serving").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from nanochat_site.proctree import GaveUpWaiting, LoggedProcess

REPO = Path(__file__).resolve().parents[1]
LISTENING = re.compile(rb"Listening on TCP address 127\.0\.0\.1:(\d+)")
STEP = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m chat.bench_chat", description=__doc__.split("\n")[0]
    )
    model = parser.add_argument_group("model (random weights of this shape)")
    model.add_argument("--depth", type=int, default=4)
    model.add_argument("--head-dim", type=int, default=64)
    model.add_argument("--n-embd", type=int, default=256)
    model.add_argument("--vocab", type=int, default=4096)
    model.add_argument("--sequence-len", type=int, default=256)
    run = parser.add_argument_group("measurement")
    run.add_argument("--threads", type=int, default=2, help="torch threads of the engine")
    run.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (approximately)")
    run.add_argument("--gen", type=int, default=128, help="tokens per reply (max_tokens)")
    run.add_argument("--chats", default="1,8", help="concurrent chats to measure, e.g. 1,4,8")
    run.add_argument("--repeats", type=int, default=5, help="rounds per chat count (median)")
    run.add_argument("--max-rows", type=int, default=8, help="engine worker --max-rows")
    run.add_argument(
        "--chunk-interval", type=float, default=None,
        help="seconds between a reply's text chunks (CHAT_CHUNK_INTERVAL; default: settings)",
    )  # fmt: skip
    run.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


# ---- the model and the database -----------------------------------------------------------


def setup_django(home: Path) -> None:
    """The real settings on a throw-away data home: SQLite file, embedded Redis socket there.

    The subprocesses inherit this environment, so they find the same database and Redis.
    """
    os.environ["NANOCHAT_HOME"] = str(home)
    os.environ["DJANGO_SETTINGS_MODULE"] = "nanochat_site.settings"
    os.environ.pop("DATABASE_URL", None)  # never the real database
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


def synthetic_text(rng: random.Random) -> tuple[list[str], list[str]]:
    """Documents of random letter-words (enough distinct pairs for a 4096-token BPE)."""
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    weights = [12, 9, 8, 7, 7, 6, 6, 6, 5, 4, 4, 3, 3, *[2] * 5, *[1] * 8]
    words = ["".join(rng.choices(letters, weights, k=rng.randint(2, 9))) for _ in range(20000)]
    documents = [" ".join(rng.choices(words, k=300)) + "." for _ in range(1000)]
    return words, documents


def build_checkpoint(args: argparse.Namespace, directory: Path):
    """Save a random model and its tokenizer; return the model, and a user message of about
    --prompt-len tokens once rendered for completion with those tokens."""
    import torch

    from engine.bench import build_model
    from engine.checkpoint import save_checkpoint, tokenizer_dir
    from engine.tokenizer import Tokenizer

    logging.getLogger("rustbpe").setLevel(logging.WARNING)  # no per-merge progress lines
    rng = random.Random(0)
    words, documents = synthetic_text(rng)
    tokenizer = Tokenizer.train(documents, vocab_size=args.vocab)
    shape = argparse.Namespace(
        checkpoint=None, depth=args.depth, head_dim=args.head_dim, n_embd=args.n_embd,
        n_kv_head=None, vocab=args.vocab, sequence_len=args.sequence_len,
        window_pattern="SSSL", seed=0,
    )  # fmt: skip
    model = build_model(shape, torch.device("cpu"))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 2.0)
        for name in tokenizer.special_tokens:
            model.lm_head.weight[tokenizer.encode_special(name)] = 0
    save_checkpoint(directory, STEP, model_state=model.state_dict(), model_config=model.config)
    tokenizer.save(tokenizer_dir(directory))

    message = []
    while True:
        message.append(rng.choice(words))
        conversation = {"messages": [{"role": "user", "content": " ".join(message)}]}
        prompt = tokenizer.render_for_completion(conversation)
        if len(prompt) >= args.prompt_len:
            return model, " ".join(message), prompt


def signed_in_user() -> str:
    """A Cookie header of a signed-in user's session."""
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.test import Client

    user = get_user_model().objects.create_user("bench", password="bench-password")
    browser = Client()
    browser.force_login(user)
    return f"{settings.SESSION_COOKIE_NAME}={browser.cookies[settings.SESSION_COOKIE_NAME].value}"


# ---- the processes ----------------------------------------------------------------------------


class Service(LoggedProcess):
    """A server process of the site, in a process group of its own, logging to a file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, **env: str) -> None:
        self.name = name
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        super().__init__(argv, log_dir / f"{name}.log", env=env, cwd=REPO)

    def wait_for(self, predicate, what: str, timeout: float = 120):
        try:
            return super().wait_for(predicate, what, timeout)
        except GaveUpWaiting as exc:
            raise SystemExit(f"{self.name}: {exc}") from None

    def stop(self) -> None:
        super().stop(grace=20)


@contextlib.contextmanager
def site(args: argparse.Namespace, home: Path):
    """Redis (embedded unless REDIS_URL is set), an engine worker and daphne; yields the
    server's address and the processes by name."""
    from django.conf import settings

    from chat.stats import read_stats
    from nanochat_site import embedded_redis

    services: list[Service] = []
    try:
        if settings.REDIS_EMBEDDED:
            socket = settings.EMBEDDED_REDIS_SOCKET
            embedded_redis.prepare(socket)
            redis = Service("redis", embedded_redis.server_argv(socket), home)
            services.append(redis)
            redis.wait_for(lambda: embedded_redis.answers(socket), "Redis")
        channel = f"engine-bench-{uuid.uuid4().hex[:8]}"
        worker = Service(
            "engine_worker",
            [sys.executable, "manage.py", "engine_worker", "--channel", channel,
             "--device", "cpu", "--max-rows", str(args.max_rows), "--max-models", "1"],
            home, OMP_NUM_THREADS=str(args.threads), **chunk_interval(args),
        )  # fmt: skip
        services.append(worker)
        worker.wait_for(lambda: read_stats(channel), "the engine worker's first stats")
        server = Service(
            "daphne",
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", "0",
             "nanochat_site.asgi:application"],
            home, CHAT_ENGINE_CHANNEL=channel,
        )  # fmt: skip
        services.append(server)
        match = server.wait_for(lambda: LISTENING.search(server.log_path.read_bytes()), "daphne")
        yield f"127.0.0.1:{int(match[1])}", {service.name: service.proc.pid for service in services}
    finally:
        for service in reversed(services):
            service.stop()


def chunk_interval(args: argparse.Namespace) -> dict[str, str]:
    if args.chunk_interval is None:
        return {}
    return {"CHAT_CHUNK_INTERVAL": str(args.chunk_interval)}


# ---- the measurements -------------------------------------------------------------------------


class EngineAlone:
    """The engine with nothing around it, timed exactly as engine.bench times decoding, in
    this process and between the chat rounds, so both see the same moments of the machine."""

    def __init__(self, model, prompt: list[int], gen: int, threads: int) -> None:
        import torch

        from engine.engine import SamplingParams

        torch.set_num_threads(threads)
        self.model, self.prompt, self.gen = model.eval(), prompt, gen
        # The chat's defaults (temperature 0.8, top-k 50), as the chat rounds use them.
        self.params = SamplingParams(temperature=0.8, top_k=50, seed=0)
        self.tok_per_s(1)  # warm-up: the allocator and the kernels' first run

    def tok_per_s(self, rows: int) -> float:
        from engine.bench import measure_decode

        seconds = measure_decode(self.model, self.prompt, self.gen, rows, self.params)
        return rows * self.gen / seconds


@dataclass
class Round:
    chats: int
    tokens: int
    wall: float
    ttft: float  # mean, seen by the client: send to first token frame
    decode: float  # mean decode tok/s of a reply, as the worker measured it
    batch_rows: int  # the most rows a reply shared a decode step with

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.wall


async def chat_round(address: str, cookie: str, frame: dict, chats: int) -> Round:
    """`chats` sockets send `frame` at the same moment; timed until the last reply is done."""
    from websockets.asyncio.client import connect

    headers = {"Cookie": cookie}
    sockets = [
        await connect(f"ws://{address}/ws/chat/", additional_headers=headers,
                      origin=f"http://{address}", compression=None)
        for _ in range(chats)
    ]  # fmt: skip
    try:
        start = time.perf_counter()
        replies = await asyncio.gather(*(one_chat(ws, frame, start) for ws in sockets))
        wall = max(done_at for _, _, done_at in replies) - start
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets))
    dones = [done for done, _, _ in replies]
    return Round(
        chats=chats,
        tokens=sum(done["completion_tokens"] for done in dones),
        wall=wall,
        ttft=statistics.mean(first for _, first, _ in replies),
        decode=statistics.mean(done["tokens_per_second"] for done in dones),
        batch_rows=max(done["batch_rows"] for done in dones),
    )


async def one_chat(ws, frame: dict, start: float) -> tuple[dict, float, float]:
    await ws.send(json.dumps(frame))
    first = None
    while True:
        message = json.loads(await ws.recv())
        now = time.perf_counter()
        if message["type"] == "token" and first is None:
            first = now - start
        elif message["type"] == "error":
            raise SystemExit(f"the chat failed: {message}")
        elif message["type"] == "done":
            return message, now - start if first is None else first, now


def summary(rounds: list[Round], cpu: dict[str, float]) -> dict:
    """The median round (by tok/s), and the cores each process kept busy over all rounds."""
    median = sorted(rounds, key=lambda r: r.tok_per_s)[len(rounds) // 2]
    wall = sum(r.wall for r in rounds)
    return vars(median) | {
        "tok_per_s": median.tok_per_s,
        "cores_busy": {name: seconds / wall for name, seconds in cpu.items()},
    }


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds so far of each process (all its threads), and of the engine
    worker's main thread alone: its event loop, which relays every message."""
    import psutil

    seconds = {}
    for name, pid in pids.items():
        process = psutil.Process(pid)
        times = process.cpu_times()
        seconds[name] = times.user + times.system
        if name == "engine_worker":
            main = next(t for t in process.threads() if t.id == pid)
            seconds["worker event loop"] = main.user_time + main.system_time
    return seconds


def run(args: argparse.Namespace) -> dict:
    counts = sorted({int(c) for c in args.chats.split(",")})
    if counts[0] < 1 or args.repeats < 1 or args.gen < 1:
        raise ValueError("--chats, --repeats and --gen must be positive")
    if counts[-1] > args.max_rows:
        raise ValueError(f"--chats up to {counts[-1]} need --max-rows {counts[-1]} or more")
    home = Path(tempfile.mkdtemp(prefix="nanochat-bench-chat-"))
    try:
        setup_django(home)
        from runs.models import Checkpoint

        directory = home / "sft_checkpoints" / "bench"
        model, message, prompt = build_checkpoint(args, directory)
        if len(prompt) - 1 + args.gen > args.sequence_len:
            raise ValueError(f"{len(prompt)} prompt + {args.gen} tokens exceed --sequence-len")
        engine = EngineAlone(model, prompt, args.gen, args.threads)
        checkpoint = Checkpoint.objects.create(stage="sft", step=STEP, path=str(directory))
        cookie = signed_in_user()
        frame = {"type": "send", "conversation": None, "checkpoint": checkpoint.pk,
                 "content": message, "max_tokens": args.gen}  # fmt: skip
        load_before = os.getloadavg()
        with site(args, home) as (address, pids):
            asyncio.run(chat_round(address, cookie, {**frame, "max_tokens": 4}, 1))  # loads
            pids["bench clients"] = os.getpid()
            alone = {1: [], counts[-1]: []}
            rounds: dict[int, list[Round]] = {n: [] for n in counts}
            cpu = {n: dict.fromkeys(cpu_seconds(pids), 0.0) for n in counts}
            # Everything takes turns, so a slow moment of a shared machine hits all alike.
            for _ in range(args.repeats):
                for rows in alone:
                    alone[rows].append(engine.tok_per_s(rows))
                for n in counts:
                    before = cpu_seconds(pids)
                    rounds[n].append(asyncio.run(chat_round(address, cookie, frame, n)))
                    for name, seconds in cpu_seconds(pids).items():
                        cpu[n][name] += seconds - before[name]
        return {
            "config": model.config.to_dict(),
            "threads": args.threads,
            "prompt_tokens": len(prompt),
            "gen": args.gen,
            "repeats": args.repeats,
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "engine_tok_per_s": {rows: statistics.median(v) for rows, v in alone.items()},
            "chats": {n: summary(rounds[n], cpu[n]) for n in counts},
        }
    finally:
        shutil.rmtree(home, ignore_errors=True)


def format_report(result: dict) -> str:
    config, engine, chats = result["config"], result["engine_tok_per_s"], result["chats"]
    single, one = engine[1], chats[min(chats)]
    load = " / ".join(
        " ".join(f"{x:.2f}" for x in result[k]) for k in ("load_before", "load_after")
    )
    lines = [
        f"model: {config['n_layer']} layers, n_embd {config['n_embd']}, {config['n_head']} "
        f"heads, vocab {config['vocab_size']}, context {config['sequence_len']}; cpu, "
        f"{result['threads']} threads; prompt {result['prompt_tokens']} tokens, "
        f"{result['gen']} tokens per reply; median of {result['repeats']} rounds",
        f"load average before / after: {load}",
        "",
        f"{'':22} {'tok/s':>8}  {'ratio':34} {'ttft':>7} {'decode/reply':>13} {'rows':>5}",
    ]
    for rows, tok_per_s in engine.items():
        ratio = "" if rows == 1 else f"{tok_per_s / single:5.2f}x engine 1 row"
        lines.append(
            f"{f'engine alone, {rows} row' + 's' * (rows > 1):22} {tok_per_s:8.1f}  {ratio}"
        )
    for n, r in chats.items():
        if n == 1:
            ratio = f"{r['tok_per_s'] / single:5.2f}x engine 1 row (target >= 0.9)"
        else:
            target = " (target >= 4)" if n == 8 else ""
            ratio = f"{r['tok_per_s'] / one['tok_per_s']:5.2f}x 1 chat{target}"
        lines.append(
            f"{f'websocket, {n} chat' + 's' * (n > 1):22} {r['tok_per_s']:8.1f}  {ratio:34} "
            f"{r['ttft'] * 1000:4.0f} ms {r['decode']:13.1f} {r['batch_rows']:5d}"
        )
    lines += ["", "cores kept busy during the chat rounds:"]
    for n, r in chats.items():
        busy = ", ".join(f"{name} {cores:.2f}" for name, cores in r["cores_busy"].items())
        lines.append(f"  {n} chat{'s' * (n > 1)}: {busy}")
    lines += [
        "",
        "tok/s: all replies' tokens over the wall time from the sends to the last done frame",
        "(engine alone: decode only, as engine.bench). ttft: send to first token frame, mean.",
        "decode/reply: tok/s from a reply's first to last token as the worker measured it, mean.",
        "rows: the most replies that shared one decode step.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
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
