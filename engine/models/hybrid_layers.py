"""The three layers of the hybrid family (SPEC §13): gated DeltaNet, gated full attention and a
sparse mixture of experts. Pure PyTorch; the numeric kernels are engine/ops.

* `GatedDeltaNet` -- linear attention with the gated delta rule. Its state per value head is
  one (Dk, Dv) matrix, so a token costs the same at position 10 and at position 100,000; the
  rule both decays the state (g, "forget") and overwrites what a key already stored (the delta
  correction, beta), which is what lets a fixed-size state keep up with a long context. Training
  and prefill run the chunked (WY) form -- batched matmuls within chunks of `chunk_size` --,
  decode the recurrent form, one token per row: `engine.ops.delta_rule.delta_rule` picks.
* `GatedAttention` -- exact softmax attention for recall that a compressed state cannot give:
  grouped-query heads, RMSNorm on q and k per head (before rotary, as Qwen3-Next), rotary on the
  first `partial_rotary` fraction of each head (the rest is position-free), and an output gate:
  the q projection is doubled, and attention's output is multiplied by sigmoid(gate) per
  channel.
* `SparseMoE` -- a router picks `experts_per_token` SwiGLU experts per token (softmax, top-k,
  weights renormalised over the k), plus an always-on shared SwiGLU expert scaled by
  sigmoid(linear(x)). Only the chosen experts run on a token: tokens are sorted by expert and
  each expert runs once on its own tokens, so the compute is k/E of a dense pass over all
  experts. No capacity limit, so no token is dropped.

Norms: plain learnable RMSNorm (weight init 1). Qwen3-Next stores its norm weights zero-centred
(applies 1 + w, init 0) so that weight decay pulls them toward 1; this project never decays
vectors, so the plain form is the same model with one add fewer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.attention import attention
from engine.models.gpt import rotate_halves
from engine.ops.conv1d import causal_conv1d, causal_conv1d_step
from engine.ops.delta_rule import delta_rule

if TYPE_CHECKING:
    from engine.models.hybrid_config import HybridConfig

# q and k are L2-normalised with this floor on the norm (a zero vector stays zero).
L2_NORM_EPS = 1e-6
# Mamba-2 / Qwen3-Next gate init: A ~ U[1, 16] (decay rates), dt ~ log-U[1e-3, 1e-1].
A_INIT_RANGE = (1.0, 16.0)
DT_INIT_RANGE = (1e-3, 1e-1)
DT_INIT_FLOOR = 1e-4


class RMSNorm(nn.Module):
    """RMSNorm with a learnable gain (init 1)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def swiglu(
    x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """SwiGLU MLP: w_in (2D, C) holds the gate rows then the up rows; w_out (C, D). `scale`
    (N, 1) multiplies each row's hidden layer (a routing weight: scaling the D-wide hidden
    rather than the C-wide output keeps the smaller tensor for backward)."""
    gate, up = F.linear(x, w_in).chunk(2, dim=-1)
    if scale is not None:
        up = up * scale.to(up.dtype)
    return F.linear(F.silu(gate) * up, w_out)


def _no_autocast(device_type: str):
    return torch.autocast(device_type, enabled=False)


class GatedDeltaNet(nn.Module):
    """Linear attention with the gated delta rule (see the module docstring).

    `linear_idx` is the layer's index among the linear layers: the slot of its conv and
    recurrent states in a `HybridCache`.
    """

    def __init__(self, config: HybridConfig, linear_idx: int) -> None:
        super().__init__()
        self.linear_idx = linear_idx
        self.n_k_heads, self.n_v_heads = config.n_k_heads, config.n_v_heads
        self.k_head_dim, self.v_head_dim = config.k_head_dim, config.v_head_dim
        self.key_dim = config.n_k_heads * config.k_head_dim
        self.value_dim = config.n_v_heads * config.v_head_dim
        self.conv_dim = config.conv_dim
        self.chunk_size = config.chunk_size
        self.eps = config.norm_eps
        c = config.n_embd
        # q, k and v go through one depthwise convolution, so they come from one matrix.
        self.in_proj_qkv = nn.Linear(c, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(c, self.value_dim, bias=False)  # the output gate
        self.in_proj_ba = nn.Linear(c, 2 * config.n_v_heads, bias=False)  # beta and decay
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, config.conv_kernel))
        self.A_log = nn.Parameter(torch.empty(config.n_v_heads))
        self.dt_bias = nn.Parameter(torch.empty(config.n_v_heads))
        self.norm_weight = nn.Parameter(torch.ones(config.v_head_dim))  # gated RMSNorm
        self.out_proj = nn.Linear(self.value_dim, c, bias=False)

    @torch.no_grad()
    def init_gates(self) -> None:
        """A_log = log A with A ~ U[1, 16]; dt_bias = softplus^-1(dt), dt log-uniform on
        [1e-3, 1e-1] (Mamba-2's init, which Qwen3-Next keeps)."""
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(*A_INIT_RANGE).log())
        low, high = (math.log(x) for x in DT_INIT_RANGE)
        dt = torch.empty_like(self.dt_bias).uniform_(low, high).exp().clamp(min=DT_INIT_FLOOR)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, beta), each (B, T, H_v) fp32: g = -exp(A_log) softplus(a + dt_bias) <= 0 (the
        log decay) and beta = sigmoid(b) in (0, 1) (the write strength)."""
        b, a = self.in_proj_ba(x).float().split(self.n_v_heads, dim=-1)
        g = -self.A_log.float().exp() * F.softplus(a + self.dt_bias.float())
        return g, torch.sigmoid(b)

    def forward(self, x: torch.Tensor, cache: Any = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        qkv = self.in_proj_qkv(x)
        if cache is None:
            qkv, _ = causal_conv1d(qkv, self.conv_weight)
        else:
            conv_state = cache.conv_state(self.linear_idx)
            if seq == 1:  # decode: one K-tap dot product, the window shifted in place
                qkv = causal_conv1d_step(qkv[:, 0], conv_state, self.conv_weight).unsqueeze(1)
            else:  # prefill continues from the row's saved window
                qkv, final = causal_conv1d(qkv, self.conv_weight, initial_state=conv_state)
                conv_state.copy_(final)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = F.normalize(
            q.view(batch, seq, self.n_k_heads, self.k_head_dim), dim=-1, eps=L2_NORM_EPS
        )
        k = F.normalize(
            k.view(batch, seq, self.n_k_heads, self.k_head_dim), dim=-1, eps=L2_NORM_EPS
        )
        q = q * self.k_head_dim**-0.5
        repeat = self.n_v_heads // self.n_k_heads
        if repeat > 1:  # key head i serves value heads i*repeat .. (i+1)*repeat - 1
            q = q.repeat_interleave(repeat, dim=2)
            k = k.repeat_interleave(repeat, dim=2)
        v = v.reshape(batch, seq, self.n_v_heads, self.v_head_dim)
        g, beta = self.gates(x)
        state = None if cache is None else cache.recurrent_state(self.linear_idx)
        # The state is a running sum: the kernels compute in fp32, and autocast must not turn
        # their matmuls back into bf16.
        with _no_autocast(x.device.type):
            o, final_state = delta_rule(
                q, k.to(q.dtype), v, g, beta, initial_state=state, chunk_size=self.chunk_size
            )
        if state is not None:
            state.copy_(final_state)
        z = self.in_proj_z(x).view(batch, seq, self.n_v_heads, self.v_head_dim)
        # The gated norm in fp32 (Qwen3-Next's too): o comes out of the rule in v's dtype.
        o = F.rms_norm(o.float(), (self.v_head_dim,), self.norm_weight, self.eps) * F.silu(z)
        return self.out_proj(o.reshape(batch, seq, self.value_dim).to(z.dtype))


class GatedAttention(nn.Module):
    """Full causal attention with q/k norms, partial rotary and a sigmoid output gate.

    `full_idx` is the layer's index among the full layers: its layer in the cache's KV part.
    """

    def __init__(self, config: HybridConfig, full_idx: int) -> None:
        super().__init__()
        self.full_idx = full_idx
        self.n_head, self.n_kv_head, self.head_dim = (
            config.n_head,
            config.n_kv_head,
            config.head_dim,
        )
        self.rotary_dim = config.rotary_dim
        self.eps = config.norm_eps
        c = config.n_embd
        # Per head: head_dim query channels then head_dim gate channels.
        self.q_proj = nn.Linear(c, 2 * config.n_head * config.head_dim, bias=False)
        self.k_proj = nn.Linear(c, config.n_kv_head * config.head_dim, bias=False)
        self.v_proj = nn.Linear(c, config.n_kv_head * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, c, bias=False)
        self.q_norm = nn.Parameter(torch.ones(config.head_dim))
        self.k_norm = nn.Parameter(torch.ones(config.head_dim))

    def _rotate(self, x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
        """Rotary on the first rotary_dim channels of each head (half-split layout)."""
        rd = self.rotary_dim
        if rd == self.head_dim:
            return rotate_halves(x, cos2, sin2)
        return torch.cat((rotate_halves(x[..., :rd], cos2, sin2), x[..., rd:]), dim=-1)

    def forward(
        self, x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor, cache: Any = None
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        hd = self.head_dim
        q, gate = self.q_proj(x).view(batch, seq, self.n_head, 2 * hd).split(hd, dim=-1)
        dtype = q.dtype
        k = self.k_proj(x).view(batch, seq, self.n_kv_head, hd)
        v = self.v_proj(x).view(batch, seq, self.n_kv_head, hd)
        # Norms in fp32 (with fp32 gains), rotary and attention in the projections' dtype.
        q = self._rotate(F.rms_norm(q.float(), (hd,), self.q_norm, self.eps), cos2, sin2).to(dtype)
        k = self._rotate(F.rms_norm(k.float(), (hd,), self.k_norm, self.eps), cos2, sin2).to(dtype)
        if cache is None:
            y = attention(q, k, v)
        else:
            keys, values, k_len = cache.insert(self.full_idx, k, v)
            y = attention(q, keys.to(dtype), values.to(dtype), k_len=k_len)
        y = y * torch.sigmoid(gate)
        return self.o_proj(y.reshape(batch, seq, self.n_head * hd))


def load_balancing_loss(probs: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """E * sum_i f_i P_i: probs (N, E) router softmax, load (E,) the fraction f_i of all N*k
    routed assignments that went to expert i (sums to 1).

    Normalised so that balanced routing (f_i = P_i = 1/E) gives exactly 1.0, whatever k is
    (Switch Transformer's normalisation; Hugging Face's Qwen3-Next counts f per top-k slot
    and gets k instead). When f follows P, E sum P_i^2 >= 1 with equality only at uniform P; a
    router collapsed onto k experts gives E/k. Gradients reach the router through P only.
    """
    num_experts = probs.size(-1)
    return num_experts * (load * probs.mean(dim=0)).sum()


class SparseMoE(nn.Module):
    """Top-k routed SwiGLU experts plus an optional shared SwiGLU expert (module docstring).

    Expert weights are 3-D stacks, w_in (E, 2 D_e, C) (gate rows, then up rows) and w_out
    (E, C, D_e). `forward` returns (output, aux loss) and records the last load (fraction of
    assignments per expert, (E,)) and aux loss of a forward run with gradients, for
    `Hybrid.training_metrics`.
    """

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        c, e, d = config.n_embd, config.num_experts, config.expert_dim
        self.num_experts, self.top_k = e, config.experts_per_token
        self.router = nn.Linear(c, e, bias=False)
        self.w_in = nn.Parameter(torch.empty(e, 2 * d, c))
        self.w_out = nn.Parameter(torch.empty(e, c, d))
        ds = config.shared_expert_dim
        if ds > 0:
            self.shared_in = nn.Linear(c, 2 * ds, bias=False)
            self.shared_out = nn.Linear(ds, c, bias=False)
            self.shared_gate = nn.Linear(c, 1, bias=False)
        else:
            self.shared_in = self.shared_out = self.shared_gate = None
        self.last_load: torch.Tensor | None = None
        self.last_aux: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) -> (probs (N, E) fp32, experts (N, k), weights (N, k) fp32 summing to 1)."""
        probs = F.softmax(self.router(x).float(), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return probs, experts, weights / weights.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs, experts, weights = self.route(flat)
        # Every (token, slot) assignment, grouped by expert: a stable sort keeps token order
        # within an expert, so a token's result does not depend on what else is in the batch
        # beyond the rounding of a matmul over more rows.
        assigned = experts.reshape(-1)
        order = assigned.argsort(stable=True)
        tokens = order // self.top_k
        counts = torch.bincount(assigned, minlength=self.num_experts)
        # The split sizes are needed on the host (one device sync per MoE layer on CUDA).
        sizes = counts.tolist()
        inputs = flat[tokens].split(sizes)
        scales = weights.reshape(-1, 1)[order].split(sizes)
        w_in, w_out = self.w_in.unbind(0), self.w_out.unbind(0)
        outputs = [
            swiglu(inputs[e], w_in[e], w_out[e], scales[e])
            for e in range(self.num_experts)
            if sizes[e] > 0
        ]
        # Back to token order (a gather by the inverse permutation: its backward needs only
        # the indices), then each token's k weighted expert outputs summed.
        routed = torch.cat(outputs)[order.argsort()]
        out = routed.view(flat.size(0), self.top_k, -1).sum(dim=1)
        if self.shared_in is not None:
            shared = swiglu(flat, self.shared_in.weight, self.shared_out.weight)
            out = out + torch.sigmoid(self.shared_gate(flat)) * shared
        load = counts.float() / assigned.numel()
        aux = load_balancing_loss(probs, load)
        if torch.is_grad_enabled():
            self.last_load, self.last_aux = load.detach(), aux.detach()
        return out.view(shape[:-1] + (out.size(-1),)), aux
