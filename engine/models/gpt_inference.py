"""GPT's forward for KV-cached inference, in as few tensor ops as the same math allows.

Decoding one token of a small model on a CPU is dispatch-bound: every tensor op costs 3-13 µs
of framework overhead, while the arithmetic of a whole step takes well under a millisecond,
and `GPT.forward` issues ~360 ops per step. `InferenceForward` computes what `GPT.forward`
computes with a KV cache -- the same formulas, normalisations and rotations in the same order
-- in about a third of the ops:

* derived weights (`InferenceWeights`), built once and rebuilt only when a parameter changes:
  q, k, v and the value-embedding gate as one pre-transposed matrix (one matmul per layer
  instead of four; the gate reads the first ve_gate_channels inputs, so its other rows are
  zero), the MLP's input matrix and the lm_head pre-transposed (a (K, N) row-major matrix
  makes the 8-row matmul up to 1.6x faster), the layer scalars read once. The copies cost (7 C^2 layers +
  vocab C) floats: 12 MB for the 4-layer bench model, about 1.3 GB at depth 20;
* rotary tables in "halves" form: with a head viewed as its two halves (2, D/2), rotating it is
  `x * [cos, cos] + flip(x) * [-sin, sin]`, three ops for q and k of all heads together;
* attention planned once per step (`_StepPlan`): when every row has the same length a one-token
  step needs no mask (the cache is sliced to the window), otherwise one mask per distinct window
  is built and shared by the layers that use it;
* residual adds fused into the output projections (`addmm`), in-place activations, and logits
  for the last position only (none at all for a prefill); the smear gate's and backout's
  work is done on the positions that need it (backout: the last ones only).

It runs in the weights' dtype, which must be fp32 (or fp64): under autocast `addmm` would round
the residual stream to bf16, so mixed-precision devices keep `GPT.forward`. The tests hold it
to `GPT.forward` (logits allclose) and to `generate_naive` (greedy tokens equal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from engine.attention import sdpa, visible_keys
from engine.common import compute_dtype
from engine.models.gpt import GPT, LOGIT_SOFTCAP, SMEAR_GATE_CHANNELS, rotary_halves


def lean_decoder(model: GPT, cache) -> InferenceForward | None:
    """`InferenceForward` for `model` where its device computes in fp32 and the weights and
    the cache are in that dtype, else None (the engine then runs `GPT.forward` under
    autocast, which keeps the residual stream in fp32 where this forward's addmm would not)."""
    lean = compute_dtype(model.get_device()) == cache.dtype == model.lm_head.weight.dtype
    return InferenceForward(model) if lean else None


class StepKVCache(Protocol):
    """What `InferenceForward` needs from a KV cache (`engine.engine.CacheRows` has it).

    Like `engine.models.gpt.KVCache`, but the lengths are also known as Python ints, so a step is
    planned without reading the device, and `write` returns the layer's whole cache heads
    first (B, H, max_len, D), the layout attention reads, for the caller to slice.
    """

    max_len: int
    lengths: torch.Tensor
    last_tokens: torch.Tensor

    def host_lengths(self) -> list[int]: ...

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def advance(self, num_tokens: int) -> None: ...


@dataclass(frozen=True)
class _Layer:
    qkv_gate: torch.Tensor  # (C, q + k + v [+ gate] columns)
    proj: torch.Tensor  # (C, C), the transposed view of attn.c_proj
    fc: torch.Tensor  # (C, 4C) contiguous
    fc_proj: torch.Tensor  # (4C, C), the transposed view of mlp.c_proj
    value_embed: torch.Tensor | None  # (vocab, kv_dim) table, for layers that have one
    resid_lambda: float
    x0_lambda: torch.Tensor  # 0-d: multiplying by a Python float costs an extra scalar wrap
    window: int


class InferenceWeights:
    """The parameters of a `GPT` in the layout `InferenceForward` wants; never saved.

    Built from the model's current parameters; `key` records each source tensor's storage and
    version counter, which every in-place update (optimizer step, `load_state_dict`) bumps.
    """

    def __init__(self, model: GPT, key: tuple) -> None:
        config = model.config
        wte = model.transformer.wte.weight
        if wte.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"InferenceForward computes in the weights' dtype, which must be fp32 or fp64, "
                f"got {wte.dtype}: run GPT.forward under autocast instead"
            )
        self.key = key
        self.softcap = LOGIT_SOFTCAP
        # F.rms_norm's default eps, as a tensor so that adding it costs no scalar wrap.
        self.norm_eps = torch.tensor(torch.finfo(wte.dtype).eps, dtype=wte.dtype, device=wte.device)
        with torch.no_grad():
            self.wte = wte.detach()
            self.lm_head = model.lm_head.weight.detach()[: config.vocab_size].t().contiguous()
            # Halves form of the rotary tables, one row per position: (L, 1, 2, D/2).
            cos2, sin2 = rotary_halves(model.rotary_cos.detach(), model.rotary_sin.detach())
            self.rotary_cos, self.rotary_sin = cos2[:, None], sin2[:, None]
            resid = model.resid_lambdas.tolist()
            x0 = model.x0_lambdas.detach().clone()
            # (C, 1) gate matrix and the 0-d lambda; None without the smear gate.
            self.smear_gate = self.smear_lambda = self.backout_lambda = None
            if config.smear:
                self.smear_gate = model.smear_gate.weight.detach().t().contiguous()
                self.smear_lambda = model.smear_lambda.detach()[0].clone()
            if config.backout:
                self.backout_lambda = model.backout_lambda.detach()[0].clone()
            self.qk_scale = config.qk_scale
            self.ve_gate_range = config.ve_gate_range
            self.layers = []
            for i, block in enumerate(model.transformer.h):
                attn, mlp = block.attn, block.mlp
                parts = [attn.c_q.weight, attn.c_k.weight, attn.c_v.weight]
                if attn.ve_gate is not None:
                    gate = attn.ve_gate.weight.new_zeros(config.n_kv_head, config.n_embd)
                    gate[:, : config.ve_gate_channels] = attn.ve_gate.weight
                    parts.append(gate)
                self.layers.append(
                    _Layer(
                        qkv_gate=torch.cat([p.detach() for p in parts]).t().contiguous(),
                        proj=attn.c_proj.weight.detach().t(),
                        fc=mlp.c_fc.weight.detach().t().contiguous(),
                        fc_proj=mlp.c_proj.weight.detach().t(),
                        value_embed=(
                            model.value_embeds[str(i)].weight.detach()
                            if config.has_value_embedding(i)
                            else None
                        ),
                        resid_lambda=resid[i],
                        x0_lambda=x0[i],
                        window=model.window_sizes[i],
                    )
                )


class InferenceForward:
    """`GPT.forward` with a KV cache, for inference (no autograd) in the weights' dtype.

    `__call__(idx, cache)` consumes the next T tokens of every row like
    `model(idx, kv_cache=cache)` and returns the soft-capped fp32 logits of each row's last
    token, (B, vocab_size). Weights replaced or updated in place are noticed, except updates
    through `.data` and to inference tensors (a model built under inference_mode), which
    bypass the version counters.
    """

    def __init__(self, model: GPT) -> None:
        self.model = model
        # (the module's parameter or buffer dict, name) of every tensor the derived weights come
        # from. Looked up on each call, so a parameter replaced by a new one
        # (load_state_dict(assign=True)) is noticed; the dicts skip nn.Module.__getattr__,
        # which made this check cost 28 µs a step instead of 6.
        self._sources = [
            (tensors, name)
            for module in model.modules()
            for tensors in (module._parameters, module._buffers)
            for name, tensor in tensors.items()
            if tensor is not None
        ]
        self._weights: InferenceWeights | None = None

    def weights(self) -> InferenceWeights:
        """The derived weights, rebuilt if any source tensor changed since the last call."""
        tensors = [source[name] for source, name in self._sources]
        try:
            key = tuple((tensor.data_ptr(), tensor._version) for tensor in tensors)
        except RuntimeError:
            # Inference tensors (a model built under inference_mode) have no version counter.
            key = tuple(
                (tensor.data_ptr(), -1 if tensor.is_inference() else tensor._version)
                for tensor in tensors
            )
        if self._weights is None or self._weights.key != key:
            self._weights = InferenceWeights(self.model, key)
        return self._weights

    def __call__(
        self, idx: torch.Tensor, cache: StepKVCache, *, logits: bool = True
    ) -> torch.Tensor | None:
        """Advance every row of `cache` by the T tokens of idx (B, T); with `logits`, return
        the (B, vocab_size) fp32 logits of each row's last token, else None (a prefill)."""
        if torch.is_grad_enabled():
            raise RuntimeError("InferenceForward runs without autograd: use torch.inference_mode()")
        if idx.dim() != 2 or idx.is_floating_point():
            raise ValueError(
                f"idx must be a (B, T) integer tensor, got {idx.dtype} {tuple(idx.shape)}"
            )
        config = self.model.config
        w = self.weights()
        if cache.max_len > w.rotary_cos.size(0):
            raise ValueError(
                f"KV cache max_len {cache.max_len} exceeds the rotary table "
                f"({w.rotary_cos.size(0)})"
            )
        batch, seq = idx.shape
        plan = _StepPlan(cache, seq)
        if plan.uniform:
            rot_cos = w.rotary_cos[plan.first : plan.first + seq]
            rot_sin = w.rotary_sin[plan.first : plan.first + seq]
        else:
            positions = cache.lengths[:, None] + torch.arange(seq, device=idx.device)
            rot_cos, rot_sin = w.rotary_cos[positions], w.rotary_sin[positions]
        n_head, n_kv_head, head_dim = config.n_head, config.n_kv_head, config.head_dim
        heads = n_head + n_kv_head
        qk_dim, kv_dim = heads * head_dim, config.kv_dim
        tokens = batch * seq
        eps = w.norm_eps

        x = _rms_norm(F.embedding(idx.reshape(-1), w.wte), eps)
        if w.smear_gate is not None:
            x = _smear(x.view(batch, seq, -1), w, cache, plan, eps).view(tokens, -1)
        x0 = x
        backout = None
        for i, layer in enumerate(w.layers):
            x = torch.add(x0 * layer.x0_lambda, x, alpha=layer.resid_lambda)
            qkv = torch.mm(_rms_norm(x, eps), layer.qkv_gate)
            qk = qkv[:, :qk_dim].view(batch, seq, heads, 2, head_dim // 2)
            qk = torch.addcmul(qk * rot_cos, qk.flip(-2), rot_sin)
            qk = _rms_norm(qk.view(batch, seq, heads, head_dim), eps)
            if w.qk_scale != 1.0:
                qk.mul_(w.qk_scale)
            v = qkv[:, qk_dim : qk_dim + kv_dim].view(batch, seq, n_kv_head, head_dim)
            if layer.value_embed is not None:
                # v + gate * ve with gate = range sigmoid(.), as CausalSelfAttention does.
                gate = torch.sigmoid(qkv[:, qk_dim + kv_dim :]).view(batch, seq, n_kv_head, 1)
                ve = F.embedding(idx, layer.value_embed).view(batch, seq, n_kv_head, head_dim)
                v = torch.addcmul(v, gate, ve, value=w.ve_gate_range)
            keys, values = cache.write(i, qk[:, :, n_head:], v)
            if keys.dtype != v.dtype:
                raise ValueError(
                    f"the KV cache holds {keys.dtype} but the weights are {v.dtype}: "
                    "InferenceForward needs them equal"
                )
            start, length, mask, causal = plan.attention(layer.window)
            y = sdpa(
                qk[:, :, :n_head].transpose(1, 2),
                keys.narrow(2, start, length),
                values.narrow(2, start, length),
                mask=mask,
                causal=causal,
            )
            x = torch.addmm(x, y.transpose(1, 2).reshape(tokens, -1), layer.proj)
            hidden = torch.mm(_rms_norm(x, eps), layer.fc).relu_().square_()
            x = torch.addmm(x, hidden, layer.fc_proj)
            if i == config.backout_layer and w.backout_lambda is not None:
                backout = x
        if w.smear_gate is not None:
            cache.last_tokens.copy_(idx[:, -1])
        cache.advance(seq)
        if not logits:
            return None
        last = x.view(batch, seq, -1)[:, -1]
        if backout is not None:
            last = last - w.backout_lambda * backout.view(batch, seq, -1)[:, -1]
        out = torch.mm(_rms_norm(last, eps), w.lm_head).float()
        return out.div_(w.softcap).tanh_().mul_(w.softcap)


class _StepPlan:
    """Where each layer's attention reads the cache this step, decided once per window.

    Rows hold `lengths[b]` cached positions and gain T new ones. When all lengths are equal,
    a single new token sees exactly the last window + 1 positions, so the cache is sliced and
    no mask is needed; a fresh prefill whose window cannot bind is plain causal attention.
    Anything else gets an explicit mask, built once per window per step.
    """

    def __init__(self, cache: StepKVCache, seq: int) -> None:
        host = cache.host_lengths()
        self.first = host[0]
        self.uniform = min(host) == max(host)
        self.seq = seq
        self.end = max(host) + seq
        self._lengths = cache.lengths
        self._by_window: dict[int, tuple[int, int, torch.Tensor | None, bool]] = {}

    def attention(self, window: int) -> tuple[int, int, torch.Tensor | None, bool]:
        """(first key position, number of positions, mask or None, causal) for a layer with
        `window`."""
        plan = self._by_window.get(window)
        if plan is None:
            if self.uniform and self.seq == 1:
                start = max(0, self.first - window)
                plan = (start, self.end - start, None, False)
            elif self.uniform and self.first == 0 and window >= self.seq - 1:
                plan = (0, self.end, None, True)
            else:
                k_len = self._lengths + self.seq
                mask = visible_keys(self.seq, self.end, window, k_len, None, k_len.device)
                plan = (0, self.end, mask, False)
            self._by_window[window] = plan
        return plan


def _smear(
    x: torch.Tensor, w: InferenceWeights, cache: StepKVCache, plan: _StepPlan, eps: torch.Tensor
) -> torch.Tensor:
    """`GPT._smear` with a cache, on (B, T, C): each position gains lambda * sigmoid(gate) times
    the previous token's normed embedding -- the row's cached last token for the first
    position (none where the row is empty), the chunk's own previous position for the rest."""
    batch, seq, width = x.shape
    gate = torch.mm(x.reshape(-1, width)[:, :SMEAR_GATE_CHANNELS], w.smear_gate)
    gate = torch.sigmoid(gate).mul_(w.smear_lambda).view(batch, seq, 1)
    if plan.uniform and plan.first == 0:
        # Fresh rows (a prefill): the first position has nothing before it.
        out = x.clone()
        out[:, 1:].addcmul_(gate[:, 1:], x[:, :-1])
        return out
    first = _rms_norm(F.embedding(cache.last_tokens, w.wte), eps)
    if not plan.uniform:
        # A bool factor (promoted in the product): no separate cast.
        first = first * (cache.lengths > 0)[:, None]
    previous = first[:, None] if seq == 1 else torch.cat((first[:, None], x[:, :-1]), dim=1)
    return torch.addcmul(x, gate, previous)


def _rms_norm(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """`F.rms_norm` over the last dim in 5 kernels instead of its ~10 (fp32/fp64 input); `eps`
    is a 0-d tensor holding finfo(dtype).eps, F.rms_norm's default. Same result for
    power-of-two widths (1/width is then exact), within an ulp otherwise."""
    mean_square_plus_eps = torch.add(eps, (x * x).sum(-1, keepdim=True), alpha=1 / x.size(-1))
    return x * mean_square_plus_eps.rsqrt_()
