"""Inference speed: prefill tokens/s, single-stream decode tokens/s and N-sample decode tokens/s.

    python -m engine.bench --depth 4 --head-dim 64 --n-embd 256 --vocab 4096 --sequence-len 256 \
        --threads 2 --device cpu
    python -m engine.bench --checkpoint ~/.cache/nanochat/sft_checkpoints/d20 --json
    python -m engine.bench --depth 20 --device cuda:0 --samples 8 --cuda-graphs   # eager vs graphs
    python -m engine.bench --model hybrid --depth 4 --vocab 4096 --device cpu   # another family

Without a checkpoint the model has random weights: speed depends on shapes, not values. Rows run
through `engine.engine.Batch` without a tokenizer, so they never stop early and every run
decodes exactly --gen tokens per row. Each measurement is warmed up once, then repeated and the
median reported, because the first forward pays for allocator and kernel start-up.

At this size a decode step is dominated by per-op dispatch, not matmuls, which is why decoding
goes through the lean `engine.models.gpt_inference` forward (~200 ops per step instead of ~360). On a GPU
the same holds for kernel launches, which `--cuda-graphs` removes: it measures decoding again
with each step replayed from a captured CUDA graph and reports both (`graphs_*` keys in
--json). `--static-decode` measures that graph's bucketed fixed-shape step run eagerly, on any
device. Measured numbers, with the command, are kept in the README rather than here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from engine.common import autocast
from engine.engine import Batch, SamplingParams, resolve_device
from engine.models import registry
from engine.models.base import LanguageModel


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.bench", description=__doc__.split("\n")[0]
    )
    source = parser.add_argument_group("model (a checkpoint, or a random one of this shape)")
    source.add_argument("--checkpoint", help="checkpoint directory (model_*.pt + meta_*.json)")
    source.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    source.add_argument(
        "--model",
        choices=registry.NAMES,
        default=registry.DEFAULT,
        help="family of the random model (a checkpoint names its own)",
    )
    source.add_argument("--depth", type=int, default=4)
    source.add_argument("--head-dim", type=int, default=64)
    source.add_argument(
        "--n-embd", type=int, default=None, help="model width (default depth * 64, whole heads)"
    )
    source.add_argument(
        "--n-kv-head", type=int, default=None, help="default: n_head (no GQA; hybrid: its own)"
    )
    source.add_argument("--vocab", type=int, default=4096)
    source.add_argument("--sequence-len", type=int, default=256)
    source.add_argument("--window-pattern", default="SSSL", help="GPT only")
    run = parser.add_argument_group("measurement")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    run.add_argument("--prompt-len", type=int, default=64)
    run.add_argument("--gen", type=int, default=128, help="tokens decoded per row")
    run.add_argument("--samples", type=int, default=8, help="rows sharing one prefill")
    run.add_argument("--temperature", type=float, default=1.0)
    run.add_argument("--top-k", type=int, default=50, help="0 = off")
    run.add_argument("--repeats", type=int, default=5)
    run.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, mps, cuda or cuda:N (N counts within CUDA_VISIBLE_DEVICES)",
    )
    run.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="also decode with CUDA graphs (needs a CUDA --device) and report eager and graphs",
    )
    run.add_argument(
        "--static-decode",
        action="store_true",
        help="also decode through the bucketed static-shape step --cuda-graphs captures, eagerly",
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def build_model(args: argparse.Namespace, device: torch.device) -> LanguageModel:
    """The checkpoint's model, or a random one of the family --model configured as base_train
    configures it from the same flags: width depth x 64 unless --n-embd, whole heads of
    --head-dim (--window-pattern and --n-kv-head where the family has them)."""
    if args.checkpoint:
        from engine.checkpoint import load_model

        model, _ = load_model(args.checkpoint, args.step, device=device)
        return model
    if args.n_embd is not None:
        if args.n_embd % args.head_dim != 0:
            raise ValueError(
                f"--n-embd {args.n_embd} must be a multiple of --head-dim {args.head_dim}"
            )
        if args.n_embd % args.depth != 0:
            raise ValueError(
                f"--n-embd {args.n_embd} must be a multiple of --depth {args.depth} (the width "
                f"is depth x aspect ratio)"
            )
    flags = {
        "depth": args.depth,
        "aspect_ratio": 64 if args.n_embd is None else args.n_embd // args.depth,
        "head_dim": args.head_dim,
        "max_seq_len": args.sequence_len,
        "window_pattern": args.window_pattern,
        "n_kv_head": -1 if args.n_kv_head is None else args.n_kv_head,
    }
    family = registry.family(getattr(args, "model", registry.DEFAULT))
    config = family.config_from_flags(flags, args.vocab)
    torch.manual_seed(args.seed)
    return registry.build_model(config, device).eval()


def measure_prefill(model: LanguageModel, prompt: list[int]) -> float:
    """Seconds for one forward of the whole prompt into an empty single-row cache."""
    device = model.get_device()
    cache = model.new_cache(1, len(prompt))
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    with torch.inference_mode(), autocast(device):
        _synchronize(device)
        start = time.perf_counter()
        model(ids, kv_cache=cache.rows(0, 1))
        _synchronize(device)
    return time.perf_counter() - start


def measure_decode(
    model: LanguageModel,
    prompt: list[int],
    gen: int,
    samples: int,
    params: SamplingParams,
    batch: Batch | None = None,
) -> float:
    """Seconds to decode `gen` tokens in each of `samples` rows after one shared prefill.

    A new batch per call unless one is given: a graph-decoding batch is kept across calls so
    that its graphs are captured in the warm-up, not timed."""
    device = model.get_device()
    if batch is None:
        batch = Batch(model, None, max_rows=samples, max_len=len(prompt) - 1 + gen)
    batch.add_samples(prompt, params, samples)
    _synchronize(device)
    start = time.perf_counter()
    while batch.rows:
        batch.step()
    _synchronize(device)
    return time.perf_counter() - start


def median_seconds(measure: Callable[[], float], repeats: int) -> float:
    measure()  # warm-up
    return statistics.median(measure() for _ in range(repeats))


def run(args: argparse.Namespace) -> dict:
    for name in ("prompt_len", "gen", "samples", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, "--device")
    if args.cuda_graphs and device.type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA --device, not {device}")
    model = build_model(args, device)
    config = model.config
    if args.prompt_len - 1 + args.gen > config.sequence_len:
        raise ValueError(
            f"--prompt-len {args.prompt_len} + --gen {args.gen} exceed the model's context "
            f"of {config.sequence_len} tokens"
        )
    rng = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, config.vocab_size, (args.prompt_len,), generator=rng).tolist()
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k or None, seed=args.seed)
    prefill_s = median_seconds(lambda: measure_prefill(model, prompt), args.repeats)
    single_s = median_seconds(
        lambda: measure_decode(model, prompt, args.gen, 1, params), args.repeats
    )
    multi_s = median_seconds(
        lambda: measure_decode(model, prompt, args.gen, args.samples, params), args.repeats
    )
    modes = {}
    for mode, wanted in (("static", args.static_decode), ("graphs", args.cuda_graphs)):
        if not wanted:
            continue
        options = {"cuda_graphs": True} if mode == "graphs" else {"static_shapes": True}
        speeds = {}
        for key, rows in (("decode_tok_per_s", 1), ("decode_samples_tok_per_s", args.samples)):
            batch = Batch(model, None, max_rows=rows, max_len=len(prompt) - 1 + args.gen, **options)
            seconds = median_seconds(
                lambda b=batch, r=rows: measure_decode(model, prompt, args.gen, r, params, b),
                args.repeats,
            )
            speeds[f"{mode}_{key}"] = rows * args.gen / seconds
        modes.update(speeds)
    return {
        "config": config.to_dict(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "prompt_len": args.prompt_len,
        "gen": args.gen,
        "samples": args.samples,
        "temperature": args.temperature,
        "top_k": args.top_k or None,
        "repeats": args.repeats,
        "prefill_tok_per_s": args.prompt_len / prefill_s,
        "decode_tok_per_s": args.gen / single_s,
        "decode_samples_tok_per_s": args.samples * args.gen / multi_s,
        **modes,
    }


def describe_config(config: dict) -> str:
    """'GPT-2, 2 layers, n_embd 64, 2 heads, ...': what every family's config has."""
    heads = f"{config['n_head']} heads"
    if "n_kv_head" in config:
        heads += f" ({config['n_kv_head']} kv)"
    label = registry.family_of(config).label
    return (
        f"{label}, {config['n_layer']} layers, n_embd {config['n_embd']}, {heads}, "
        f"vocab {config['vocab_size']}, context {config['sequence_len']}"
    )


def format_report(result: dict) -> str:
    config = result["config"]
    return "\n".join(
        [
            f"model: {describe_config(config)}; device {result['device']}, "
            f"{result['threads']} threads; temperature {result['temperature']}, "
            f"top-k {result['top_k']}; median of {result['repeats']}",
            f"prefill: {result['prefill_tok_per_s']:.1f} tok/s "
            f"({result['prompt_len']}-token prompt)",
            f"decode, 1 stream: {result['decode_tok_per_s']:.1f} tok/s ({result['gen']} tokens)",
            f"decode, {result['samples']} samples: {result['decode_samples_tok_per_s']:.1f} tok/s "
            f"({result['samples']} x {result['gen']} tokens)",
            *(
                f"decode with {label}: {result[f'{mode}_decode_tok_per_s']:.1f} tok/s (1 stream, "
                f"{result[f'{mode}_decode_tok_per_s'] / result['decode_tok_per_s']:.2f}x eager), "
                f"{result[f'{mode}_decode_samples_tok_per_s']:.1f} tok/s ({result['samples']} "
                f"samples, {ratio(result, mode):.2f}x eager)"
                for mode, label in (("static", "static shapes"), ("graphs", "CUDA graphs"))
                if f"{mode}_decode_tok_per_s" in result
            ),
        ]
    )


def ratio(result: dict, mode: str) -> float:
    return result[f"{mode}_decode_samples_tok_per_s"] / result["decode_samples_tok_per_s"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(json.dumps(result) if args.json else format_report(result))
    return 0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    sys.exit(main())
