"""The nanochat-site hybrid for `transformers` (remote code written by its exporter).

A Qwen3-Next-style model (engine/models/hybrid.py): per layer, pre-norm, either gated DeltaNet
linear attention ("linear") or gated full attention ("full"), then a sparse mixture of SwiGLU
experts with a shared expert. transformers' Qwen3-Next is close but not the same function: it
L2-normalises q and k as x * rsqrt(|x|^2 + eps) where the training code divides by
max(|x|, eps), and its norms store weights as 1 + w. So this file is the training code's
forward in plain PyTorch, with the delta rule written as its recurrence (one rank-1 update per
token, in fp32) rather than the chunked form training uses: the same numbers up to rounding,
and no kernel package needed.

Parameter names are the training code's, so the safetensors file is its state dict as is.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel

from .configuration_nanochat_site import NanochatSiteHybridConfig
from .nanochat_site_common import (
    DecodeState,
    NanochatSiteOutput,
    attend,
    causal_lm_loss,
    resolve_positions,
    rotary,
    rotate_halves,
    visible_keys,
)

# The config fields this code implements (a newer export with others is refused).
KNOWN_FIELDS = {
    "sequence_len", "vocab_size", "n_layer", "n_embd", "layer_pattern", "n_head", "n_kv_head",
    "head_dim", "partial_rotary", "n_k_heads", "n_v_heads", "k_head_dim", "v_head_dim",
    "conv_kernel", "chunk_size", "num_experts", "experts_per_token", "expert_dim",
    "shared_expert_dim", "aux_loss_coef", "norm_eps", "model",
}  # fmt: skip


class _Arch:
    """The architecture read from the config's `nanochat` dict."""

    def __init__(self, nanochat):
        fields = nanochat.get("model_config") or {}
        unknown = sorted(set(fields) - KNOWN_FIELDS)
        if unknown:
            raise ValueError(
                f"this modeling code does not implement the config fields {unknown}: "
                "re-export the model with the nanochat-site version that trained it"
            )
        for name in KNOWN_FIELDS - {"model", "layer_pattern"}:
            setattr(self, name, fields[name])
        self.rotary_dim = round(self.head_dim * self.partial_rotary)
        self.key_dim = self.n_k_heads * self.k_head_dim
        self.value_dim = self.n_v_heads * self.v_head_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        constants = nanochat["constants"]
        self.rotary_base = constants["rotary_base"]
        self.l2_norm_eps = constants["l2_norm_eps"]
        self.padded_vocab_size = nanochat["padded_vocab_size"]
        self.kinds = list(nanochat["layers"]["kind"])
        if len(self.kinds) != self.n_layer or set(self.kinds) - {"linear", "full"}:
            raise ValueError("layers.kind must list 'linear' or 'full' for each of n_layer layers")


class NanochatSiteRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def _swiglu(x, w_in, w_out, scale=None):
    """w_in (2D, C) holds the gate rows then the up rows; `scale` (N, 1) weights each row."""
    gate, up = F.linear(x, w_in).chunk(2, dim=-1)
    if scale is not None:
        up = up * scale.to(up.dtype)
    return F.linear(F.silu(gate) * up, w_out)


class NanochatSiteGatedDeltaNet(nn.Module):
    def __init__(self, arch, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.arch = arch
        c = arch.n_embd
        self.in_proj_qkv = nn.Linear(c, arch.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(c, arch.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(c, 2 * arch.n_v_heads, bias=False)
        self.conv_weight = nn.Parameter(torch.zeros(arch.conv_dim, arch.conv_kernel))
        self.A_log = nn.Parameter(torch.zeros(arch.n_v_heads))
        self.dt_bias = nn.Parameter(torch.zeros(arch.n_v_heads))
        self.norm_weight = nn.Parameter(torch.ones(arch.v_head_dim))
        self.out_proj = nn.Linear(arch.value_dim, c, bias=False)

    def _conv(self, x, state):
        """Causal depthwise convolution + SiLU over (B, T, C), continuing from the row's last
        K-1 inputs (zeros for a fresh row); returns (y, the new last K-1 inputs)."""
        batch, seq, channels = x.shape
        taps = self.conv_weight.size(1)
        history = state.conv.get(self.layer_idx) if state is not None else None
        if history is None:
            history = x.new_zeros(batch, channels, taps - 1)
        padded = torch.cat((history.to(x.dtype), x.transpose(1, 2)), dim=-1)
        y = F.conv1d(padded, self.conv_weight.to(x.dtype).unsqueeze(1), groups=channels)
        if state is not None:
            state.conv[self.layer_idx] = padded[:, :, padded.size(-1) - (taps - 1) :]
        return F.silu(y).transpose(1, 2)

    def forward(self, x, new_valid, state):
        arch = self.arch
        batch, seq, _ = x.shape
        # Padding enters as zeros: a zero token writes nothing into the state (its key is
        # zero) and reads as the zeros a fresh row's convolution starts from.
        x = x * new_valid[..., None].to(x.dtype)
        qkv = self._conv(self.in_proj_qkv(x), state)
        q, k, v = qkv.split([arch.key_dim, arch.key_dim, arch.value_dim], dim=-1)
        eps = arch.l2_norm_eps
        q = F.normalize(q.view(batch, seq, arch.n_k_heads, arch.k_head_dim), dim=-1, eps=eps)
        k = F.normalize(k.view(batch, seq, arch.n_k_heads, arch.k_head_dim), dim=-1, eps=eps)
        q = q * arch.k_head_dim**-0.5
        repeat = arch.n_v_heads // arch.n_k_heads
        if repeat > 1:  # key head i serves value heads i*repeat .. (i+1)*repeat - 1
            q = q.repeat_interleave(repeat, dim=2)
            k = k.repeat_interleave(repeat, dim=2)
        v = v.reshape(batch, seq, arch.n_v_heads, arch.v_head_dim)
        b, a = self.in_proj_ba(x).float().split(arch.n_v_heads, dim=-1)
        g = -self.A_log.float().exp() * F.softplus(a + self.dt_bias.float())
        beta = torch.sigmoid(b)
        memory = state.recurrent.get(self.layer_idx) if state is not None else None
        o, memory = _delta_rule(q, k, v, g, beta, memory)
        if state is not None:
            state.recurrent[self.layer_idx] = memory
        z = self.in_proj_z(x).view(batch, seq, arch.n_v_heads, arch.v_head_dim)
        o = F.rms_norm(o.float(), (arch.v_head_dim,), self.norm_weight, arch.norm_eps) * F.silu(z)
        return self.out_proj(o.reshape(batch, seq, arch.value_dim).to(z.dtype))


def _delta_rule(q, k, v, g, beta, memory):
    """The gated delta rule, token by token, in fp32. Per value head the memory S (Dk, Dv):
    S = exp(g) S; u = beta (v - Sᵀk); S = S + k uᵀ; o = Sᵀq."""
    batch, seq, heads, dk = q.shape
    dv = v.size(-1)
    if memory is None:
        memory = torch.zeros(batch, heads, dk, dv, dtype=torch.float32, device=q.device)
    outputs = []
    for t in range(seq):
        q_t, k_t, v_t = q[:, t].float(), k[:, t].float(), v[:, t].float()
        decayed = g[:, t].float().exp()[..., None, None] * memory
        recalled = torch.einsum("bhkv,bhk->bhv", decayed, k_t)
        u_t = beta[:, t].float()[..., None] * (v_t - recalled)
        memory = decayed + k_t[..., :, None] * u_t[..., None, :]
        outputs.append(torch.einsum("bhkv,bhk->bhv", memory, q_t))
    return torch.stack(outputs, dim=1).to(v.dtype), memory


class NanochatSiteGatedAttention(nn.Module):
    def __init__(self, arch, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.arch = arch
        c, hd = arch.n_embd, arch.head_dim
        # Per head: head_dim query channels then head_dim gate channels.
        self.q_proj = nn.Linear(c, 2 * arch.n_head * hd, bias=False)
        self.k_proj = nn.Linear(c, arch.n_kv_head * hd, bias=False)
        self.v_proj = nn.Linear(c, arch.n_kv_head * hd, bias=False)
        self.o_proj = nn.Linear(arch.n_head * hd, c, bias=False)
        self.q_norm = nn.Parameter(torch.ones(hd))
        self.k_norm = nn.Parameter(torch.ones(hd))

    def _rotate(self, x, cos, sin):
        """Rotary on the first rotary_dim channels of each head; the rest pass unchanged."""
        rd = self.arch.rotary_dim
        if rd == x.size(-1):
            return rotate_halves(x, cos, sin)
        return torch.cat((rotate_halves(x[..., :rd], cos, sin), x[..., rd:]), dim=-1)

    def forward(self, x, cos, sin, mask, state):
        arch = self.arch
        batch, seq, _ = x.shape
        hd = arch.head_dim
        q, gate = self.q_proj(x).view(batch, seq, arch.n_head, 2 * hd).split(hd, dim=-1)
        dtype = q.dtype
        k = self.k_proj(x).view(batch, seq, arch.n_kv_head, hd)
        v = self.v_proj(x).view(batch, seq, arch.n_kv_head, hd)
        eps = arch.norm_eps
        q = self._rotate(F.rms_norm(q.float(), (hd,), self.q_norm, eps), cos, sin).to(dtype)
        k = self._rotate(F.rms_norm(k.float(), (hd,), self.k_norm, eps), cos, sin).to(dtype)
        if state is not None:
            k, v = state.append_kv(self.layer_idx, k, v)
        y = attend(q, k, v, mask) * torch.sigmoid(gate)
        return self.o_proj(y.reshape(batch, seq, arch.n_head * hd))


class NanochatSiteSparseMoE(nn.Module):
    def __init__(self, arch):
        super().__init__()
        c, e, d = arch.n_embd, arch.num_experts, arch.expert_dim
        self.top_k = arch.experts_per_token
        self.router = nn.Linear(c, e, bias=False)
        self.w_in = nn.Parameter(torch.zeros(e, 2 * d, c))
        self.w_out = nn.Parameter(torch.zeros(e, c, d))
        ds = arch.shared_expert_dim
        if ds > 0:
            self.shared_in = nn.Linear(c, 2 * ds, bias=False)
            self.shared_out = nn.Linear(ds, c, bias=False)
            self.shared_gate = nn.Linear(c, 1, bias=False)
        else:
            self.shared_in = self.shared_out = self.shared_gate = None

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs = F.softmax(self.router(flat).float(), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e in range(self.w_in.size(0)):
            rows, slots = (experts == e).nonzero(as_tuple=True)
            if rows.numel():
                scale = weights[rows, slots][:, None]
                y = _swiglu(flat[rows], self.w_in[e], self.w_out[e], scale)
                out = out.index_add(0, rows, y.to(out.dtype))
        if self.shared_in is not None:
            shared = _swiglu(flat, self.shared_in.weight, self.shared_out.weight)
            out = out + torch.sigmoid(self.shared_gate(flat)) * shared
        return out.view(shape)


class NanochatSiteHybridBlock(nn.Module):
    def __init__(self, arch, layer_idx, kind, kind_idx):
        super().__init__()
        self.kind = kind
        self.norm1 = NanochatSiteRMSNorm(arch.n_embd, arch.norm_eps)
        self.mixer = (
            NanochatSiteGatedDeltaNet(arch, kind_idx)
            if kind == "linear"
            else NanochatSiteGatedAttention(arch, kind_idx)
        )
        self.norm2 = NanochatSiteRMSNorm(arch.n_embd, arch.norm_eps)
        self.moe = NanochatSiteSparseMoE(arch)

    def forward(self, x, cos, sin, mask, new_valid, state):
        h = self.norm1(x)
        if self.kind == "linear":
            x = x + self.mixer(h, new_valid, state)
        else:
            x = x + self.mixer(h, cos, sin, mask, state)
        return x + self.moe(self.norm2(x))


class NanochatSiteHybridForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanochatSiteHybridConfig
    base_model_prefix = "nanochat_site"
    main_input_name = "input_ids"
    _no_split_modules = ["NanochatSiteHybridBlock"]
    # The decode state holds recurrent matrices: it cannot be cropped or reordered.
    _is_stateful = True

    def __init__(self, config):
        super().__init__(config)
        arch = _Arch(config.nanochat)
        self.arch = arch
        counters = {"linear": 0, "full": 0}
        blocks = []
        for i, kind in enumerate(arch.kinds):
            blocks.append(NanochatSiteHybridBlock(arch, i, kind, counters[kind]))
            counters[kind] += 1
        self.wte = nn.Embedding(arch.vocab_size, arch.n_embd)
        self.blocks = nn.ModuleList(blocks)
        self.norm_f = NanochatSiteRMSNorm(arch.n_embd, arch.norm_eps)
        self.lm_head = nn.Linear(arch.n_embd, arch.padded_vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls):
        # generate() must not make a DynamicCache: forward returns its own DecodeState.
        return False

    def _init_weights(self, module):
        """Only for a model built from a config (loading overwrites every weight)."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=1 / math.sqrt(module.in_features))
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0)

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        past_key_values=None,
        use_cache=None,
        labels=None,
        inputs_embeds=None,
        return_dict=None,
        **kwargs,
    ):
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("this model takes input_ids")
        state = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = not self.training
        if state is None and use_cache:
            state = DecodeState()
        arch = self.arch
        seq = input_ids.size(1)
        valid, positions = resolve_positions(input_ids, attention_mask, position_ids, state)
        x = self.wte(input_ids)
        # The norms hand rotary fp32 q and k, so the angles stay fp32 too.
        cos, sin = rotary(positions[:, -seq:], arch.rotary_dim, arch.rotary_base, torch.float32)
        mask = visible_keys(valid, positions, seq)
        new_valid = valid[:, -seq:]
        for block in self.blocks:
            x = block(x, cos, sin, mask, new_valid, state)
        if state is not None:
            state.valid, state.positions = valid, positions
        logits = self.lm_head(self.norm_f(x))[..., : arch.vocab_size].float()
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return NanochatSiteOutput(loss=loss, logits=logits, cache=state)
