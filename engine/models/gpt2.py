"""GPT-2 (Radford et al. 2019) as the Nash-LLM framework builds it (SPEC §13): the research
baseline the project's nanochat GPT is compared against.

The shape, in the order the residual stream meets it: token embedding + learned position
embedding -> dropout; per layer pre-LayerNorm causal multi-head self-attention (q, k and v from
one biased Linear `c_attn`, output `c_proj`) -> dropout -> residual, then pre-LayerNorm MLP
(Linear(C, d_ff) -> GELU, tanh approximation -> Linear(d_ff, C)) -> dropout -> residual; final
LayerNorm; the lm_head is the token embedding itself (tied: one Parameter, no padding), giving
plain fp32 logits. Init N(0, 0.02) everywhere, biases 0, LayerNorm gains 1, and the residual
projections (both `c_proj`) N(0, 0.02 / sqrt(2 n_layer)) so the residual stream's variance does
not grow with depth. Module and parameter names follow nanoGPT (`transformer.wte`, `.wpe`,
`.h.{i}.ln_1`, `.attn.c_attn`, ...), which are Hugging Face's GPT-2 names too (HF stores the
linears transposed, as Conv1D).

What differs from nanochat's GPT (engine/models/gpt.py), i.e. what a GPT-vs-GPT-2 run measures:
learned absolute positions instead of rotary (so nothing runs past `sequence_len`: the engine's
cache and `forward` refuse longer rows, and `generate_naive` crops its window like nanoGPT),
LayerNorm with gains and biases instead of weightless RMSNorm, biases on every linear, GELU
instead of relu², no q/k norm, no sliding windows, no value embeddings, no residual/x0 scalars,
a tied head without a logit soft-cap, dropout, and one query head per key head.

Two deliberate simplifications of the paper's model: no dropout on the attention probabilities
(attention runs through `engine.attention.attention`, whose fused kernels take none; the
Nash-LLM recipe drops only the residual branches and the embeddings), and dropout is never
applied to a cached forward or inside `generate_naive`, whatever the module's mode: decoding is
inference, and the engine's equivalence with `generate_naive` must not hinge on a caller
remembering `eval()` (checkpoints are loaded in eval mode anyway).

Parameter groups use the generic names of engine/models/base.py: `matrices` (the blocks' four
linear weights), `embeddings` (wte -- which is also the head -- and wpe), `lm_head` (empty:
tied) and `vectors` (biases and LayerNorm parameters, never weight-decayed).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.attention import attention
from engine.common import compute_dtype
from engine.kv_cache import KVCache
from engine.models.base import Family, checked_groups, group_counts
from engine.models.gpt import LossReduction
from engine.models.heads import check_forward_args, generate_naive, head_output

INIT_STD = 0.02
_CONFIG_INTS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_embd", "d_ff")
# Bytes of one saved LayerNorm's per-token statistics (fp32 mean and rstd).
_LN_STATS_BYTES = 8


@dataclass
class GPT2Config:
    """Architecture hyperparameters; checkpoints store exactly these fields (`to_dict`).

    The defaults are GPT-2 small (124M). `d_ff` 0 or negative means 4 * n_embd and is stored
    resolved. `dropout` defaults to 0; the Nash-LLM recipe's 0.1 comes from its preset.
    """

    sequence_len: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    d_ff: int = 3072
    dropout: float = 0.0
    bias: bool = True
    # The family (engine/models/registry.py keys on it).
    model: str = "gpt2"

    def __post_init__(self) -> None:
        if self.model != "gpt2":
            raise ValueError(f"model must be 'gpt2' for a GPT2Config, got {self.model!r}")
        d_ff = self.d_ff
        if isinstance(d_ff, int) and not isinstance(d_ff, bool) and d_ff <= 0:
            n_embd = self.n_embd
            if isinstance(n_embd, int) and not isinstance(n_embd, bool):
                self.d_ff = 4 * n_embd
        for name in _CONFIG_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        dropout = self.dropout
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, int | float)
            or not 0 <= dropout < 1
        ):
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias must be true or false, got {self.bias!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        """The head's rows: the vocabulary itself (the head is the tied embedding, unpadded)."""
        return self.vocab_size

    def to_dict(self) -> dict:
        return asdict(self)


# ---- closed forms (the web app and the planners use these without building a model) --------


def count_params(config: GPT2Config) -> dict[str, int]:
    """`GPT2(config).num_scaling_params()` in closed form: no tensor is built.

    matrices: per block c_attn (C x 3C), c_proj (C x C), c_fc (C x F), c_proj (F x C);
    embeddings: wte (V x C, also the head) and wpe (S x C); lm_head: 0 (tied); vectors: per
    block ln_1 and ln_2 (2C each, C without bias) and the biases 3C + C + F + C, plus ln_f.
    """
    c, f, layers = config.n_embd, config.d_ff, config.n_layer
    norm = 2 * c if config.bias else c
    biases = (5 * c + f) if config.bias else 0
    counts = {
        "matrices": layers * (4 * c * c + 2 * c * f),
        "embeddings": config.vocab_size * c + config.sequence_len * c,
        "lm_head": 0,
        "vectors": layers * (2 * norm + biases) + norm,
    }
    counts["total"] = sum(counts.values())
    return counts


def scaling_params(config: GPT2Config) -> int:
    """Parameters taking part in a matmul per token: the blocks' matrices and the (tied) head;
    the position table is a lookup and is not counted."""
    return count_params(config)["matrices"] + config.vocab_size * config.n_embd


def flops_per_token(config: GPT2Config) -> int:
    """`GPT2(config).estimate_flops()` in closed form (see there for what is counted)."""
    attention_flops = 12 * config.n_layer * config.n_embd * config.sequence_len
    return 6 * scaling_params(config) + attention_flops


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "auto": torch.bfloat16, "fp32": torch.float32}
    if dtype not in names:
        raise ValueError(f"dtype must be a torch dtype or one of {', '.join(names)}, got {dtype!r}")
    return names[dtype]


def activation_bytes_per_token(config: GPT2Config, dtype: torch.dtype | str) -> float:
    """Bytes autograd saves per token of a training step (all layers and the stem), with the
    matmuls in `dtype` (fp32, or bf16/fp16 under autocast) and the residual stream in fp32.

    Term by term what `GPT2.forward` keeps (a test holds the sum to a saved-tensor probe), with
    C = n_embd, F = d_ff, H = n_head, a = dtype's bytes, d = 1 (a bool mask) when dropout > 0:
      per block, attention: ln_1's fp32 input and its mean/rstd (4C + 8); c_attn's input
        (C in the compute dtype: the fp32 LayerNorm output, or its cast under autocast); the
        qkv projection, which attention keeps whole as q, k and v (3aC); the attention output
        and its fp32 log-sum-exp (aC + 4H; SDPA writes the output (B, T, H, D)-ordered, so
        c_proj's input is a view of the same storage); the residual dropout's mask (dC);
      per block, MLP: ln_2's input and statistics (4C + 8); c_fc's input (aC); GELU's input
        (aF); the second linear's input, GELU's output (aF); the dropout mask (dC);
      the stem: the token ids (8, int64: what wte's backward gathers by), the embedding
        dropout's mask (dC), ln_f's input and statistics (4C + 8), and the fused loss's
        gradient of the hidden states (aC; `engine.fused_loss` computes it in forward).
    Not per token, so left out: half-precision weight copies, the position ids and the fused
    loss's fp32 gradient of the head (V x C). The logits are never materialised.
    """
    dt = _as_dtype(dtype)
    a = dt.itemsize
    c, f, heads = config.n_embd, config.d_ff, config.n_head
    mask = 1 if config.dropout > 0 else 0
    ln = 4 * c + _LN_STATS_BYTES
    attn = ln + a * c + 3 * a * c + (a * c + 4 * heads) + mask * c
    mlp = ln + a * c + a * f + a * f + mask * c
    stem = 8 + mask * c + ln + a * c
    return float(config.n_layer * (attn + mlp) + stem)


def config_from_flags(flags: Mapping[str, Any], vocab_size: int) -> GPT2Config:
    """base_train's model flags -> a config, on GPT's dial (engine/models/gpt_family.py):
    `depth` layers, width depth x aspect_ratio rounded up to whole heads of `head_dim`, a 4x MLP,
    context `max_seq_len`; `dropout` (default 0) and `bias` (default true) as given."""
    depth = flags["depth"]
    aspect_ratio = flags.get("aspect_ratio", 64)
    head_dim = flags.get("head_dim", 128)
    for name, value in (("depth", depth), ("aspect_ratio", aspect_ratio), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    n_embd = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    return GPT2Config(
        sequence_len=flags["max_seq_len"],
        vocab_size=vocab_size,
        n_layer=depth,
        n_head=n_embd // head_dim,
        n_embd=n_embd,
        d_ff=4 * n_embd,
        dropout=flags.get("dropout", 0.0),
        bias=flags.get("bias", True),
    )


# ---- the model ------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor, kv_cache: Any) -> torch.Tensor:
        batch, seq, channels = x.shape
        shape = (batch, seq, self.n_head, self.head_dim)
        # Views of the one projection: attention saves them as one storage.
        q, k, v = (t.view(shape) for t in self.c_attn(x).split(channels, dim=-1))
        if kv_cache is None:
            y = attention(q, k, v)
        else:
            keys, values, k_len = kv_cache.insert(self.layer_idx, k, v)
            y = attention(q, keys.to(q.dtype), values.to(q.dtype), k_len=k_len)
        return self.c_proj(y.reshape(batch, seq, channels))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.d_ff, bias=config.bias)
        self.c_proj = nn.Linear(config.d_ff, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: Any, dropout: float) -> torch.Tensor:
        x = x + _dropout(self.attn(self.ln_1(x), kv_cache), dropout)
        return x + _dropout(self.mlp(self.ln_2(x)), dropout)


def _dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout at rate p (0: the input itself, nothing saved for backward).

    `native_dropout` rather than `F.dropout`: on every device it keeps a bool mask (1 byte per
    value) for backward, where `F.dropout` on a CPU keeps the scaled noise in x's dtype."""
    return torch.native_dropout(x, p, True)[0] if p > 0 else x


class GPT2(nn.Module):
    """The model. Built parameters are already initialised (`init_weights`)."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "wpe": nn.Embedding(config.sequence_len, config.n_embd),
                "h": nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                "ln_f": nn.LayerNorm(config.n_embd, bias=config.bias),
            }
        )
        self.init_weights()

    @property
    def lm_head(self) -> nn.Embedding:
        """The output head: the token embedding itself (tied weights, one Parameter).

        Not a submodule of its own, so the state dict holds the matrix once and loading a
        checkpoint (`load_state_dict(..., assign=True)`) cannot untie it."""
        return self.transformer.wte

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2's init. Call again after building on the meta device and `to_empty`."""
        residual_std = INIT_STD / math.sqrt(2 * self.config.n_layer)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.transformer.h:
            nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=residual_std)

    def reset_buffers(self) -> None:
        """No derived buffers: positions are a learned table (a parameter)."""

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def max_positions(self) -> int:
        """Learned positions: the block size is as far as the model can place a token."""
        return self.config.sequence_len

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """The engine's decode state: keys and values of every layer for `batch_size` rows of
        up to `max_len` positions (at most `sequence_len`: positions are learned up to there),
        in the device's compute dtype."""
        config, device = self.config, self.get_device()
        if max_len > config.sequence_len:
            raise ValueError(
                f"KV cache max_len {max_len} exceeds the model's context of "
                f"{config.sequence_len} positions (GPT-2's positions are learned up to there)"
            )
        return KVCache(
            config.n_layer, batch_size, max_len, config.n_head, config.head_dim,
            device=device, dtype=compute_dtype(device),
        )  # fmt: skip

    def training_metrics(self) -> dict[str, float]:
        """Extra per-step values a trainer may log (none for this family)."""
        return {}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by kind (engine/models/base.py's generic names).

        matrices: the blocks' 2-D linear weights; embeddings: wte (also the head) and wpe;
        lm_head: empty (tied to wte); vectors: every bias and LayerNorm parameter.
        """
        matrices, vectors = [], []
        for param in self.transformer.h.parameters():
            (matrices if param.dim() == 2 else vectors).append(param)
        vectors.extend(self.transformer.ln_f.parameters())
        groups = {
            "matrices": matrices,
            "embeddings": [self.transformer.wte.weight, self.transformer.wpe.weight],
            "lm_head": [],
            "vectors": vectors,
        }
        return checked_groups(self, groups)

    def num_scaling_params(self) -> dict[str, int]:
        """Parameter counts per group of `param_groups()`, plus their total."""
        return group_counts(self.param_groups())

    def estimate_flops(self) -> int:
        """Training FLOPs per token at full context (forward + backward).

        6 per weight that takes part in a matmul (2 forward, 4 backward): the blocks' matrices
        and the tied head (wte counted once, as the head's matmul; its lookup is free), not the
        position table, biases or LayerNorms. Attention adds 12 * n_embd per visible key per
        layer (QK^T and AV, forward and backward), counted at the full context as nanochat
        does for GPT.
        """
        counts = self.num_scaling_params()
        head = self.transformer.wte.weight.numel()
        config = self.config
        attention_flops = 12 * config.n_layer * config.n_embd * config.sequence_len
        return 6 * (counts["matrices"] + head) + attention_flops

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: Any = None,
        loss_reduction: LossReduction = "mean",
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size) in fp32, or the loss when `targets` is given.

        Targets equal to -1 are ignored; loss_reduction 'none' returns a (B, T) loss. With
        `kv_cache` (engine/kv_cache.py), idx holds the next T tokens of every row, each row at
        its own cached length. Dropout (config.dropout) applies in train mode without a cache.
        """
        dropout = self.config.dropout if self.training and kv_cache is None else 0.0
        return self._forward(idx, targets, kv_cache, loss_reduction, dropout)

    def _forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None,
        kv_cache: Any,
        loss_reduction: str,
        dropout: float,
    ) -> torch.Tensor:
        check_forward_args(idx, targets, loss_reduction)
        batch, seq = idx.shape
        x = self.transformer.wte(idx) + self.transformer.wpe(self._positions(seq, kv_cache))
        x = _dropout(x, dropout)
        for block in self.transformer.h:
            x = block(x, kv_cache, dropout)
        if kv_cache is not None:
            kv_cache.advance(seq)
        return head_output(
            self.transformer.ln_f(x), targets, loss_reduction, weight=self.transformer.wte.weight,
            vocab_size=self.config.vocab_size, softcap=None, logits=self._logits,
        )  # fmt: skip

    def _positions(self, seq: int, kv_cache: Any) -> torch.Tensor:
        """This step's positions: (T,) from 0 without a cache, (B, T) from each row's cached
        length with one. Learned positions end at `sequence_len`, so nothing may go past it."""
        limit = self.config.sequence_len
        device = self.get_device()
        if kv_cache is None:
            if seq > limit:
                raise ValueError(
                    f"sequence of {seq} tokens exceeds the model's context of {limit} positions "
                    "(GPT-2's positions are learned up to there)"
                )
            return torch.arange(seq, device=device)
        # The cache refuses writes past its max_len, so max_len <= context keeps every position
        # inside the table without reading the lengths back from the device.
        if kv_cache.max_len > limit:
            raise ValueError(
                f"KV cache max_len {kv_cache.max_len} exceeds the model's context of {limit} "
                "positions (GPT-2's positions are learned up to there)"
            )
        lengths = kv_cache.lengths
        return lengths[:, None] + torch.arange(seq, device=lengths.device)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits of the tied head."""
        return F.linear(x, self.transformer.wte.weight).float()

    def generate_naive(
        self,
        tokens: Sequence[int],
        max_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int = 42,
    ) -> Iterator[int]:
        """Yield up to `max_tokens` continuation tokens, re-running the whole sequence each step
        (no dropout, whatever the module's mode): the ground truth the cached engine must
        reproduce. Past `sequence_len` tokens it conditions on the last `sequence_len` only,
        as nanoGPT does (the engine never goes there: its cache ends at the context)."""
        return generate_naive(
            lambda ids: self._forward(ids, None, None, "mean", 0.0)[:, -1, :], self.get_device(),
            tokens, max_tokens, temperature, top_k, seed, context=self.config.sequence_len,
        )  # fmt: skip


FAMILY = Family(
    name="gpt2",
    label="GPT-2",
    config_cls=GPT2Config,
    model_cls=GPT2,
    count_params=count_params,
    scaling_params=scaling_params,
    flops_per_token=flops_per_token,
    activation_bytes_per_token=activation_bytes_per_token,
    config_from_flags=config_from_flags,
    flags=("aspect_ratio", "head_dim", "dropout", "bias"),
)
