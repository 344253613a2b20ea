"""Kernel benchmark of the hybrid model's ops: causal conv1d, chunked and recurrent delta rule.

    python -m engine.kernel_bench --visualize                       # CPU-sized defaults
    python -m engine.kernel_bench --device cuda --dtype bf16 --visualize --out-dir artifacts/k

For every kernel, every implementation the device has -- the plain reference (`*_naive`), ours
(`causal_conv1d`, `delta_rule_chunked`, `delta_rule_recurrent`), and the CUDA kernels of the
optional `causal_conv1d` and `fla` packages when they import -- is run over a ladder of scales
(batch × sequence × hidden), log-spaced from 2 × 256 × 128 to 64 × 2048 × 4096 (SPEC §13). Per
(kernel, implementation, scale): 3 precision runs on fresh random inputs compared with the
reference computed in fp32 on the same inputs, then one warm-up and --repeats timed runs
(CUDA-synchronised), median reported.

Why the caps: the top scale needs tens of GB and the reference is a per-token Python loop, so
a CPU cannot run the full ladder. A scale whose estimated working set exceeds --mem-budget-gb
(default: half the free RAM, or 80% of free GPU memory) is skipped, and an implementation is
skipped at a scale when its time there, extrapolated by FLOPs from the previous scale, would
exceed --max-seconds (--naive-max-seconds for the reference). Both say so in the table. Where
the delta rule's reference is capped, agreement is checked against the other, independent form
instead (chunked against the recurrence and vice versa; column "ref"), which the tests tie to
the reference at smaller sizes; the conv's reference is cheap enough to keep checking with.

Agreement: fp32 passes at max |error| < 1e-5. bf16 outputs are rounded to bf16 (8 bits of
mantissa), so a value near 1 alone carries up to ~4e-3 of rounding; bf16 passes at
|error| <= 1e-3 + 2^-8·|reference| elementwise, i.e. 1e-3 plus one bf16 rounding. The delta
rule's final state stays fp32 in every form and is held to 1e-3 in bf16 mode.

FLOPs are the nominal work of the operation, the same for every implementation so throughput
compares them: 2·B·T·C·K for the conv (K = 4 taps) and 7·B·T·H·Dk·Dv for the delta rule (decay,
recall, rank-1 update and readout of the recurrence per token and head). The chunked form does
more arithmetic than that (the C×C intra-chunk products), in matmuls that run far faster.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.ops.conv1d import causal_conv1d, causal_conv1d_naive, causal_conv_available
from engine.ops.delta_rule import (
    _delta_rule_fla,
    delta_rule_chunked,
    delta_rule_naive,
    delta_rule_recurrent,
    fla_available,
)

CONV_TAPS = 4
PRECISION_RUNS = 3
TOLERANCE = {"fp32": (1e-5, 0.0), "bf16": (1e-3, 2**-8)}  # (atol, rtol) on the output
STATE_TOLERANCE = {"fp32": 1e-5, "bf16": 1e-3}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Scale:
    batch: int
    seq: int
    hidden: int

    def label(self) -> str:
        return f"{self.batch}x{self.seq}x{self.hidden}"

    @property
    def elements(self) -> int:
        return self.batch * self.seq * self.hidden


def parse_scale(text: str) -> Scale:
    try:
        b, t, c = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"scale must be BxTxC, e.g. 2x256x128, got {text!r}"
        ) from None
    if min(b, t, c) < 1:
        raise argparse.ArgumentTypeError(f"scale sizes must be positive, got {text!r}")
    return Scale(b, t, c)


def ladder(lo: Scale, hi: Scale, n: int, head_dim: int) -> list[Scale]:
    """n scales geometrically spaced from lo to hi in each of batch, seq and hidden.

    Hidden is rounded to whole heads of `head_dim` (at least one head) and seq to a multiple of
    16, so the delta rule splits hidden into H heads of head_dim.
    """

    def geo(a: int, b: int, i: int) -> float:
        return a * (b / a) ** (i / (n - 1)) if n > 1 else b

    out = []
    for i in range(n):
        batch = max(1, round(geo(lo.batch, hi.batch, i)))
        seq = max(16, 16 * round(geo(lo.seq, hi.seq, i) / 16)) if lo.seq >= 16 else lo.seq
        hidden = max(head_dim, head_dim * round(geo(lo.hidden, hi.hidden, i) / head_dim))
        out.append(Scale(batch, seq, hidden))
    return out


# --------------------------------------------------------------------------------------------
# Kernels: inputs, implementations, reference, cost
# --------------------------------------------------------------------------------------------


@dataclass
class Kernel:
    name: str
    impls: dict[str, Callable]  # name -> fn(inputs) -> output tuple; "naive" is the reference
    make_inputs: Callable[[Scale, int, torch.dtype, torch.device], tuple]
    flops: Callable[[Scale], float]
    bytes_needed: Callable[[Scale], float]
    # The reference where the naive one is capped for time: an independent algorithm (the
    # other delta-rule form), or for the conv the naive form itself (3 runs are affordable).
    fallback: tuple[str, Callable]


def _conv_inputs(scale: Scale, seed: int, dtype: torch.dtype, device: torch.device) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    B, T, C = scale.batch, scale.seq, scale.hidden
    x = torch.randn(B, T, C, generator=gen)
    w = torch.randn(C, CONV_TAPS, generator=gen) / CONV_TAPS**0.5
    b = torch.randn(C, generator=gen) * 0.1
    return tuple(t.to(device=device, dtype=dtype) for t in (x, w, b))


def _delta_inputs(head_dim: int) -> Callable:
    def make(scale: Scale, seed: int, dtype: torch.dtype, device: torch.device) -> tuple:
        gen = torch.Generator().manual_seed(seed)
        B, T, H = scale.batch, scale.seq, scale.hidden // head_dim
        # As the model hands them over: unit-norm q, k; q scaled; g <= 0; beta in (0, 1).
        q = F.normalize(torch.randn(B, T, H, head_dim, generator=gen), dim=-1) / head_dim**0.5
        k = F.normalize(torch.randn(B, T, H, head_dim, generator=gen), dim=-1)
        v = torch.randn(B, T, H, head_dim, generator=gen)
        g = -F.softplus(torch.randn(B, T, H, generator=gen) - 2.0)  # mostly slow decay
        beta = torch.rand(B, T, H, generator=gen)
        return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v, g, beta))

    return make


def _fla_recurrent(q, k, v, g, beta):
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    # Keywords only: some releases put gk/gv between g and beta.
    o, s = fused_recurrent_gated_delta_rule(
        q=q, k=k, v=v, g=g.float(), beta=beta, scale=1.0, output_final_state=True,
        use_qk_l2norm_in_kernel=False,
    )  # fmt: skip
    return o, s.float()


def _fla_recurrent_available(device: torch.device) -> bool:
    if not fla_available(device):
        return False
    try:
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule  # noqa: F401
    except Exception:
        return False
    return True


def build_kernels(device: torch.device, dtype_name: str, head_dim: int) -> list[Kernel]:
    half = dtype_name == "bf16"

    def conv_cost(s: Scale) -> float:
        return 2.0 * s.elements * CONV_TAPS

    def conv_bytes(s: Scale) -> float:
        return 8.0 * s.elements * 4  # input, state-prefixed copy, output, fp32 temporaries

    def delta_cost(s: Scale) -> float:
        return 7.0 * s.batch * s.seq * s.hidden * head_dim  # 7·B·T·H·Dk·Dv with Dk = Dv

    def delta_bytes(s: Scale) -> float:
        chunk = 64
        heads = s.hidden // head_dim
        per_token = 12 * s.hidden + 6 * heads * chunk  # chunked form's intermediates, fp32
        return 4.0 * s.batch * s.seq * per_token

    conv_impls: dict[str, Callable] = {
        "naive": lambda x, w, b: causal_conv1d_naive(x, w, b),
        "torch": lambda x, w, b: causal_conv1d(x, w, b),
    }
    if causal_conv_available(device):
        # causal_conv1d() itself takes the CUDA kernel there; "torch" must then be the F.conv1d
        # path, which is what runs on CPU -- time it through the naive-free grouped conv.
        conv_impls["torch"] = lambda x, w, b: _torch_conv(x, w, b)
        conv_impls["cuda (causal-conv1d)"] = lambda x, w, b: causal_conv1d(x, w, b)

    chunk_impls: dict[str, Callable] = {
        "naive": delta_rule_naive,
        "chunked": delta_rule_chunked,
    }
    if half and fla_available(device):  # fla's Triton kernels are benchmarked in half precision
        chunk_impls["fla chunk"] = lambda q, k, v, g, b: _delta_rule_fla(q, k, v, g, b, None)
    rec_impls: dict[str, Callable] = {
        "naive": delta_rule_naive,
        "recurrent": delta_rule_recurrent,
    }
    if half and _fla_recurrent_available(device):
        rec_impls["fla fused_recurrent"] = _fla_recurrent

    delta_inputs = _delta_inputs(head_dim)
    return [
        Kernel("causal_conv1d", conv_impls, _conv_inputs, conv_cost, conv_bytes,
               ("naive", conv_impls["naive"])),
        Kernel("delta_rule_chunked", chunk_impls, delta_inputs, delta_cost, delta_bytes,
               ("recurrent", delta_rule_recurrent)),
        Kernel("delta_rule_recurrent", rec_impls, delta_inputs, delta_cost, delta_bytes,
               ("chunked", delta_rule_chunked)),
    ]  # fmt: skip


def _torch_conv(x, w, b):
    """Our grouped-conv path, bypassing the CUDA-kernel dispatch (to time it on a GPU)."""
    K = w.shape[1]
    xp = F.pad(x.transpose(1, 2), (K - 1, 0))
    y = F.silu(F.conv1d(xp, w.unsqueeze(1), b, groups=x.shape[-1]))
    return y.transpose(1, 2), xp[:, :, -(K - 1) :]


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    kernel: str
    impl: str
    scale: Scale
    heads: int | None
    flops: float
    ms: float | None = None
    max_err: float | None = None
    ok: bool | None = None
    ref: str = ""
    note: str = ""
    speedup: float | None = None

    @property
    def flops_per_ms(self) -> float | None:
        return self.flops / self.ms if self.ms else None


@dataclass
class Bench:
    device: torch.device
    dtype_name: str
    repeats: int
    mem_budget: float
    max_seconds: float
    naive_max_seconds: float
    rows: list[Row] = field(default_factory=list)
    log: Callable[[str], None] = print

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable, inputs: tuple) -> tuple[float, tuple]:
        self.sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = fn(*inputs)
        self.sync()
        return (time.perf_counter() - start) * 1e3, out


def _agreement(out: tuple, ref: tuple, dtype_name: str) -> tuple[float, bool]:
    """Max abs error of the output (and state, when there is one) and whether it passes."""
    atol, rtol = TOLERANCE[dtype_name]
    o, r = out[0].float(), ref[0].float()
    err = (o - r).abs()
    ok = bool((err <= atol + rtol * r.abs()).all())
    max_err = float(err.max()) if err.numel() else 0.0
    if len(out) > 1 and out[1].is_floating_point() and out[1].dtype == torch.float32:
        state_err = float((out[1] - ref[1].float()).abs().max()) if out[1].numel() else 0.0
        ok = ok and state_err < STATE_TOLERANCE[dtype_name]
        max_err = max(max_err, state_err) if dtype_name == "fp32" else max_err
    return max_err, ok


def run_kernel(bench: Bench, kernel: Kernel, scales: list[Scale], head_dim: int) -> None:
    dtype = DTYPES[bench.dtype_name]
    last: dict[str, tuple[float, float]] = {}  # impl -> (flops, ms) at its last scale
    is_delta = kernel.name.startswith("delta")
    for scale in scales:
        heads = scale.hidden // head_dim if is_delta else None
        flops = kernel.flops(scale)
        rows = {name: Row(kernel.name, name, scale, heads, flops) for name in kernel.impls}
        bench.rows.extend(rows.values())
        need = kernel.bytes_needed(scale)
        if need > bench.mem_budget:
            for row in rows.values():
                row.note = f"skipped: needs ~{need / 2**30:.1f} GiB > budget {bench.mem_budget / 2**30:.1f} GiB"  # fmt: skip
            bench.log(f"  {kernel.name} {scale.label()}: {rows['naive'].note}")
            continue
        runs = PRECISION_RUNS + 1 + bench.repeats
        active = []
        for name, row in rows.items():
            cap = bench.naive_max_seconds if name == "naive" else bench.max_seconds
            if name in last:
                prev_flops, prev_ms = last[name]
                predicted = prev_ms / 1e3 * flops / prev_flops * runs
                if predicted > cap:
                    flag = "--naive-max-seconds" if name == "naive" else "--max-seconds"
                    row.note = f"skipped: ~{predicted:.0f} s predicted > {flag} {cap:g}"
                    continue
            active.append(name)
        if not active:
            bench.log(f"  {kernel.name} {scale.label()}: every implementation capped")
            continue
        if "naive" in active:
            ref_name, ref_fn = "naive", kernel.impls["naive"]
        else:
            ref_name, ref_fn = kernel.fallback
        # Precision runs: fresh inputs each time, reference in fp32 on the same inputs.
        errors: dict[str, list[tuple[float, bool]]] = {name: [] for name in active}
        for seed in range(PRECISION_RUNS):
            inputs = kernel.make_inputs(scale, seed, dtype, bench.device)
            with torch.no_grad():
                ref = ref_fn(*(t.float() for t in inputs))
            for name in active:
                if name == "naive" and bench.dtype_name == "fp32":
                    continue  # the reference against itself
                with torch.no_grad():
                    out = kernel.impls[name](*inputs)
                errors[name].append(_agreement(out, ref, bench.dtype_name))
            del ref
        inputs = kernel.make_inputs(scale, 0, dtype, bench.device)
        for name in active:
            row = rows[name]
            row.ref = f"{ref_name} (fp32)"
            if errors[name]:
                row.max_err = max(e for e, _ in errors[name])
                row.ok = all(ok for _, ok in errors[name])
            bench.timed(kernel.impls[name], inputs)  # warm-up
            times = [bench.timed(kernel.impls[name], inputs)[0] for _ in range(bench.repeats)]
            row.ms = statistics.median(times)
            last[name] = (flops, row.ms)
        base = rows["naive"].ms
        for row in rows.values():
            if base and row.ms:
                row.speedup = base / row.ms
        done = ", ".join(f"{n} {rows[n].ms:.2f} ms" for n in active)
        bench.log(f"  {kernel.name} {scale.label()}: {done}")
        del inputs
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Output: text table, markdown, charts
# --------------------------------------------------------------------------------------------

COLUMNS = ("kernel", "impl", "scale BxTxC", "heads", "median ms", "FLOPs/ms", "speedup",
           "max abs err", "check", "ref", "note")  # fmt: skip


def _cells(row: Row) -> list[str]:
    def num(x: float | None, fmt: str) -> str:
        return "—" if x is None else format(x, fmt)

    check = "—" if row.ok is None else ("ok" if row.ok else "FAIL")
    return [
        row.kernel,
        row.impl,
        row.scale.label(),
        "—" if row.heads is None else str(row.heads),
        num(row.ms, ".3f"),
        num(row.flops_per_ms, ".3g"),
        num(row.speedup, ".1f") + ("×" if row.speedup else ""),
        num(row.max_err, ".1e"),
        check,
        row.ref or "—",
        row.note,
    ]


def text_table(rows: list[Row]) -> str:
    cells = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(COLUMNS))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def write_charts(rows: list[Row], out_dir: Path, title: str) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    kernels = list(dict.fromkeys(r.kernel for r in rows))
    all_scales = sorted({r.scale for r in rows}, key=lambda s: s.elements)

    def series(kernel: str, impl: str, value: Callable[[Row], float | None]):
        pts = [(r.scale.elements, value(r)) for r in rows if r.kernel == kernel and r.impl == impl]
        return [p for p in pts if p[1]]

    def style(ax, ylabel: str):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([s.elements for s in all_scales])
        ax.set_xticklabels([s.label() for s in all_scales], rotation=60, fontsize=6)
        ax.xaxis.set_minor_locator(NullLocator())  # scale labels only; keep minor y ticks
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)

    fig, axes = plt.subplots(2, len(kernels), figsize=(5 * len(kernels), 8), squeeze=False)
    for col, kernel in enumerate(kernels):
        impls = list(dict.fromkeys(r.impl for r in rows if r.kernel == kernel))
        for impl in impls:
            for ax, value in ((axes[0][col], lambda r: r.ms), (axes[1][col], lambda r: r.flops_per_ms)):  # fmt: skip
                pts = series(kernel, impl, value)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
        axes[0][col].set_title(kernel)
        style(axes[0][col], "median time (ms)")
        style(axes[1][col], "throughput (nominal FLOPs/ms)")
        axes[1][col].set_xlabel("scale (batch x seq x hidden)")
        axes[0][col].legend(fontsize=7)
    fig.suptitle(f"Kernel time and throughput per scale — {title}")
    fig.tight_layout()
    times_png = out_dir / "kernel_times.png"
    fig.savefig(times_png, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(kernels), figsize=(5 * len(kernels), 4.5), squeeze=False)
    for col, kernel in enumerate(kernels):
        ax = axes[0][col]
        impls = [r.impl for r in rows if r.kernel == kernel and r.impl != "naive"]
        for impl in dict.fromkeys(impls):
            pts = series(kernel, impl, lambda r: r.speedup)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(kernel)
        style(ax, "speedup over naive reference (×)")
        ax.set_xlabel("scale (batch x seq x hidden)")
        if ax.lines[:-1]:
            ax.legend(fontsize=7)
    fig.suptitle(f"Speedup over the reference per scale — {title}")
    fig.tight_layout()
    speedup_png = out_dir / "kernel_speedup.png"
    fig.savefig(speedup_png, dpi=110)
    plt.close(fig)
    return times_png, speedup_png


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.kernel_bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--scales", type=int, default=10, help="number of scales in the ladder")
    parser.add_argument("--min-scale", type=parse_scale, default=Scale(2, 256, 128),
                        help="smallest scale, BxTxC (default 2x256x128)")  # fmt: skip
    parser.add_argument("--max-scale", type=parse_scale, default=Scale(64, 2048, 4096),
                        help="largest scale, BxTxC (default 64x2048x4096)")  # fmt: skip
    parser.add_argument("--head-dim", type=int, default=128, help="delta-rule head dim")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement")
    parser.add_argument("--mem-budget-gb", type=float, default=None,
                        help="skip scales needing more (default: 80%% of free GPU memory, or "
                        "half the available RAM)")  # fmt: skip
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="skip an implementation at a scale when its runs there are "
                        "predicted to take longer (default 30 on CPU, 120 on CUDA)")  # fmt: skip
    parser.add_argument("--naive-max-seconds", type=float, default=None,
                        help="the same cap for the per-token reference (default 15 on CPU, 60 "
                        "on CUDA)")  # fmt: skip
    parser.add_argument("--kernels", default="causal_conv1d,delta_rule_chunked,delta_rule_recurrent",
                        help="comma-separated subset")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--visualize", action="store_true", help="write the two PNG charts")
    parser.add_argument("--out-dir", type=Path, default=Path("artifacts/kernel_bench"),
                        help="where kernel_bench.md and the PNGs go")  # fmt: skip
    return parser


def _cpu_name() -> str:
    n = torch.get_num_threads()
    return f"CPU ({n} thread{'s' if n != 1 else ''})"


def _default_budget(device: torch.device) -> float:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return 0.8 * free
    try:
        import psutil

        return 0.5 * psutil.virtual_memory().available
    except ImportError:  # pragma: no cover - psutil is a runtime dependency
        return 4 * 2**30


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.scales < 1 or args.repeats < 1:
        print("error: --scales and --repeats must be >= 1", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    budget = args.mem_budget_gb * 2**30 if args.mem_budget_gb else _default_budget(device)
    bench = Bench(
        device=device,
        dtype_name=args.dtype,
        repeats=args.repeats,
        mem_budget=budget,
        max_seconds=args.max_seconds or (120.0 if cuda else 30.0),
        naive_max_seconds=args.naive_max_seconds or (60.0 if cuda else 15.0),
    )
    scales = ladder(args.min_scale, args.max_scale, args.scales, args.head_dim)
    wanted = {k.strip() for k in args.kernels.split(",") if k.strip()}
    kernels = [k for k in build_kernels(device, args.dtype, args.head_dim) if k.name in wanted]
    if not kernels:
        print(f"error: no known kernel in --kernels {args.kernels!r}", file=sys.stderr)
        return 2

    name = torch.cuda.get_device_name(device) if cuda else _cpu_name()
    title = f"{name}, {args.dtype}"
    print(f"kernel bench on {title}; memory budget {budget / 2**30:.1f} GiB; "
          f"caps {bench.max_seconds:g} s (naive {bench.naive_max_seconds:g} s) per measurement")  # fmt: skip
    print("scales: " + ", ".join(s.label() for s in scales))
    print(f"delta rule: hidden = heads x head_dim {args.head_dim}; conv: {CONV_TAPS} taps")
    for kernel in kernels:
        print(f"{kernel.name}: implementations {', '.join(kernel.impls)}")
        run_kernel(bench, kernel, scales, args.head_dim)

    table = text_table(bench.rows)
    print()
    print(table)
    ran = sorted({r.scale for r in bench.rows if r.ms is not None}, key=lambda s: s.elements)
    print(f"\nscales that ran (any implementation): {', '.join(s.label() for s in ran) or 'none'}")
    failures = [r for r in bench.rows if r.ok is False]
    atol, rtol = TOLERANCE[args.dtype]
    criterion = f"|err| < {atol:g}" + (f" + {rtol:.2g}·|ref|" if rtol else "")
    if failures:
        print(f"AGREEMENT FAILURES ({criterion}): "
              + ", ".join(f"{r.kernel}/{r.impl}@{r.scale.label()}" for r in failures))  # fmt: skip
    else:
        print(f"agreement: every checked row within {criterion}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    md = args.out_dir / "kernel_bench.md"
    md.write_text(
        f"Kernel benchmark on {title}; {args.repeats} timed runs (median), "
        f"{PRECISION_RUNS} precision runs, agreement {criterion}.\n\n"
        + markdown_table(bench.rows)
        + "\n"
    )
    print(f"wrote {md}")
    if args.visualize:
        for path in write_charts(bench.rows, args.out_dir, title):
            print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
