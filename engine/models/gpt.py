"""The GPT model of SPEC §4, brought up to nanochat's model of 2026 (commit 92d63d4).

The shape, in the order the residual stream meets it: token embedding -> RMSNorm -> the smear
gate (a learned, gated share of the previous token's normed embedding added to each token's:
cheap bigram information) = x0; per layer x = resid_lambda * x + x0_lambda * x0, then pre-norm
attention and pre-norm ReLU² MLP; the residual after the middle layer (n_layer // 2) is kept
and `backout_lambda` times it subtracted before the final RMSNorm -> untied lm_head -> fp32
logits soft-capped at ±15. Attention uses rotary positions (base 100,000), RMSNorm on queries
and keys scaled by 1.2, grouped-query heads, sliding windows tiled from `window_pattern` ("S":
a quarter of the context rounded up to 128 positions), and on alternating layers a gated
"value embedding" added to v. No norm has weights and no linear has a bias, so every parameter
is either a 2-D matrix in a block (Muon), an embedding table, the lm_head, a per-layer scalar
or one of the smear/backout parameters (AdamW) -- see `param_groups()`.

Every one of those behaviours that changed since SPEC §4 is a `GPTConfig` field whose default
is the new behaviour; `LEGACY_FIELDS` holds the values that reproduce the model before, which
a checkpoint written then (its meta lacks the fields) gets when it is loaded
(engine/models/registry.py `config_from_dict`), so it generates exactly as before.

The same `forward` serves training (targets -> loss), evaluation (logits) and cached
generation: pass an object following the `KVCache` protocol below and each row of the batch
continues from its own cached length. `ReferenceKVCache` is the plain implementation the tests
(and the engine's equivalence check) use; `generate_naive` is the no-cache ground truth. The
engine decodes with `engine.models.gpt_inference.InferenceForward`, the same math in fewer ops.
engine/models/nanochat_compat.py maps weights to and from nanochat's own GPT (the parity test).

Training on a CPU is bound by passes over activations more than by matmuls, so the forward
takes the short ways that give the same numbers: q, k and v from one matmul, rotary on both
halves of a head at once, relu^2 and the MLP's output projection as one autograd function
that saves relu(h) only. What a layer saves for backward is budgeted term by term in
training/memory.py (`_layer_bytes`, `_stem_bytes`) and held to that by a test. RMSNorm
keeps autograd's own backward on purpose: at init every block is the identity, the true
gradient of the layer scalars is ~1e-19 and the fp32 one is rounding noise that AdamW turns
into full-size first updates, so any other (equally exact) backward formula changes the loss
curves of every run. A 3-pass backward was 3-4% faster per step on the 2-core box.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.attention import attention
from engine.common import compute_dtype
from engine.kv_cache import KVCache as KVCacheRows
from engine.models.base import checked_groups, group_counts
from engine.models.heads import check_forward_args, generate_naive, head_output

# Other families' rotary base (the hybrid's); GPT's is `GPTConfig.rotary_base`.
ROTARY_BASE = 10_000
# The rotary table covers 10x the training context so generation can run past it.
ROTARY_LENGTH_FACTOR = 10
# Padding the lm_head's output dimension to a multiple of 64 keeps its matmul on fast tile sizes.
VOCAB_PAD_MULTIPLE = 64
LOGIT_SOFTCAP = 15.0
# The smear gate reads the first 24 channels of the normed embedding (nanochat's choice).
SMEAR_GATE_CHANNELS = 24
# Backout's strength at init; smear's lambda starts at 0 (the gate is closed).
BACKOUT_LAMBDA_INIT = 0.2
LossReduction = Literal["mean", "none", "sum"]
_CONFIG_INTS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
_VALUE_EMBED_INITS = ("uniform", "normal")

# What each field added with nanochat's 2026 model meant before it existed: the model of SPEC
# §4 as first built. A config dict lacking a field (every checkpoint written before) gets
# these values (`Family.legacy_fields`); a new GPTConfig gets the dataclass defaults.
LEGACY_FIELDS: dict[str, Any] = {
    "rotary_base": 10_000,
    "qk_scale": 1.0,
    "ve_gate_channels": 32,
    "ve_gate_range": 2.0,
    "short_window_divisor": 2,
    "short_window_multiple": 1,
    "smear": False,
    "backout": False,
    "wte_init_std": 1.0,
    "value_embed_init": "normal",
    "c_fc_init_scale": 1.0,
    "gate_init_max": 0.0,
    "resid_lambda_first": 1.0,
    "resid_lambda_last": 1.0,
    "x0_lambda_first": 0.1,
    "x0_lambda_last": 0.1,
}


@dataclass
class GPTConfig:
    """Architecture hyperparameters; checkpoints store exactly these fields (`to_dict`).

    The fields after `model` arrived with nanochat's 2026 model; their defaults are its
    behaviour, `LEGACY_FIELDS` the values of the model before them. The first eight change
    what a trained model computes, the last eight only how a new model is initialised.
    """

    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"
    # The family (engine/models registry); checkpoints written before families existed lack it.
    model: str = "gpt"
    # Rotary angle pos * base^(-2i/head_dim): a larger base turns the slow channels slower.
    rotary_base: int = 100_000
    # Queries and keys are multiplied by this after their RMSNorm (sharper attention).
    qk_scale: float = 1.2
    # The value-embedding gate reads this many leading channels and ranges over (0, range).
    ve_gate_channels: int = 12
    ve_gate_range: float = 3.0
    # An "S" layer's window: sequence_len // divisor rounded up to a multiple of `multiple`.
    short_window_divisor: int = 4
    short_window_multiple: int = 128
    # The smear gate after the embedding and the backout of the middle layer's residual.
    smear: bool = True
    backout: bool = True
    # Initialisation: wte ~ N(0, wte_init_std); value embeddings "uniform" like c_v or
    # "normal" N(0, 1); c_fc uniform at c_fc_init_scale x c_q's bound; the value-embedding
    # and smear gates uniform on [0, gate_init_max] (0: zeros); resid and x0 lambdas linear
    # from their first layer's value to their last's.
    wte_init_std: float = 0.8
    value_embed_init: str = "uniform"
    c_fc_init_scale: float = 0.4
    gate_init_max: float = 0.02
    resid_lambda_first: float = 1.15
    resid_lambda_last: float = 1.05
    x0_lambda_first: float = 0.20
    x0_lambda_last: float = 0.05

    def __post_init__(self) -> None:
        if self.model != "gpt":
            raise ValueError(f"model must be 'gpt' for a GPTConfig, got {self.model!r}")
        for name in (*_CONFIG_INTS, "rotary_base", "ve_gate_channels", "short_window_divisor",
                     "short_window_multiple"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("smear", "backout"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("qk_scale", "ve_gate_range", "wte_init_std", "c_fc_init_scale"):
            _check_float(self, name, positive=True)
        for name in ("gate_init_max", "resid_lambda_first", "resid_lambda_last",
                     "x0_lambda_first", "x0_lambda_last"):  # fmt: skip
            _check_float(self, name, positive=False)
        if self.gate_init_max < 0:
            raise ValueError(f"gate_init_max must be >= 0, got {self.gate_init_max!r}")
        if self.value_embed_init not in _VALUE_EMBED_INITS:
            raise ValueError(
                f"value_embed_init must be one of {', '.join(_VALUE_EMBED_INITS)}, "
                f"got {self.value_embed_init!r}"
            )
        if self.rotary_base < 2:
            raise ValueError(f"rotary_base must be at least 2, got {self.rotary_base!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even: rotary rotates pairs")
        if self.n_embd < self.ve_gate_channels:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be at least {self.ve_gate_channels}, "
                "the channels the value-embedding gate reads (ve_gate_channels)"
            )
        if self.smear and self.n_embd < SMEAR_GATE_CHANNELS:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be at least {SMEAR_GATE_CHANNELS}, "
                "the channels the smear gate reads"
            )
        pattern = self.window_pattern
        if not isinstance(pattern, str) or not pattern or set(pattern.upper()) - {"L", "S"}:
            raise ValueError(
                f"window_pattern must be a non-empty string of L (full context) and "
                f"S (short window) letters, got {pattern!r}"
            )
        self.window_pattern = pattern.upper()

    @classmethod
    def from_depth(
        cls,
        depth: int,
        *,
        vocab_size: int,
        sequence_len: int = 2048,
        aspect_ratio: int = 64,
        head_dim: int = 128,
        n_kv_head: int | None = None,
        window_pattern: str = "SSSL",
        **fields: Any,
    ) -> GPTConfig:
        """The config for `depth` layers: width depth*aspect_ratio rounded up to whole heads.

        `fields` sets any other field (e.g. smear=False); the rest keep their defaults."""
        for name, value in (
            ("depth", depth),
            ("aspect_ratio", aspect_ratio),
            ("head_dim", head_dim),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        model_dim = math.ceil(depth * aspect_ratio / head_dim) * head_dim
        n_head = model_dim // head_dim
        return cls(
            sequence_len=sequence_len,
            vocab_size=vocab_size,
            n_layer=depth,
            n_head=n_head,
            n_kv_head=n_head if n_kv_head is None else n_kv_head,
            n_embd=model_dim,
            window_pattern=window_pattern,
            **fields,
        )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    @property
    def short_window(self) -> int:
        """An "S" layer's window: sequence_len // short_window_divisor, rounded up to a
        multiple of short_window_multiple (nanochat: a quarter, up to FA3's 128-position
        tiles, so 2048 -> 512 and anything up to 512 -> 128; before: half, 2048 -> 1024).
        It may exceed the context, and then binds only when generating past it."""
        quotient = self.sequence_len // self.short_window_divisor
        return -(-quotient // self.short_window_multiple) * self.short_window_multiple

    def short_layers(self) -> int:
        """How many layers get the short window: the pattern tiled over all but the last layer
        (always full), counted in closed form so a config of any depth costs the same."""
        pattern, tiled = self.window_pattern, self.n_layer - 1
        full, rest = divmod(tiled, len(pattern))
        return full * pattern.count("S") + pattern[:rest].count("S")

    def window_sizes(self) -> list[int]:
        """Per layer, how many earlier positions a query may see (attention's `window`)."""
        sizes = {"L": self.sequence_len, "S": self.short_window}
        letters = [self.window_pattern[i % len(self.window_pattern)] for i in range(self.n_layer)]
        # The last layer always sees the whole context, whatever the pattern says.
        letters[-1] = "L"
        return [sizes[letter] for letter in letters]

    def has_value_embedding(self, layer: int) -> bool:
        """Alternating layers, counted back from the last one, which always has one."""
        return (self.n_layer - 1 - layer) % 2 == 0

    @property
    def backout_layer(self) -> int:
        """The layer whose output backout subtracts (nanochat: the middle one)."""
        return self.n_layer // 2

    def to_dict(self) -> dict:
        return asdict(self)


def _check_float(config: GPTConfig, name: str, *, positive: bool) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    setattr(config, name, float(value))


def smear_param_count(config: GPTConfig) -> int:
    """The smear gate's weight and lambda plus backout's lambda, those the config has."""
    return (SMEAR_GATE_CHANNELS + 1) * config.smear + config.backout


def count_params(config: GPTConfig) -> dict[str, int]:
    """`GPT(config).num_scaling_params()` in closed form: no tensor is built.

    The web app checks a submitted model's size with this, so the work is the same for any
    depth or width (tests hold it equal to the built model's counts).
    """
    n_embd, n_layer, kv_dim = config.n_embd, config.n_layer, config.kv_dim
    value_embed_layers = (n_layer + 1) // 2  # every other layer counted back from the last
    # Per block: c_q and c_proj (n_embd^2 each), c_k and c_v (n_embd x kv_dim each), the MLP
    # (8 n_embd^2); the value-embedding gate on value-embedding layers.
    block = 10 * n_embd * n_embd + 2 * n_embd * kv_dim
    counts = {
        "wte": config.vocab_size * n_embd,
        "value_embeds": value_embed_layers * config.vocab_size * kv_dim,
        "lm_head": config.padded_vocab_size * n_embd,
        "transformer_matrices": n_layer * block
        + value_embed_layers * config.ve_gate_channels * config.n_kv_head,
        "scalars": 2 * n_layer,
        "smear": smear_param_count(config),
    }
    counts["total"] = sum(counts.values())
    return counts


def flops_per_token(config: GPTConfig) -> int:
    """`GPT(config).estimate_flops()` in closed form (see there for what is counted)."""
    counts = count_params(config)
    seq = config.sequence_len
    short = config.short_layers()
    visible_keys = short * min(config.short_window, seq) + (config.n_layer - short) * seq
    attention_flops = 12 * config.n_head * config.head_dim * visible_keys
    smear_gate = SMEAR_GATE_CHANNELS * config.smear
    return 6 * (counts["transformer_matrices"] + counts["lm_head"] + smear_gate) + attention_flops


class KVCache(Protocol):
    """What `GPT.forward` needs from a KV cache (the engine's cache implements this).

    The cache holds keys and values for every layer and row, and one length per row: how many
    positions of that row are already cached. A forward of T new tokens per row
      1. reads `lengths` (B,) once: row b's new tokens sit at positions lengths[b] ..
         lengths[b] + T - 1, which is where their rotary angles come from;
      2. calls `insert(layer, k, v)` once per layer with this step's k, v (B, T, Hkv, D),
         already rotated and normed; the cache stores them at those positions and returns
         (keys, values, k_len): keys/values (B, Tmax, Hkv, D) holding every cached position of
         the layer (positions >= k_len[b] are ignored) and k_len = lengths + T;
      3. calls `advance(T)` once, after the last layer, to commit the new lengths.
    `max_len` (positions per row) must not exceed the model's rotary table.

    A model with the smear gate also needs each row's previous token: `last_tokens` (B,), the
    token at position lengths[b] - 1 (read only where lengths[b] > 0). The forward reads it
    first and overwrites it with the last of its T tokens. Caches copying rows (the engine's
    `replicate`, `move`) copy it with the keys.
    """

    max_len: int
    lengths: torch.Tensor
    last_tokens: torch.Tensor

    def insert(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def advance(self, num_tokens: int) -> None: ...


class ReferenceKVCache:
    """The plainest `KVCache`: dense (layers, batch, max_len, kv_heads, head_dim) tensors."""

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        max_len: int,
        n_kv_head: int,
        head_dim: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (n_layer, batch_size, max_len, n_kv_head, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.last_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len

    @classmethod
    def for_model(
        cls, model: GPT, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None
    ) -> ReferenceKVCache:
        """An empty cache shaped for `model`, by default in its device's compute dtype."""
        config = model.config
        device = model.get_device()
        return cls(
            config.n_layer,
            batch_size,
            max_len,
            config.n_kv_head,
            config.head_dim,
            device=device,
            dtype=compute_dtype(device) if dtype is None else dtype,
        )

    @classmethod
    def concat(cls, caches: Sequence[ReferenceKVCache]) -> ReferenceKVCache:
        """One batch holding the rows of several caches, each row keeping its own length."""
        if not caches:
            raise ValueError("concat needs at least one cache")
        first = caches[0]
        n_layer, _, _, n_kv_head, head_dim = first.k.shape
        if any(c.k.shape[0] != n_layer or c.k.shape[3:] != first.k.shape[3:] for c in caches):
            raise ValueError("caches to concat must have the same layers, kv heads and head dim")
        max_len = max(c.max_len for c in caches)
        merged = cls(
            n_layer,
            sum(c.k.size(1) for c in caches),
            max_len,
            n_kv_head,
            head_dim,
            device=first.k.device,
            dtype=first.k.dtype,
        )
        row = 0
        for cache in caches:
            rows = slice(row, row + cache.k.size(1))
            merged.k[:, rows, : cache.max_len] = cache.k
            merged.v[:, rows, : cache.max_len] = cache.v
            merged.lengths[rows] = cache.lengths
            merged.last_tokens[rows] = cache.last_tokens
            row = rows.stop
        return merged

    def insert(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, num_new = k.shape[:2]
        positions = self.lengths[:, None] + torch.arange(num_new, device=self.lengths.device)
        # Every layer writes the same positions, so checking the first one is enough.
        if layer == 0 and int(positions.max()) >= self.max_len:
            raise ValueError(
                f"KV cache overflow: {num_new} new tokens after lengths "
                f"{self.lengths.tolist()} exceed max_len {self.max_len}"
            )
        rows = torch.arange(batch, device=self.lengths.device)[:, None]
        self.k[layer, rows, positions] = k.to(self.k.dtype)
        self.v[layer, rows, positions] = v.to(self.v.dtype)
        return self.k[layer], self.v[layer], self.lengths + num_new

    def advance(self, num_tokens: int) -> None:
        self.lengths += num_tokens


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(
    length: int,
    head_dim: int,
    device: torch.device | str | None = None,
    base: int = ROTARY_BASE,
):
    """(cos, sin), each (length, head_dim // 2) fp32: angle pos * base^(-2i/head_dim).

    The frequencies are rounded as nanochat rounds them, 1 / base^e, except at base 10,000:
    every checkpoint of that base was written by the code before, which computed base^-e,
    and a frequency one ulp off moves late positions' angles by ~1e-4 rad -- enough to change
    an old model's logits in the last digits, so it keeps its own.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    inv_freq = base**-exponents if base == ROTARY_BASE else 1.0 / base**exponents
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def rotary_halves(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (..., D/2) -> the (..., 2, D/2) tables `rotate_halves` takes: [cos, cos] and
    [-sin, sin]. Built once per forward and shared by every layer."""
    return torch.stack((cos, cos), dim=-2), torch.stack((-sin, sin), dim=-2)


def rotate_halves(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """Rotate (..., D) by tables from `rotary_halves` (broadcastable to x as (..., 2, D/2)).

    With a head viewed as its halves (x1, x2), x * [cos, cos] + (x2, x1) * [-sin, sin] is
    (x1 cos - x2 sin, x2 cos + x1 sin): the textbook products and sums, so the same numbers,
    in four ops instead of eight.
    """
    halves = x.unflatten(-1, (2, -1))
    cos2, sin2 = cos2.to(x.dtype), sin2.to(x.dtype)
    return (halves * cos2 + halves.flip(-2) * sin2).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, D) by the angles in cos/sin (broadcastable to (B, T, 1, D/2)).

    Half-split layout: channel i pairs with channel i + D/2, not with its neighbour.
    """
    return rotate_halves(x, *rotary_halves(cos, sin))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.c_q = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.kv_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.kv_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.qk_scale = config.qk_scale
        self.ve_gate_channels = config.ve_gate_channels
        self.ve_gate_range = config.ve_gate_range
        self.ve_gate = (
            nn.Linear(config.ve_gate_channels, config.n_kv_head, bias=False)
            if config.has_value_embedding(layer_idx)
            else None
        )

    def qkv_weight(self) -> torch.Tensor:
        """c_q, c_k and c_v stacked into one (q + 2 kv, C) matrix (built on each call)."""
        return torch.cat((self.c_q.weight, self.c_k.weight, self.c_v.weight))

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """q, k and v side by side, (B, T, q + 2 kv).

        With autograd, one matmul on the stacked weights: the same numbers as three, under
        autocast x is cast once instead of three times, and backward is one matmul per operand.
        Without it (evaluation, cached decoding) stacking the weights on every call would cost
        more than it saves -- at depth 20 it copies 20 MB per layer -- so the three outputs are
        joined instead.
        """
        if torch.is_grad_enabled():
            return F.linear(x, self.qkv_weight())
        return torch.cat((self.c_q(x), self.c_k(x), self.c_v(x)), dim=-1)

    def forward(
        self,
        x: torch.Tensor,
        ve: torch.Tensor | None,
        cos2: torch.Tensor,
        sin2: torch.Tensor,
        window: int,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        heads = self.n_head + self.n_kv_head
        qk_dim = heads * self.head_dim
        qkv = self.project_qkv(x)
        # Under autocast the projections come out in the compute dtype; everything that meets
        # them in attention is brought to that same dtype.
        dtype = qkv.dtype
        # split, not slicing: its backward is one concatenation instead of a zero-filled
        # gradient per slice.
        qk, v = qkv.split([qk_dim, qkv.size(-1) - qk_dim], dim=-1)
        # q and k of every head rotated and normalised together (both act per head).
        qk = rms_norm(rotate_halves(qk.view(batch, seq, heads, self.head_dim), cos2, sin2))
        if self.qk_scale != 1.0:
            # Before the cast: one rounding. Attention saves the product instead of the norm's
            # output, so this costs a pass, not memory.
            qk = qk * self.qk_scale
        q, k = qk.to(dtype).split([self.n_head, self.n_kv_head], dim=2)
        v = v.view(batch, seq, self.n_kv_head, self.head_dim)
        if ve is not None:
            # One gate per kv head, in (0, ve_gate_range): near-zero weights start it near the
            # middle of its range (1 for the legacy 2, 1.5 for nanochat's 3).
            gate = self.ve_gate_range * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate_channels]))
            ve = ve.view(batch, seq, self.n_kv_head, self.head_dim)
            v = v + (gate.unsqueeze(-1) * ve).to(dtype)
        elif torch.is_grad_enabled():
            # Attention saves v for backward, and a view would keep the whole qkv output (q and
            # k too, already copied by rotary) alive until then: copying v costs one pass over
            # kv_dim and frees 2 * (q + k) bytes per token.
            v = v.contiguous()
        if kv_cache is None:
            y = attention(q, k, v, window=window)
        else:
            keys, values, k_len = kv_cache.insert(self.layer_idx, k, v)
            y = attention(q, keys.to(dtype), values.to(dtype), window=window, k_len=k_len)
        return self.c_proj(y.reshape(batch, seq, -1))


class _ReluSquare(torch.autograd.Function):
    """relu(x)^2 saving only its relu for backward, whose gradient is one product, 2 relu(x) g,
    instead of autograd's square-then-threshold chain (two fewer passes over the MLP's
    widest activation)."""

    @staticmethod
    def forward(ctx, x):
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return (r * grad).mul_(2.0)


def relu_square(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2, the MLP's activation."""
    return _ReluSquare.apply(x)


class _ReluSquareProject(torch.autograd.Function):
    """relu(h)^2 @ weight.T saving only relu(h) (and the weight in the matmul dtype).

    Autograd would keep both relu(h) (for the square's gradient) and relu(h)^2 (for the
    weight's gradient): two copies of the MLP's widest activation, 8 * n_embd bytes per token
    each in bf16, the largest thing a layer saves. The square is one cheap pass, so backward
    recomputes it instead. Same products in the same dtypes as `c_proj(relu_square(h))` under
    autocast or not: the matmuls run in h's dtype and the weight's gradient is cast back to
    the weight's dtype, as autocast's own cast would do.
    """

    @staticmethod
    def forward(ctx, h, weight):
        # Explicit dtypes: h is already in the compute dtype (autocast made it so).
        with torch.autocast(h.device.type, enabled=False):
            r = torch.relu(h)
            w = weight.to(h.dtype)
            ctx.save_for_backward(r, w)
            ctx.weight_dtype = weight.dtype
            return F.linear(r * r, w)

    @staticmethod
    def backward(ctx, grad):
        r, w = ctx.saved_tensors
        grad = grad.to(r.dtype)
        grad_rows = grad.reshape(-1, grad.size(-1))
        r_rows = r.reshape(-1, r.size(-1))
        grad_weight = grad_rows.t().mm(r_rows * r_rows).to(ctx.weight_dtype)
        grad_h = (grad.matmul(w) * r).mul_(2.0)
        return grad_h, grad_weight


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if torch.is_grad_enabled():
            return _ReluSquareProject.apply(h, self.c_proj.weight)
        return self.c_proj(relu_square(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        ve: torch.Tensor | None,
        cos2: torch.Tensor,
        sin2: torch.Tensor,
        window: int,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        x = x + self.attn(rms_norm(x), ve, cos2, sin2, window, kv_cache)
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    """The model. Built parameters are already initialised (`init_weights`)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.window_sizes = config.window_sizes()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "h": nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.value_embeds = nn.ModuleDict(
            {
                str(i): nn.Embedding(config.vocab_size, config.kv_dim)
                for i in range(config.n_layer)
                if config.has_value_embedding(i)
            }
        )
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        # Named as nanochat names them, so checkpoints map across by key.
        if config.smear:
            self.smear_gate = nn.Linear(SMEAR_GATE_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.full((1,), BACKOUT_LAMBDA_INIT))
        # Derived from the config, so not saved in checkpoints (persistent=False).
        cos, sin = rotary_tables(
            config.sequence_len * ROTARY_LENGTH_FACTOR, config.head_dim, base=config.rotary_base
        )
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter from the config's init fields, in nanochat's order.

        Call again after building on the meta device and `to_empty`. wte ~ N(0,
        wte_init_std), lm_head ~ N(0, 0.001); c_q, c_k, c_v uniform on ±sqrt(3/n_embd)
        (standard deviation 1/sqrt(n_embd), no outliers), c_fc on c_fc_init_scale times that;
        both output projections zero, so every block starts as the identity; the layer
        scalars on their linear schedules; smear's lambda 0 (closed), backout's 0.2; value
        embeddings uniform like c_v (or N(0, 1), the legacy init); the gates uniform on
        [0, gate_init_max], just above neutral.
        """
        config = self.config
        bound = math.sqrt(3) / math.sqrt(config.n_embd)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=config.wte_init_std)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            attn, mlp = block.attn, block.mlp
            for linear in (attn.c_q, attn.c_k, attn.c_v):
                nn.init.uniform_(linear.weight, -bound, bound)
            # nanochat rotates by -angle, we by +angle: negating the second rotary half of
            # every q/k head makes the model nanochat draws from the same seed, exactly (see
            # engine/models/nanochat_compat.py), so both start a run from the same function.
            with torch.no_grad():
                for linear, heads in ((attn.c_q, config.n_head), (attn.c_k, config.n_kv_head)):
                    linear.weight.view(heads, 2, -1, config.n_embd)[:, 1].neg_()
            nn.init.zeros_(attn.c_proj.weight)
            fc_bound = bound * config.c_fc_init_scale
            nn.init.uniform_(mlp.c_fc.weight, -fc_bound, fc_bound)
            nn.init.zeros_(mlp.c_proj.weight)
        steps = max(config.n_layer - 1, 1)
        for lambdas, first, last in (
            (self.resid_lambdas, config.resid_lambda_first, config.resid_lambda_last),
            (self.x0_lambdas, config.x0_lambda_first, config.x0_lambda_last),
        ):
            schedule = [first + (last - first) * i / steps for i in range(config.n_layer)]
            lambdas.copy_(torch.tensor(schedule, dtype=lambdas.dtype))
        if config.smear:
            nn.init.zeros_(self.smear_lambda)
            self._init_gate(self.smear_gate.weight)
        if config.backout:
            nn.init.constant_(self.backout_lambda, BACKOUT_LAMBDA_INIT)
        for table in self.value_embeds.values():
            if config.value_embed_init == "uniform":
                nn.init.uniform_(table.weight, -bound, bound)
            else:
                nn.init.normal_(table.weight, mean=0.0, std=1.0)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                self._init_gate(block.attn.ve_gate.weight)
        self.reset_rotary()

    def _init_gate(self, weight: torch.Tensor) -> None:
        if self.config.gate_init_max > 0:
            nn.init.uniform_(weight, 0.0, self.config.gate_init_max)
        else:
            nn.init.zeros_(weight)

    @torch.no_grad()
    def reset_rotary(self) -> None:
        """Recompute the rotary buffers in place (they are not in the state dict)."""
        cos, sin = rotary_tables(
            self.rotary_cos.size(0),
            self.config.head_dim,
            device=self.rotary_cos.device,
            base=self.config.rotary_base,
        )
        self.rotary_cos.copy_(cos)
        self.rotary_sin.copy_(sin)

    def reset_buffers(self) -> None:
        """The family interface's name for `reset_rotary` (the only derived buffers)."""
        self.reset_rotary()

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def max_positions(self) -> int:
        """Rotary angles exist for this many positions (10x the training context)."""
        return self.rotary_cos.size(0)

    def new_cache(self, batch_size: int, max_len: int) -> KVCacheRows:
        """The engine's decode state for `batch_size` rows of up to `max_len` positions: keys
        and values of every layer, in the device's compute dtype."""
        table = self.rotary_cos.size(0)
        if max_len > table:
            raise ValueError(f"KV cache max_len {max_len} exceeds the model's rotary table {table}")
        config, device = self.config, self.get_device()
        return KVCacheRows(
            config.n_layer, batch_size, max_len, config.n_kv_head, config.head_dim,
            device=device, dtype=compute_dtype(device),
        )  # fmt: skip

    def training_metrics(self) -> dict[str, float]:
        """Extra per-step values a trainer may log (none for this family)."""
        return {}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by kind, the way the optimizer treats them.

        transformer_matrices (every parameter in the blocks, all 2-D) go to Muon; wte,
        value_embeds, lm_head, scalars (resid and x0 lambdas) and smear (the smear gate's
        weight and lambda and backout's lambda, as nanochat groups them: AdamW at a fixed LR
        of 0.2, betas (0.8, 0.95), no weight decay; empty without smear and backout) to AdamW
        with their own LRs. Keys match `num_scaling_params()`.
        """
        groups = {
            "wte": [self.transformer.wte.weight],
            "value_embeds": list(self.value_embeds.parameters()),
            "lm_head": [self.lm_head.weight],
            "transformer_matrices": list(self.transformer.h.parameters()),
            "scalars": [self.resid_lambdas, self.x0_lambdas],
            "smear": self.smear_params(),
        }
        return checked_groups(self, groups)

    def smear_params(self) -> list[nn.Parameter]:
        """The smear gate's weight and lambda and backout's lambda, those the config has."""
        params = []
        if self.config.smear:
            params += [self.smear_gate.weight, self.smear_lambda]
        if self.config.backout:
            params.append(self.backout_lambda)
        return params

    def num_scaling_params(self) -> dict[str, int]:
        """Parameter counts per group of `param_groups()`, plus their total."""
        return group_counts(self.param_groups())

    def estimate_flops(self) -> int:
        """Training FLOPs per token at full context (forward + backward).

        6 per weight that takes part in a matmul (2 forward, 4 backward): the block matrices,
        the lm_head and the smear gate, as nanochat counts; embedding tables are lookups and
        the lambdas are elementwise, so they are left out. Attention adds 12 * heads *
        head_dim per visible key (QK^T and AV, forward and backward).
        """
        counts = self.num_scaling_params()
        matmul_params = counts["transformer_matrices"] + counts["lm_head"]
        if self.config.smear:
            matmul_params += self.smear_gate.weight.numel()
        seq = self.config.sequence_len
        attention_flops = sum(
            12 * self.config.n_head * self.config.head_dim * min(window, seq)
            for window in self.window_sizes
        )
        return 6 * matmul_params + attention_flops

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        loss_reduction: LossReduction = "mean",
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size) in fp32, or the loss when `targets` is given.

        Targets equal to -1 are ignored. loss_reduction 'none' returns a (B, T) loss.
        With `kv_cache`, idx holds the next T tokens of every row (see `KVCache`).
        """
        check_forward_args(idx, targets, loss_reduction)
        config = self.config
        batch, seq = idx.shape
        cos2, sin2 = rotary_halves(*self._rotary_angles(seq, kv_cache))
        x = rms_norm(self.transformer.wte(idx))
        if config.smear:
            x = self._smear(x, kv_cache)
        x0 = x
        backout = None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos2, sin2, self.window_sizes[i], kv_cache)
            if config.backout and i == config.backout_layer:
                # The next layer's mix saves x for backward anyway: keeping it costs nothing.
                backout = x
        if backout is not None:
            x = x - self.backout_lambda * backout
        if kv_cache is not None:
            if config.smear:
                # Only now that every layer has taken the step: a failed forward leaves the
                # cache as it was.
                kv_cache.last_tokens.copy_(idx[:, -1])
            kv_cache.advance(seq)
        return head_output(
            rms_norm(x), targets, loss_reduction, weight=self.lm_head.weight,
            vocab_size=self.config.vocab_size, softcap=LOGIT_SOFTCAP, logits=self._capped_logits,
        )  # fmt: skip

    def _smear(self, x: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        """Add to each position lambda * sigmoid(gate(its first 24 channels)) times the
        previous position's normed embedding; a row's first token has none and is left alone.

        With a cache, the previous token of a chunk's first position is the row's
        `last_tokens` entry (where the row holds any), so a prefill in chunks and one token
        at a time give what the whole sequence gives.
        """
        if kv_cache is None:
            current = x[:, 1:]
            gate = self.smear_lambda * torch.sigmoid(
                self.smear_gate(current[..., :SMEAR_GATE_CHANNELS])
            )
            return torch.cat((x[:, :1], current + gate * x[:, :-1]), dim=1)
        last = getattr(kv_cache, "last_tokens", None)
        if last is None:
            raise ValueError(
                "this model has a smear gate: its KV cache must keep each row's last token "
                "(last_tokens)"
            )
        held = (kv_cache.lengths > 0)[:, None, None]  # a bool factor, promoted in the product
        first = rms_norm(self.transformer.wte(last))[:, None].to(x.dtype) * held
        previous = torch.cat((first, x[:, :-1]), dim=1)
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :SMEAR_GATE_CHANNELS]))
        return x + gate * previous

    def _capped_logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits of the real vocabulary, soft-capped at ±LOGIT_SOFTCAP."""
        logits = self.lm_head(x)[..., : self.config.vocab_size].float()
        if torch.is_grad_enabled():
            return LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        # Without autograd the cap runs in place: out of place it would hold three copies of
        # the largest tensor evaluation makes; the numbers are the same.
        return logits.div_(LOGIT_SOFTCAP).tanh_().mul_(LOGIT_SOFTCAP)

    def _rotary_angles(
        self, seq: int, kv_cache: KVCache | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin broadcastable to (B, T, 1, head_dim/2) for this step's positions."""
        table_len = self.rotary_cos.size(0)
        if kv_cache is None:
            if seq > table_len:
                raise ValueError(f"sequence of {seq} tokens exceeds the rotary table ({table_len})")
            return self.rotary_cos[None, :seq, None], self.rotary_sin[None, :seq, None]
        if kv_cache.max_len > table_len:
            raise ValueError(
                f"KV cache max_len {kv_cache.max_len} exceeds the rotary table ({table_len})"
            )
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
        """Yield up to `max_tokens` continuation tokens, re-running the whole sequence each step.

        Slow on purpose: the ground truth the cached engine must reproduce (SPEC §9).
        """
        return generate_naive(
            lambda ids: self.forward(ids)[:, -1, :], self.get_device(), tokens, max_tokens,
            temperature, top_k, seed,
        )  # fmt: skip
