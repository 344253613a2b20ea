"""The hybrid family's config: its own module so that the model (engine/models/hybrid.py) and
its layers (engine/models/hybrid_layers.py) both read it without importing each other.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from engine.models.gpt import VOCAB_PAD_MULTIPLE

_POSITIVE_INTS = (
    "sequence_len", "vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim",
    "n_k_heads", "n_v_heads", "k_head_dim", "v_head_dim", "conv_kernel", "chunk_size",
    "num_experts", "experts_per_token", "expert_dim",
)  # fmt: skip
LAYER_KINDS = {"L": "linear", "F": "full"}


@dataclass
class HybridConfig:
    """Architecture hyperparameters; checkpoints store exactly these fields (`to_dict`)."""

    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 8
    n_embd: int = 512
    layer_pattern: str = "LLLF"
    # Full attention.
    n_head: int = 4
    n_kv_head: int = 1
    head_dim: int = 128
    partial_rotary: float = 0.25
    # Linear attention (gated DeltaNet).
    n_k_heads: int = 2
    n_v_heads: int = 4
    k_head_dim: int = 128
    v_head_dim: int = 128
    conv_kernel: int = 4
    chunk_size: int = 64
    # Sparse MoE.
    num_experts: int = 8
    experts_per_token: int = 2
    expert_dim: int = 512
    shared_expert_dim: int = 512
    aux_loss_coef: float = 1e-3
    norm_eps: float = 1e-6
    model: str = "hybrid"

    def __post_init__(self) -> None:
        if self.model != "hybrid":
            raise ValueError(f"model must be 'hybrid' for a HybridConfig, got {self.model!r}")
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        ds = self.shared_expert_dim
        if isinstance(ds, bool) or not isinstance(ds, int) or ds < 0:
            raise ValueError(f"shared_expert_dim must be an integer >= 0, got {ds!r}")
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})"
            )
        if self.n_v_heads % self.n_k_heads:
            raise ValueError(
                f"n_v_heads ({self.n_v_heads}) must be a multiple of n_k_heads ({self.n_k_heads})"
            )
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"experts_per_token ({self.experts_per_token}) must not exceed "
                f"num_experts ({self.num_experts})"
            )
        rotary = self.partial_rotary
        if isinstance(rotary, bool) or not isinstance(rotary, int | float) or not 0 < rotary <= 1:
            raise ValueError(f"partial_rotary must be a fraction in (0, 1], got {rotary!r}")
        rotated = self.head_dim * rotary
        if abs(rotated - round(rotated)) > 1e-9 or round(rotated) % 2 or round(rotated) < 2:
            raise ValueError(
                f"partial_rotary ({rotary}) x head_dim ({self.head_dim}) = {rotated:g} must be a "
                "positive even number of channels: rotary rotates pairs"
            )
        for name in ("aux_loss_coef", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps!r}")
        pattern = self.layer_pattern
        if not isinstance(pattern, str) or not pattern or set(pattern.upper()) - set(LAYER_KINDS):
            raise ValueError(
                f"layer_pattern must be a non-empty string of L (linear attention) and "
                f"F (full attention) letters, got {pattern!r}"
            )
        self.layer_pattern = pattern.upper()
        self.partial_rotary = float(rotary)
        self.aux_loss_coef = float(self.aux_loss_coef)
        self.norm_eps = float(self.norm_eps)

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    @property
    def rotary_dim(self) -> int:
        """Channels per head that rotary rotates (the first ones)."""
        return round(self.head_dim * self.partial_rotary)

    @property
    def conv_dim(self) -> int:
        """Channels of a linear layer's convolution: q and k (key heads), v (value heads)."""
        return 2 * self.n_k_heads * self.k_head_dim + self.n_v_heads * self.v_head_dim

    def layer_kinds(self) -> list[str]:
        """ "linear" or "full" per layer: the pattern tiled over the layers (the last layer is
        not forced to be full)."""
        pattern = self.layer_pattern
        return [LAYER_KINDS[pattern[i % len(pattern)]] for i in range(self.n_layer)]

    def to_dict(self) -> dict:
        return asdict(self)
