"""The hybrid family ("nanoNext"): a Qwen3-Next-style model behind the same interface as GPT.

Shape (SPEC §13): token embedding -> blocks -> RMSNorm -> untied lm_head (plain fp32 logits,
no soft-cap). Each block is pre-norm: x += mixer(norm(x)); x += moe(norm(x)). The mixer is
linear attention (gated DeltaNet, "L") or full attention (gated, "F"), tiled from
`layer_pattern` -- "LLLF" by default, three linear layers per full one:

* linear attention keeps a constant-size state per row, so prefill is linear in the length and
  a decode step costs the same at any position: long contexts are cheap;
* the full layer keeps every key, which gives exact recall (copying a name from 3,000 tokens
  back) that a compressed state only approximates; one in four is Qwen3-Next's ratio.

The linear layers run the delta rule chunked (WY form, batched matmuls) in training and
prefill, and recurrent (one rank-1 update per token) in decode; both are the same numbers up
to rounding (engine/ops/delta_rule.py). The MLP of every block is a sparse mixture of experts:
each token runs only `experts_per_token` of `num_experts` SwiGLU experts (plus a shared one),
so parameters grow with E while compute per token grows with k. A load-balancing loss
(engine/models/hybrid_layers.py `load_balancing_loss`) keeps the router from collapsing.

Layers: engine/models/hybrid_layers.py; decode state: engine/models/hybrid_cache.py. This
module holds the config, the model, the closed forms the web app plans with and `FAMILY`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from engine.common import compute_dtype
from engine.models.base import Family, checked_groups, group_counts
from engine.models.gpt import ROTARY_LENGTH_FACTOR, rotary_halves, rotary_tables
from engine.models.heads import check_forward_args, generate_naive, head_output
from engine.models.hybrid_cache import HybridCache, HybridCacheRows
from engine.models.hybrid_config import HybridConfig
from engine.models.hybrid_layers import GatedAttention, GatedDeltaNet, RMSNorm, SparseMoE

ROUTER_INIT_STD_SCALE = 1.0  # router ~ N(0, 1/C): diverse routing from the first step


# ---- closed forms ---------------------------------------------------------------------------


def _layer_counts(config: HybridConfig) -> tuple[int, int, int, int, int]:
    """(linear mixer matrices, full mixer matrices, linear vectors, full vectors, MoE
    matrices) of one layer of each kind."""
    c = config.n_embd
    value_dim = config.n_v_heads * config.v_head_dim
    lin_m = c * config.conv_dim + c * value_dim + c * 2 * config.n_v_heads + value_dim * c
    lin_v = config.conv_dim * config.conv_kernel + 2 * config.n_v_heads + config.v_head_dim
    q_dim, kv_dim = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    full_m = c * 2 * q_dim + 2 * c * kv_dim + q_dim * c
    full_v = 2 * config.head_dim
    ds = config.shared_expert_dim
    moe = config.num_experts * (c + 3 * config.expert_dim * c) + (3 * ds * c + c if ds else 0)
    return lin_m, full_m, lin_v, full_v, moe


def count_params(config: HybridConfig) -> dict[str, int]:
    """`Hybrid(config).num_scaling_params()` without building anything: parameters per group
    of `param_groups()` (matrices, embeddings, lm_head, vectors) plus their total."""
    lin_m, full_m, lin_v, full_v, moe = _layer_counts(config)
    kinds = config.layer_kinds()
    n_lin, n_full = kinds.count("linear"), kinds.count("full")
    c = config.n_embd
    counts = {
        "matrices": n_lin * lin_m + n_full * full_m + config.n_layer * moe,
        "embeddings": config.vocab_size * c,
        "lm_head": config.padded_vocab_size * c,
        # Two block norms per layer and the final norm.
        "vectors": n_lin * lin_v + n_full * full_v + (2 * config.n_layer + 1) * c,
    }
    counts["total"] = sum(counts.values())
    return counts


def scaling_params(config: HybridConfig) -> int:
    """Parameters taking part in a token's matmuls: the mixers' matrices, the router, k of the
    E experts, the shared expert (and its gate) and the lm_head. What a tokens-per-parameter
    horizon counts; the inactive experts are left out, as are lookups and vectors."""
    lin_m, full_m, _, _, _ = _layer_counts(config)
    kinds = config.layer_kinds()
    c, ds = config.n_embd, config.shared_expert_dim
    active_moe = (
        config.num_experts * c
        + config.experts_per_token * 3 * config.expert_dim * c
        + (3 * ds * c + c if ds else 0)
    )
    mixers = kinds.count("linear") * lin_m + kinds.count("full") * full_m
    return mixers + config.n_layer * active_moe + config.padded_vocab_size * c


def delta_rule_flops(config: HybridConfig) -> int:
    """Training FLOPs per token of one linear layer's delta rule (forward + backward).

    Forward, per value head: the three state products of the recurrence -- Sᵀk (read), k uᵀ
    (write) and Sᵀq (output) -- 2 Dk Dv each; plus the chunked form's intra-chunk work, like
    attention over a window of C = min(chunk_size, sequence_len) positions: q·k and k·k scores
    (2 C Dk each) and the scores times the corrections (2 C Dv). Backward is counted as twice
    the forward (x3 in all), the convention of 6 per matmul weight and of attention's 12.
    """
    dk, dv = config.k_head_dim, config.v_head_dim
    chunk = min(config.chunk_size, config.sequence_len)
    forward = 6 * dk * dv + 2 * chunk * (2 * dk + dv)
    return 3 * config.n_v_heads * forward


def flops_per_token(config: HybridConfig) -> int:
    """`Hybrid(config).estimate_flops()` in closed form (see there for what is counted)."""
    kinds = config.layer_kinds()
    attention = 12 * config.n_head * config.head_dim * config.sequence_len
    return (
        6 * scaling_params(config)
        + kinds.count("full") * attention
        + kinds.count("linear") * delta_rule_flops(config)
    )


def activation_bytes_per_token(config: HybridConfig, dtype: torch.dtype | str = "bf16") -> float:
    """Bytes autograd saves per token of a training step (every layer and the stem; the loss's
    own working set excluded), for the memory planner. See `_activation_terms`."""
    return sum(_activation_terms(config, _dtype(dtype)).values())


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}  # fmt: skip
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


def _activation_terms(config: HybridConfig, dtype: torch.dtype) -> dict[str, float]:
    """Saved-for-backward bytes per token of a training step, by part, term by term what the
    layers keep (a test holds the sum to `training.memory.measure_saved` within 25%).

    a = the compute dtype's bytes (autocast's), 4 for fp32 values, 8 for int64 indices; C =
    n_embd; T = sequence_len; per-step constants (weight casts, masks, rotary tables, the
    state entering a chunk loop) are left out.
      every block: each of its two norms keeps its input and the normalised input (fp32, 4 C
        each), one rstd, and its output cast once to the compute dtype (a C);
      linear mixer: the conv's padded input, its output and the SiLU output (a conv_dim each;
        the padding adds K-1 positions per row), the q/k L2 norms (4 a H_k), the gates (a + dt,
        softplus, sigmoid: 12 H_v); the delta rule computes in fp32 and autograd keeps, per
        value head and token, five C-wide rows of the chunk's matrices (decay, beta K Kᵀ,
        Q Kᵀ, decayed scores, the system's inverse), six Dk-wide rows (chunked q and k,
        beta k, decayed q, k decayed to the chunk end, W), three Dv-wide ones (chunked v,
        U', the corrections U), three scalars (beta, Γ, decay to the chunk end) and the
        chunk's entering state (Dk Dv / C); the gated norm keeps o and its normalised form
        (fp32), one rstd per head, z, SiLU(z) and the product (a each);
      full mixer: the projected queries (with the gate rows in fp32, whose q is a view of
        them; a fp32 copy of q alone under autocast) and keys, both q/k norms' normalised
        output (fp32) and rstds, attention's q, k, v, output and log-sum-exp, sigmoid(gate),
        and the output projection's input;
      MoE: router probabilities (4 E), the top-k values, indices and the renormalising sum,
        three int64 permutations of the N k assignments and the gathered weights; per
        assignment the gathered input (a C) and the expert's hidden layers (2 D_e gate/up,
        weighted up, SiLU, product: 5 a D_e); the shared expert's hidden layers (4 a D_s),
        its output and gate;
      stem: the token ids, the final norm (input, normalised, rstd) and the fused loss's
        gradient of the hidden states (a C, as GPT's planner counts it).
    The delta-rule term is what autograd keeps through engine/ops/delta_rule.py's chunked form
    today -- the largest part of a linear layer (5 C per head and token is 1.25 KiB per head at
    C = 64). flash-linear-attention's kernel (CUDA) has its own backward and saves far less;
    re-derive this term if the kernel that trains changes.
    """
    a, f, i64 = dtype.itemsize, 4, 8
    c, seq = config.n_embd, config.sequence_len
    kinds = config.layer_kinds()
    hv, hk, dk, dv = config.n_v_heads, config.n_k_heads, config.k_head_dim, config.v_head_dim
    vd = hv * dv
    chunk = min(config.chunk_size, seq)
    norms = 2 * (2 * f * c + f + a * c)
    conv = 3 * a * config.conv_dim + a * config.conv_dim * (config.conv_kernel - 1) / seq
    delta = f * hv * (5 * chunk + 6 * dk + 3 * dv + 3 + dk * dv / chunk)
    gated_norm = 2 * f * vd + f * hv + 3 * a * vd
    linear = conv + 4 * a * hk + 3 * f * hv + delta + gated_norm
    q_dim, kv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    heads, kv_heads = config.n_head, config.n_kv_head
    q_in = f * (2 * q_dim if a == f else q_dim)
    full = q_in + f * kv + f * (heads + kv_heads) + f * (q_dim + kv)
    full += a * (q_dim + 2 * kv) + a * q_dim + f * heads + 2 * a * q_dim
    k, e = config.experts_per_token, config.num_experts
    router = f * e + (i64 + f) * k + f + 3 * i64 * k + a * k
    experts = k * a * (c + 5 * config.expert_dim)
    ds = config.shared_expert_dim
    shared = 4 * a * ds + a + a * c if ds else 0
    moe = router + experts + shared
    stem = i64 + 2 * f * c + f + a * c
    return {
        "norms": config.n_layer * norms,
        "linear_attention": kinds.count("linear") * linear,
        "full_attention": kinds.count("full") * full,
        "moe": config.n_layer * moe,
        "stem": stem,
    }


def config_from_flags(flags: Mapping[str, Any], vocab_size: int) -> HybridConfig:
    """base_train's flags -> a config, one depth dial as GPT's.

    n_embd = depth x aspect_ratio rounded up to a multiple of head_dim; full attention has
    n_embd / head_dim heads and n_kv_head KV heads (flag -1 or 0: a quarter of the heads, the
    largest divisor of n_head not above n_head // 4, at least 1). Linear attention has as many
    value heads as full attention has heads and half as many key heads (the largest divisor of
    n_head not above n_head // 2), all head_dim wide.

    MoE width: expert_dim -1 means n_embd. A SwiGLU expert of width D has 3 C D weights, so two
    active experts of width C (6 C^2) are the compute of one SwiGLU MLP of width 2C, and with
    the shared expert (3 C^2 more) a token's MLP work, 9 C^2, is close to GPT's ReLU^2 MLP of
    width 4C (8 C^2): a hybrid and a GPT of one depth cost about the same per token while the
    hybrid holds E/2 times the MLP parameters.
    """
    depth = flags["depth"]
    aspect_ratio = flags.get("aspect_ratio", 64)
    head_dim = flags.get("head_dim", 128)
    for name, value in (("depth", depth), ("aspect_ratio", aspect_ratio), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    n_embd = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = n_embd // head_dim
    n_kv_head = flags.get("n_kv_head", -1)
    if n_kv_head is None or n_kv_head <= 0:
        n_kv_head = _largest_divisor(n_head, max(1, n_head // 4))
    expert_dim = flags.get("expert_dim", -1)
    expert_dim = n_embd if expert_dim is None or expert_dim <= 0 else expert_dim
    return HybridConfig(
        sequence_len=flags["max_seq_len"],
        vocab_size=vocab_size,
        n_layer=depth,
        n_embd=n_embd,
        layer_pattern=flags.get("layer_pattern", "LLLF"),
        n_head=n_head,
        n_kv_head=n_kv_head,
        head_dim=head_dim,
        n_k_heads=_largest_divisor(n_head, max(1, n_head // 2)),
        n_v_heads=n_head,
        k_head_dim=head_dim,
        v_head_dim=head_dim,
        num_experts=flags.get("num_experts", 8),
        experts_per_token=flags.get("experts_per_token", 2),
        expert_dim=expert_dim,
        shared_expert_dim=expert_dim,
        chunk_size=flags.get("delta_chunk_size", 64),
        aux_loss_coef=flags.get("aux_loss_coef", 1e-3),
    )


def _largest_divisor(n: int, at_most: int) -> int:
    return next(d for d in range(min(n, at_most), 0, -1) if n % d == 0)


# ---- the model ------------------------------------------------------------------------------


class HybridBlock(nn.Module):
    """Pre-norm residual block: a linear- or full-attention mixer, then the sparse MoE."""

    def __init__(self, config: HybridConfig, kind: str, kind_idx: int) -> None:
        super().__init__()
        self.kind = kind
        self.norm1 = RMSNorm(config.n_embd, config.norm_eps)
        self.mixer = (
            GatedDeltaNet(config, kind_idx)
            if kind == "linear"
            else GatedAttention(config, kind_idx)
        )
        self.norm2 = RMSNorm(config.n_embd, config.norm_eps)
        self.moe = SparseMoE(config)

    def forward(
        self, x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor, cache: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = _to_compute_dtype(self.norm1(x))
        if self.kind == "linear":
            x = x + self.mixer(h, cache)
        else:
            x = x + self.mixer(h, cos2, sin2, cache)
        y, aux = self.moe(_to_compute_dtype(self.norm2(x)))
        return x + y, aux


def _to_compute_dtype(h: torch.Tensor) -> torch.Tensor:
    """A norm's output in autocast's dtype, cast once: every projection reading it would
    otherwise cast (and save for backward) a copy of its own -- three in a mixer, up to four
    in the MoE (router, experts, shared expert and its gate)."""
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        return h.to(torch.get_autocast_dtype(device_type))
    return h


class Hybrid(nn.Module):
    """The model. Built parameters are initialised (`init_weights`)."""

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.config = config
        kinds = config.layer_kinds()
        self.n_linear, self.n_full = kinds.count("linear"), kinds.count("full")
        counters = {"linear": 0, "full": 0}
        blocks = []
        for kind in kinds:
            blocks.append(HybridBlock(config, kind, counters[kind]))
            counters[kind] += 1
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(blocks)
        self.norm_f = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        cos, sin = rotary_tables(config.sequence_len * ROTARY_LENGTH_FACTOR, config.rotary_dim)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        self._last_aux: torch.Tensor | None = None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter (call again after building on meta + `to_empty`).

        Embedding N(0, 1) (pre-norm blocks see it normalised); lm_head N(0, 0.001); input
        projections and expert input stacks uniform with std 1/sqrt(fan_in); the router
        N(0, 1/C), so tokens spread over the experts from the first step (a zero router would
        tie every probability and send every token to experts 0..k-1); output projections
        (attention, DeltaNet, experts, shared expert) zero, so every block starts as the
        identity; the shared-expert gate zero (sigmoid 0.5); conv taps uniform +-1/sqrt(K)
        (PyTorch's Conv1d default for a depthwise filter); norm gains 1. Gates as Mamba-2 and
        Qwen3-Next: A_log = log A with A ~ U[1, 16] (per-head decay rates), dt_bias = the
        inverse softplus of dt ~ log-uniform on [1e-3, 1e-1], so softplus(a + dt_bias) starts
        at dt for a = 0 and heads begin with memories from ~10 to ~1000 tokens.
        """
        config = self.config
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        self.norm_f.weight.fill_(1.0)
        for block in self.blocks:
            block.norm1.weight.fill_(1.0)
            block.norm2.weight.fill_(1.0)
            mixer = block.mixer
            if isinstance(mixer, GatedDeltaNet):
                for linear in (mixer.in_proj_qkv, mixer.in_proj_z, mixer.in_proj_ba):
                    _uniform_fan_in(linear.weight)
                bound = 1 / math.sqrt(config.conv_kernel)
                nn.init.uniform_(mixer.conv_weight, -bound, bound)
                mixer.init_gates()
                mixer.norm_weight.fill_(1.0)
                nn.init.zeros_(mixer.out_proj.weight)
            else:
                for linear in (mixer.q_proj, mixer.k_proj, mixer.v_proj):
                    _uniform_fan_in(linear.weight)
                mixer.q_norm.fill_(1.0)
                mixer.k_norm.fill_(1.0)
                nn.init.zeros_(mixer.o_proj.weight)
            moe = block.moe
            nn.init.normal_(moe.router.weight, std=ROUTER_INIT_STD_SCALE / math.sqrt(config.n_embd))
            _uniform_fan_in(moe.w_in)
            nn.init.zeros_(moe.w_out)
            if moe.shared_in is not None:
                _uniform_fan_in(moe.shared_in.weight)
                nn.init.zeros_(moe.shared_out.weight)
                nn.init.zeros_(moe.shared_gate.weight)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the rotary tables in place (they are not in the state dict)."""
        cos, sin = rotary_tables(
            self.rotary_cos.size(0), self.config.rotary_dim, device=self.rotary_cos.device
        )
        self.rotary_cos.copy_(cos)
        self.rotary_sin.copy_(sin)

    def get_device(self) -> torch.device:
        return self.wte.weight.device

    def max_positions(self) -> int:
        """Rotary angles exist for this many positions (10x the training context); the linear
        layers' state has no length limit."""
        return self.rotary_cos.size(0)

    def new_cache(self, batch_size: int, max_len: int) -> HybridCache:
        """Decode state for `batch_size` rows of up to `max_len` positions (hybrid_cache.py)."""
        table = self.rotary_cos.size(0)
        if self.n_full and max_len > table:
            raise ValueError(f"cache max_len {max_len} exceeds the model's rotary table {table}")
        config, device = self.config, self.get_device()
        return HybridCache(
            n_full=self.n_full, n_linear=self.n_linear, batch_size=batch_size, max_len=max_len,
            n_kv_head=config.n_kv_head, head_dim=config.head_dim, conv_dim=config.conv_dim,
            conv_kernel=config.conv_kernel, n_v_heads=config.n_v_heads,
            k_head_dim=config.k_head_dim, v_head_dim=config.v_head_dim,
            device=device, dtype=compute_dtype(device),
        )  # fmt: skip

    def moe_layers(self) -> list[SparseMoE]:
        return [block.moe for block in self.blocks]

    def training_metrics(self) -> dict[str, float]:
        """MoE health of the last forward run with gradients: "moe/aux_loss" (mean over layers,
        1.0 = balanced) and "moe/load_max" (over layers, the busiest expert's share of the
        assignments times E: 1.0 = balanced, E/k = collapsed onto k experts), plus
        "moe/load_max/l{i}" per layer. {} before any such forward. Reads the device (.item()):
        call it only when logging."""
        layers = self.moe_layers()
        if any(moe.last_load is None for moe in layers):
            return {}
        loads = torch.stack([moe.last_load.max() * moe.num_experts for moe in layers]).tolist()
        aux = torch.stack([moe.last_aux for moe in layers]).mean().item()
        metrics = {"moe/aux_loss": aux, "moe/load_max": max(loads)}
        metrics.update({f"moe/load_max/l{i}": value for i, value in enumerate(loads)})
        return metrics

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """matrices: every 2-D or 3-D weight in the blocks (projections, router, shared gate,
        expert stacks) except the conv taps; vectors: norm gains, A_log, dt_bias and the conv
        taps (C, K) -- a per-channel filter, not a linear map, so not Muon's; embeddings: wte;
        lm_head. Every parameter exactly once (RuntimeError otherwise)."""
        matrices, vectors = [], []
        for name, param in self.blocks.named_parameters():
            if param.dim() >= 2 and not name.endswith("conv_weight"):
                matrices.append(param)
            else:
                vectors.append(param)
        vectors.append(self.norm_f.weight)
        groups = {
            "matrices": matrices,
            "embeddings": [self.wte.weight],
            "lm_head": [self.lm_head.weight],
            "vectors": vectors,
        }
        return checked_groups(self, groups)

    def num_scaling_params(self) -> dict[str, int]:
        """Parameter counts per group of `param_groups()`, plus their total."""
        return group_counts(self.param_groups())

    def active_matmul_params(self) -> int:
        """Weights one token's matmuls touch, counted from the built modules: every matrix
        except the experts a token does not use (k of E), plus the lm_head."""
        total = sum(p.numel() for p in self.param_groups()["matrices"])
        for moe in self.moe_layers():
            experts = moe.w_in.numel() + moe.w_out.numel()
            total -= experts - experts * moe.top_k // moe.num_experts
        return total + self.lm_head.weight.numel()

    def estimate_flops(self) -> int:
        """Training FLOPs per token at full context (forward + backward).

        6 per weight taking part in a token's matmuls (2 forward, 4 backward): the mixers'
        projections, the router, k of the E experts, the shared expert and its gate, and the
        lm_head -- not the inactive experts, the embedding lookup or elementwise vectors
        (conv taps, norms, gates). Each full layer adds attention's 12 x heads x head_dim per
        key at full context; each linear layer its delta rule (`delta_rule_flops`: the
        recurrence's three (Dk, Dv) state products plus the chunk's attention-like work, x3).
        """
        config = self.config
        attention = 12 * config.n_head * config.head_dim * config.sequence_len
        return (
            6 * self.active_matmul_params()
            + self.n_full * attention
            + self.n_linear * delta_rule_flops(config)
        )

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: HybridCacheRows | None = None,
        loss_reduction: str = "mean",
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size) in fp32, or the loss when `targets` is given.

        Targets equal to -1 are ignored. Training (gradients on, reduction 'mean' or 'sum') adds
        aux_loss_coef x the mean load-balancing loss of the MoE layers (per target token for
        'sum'); 'none' gives (B, T)
        token losses without it. With `kv_cache` (`new_cache(...).rows(a, b)`) idx holds each
        row's next T tokens; the rows continue from their own lengths and states.
        """
        check_forward_args(idx, targets, loss_reduction)
        batch, seq = idx.shape
        if kv_cache is not None:
            kv_cache.check_room(seq)
        cos2, sin2 = rotary_halves(*self._rotary_angles(seq, kv_cache))
        x = self.wte(idx)
        aux_losses = []
        for block in self.blocks:
            x, aux = block(x, cos2, sin2, kv_cache)
            aux_losses.append(aux)
        if kv_cache is not None:
            kv_cache.advance(seq)
        out = head_output(
            self.norm_f(x), targets, loss_reduction, weight=self.lm_head.weight,
            vocab_size=self.config.vocab_size, softcap=None, logits=self._logits,
        )  # fmt: skip
        training = targets is not None and loss_reduction != "none" and torch.is_grad_enabled()
        if training and self.config.aux_loss_coef > 0:
            # The balancing loss is a mean over the MoE layers, added per target token: a 'sum'
            # (what fine-tuning accumulates) carries it as many times as 'mean' divides it out.
            aux = self.config.aux_loss_coef * torch.stack(aux_losses).mean()
            out = out + (aux if loss_reduction == "mean" else aux * (targets >= 0).sum())
        return out

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits of the real vocabulary (no soft-cap in this family)."""
        return self.lm_head(x)[..., : self.config.vocab_size].float()

    def _rotary_angles(
        self, seq: int, kv_cache: HybridCacheRows | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin broadcastable to (B, T, 1, rotary_dim/2) for this step's positions."""
        table_len = self.rotary_cos.size(0)
        if kv_cache is None:
            if seq > table_len and self.n_full:
                raise ValueError(f"sequence of {seq} tokens exceeds the rotary table ({table_len})")
            return self.rotary_cos[None, :seq, None], self.rotary_sin[None, :seq, None]
        if not self.n_full:  # no full layer reads positions
            return self.rotary_cos[None, :0, None], self.rotary_sin[None, :0, None]
        positions = kv_cache.lengths[:, None] + torch.arange(seq, device=kv_cache.lengths.device)
        return self.rotary_cos[positions][:, :, None], self.rotary_sin[positions][:, :, None]

    def generate_naive(
        self,
        tokens: Sequence[int],
        max_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int = 42,
    ) -> Iterator[int]:
        """Yield up to `max_tokens` tokens, re-running the whole sequence each step: the
        ground truth cached decoding must reproduce (SPEC §9)."""
        return generate_naive(
            lambda ids: self.forward(ids)[:, -1, :], self.get_device(), tokens, max_tokens,
            temperature, top_k, seed,
        )  # fmt: skip


def _uniform_fan_in(weight: torch.Tensor) -> None:
    """Uniform with standard deviation 1/sqrt(fan_in) (fan_in = the last dimension)."""
    bound = math.sqrt(3) / math.sqrt(weight.size(-1))
    nn.init.uniform_(weight, -bound, bound)


FAMILY = Family(
    name="hybrid",
    label="Hybrid (Qwen3-Next)",
    config_cls=HybridConfig,
    model_cls=Hybrid,
    count_params=count_params,
    scaling_params=scaling_params,
    flops_per_token=flops_per_token,
    activation_bytes_per_token=activation_bytes_per_token,
    config_from_flags=config_from_flags,
    flags=(
        "aspect_ratio", "head_dim", "n_kv_head", "layer_pattern", "num_experts",
        "experts_per_token", "expert_dim", "delta_chunk_size", "aux_loss_coef",
    ),
)  # fmt: skip
